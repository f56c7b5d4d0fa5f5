"""Authenticating agents (and owners) by token, with bcrypt kept off the per-request path.

A token is verified with bcrypt once, then trusted for ``cache_ttl`` seconds from an in-memory cache keyed
by the token's SHA-256 (a revocation made through this process drops the entry at once; other replicas see
it within ``cache_ttl``). Tokens whose public id is unknown are refused without running bcrypt, concurrent
first uses of one token share one bcrypt run, and an id that keeps failing is locked out for a while, as is
a client (remote address) that keeps presenting bad tokens, so a flood of bad tokens cannot exhaust the CPU.
A locked-out client can still use a token this process has already verified.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from proxy.errors import AuthenticationFailed, RateLimited
from proxy.secrets import check_secret, fingerprint, split_token

R = TypeVar("R")


@dataclass(slots=True)
class _Failures:
    count: int
    window_start: float


class TokenAuthenticator(Generic[R]):
    def __init__(
        self,
        prefix: str,
        id_prefix: str,
        find: Callable[[str], Awaitable[R | None]],
        hash_of: Callable[[R], str],
        active: Callable[[R], bool],
        cache_ttl: float = 30.0,
        max_failures: int = 10,
        max_client_failures: int = 30,
        lockout: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._prefix, self._id_prefix = prefix, id_prefix
        self._find, self._hash_of, self._active = find, hash_of, active
        self._ttl, self._lockout = cache_ttl, lockout
        self._max_failures, self._max_client_failures = max_failures, max_client_failures
        self._clock = clock
        self._cache: dict[str, tuple[R, float]] = {}
        self._pending: dict[str, asyncio.Future[R]] = {}
        self._failures: dict[str, _Failures] = {}

    async def authenticate(self, token: str | None, client: str | None = None) -> R:
        if not token:
            raise AuthenticationFailed(
                "no PaySentry token: send it as the API key (Authorization: Bearer ...)"
            )
        key = fingerprint(token)
        hit = self._cache.get(key)
        if hit is not None and hit[1] > self._clock():
            return hit[0]
        pending = self._pending.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        client_key = f"client:{client}" if client else None
        if client_key:
            self._check_lockout(client_key, self._max_client_failures, "from this client")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            record = await self._verify(token)
        except BaseException as exc:
            if client_key and isinstance(exc, AuthenticationFailed):
                self._count_failure(client_key)
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it
            raise
        else:
            future.set_result(record)
            self._cache[key] = (record, self._clock() + self._ttl)
            return record
        finally:
            del self._pending[key]

    async def _verify(self, token: str) -> R:
        parts = split_token(token, self._prefix)
        if parts is None:
            raise AuthenticationFailed(
                f"the API key is not a PaySentry token (expected {self._prefix}_<id>_<secret>)"
            )
        public_id = f"{self._id_prefix}_{parts[0]}"
        self._check_lockout(public_id, self._max_failures, "with this token id")
        record = await self._find(public_id)
        if record is None or not self._active(record):
            raise AuthenticationFailed("unknown or revoked PaySentry token")
        if not await asyncio.to_thread(check_secret, parts[1], self._hash_of(record)):
            self._count_failure(public_id)
            raise AuthenticationFailed("unknown or revoked PaySentry token")
        self._failures.pop(public_id, None)
        return record

    def _check_lockout(self, key: str, limit: int, what: str) -> None:
        failures = self._failures.get(key)
        if failures and failures.count >= limit:
            if self._clock() - failures.window_start < self._lockout:
                raise RateLimited(f"too many failed attempts {what}; try again later")
            del self._failures[key]

    def _count_failure(self, key: str) -> None:
        now = self._clock()
        failures = self._failures.get(key)
        if failures is None or now - failures.window_start >= self._lockout:
            if len(self._failures) >= 100_000:  # bounded memory under a flood from many addresses
                self._failures = {
                    k: f for k, f in self._failures.items() if now - f.window_start < self._lockout
                }
            self._failures[key] = _Failures(1, now)
        else:
            failures.count += 1

    def forget(self, predicate: Callable[[R], bool]) -> None:
        """Drop cached entries (after a revocation made through this process)."""
        for key in [k for k, (record, _) in self._cache.items() if predicate(record)]:
            del self._cache[key]
