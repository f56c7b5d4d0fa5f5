"""PostgreSQL (asyncpg): the system of record shared by a fleet of sidecars.

The operations are ``proxy.store.sql``'s transaction bodies, driven over a pooled asyncpg connection inside
one READ COMMITTED transaction each. Reserving spend is a conditional ``UPDATE ... RETURNING`` on the spend
row: the row lock serializes concurrent reservations of one agent's window across every replica, and the
``WHERE`` is re-checked against the committed total, so a limit is never exceeded.

The schema is versioned (``schema/postgres/NNN_*.sql``) and applied by ``paysentry db migrate``; a sidecar
refuses to start on a database whose schema is older (not migrated) or newer than it knows. Every call has a
bounded time (``store_timeout`` to get a connection and for each statement); past it, or with the server
down, the call fails closed with ``StoreUnavailable`` and the pool reconnects by itself when it is back.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, cast

import asyncpg

from proxy.errors import StoreUnavailable
from proxy.store import FORWARDING, SETTLED
from proxy.store.sql import (
    COUNTED,
    MANY,
    NOTES,
    ONE,
    RELEASED,
    Note,
    Release,
    SqlStore,
    T,
    Tx,
    execute,
    single,
)

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schema" / "postgres"
MIGRATION_LOCK = 0x5053_4D49  # advisory lock id: one migrator at a time
_PLACEHOLDER = re.compile(r"\?")
_numbered: dict[str, str] = {}
# Settle in one statement: the update and its audit event in a data-modifying CTE, atomic on its own.
SETTLE = (
    "WITH settled AS (UPDATE authorizations SET state=?, provider_ref=?, response_status=?, response_body=?, "
    "lease_expires_at=NULL, updated_at=? WHERE id=? AND state=? RETURNING owner_id, agent_id, id) "
    "INSERT INTO events (owner_id, agent_id, authorization_id, type, actor, data, at) "
    "SELECT owner_id, agent_id, id, 'authorization.settled', 'provider', ?, ? FROM settled"
)


def schema_migrations() -> list[tuple[int, str]]:
    return [(int(f.name.split("_", 1)[0]), f.read_text()) for f in sorted(SCHEMA_DIR.glob("*.sql"))]


def numbered(sql: str) -> str:
    """``?`` placeholders as PostgreSQL's ``$1, $2, ...`` (PaySentry's SQL has no ``?`` in literals)."""
    converted = _numbered.get(sql)
    if converted is None:
        counter = iter(range(1, 10_000))
        converted = _numbered[sql] = _PLACEHOLDER.sub(lambda _: f"${next(counter)}", sql)
    return converted


class PostgresStore(SqlStore):
    def __init__(self, url: str, timeout: float = 5.0, min_size: int = 2, max_size: int = 20) -> None:
        self.url, self.timeout = url, timeout
        self._min, self._max = min_size, max_size
        self._pool: asyncpg.Pool | None = None

    # -- plumbing -------------------------------------------------------------------------------------
    async def open(self, migrate: bool = False) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=self._min,
                max_size=self._max,
                timeout=self.timeout,
                command_timeout=self.timeout,
                max_inactive_connection_lifetime=60,
            )
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            raise StoreUnavailable(f"PostgreSQL could not be reached: {_describe(exc)}") from exc
        try:
            if migrate:
                await self.migrate()
            await self._check_schema()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def migrate(self) -> int:
        """Apply the migrations this PaySentry knows and the database lacks; returns the version."""
        async with self._connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION)"
            )
            current: int = await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version")
            self._refuse_newer(current)
            for version, sql in schema_migrations():
                if version > current:
                    await conn.execute(sql)
                    await conn.execute(
                        "INSERT INTO schema_version VALUES ($1, extract(epoch FROM now()))", version
                    )
                    current = version
            return current

    async def _check_schema(self) -> None:
        async with self._connection() as conn:
            exists = await conn.fetchval("SELECT to_regclass('schema_version') IS NOT NULL")
            current = (
                await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version") if exists else 0
            )
        self._refuse_newer(current)
        known = max(v for v, _ in schema_migrations())
        if current < known:
            raise StoreUnavailable(
                f"the PostgreSQL schema is at version {current}, this PaySentry needs {known}: "
                "run `paysentry db migrate`"
            )

    def _refuse_newer(self, current: int) -> None:
        known = max(v for v, _ in schema_migrations())
        if current > known:
            raise StoreUnavailable(
                f"the PostgreSQL schema is at version {current}, newer than this PaySentry knows ({known}); "
                "upgrade PaySentry"
            )

    def _connection(self) -> Any:
        if self._pool is None:
            raise StoreUnavailable("the store is not open")
        return self._pool.acquire(timeout=self.timeout)

    async def write(self, body: Tx[T]) -> T:
        """Run ``body`` in one transaction. Spend it counts again is mirrored before the commit, spend it
        releases after it (``before_count``, ``after_release``): a mirror that fails in between counts
        too much, never too little."""
        notes: list[Note] = []
        try:
            async with self._connection() as conn, conn.transaction():
                result = await _drive(conn, body, notes)
                recounted = [(a, charges, counts) for kind, a, charges, counts in notes if kind == COUNTED]
                if recounted:
                    await self.before_count(recounted)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreUnavailable(f"the PostgreSQL store failed: {_describe(exc)}") from exc
        released = [(agent, charges, counts) for kind, agent, charges, counts in notes if kind == RELEASED]
        if released:
            await self.after_release(released)
        return result

    async def after_release(self, notes: list[Release]) -> None:
        """Spend released by a committed transaction: (agent id, charges, counts). PostgreSQL alone:
        nothing to do."""

    async def before_count(self, notes: list[Release]) -> None:
        """Spend a transaction about to commit counts again (reconciliation: the provider moved it)."""

    async def settle(
        self,
        authorization_id: str,
        provider_ref: str | None,
        status: int,
        body: bytes | None,
        now: float,
        holds: int | None = None,
    ) -> None:
        """The shared body's effect in one round trip instead of four (BEGIN, UPDATE, INSERT, COMMIT): a
        payment's last step, paid on every allowed payment. A call that shrank its object (``holds``)
        takes the shared body."""
        if holds is not None:
            return await super().settle(authorization_id, provider_ref, status, body, now, holds)
        data = json.dumps({"status": status, "provider_ref": provider_ref})
        args = (SETTLED, provider_ref, status, body, now, authorization_id, FORWARDING, data, now)
        await self.read(single(execute(SETTLE, args)))  # one statement: atomic without BEGIN

    async def read(self, body: Tx[T]) -> T:
        """Run a body outside a transaction: reads, or a single statement (atomic by itself)."""
        try:
            async with self._connection() as conn:
                return await _drive(conn, body)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreUnavailable(f"the PostgreSQL store failed: {_describe(exc)}") from exc


async def _drive(conn: asyncpg.Connection, body: Tx[T], notes: list[Note] | None = None) -> T:
    try:
        query = next(body)
        while True:
            if query.kind in NOTES:
                if notes is not None:
                    notes.append((query.kind, *query.args))
                query = body.send(None)
                continue
            sql = numbered(query.sql)
            if query.kind == ONE:
                result: Any = await conn.fetchrow(sql, *query.args)
            elif query.kind == MANY:
                result = await conn.fetch(sql, *query.args)
            else:
                status = await conn.execute(sql, *query.args)
                result = int(status.rsplit(" ", 1)[-1]) if status[-1:].isdigit() else 0
            query = body.send(result)
    except StopIteration as done:
        return cast(T, done.value)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
