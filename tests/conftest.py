"""Shared fixtures: real PostgreSQL and Redis servers, started once per test session on loopback."""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from proxy.bootstrap import open_store
from proxy.store import Store
from tests.servers import Postgres, Redis, free_port

_databases = itertools.count(1)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Postgres]:
    # Not under pytest's tmp folder: that is private to root, and PostgreSQL runs as its own user there.
    root = Path(tempfile.mkdtemp(prefix="paysentry-pg-"))
    root.chmod(0o755)
    server = Postgres(root / "pg", free_port()).start()
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Redis]:
    server = Redis(tmp_path_factory.mktemp("redis"), free_port()).start()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server: Postgres) -> str:
    """A fresh, empty database on the session's server."""
    return postgres_server.create_database(f"t{next(_databases)}")


@dataclass(frozen=True)
class Backend:
    """A store configuration: the store URL and, for PostgreSQL, optionally Redis."""

    url: str
    redis_url: str = ""

    def store(self) -> Store:
        return open_store(self.url, redis_url=self.redis_url)


@pytest.fixture(params=["sqlite", "postgres", "postgres+redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """The same store tests run against every store."""
    if request.param == "sqlite":
        return Backend(f"sqlite:///{tmp_path / 'ps.db'}")
    url = request.getfixturevalue("postgres_url")
    if request.param == "postgres":
        return Backend(url)
    server: Redis = request.getfixturevalue("redis_server")
    client = redis.Redis(host="127.0.0.1", port=server.port)
    client.flushall()
    client.close()
    return Backend(url, server.url)
