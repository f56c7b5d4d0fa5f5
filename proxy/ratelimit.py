"""Per-agent rate limits: a token bucket per agent, in this process (each replica limits on its own).
With Redis configured, ``proxy.store.redis_spend.RedisRateLimiter`` shares one bucket across replicas."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol


class Limiter(Protocol):
    async def allow(self, key: str) -> bool: ...


class RateLimiter:
    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, max(burst, 1.0), clock
        self._buckets: dict[str, tuple[float, float]] = {}

    async def allow(self, key: str) -> bool:
        if self.rate <= 0:
            return True
        now = self.clock()
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - 1, now)
        return True
