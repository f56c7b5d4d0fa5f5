"""Authenticating agents (and owners) by token, with bcrypt kept off the per-request path.

A token is verified with bcrypt once, then trusted for ``cache_ttl`` seconds from an in-memory cache keyed
by the token's SHA-256 (a revocation made through this process drops the entry at once; other replicas see
it within ``cache_ttl``). When the entry expires, a token this process has verified before is checked
again without bcrypt: its record is read again and must still be active with the same stored hash (the
token's SHA-256 is remembered beside the hash it matched). Tokens whose public id is unknown, and malformed
tokens, are refused without running bcrypt; concurrent first uses of one token share one bcrypt run.

Wrong secrets cost no bcrypt. A token PaySentry made (``paysentry state token`` for a declared one) is
stored with a 32-bit quick check of its secret beside the bcrypt hash
(``proxy.secrets.hash_secret``): a wrong secret fails the quick check, is refused at once and is counted
nowhere, so no flood of them costs CPU or locks anybody out, and the correct token always reaches bcrypt.

Lockout, for hashes without a quick check only (secrets a person chose), and why it cannot be aimed
at someone else. Wrong secrets are counted per client address *and* token id together: ``max_failures``
of them within ``lockout`` seconds stop bcrypt checks for that pair (the attempts are refused with a 429),
except one probe a second, which a correct secret passes. So:

- another address presenting wrong secrets for an id never affects this address;
- a token this process has verified once is never refused by a lockout (it needs no bcrypt, so it is
  checked whatever the counters say), so an attacker on the same address (in sidecar mode every agent is
  127.0.0.1) cannot lock an agent out once its cache entry expires;
- unknown ids and malformed tokens cost no bcrypt and are not counted, so no flood of them locks out an
  address (the old per-address lockout did: every not-yet-cached token on 127.0.0.1).

What remains, for such secrets only: a token this process has never verified, sent from an address
that is failing for that very id right now, waits for a probe slot (one a second) until the failures stop.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from proxy.errors import AuthenticationFailed, RateLimited
from proxy.secrets import check_secret, fingerprint, quick_check, split_token

R = TypeVar("R")


@dataclass(slots=True)
class _Failures:
    count: int
    window_start: float
    next_probe: float = 0.0


MAX_REMEMBERED = 100_000  # bounded memory: failure counters and verified tokens


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
        lockout: float = 60.0,
        probe_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._prefix, self._id_prefix = prefix, id_prefix
        self._find, self._hash_of, self._active = find, hash_of, active
        self._ttl, self._lockout, self._probe = cache_ttl, lockout, probe_interval
        self._max_failures = max_failures
        self._clock = clock
        self._cache: dict[str, tuple[R, float]] = {}
        self._verified: OrderedDict[str, tuple[str, str]] = OrderedDict()  # fingerprint -> (id, hash)
        self._pending: dict[str, asyncio.Future[R]] = {}
        self._failures: dict[tuple[str, str], _Failures] = {}

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
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            record = await self._recheck(key) or await self._verify(token, key, client or "")
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it
            raise
        else:
            future.set_result(record)
            self._cache[key] = (record, self._clock() + self._ttl)
            return record
        finally:
            del self._pending[key]

    async def _recheck(self, key: str) -> R | None:
        """A token verified before: its record read again, still active and with the hash it matched."""
        known = self._verified.get(key)
        if known is None:
            return None
        public_id, matched = known
        record = await self._find(public_id)
        if record is None or not self._active(record):
            del self._verified[key]
            raise AuthenticationFailed("unknown or revoked PaySentry token")
        if self._hash_of(record) != matched:  # the token was replaced: the new one is checked afresh
            del self._verified[key]
            return None
        self._verified.move_to_end(key)
        return record

    async def _verify(self, token: str, key: str, client: str) -> R:
        parts = split_token(token, self._prefix) if token.isascii() and token.isprintable() else None
        if parts is None:
            raise AuthenticationFailed(
                f"the API key is not a PaySentry token (expected {self._prefix}_<id>_<secret>)"
            )
        public_id = f"{self._id_prefix}_{parts[0]}"
        pair = (client, public_id)
        record = await self._find(public_id)
        if record is None or not self._active(record):
            raise AuthenticationFailed("unknown or revoked PaySentry token")
        stored = self._hash_of(record)
        quick = quick_check(parts[1], stored)
        if quick is False:  # wrong, known without bcrypt: it costs nothing, so it counts toward nothing
            raise AuthenticationFailed("unknown or revoked PaySentry token")
        if quick is None:  # a hash with no quick check (a secret a person chose): bcrypt each time
            self._check_lockout(pair)
        if not await asyncio.to_thread(check_secret, parts[1], stored):
            self._count_failure(pair)
            raise AuthenticationFailed("unknown or revoked PaySentry token")
        self._failures.pop(pair, None)
        self._verified[key] = (public_id, stored)
        if len(self._verified) > MAX_REMEMBERED:
            self._verified.popitem(last=False)
        return record

    def _check_lockout(self, pair: tuple[str, str]) -> None:
        """Refuse without bcrypt while this address keeps failing for this id, but for one probe a second
        (a correct secret passes it and clears the count)."""
        failures = self._failures.get(pair)
        if failures is None or failures.count < self._max_failures:
            return
        now = self._clock()
        if now - failures.window_start >= self._lockout:
            del self._failures[pair]
        elif now >= failures.next_probe:
            failures.next_probe = now + self._probe
        else:
            raise RateLimited("too many failed attempts with this token id from this client; try again later")

    def _count_failure(self, pair: tuple[str, str]) -> None:
        now = self._clock()
        failures = self._failures.get(pair)
        if failures is None or now - failures.window_start >= self._lockout:
            if len(self._failures) >= MAX_REMEMBERED:  # bounded memory under a flood from many addresses
                self._failures = {
                    k: f for k, f in self._failures.items() if now - f.window_start < self._lockout
                }
            self._failures[pair] = _Failures(1, now)
        else:
            failures.count += 1
            if failures.count == self._max_failures:
                failures.next_probe = now + self._probe

    def forget(self, predicate: Callable[[R], bool]) -> None:
        """Drop cached entries (after a revocation made through this process)."""
        for key in [k for k, (record, _) in self._cache.items() if predicate(record)]:
            del self._cache[key]
            self._verified.pop(key, None)
