"""Hand-written fakes of the ports the payment service uses (no mocks): the payment path of the store
kept in dictionaries, holds that record what they were told, a limiter that always allows."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from multidict import CIMultiDict

from adapters.formencode import parse_form
from proxy.connections import Connection
from proxy.errors import UpstreamUnavailable
from proxy.model import UNRECOGNIZED, Agent, ApprovalSpec, Charge, SpendTotal
from proxy.store import (
    APPROVED,
    DENIED,
    FAILED,
    FORWARDING,
    HELD,
    IN_DOUBT,
    SETTLED,
    VOIDED,
    AgentRecord,
    AuthorizationRecord,
    DuplicateKey,
    LimitExceeded,
    NewAuthorization,
    Recorded,
    Unresolved,
)
from proxy.upstream import UpstreamReply, UpstreamRequest


class FakeAuthorizations:
    """The payment path of the store: check-and-count, settle, fail (release), void, in memory."""

    def __init__(self) -> None:
        self.rows: dict[str, AuthorizationRecord] = {}
        self.spend: dict[tuple[str, str, str], SpendTotal] = {}  # (agent, limit, period)
        self.events: list[tuple[str, str]] = []  # (authorization id, event type)
        self.requests: dict[str, bytes | None] = {}  # the forwarded call kept with each record
        self.attempts: dict[str, int] = {}
        self.agents: dict[str, AgentRecord] = {}

    def _by_key(self, agent_id: str, key: str) -> AuthorizationRecord | None:
        return next(
            (r for r in self.rows.values() if r.agent_id == agent_id and r.idempotency_key == key), None
        )

    async def lookup(
        self, agent_id: str, idempotency_key: str, spend_keys: Any
    ) -> tuple[AuthorizationRecord | None, dict[str, SpendTotal]]:
        totals = {
            limit: self.spend.get((agent_id, limit, period), SpendTotal()) for limit, period in spend_keys
        }
        return self._by_key(agent_id, idempotency_key), totals

    def _count(self, agent_id: str, charges: Any, sign: int) -> None:
        for c in charges:
            key = (agent_id, c.limit, c.period)
            total = self.spend.get(key, SpendTotal())
            self.spend[key] = SpendTotal(total.amount + sign * c.amount, total.count + sign)

    def _exceeded(self, agent_id: str, charges: tuple[Charge, ...]) -> LimitExceeded | None:
        for c in charges:
            total = self.spend.get((agent_id, c.limit, c.period), SpendTotal())
            if (c.max_amount is not None and total.amount + c.amount > c.max_amount) or (
                c.max_count is not None and total.count + 1 > c.max_count
            ):
                return LimitExceeded(c, total)
        return None

    async def record_decision(
        self, new: NewAuthorization, now: float, retry_of: str | None = None
    ) -> Recorded:
        existing = self._by_key(new.agent_id, new.idempotency_key)
        if existing is not None and (retry_of != existing.id or existing.state != FAILED):
            raise DuplicateKey(new.idempotency_key)
        decision, rule, message = new.decision, new.rule, new.message
        exceeded = self._exceeded(new.agent_id, tuple(new.charges)) if decision != "deny" else None
        if exceeded is not None:
            decision, rule, message = "deny", exceeded.charge.limit, "limit exceeded"
        state = {"allow": FORWARDING, "hold": HELD, "deny": DENIED}[decision]
        charges = [] if state == DENIED else list(new.charges)
        self._count(new.agent_id, charges, +1)
        record = AuthorizationRecord(
            retry_of or new.id,
            new.owner_id,
            new.agent_id,
            new.idempotency_key,
            new.request_hash,
            new.provider,
            new.operation,
            new.amount,
            new.currency,
            new.destination,
            dict(new.payment),
            decision,
            rule,
            new.policy,
            message,
            new.revision,
            state,
            charges,
            new.approval_id if state == HELD else None,
            None,
            None,
            None,
            new.lease_expires_at,
            now,
            now,
        )
        self.rows[record.id] = record
        self.requests[record.id] = new.request
        self.events.append((record.id, f"authorization.{state}"))
        return Recorded(record, exceeded)

    def _move(self, auth_id: str, frm: str, **changes: Any) -> AuthorizationRecord | None:
        row = self.rows.get(auth_id)
        if row is None or row.state != frm:
            return None
        self.rows[auth_id] = replace(row, **changes)
        self.events.append((auth_id, f"authorization.{changes['state']}"))
        return row

    async def start_forwarding(self, authorization_id: str, lease_expires_at: float, now: float) -> bool:
        return self._move(authorization_id, APPROVED, state=FORWARDING) is not None

    async def settle(
        self,
        authorization_id: str,
        provider_ref: str | None,
        status: int,
        body: bytes | None,
        now: float,
        holds: int | None = None,
    ) -> None:
        settled = self._move(
            authorization_id,
            FORWARDING,
            state=SETTLED,
            provider_ref=provider_ref,
            response_status=status,
            response_body=body,
        )
        if settled is None or holds is None:
            return
        made = sorted(
            (r for r in self.rows.values() if r.provider_ref == provider_ref and r.state == SETTLED),
            key=lambda r: r.created_at,
            reverse=True,
        )
        excess: dict[tuple[str, str], int] = {}
        for row in made:
            for c in row.charges:
                excess[(c.limit, c.period)] = excess.get((c.limit, c.period), -holds) + c.amount
        for row in made:
            kept = []
            for c in row.charges:
                cut = min(c.amount, max(excess[(c.limit, c.period)], 0))
                excess[(c.limit, c.period)] -= cut
                kept.append(replace(c, amount=c.amount - cut))
                key = (row.agent_id, c.limit, c.period)
                total = self.spend.get(key, SpendTotal())
                self.spend[key] = SpendTotal(total.amount - cut, total.count)
            self.rows[row.id] = replace(row, charges=kept)

    async def fail(
        self,
        authorization_id: str,
        reason: str,
        status: int | None,
        body: bytes | None,
        now: float,
        provider_ref: str | None = None,
    ) -> None:
        row = self._move(
            authorization_id,
            FORWARDING,
            state=FAILED,
            response_status=status,
            response_body=body,
            provider_ref=provider_ref,
        )
        if row is not None:
            self._count(row.agent_id, row.charges, -1)

    async def void(self, owner_id: str, provider_ref: str, actor: str, data: Any, now: float) -> str:
        rows = [r for r in self.rows.values() if r.owner_id == owner_id and r.provider_ref == provider_ref]
        if any(r.state == SETTLED and r.operation.endswith(".capture") for r in rows):
            return "recorded"  # captured: its money moved
        for row in rows:
            if self._move(row.id, SETTLED, state=VOIDED) is not None:
                self._count(row.agent_id, row.charges, -1)
        return "voided" if rows else "unmatched"

    async def maker_of(self, owner_id: str, provider_ref: str) -> str | None:
        rows = [r for r in self._on(owner_id, provider_ref) if r.operation != UNRECOGNIZED]
        return min(rows, key=lambda r: r.created_at).agent_id if rows else None

    async def find_by_provider_ref(self, owner_id: str, provider_ref: str) -> AuthorizationRecord | None:
        rows = [
            r for r in self._on(owner_id, provider_ref) if r.state == SETTLED and r.operation != UNRECOGNIZED
        ]
        return (
            min(rows, key=lambda r: (-r.amount, r.created_at)) if rows else None
        )  # the largest, as the stores

    async def unresolved_on(self, owner_id: str, provider_ref: str) -> AuthorizationRecord | None:
        rows = [
            r
            for r in self.rows.values()
            if r.owner_id == owner_id
            and r.state in (FORWARDING, IN_DOUBT)
            and provider_ref in (r.provider_ref, r.payment.get("refers_to"))
        ]
        return rows[0] if rows else None

    def _on(self, owner_id: str, provider_ref: str) -> list[AuthorizationRecord]:
        return [r for r in self.rows.values() if r.owner_id == owner_id and r.provider_ref == provider_ref]

    async def get_authorization(self, owner_id: str, authorization_id: str) -> AuthorizationRecord | None:
        row = self.rows.get(authorization_id)
        return row if row is not None and row.owner_id == owner_id else None

    async def set_in_doubt(self, authorization_id: str, reason: str, retry_at: float, now: float) -> bool:
        return self._move(authorization_id, FORWARDING, state=IN_DOUBT, lease_expires_at=retry_at) is not None

    def _claimable(self, row: AuthorizationRecord, now: float, at_once: bool) -> bool:
        due = row.lease_expires_at is not None and row.lease_expires_at <= now
        return (row.state == IN_DOUBT and (at_once or due)) or (row.state == FORWARDING and due)

    async def claim(self, authorization_id: str, lease_expires_at: float, now: float) -> int | None:
        row = self.rows.get(authorization_id)
        if row is None or not self._claimable(row, now, at_once=True):
            return None
        self._move(row.id, row.state, state=FORWARDING, lease_expires_at=lease_expires_at)
        self.attempts[row.id] = self.attempts.get(row.id, 0) + 1
        return self.attempts[row.id]

    async def claim_unresolved(self, lease_expires_at: float, now: float, limit: int) -> list[Unresolved]:
        due = [r for r in self.rows.values() if self._claimable(r, now, at_once=False)][:limit]
        claimed = []
        for row in due:
            attempts = self.attempts.get(row.id, 0)
            await self.claim(row.id, lease_expires_at, now)
            claimed.append(Unresolved(self.rows[row.id], self.requests.get(row.id), attempts))
        return claimed

    async def get_agent(self, agent_id: str) -> AgentRecord | None:
        return self.agents.get(agent_id)

    def spent(self, agent_id: str, limit: str) -> int:
        return sum(t.amount for (a, name, _), t in self.spend.items() if a == agent_id and name == limit)


class FakeHolds:
    """Holds that remember what was announced; a wait answers ``state`` at once."""

    def __init__(self, state: str = "pending") -> None:
        self.announced: list[str] = []
        self.state = state
        self.webhooks: list[str] = []

    def on_hold(self, auth: AuthorizationRecord, spec: ApprovalSpec, agent: Agent, expires_at: float) -> None:
        self.announced.append(auth.id)

    async def wait(self, owner_id: str, approval_id: str, seconds: float) -> str:
        return self.state


class AllowAll:
    async def allow(self, key: str) -> bool:
        return True


class FakeAgents:
    """Every token is the one agent's."""

    def __init__(self, agent: AgentRecord) -> None:
        self.agent = agent

    async def authenticate(self, token: str | None, client: str | None = None) -> AgentRecord:
        return self.agent


class FakeConnections:
    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    async def get(self, connection_id: str) -> Connection:
        return self.connection


class FakeProvider:
    """A Stripe-like provider for the fake upstream: creates payment intents, replays its stored answer
    for a key it has seen, and misbehaves on demand. ``faults`` is consumed one per call: ``ok``,
    ``refuse`` (402, moves nothing), ``unreachable`` (never connected: nothing sent), ``timeout`` (the
    intent is made, then the answer is lost), ``error`` (a 500 before anything is made, not stored),
    ``kill`` (the intent is made, then the sidecar dies before it hears the answer)."""

    def __init__(self, faults: list[str] | None = None) -> None:
        self.faults = faults or []
        self.answers: dict[str, UpstreamReply] = {}
        self.moved: list[int] = []  # the amount of every intent made
        self.made: dict[str, int] = {}  # idempotency key -> the amount it moved
        self.calls = 0

    async def __call__(self, request: UpstreamRequest) -> UpstreamReply:
        self.calls += 1
        fault = self.faults.pop(0) if self.faults else "ok"
        if fault == "unreachable":
            raise UpstreamUnavailable("connection refused", maybe_sent=False)
        key = request.headers.get("Idempotency-Key", "")
        if key in self.answers:
            return self.answers[key]
        if fault == "error":
            return UpstreamReply(500, CIMultiDict(), b'{"error": {"type": "api_error"}}')
        if fault == "refuse":
            reply = UpstreamReply(402, CIMultiDict(), b'{"error": {"type": "card_error"}}')
        else:
            amount = int(parse_form(request.body)["amount"])
            self.moved.append(amount)
            self.made[key] = amount
            body = json.dumps({"id": f"pi_{len(self.moved)}", "amount": amount}).encode()
            reply = UpstreamReply(200, CIMultiDict({"Content-Type": "application/json"}), body)
        self.answers[key] = reply
        if fault == "timeout":
            raise UpstreamUnavailable("the provider did not answer in time")
        if fault == "kill":  # the sidecar dies the instant the provider has answered: nothing after runs
            raise Killed()
        return reply


class Killed(BaseException):
    """A process killed mid-call (kill -9): no handler of the payment service runs."""


class FakeStripe:
    """Stripe's payment intents for the fake upstream, lifecycle included: created (confirmed or not; a
    manual-capture intent is authorized when confirmed, its authorization raised, then captured wholly or
    in part), confirmed, incremented, captured, cancelled and read back, each answer stored under its idempotency key and replayed for it.
    ``faults`` is consumed one per call: ``ok``; ``refuse`` (the card is declined: a create or confirm
    answers 402 with the intent, which stays, as Stripe's does); ``unreachable`` (nothing sent);
    ``timeout`` (done, the answer lost); ``error`` (a 500 before anything is done, not stored); ``kill``
    (done, then the sidecar dies before it hears the answer)."""

    def __init__(self, faults: list[str] | None = None) -> None:
        self.faults = faults or []
        self.intents: dict[str, dict[str, Any]] = {}
        self.made_by: dict[str, str] = {}  # intent id -> the idempotency key that created it
        self.answers: dict[str, UpstreamReply] = {}

    def exposure(self, intent_id: str) -> int:
        """What the intent moves or holds: captured, or authorized and capturable."""
        intent = self.intents[intent_id]
        return {"succeeded": intent["amount_received"], "requires_capture": intent["amount_capturable"]}.get(
            intent["status"], 0
        )

    async def __call__(self, request: UpstreamRequest) -> UpstreamReply:
        fault = self.faults.pop(0) if self.faults else "ok"
        if fault == "unreachable":
            raise UpstreamUnavailable("connection refused", maybe_sent=False)
        key = request.headers.get("Idempotency-Key", "")
        if request.method == "POST" and key in self.answers:
            return self.answers[key]
        if fault == "error":
            return _reply(500, {"error": {"type": "api_error"}})
        reply = self._handle(request, key, declined=fault == "refuse")
        if request.method == "POST":
            self.answers[key] = reply
        if fault == "timeout":
            raise UpstreamUnavailable("the provider did not answer in time")
        if fault == "kill":
            raise Killed()
        return reply

    def _handle(self, request: UpstreamRequest, key: str, declined: bool) -> UpstreamReply:
        path = request.url.split("/v1/", 1)[1].split("?", 1)[0].split("/")
        params = parse_form(request.body) if request.method == "POST" else {}
        if path[0] != "payment_intents":
            return _reply(404, {"error": {"type": "invalid_request_error", "message": "unknown path"}})
        if len(path) == 1:
            intent_id = f"pi_{len(self.intents) + 1}"
            intent = {
                "id": intent_id,
                "object": "payment_intent",
                "amount": int(params["amount"]),
                "currency": params.get("currency", "usd"),
                "capture_method": params.get("capture_method", "automatic"),
                "metadata": params.get("metadata", {}),
                "status": "requires_confirmation",
                "amount_received": 0,
                "amount_capturable": 0,
            }
            self.intents[intent_id], self.made_by[intent_id] = intent, key
            if params.get("confirm") == "true":
                return self._confirm(intent, declined)
            return _reply(200, intent)
        intent = self.intents.get(path[1])
        if intent is None:
            return _reply(404, {"error": {"type": "invalid_request_error", "code": "resource_missing"}})
        action = path[2] if len(path) > 2 else ""
        status = intent["status"]
        if action == "" and request.method == "GET":
            return _reply(200, intent)
        if action == "confirm" and status in ("requires_confirmation", "requires_payment_method"):
            return self._confirm(intent, declined)
        if action == "capture" and status == "requires_capture":
            asked = int(params.get("amount_to_capture", intent["amount_capturable"]))
            if asked <= intent["amount_capturable"]:
                intent.update(status="succeeded", amount_received=asked, amount_capturable=0)
                return _reply(200, intent)
        if action == "cancel" and status not in ("succeeded", "canceled"):
            intent.update(status="canceled", amount_capturable=0)
            return _reply(200, intent)
        if action == "increment_authorization" and status == "requires_capture":
            raised = int(params.get("amount", 0))
            if raised > intent["amount"]:
                intent.update(amount=raised, amount_capturable=raised)
                return _reply(200, intent)
        message = f"This PaymentIntent's status is {status}: it cannot be {action or 'changed'}."
        return _reply(400, {"error": {"type": "invalid_request_error", "message": message}})

    def _confirm(self, intent: dict[str, Any], declined: bool) -> UpstreamReply:
        if declined:
            intent["status"] = "requires_payment_method"
            error = {"type": "card_error", "code": "card_declined", "payment_intent": dict(intent)}
            return _reply(402, {"error": error})
        if intent["capture_method"] == "manual":
            intent.update(status="requires_capture", amount_capturable=intent["amount"])
        else:
            intent.update(status="succeeded", amount_received=intent["amount"])
        return _reply(200, intent)


def _reply(status: int, body: dict[str, Any]) -> UpstreamReply:
    return UpstreamReply(status, CIMultiDict({"Content-Type": "application/json"}), json.dumps(body).encode())
