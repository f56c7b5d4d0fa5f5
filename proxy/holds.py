"""What happens when a payment is held: notify, ask the automated reviewers, and let the agent wait.

On a new hold the coordinator, in the background:
  * creates one one-time link per human approver (any owner when the rule names none) and posts a signed
    notification (``PaySentry-Signature: t=...,v1=<HMAC-SHA256 of "t.body">``) to every webhook URL;
  * posts the held payment to each automated reviewer named by the rule, and counts its answer
    ``{"vote": "approve" | "deny", "reason": "..."}`` as that reviewer's vote (a reviewer that times out,
    errors or answers anything else casts no vote).
An agent's call may wait (``approval.wait``) for the quorum: it is woken at once by a vote cast through
this process (or, with Redis, through any replica) and checks the store a few times a second for votes
cast elsewhere (the CLI).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp

from proxy.approvals import PENDING, new_link_token, sign
from proxy.errors import PaySentryError
from proxy.model import Agent, ApprovalSpec, Reviewer
from proxy.store import ApprovalRecord, AuthorizationRecord, Store, VoteRefused

if TYPE_CHECKING:
    from proxy.store.redis_spend import ApprovalBus

log = logging.getLogger("paysentry.holds")
POLL_INTERVAL = 0.25


class HoldCoordinator:
    def __init__(
        self,
        store: Store,
        webhooks: list[str],
        secret: bytes,
        public_url: str,
        clock: Callable[[], float] = time.time,
        bus: ApprovalBus | None = None,
    ) -> None:
        self.store, self.webhooks, self.secret, self.bus = store, webhooks, secret, bus
        self.public_url = public_url.rstrip("/")
        self.clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._events: dict[str, asyncio.Event] = {}

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        if self.bus is not None:
            self.bus.start(self.wake)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._session is not None:
            await self._session.close()
        if self.bus is not None:
            await self.bus.close()

    def on_hold(self, auth: AuthorizationRecord, spec: ApprovalSpec, agent: Agent, expires_at: float) -> None:
        self._spawn(self._announce(auth, spec, agent, expires_at))
        for reviewer in spec.reviewers:
            self._spawn(self._ask(reviewer, auth, spec, agent, expires_at))

    def voted(self, approval: ApprovalRecord) -> None:
        """A vote was cast through this process: wake the agent waiting on it, here or (with Redis) on any
        replica."""
        if approval.state != PENDING:
            self.wake(approval.id)
            if self.bus is not None:
                self._spawn(self.bus.publish(approval.id))

    def wake(self, approval_id: str) -> None:
        if approval_id in self._events:
            self._events[approval_id].set()

    async def wait(self, owner_id: str, approval_id: str, seconds: float) -> str:
        """Wait up to ``seconds`` for the hold to be decided; returns its state."""
        event = self._events.setdefault(approval_id, asyncio.Event())
        deadline = time.monotonic() + seconds
        try:
            while True:
                approval = await self.store.get_approval(owner_id, approval_id)
                if approval is None or approval.state != PENDING:
                    return approval.state if approval else "missing"
                left = deadline - time.monotonic()
                if left <= 0:
                    return PENDING
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), timeout=min(POLL_INTERVAL, left))
        finally:
            self._events.pop(approval_id, None)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def payload(
        self, auth: AuthorizationRecord, spec: ApprovalSpec, agent: Agent, expires_at: float
    ) -> dict[str, Any]:
        return {
            "approval_id": auth.approval_id,
            "authorization_id": auth.id,
            "expires_at": expires_at,
            "agent": {"id": agent.id, "name": agent.name, "labels": dict(agent.labels)},
            "payment": dict(auth.payment),
            "rule": auth.rule,
            "policy": auth.policy,
            "message": auth.message,
            "approvers": list(spec.approvers),
            "quorum": spec.quorum,
            "veto": spec.veto,
        }

    async def _announce(
        self, auth: AuthorizationRecord, spec: ApprovalSpec, agent: Agent, expires_at: float
    ) -> None:
        assert auth.approval_id
        people = [a for a in spec.approvers if not a.startswith("reviewer:")] or (
            [] if spec.approvers else ["owner"]
        )
        links, rows = {}, []
        for person in people:
            token, digest = new_link_token()
            rows.append((digest, person, expires_at))
            page = f"{self.public_url}/approvals/link/{token}"
            links[person] = {
                "page": page,
                "approve": f"{page}?decision=approve",
                "deny": f"{page}?decision=deny",
            }
        try:
            await self.store.add_links(auth.approval_id, rows)
        except PaySentryError:
            log.exception(
                "could not store approval links", extra={"fields": {"approval_id": auth.approval_id}}
            )
            return
        body = json.dumps(
            {"type": "approval.requested", **self.payload(auth, spec, agent, expires_at), "links": links}
        ).encode()
        for url in self.webhooks:
            await self._post(url, body, "notification")

    async def _ask(
        self,
        reviewer: Reviewer,
        auth: AuthorizationRecord,
        spec: ApprovalSpec,
        agent: Agent,
        expires_at: float,
    ) -> None:
        assert auth.approval_id
        body = json.dumps(
            {
                "type": "approval.review",
                "reviewer": reviewer.name,
                **self.payload(auth, spec, agent, expires_at),
            }
        ).encode()
        answer = await self._post(reviewer.url, body, f"reviewer {reviewer.name}", reviewer.timeout)
        vote = answer.get("vote") if isinstance(answer, dict) else None
        if vote not in ("approve", "deny"):
            log.warning(
                "reviewer cast no vote",
                extra={"fields": {"reviewer": reviewer.name, "approval_id": auth.approval_id}},
            )
            return
        reason = str(answer.get("reason", ""))[:2000]
        try:
            result = await self.store.vote(
                auth.owner_id,
                auth.approval_id,
                f"reviewer:{reviewer.name}",
                vote == "approve",
                reason,
                "reviewer",
                self.clock(),
            )
        except (PaySentryError, VoteRefused) as exc:  # the store down, or the hold decided meanwhile
            log.warning(
                "reviewer vote not counted: %s",
                exc.message if isinstance(exc, PaySentryError) else type(exc).__name__,
                extra={"fields": {"reviewer": reviewer.name, "approval_id": auth.approval_id}},
            )
            return
        self.voted(result.approval)

    async def _post(self, url: str, body: bytes, what: str, timeout: float = 10.0) -> Any:
        assert self._session is not None
        headers = {"Content-Type": "application/json", "PaySentry-Signature": sign(self.secret, body)}
        try:
            async with self._session.post(
                url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                if resp.status >= 300:
                    raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status)
                return await resp.json(content_type=None) if resp.content_length != 0 else None
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            # Only the host: webhook URLs often carry a secret in their path.
            log.warning(
                "%s failed: %s", what, type(exc).__name__, extra={"fields": {"host": urlsplit(url).hostname}}
            )
            return None
