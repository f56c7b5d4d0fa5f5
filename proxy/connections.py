"""Provider connections as the pipeline uses them: adapter, upstream and opened credentials, cached.

Credentials are unsealed once per connection and kept in memory for ``ttl`` seconds; they never leave
this object except as the provider's auth header on an upstream request.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from adapters import REGISTRY
from adapters.base import Adapter, Adapters
from proxy.errors import AuthenticationFailed
from proxy.secrets import Sealer, sealed_context
from proxy.store import Store


@dataclass(frozen=True, slots=True)
class Connection:
    id: str
    owner_id: str
    adapter: Adapter
    upstream: str
    credentials: Mapping[str, str] = field(repr=False)
    allowed_accounts: frozenset[str] = frozenset()


class ConnectionCache:
    def __init__(
        self,
        store: Store,
        sealer: Sealer,
        ttl: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        adapters: Adapters = REGISTRY,
    ) -> None:
        self._store, self._sealer, self._ttl, self._clock = store, sealer, ttl, clock
        self._adapters = adapters
        self._cache: dict[str, tuple[Connection, float]] = {}

    async def get(self, connection_id: str) -> Connection:
        hit = self._cache.get(connection_id)
        if hit is not None and hit[1] > self._clock():
            return hit[0]
        record = await self._store.get_connection(connection_id)
        if record is None or record.revoked_at is not None:
            raise AuthenticationFailed(
                "this agent's provider connection is revoked or missing; ask its owner"
            )
        credentials = json.loads(
            self._sealer.open(record.credentials, sealed_context("connection", record.id))
        )
        connection = Connection(
            record.id,
            record.owner_id,
            self._adapters.adapter(record.provider).configured(record.settings),
            record.upstream.rstrip("/"),
            credentials,
            frozenset(record.allowed_accounts),
        )
        self._cache[connection_id] = (connection, self._clock() + self._ttl)
        return connection

    def forget(self, connection_id: str) -> None:
        """Drop a cached connection (after its credentials or settings changed through this process)."""
        self._cache.pop(connection_id, None)
