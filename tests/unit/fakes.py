"""Hand-written fakes of the ports the payment service uses (no mocks): the payment path of the store
kept in dictionaries, holds that record what they were told, a limiter that always allows."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from proxy.connections import Connection
from proxy.model import Agent, ApprovalSpec, Charge, SpendTotal
from proxy.store import (
    APPROVED,
    DENIED,
    FAILED,
    FORWARDING,
    HELD,
    SETTLED,
    VOIDED,
    AgentRecord,
    AuthorizationRecord,
    DuplicateKey,
    LimitExceeded,
    NewAuthorization,
    Recorded,
)


class FakeAuthorizations:
    """The payment path of the store: check-and-count, settle, fail (release), void, in memory."""

    def __init__(self) -> None:
        self.rows: dict[str, AuthorizationRecord] = {}
        self.spend: dict[tuple[str, str, str], SpendTotal] = {}  # (agent, limit, period)
        self.events: list[tuple[str, str]] = []  # (authorization id, event type)

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
        self, authorization_id: str, provider_ref: str | None, status: int, body: bytes | None, now: float
    ) -> None:
        self._move(
            authorization_id,
            FORWARDING,
            state=SETTLED,
            provider_ref=provider_ref,
            response_status=status,
            response_body=body,
        )

    async def fail(
        self, authorization_id: str, reason: str, status: int | None, body: bytes | None, now: float
    ) -> None:
        row = self._move(
            authorization_id, FORWARDING, state=FAILED, response_status=status, response_body=body
        )
        if row is not None:
            self._count(row.agent_id, row.charges, -1)

    async def void(self, owner_id: str, provider_ref: str, actor: str, data: Any, now: float) -> str:
        rows = [r for r in self.rows.values() if r.owner_id == owner_id and r.provider_ref == provider_ref]
        for row in rows:
            if self._move(row.id, SETTLED, state=VOIDED) is not None:
                self._count(row.agent_id, row.charges, -1)
        return "voided" if rows else "unmatched"

    async def find_by_provider_ref(self, owner_id: str, provider_ref: str) -> AuthorizationRecord | None:
        rows = [
            r
            for r in self.rows.values()
            if r.owner_id == owner_id and r.provider_ref == provider_ref and r.state == SETTLED
        ]
        return min(rows, key=lambda r: r.created_at) if rows else None

    async def get_authorization(self, owner_id: str, authorization_id: str) -> AuthorizationRecord | None:
        row = self.rows.get(authorization_id)
        return row if row is not None and row.owner_id == owner_id else None

    def spent(self, agent_id: str, limit: str) -> int:
        return sum(t.amount for (a, name, _), t in self.spend.items() if a == agent_id and name == limit)


class FakeHolds:
    """Holds that remember what was announced; a wait answers ``state`` at once."""

    def __init__(self, state: str = "pending") -> None:
        self.announced: list[str] = []
        self.state = state

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
