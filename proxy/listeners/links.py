"""One-time approval links: a small page showing the held payment and the rule; it acts only on a POST
from that page, and only for the person the link was issued to once they prove it with their own token
(an approver's ``psa_...``; the owner's ``pso_...`` for a hold that names no approvers): a link alone,
forwarded or leaked, casts no vote. A used, expired, unknown or tampered link does nothing and says so."""

from __future__ import annotations

import html
import time
from collections.abc import Callable

from aiohttp import web

from proxy.approvals import PENDING, link_hash
from proxy.currency import format_minor
from proxy.errors import PaySentryError
from proxy.owners import refusal
from proxy.principals import Principal, Principals
from proxy.store import ApprovalRecord, HoldStore, VoteRefused, VoteResult

STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:40rem;margin:2rem auto;padding:0 1rem;color:#222}"
    "table{border-collapse:collapse}td{padding:.25rem .75rem .25rem 0;vertical-align:top}"
    "button{font-size:1rem;padding:.5rem 1.25rem;margin-right:.5rem}.approve{background:#1a7f37;color:#fff}"
    ".deny{background:#cf222e;color:#fff}textarea{width:100%}"
)


def _page(title: str, body: str, status: int = 200) -> web.Response:
    text = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<meta name='robots' content='noindex'><style>{STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>{body}</body></html>"
    )
    return web.Response(
        text=text,
        content_type="text/html",
        status=status,
        headers={
            "Cache-Control": "no-store",
            "Referrer-Policy": "no-referrer",
            "X-Frame-Options": "DENY",
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
        },
    )


def _gone(text: str) -> web.Response:
    return _page("This approval link is no longer valid", f"<p>{html.escape(text)}</p>", status=410)


class LinkPages:
    def __init__(
        self,
        store: HoldStore,
        principals: Principals,
        on_vote: Callable[[ApprovalRecord], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store, self.principals, self.on_vote, self.clock = store, principals, on_vote, clock

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/approvals/link/{token}", self.show)
        app.router.add_post("/approvals/link/{token}", self.act)

    async def _find(self, token: str) -> tuple[ApprovalRecord, str] | web.Response:
        found = await self.store.find_link(link_hash(token))
        if found is None:
            return _gone("The link is unknown.")
        approval, approver, used_at, expires_at = found
        if used_at is not None:
            return _gone("The link has already been used.")
        if expires_at <= self.clock() or approval.state != PENDING:
            return _gone(f"The payment is no longer waiting for approval (it is {approval.state}).")
        return approval, approver

    async def show(self, request: web.Request) -> web.Response:
        found = await self._find(request.match_info["token"])
        if isinstance(found, web.Response):
            return found
        approval, approver = found
        auth = approval.authorization
        assert auth is not None
        amount = format_minor(auth.amount, auth.currency) if auth.currency else str(auth.amount)
        rows = [
            ("Agent", auth.agent_id),
            ("Operation", auth.operation),
            ("Amount", amount),
            ("Destination", auth.destination or "-"),
            ("Rule", f"{auth.policy}.{auth.rule}"),
            ("Why", auth.message),
            ("Votes so far", ", ".join(f"{v.voter}: {v.vote}" for v in approval.votes) or "none"),
            ("Quorum", f"{approval.quorum} of {len(approval.approvers) or 1}"),
            ("Time left", f"{max(0, int(approval.expires_at - self.clock()))} s"),
        ]
        table = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
        chosen = request.query.get("decision", "")
        hint = (
            f"<p>You opened the <b>{html.escape(chosen)}</b> link; confirm below.</p>"
            if chosen in ("approve", "deny")
            else ""
        )
        form = (
            "<form method='post'><p><label>Your PaySentry token (shown once when you were made an approver)"
            "<br><input type='password' name='token' autocomplete='current-password' required></label></p>"
            "<p><label>Reason (optional)<br><textarea name='reason' rows='2'></textarea>"
            "</label></p><button class='approve' name='decision' value='approve'>Approve</button>"
            "<button class='deny' name='decision' value='deny'>Deny</button></form>"
        )
        return _page(f"Approve a payment as {approver}?", f"<table>{table}</table>{hint}{form}")

    async def act(self, request: web.Request) -> web.Response:
        found = await self._find(request.match_info["token"])
        if isinstance(found, web.Response):
            return found
        approval, approver = found
        form = await request.post()
        decision = form.get("decision")
        if decision not in ("approve", "deny"):
            return _page(
                "Nothing was done", "<p>Choose Approve or Deny on the approval page.</p>", status=400
            )
        try:
            principal = await self.principals.authenticate(str(form.get("token", "")), request.remote)
        except PaySentryError as exc:
            return _page("Nothing was done", f"<p>{html.escape(exc.message)}</p>", status=exc.status)
        if not _issued_to(principal, approver, approval):
            return _page(
                "Nothing was done",
                f"<p>This link is {html.escape(approver)}'s; a vote counts only for whoever signs in, and "
                "you are not them.</p>",
                status=403,
            )
        try:
            result: VoteResult = await self.store.use_link(
                link_hash(request.match_info["token"]),
                decision == "approve",
                str(form.get("reason", ""))[:2000],
                self.clock(),
                principal.voter,
                principal.authenticated("link"),
            )
        except VoteRefused as fact:
            return _gone(refusal(fact).message)
        except PaySentryError as exc:  # the store is unavailable
            return _gone(exc.message)
        self.on_vote(result.approval)
        return _page(
            "Thank you",
            f"<p>Your vote ({html.escape(str(decision))}) is recorded. The payment is now "
            f"<b>{html.escape(result.approval.state)}</b>.</p>",
        )


def _issued_to(principal: Principal, approver: str, approval: ApprovalRecord) -> bool:
    """Whether the signed-in identity is the one the link was issued to, and of the hold's owner."""
    if principal.owner.id != approval.owner_id:
        return False
    return principal.is_owner if approver == "owner" else principal.voter == approver
