"""Redis beside PostgreSQL, for fleets that need more than one row lock per agent window gives.

**Spend gate.** Checking and reserving an agent's spend runs as one Lua script in Redis (atomic on the
server, one round trip, no PostgreSQL row lock held while replicas queue). PostgreSQL stays the record:
the authorization and its spend row are written in the same transaction as before, counted without a
second check. How the two stay consistent:

* Redis admits a reservation first and remembers it as *pending* (a sorted set, by deadline). The
  PostgreSQL commit then removes it from pending. If the transaction fails, the reservation is released
  in Redis at once.
* A sidecar killed between the two leaves a pending entry: the sweep on any replica finds it past its
  deadline, sees that PostgreSQL never recorded that authorization, and releases it in Redis. Removing
  it from pending and releasing it are one script, so of several replicas sweeping, one releases it.
* Releases (a refusal, a failure, an expired hold, a voided payment) are committed in
  PostgreSQL and then applied to Redis; each follows a state transition PostgreSQL made once. So is
  counting again (reconciliation found money the provider moved after PaySentry released it).
* A window missing from Redis (first use, expiry, or Redis lost its data) is rebuilt from PostgreSQL's
  spend row before the script runs again. If Redis loses its data while reservations are in flight, the
  ones not yet committed in PostgreSQL at that instant are missed once: run Redis with persistence
  (appendonly) where that matters. When Redis is unreachable, payments fail closed.

**Rate limits**: one token bucket per agent shared by every replica (a Lua script). **Approvals**: a vote
on any replica is published so that an agent waiting on another replica is woken at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from proxy.errors import StoreUnavailable
from proxy.model import Charge, SpendTotal
from proxy.secrets import new_id
from proxy.store import DENIED, AuthorizationRecord, DuplicateKey, LimitExceeded, NewAuthorization, Recorded
from proxy.store.postgres import PostgresStore
from proxy.store.sql import AUTH_COLUMNS, Release, authorization_record, record_decision_tx
from proxy.windows import AHEAD, BUCKETS, bucket_of, is_rolling, rolling_range

log = logging.getLogger("paysentry.redis")
PENDING_KEY, PENDING_DATA = "paysentry:pending", "paysentry:pending:charges"
PENDING_SECONDS = 60.0  # longer than any PostgreSQL transaction may take (store_timeout bounds them)
WINDOW_TTL = 40 * 86400  # a window's counter outlives the longest window (a month), then is rebuilt

# A calendar window is one hash (fields amount, count); a rolling window one hash per (agent, limit) whose
# fields a:<bucket>, c:<bucket> are its buckets' amounts and counts, summed here over the window's
# BUCKETS + 1 buckets and AHEAD more (proxy.windows), in the same script that checks and counts: atomic on the server.
# Buckets more than two windows old are deleted as the window moves (field p: the oldest kept).
RESERVE = """
local n = tonumber(ARGV[3])
for i = 1, n do
  if redis.call('EXISTS', KEYS[i]) == 0 then return {'miss', i} end
end
local ahead = AHEAD_BUCKETS
local function arg(i, k) return tonumber(ARGV[3 + 5*(i-1) + k]) end
local function buckets(prefix, first, last)
  local names = {}
  for j = first, last do names[#names + 1] = prefix .. j end
  return names
end
for i = 1, n do
  local amount, max_amount, max_count, idx, back = arg(i, 1), arg(i, 2), arg(i, 3), arg(i, 4), arg(i, 5)
  local a, c = 0, 0
  if idx < 0 then
    local cur = redis.call('HMGET', KEYS[i], 'amount', 'count')
    a, c = tonumber(cur[1]) or 0, tonumber(cur[2]) or 0
  else
    local first = math.max(idx - back, 0)
    local av = redis.call('HMGET', KEYS[i], unpack(buckets('a:', first, idx + ahead)))
    local cv = redis.call('HMGET', KEYS[i], unpack(buckets('c:', first, idx + ahead)))
    for k = 1, #av do a = a + (tonumber(av[k]) or 0); c = c + (tonumber(cv[k]) or 0) end
  end
  if (max_amount >= 0 and a + amount > max_amount) or (max_count >= 0 and c + 1 > max_count) then
    return {'exceeded', i, a, c}
  end
end
for i = 1, n do
  local amount, idx, back = arg(i, 1), arg(i, 4), arg(i, 5)
  if idx < 0 then
    redis.call('HINCRBY', KEYS[i], 'amount', amount)
    redis.call('HINCRBY', KEYS[i], 'count', 1)
  else
    redis.call('HINCRBY', KEYS[i], 'a:' .. idx, amount)
    redis.call('HINCRBY', KEYS[i], 'c:' .. idx, 1)
    local cut = idx - 2 * back
    local kept = tonumber(redis.call('HGET', KEYS[i], 'p')) or cut
    if kept < cut then
      local last = math.min(cut - 1, kept + 3 * back)
      redis.call('HDEL', KEYS[i], unpack(buckets('a:', kept, last)))
      redis.call('HDEL', KEYS[i], unpack(buckets('c:', kept, last)))
    end
    if kept <= cut then redis.call('HSET', KEYS[i], 'p', cut) end
  end
end
redis.call('ZADD', KEYS[n + 1], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[n + 2], ARGV[1], ARGV[4 + 5*n])
return {'ok'}
""".replace("AHEAD_BUCKETS", str(AHEAD))
RELEASE = """
local n = tonumber(ARGV[2])
if ARGV[1] ~= '' then
  if redis.call('ZREM', KEYS[n + 1], ARGV[1]) == 0 then return 0 end
  redis.call('HDEL', KEYS[n + 2], ARGV[1])
end
for i = 1, n do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('HINCRBY', KEYS[i], ARGV[3*i + 1], 0 - tonumber(ARGV[3*i]))
    redis.call('HINCRBY', KEYS[i], ARGV[3*i + 2], 0 - tonumber(ARGV[3 + 3*n]))
  end
end
return 1
"""
COUNT = """
local n = tonumber(ARGV[1])
for i = 1, n do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('HINCRBY', KEYS[i], ARGV[3*i], tonumber(ARGV[3*i - 1]))
    redis.call('HINCRBY', KEYS[i], ARGV[3*i + 1], 1)
  end
end
return 1
"""
TOKEN_BUCKET = """
local rate, burst, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local allowed = 0
if tokens >= 1 then tokens = tokens - 1; allowed = 1 end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'at', now)
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return allowed
"""


def window_key(agent_id: str, limit: str, period: str) -> str:
    """The hash holding a window: a calendar period's own, or a rolling window's (all its buckets)."""
    window = bucket_of(period)[0] if is_rolling(period) else period
    return f"paysentry:spend:{agent_id}:{limit}:{window}"


def fields(period: str) -> tuple[str, str]:
    """The (amount, count) fields of ``period`` in its window's hash."""
    if not is_rolling(period):
        return "amount", "count"
    index = bucket_of(period)[1]
    return f"a:{index}", f"c:{index}"


def _charge_args(c: Charge) -> list[Any]:
    """A charge for RELEASE and COUNT: its amount and its fields."""
    return [c.amount, *fields(c.period)]


def _bucket_args(period: str) -> tuple[int, int]:
    """(bucket index, buckets back) of a rolling period for RESERVE; (-1, 0) for a calendar one."""
    if not is_rolling(period):
        return -1, 0
    return bucket_of(period)[1], BUCKETS


def connect(url: str, timeout: float) -> aioredis.Redis:
    return aioredis.from_url(
        url, socket_timeout=timeout, socket_connect_timeout=timeout, retry_on_timeout=False
    )


class PostgresRedisStore(PostgresStore):
    """PostgreSQL as the record, Redis as the spend gate. The ``spend`` table is not used: a window's total
    is the sum of the charges of the authorizations that still hold spend, which is how a counter missing
    from Redis is rebuilt, and Redis holds the running totals the rules and the gate read."""

    def __init__(self, url: str, redis_url: str, timeout: float = 5.0, **options: Any) -> None:
        super().__init__(url, timeout=timeout, **options)
        self.redis = connect(redis_url, timeout)
        self._reserve = self.redis.register_script(RESERVE)
        self._unreleased: list[Release] = []  # committed releases Redis did not take yet
        self._release = self.redis.register_script(RELEASE)
        self._count = self.redis.register_script(COUNT)

    async def close(self) -> None:
        await super().close()
        await self.redis.aclose()

    async def ping(self) -> None:
        await super().ping()
        await self._redis(self.redis.ping())

    async def _redis(self, call: Any) -> Any:
        try:
            return await call
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"Redis failed: {type(exc).__name__}: {exc}") from exc

    # -- the gate ---------------------------------------------------------------------------------------------
    async def record_decision(
        self, new: NewAuthorization, now: float, retry_of: str | None = None
    ) -> Recorded:
        if new.decision == DENIED or not new.charges:
            return await self.write(record_decision_tx(new, now, retry_of, gated=True))
        # Every decision reserves under a name of its own, which the row that records it lists in the
        # same transaction (a same-key retry re-decides an existing row and adds its own): the sweep
        # knows a reservation recorded only if its row lists it.
        row = retry_of or new.id
        reservation = new.id if retry_of is None else new_id("rsv")
        exceeded = await self.gate(reservation, new.agent_id, new.charges, row)
        try:
            return await self.write(
                record_decision_tx(new, now, retry_of, gated=True, exceeded=exceeded, reservation=reservation)
            )
        except DuplicateKey:
            if exceeded is None:  # certainly not recorded (rolled back): give the reservation back at once
                await asyncio.shield(self.release(new.agent_id, new.charges, reservation))
            raise
        # Any other failure may have come after the commit (an acknowledgement lost): the reservation stays
        # pending, and the sweep releases it only if its row does not list it.

    async def gate(
        self, reservation: str, agent_id: str, charges: Sequence[Charge], row: str
    ) -> LimitExceeded | None:
        """Check and reserve every charge at once in Redis; the refusal names the first limit exceeded. The
        reservation stays *pending* until the sweep sees it recorded in PostgreSQL (or releases it)."""
        keys = [window_key(agent_id, c.limit, c.period) for c in charges] + [PENDING_KEY, PENDING_DATA]
        args: list[Any] = [reservation, time.time() + PENDING_SECONDS, len(charges)]
        for c in charges:
            args += [
                c.amount,
                -1 if c.max_amount is None else c.max_amount,
                -1 if c.max_count is None else c.max_count,
                *_bucket_args(c.period),
            ]
        args.append(
            json.dumps(
                {"agent": agent_id, "row": row, "charges": [[c.limit, c.period, c.amount] for c in charges]}
            )
        )
        for _ in range(3):
            answer = await self._redis(self._reserve(keys=keys, args=args))
            kind = answer[0].decode() if isinstance(answer[0], bytes) else answer[0]
            if kind == "ok":
                return None
            charge = charges[int(answer[1]) - 1]
            if kind == "exceeded":
                return LimitExceeded(charge, SpendTotal(int(answer[2]), int(answer[3])))
            await self._load_window(agent_id, charge.limit, charge.period)
        raise StoreUnavailable("Redis keeps losing the spend counters; refusing to guess")

    async def _load_window(self, agent_id: str, limit: str, period: str) -> SpendTotal:
        """Rebuild a window's counter from PostgreSQL: the charges of the authorizations holding spend (a
        rolling window: those of its buckets, each in its field)."""
        bounds = rolling_range(period)
        if bounds is None:
            where, args = "AND c->>'period'=? ", [period]
        else:
            where, args = (
                "AND c->>'period'>=? AND c->>'period'<=? AND c->>'period' LIKE ? ",
                [
                    bounds[1],
                    bounds[2],
                    bounds[0] + "%",
                ],
            )
        rows = await self.fetch_all(
            HELD_SPEND + " AND a.agent_id=? AND c->>'limit'=? " + where + GROUPED, (agent_id, limit, *args)
        )
        key = window_key(agent_id, limit, period)
        async with self.redis.pipeline(transaction=True) as pipe:
            # redis-py types a pipeline's commands as Awaitable; they return the pipeline, for chaining.
            if bounds is None:
                amount, count = (int(rows[0][4]), int(rows[0][5])) if rows else (0, 0)
                pipe.hsetnx(key, "amount", amount).hsetnx(key, "count", count)  # type: ignore[attr-defined]
            else:
                pipe.hsetnx(key, "loaded", 1)
                for row in rows:
                    amount_field, count_field = fields(row[1])
                    pipe.hsetnx(key, amount_field, int(row[4])).hsetnx(key, count_field, int(row[5]))  # type: ignore[attr-defined]
            pipe.expire(key, WINDOW_TTL)
            pipe.hmget(key, *_read_fields(period))
            *_, current = await self._redis(pipe.execute())
        return _total(current)

    async def release(
        self, agent_id: str, charges: Sequence[Charge], reservation: str = "", counts: bool = True
    ) -> bool:
        """Give back charges in Redis (their amounts, and one payment each when ``counts``). A
        ``reservation`` still pending is released once, whoever asks (the sidecar whose transaction
        failed, any replica's sweep); False when it was not pending any more. Without one: spend a
        committed PostgreSQL transaction released (it changed state only once)."""
        keys = [window_key(agent_id, c.limit, c.period) for c in charges] + [PENDING_KEY, PENDING_DATA]
        args = [reservation, len(charges), *(x for c in charges for x in _charge_args(c)), 1 if counts else 0]
        return bool(await self._redis(self._release(keys=keys, args=args)))

    async def after_release(self, notes: list[Release]) -> None:
        """Give back in Redis what a committed transaction released. Redis failing now does not undo the
        commit: the releases are kept and given back by the sweep once Redis answers (until then, and
        for good if this process stops first, Redis counts too much, never too little)."""
        self._unreleased.extend(notes)
        await self.retry_releases()

    async def retry_releases(self) -> None:
        while self._unreleased:
            note = self._unreleased.pop(0)  # taken before the await: never given back twice
            try:
                await self.release(note[0], note[1], counts=note[2])
            except StoreUnavailable as exc:
                self._unreleased.insert(0, note)
                log.error("a release is not yet given back in Redis (retried by the sweep): %s", exc.message)
                return

    async def before_count(self, notes: list[Release]) -> None:
        """The symmetric of a release, in the opposite order: charges PostgreSQL is about to count again
        (its authorization holds them once it commits) are added to the windows Redis holds first, so a
        commit that fails leaves Redis counting too much, never too little; a window Redis lacks is
        rebuilt from PostgreSQL."""
        for agent_id, charges, _ in notes:
            keys = [window_key(agent_id, c.limit, c.period) for c in charges]
            args = [len(charges), *(x for c in charges for x in _charge_args(c))]
            await self._redis(self._count(keys=keys, args=args))

    async def prune_spend(self, keys: Sequence[tuple[str, str]]) -> int:
        """Nothing to delete: the ``spend`` table is not used, and the Lua script drops a rolling window's
        stale buckets as it counts."""
        return 0

    # -- reads of spend: Redis for the running totals, PostgreSQL's authorizations for reports -----------------
    async def lookup(
        self, agent_id: str, idempotency_key: str, spend_keys: Sequence[tuple[str, str]]
    ) -> tuple[AuthorizationRecord | None, dict[str, SpendTotal]]:
        row = await self.fetch_one(
            f"SELECT {AUTH_COLUMNS} FROM authorizations WHERE agent_id=? AND idempotency_key=?",
            (agent_id, idempotency_key),
        )
        totals: dict[str, SpendTotal] = {}
        if spend_keys:
            async with self.redis.pipeline(transaction=False) as pipe:
                for limit, period in spend_keys:
                    pipe.hmget(window_key(agent_id, limit, period), *_read_fields(period))
                answers = await self._redis(pipe.execute())
            for (limit, period), answer in zip(spend_keys, answers, strict=True):
                if answer[0] is None:  # not in Redis (a rolling window's first field says it was loaded)
                    totals[limit] = await self._load_window(agent_id, limit, period)
                else:
                    totals[limit] = _total(answer)
        return (authorization_record(row) if row else None), totals

    async def spend_of(self, owner_id: str, agent_id: str) -> list[dict[str, Any]]:
        rows = await self.fetch_all(
            HELD_SPEND + " AND a.owner_id=? AND a.agent_id=? " + GROUPED + " ORDER BY 2, 1",
            (owner_id, agent_id),
        )
        return [
            {"limit": r[0], "period": r[1], "currency": r[2], "amount": int(r[4]), "count": int(r[5])}
            for r in rows
        ]

    async def current_spend(
        self, keys: Sequence[tuple[str, str]], limit: int
    ) -> list[tuple[str, str, str, str, int, int]]:
        if not keys:
            return []
        conditions, values = [], []
        for name, period in keys:  # a rolling window: every bucket of it
            bounds = rolling_range(period)
            if bounds is None:
                conditions.append("(c->>'limit'=? AND c->>'period'=?)")
                values += [name, period]
            else:
                conditions.append(
                    "(c->>'limit'=? AND c->>'period'>=? AND c->>'period'<=? AND c->>'period' LIKE ?)"
                )
                values += [name, bounds[1], bounds[2], bounds[0] + "%"]
        sql = f"{HELD_SPEND} AND a.created_at > ? AND ({' OR '.join(conditions)}) {GROUPED}"
        args = [time.time() - 32 * 86400, *values]
        rows = await self.fetch_all(
            "SELECT s.agent_id, g.name, s.limit_name, s.currency, SUM(s.amount), SUM(s.count) FROM "
            f"({sql}) s JOIN agents g ON g.id = s.agent_id WHERE g.revoked_at IS NULL "
            "GROUP BY 1, 2, 3, 4 ORDER BY 5 DESC LIMIT ?",
            [*args, limit],
        )
        return [tuple(r) for r in rows]

    # -- reconciliation -------------------------------------------------------------------------------------
    async def release_unrecorded(self, now: float) -> int:
        """Settle pending Redis reservations past their deadline: forget those PostgreSQL recorded, release
        those it never did (their sidecar died in between). First, give back the committed releases Redis
        failed to take."""
        await self.retry_releases()
        stale = [
            raw.decode() for raw in await self._redis(self.redis.zrangebyscore(PENDING_KEY, "-inf", now))
        ]
        if not stale:
            return 0
        pending = {
            reservation: json.loads(data) if data is not None else None
            for reservation, data in zip(
                stale, await self._redis(self.redis.hmget(PENDING_DATA, stale)), strict=True
            )
        }
        rows = [data.get("row", reservation) for reservation, data in pending.items() if data is not None]
        marks = ",".join("?" for _ in rows)
        found = (
            await self.fetch_all(f"SELECT id, reservation FROM authorizations WHERE id IN ({marks})", rows)
            if rows
            else []
        )
        # recorded: the row lists this reservation among those its decisions committed (before version 4
        # of the schema, a reservation was named after its row, and the row alone tells)
        recorded = {name for row_id, names in found for name in (names or row_id).split(",")}
        released = 0
        for reservation, data in pending.items():
            if reservation in recorded or data is None:
                async with self.redis.pipeline(transaction=True) as pipe:
                    pipe.zrem(PENDING_KEY, reservation).hdel(PENDING_DATA, reservation)  # type: ignore[attr-defined]
                    await self._redis(pipe.execute())
                continue
            charges = [
                Charge(limit, period, "", amount, None, None) for limit, period, amount in data["charges"]
            ]
            if not await self.release(data["agent"], charges, reservation):
                continue  # another replica's sweep released it first
            log.warning(
                "released a Redis reservation never recorded in PostgreSQL",
                extra={"fields": {"reservation": reservation, "agent": data["agent"]}},
            )
            released += 1
        return released


def _read_fields(period: str) -> list[str]:
    """What to read of a window to know its total: a rolling window's marker, then its buckets' amounts,
    then their counts."""
    bounds = rolling_range(period)
    if bounds is None:
        return ["amount", "count"]
    first, last = bucket_of(bounds[1])[1], bucket_of(bounds[2])[1]
    span = range(first, last + 1)
    return ["loaded", *(f"a:{j}" for j in span), *(f"c:{j}" for j in span)]


def _total(answer: Sequence[Any]) -> SpendTotal:
    """A window's total from the values of ``_read_fields``."""
    if len(answer) == 2:
        return SpendTotal(int(answer[0] or 0), int(answer[1] or 0))
    half = (len(answer) - 1) // 2
    amounts, counts = answer[1 : 1 + half], answer[1 + half :]
    return SpendTotal(sum(int(v or 0) for v in amounts), sum(int(v or 0) for v in counts))


# Spend held by authorizations (the record the Redis counters are rebuilt from), one row per window:
# limit, period, currency, agent, amount, count.
HELD_SPEND = (
    "SELECT c->>'limit' AS limit_name, c->>'period' AS period, c->>'currency' AS currency, "
    "a.agent_id AS agent_id, SUM((c->>'amount')::bigint) AS amount, COUNT(*) AS count "
    "FROM authorizations a CROSS JOIN LATERAL jsonb_array_elements(a.charges::jsonb) c "
    "WHERE a.state IN ('held', 'approved', 'forwarding', 'in_doubt', 'settled')"
)
GROUPED = "GROUP BY 1, 2, 3, 4"


class RedisRateLimiter:
    """A token bucket per agent shared by every replica."""

    def __init__(self, url: str, rate: float, burst: float, timeout: float = 5.0) -> None:
        self.rate, self.burst = rate, max(burst, 1.0)
        self.redis = connect(url, timeout)
        self._bucket = self.redis.register_script(TOKEN_BUCKET)

    async def allow(self, key: str) -> bool:
        if self.rate <= 0:
            return True
        try:
            return bool(
                await self._bucket(keys=[f"paysentry:rate:{key}"], args=[self.rate, self.burst, time.time()])
            )
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"Redis failed: {type(exc).__name__}") from exc

    async def close(self) -> None:
        await self.redis.aclose()


class ApprovalBus:
    """Votes published to every replica, so a waiting agent is woken wherever its call landed."""

    CHANNEL = "paysentry:approvals"

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self.redis = connect(url, timeout)
        self._task: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()  # set once this replica listens (tests wait on it)

    def start(self, on_decided: Callable[[str], None]) -> None:
        self._task = asyncio.create_task(self._listen(on_decided))

    async def publish(self, approval_id: str) -> None:
        with contextlib.suppress(RedisError, OSError, TimeoutError):  # waiters still poll the store
            await self.redis.publish(self.CHANNEL, approval_id)

    async def _listen(self, on_decided: Callable[[str], None]) -> None:
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(self.CHANNEL)
                    self.subscribed.set()
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            on_decided(message["data"].decode())
            except asyncio.CancelledError:
                raise
            except Exception:  # Redis away: waiters fall back to polling; try again shortly
                await asyncio.sleep(1.0)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.redis.aclose()
