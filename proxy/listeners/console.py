"""The console: server-rendered pages for owners and approvers on the owner listener (``/console/``).

Sign-in takes a PaySentry token (the owner's ``pso_...`` or an approver's ``psa_...``), checked like every
token (bcrypt, lockout), and sets a session cookie: the principal's kind and id, the digest of the token
hash it was made with (a rotated or revoked token ends its sessions), a CSRF token and an expiry, sealed
with the encryption keys (AES-GCM, so every replica sharing the keys reads it and nobody can forge it).
The cookie is ``HttpOnly``, ``SameSite=Strict`` and ``Path=/console``; every POST also carries the
session's CSRF token in a hidden field, compared in constant time. Every page reads only the signed-in
principal's owner's rows (owner isolation), and an approver sees only the holds pages.

Pages: approvals (pending holds: payment, rule, votes so far, time left; approve or deny as yourself),
one approval, agents (labels, state, spend against every limit and window, a chart of spend over the last
14 days), decisions and the audit log (filters, paging), the policy in force, connections (never their
credentials).
"""

from __future__ import annotations

import hashlib
import hmac
import html
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from proxy.approvals import PENDING
from proxy.currency import format_minor
from proxy.errors import PaySentryError
from proxy.holds import HoldCoordinator
from proxy.owners import OwnerService, refusal, spend_against_limits
from proxy.policy.reload import PolicyHolder
from proxy.principals import Principal, Principals
from proxy.secrets import Sealer, SealError
from proxy.store import ApprovalRecord, AuthorizationRecord, Page, Store, UnknownCursor

COOKIE = "paysentry_session"
SESSION_TTL = 12 * 3600.0
CONTEXT = "console-session"
COUNTING = ("held", "approved", "forwarding", "in_doubt", "settled")  # states whose amount is spend
Handler = Callable[[web.Request, Principal, str], Awaitable[web.StreamResponse]]

STYLE = """
body{font-family:system-ui,sans-serif;margin:0;color:#1f2328;background:#f6f8fa}
header{background:#24292f;color:#fff;padding:.6rem 1.2rem;display:flex;gap:1.2rem;align-items:center}
header a{color:#fff;text-decoration:none}header .who{margin-left:auto;opacity:.85}
main{max-width:72rem;margin:1.2rem auto;padding:0 1.2rem}
table{border-collapse:collapse;width:100%;background:#fff}
th,td{padding:.4rem .6rem;border-bottom:1px solid #d0d7de;text-align:left;vertical-align:top;font-size:.92rem}
th{background:#eaeef2}.num{text-align:right;font-variant-numeric:tabular-nums}
button{padding:.35rem .9rem;border:0;border-radius:4px;cursor:pointer}
.approve{background:#1a7f37;color:#fff}.deny{background:#cf222e;color:#fff}
.flash{background:#ddf4ff;border:1px solid #54aeff;padding:.5rem .8rem;margin-bottom:1rem}
.error{background:#ffebe9;border-color:#ff8182}.muted{color:#57606a}
.card{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:1rem;margin-bottom:1rem}
form.inline{display:inline}input,select{padding:.3rem}.bar{fill:#0969da}
"""

SCRIPT = """
document.querySelectorAll('[data-deadline]').forEach(function (el) {
  function tick() {
    var left = Math.max(0, Math.round(Number(el.dataset.deadline) - Date.now() / 1000));
    el.textContent = left + ' s';
  }
  tick(); setInterval(tick, 1000);
});
if (document.body.dataset.refresh) {
  setInterval(function () {
    var a = document.activeElement;
    if (!a || (a.tagName !== 'INPUT' && a.tagName !== 'TEXTAREA')) { location.reload(); }
  }, Number(document.body.dataset.refresh) * 1000);
}
"""


class Console:
    def __init__(
        self,
        store: Store,
        principals: Principals,
        sealer: Sealer,
        service: OwnerService,
        holds: HoldCoordinator,
        policies: PolicyHolder,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store, self.principals, self.sealer, self.service = store, principals, sealer, service
        self.holds, self.policies, self.clock = holds, policies, clock

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/console", self.home)
        r.add_get("/console/", self.home)
        r.add_get("/console/app.js", self.script)
        r.add_get("/console/login", self.login_page)
        r.add_post("/console/login", self.login)
        r.add_post("/console/logout", self._signed(self.logout))
        r.add_get("/console/approvals", self._signed(self.approvals))
        r.add_get("/console/approvals/{id}", self._signed(self.approval))
        r.add_post("/console/approvals/{id}/vote", self._signed(self.vote))
        r.add_get("/console/agents", self._signed(self.agents, owner_only=True))
        r.add_get("/console/decisions", self._signed(self.decisions, owner_only=True))
        r.add_get("/console/audit", self._signed(self.audit, owner_only=True))
        r.add_get("/console/policy", self._signed(self.policy, owner_only=True))
        r.add_get("/console/connections", self._signed(self.connections, owner_only=True))

    # -- sessions ------------------------------------------------------------------------------------------
    def _cookie(self, principal: Principal) -> str:
        doc = {
            "k": principal.kind,
            "i": principal.id,
            "h": _digest(principal.token_hash),
            "c": secrets.token_urlsafe(24),
            "e": self.clock() + SESSION_TTL,
        }
        return self.sealer.seal(json.dumps(doc).encode(), CONTEXT).decode()

    async def _session(self, request: web.Request) -> tuple[Principal, str] | None:
        raw = request.cookies.get(COOKIE, "")
        if not raw or len(raw) > 4096:
            return None
        try:
            doc = json.loads(self.sealer.open(raw.encode(), CONTEXT))
        except (SealError, ValueError, UnicodeError):
            return None
        if not isinstance(doc, dict) or not isinstance(doc.get("e"), float | int) or doc["e"] < self.clock():
            return None
        principal = await self.principals.find(str(doc.get("k")), str(doc.get("i")))
        if principal is None or not hmac.compare_digest(_digest(principal.token_hash), str(doc.get("h"))):
            return None  # revoked, or its token was replaced since
        return principal, str(doc.get("c"))

    def _signed(
        self, handler: Handler, owner_only: bool = False
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            session = await self._session(request)
            if session is None:
                if request.method == "POST":
                    return _page(
                        "Signed out", None, "", "<p>Your session ended; sign in again.</p>", status=401
                    )
                raise web.HTTPSeeOther("/console/login?" + urlencode({"next": request.path_qs}))
            principal, csrf = session
            if request.method == "POST":
                form = await request.post()
                if not hmac.compare_digest(str(form.get("csrf", "")), csrf):
                    return _page(
                        "Refused", principal, csrf, "<p>The form is stale; reload the page.</p>", status=403
                    )
            if owner_only and not principal.is_owner:
                return _page(
                    "Owners only",
                    principal,
                    csrf,
                    "<p>Approvers see the holds; the rest is the owner's.</p>",
                    403,
                )
            try:
                return await handler(request, principal, csrf)
            except UnknownCursor as fact:  # a cursor typed or edited into the address
                return _page(
                    "Refused", principal, csrf, _flash(refusal(fact).message, error=True), status=400
                )
            except PaySentryError as exc:
                return _page("Refused", principal, csrf, _flash(exc.message, error=True), status=exc.status)

        return wrapped

    async def home(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPSeeOther("/console/approvals")

    async def script(self, request: web.Request) -> web.StreamResponse:
        return web.Response(
            text=SCRIPT, content_type="application/javascript", headers={"Cache-Control": "no-store"}
        )

    async def login_page(
        self, request: web.Request, message: str = "", status: int = 200
    ) -> web.StreamResponse:
        target = _local(request.query.get("next", ""))
        body = (
            (_flash(message, error=True) if message else "")
            + "<div class='card'><form method='post' action='/console/login'>"
            f"<input type='hidden' name='next' value='{html.escape(target)}'>"
            "<p><label>PaySentry token<br><input id='token' type='password' name='token' size='60' "
            "autocomplete='current-password' required></label></p>"
            "<p class='muted'>The owner's <code>pso_...</code> token, or your approver token "
            "<code>psa_...</code> (shown once when the owner made you an approver).</p>"
            "<button id='sign-in' class='approve'>Sign in</button></form></div>"
        )
        return _page("Sign in", None, "", body, status=status)

    async def login(self, request: web.Request) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"{request.scheme}://{request.host}":
            return await self.login_page(request, "Sign in from the console's own page.", 403)
        form = await request.post()
        try:
            principal = await self.principals.authenticate(str(form.get("token", "")).strip(), request.remote)
        except PaySentryError as exc:
            return await self.login_page(request, exc.message, exc.status)
        await self.store.record_event(
            principal.owner.id,
            None,
            None,
            "console.signed_in",
            principal.voter,
            principal.authenticated("console"),
            self.clock(),
        )
        response = web.HTTPSeeOther(_local(str(form.get("next", ""))) or "/console/approvals")
        response.set_cookie(
            COOKIE,
            self._cookie(principal),
            max_age=int(SESSION_TTL),
            path="/console",
            httponly=True,
            samesite="Strict",
            secure=request.secure,
        )
        raise response

    async def logout(self, request: web.Request, principal: Principal, csrf: str) -> web.StreamResponse:
        response = web.HTTPSeeOther("/console/login")
        response.del_cookie(COOKIE, path="/console")
        raise response

    # -- holds ---------------------------------------------------------------------------------------------
    async def approvals(self, request: web.Request, principal: Principal, csrf: str) -> web.StreamResponse:
        state = request.query.get("state", PENDING)
        states = ("pending", "approved", "denied", "expired", "all")
        if state not in states:
            state = PENDING
        rows = await self.store.list_approvals(principal.owner.id, None if state == "all" else state)
        names = await self._agent_names(principal)
        tabs = " · ".join(
            f"<a href='/console/approvals?state={s}'>{'<b>' + s + '</b>' if s == state else s}</a>"
            for s in states
        )
        if not rows:
            table = f"<p id='no-holds' class='muted'>No {html.escape(state)} holds.</p>"
        else:
            cells = [self._approval_row(a, principal, csrf, names) for a in reversed(rows)]
            table = _table(["Hold", "Agent", "Amount", "Rule", "Votes", "Time left", ""], cells, raw=True)
        body = _flash(request.query.get("msg", "")) + f"<p>{tabs}</p>{table}"
        return _page("Holds", principal, csrf, body, refresh=3 if state == PENDING else 0)

    def _approval_row(
        self, a: ApprovalRecord, principal: Principal, csrf: str, names: Mapping[str, str]
    ) -> list[str]:
        auth = a.authorization
        return [
            f"<a class='hold' href='/console/approvals/{html.escape(a.id)}'>{html.escape(a.id)}</a>",
            html.escape(names.get(auth.agent_id, auth.agent_id) if auth else ""),
            html.escape(_amount(auth) if auth else ""),
            html.escape(f"{auth.policy}.{auth.rule}" if auth else ""),
            html.escape(_votes(a)),
            _time_left(a, self.clock()),
            self._vote_forms(a, principal, csrf),
        ]

    def _vote_forms(self, a: ApprovalRecord, principal: Principal, csrf: str) -> str:
        if a.state != PENDING:
            return html.escape(a.state)
        may = principal.voter in a.approvers if a.approvers else principal.is_owner
        if not may:
            return "<span class='muted'>not yours to decide</span>"
        done = next((v.vote for v in a.votes if v.voter == principal.voter), None)
        if done:
            return f"<span class='muted'>you voted {html.escape(done)}</span>"
        action = f"/console/approvals/{html.escape(a.id)}/vote"
        hidden = f"<input type='hidden' name='csrf' value='{html.escape(csrf)}'>"
        return (
            f"<form class='inline' method='post' action='{action}'>{hidden}"
            "<input name='reason' placeholder='reason (optional)' size='14'> "
            "<button class='approve' name='decision' value='approve'>Approve</button> "
            "<button class='deny' name='decision' value='deny'>Deny</button></form>"
        )

    async def approval(self, request: web.Request, principal: Principal, csrf: str) -> web.StreamResponse:
        a = await self.store.get_approval(principal.owner.id, request.match_info["id"])
        if a is None:
            return _page("Not found", principal, csrf, "<p>No such hold.</p>", status=404)
        auth = a.authorization
        names = await self._agent_names(principal)
        facts = [
            ("State", a.state),
            ("Agent", names.get(auth.agent_id, auth.agent_id) if auth else ""),
            ("Operation", auth.operation if auth else ""),
            ("Amount", _amount(auth) if auth else ""),
            ("Destination", (auth.destination if auth else "") or "-"),
            ("Rule", f"{auth.policy}.{auth.rule}" if auth else ""),
            ("Why", auth.message if auth else ""),
            ("Approvers", ", ".join(a.approvers) or "the owner"),
            ("Quorum", f"{a.quorum} of {len(a.approvers) or 1}"),
            ("Held at", _when(a.created_at)),
        ]
        rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts)
        rows += f"<tr><th>Time left</th><td>{_time_left(a, self.clock())}</td></tr>"
        votes = _table(
            ["Voter", "Vote", "How", "Reason", "At"],
            [[v.voter, v.vote, v.via, v.reason, _when(v.at)] for v in a.votes],
        )
        body = (
            _flash(request.query.get("msg", ""))
            + f"<div class='card'><table id='hold'>{rows}</table></div><h2>Votes</h2>{votes}"
            + f"<div id='vote'>{self._vote_forms(a, principal, csrf)}</div>"
        )
        return _page(f"Hold {a.id}", principal, csrf, body, refresh=3 if a.state == PENDING else 0)

    async def vote(self, request: web.Request, principal: Principal, csrf: str) -> web.StreamResponse:
        form = await request.post()
        decision = form.get("decision")
        if decision not in ("approve", "deny"):
            return _page("Nothing was done", principal, csrf, "<p>Choose Approve or Deny.</p>", status=400)
        result = await self.service.vote(
            principal.owner.id,
            request.match_info["id"],
            principal.voter,
            decision == "approve",
            str(form.get("reason", ""))[:2000],
            "console",
            principal.authenticated("console"),
        )
        self.holds.voted(result.approval)
        said = "counted" if result.counted else "not counted (you had voted already)"
        msg = f"Your vote ({decision}) is {said}; the hold is {result.approval.state}."
        raise web.HTTPSeeOther(f"/console/approvals/{result.approval.id}?" + urlencode({"msg": msg}))

    # -- the owner's pages ---------------------------------------------------------------------------------
    async def _agent_names(self, principal: Principal) -> dict[str, str]:
        return {a.id: a.name for a in await self.store.list_agents(principal.owner.id)}

    async def agents(self, request: web.Request, principal: Principal, csrf: str) -> web.StreamResponse:
        now = self.clock()
        policy_set = self.policies.current
        cards = []
        for agent in await self.store.list_agents(principal.owner.id):
            rows = await self.store.spend_of(principal.owner.id, agent.id)
            limits = spend_against_limits(policy_set, agent, rows, now)
            spend = _table(
                ["Limit", "Window", "Period", "Used", "Maximum", "Remaining", "Payments"],
                [
                    [
                        s["limit"],
                        s["window"],
                        s["period"],
                        format_minor(s["amount"], s["currency"]),
                        "-" if s["max_amount"] is None else format_minor(s["max_amount"], s["currency"]),
                        "-" if s["remaining"] is None else format_minor(s["remaining"], s["currency"]),
                        f"{s['count']}" + ("" if s["max_count"] is None else f" of {s['max_count']}"),
                    ]
                    for s in limits
                ],
            )
            history, _ = await self.store.page_authorizations(
                principal.owner.id, Page(agent_id=agent.id, created_gte=now - 14 * 86400, limit=1000)
            )
            state = "revoked" if agent.revoked_at else "active"
            labels = ", ".join(f"{k}={v}" for k, v in sorted(agent.labels.items())) or "-"
            cards.append(
                f"<div class='card agent' data-agent='{html.escape(agent.name)}'>"
                f"<h2>{html.escape(agent.name)} <span class='muted'>{html.escape(agent.id)}</span></h2>"
                f"<p>State: <b>{state}</b> · Labels: {html.escape(labels)} · "
                f"<a href='/console/decisions?agent={html.escape(agent.id)}'>decisions</a></p>"
                f"{spend}<p class='muted'>Spend per day, last 14 days</p>{_chart(history, now)}</div>"
            )
        return _page("Agents", principal, csrf, "".join(cards) or "<p class='muted'>No agents yet.</p>")

    async def decisions(self, request: web.Request, principal: Principal, csrf: str) -> web.StreamResponse:
        q = request.query
        page = Page(
            agent_id=q.get("agent") or None,
            decision=q.get("decision") or None,
            rule=q.get("rule") or None,
            created_gte=_day(q.get("since", "")),
            created_lt=_day(q.get("until", ""), end=True),
            starting_after=q.get("starting_after") or None,
            ending_before=q.get("ending_before") or None,
            limit=25,
        )
        rows, more = await self.store.page_authorizations(principal.owner.id, page)
        names = await self._agent_names(principal)
        table = _table(
            ["When", "Agent", "Decision", "State", "Rule", "Operation", "Amount", "Message"],
            [
                [
                    _when(a.created_at),
                    names.get(a.agent_id, a.agent_id),
                    a.decision,
                    a.state,
                    f"{a.policy}.{a.rule}",
                    a.operation,
                    _amount(a),
                    a.message,
                ]
                for a in rows
            ],
        )
        filters = _filters(
            "/console/decisions",
            q,
            [
                ("agent", "agent", {"": "any", **names}),
                ("decision", "decision", _options(("allow", "deny", "hold"))),
            ],
            ["rule"],
        )
        pager = _pager("/console/decisions", q, [a.id for a in rows], more, page)
        return _page("Decisions", principal, csrf, filters + table + pager)

    async def audit(self, request: web.Request, principal: Principal, csrf: str) -> web.StreamResponse:
        q = request.query
        page = Page(
            agent_id=q.get("agent") or None,
            kind=q.get("type") or None,
            created_gte=_day(q.get("since", "")),
            created_lt=_day(q.get("until", ""), end=True),
            starting_after=q.get("starting_after") or None,
            ending_before=q.get("ending_before") or None,
            limit=50,
        )
        rows, more = await self.store.page_events(principal.owner.id, page)
        names = await self._agent_names(principal)
        table = _table(
            ["#", "When", "Type", "Actor", "Agent", "Details"],
            [
                [
                    str(e.seq),
                    _when(e.at),
                    e.type,
                    e.actor,
                    names.get(e.agent_id or "", e.agent_id or ""),
                    _details(e.data),
                ]
                for e in rows
            ],
        )
        filters = _filters("/console/audit", q, [("agent", "agent", {"": "any", **names})], ["type"])
        pager = _pager("/console/audit", q, [str(e.seq) for e in rows], more, page)
        return _page("Audit log", principal, csrf, filters + table + pager)

    async def policy(self, request: web.Request, principal: Principal, csrf: str) -> web.StreamResponse:
        current = self.policies.current
        error = self.policies.last_error
        rules = _table(
            ["Policy", "Rule", "Effect"],
            [[p.name, r.name, str(getattr(r, "effect", ""))] for p, r in current.rules()],
        )
        body = (
            f"<div class='card'><p>Revision in force: <code id='revision'>{html.escape(current.revision)}</code> "
            f"({html.escape(current.engine)})</p>"
            f"<p>Last reload error: <span id='reload-error'>{html.escape(error or 'none')}</span></p></div>{rules}"
        )
        return _page("Policy", principal, csrf, body)

    async def connections(self, request: web.Request, principal: Principal, csrf: str) -> web.StreamResponse:
        rows = await self.store.list_connections(principal.owner.id)
        table = _table(
            ["Name", "Provider", "Upstream", "Connected accounts", "Settings", "Added"],
            [
                [
                    c.name,
                    c.provider,
                    c.upstream,
                    ", ".join(c.allowed_accounts) or "-",
                    ", ".join(f"{k}={v}" for k, v in sorted(c.settings.items())) or "-",
                    _when(c.created_at),
                ]
                for c in rows
            ],
        )
        return _page(
            "Connections", principal, csrf, table + "<p class='muted'>Credentials are never shown.</p>"
        )


# -- rendering -------------------------------------------------------------------------------------------------
def _page(
    title: str, principal: Principal | None, csrf: str, body: str, status: int = 200, refresh: int = 0
) -> web.Response:
    nav = ""
    if principal is not None:
        links = [("approvals", "Holds")]
        if principal.is_owner:
            links += [
                ("agents", "Agents"),
                ("decisions", "Decisions"),
                ("audit", "Audit log"),
                ("policy", "Policy"),
                ("connections", "Connections"),
            ]
        nav = "".join(f"<a href='/console/{path}'>{label}</a>" for path, label in links)
        who = f"{principal.kind} {principal.name}" + (
            "" if principal.is_owner else f" ({principal.owner.name})"
        )
        nav += (
            f"<span class='who' id='who'>{html.escape(who)}</span><form class='inline' method='post' "
            f"action='/console/logout'><input type='hidden' name='csrf' value='{html.escape(csrf)}'>"
            "<button>Sign out</button></form>"
        )
    text = (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)} · PaySentry</title>"
        f"<meta name='robots' content='noindex'><style>{STYLE}</style></head>"
        f"<body{f' data-refresh={refresh}' if refresh else ''}><header><b>PaySentry</b>{nav}</header>"
        f"<main><h1>{html.escape(title)}</h1>{body}</main><script src='/console/app.js'></script></body></html>"
    )
    return web.Response(
        text=text,
        content_type="text/html",
        status=status,
        headers={
            "Cache-Control": "no-store",
            "Referrer-Policy": "same-origin",  # no-referrer would make the browser send Origin: null
            "X-Frame-Options": "DENY",
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; "
            "img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        },
    )


def _table(headers: list[str], rows: Iterable[list[str]], raw: bool = False) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    cell = (lambda v: v) if raw else html.escape
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body or '<tr><td colspan=9 class=muted>none</td></tr>'}</tbody></table>"


def _flash(text: str, error: bool = False) -> str:
    return (
        f"<div class='flash{' error' if error else ''}' id='flash'>{html.escape(text)}</div>" if text else ""
    )


def _filters(
    action: str, q: Mapping[str, str], selects: list[tuple[str, str, Mapping[str, str]]], texts: list[str]
) -> str:
    parts = []
    for name, label, options in selects:
        chosen = q.get(name, "")
        opts = "".join(
            f"<option value='{html.escape(v)}'{' selected' if v == chosen else ''}>{html.escape(t)}</option>"
            for v, t in options.items()
        )
        parts.append(f"<label>{label} <select name='{name}'>{opts}</select></label>")
    for name in [*texts, "since", "until"]:
        kind = "date" if name in ("since", "until") else "text"
        parts.append(
            f"<label>{name} <input type='{kind}' name='{name}' value='{html.escape(q.get(name, ''))}'></label>"
        )
    return (
        f"<form class='card' method='get' action='{action}'>{' '.join(parts)} <button>Filter</button></form>"
    )


def _pager(action: str, q: Mapping[str, str], ids: list[str], more: bool, page: Page) -> str:
    keep = {k: v for k, v in q.items() if k not in ("starting_after", "ending_before")}
    links = []
    if ids and (page.starting_after or (page.ending_before and more)):
        links.append(
            f"<a id='newer' href='{action}?{urlencode({**keep, 'ending_before': ids[0]})}'>newer</a>"
        )
    if ids and (more and not page.ending_before or page.ending_before):
        links.append(
            f"<a id='older' href='{action}?{urlencode({**keep, 'starting_after': ids[-1]})}'>older</a>"
        )
    return f"<p>{' · '.join(links)}</p>"


def _options(values: Iterable[str]) -> dict[str, str]:
    return {"": "any", **{v: v for v in values}}


def _chart(history: list[AuthorizationRecord], now: float) -> str:
    """An inline SVG bar chart of spend per UTC day (the amounts of calls that count), by currency."""
    today = int(now // 86400)
    days: dict[int, int] = {}
    currency = ""
    for a in history:
        if a.state in COUNTING and a.amount > 0:
            day = int(a.created_at // 86400)
            days[day] = days.get(day, 0) + a.amount
            currency = currency or a.currency
    top = max(days.values(), default=0) or 1
    bars = []
    for i in range(14):
        amount = days.get(today - 13 + i, 0)
        height = round(56 * amount / top)
        label = format_minor(amount, currency) if currency else "0"
        bars.append(
            f"<rect class='bar' x='{i * 22}' y='{60 - height}' width='18' height='{max(height, 1)}'>"
            f"<title>{html.escape(label)}</title></rect>"
        )
    return f"<svg class='chart' width='308' height='62' role='img' aria-label='spend per day'>{''.join(bars)}</svg>"


def _amount(a: AuthorizationRecord) -> str:
    return format_minor(a.amount, a.currency) if a.currency else str(a.amount)


def _votes(a: ApprovalRecord) -> str:
    return ", ".join(f"{v.voter}: {v.vote}" for v in a.votes) or "none yet"


def _time_left(a: ApprovalRecord, now: float) -> str:
    if a.state != PENDING:
        return "-"
    return f"<span data-deadline='{a.expires_at:.0f}'>{max(0, int(a.expires_at - now))} s</span>"


def _when(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _day(text: str, end: bool = False) -> float | None:
    try:
        day = datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        return None
    return day.timestamp() + (86400 if end else 0)


def _details(data: Mapping[str, Any]) -> str:
    text = json.dumps(dict(data), separators=(", ", ": "), default=str)
    return text if len(text) < 300 else text[:297] + "..."


def _digest(token_hash: str) -> str:
    return hashlib.sha256(token_hash.encode()).hexdigest()[:32]


def _local(target: str) -> str:
    """Only a path inside the console is a place to go after sign-in (no open redirect)."""
    return target if target.startswith("/console/") and "//" not in target and "\\" not in target else ""
