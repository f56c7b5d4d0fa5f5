"""The embedded store: one SQLite file in WAL mode.

All SQLite work runs on one dedicated thread (never on the event loop), one short transaction per
operation; the operations themselves are ``proxy.store.sql``'s transaction bodies. ``BEGIN IMMEDIATE`` takes the file's write lock up front, so check-and-reserve is atomic across
coroutines of this process and across processes sharing the file.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from proxy.errors import StoreUnavailable
from proxy.store.sql import MANY, ONE, RELEASED, SqlStore, T, Tx

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schema" / "sqlite"


def schema_migrations() -> list[tuple[int, str]]:
    files = sorted(SCHEMA_DIR.glob("*.sql"))
    return [(int(f.name.split("_", 1)[0]), f.read_text()) for f in files]


class SqliteStore(SqlStore):
    def __init__(self, path: str, synchronous: str = "NORMAL", busy_timeout_ms: int = 5000) -> None:
        self.path = path
        self._synchronous = synchronous
        self._busy_timeout_ms = busy_timeout_ms
        self._executor: ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None
        self._local = threading.local()

    # -- plumbing -------------------------------------------------------------------------------------
    async def open(self, migrate: bool = True) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        await self._call(self._open)

    def _open(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute(f"PRAGMA synchronous = {self._synchronous}")
        db.execute("PRAGMA foreign_keys = ON")
        self._db = db
        self._migrate(db)

    async def migrate(self) -> int:
        """The embedded store migrates itself when it opens; this reports the version."""
        row = await self.fetch_one("SELECT MAX(version) FROM schema_version")
        return int(row[0])

    def _migrate(self, db: sqlite3.Connection) -> None:
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at REAL)"
            )
            current = db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0]
            migrations = schema_migrations()
            known = max(v for v, _ in migrations)
            if current > known:
                raise StoreUnavailable(
                    f"the database {self.path} has schema version {current}, newer than this "
                    f"PaySentry knows ({known}); upgrade PaySentry"
                )
            for version, sql in migrations:
                if version > current:
                    for statement in _statements(sql):
                        db.execute(statement)
                    db.execute("INSERT INTO schema_version VALUES (?, strftime('%s','now'))", (version,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        if self._executor is None:
            return
        await self._call(self._close)
        self._executor.shutdown(wait=True)
        self._executor = None

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise StoreUnavailable("the store is not open")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"the SQLite store failed: {exc}") from exc

    def _txn(self, body: Tx[T]) -> T:
        """Run a transaction body in one write transaction (on the store thread)."""
        db = self._db
        assert db is not None, "store not open"
        db.execute("BEGIN IMMEDIATE")
        try:
            result = _drive(db, body)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result

    async def write(self, body: Tx[T]) -> T:
        return await self._call(self._txn, body)

    async def read(self, body: Tx[T]) -> T:
        return await self._call(lambda: _drive(self._db, body))


def _drive(db: sqlite3.Connection | None, body: Tx[T]) -> T:
    """Run a transaction body's queries one after the other, sending each result back into it."""
    assert db is not None, "store not open"
    try:
        query = next(body)
        while True:
            if query.kind == RELEASED:
                query = body.send(None)
                continue
            cursor = db.execute(query.sql, query.args)
            if query.kind == ONE:
                result: Any = cursor.fetchone()
            elif query.kind == MANY:
                result = cursor.fetchall()
            else:
                result = cursor.rowcount
            query = body.send(result)
    except StopIteration as done:
        return done.value


def _statements(sql: str) -> list[str]:
    """Split a migration into statements, keeping trigger bodies (BEGIN ... END;) whole."""
    statements, current = [], []
    for line in sql.splitlines():
        if line.strip().startswith("--") or not line.strip():
            continue
        current.append(line)
        text = "\n".join(current)
        if sqlite3.complete_statement(text):
            statements.append(text)
            current = []
    return statements
