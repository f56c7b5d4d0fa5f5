"""The Redis spend gate beside PostgreSQL: reconciliation after a crash between Redis and PostgreSQL, a
Redis that lost its data, a Redis that is down, shared rate limits, and cross-replica approval wake-ups."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis

from proxy.errors import StoreUnavailable
from proxy.store.redis_spend import PENDING_KEY, ApprovalBus, PostgresRedisStore, RedisRateLimiter, window_key
from tests.conftest import Backend
from tests.integration.test_store_conformance import LIMIT, new, seeded, spent
from tests.servers import Redis


@pytest.fixture
def fleet_backend(postgres_url: str, redis_server: Redis) -> Backend:
    client = redis.Redis(host="127.0.0.1", port=redis_server.port)
    client.flushall()
    client.close()
    return Backend(postgres_url, redis_server.url)


def counter(server: Redis) -> tuple[int, int]:
    client = redis.Redis(host="127.0.0.1", port=server.port)
    try:
        values = client.hmget(window_key("agt_1", LIMIT.limit, LIMIT.period), "amount", "count")
        return int(values[0] or 0), int(values[1] or 0)
    finally:
        client.close()


async def test_a_reservation_never_recorded_in_postgres_is_released_by_reconciliation(
    fleet_backend: Backend, redis_server: Redis
) -> None:
    store = await seeded(fleet_backend)
    assert isinstance(store, PostgresRedisStore)
    # A sidecar reserved in Redis and died before its PostgreSQL transaction.
    assert await store.gate("auth_lost", "agt_1", [LIMIT], "auth_lost") is None
    await store.record_decision(new("kept", lease_expires_at=time.time() + 600), time.time())
    assert counter(redis_server) == (2000, 2) and await spent(store) == (1000, 1)
    assert await store.release_unrecorded(time.time()) == 0  # not past its deadline: it may still commit
    assert await store.release_unrecorded(time.time() + 120) == 1  # the sweep, later
    assert counter(redis_server) == (1000, 1) and await spent(store) == (1000, 1)
    assert await store.redis.zcard(PENDING_KEY) == 0  # the committed one left pending at commit
    await store.close()


async def test_a_same_key_retry_lost_before_postgres_is_released_though_its_row_exists(
    fleet_backend: Backend, redis_server: Redis
) -> None:
    """A same-key retry decides an existing row again (its first send never reached the provider): a
    sidecar that dies between Redis and PostgreSQL leaves a reservation whose row exists, from the
    earlier decision. It is still released, since the row does not carry that reservation; a retry that
    committed is kept."""
    store = await seeded(fleet_backend)
    assert isinstance(store, PostgresRedisStore)
    now = time.time()
    await store.record_decision(new("retried"), now)
    await store.fail("auth_retried", "the provider could not be reached", None, None, now)
    assert counter(redis_server) == (0, 0)
    assert await store.gate("rsv_lost", "agt_1", [LIMIT], "auth_retried") is None  # then the crash
    assert counter(redis_server) == (1000, 1)
    retried = await store.record_decision(new("retried", id="auth_again"), now, retry_of="auth_retried")
    assert retried.record.id == "auth_retried" and counter(redis_server) == (2000, 2)
    assert await store.release_unrecorded(time.time() + 120) == 1  # the lost one only
    assert counter(redis_server) == (1000, 1) and await spent(store) == (1000, 1)
    assert await store.redis.zcard(PENDING_KEY) == 0
    await store.close()


async def test_two_replicas_reconciling_at_once_release_a_lost_reservation_once(
    fleet_backend: Backend, redis_server: Redis
) -> None:
    first = await seeded(fleet_backend)
    second = fleet_backend.store()
    await second.open()
    assert isinstance(first, PostgresRedisStore) and isinstance(second, PostgresRedisStore)
    for i in range(5):  # reserved in Redis by sidecars that died before their PostgreSQL transaction
        assert await first.gate(f"auth_lost{i}", "agt_1", [LIMIT], f"auth_lost{i}") is None
    assert counter(redis_server) == (5000, 5)
    later = time.time() + 120
    assert sum(await asyncio.gather(first.release_unrecorded(later), second.release_unrecorded(later))) == 5
    assert counter(redis_server) == (0, 0)  # each released once, by one replica or the other
    await second.release("agt_1", [LIMIT], "auth_lost0")  # a replica late by a whole round trip
    assert counter(redis_server) == (0, 0)
    await first.close()
    await second.close()


async def test_a_redis_that_lost_its_data_is_rebuilt_from_postgres(
    fleet_backend: Backend, redis_server: Redis
) -> None:
    store = await seeded(fleet_backend)
    for i in range(7):
        await store.record_decision(new(f"a{i}"), time.time())
    await store.redis.flushall()  # Redis restarted without persistence
    results = [await store.record_decision(new(f"b{i}"), time.time()) for i in range(5)]
    assert [r.record.state for r in results].count("forwarding") == 3  # 7 + 3 = the limit of 10
    assert counter(redis_server) == (10000, 10) and await spent(store) == (10000, 10)
    await store.close()


async def test_releases_reach_redis_after_the_commit(fleet_backend: Backend, redis_server: Redis) -> None:
    store = await seeded(fleet_backend)
    auth = (await store.record_decision(new("r"), time.time())).record
    await store.fail(auth.id, "declined", 402, b"{}", time.time())
    assert counter(redis_server) == (0, 0) and await spent(store) == (0, 0)
    await store.close()


async def test_payments_fail_closed_when_redis_is_down(postgres_url: str) -> None:
    from tests.servers import free_port

    store = PostgresRedisStore(postgres_url, f"redis://127.0.0.1:{free_port()}/0", timeout=1.0)
    await store.open(migrate=True)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="Redis"):
        await store.gate("auth_x", "agt_1", [LIMIT], "auth_x")
    assert time.monotonic() - started < 5
    with pytest.raises(StoreUnavailable):
        await store.ping()  # readiness says so too
    await store.close()


async def test_rate_limits_are_shared_by_replicas(redis_server: Redis) -> None:
    replicas = [RedisRateLimiter(redis_server.url, rate=1, burst=5) for _ in range(3)]
    key = f"agt_rate_{time.time_ns()}"
    allowed = [await replicas[i % 3].allow(key) for i in range(9)]
    assert allowed.count(True) == 5  # one bucket, whichever replica the calls land on
    for r in replicas:
        await r.close()


async def test_a_vote_on_one_replica_wakes_the_waiter_on_another(redis_server: Redis) -> None:
    woken: asyncio.Queue[str] = asyncio.Queue()
    here, there = ApprovalBus(redis_server.url), ApprovalBus(redis_server.url)
    there.start(woken.put_nowait)
    await asyncio.wait_for(there.subscribed.wait(), timeout=5)
    await here.publish("apr_1")
    assert await asyncio.wait_for(woken.get(), timeout=5) == "apr_1"
    await here.close()
    await there.close()


async def test_a_commit_whose_acknowledgement_is_lost_keeps_its_reservation(
    fleet_backend: Backend, redis_server: Redis
) -> None:
    """PostgreSQL committed the decision but the sidecar never heard so (a timeout on COMMIT, a reset
    connection): Redis keeps the reservation, since the row may live (and be re-sent); the sweep finds the
    row lists it and keeps it counted."""
    store = await seeded(fleet_backend)
    assert isinstance(store, PostgresRedisStore)
    write = store.write

    async def acknowledgement_lost(body: Any) -> Any:
        await write(body)
        raise StoreUnavailable("the PostgreSQL store failed: TimeoutError")

    store.write = acknowledgement_lost  # type: ignore[method-assign]
    with pytest.raises(StoreUnavailable):
        await store.record_decision(new("lost_ack"), time.time())
    store.write = write  # type: ignore[method-assign]
    assert counter(redis_server) == (1000, 1) and await spent(store) == (1000, 1)
    assert await store.release_unrecorded(time.time() + 120) == 0
    assert counter(redis_server) == (1000, 1)
    await store.close()


async def test_a_release_redis_cannot_take_at_once_is_given_back_by_the_sweep(
    fleet_backend: Backend, redis_server: Redis
) -> None:
    """PostgreSQL released a payment's spend and committed; Redis fails just then. The caller is not told
    the store failed (the release is done), and the sweep gives the spend back in Redis once it answers."""
    store = await seeded(fleet_backend)
    assert isinstance(store, PostgresRedisStore)
    now = time.time()
    await store.record_decision(new("refused"), now)
    release = store.release

    async def redis_down(*args: Any, **kwargs: Any) -> bool:
        raise StoreUnavailable("Redis failed: ConnectionError")

    store.release = redis_down  # type: ignore[method-assign]
    await store.fail("auth_refused", "the provider refused (402)", 402, b"{}", now)  # does not raise
    assert counter(redis_server) == (1000, 1) and await spent(store) == (0, 0)  # too much, never too little
    store.release = release  # type: ignore[method-assign]
    await store.release_unrecorded(now)
    assert counter(redis_server) == (0, 0)
    await store.release_unrecorded(now)  # given back once
    assert counter(redis_server) == (0, 0)
    await store.close()
