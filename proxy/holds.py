"""What happens when a payment is held: notify, ask the automated reviewers, and let the agent wait.

Notifications go through a durable outbox: the store writes one row per webhook URL in the transaction
that creates the hold, and the coordinator's sender delivers them after commit, retrying with exponential
backoff (1 s, 2 s, 4 s ... up to ``retry_max``, with jitter) until a receiver answers any 2xx, and giving up
``give_up`` seconds after the hold (metric ``paysentry_notifications_total{outcome="failed"}`` and an audit
event ``notification.failed``). A row is claimed for a lease before each attempt, so of several replicas
one sends it, and a replica that dies mid-attempt is replaced when the lease ends. Each delivery carries
Standard Webhooks headers (``webhook-id`` = the row, the same on every retry; ``webhook-timestamp``;
``webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">``) and, as before,
``PaySentry-Signature: t=...,v1=<hex HMAC-SHA256 of "t.body">``. The body is rendered from the hold's
facts, which never change, so every attempt sends the same bytes.

For each new hold the coordinator also, in the background, posts the held payment to each automated
reviewer named by the rule, and counts its answer ``{"vote": "approve" | "deny", "reason": "..."}`` as that
reviewer's vote (a reviewer that times out, errors or answers anything else casts no vote): the only way a
``reviewer:<name>`` vote is ever cast.

An agent's call may wait (``approval.wait``) for the quorum: it is woken at once by a vote cast through
this process (or, with Redis, through any replica) and checks the store a few times a second for votes
cast elsewhere (the CLI).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp

from proxy.approvals import PENDING, sign
from proxy.errors import PaySentryError
from proxy.metrics import Metrics
from proxy.model import Agent, ApprovalSpec, Reviewer
from proxy.store import ApprovalRecord, AuthorizationRecord, Notification, Store, VoteRefused

if TYPE_CHECKING:
    from proxy.store.redis_spend import ApprovalBus

log = logging.getLogger("paysentry.holds")
POLL_INTERVAL = 0.25
SEND_LEASE = 30.0  # a claimed notification is not due again for this long (the attempt's own time bound)
BATCH = 20


def webhook_key(secret: bytes) -> bytes:
    """The Standard Webhooks signing key: a ``whsec_<base64>`` secret's decoded bytes, else the secret's
    own bytes."""
    if secret.startswith(b"whsec_"):
        with contextlib.suppress(ValueError):
            return base64.b64decode(secret.removeprefix(b"whsec_") + b"==")
    return secret


def standard_signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def backoff(attempts: int, retry_max: float) -> float:
    """Seconds before attempt ``attempts + 1``: doubling from 1 s, capped, with +-20 % jitter."""
    return min(retry_max, 2.0 ** min(attempts - 1, 30)) * random.uniform(0.8, 1.2)


class HoldCoordinator:
    def __init__(
        self,
        store: Store,
        webhooks: list[str],
        secret: bytes,
        public_url: str,
        clock: Callable[[], float] = time.time,
        bus: ApprovalBus | None = None,
        metrics: Metrics | None = None,
        give_up: float = 86400.0,
        retry_max: float = 600.0,
    ) -> None:
        self.store, self.webhooks, self.secret, self.bus = store, webhooks, secret, bus
        self.public_url = public_url.rstrip("/")
        self.clock = clock
        self.metrics = metrics or Metrics(otlp=False)
        self.give_up, self.retry_max = give_up, retry_max
        self.key = webhook_key(secret)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._events: dict[str, asyncio.Event] = {}
        self._outbox = asyncio.Event()

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        if self.bus is not None:
            self.bus.start(self.wake)
        if self.webhooks:
            self._spawn(self._send_forever())

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
        """The hold is committed (its notifications with it, in the outbox): send them now, ask reviewers."""
        self._outbox.set()
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

    def console_url(self, approval_id: str) -> str:
        return f"{self.public_url}/console/approvals/{approval_id}"

    async def _send_forever(self) -> None:
        """The outbox sender: every due notification, then wait for a new hold or the next second."""
        while True:
            try:
                due = await self.store.claim_notifications(self.clock(), SEND_LEASE, BATCH)
                await asyncio.gather(*(self._deliver(n) for n in due))
            except Exception:  # a passing store failure: the rows wait in the outbox
                log.exception("notification outbox failed")
                due = []
            if len(due) < BATCH:
                self._outbox.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._outbox.wait(), timeout=1.0)

    async def render(self, n: Notification) -> bytes | None:
        """The notification's body from the hold's facts (the same bytes on every attempt)."""
        approval = await self.store.get_approval(n.owner_id, n.approval_id)
        auth = approval.authorization if approval else None
        if approval is None or auth is None:
            return None
        agent = await self.store.get_agent(auth.agent_id)
        people = [a for a in approval.approvers if not a.startswith("reviewer:")] or (
            [] if approval.approvers else ["owner"]
        )
        page = self.console_url(approval.id)
        doc = {
            "id": n.id,
            "type": "approval.requested",
            "approval_id": approval.id,
            "authorization_id": auth.id,
            "expires_at": approval.expires_at,
            "agent": {
                "id": auth.agent_id,
                "name": agent.name if agent else "",
                "labels": dict(agent.labels) if agent else {},
            },
            "payment": dict(auth.payment),
            "rule": auth.rule,
            "policy": auth.policy,
            "message": auth.message,
            "approvers": list(approval.approvers),
            "quorum": approval.quorum,
            "veto": approval.veto,
            "console": page,
            "links": {p: {"page": page} for p in people},  # each signs in there and votes as themself
        }
        return json.dumps(doc).encode()

    async def _deliver(self, n: Notification) -> None:
        body = await self.render(n)
        if body is None:
            await self.store.notification_sent(n.id, False, "the hold is gone", None, self.clock())
            return
        error = await self._attempt(n, body)
        now = self.clock()
        if error is None:
            await self.store.notification_sent(n.id, True, "", None, now)
            self.metrics.inc("paysentry_notifications_total", outcome="delivered")
            return
        attempts = n.attempts + 1
        retry_at = now + backoff(attempts, self.retry_max)
        fields = {"notification": n.id, "approval_id": n.approval_id, "host": urlsplit(n.url).hostname}
        if retry_at - n.created_at > self.give_up:
            await self.store.notification_sent(n.id, False, error, None, now)
            self.metrics.inc("paysentry_notifications_total", outcome="failed")
            log.warning(
                "notification given up after %d attempts: %s", attempts, error, extra={"fields": fields}
            )
            return
        await self.store.notification_sent(n.id, False, error, retry_at, now)
        self.metrics.inc("paysentry_notifications_total", outcome="retried")
        log.info("notification will be retried: %s", error, extra={"fields": fields})

    async def _attempt(self, n: Notification, body: bytes) -> str | None:
        """One POST; None when the receiver answered 2xx (whatever its body), else what went wrong."""
        assert self._session is not None
        timestamp = int(self.clock())
        headers = {
            "Content-Type": "application/json",
            "webhook-id": n.id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": standard_signature(self.key, n.id, timestamp, body),
            "PaySentry-Signature": sign(self.secret, body, timestamp),
        }
        try:
            async with self._session.post(n.url, data=body, headers=headers) as resp:
                await resp.read()
                return None if 200 <= resp.status < 300 else f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return type(exc).__name__

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
