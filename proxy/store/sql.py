"""The store's logic, written once over the SQL that SQLite and PostgreSQL both speak.

Every operation is a *transaction body*: a generator that yields queries (``one``, ``many``, ``execute``)
and receives their results, so the same body runs on SQLite's thread (driven synchronously inside
``BEGIN IMMEDIATE``) and on an asyncpg connection (driven by awaiting each query inside a transaction).
A driver only has to implement ``write(body)`` (one transaction) and ``read(body)``. The SQL uses ``?``
placeholders (the PostgreSQL driver numbers them), ``ON CONFLICT DO NOTHING`` instead of catching
integrity errors, and ``RETURNING`` for the atomic check-and-reserve.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar
from urllib.parse import urlsplit

from proxy.approvals import APPROVED as APPROVED_HOLD
from proxy.approvals import DENIED as DENIED_HOLD
from proxy.approvals import EXPIRED as EXPIRED_HOLD
from proxy.approvals import PENDING, may_vote, tally
from proxy.model import UNRECOGNIZED, ApprovalSpec, Charge, Reviewer, SpendTotal
from proxy.secrets import new_id
from proxy.store import (
    APPROVED,
    COUNT_FIX,
    DENIED,
    EXPIRED,
    FAILED,
    FORWARDING,
    HELD,
    IN_DOUBT,
    REJECTED,
    RELEASE_FIX,
    SETTLE_FIX,
    SETTLED,
    VOID_FIX,
    VOIDED,
    AgentNameTaken,
    AgentRecord,
    ApprovalClosed,
    ApprovalExpired,
    ApprovalNotFound,
    ApprovalRecord,
    ApproverNameTaken,
    ApproverRecord,
    AuthorizationRecord,
    ConnectionRecord,
    DuplicateKey,
    Event,
    LimitExceeded,
    LinkUnusable,
    NewAuthorization,
    NotAnApprover,
    Notification,
    OwnerRecord,
    Page,
    Recorded,
    UnknownCursor,
    Unresolved,
    Vote,
    VoteResult,
    X402Signature,
)
from proxy.windows import is_rolling, rolling_range, stale_buckets

T = TypeVar("T")
PRUNE_BATCH = 1000  # spend rows deleted per transaction by prune_spend
# An unresolved call due for resolution: in doubt and past its retry time, or forwarding past its lease.
_DUE = "(state=? OR state=?) AND lease_expires_at<=?"
AUTH_COLUMNS = (
    "id, owner_id, agent_id, idempotency_key, request_hash, provider, operation, amount, currency, "
    "destination, payment, decision, rule, policy, message, revision, state, charges, approval_id, "
    "provider_ref, response_status, response_body, lease_expires_at, created_at, updated_at"
)
_X402_COLUMNS = (
    "nonce, authorization_id, owner_id, agent_id, network, asset, payer, pay_to, amount, valid_after, "
    "valid_before, signed_at"
)
ONE, MANY, EXECUTE, RELEASED, COUNTED = "one", "many", "execute", "released", "counted"
NOTES = (RELEASED, COUNTED)  # queries with no SQL: spend changes a store mirrors elsewhere after commit


@dataclass(frozen=True, slots=True)
class Query:
    kind: str  # ONE: the first row or None; MANY: every row; EXECUTE: the number of rows changed;
    # RELEASED / COUNTED: no SQL, a note that ``args`` = (agent id, charges, counts) were released /
    # counted again: the charges' amounts, and one payment each when ``counts`` (not for what a partial
    # capture gives back). The driver answers None.
    sql: str
    args: Sequence[Any] = ()


Tx = Generator[Query, Any, T]


def one(sql: str, args: Sequence[Any] = ()) -> Query:
    return Query(ONE, sql, args)


def many(sql: str, args: Sequence[Any] = ()) -> Query:
    return Query(MANY, sql, args)


def execute(sql: str, args: Sequence[Any] = ()) -> Query:
    return Query(EXECUTE, sql, args)


Release = tuple[str, tuple[Charge, ...], bool]  # what a note says: agent, charges, counts
Note = tuple[str, str, tuple[Charge, ...], bool]  # a note as a driver keeps it: its kind, then the above


def released(agent_id: str, charges: Sequence[Charge], counts: bool = True) -> Query:
    return Query(RELEASED, "", (agent_id, tuple(charges), counts))


def counted(agent_id: str, charges: Sequence[Charge]) -> Query:
    return Query(COUNTED, "", (agent_id, tuple(charges), True))


def single(query: Query) -> Tx[Any]:
    return (yield query)


class SqlStore(ABC):
    """Every ``Store`` operation, over a driver's ``write`` and ``read``."""

    @abstractmethod
    async def write(self, body: Tx[T]) -> T:
        """Run ``body`` in one write transaction; its result once committed."""

    @abstractmethod
    async def read(self, body: Tx[T]) -> T:
        """Run ``body``'s queries on a committed snapshot."""

    async def fetch_one(self, sql: str, args: Sequence[Any] = ()) -> Any:
        return await self.read(single(one(sql, args)))

    async def fetch_all(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        return await self.read(single(many(sql, args)))

    async def ping(self) -> None:
        await self.fetch_one("SELECT 1")

    # -- gauges -------------------------------------------------------------------------------------------
    async def count_pending_holds(self) -> int:
        row = await self.fetch_one("SELECT COUNT(*) FROM approvals WHERE state=?", (PENDING,))
        return int(row[0])

    async def current_spend(
        self, keys: Sequence[tuple[str, str]], limit: int
    ) -> list[tuple[str, str, str, str, int, int]]:
        if not keys:
            return []
        # a calendar window is its period's row; a rolling one the sum of its window's buckets
        wanted, args = [], []
        for name, period in keys:
            bounds = rolling_range(period)
            if bounds is None:
                wanted.append("(s.limit_name=? AND s.period=?)")
                args += [name, period]
            else:
                wanted.append("(s.limit_name=? AND s.period>=? AND s.period<=? AND s.period LIKE ?)")
                args += [name, bounds[1], bounds[2], bounds[0] + "%"]
        sql = (
            "SELECT s.agent_id, a.name, s.limit_name, s.currency, SUM(s.amount), SUM(s.count) FROM spend s "
            f"JOIN agents a ON a.id = s.agent_id WHERE ({' OR '.join(wanted)}) AND a.revoked_at IS NULL "
            "GROUP BY s.agent_id, a.name, s.limit_name, s.currency ORDER BY 5 DESC LIMIT ?"
        )
        return [tuple(r) for r in await self.fetch_all(sql, [*args, limit])]

    async def prune_spend(self, keys: Sequence[tuple[str, str]]) -> int:
        # A batch per transaction: payments' writes wait behind one batch, never behind all the history.
        # The LIKE keeps the range to its window's prefix in any collation (one that ignores ':' would
        # put rolling:3600:... inside the range of rolling:360:).
        deleted = 0
        for name, period in keys:
            stale = stale_buckets(period)
            if stale is None:
                continue
            prefix, end = stale
            while True:
                batch = await self.write(
                    single(
                        execute(
                            "DELETE FROM spend WHERE (agent_id, limit_name, period) IN (SELECT agent_id, "
                            "limit_name, period FROM spend WHERE limit_name=? AND period>=? AND period<? "
                            "AND period LIKE ? LIMIT ?)",
                            (name, prefix, end, prefix + "%", PRUNE_BATCH),
                        )
                    )
                )
                deleted += batch
                if batch < PRUNE_BATCH:
                    break
        return deleted

    # -- key rotation ---------------------------------------------------------------------------------
    _SEALED = {
        "connection": ("connections", "credentials"),
        "response": ("authorizations", "response_body"),
        "request": ("authorizations", "request"),
    }

    async def sealed_values(self, kind: str, after: str, limit: int) -> list[tuple[str, bytes]]:
        table, column = self._SEALED[kind]
        sql = f"SELECT id, {column} FROM {table} WHERE id > ? AND {column} IS NOT NULL ORDER BY id LIMIT ?"
        return [(r[0], bytes(r[1])) for r in await self.fetch_all(sql, (after, limit))]

    async def reseal(self, kind: str, row_id: str, old: bytes, new: bytes) -> bool:
        table, column = self._SEALED[kind]
        sql = f"UPDATE {table} SET {column}=? WHERE id=? AND {column}=?"
        changed: int = await self.write(single(execute(sql, (new, row_id, old))))
        return changed == 1

    # -- owners, connections, agents ------------------------------------------------------------------
    async def create_owner(self, owner: OwnerRecord, actor: str = "cli") -> None:
        def tx() -> Tx[None]:
            (
                yield execute(
                    "INSERT INTO owners VALUES (?,?,?,?)",
                    (owner.id, owner.name, owner.token_hash, owner.created_at),
                )
            )
            yield from _event(
                owner.id, None, None, "owner.created", actor, {"name": owner.name}, owner.created_at
            )

        await self.write(tx())

    async def get_owner(self, owner_id: str) -> OwnerRecord | None:
        row = await self.fetch_one("SELECT * FROM owners WHERE id=?", (owner_id,))
        return OwnerRecord(*row) if row else None

    async def find_owner(self, name: str) -> OwnerRecord | None:
        row = await self.fetch_one("SELECT * FROM owners WHERE name=?", (name,))
        return OwnerRecord(*row) if row else None

    async def update_owner_token(
        self,
        owner_id: str,
        token_hash: str,
        now: float,
        actor: str = "cli",
        kind: str = "owner.token_rotated",
    ) -> None:
        def tx() -> Tx[None]:
            (yield execute("UPDATE owners SET token_hash=? WHERE id=?", (token_hash, owner_id)))
            yield from _event(owner_id, None, None, kind, actor, {}, now)

        await self.write(tx())

    async def list_owners(self) -> list[OwnerRecord]:
        rows = await self.fetch_all("SELECT * FROM owners ORDER BY created_at")
        return [OwnerRecord(*r) for r in rows]

    async def add_connection(self, c: ConnectionRecord, actor: str = "cli") -> None:
        def tx() -> Tx[None]:
            (
                yield execute(
                    "INSERT INTO connections VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (
                        c.id,
                        c.owner_id,
                        c.provider,
                        c.name,
                        c.upstream,
                        c.credentials,
                        c.created_at,
                        None,
                        json.dumps(list(c.allowed_accounts)),
                        json.dumps(dict(c.settings)),
                    ),
                )
            )
            yield from _event(
                c.owner_id,
                None,
                None,
                "connection.added",
                actor,
                {
                    "connection": c.id,
                    "provider": c.provider,
                    "name": c.name,
                    "upstream": c.upstream,
                    "settings": dict(c.settings),
                },
                c.created_at,
            )

        await self.write(tx())

    async def get_connection(self, connection_id: str) -> ConnectionRecord | None:
        row = await self.fetch_one("SELECT * FROM connections WHERE id=?", (connection_id,))
        return _connection(row) if row else None

    async def find_connection(
        self, owner_id: str, name: str, include_revoked: bool = False
    ) -> ConnectionRecord | None:
        active = "" if include_revoked else " AND revoked_at IS NULL"
        row = await self.fetch_one(
            f"SELECT * FROM connections WHERE owner_id=? AND name=?{active}", (owner_id, name)
        )
        return _connection(row) if row else None

    async def update_connection(
        self, old: ConnectionRecord, new: ConnectionRecord, changed: Sequence[str], actor: str, now: float
    ) -> bool:
        def tx() -> Tx[bool]:
            updated = yield execute(
                "UPDATE connections SET upstream=?, credentials=?, allowed_accounts=?, settings=?, "
                "revoked_at=NULL WHERE id=? AND credentials=?",
                (
                    new.upstream,
                    new.credentials,
                    json.dumps(list(new.allowed_accounts)),
                    json.dumps(dict(new.settings)),
                    old.id,
                    old.credentials,
                ),
            )
            if updated:
                data = {"connection": old.id, "name": old.name, "changed": list(changed)}
                yield from _event(old.owner_id, None, None, "connection.updated", actor, data, now)
            return bool(updated)

        return await self.write(tx())

    async def revoke_connection(self, owner_id: str, connection_id: str, actor: str, now: float) -> bool:
        def tx() -> Tx[bool]:
            changed = yield execute(
                "UPDATE connections SET revoked_at=? WHERE id=? AND owner_id=? AND revoked_at IS NULL",
                (now, connection_id, owner_id),
            )
            if changed:
                data = {"connection": connection_id}
                yield from _event(owner_id, None, None, "connection.revoked", actor, data, now)
            return bool(changed)

        return await self.write(tx())

    async def create_agent(self, a: AgentRecord, actor: str = "owner") -> None:
        def tx() -> Tx[None]:
            inserted = yield execute(
                "INSERT INTO agents VALUES (?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                (
                    a.id,
                    a.owner_id,
                    a.connection_id,
                    a.name,
                    json.dumps(dict(a.labels)),
                    a.token_hash,
                    a.created_at,
                    None,
                ),
            )
            if not inserted:
                raise AgentNameTaken(a.name)
            yield from _event(
                a.owner_id,
                a.id,
                None,
                "agent.created",
                actor,
                {"name": a.name, "labels": dict(a.labels), "connection": a.connection_id},
                a.created_at,
            )

        await self.write(tx())

    async def get_agent(self, agent_id: str) -> AgentRecord | None:
        row = await self.fetch_one("SELECT * FROM agents WHERE id=?", (agent_id,))
        return _agent(row) if row else None

    async def list_agents(self, owner_id: str) -> list[AgentRecord]:
        rows = await self.fetch_all("SELECT * FROM agents WHERE owner_id=? ORDER BY created_at", (owner_id,))
        return [_agent(r) for r in rows]

    async def update_agent(
        self, old: AgentRecord, new: AgentRecord, changed: Sequence[str], actor: str, now: float
    ) -> bool:
        """Move an active agent to ``new``'s connection, labels and token hash, if it is still ``old``
        (a compare-and-swap: of replicas applying one change at once, one records it)."""

        def tx() -> Tx[bool]:
            updated = yield execute(
                "UPDATE agents SET connection_id=?, labels=?, token_hash=? "
                "WHERE id=? AND token_hash=? AND connection_id=? AND labels=? AND revoked_at IS NULL",
                (
                    new.connection_id,
                    json.dumps(dict(new.labels)),
                    new.token_hash,
                    old.id,
                    old.token_hash,
                    old.connection_id,
                    json.dumps(dict(old.labels)),
                ),
            )
            if updated:
                data = {"changed": list(changed), "labels": dict(new.labels), "connection": new.connection_id}
                yield from _event(old.owner_id, old.id, None, "agent.updated", actor, data, now)
            return bool(updated)

        return await self.write(tx())

    async def declared(self, kind: str) -> list[tuple[str, str, str]]:
        """(id, owner id, digest) of every ``kind`` a state file manages."""
        rows = await self.fetch_all("SELECT id, owner_id, digest FROM declared WHERE kind=?", (kind,))
        return [(r[0], r[1], r[2]) for r in rows]

    async def set_declared(
        self, kind: str, row_id: str, owner_id: str, source: str, digest: str, now: float
    ) -> None:
        sql = (
            "INSERT INTO declared VALUES (?,?,?,?,?,?) ON CONFLICT (kind, id) DO UPDATE "
            "SET source=excluded.source, digest=excluded.digest"
        )
        await self.write(single(execute(sql, (kind, row_id, owner_id, source, digest, now))))

    async def forget_declared(self, kind: str, row_id: str) -> None:
        await self.write(single(execute("DELETE FROM declared WHERE kind=? AND id=?", (kind, row_id))))

    async def revoke_agent(self, owner_id: str, agent_id: str, actor: str, now: float) -> bool:
        def tx() -> Tx[bool]:
            changed = yield execute(
                "UPDATE agents SET revoked_at=? WHERE id=? AND owner_id=? AND revoked_at IS NULL",
                (now, agent_id, owner_id),
            )
            if changed:
                yield from _event(owner_id, agent_id, None, "agent.revoked", actor, {}, now)
            return bool(changed)

        return await self.write(tx())

    # -- the payment path -----------------------------------------------------------------------------
    async def lookup(
        self, agent_id: str, idempotency_key: str, spend_keys: Sequence[tuple[str, str]]
    ) -> tuple[AuthorizationRecord | None, dict[str, SpendTotal]]:
        def tx() -> Tx[tuple[AuthorizationRecord | None, dict[str, SpendTotal]]]:
            row = yield one(
                f"SELECT {AUTH_COLUMNS} FROM authorizations WHERE agent_id=? AND idempotency_key=?",
                (agent_id, idempotency_key),
            )
            calendar = [(limit, period) for limit, period in spend_keys if not is_rolling(period)]
            totals = {limit: SpendTotal() for limit, _ in spend_keys}
            if calendar:  # one query for every calendar window the rules may read
                wanted = " OR ".join(["(limit_name=? AND period=?)"] * len(calendar))
                rows = yield many(
                    f"SELECT limit_name, period, amount, count FROM spend WHERE agent_id=? AND ({wanted})",
                    (agent_id, *(part for key in calendar for part in key)),
                )
                found = {(limit, period): SpendTotal(amount, count) for limit, period, amount, count in rows}
                totals |= {limit: found.get((limit, period), SpendTotal()) for limit, period in calendar}
            for limit, period in spend_keys:  # a rolling window: the sum of its buckets
                if is_rolling(period):
                    totals[limit] = yield from _window_total(agent_id, limit, period)
            return (authorization_record(row) if row else None), totals

        return await self.read(tx())

    async def record_decision(
        self, new: NewAuthorization, now: float, retry_of: str | None = None
    ) -> Recorded:
        return await self.write(record_decision_tx(new, now, retry_of))

    async def start_forwarding(self, authorization_id: str, lease_expires_at: float, now: float) -> bool:
        def tx() -> Tx[bool]:
            changed = yield execute(
                "UPDATE authorizations SET state=?, lease_expires_at=?, updated_at=? WHERE id=? AND state=?",
                (FORWARDING, lease_expires_at, now, authorization_id, APPROVED),
            )
            if changed:
                yield from _authorization_event(
                    authorization_id, "authorization.forwarding", "agent", {"after": "approval"}, now
                )
            return bool(changed)

        return await self.write(tx())

    async def settle(
        self,
        authorization_id: str,
        provider_ref: str | None,
        status: int,
        body: bytes | None,
        now: float,
        holds: int | None = None,
    ) -> None:
        def tx() -> Tx[None]:
            row = yield one(
                "UPDATE authorizations SET state=?, provider_ref=?, response_status=?, "
                "response_body=?, lease_expires_at=NULL, updated_at=? WHERE id=? AND state=? "
                "RETURNING owner_id, agent_id",
                (SETTLED, provider_ref, status, body, now, authorization_id, FORWARDING),
            )
            if row is None:
                return
            owner, agent = row
            data = {"status": status, "provider_ref": provider_ref}
            yield from _event(owner, agent, authorization_id, "authorization.settled", "provider", data, now)
            if holds is not None and provider_ref:
                yield from _shrink(owner, provider_ref, holds, now)

        await self.write(tx())

    async def fail(
        self,
        authorization_id: str,
        reason: str,
        status: int | None,
        body: bytes | None,
        now: float,
        provider_ref: str | None = None,
    ) -> None:
        def tx() -> Tx[None]:
            ended = yield from _end(
                authorization_id,
                FORWARDING,
                FAILED,
                now,
                response_status=status,
                response_body=body,
                provider_ref=provider_ref,
            )
            if ended is None:
                return  # already settled, failed or in doubt: nothing to release twice
            owner, agent = ended
            yield from _event(
                owner,
                agent,
                authorization_id,
                "authorization.failed",
                "provider",
                {"status": status, "reason": reason, "released": True},
                now,
            )

        await self.write(tx())

    async def apply_webhook(
        self,
        owner_id: str,
        connection_id: str,
        event_id: str,
        event_type: str,
        provider_ref: str | None,
        outcome: str | None,
        now: float,
    ) -> str:
        def tx() -> Tx[str]:
            inserted = yield execute(
                "INSERT INTO webhook_events VALUES (?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                (connection_id, event_id, event_type, provider_ref, "", now),
            )
            if not inserted:
                return "duplicate"
            result = "ignored"
            if outcome and provider_ref:
                data = {"event": event_id, "type": event_type}
                result = yield from _settle_ref(owner_id, provider_ref, outcome, "provider", data, now)
            (
                yield execute(
                    "UPDATE webhook_events SET outcome=? WHERE connection_id=? AND event_id=?",
                    (result, connection_id, event_id),
                )
            )
            return result

        return await self.write(tx())

    async def void(
        self, owner_id: str, provider_ref: str, actor: str, data: dict[str, Any], now: float
    ) -> str:
        return await self.write(_settle_ref(owner_id, provider_ref, "void", actor, data, now))

    async def webhook_seen(self, connection_id: str, event_id: str) -> bool:
        row = await self.fetch_one(
            "SELECT 1 FROM webhook_events WHERE connection_id=? AND event_id=?", (connection_id, event_id)
        )
        return row is not None

    async def record_event(
        self,
        owner_id: str,
        agent_id: str | None,
        auth_id: str | None,
        kind: str,
        actor: str,
        data: dict[str, Any],
        now: float,
    ) -> None:
        await self.write(_event(owner_id, agent_id, auth_id, kind, actor, data, now))

    async def maker_of(self, owner_id: str, provider_ref: str) -> str | None:
        row = await self.fetch_one(
            "SELECT agent_id FROM authorizations WHERE owner_id=? AND provider_ref=? AND operation<>? "
            "ORDER BY created_at LIMIT 1",
            (owner_id, provider_ref, UNRECOGNIZED),
        )
        return row[0] if row else None

    async def find_by_provider_ref(self, owner_id: str, provider_ref: str) -> AuthorizationRecord | None:
        row = await self.fetch_one(
            f"SELECT {AUTH_COLUMNS} FROM authorizations WHERE owner_id=? AND provider_ref=? AND state=? "
            "AND operation<>? ORDER BY amount DESC, created_at LIMIT 1",
            (owner_id, provider_ref, SETTLED, UNRECOGNIZED),
        )
        return authorization_record(row) if row else None

    async def unresolved_on(self, owner_id: str, provider_ref: str) -> AuthorizationRecord | None:
        # Only rows whose payment names the ref anywhere are parsed (a call on an object is on the agent's
        # path, and the owner may have many calls in flight); the parse tells whether it is refers_to.
        escaped = provider_ref.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        rows = await self.fetch_all(
            f"SELECT {AUTH_COLUMNS} FROM authorizations WHERE owner_id=? AND state IN (?,?) "
            "AND (provider_ref=? OR payment LIKE ? ESCAPE '\\')",
            (owner_id, FORWARDING, IN_DOUBT, provider_ref, f"%{escaped}%"),
        )
        for row in rows:
            record = authorization_record(row)
            if record.provider_ref == provider_ref or record.payment.get("refers_to") == provider_ref:
                return record
        return None

    # -- approvers -----------------------------------------------------------------------------------------
    async def create_approver(self, a: ApproverRecord, actor: str) -> None:
        def tx() -> Tx[None]:
            inserted = yield execute(
                "INSERT INTO approvers VALUES (?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                (a.id, a.owner_id, a.name, a.token_hash, a.created_at, None),
            )
            if not inserted:
                raise ApproverNameTaken(a.name)
            data = {"approver": a.id, "name": a.name}
            yield from _event(a.owner_id, None, None, "approver.created", actor, data, a.created_at)

        await self.write(tx())

    async def get_approver(self, approver_id: str) -> ApproverRecord | None:
        row = await self.fetch_one("SELECT * FROM approvers WHERE id=?", (approver_id,))
        return ApproverRecord(*row) if row else None

    async def list_approvers(self, owner_id: str) -> list[ApproverRecord]:
        rows = await self.fetch_all(
            "SELECT * FROM approvers WHERE owner_id=? ORDER BY created_at, id", (owner_id,)
        )
        return [ApproverRecord(*r) for r in rows]

    async def update_approver_token(
        self, old: ApproverRecord, token_hash: str, actor: str, now: float
    ) -> bool:
        def tx() -> Tx[bool]:
            updated = yield execute(
                "UPDATE approvers SET token_hash=? WHERE id=? AND token_hash=? AND revoked_at IS NULL",
                (token_hash, old.id, old.token_hash),
            )
            if updated:
                data = {"approver": old.id, "name": old.name}
                yield from _event(old.owner_id, None, None, "approver.token_rotated", actor, data, now)
            return bool(updated)

        return await self.write(tx())

    async def revoke_approver(self, owner_id: str, approver_id: str, actor: str, now: float) -> bool:
        def tx() -> Tx[bool]:
            row = yield one(
                "UPDATE approvers SET revoked_at=? WHERE id=? AND owner_id=? AND revoked_at IS NULL "
                "RETURNING name",
                (now, approver_id, owner_id),
            )
            if row is not None:
                data = {"approver": approver_id, "name": row[0]}
                yield from _event(owner_id, None, None, "approver.revoked", actor, data, now)
            return row is not None

        return await self.write(tx())

    # -- holds and housekeeping -----------------------------------------------------------------------
    async def vote(
        self,
        owner_id: str,
        approval_id: str,
        voter: str,
        approve: bool,
        reason: str,
        via: str,
        now: float,
        authenticated: Mapping[str, str] | None = None,
    ) -> VoteResult:
        return await self.write(_vote(owner_id, approval_id, voter, approve, reason, via, now, authenticated))

    async def add_links(self, approval_id: str, links: Sequence[tuple[str, str, float]]) -> None:
        def tx() -> Tx[None]:
            for token_hash, approver, expires in links:
                yield execute(
                    "INSERT INTO approval_links (token_hash, approval_id, approver, expires_at) VALUES (?,?,?,?)",
                    (token_hash, approval_id, approver, expires),
                )

        await self.write(tx())

    async def find_link(self, token_hash: str) -> tuple[ApprovalRecord, str, float | None, float] | None:
        def tx() -> Tx[tuple[ApprovalRecord, str, float | None, float] | None]:
            link = yield one(
                "SELECT approval_id, approver, used_at, expires_at FROM approval_links WHERE token_hash=?",
                (token_hash,),
            )
            if link is None:
                return None
            row = yield one("SELECT * FROM approvals WHERE id=?", (link[0],))
            return (yield from _approval(row)), link[1], link[2], link[3]

        return await self.read(tx())

    async def use_link(
        self,
        token_hash: str,
        approve: bool,
        reason: str,
        now: float,
        voter: str | None = None,
        authenticated: Mapping[str, str] | None = None,
    ) -> VoteResult:
        def tx() -> Tx[VoteResult]:
            link = yield one(
                "UPDATE approval_links SET used_at=? WHERE token_hash=? AND used_at IS NULL AND expires_at>? "
                "RETURNING approval_id, approver",
                (now, token_hash, now),
            )
            if link is None:
                raise LinkUnusable()
            owner_id = (yield one("SELECT owner_id FROM approvals WHERE id=?", (link[0],)))[0]
            who = voter or link[1]
            return (yield from _vote(owner_id, link[0], who, approve, reason, "link", now, authenticated))

        return await self.write(tx())

    async def get_approval(self, owner_id: str, approval_id: str) -> ApprovalRecord | None:
        def tx() -> Tx[ApprovalRecord | None]:
            row = yield one("SELECT * FROM approvals WHERE id=? AND owner_id=?", (approval_id, owner_id))
            return (yield from _approval(row)) if row else None

        return await self.read(tx())

    async def list_approvals(self, owner_id: str, state: str | None) -> list[ApprovalRecord]:
        def tx() -> Tx[list[ApprovalRecord]]:
            sql, args = "SELECT * FROM approvals WHERE owner_id=?", [owner_id]
            if state:
                sql, args = sql + " AND state=?", [*args, state]
            rows = yield many(sql + " ORDER BY created_at", args)
            approvals = []
            for r in rows:
                approvals.append((yield from _approval(r)))
            return approvals

        return await self.read(tx())

    async def expire_holds(self, now: float) -> int:
        def tx() -> Tx[int]:
            # One conditional transition of every expired hold still pending (a vote
            # that closed one first wins), then each one's authorization ended and its spend released.
            reason = "the hold expired"
            rows = yield many(
                "UPDATE approvals SET state=?, decided_by=?, reason=?, decided_at=? "
                "WHERE state=? AND expires_at<=? RETURNING id, owner_id, authorization_id",
                (EXPIRED_HOLD, "paysentry", reason, now, PENDING, now),
            )
            for approval_id, owner_id, auth_id in rows:
                yield from _end_hold(
                    owner_id, approval_id, auth_id, EXPIRED_HOLD, EXPIRED, "paysentry", reason, now
                )
            return len(rows)

        return await self.write(tx())

    async def expire_approved(self, decided_before: float, now: float) -> int:
        def tx() -> Tx[int]:
            rows = yield many(
                "SELECT a.owner_id, a.id, a.authorization_id FROM approvals a JOIN authorizations z "
                "ON z.id = a.authorization_id WHERE a.state=? AND a.decided_at<=? AND z.state=?",
                (APPROVED_HOLD, decided_before, APPROVED),
            )
            ended = 0
            for owner_id, approval_id, auth_id in rows:
                done = yield from _end(auth_id, APPROVED, EXPIRED, now)
                if done is None:
                    continue  # the agent's retry took it first
                ended += 1
                data = {"approval_id": approval_id, "released": True, "why": "approved, never retried"}
                yield from _event(owner_id, done[1], auth_id, "authorization.expired", "paysentry", data, now)
            return ended

        return await self.write(tx())

    async def claim_notifications(self, now: float, lease: float, limit: int) -> list[Notification]:
        rows = await self.write(
            single(
                many(
                    "UPDATE notifications SET next_attempt_at=? WHERE id IN (SELECT id FROM notifications "
                    "WHERE state=? AND next_attempt_at<=? ORDER BY next_attempt_at LIMIT ?) "
                    "AND state=? AND next_attempt_at<=? RETURNING *",
                    (now + lease, "pending", now, limit, "pending", now),
                )
            )
        )
        return [Notification(*r) for r in rows]

    async def notification_sent(
        self, notification_id: str, delivered: bool, error: str, next_attempt_at: float | None, now: float
    ) -> None:
        def tx() -> Tx[None]:
            if delivered or next_attempt_at is None:
                state = "delivered" if delivered else "failed"
                row = yield one(
                    "UPDATE notifications SET state=?, attempts=attempts+1, last_error=?, done_at=? "
                    "WHERE id=? AND state=? RETURNING owner_id, approval_id, url, attempts, created_at",
                    (state, error, now, notification_id, "pending"),
                )
                if row is not None and not delivered:
                    data = {
                        "notification": notification_id,
                        "approval_id": row[1],
                        "host": _host(row[2]),
                        "attempts": row[3],
                        "first_attempt_at": row[4],
                        "last_error": error,
                    }
                    yield from _event(row[0], None, None, "notification.failed", "paysentry", data, now)
                return
            (
                yield execute(
                    "UPDATE notifications SET attempts=attempts+1, last_error=?, next_attempt_at=? "
                    "WHERE id=? AND state=?",
                    (error, next_attempt_at, notification_id, "pending"),
                )
            )

        await self.write(tx())

    async def list_notifications(self, owner_id: str, approval_id: str | None) -> list[Notification]:
        sql, args = "SELECT * FROM notifications WHERE owner_id=?", [owner_id]
        if approval_id:
            sql, args = sql + " AND approval_id=?", [*args, approval_id]
        return [Notification(*r) for r in await self.fetch_all(sql + " ORDER BY created_at, id", args)]

    async def set_in_doubt(self, authorization_id: str, reason: str, retry_at: float, now: float) -> bool:
        def tx() -> Tx[bool]:
            changed = yield execute(
                "UPDATE authorizations SET state=?, lease_expires_at=?, updated_at=? WHERE id=? AND state=?",
                (IN_DOUBT, retry_at, now, authorization_id, FORWARDING),
            )
            if changed:
                data = {"reason": reason, "released": False, "retry_at": retry_at}
                yield from _authorization_event(
                    authorization_id, "authorization.in_doubt", "paysentry", data, now
                )
            return bool(changed)

        return await self.write(tx())

    async def claim(self, authorization_id: str, lease_expires_at: float, now: float) -> int | None:
        def tx() -> Tx[int | None]:
            row = yield one(
                "UPDATE authorizations SET state=?, lease_expires_at=?, attempts=attempts+1, updated_at=? "
                "WHERE id=? AND (state=? OR (state=? AND lease_expires_at<=?)) RETURNING attempts",
                (FORWARDING, lease_expires_at, now, authorization_id, IN_DOUBT, FORWARDING, now),
            )
            if row is not None:
                data = {"attempt": row[0], "how": "re-sent with the same idempotency key"}
                yield from _authorization_event(
                    authorization_id, "authorization.resolving", "paysentry", data, now
                )
            return None if row is None else int(row[0])

        return await self.write(tx())

    async def claim_unresolved(self, lease_expires_at: float, now: float, limit: int) -> list[Unresolved]:
        def tx() -> Tx[list[Unresolved]]:
            # The same condition in the subquery and on each row: a row another replica claimed first
            # (PostgreSQL re-checks it on the row's latest version; SQLite runs one writer) is not taken.
            rows = yield many(
                f"UPDATE authorizations SET state=?, lease_expires_at=?, attempts=attempts+1, updated_at=? "
                f"WHERE id IN (SELECT id FROM authorizations WHERE {_DUE} ORDER BY lease_expires_at LIMIT ?) "
                f"AND {_DUE} RETURNING {AUTH_COLUMNS}, request, attempts",
                (
                    FORWARDING,
                    lease_expires_at,
                    now,
                    IN_DOUBT,
                    FORWARDING,
                    now,
                    limit,
                    IN_DOUBT,
                    FORWARDING,
                    now,
                ),
            )
            claimed = []
            for row in rows:
                record = authorization_record(row[:-2])
                data = {"attempt": row[-1], "how": "re-sent with the same idempotency key"}
                yield from _event(
                    record.owner_id,
                    record.agent_id,
                    record.id,
                    "authorization.resolving",
                    "paysentry",
                    data,
                    now,
                )
                request = bytes(row[-2]) if row[-2] is not None else None
                claimed.append(Unresolved(record, request, row[-1] - 1))
            return claimed

        return await self.write(tx())

    async def release_unrecorded(self, now: float) -> int:
        return 0  # reserved in the same transaction as recorded: nothing can be left unrecorded

    async def count_unresolved(self, now: float) -> int:
        row = await self.fetch_one(
            "SELECT COUNT(*) FROM authorizations WHERE state=? OR (state=? AND lease_expires_at<=?)",
            (IN_DOUBT, FORWARDING, now),
        )
        return int(row[0])

    # -- reconciliation with the provider's records ---------------------------------------------------
    async def list_connections(self, owner_id: str | None) -> list[ConnectionRecord]:
        sql, args = "SELECT * FROM connections WHERE revoked_at IS NULL", []
        if owner_id is not None:
            sql, args = sql + " AND owner_id=?", [owner_id]
        return [_connection(r) for r in await self.fetch_all(sql + " ORDER BY created_at, id", args)]

    async def reconciliation_candidates(
        self, connection_id: str, since: float | None, refs: Sequence[str], ids: Sequence[str]
    ) -> list[AuthorizationRecord]:
        def tx() -> Tx[list[AuthorizationRecord]]:
            base = (
                f"SELECT {AUTH_COLUMNS} FROM authorizations "
                "WHERE agent_id IN (SELECT id FROM agents WHERE connection_id=?)"
            )
            rows = []
            if since is not None:
                rows += yield many(base + " AND created_at>=?", (connection_id, since))
            for column, values in (("provider_ref", list(refs)), ("id", list(ids))):
                for start in range(0, len(values), 400):  # bounded statements
                    chunk = values[start : start + 400]
                    marks = ",".join("?" for _ in chunk)
                    rows += yield many(f"{base} AND {column} IN ({marks})", (connection_id, *chunk))
            unique = {row[0]: row for row in rows}
            return [authorization_record(r) for r in unique.values()]

        return await self.read(tx())

    async def reconcile(
        self,
        authorization_id: str,
        fix: str,
        actor: str,
        data: Mapping[str, Any],
        now: float,
        provider_ref: str | None = None,
        status: int | None = None,
        body: bytes | None = None,
    ) -> bool:
        return await self.write(
            reconcile_tx(authorization_id, fix, actor, data, now, provider_ref, status, body)
        )

    # -- x402 ---------------------------------------------------------------------------------------------
    async def record_x402_signature(self, signature: X402Signature) -> None:
        s = signature

        def tx() -> Tx[None]:
            inserted = yield execute(
                f"INSERT INTO x402_authorizations ({_X402_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT DO NOTHING",
                (
                    s.nonce,
                    s.authorization_id,
                    s.owner_id,
                    s.agent_id,
                    s.network,
                    s.asset,
                    s.payer,
                    s.pay_to,
                    s.amount,
                    s.valid_after,
                    s.valid_before,
                    s.signed_at,
                ),
            )
            if not inserted:
                raise DuplicateKey(s.nonce)
            data = {
                "nonce": s.nonce,
                "network": s.network,
                "asset": s.asset,
                "payer": s.payer,
                "pay_to": s.pay_to,
                "amount": s.amount,
                "valid_before": s.valid_before,
            }
            yield from _event(
                s.owner_id, s.agent_id, s.authorization_id, "x402.signed", "paysentry", data, s.signed_at
            )

        await self.write(tx())

    async def x402_signature(self, authorization_id: str) -> X402Signature | None:
        row = await self.fetch_one(
            f"SELECT {_X402_COLUMNS} FROM x402_authorizations WHERE authorization_id=? "
            "ORDER BY signed_at DESC LIMIT 1",
            (authorization_id,),
        )
        if row is None:
            return None
        return X402Signature(
            str(row[0]),
            str(row[1]),
            str(row[2]),
            str(row[3]),
            str(row[4]),
            str(row[5]),
            str(row[6]),
            str(row[7]),
            int(row[8]),
            int(row[9]),
            int(row[10]),
            float(row[11]),
        )

    async def save_reconciliation(
        self, owner_id: str, connection_id: str, ran_at: float, report: Mapping[str, Any]
    ) -> None:
        sql = (
            "INSERT INTO reconciliations (connection_id, owner_id, ran_at, report) VALUES (?,?,?,?) "
            "ON CONFLICT (connection_id) DO UPDATE SET owner_id=excluded.owner_id, ran_at=excluded.ran_at, "
            "report=excluded.report WHERE reconciliations.ran_at <= excluded.ran_at"
        )
        await self.write(single(execute(sql, (connection_id, owner_id, ran_at, json.dumps(report)))))

    async def reconciliations(self, owner_id: str | None) -> list[dict[str, Any]]:
        sql, args = "SELECT report FROM reconciliations", []
        if owner_id is not None:
            sql, args = sql + " WHERE owner_id=?", [owner_id]
        return [json.loads(r[0]) for r in await self.fetch_all(sql + " ORDER BY connection_id", args)]

    # -- records --------------------------------------------------------------------------------------
    async def get_authorization(self, owner_id: str, authorization_id: str) -> AuthorizationRecord | None:
        row = await self.fetch_one(
            f"SELECT {AUTH_COLUMNS} FROM authorizations WHERE id=? AND owner_id=?",
            (authorization_id, owner_id),
        )
        return authorization_record(row) if row else None

    async def list_authorizations(
        self, owner_id: str, agent_id: str | None, limit: int
    ) -> list[AuthorizationRecord]:
        def tx() -> Tx[list[AuthorizationRecord]]:
            sql, args = f"SELECT {AUTH_COLUMNS} FROM authorizations WHERE owner_id=?", [owner_id]
            if agent_id:
                sql, args = sql + " AND agent_id=?", [*args, agent_id]
            rows = yield many(sql + " ORDER BY created_at DESC LIMIT ?", [*args, limit])
            return [authorization_record(r) for r in rows]

        return await self.read(tx())

    async def history(self, since: float, owner_id: str | None) -> list[AuthorizationRecord]:
        def tx() -> Tx[list[AuthorizationRecord]]:
            args: list[float | str]
            sql, args = f"SELECT {AUTH_COLUMNS} FROM authorizations WHERE created_at >= ?", [since]
            if owner_id:
                sql, args = sql + " AND owner_id = ?", [*args, owner_id]
            return [authorization_record(r) for r in (yield many(sql + " ORDER BY created_at, id", args))]

        return await self.read(tx())

    async def page_authorizations(self, owner_id: str, page: Page) -> tuple[list[AuthorizationRecord], bool]:
        where, args = ["owner_id=?"], list[Any]([owner_id])
        for column, value in (
            ("agent_id", page.agent_id),
            ("state", page.state),
            ("decision", page.decision),
            ("rule", page.rule),
        ):
            if value is not None:
                where.append(f"{column}=?")
                args.append(value)

        def tx() -> Tx[tuple[list[AuthorizationRecord], bool]]:
            rows, more = yield from _keyset("authorizations", AUTH_COLUMNS, owner_id, where, args, page)
            return [authorization_record(r) for r in rows], more

        return await self.read(tx())

    async def page_approvals(self, owner_id: str, page: Page) -> tuple[list[ApprovalRecord], bool]:
        where, args = ["owner_id=?"], list[Any]([owner_id])
        if page.state is not None:
            where.append("state=?")
            args.append(page.state)
        if page.agent_id is not None:
            where.append(
                "authorization_id IN (SELECT id FROM authorizations WHERE owner_id=? AND agent_id=?)"
            )
            args += [owner_id, page.agent_id]

        def tx() -> Tx[tuple[list[ApprovalRecord], bool]]:
            rows, more = yield from _keyset("approvals", "*", owner_id, where, args, page)
            approvals = []
            for r in rows:
                approvals.append((yield from _approval(r)))
            return approvals, more

        return await self.read(tx())

    async def page_agents(self, owner_id: str, page: Page) -> tuple[list[AgentRecord], bool]:
        where, args = _revoked_filter(owner_id, page)

        def tx() -> Tx[tuple[list[AgentRecord], bool]]:
            rows, more = yield from _keyset("agents", "*", owner_id, where, args, page)
            return [_agent(r) for r in rows], more

        return await self.read(tx())

    async def page_approvers(self, owner_id: str, page: Page) -> tuple[list[ApproverRecord], bool]:
        where, args = _revoked_filter(owner_id, page)

        def tx() -> Tx[tuple[list[ApproverRecord], bool]]:
            rows, more = yield from _keyset("approvers", "*", owner_id, where, args, page)
            return [ApproverRecord(*r) for r in rows], more

        return await self.read(tx())

    async def page_events(self, owner_id: str, page: Page) -> tuple[list[Event], bool]:
        where, args = ["owner_id=?"], list[Any]([owner_id])
        if page.agent_id is not None:
            where.append("agent_id=?")
            args.append(page.agent_id)
        if page.kind:
            where.append("type LIKE ?" if page.kind.endswith(".") else "type=?")
            args.append(page.kind + "%" if page.kind.endswith(".") else page.kind)
        if page.created_gte is not None:
            where.append("at>=?")
            args.append(page.created_gte)
        if page.created_lt is not None:
            where.append("at<?")
            args.append(page.created_lt)
        cursor, newer = page.ending_before or page.starting_after, page.ending_before is not None
        if cursor is not None:
            param = "ending_before" if newer else "starting_after"
            if not (cursor.isascii() and cursor.isdigit() and len(cursor) < 19):
                raise UnknownCursor(cursor, param)
            if (
                await self.fetch_one(
                    "SELECT 1 FROM events WHERE seq=? AND owner_id=?", (int(cursor), owner_id)
                )
                is None
            ):
                raise UnknownCursor(cursor, param)
            where.append("seq > ?" if newer else "seq < ?")
            args.append(int(cursor))
        order = "ASC" if newer else "DESC"
        rows = await self.fetch_all(
            f"SELECT seq, owner_id, agent_id, authorization_id, type, actor, data, at FROM events "
            f"WHERE {' AND '.join(where)} ORDER BY seq {order} LIMIT ?",
            (*args, page.limit + 1),
        )
        found = [
            Event(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]), r[7]) for r in rows[: page.limit]
        ]
        return (found[::-1] if newer else found), len(rows) > page.limit

    async def list_events(self, owner_id: str, after: int, limit: int) -> list[Event]:
        rows = await self.fetch_all(
            "SELECT seq, owner_id, agent_id, authorization_id, type, actor, data, at FROM events "
            "WHERE owner_id=? AND seq>? ORDER BY seq LIMIT ?",
            (owner_id, after, limit),
        )
        return [Event(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]), r[7]) for r in rows]

    async def spend_of(self, owner_id: str, agent_id: str) -> list[dict[str, Any]]:
        rows = await self.fetch_all(
            "SELECT s.limit_name, s.period, s.currency, s.amount, s.count FROM spend s "
            "JOIN agents a ON a.id = s.agent_id WHERE a.owner_id=? AND s.agent_id=? ORDER BY s.period, s.limit_name",
            (owner_id, agent_id),
        )
        return [dict(zip(("limit", "period", "currency", "amount", "count"), r, strict=True)) for r in rows]


# -- transaction bodies ------------------------------------------------------------------------------------
def record_decision_tx(
    new: NewAuthorization,
    now: float,
    retry_of: str | None,
    gated: bool = False,
    exceeded: LimitExceeded | None = None,
    reservation: str | None = None,
) -> Tx[Recorded]:
    """Record a decision and reserve its spend in the ``spend`` table. ``gated``: the limits were checked
    and counted by a gate outside (Redis), whose refusal is ``exceeded``, under ``reservation``; the
    record is then the authorization row, its charges, and the reservation's name."""
    decision, rule, message = new.decision, new.rule, new.message
    if decision != DENIED and new.charges and exceeded is None and not gated:
        exceeded = yield from _reserve(new.agent_id, new.charges)
    if exceeded:
        decision, rule = "deny", exceeded.charge.limit
        message = new.explain(exceeded.charge, exceeded.total)
    state = {"allow": FORWARDING, "hold": HELD, "deny": DENIED}[decision]
    charges = [] if state == DENIED else new.charges
    values = (
        new.owner_id,
        new.agent_id,
        new.idempotency_key,
        new.request_hash,
        new.provider,
        new.operation,
        new.amount,
        new.currency,
        new.destination,
        json.dumps(new.payment),
        decision,
        rule,
        new.policy,
        message,
        new.revision,
        state,
        json.dumps([_charge_json(c) for c in charges]),
        new.approval_id if state == HELD else None,
        new.lease_expires_at if state == FORWARDING else None,
        now,
    )
    if retry_of:
        changed = yield execute(
            "UPDATE authorizations SET owner_id=?, agent_id=?, idempotency_key=?, request_hash=?, provider=?, "
            "operation=?, amount=?, currency=?, destination=?, payment=?, decision=?, rule=?, policy=?, message=?, "
            "revision=?, state=?, charges=?, approval_id=?, lease_expires_at=?, updated_at=?, provider_ref=NULL, "
            "response_status=NULL, response_body=NULL, request=?, reservation=COALESCE(reservation || ',', '') || ? "
            "WHERE id=? AND state=? "
            "AND response_status IS NULL",
            (*values, new.request, reservation, retry_of, FAILED),
        )
        if not changed:
            raise DuplicateKey(new.idempotency_key)
        auth_id = retry_of
    else:
        inserted = yield execute(
            f"INSERT INTO authorizations ({AUTH_COLUMNS}, request, reservation) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,NULL,NULL,NULL,?,?,?,?,?) ON CONFLICT DO NOTHING",
            (new.id, *values[:-1], now, now, new.request, reservation),
        )
        if not inserted:
            raise DuplicateKey(new.idempotency_key)
        auth_id = new.id
    if state == HELD:
        assert new.approval_id and new.hold_expires_at
        spec = new.approval or ApprovalSpec()
        (
            yield execute(
                "INSERT INTO approvals (id, owner_id, authorization_id, state, expires_at, created_at, approvers, "
                "quorum, veto, reviewers) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    new.approval_id,
                    new.owner_id,
                    auth_id,
                    "pending",
                    new.hold_expires_at,
                    now,
                    json.dumps(list(spec.approvers)),
                    spec.quorum,
                    int(spec.veto),
                    json.dumps(
                        [{"name": r.name, "url": r.url, "timeout": r.timeout} for r in spec.reviewers]
                    ),
                ),
            )
        )
        for url in new.notify:  # the outbox: delivered (and retried) after commit
            (
                yield execute(
                    "INSERT INTO notifications (id, owner_id, approval_id, url, state, next_attempt_at, "
                    "created_at) VALUES (?,?,?,?,?,?,?)",
                    (new_id("msg"), new.owner_id, new.approval_id, url, "pending", now, now),
                )
            )
    data = {
        "decision": decision,
        "rule": rule,
        "policy": new.policy,
        "revision": new.revision,
        "operation": new.operation,
        "amount": new.amount,
        "currency": new.currency,
        "destination": new.destination,
        "reserved": [_charge_json(c) for c in charges],
        "approval_id": new.approval_id if state == HELD else None,
        "shadow": [dict(h) for h in new.shadow],
        "retry": bool(retry_of),
    }
    if exceeded:
        data["limit_total"] = {"amount": exceeded.total.amount, "count": exceeded.total.count}
    yield from _event(new.owner_id, new.agent_id, auth_id, f"authorization.{state}", "policy", data, now)
    if retry_of:  # the row keeps its creation time
        row = yield one(f"SELECT {AUTH_COLUMNS} FROM authorizations WHERE id=?", (auth_id,))
        return Recorded(authorization_record(row), exceeded)
    # (values: owner .. destination, payment JSON, decision .. state, charges JSON, approval, lease, now)
    record = AuthorizationRecord(
        auth_id,
        *values[:9],
        dict(new.payment),
        *values[10:16],
        list(charges),
        values[17],
        None,  # provider_ref
        None,  # response_status
        None,  # response_body
        values[18],
        now,
        now,
    )
    return Recorded(record, exceeded)


def _reserve(agent_id: str, charges: Sequence[Charge]) -> Tx[LimitExceeded | None]:
    """Check and count each charge in one conditional upsert: the row lock (or SQLite's write lock) makes
    it atomic. A first charge that alone passes its limit inserts nothing (totals are never negative, so
    it would pass with any earlier spend too); a later one updates only while within the limit. When one
    would pass its limit, the charges counted before it are uncounted in the same transaction (cheaper
    than a savepoint on every payment, a round trip each on PostgreSQL), so a refusal counts nothing."""
    if any(is_rolling(c.period) for c in charges):
        # A rolling window is a sum over bucket rows, which no one row lock covers: the agent's row is
        # locked first (PostgreSQL; SQLite's write lock covers it already), so one agent's reservations of
        # rolling windows run one at a time, and each sums the buckets its predecessors committed.
        yield execute("UPDATE agents SET revoked_at = revoked_at WHERE id=?", (agent_id,))
    for i, c in enumerate(charges):
        if is_rolling(c.period):
            total = yield from _window_total(agent_id, c.limit, c.period)
            if _over(c, total):
                yield from _uncount(agent_id, charges[:i])
                return LimitExceeded(c, total)
            yield from _count(agent_id, c)
            continue
        row = yield one(
            "INSERT INTO spend (agent_id, limit_name, period, currency, amount, count) "
            "SELECT ?, ?, ?, ?, CAST(? AS BIGINT), 1 "
            "WHERE (CAST(? AS BIGINT) IS NULL OR CAST(? AS BIGINT) <= CAST(? AS BIGINT)) "
            "AND (CAST(? AS BIGINT) IS NULL OR 1 <= CAST(? AS BIGINT)) "
            "ON CONFLICT (agent_id, limit_name, period) DO UPDATE SET amount = spend.amount + excluded.amount, "
            "count = spend.count + 1 WHERE (CAST(? AS BIGINT) IS NULL OR spend.amount + excluded.amount <= ?) "
            "AND (CAST(? AS BIGINT) IS NULL OR spend.count + 1 <= ?) RETURNING amount",
            (
                agent_id,
                c.limit,
                c.period,
                c.currency,
                c.amount,
                c.max_amount,
                c.amount,
                c.max_amount,
                c.max_count,
                c.max_count,
                c.max_amount,
                c.max_amount,
                c.max_count,
                c.max_count,
            ),
        )
        if row is None:
            total = yield one(
                "SELECT amount, count FROM spend WHERE agent_id=? AND limit_name=? AND period=?",
                (agent_id, c.limit, c.period),
            )
            yield from _uncount(agent_id, charges[:i])
            return LimitExceeded(c, SpendTotal(*total) if total else SpendTotal())
    return None


# fix -> (the states it applies to, the state it leaves, what it does to the spend)
_FIXES = {
    SETTLE_FIX: ((IN_DOUBT, FORWARDING), SETTLED, "kept"),
    RELEASE_FIX: ((IN_DOUBT, FORWARDING), FAILED, "released"),
    COUNT_FIX: ((FAILED, VOIDED), SETTLED, "counted"),
    VOID_FIX: ((SETTLED,), VOIDED, "released"),
}


def reconcile_tx(
    auth_id: str,
    fix: str,
    actor: str,
    data: Mapping[str, Any],
    now: float,
    provider_ref: str | None,
    status: int | None,
    body: bytes | None,
) -> Tx[bool]:
    """One fix reconciliation proved, as one conditional transition: a call still forwarding is taken
    only past its lease (as the resolution job claims it: a live call is its sidecar's to settle)."""
    states, state, spend = _FIXES[fix]
    condition = " OR ".join(
        "(state=? AND lease_expires_at<=?)" if s == FORWARDING else "state=?" for s in states
    )
    args: list[Any] = [x for s in states for x in ((s, now) if s == FORWARDING else (s,))]
    row = yield one(
        "UPDATE authorizations SET state=?, lease_expires_at=NULL, updated_at=?, "
        "provider_ref=COALESCE(?, provider_ref), response_status=COALESCE(?, response_status), "
        f"response_body=COALESCE(?, response_body) WHERE id=? AND ({condition}) "
        "RETURNING owner_id, agent_id, charges",
        (state, now, provider_ref, status, body, auth_id, *args),
    )
    if row is None:
        return False  # another replica, the resolution job or the call itself came first
    owner, agent, charges = row[0], row[1], _charges(row[2])
    if spend == "released":
        yield from _release(agent, charges)
    elif spend == "counted":
        yield counted(agent, charges)
        for c in charges:  # no limit check: the provider moved this money
            yield from _count(agent, c)
    details = {**data, "fix": fix, "state": state, "spend": spend}
    yield from _event(owner, agent, auth_id, "authorization.reconciled", actor, details, now)
    return True


def _end(auth_id: str, expected: str, state: str, now: float, **columns: Any) -> Tx[tuple[str, str] | None]:
    """Move an authorization from ``expected`` to ``state`` (setting ``columns`` too) and release the spend
    it reserved, only if it is still ``expected``: of writers racing on one row (the provider's late answer
    and a sweep, two webhooks about one object) exactly one changes it and releases. Returns the (owner,
    agent) it ended, or None when another writer came first."""
    also = "".join(f", {column}=?" for column in columns)
    row = yield one(
        f"UPDATE authorizations SET state=?, lease_expires_at=NULL, updated_at=?{also} WHERE id=? AND state=? "
        "RETURNING owner_id, agent_id, charges",
        (state, now, *columns.values(), auth_id, expected),
    )
    if row is None:
        return None
    owner, agent, charges = row
    yield from _release(agent, _charges(charges))
    return owner, agent


def _shrink(owner_id: str, provider_ref: str, holds: int, now: float) -> Tx[None]:
    """The provider's object ``provider_ref`` now moves only ``holds`` (a partial capture): under each
    limit, what its settled authorizations counted beyond that is given back, from the latest call back
    (the payments stay counted). Runs in the transaction that settled the call that shrank it, once."""
    rows = yield many(
        "SELECT id, agent_id, charges FROM authorizations WHERE owner_id=? AND provider_ref=? AND state=? "
        "ORDER BY created_at DESC, id DESC",
        (owner_id, provider_ref, SETTLED),
    )
    parsed = [(auth_id, agent_id, _charges(text)) for auth_id, agent_id, text in rows]
    excess: dict[tuple[str, str], int] = {}
    for _, _, charges in parsed:
        for c in charges:
            excess[(c.limit, c.period)] = excess.get((c.limit, c.period), -holds) + c.amount
    for auth_id, agent_id, charges in parsed:
        kept, given = [], []
        for c in charges:
            cut = min(c.amount, max(excess[(c.limit, c.period)], 0))
            excess[(c.limit, c.period)] -= cut
            kept.append(replace(c, amount=c.amount - cut))
            if cut:
                given.append(replace(c, amount=cut))
        if not given:
            continue
        (
            yield execute(
                "UPDATE authorizations SET charges=?, updated_at=? WHERE id=?",
                (json.dumps([_charge_json(c) for c in kept]), now, auth_id),
            )
        )
        yield released(agent_id, given, counts=False)
        for c in given:
            (
                yield execute(
                    "UPDATE spend SET amount = amount - ? WHERE agent_id=? AND limit_name=? AND period=?",
                    (c.amount, agent_id, c.limit, c.period),
                )
            )
        data = {
            "provider_ref": provider_ref,
            "holds": holds,
            "released": [_charge_json(c) for c in given],
            "why": "the provider moves less than was counted (a partial capture)",
        }
        yield from _event(owner_id, agent_id, auth_id, "authorization.reduced", "provider", data, now)


def _count(agent_id: str, c: Charge) -> Tx[None]:
    """Count a charge in its period's row (a rolling window's bucket), without a check."""
    (
        yield execute(
            "INSERT INTO spend (agent_id, limit_name, period, currency, amount, count) "
            "VALUES (?,?,?,?,?,1) ON CONFLICT (agent_id, limit_name, period) DO UPDATE SET "
            "amount = spend.amount + excluded.amount, count = spend.count + 1",
            (agent_id, c.limit, c.period, c.currency, c.amount),
        )
    )


def _window_total(agent_id: str, limit: str, period: str) -> Tx[SpendTotal]:
    """A rolling window's total at ``period`` (the bucket of now): the sum of at most BUCKETS + 1 rows, a
    range of the primary key, whatever the history."""
    bounds = rolling_range(period)
    if bounds is None:
        raise ValueError(f"{period!r} is not a rolling window's period")
    prefix, first, last = bounds
    row = yield one(
        "SELECT COALESCE(SUM(amount), 0), COALESCE(SUM(count), 0) FROM spend WHERE agent_id=? "
        "AND limit_name=? AND period>=? AND period<=? AND period LIKE ?",
        (agent_id, limit, first, last, prefix + "%"),
    )
    return SpendTotal(int(row[0]), int(row[1]))


def _over(c: Charge, total: SpendTotal) -> bool:
    over_amount = c.max_amount is not None and total.amount + c.amount > c.max_amount
    return over_amount or (c.max_count is not None and total.count + 1 > c.max_count)


def _release(agent_id: str, charges: Sequence[Charge]) -> Tx[None]:
    yield released(agent_id, charges)  # for a store that mirrors spend elsewhere (Redis), after commit
    yield from _uncount(agent_id, charges)


def _uncount(agent_id: str, charges: Sequence[Charge]) -> Tx[None]:
    for c in charges:
        (
            yield execute(
                "UPDATE spend SET amount = amount - ?, count = count - 1 WHERE agent_id=? AND limit_name=? "
                "AND period=?",
                (c.amount, agent_id, c.limit, c.period),
            )
        )


def _vote(
    owner_id: str,
    approval_id: str,
    voter: str,
    approve: bool,
    reason: str,
    via: str,
    now: float,
    authenticated: Mapping[str, str] | None = None,
) -> Tx[VoteResult]:
    row = yield one("SELECT * FROM approvals WHERE id=? AND owner_id=?", (approval_id, owner_id))
    if row is None:
        raise ApprovalNotFound(approval_id)
    approval = yield from _approval(row)
    if approval.state != PENDING:
        raise ApprovalClosed(approval_id, approval.state)
    if approval.expires_at <= now:  # the sweep expires it and releases its spend
        raise ApprovalExpired(approval_id)
    if not may_vote(approval.approvers, voter):
        raise NotAnApprover(approval_id, voter, approval.approvers)
    vote = "approve" if approve else "deny"
    counted = yield execute(
        "INSERT INTO votes VALUES (?,?,?,?,?,?) ON CONFLICT DO NOTHING",
        (approval_id, voter, vote, reason, via, now),
    )
    if not counted:
        return VoteResult(approval, counted=False)  # each approver votes once; the first vote stands
    auth = approval.authorization
    agent_id = auth.agent_id if auth else None
    yield from _event(
        owner_id,
        agent_id,
        approval.authorization_id,
        "approval.vote",
        voter,
        {
            "approval_id": approval_id,
            "vote": vote,
            "reason": reason,
            "via": via,
            "authenticated": dict(authenticated or {}),
        },
        now,
    )
    votes = yield many("SELECT voter, vote FROM votes WHERE approval_id=? ORDER BY at", (approval_id,))
    outcome = tally(approval.approvers, approval.quorum, approval.veto, votes)
    if outcome == APPROVED_HOLD:
        deciders = ",".join(v for v, choice in votes if choice == "approve")
        approved = yield execute(
            "UPDATE approvals SET state=?, decided_by=?, reason=?, decided_at=? WHERE id=? AND state=?",
            (APPROVED_HOLD, deciders, reason, now, approval_id, PENDING),
        )
        if not approved:  # closed meanwhile (denied, or expired by a sweep): this vote does not count
            yield from _closed_meanwhile(approval_id)
        (
            yield execute(
                "UPDATE authorizations SET state=?, updated_at=? WHERE id=? AND state=?",
                (APPROVED, now, approval.authorization_id, HELD),
            )
        )
        yield from _event(
            owner_id,
            agent_id,
            approval.authorization_id,
            "approval.approved",
            deciders,
            {"approval_id": approval_id, "votes": [list(v) for v in votes]},
            now,
        )
    elif outcome == DENIED_HOLD:
        denied = yield from _deny_hold(owner_id, approval_id, voter, reason, now)
        if not denied:
            yield from _closed_meanwhile(approval_id)
    row = yield one("SELECT * FROM approvals WHERE id=?", (approval_id,))
    return VoteResult((yield from _approval(row)), counted=True)


def _deny_hold(owner_id: str, approval_id: str, voter: str, reason: str, now: float) -> Tx[bool]:
    """Deny a hold still pending and release what it reserved; False when it was closed already (of a
    vote and a sweep racing, one closes it and releases)."""
    closed = yield one(
        "UPDATE approvals SET state=?, decided_by=?, reason=?, decided_at=? WHERE id=? AND state=? "
        "RETURNING authorization_id",
        (DENIED_HOLD, voter, reason, now, approval_id, PENDING),
    )
    if closed is not None:
        yield from _end_hold(owner_id, approval_id, closed[0], DENIED_HOLD, REJECTED, voter, reason, now)
    return closed is not None


def _end_hold(
    owner_id: str,
    approval_id: str,
    auth_id: str,
    approval_state: str,
    auth_state: str,
    actor: str,
    reason: str,
    now: float,
) -> Tx[None]:
    """The authorization of a hold just closed (denied or expired): ended, its spend released."""
    ended = yield from _end(auth_id, HELD, auth_state, now)
    yield from _event(
        owner_id,
        ended[1] if ended else None,
        auth_id,
        f"approval.{approval_state}",
        actor,
        {"approval_id": approval_id, "reason": reason, "released": ended is not None},
        now,
    )


def _closed_meanwhile(approval_id: str) -> Tx[None]:
    """Refuse a vote on a hold closed while it was being counted (the transaction rolls back)."""
    state = (yield one("SELECT state FROM approvals WHERE id=?", (approval_id,)))[0]
    raise ApprovalClosed(approval_id, state)


# -- row helpers ----------------------------------------------------------------------------------------
def _host(url: str) -> str:
    """Only the host of a webhook URL is recorded: URLs often carry a secret in their path."""
    return urlsplit(url).hostname or ""


def _event(
    owner_id: str,
    agent_id: str | None,
    auth_id: str | None,
    kind: str,
    actor: str,
    data: dict[str, Any],
    now: float,
) -> Tx[None]:
    (
        yield execute(
            "INSERT INTO events (owner_id, agent_id, authorization_id, type, actor, data, at) "
            "VALUES (?,?,?,?,?,?,?)",
            (owner_id, agent_id, auth_id, kind, actor, json.dumps(data), now),
        )
    )


def _settle_ref(
    owner_id: str, provider_ref: str, outcome: str, actor: str, data: dict[str, Any], now: float
) -> Tx[str]:
    """What the provider says of its object ``provider_ref``: ``void`` releases the spend of the settled
    authorizations that created or changed it (state voided); otherwise it is recorded. Returns voided,
    recorded or unmatched."""
    rows = yield many(
        "SELECT id, agent_id, state, operation FROM authorizations WHERE owner_id=? AND provider_ref=? "
        "ORDER BY created_at, id",
        (owner_id, provider_ref),
    )
    if not rows:
        return "unmatched"
    result = "recorded"
    # Once PaySentry has seen the object captured, its money moved: a cancellation said of it (an event,
    # an answer) releases nothing (what a partial capture gave back was released when it settled).
    captured = any(state == SETTLED and operation.endswith(".capture") for _, _, state, operation in rows)
    for auth_id, agent_id, state, _ in rows:
        kind, details = "recorded", dict(data)
        if captured:
            details["released"] = False
            details["why"] = "the object was captured: its money moved"
        elif outcome == "void" and state == SETTLED and (yield from _end(auth_id, SETTLED, VOIDED, now)):
            kind = result = "voided"
            details["released"] = True
        yield from _event(owner_id, agent_id, auth_id, f"authorization.{kind}", actor, details, now)
    return result


def _authorization_event(auth_id: str, kind: str, actor: str, data: dict[str, Any], now: float) -> Tx[None]:
    (
        yield execute(
            "INSERT INTO events (owner_id, agent_id, authorization_id, type, actor, data, at) "
            "SELECT owner_id, agent_id, id, ?, ?, ?, ? FROM authorizations WHERE id=?",
            (kind, actor, json.dumps(data), now, auth_id),
        )
    )


def _charge_json(c: Charge) -> dict[str, Any]:
    return {
        "limit": c.limit,
        "period": c.period,
        "currency": c.currency,
        "amount": c.amount,
        "max_amount": c.max_amount,
        "max_count": c.max_count,
        "message": c.message,
    }


def _charges(text: str) -> list[Charge]:
    return [Charge(**c) for c in json.loads(text)]


def _connection(row: Sequence[Any]) -> ConnectionRecord:
    return ConnectionRecord(
        row[0],
        row[1],
        row[2],
        row[3],
        row[4],
        row[5],
        row[6],
        row[7],
        allowed_accounts=tuple(json.loads(row[8])),
        settings=json.loads(row[9]),
    )


def _agent(row: Sequence[Any]) -> AgentRecord:
    return AgentRecord(row[0], row[1], row[2], row[3], json.loads(row[4]), row[5], row[6], row[7])


def authorization_record(row: Sequence[Any]) -> AuthorizationRecord:
    values = list(row)
    values[10] = json.loads(values[10])
    values[17] = _charges(values[17])
    return AuthorizationRecord(*values)


def _revoked_filter(owner_id: str, page: Page) -> tuple[list[str], list[Any]]:
    """Agents and approvers: ``state`` is ``active`` (not revoked) or ``revoked``."""
    where = ["owner_id=?"]
    if page.state is not None:
        where.append("revoked_at IS NULL" if page.state == "active" else "revoked_at IS NOT NULL")
    return where, [owner_id]


def _keyset(
    table: str, columns: str, owner_id: str, where: list[str], args: list[Any], page: Page
) -> Tx[tuple[list[Sequence[Any]], bool]]:
    """One page of ``table`` newest first by (created_at, id), after ``where``'s filters, the created
    range and the cursor, and whether more lie beyond it in the direction read. The rows come back newest
    first either way. A cursor that is none of the owner's objects raises ``UnknownCursor``."""
    where, args = list(where), list(args)
    if page.created_gte is not None:
        where.append("created_at>=?")
        args.append(page.created_gte)
    if page.created_lt is not None:
        where.append("created_at<?")
        args.append(page.created_lt)
    cursor, newer = page.ending_before or page.starting_after, page.ending_before is not None
    if cursor is not None:
        row = yield one(f"SELECT created_at, id FROM {table} WHERE id=? AND owner_id=?", (cursor, owner_id))  # noqa: S608 - fixed names
        if row is None:
            raise UnknownCursor(cursor, "ending_before" if newer else "starting_after")
        op = ">" if newer else "<"
        where.append(f"(created_at {op} ? OR (created_at = ? AND id {op} ?))")
        args += [row[0], row[0], row[1]]
    order = "ASC" if newer else "DESC"
    rows = yield many(
        f"SELECT {columns} FROM {table} WHERE {' AND '.join(where)} "  # noqa: S608 - fixed names
        f"ORDER BY created_at {order}, id {order} LIMIT ?",
        (*args, page.limit + 1),
    )
    found = list(rows[: page.limit])
    return (found[::-1] if newer else found), len(rows) > page.limit


def _approval(row: Sequence[Any]) -> Tx[ApprovalRecord]:
    auth = yield one(f"SELECT {AUTH_COLUMNS} FROM authorizations WHERE id=?", (row[2],))
    votes = yield many(
        "SELECT voter, vote, reason, via, at FROM votes WHERE approval_id=? ORDER BY at", (row[0],)
    )
    reviewers = tuple(Reviewer(**r) for r in json.loads(row[12]))
    return ApprovalRecord(
        row[0],
        row[1],
        row[2],
        row[3],
        row[4],
        row[5],
        row[6],
        row[7],
        row[8],
        approvers=tuple(json.loads(row[9])),
        quorum=row[10],
        veto=bool(row[11]),
        reviewers=reviewers,
        votes=tuple(Vote(*v) for v in votes),
        authorization=authorization_record(auth) if auth else None,
    )
