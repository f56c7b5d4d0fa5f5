"""Spend windows on every store (SQLite, PostgreSQL, PostgreSQL + Redis): rolling and hourly windows at
their edges, calendar windows across DST changes, concurrent reservations across a rolling window's
buckets, and what releases, partial captures, reconciliation and a Redis rebuild do to a rolling window."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
import redis

from proxy.model import Charge, SpendTotal
from proxy.store import COUNT_FIX, Store
from proxy.windows import period_of, rolling_window
from tests.conftest import Backend
from tests.integration.test_store_conformance import new, seeded

HOUR = rolling_window(3600)
T0 = datetime(2026, 11, 22, 10, 0, 30, tzinfo=UTC)  # 30 s into the minute bucket of 10:00


def charge(window: str, at: datetime, *, count: int | None = None, amount: int | None = None) -> Charge:
    return Charge("lim", period_of(window, at, "America/New_York"), "usd", 1000, amount, count)


async def pay(store: Store, key: str, c: Charge) -> str:
    return (await store.record_decision(new(key, charges=(c,)), T0.timestamp())).record.state


async def total(store: Store, window: str, at: datetime) -> SpendTotal:
    _, totals = await store.lookup("agt_1", "-", [("lim", period_of(window, at, "America/New_York"))])
    return totals["lim"]


async def test_a_rolling_hour_counts_a_payment_for_an_hour_and_at_most_one_bucket_more(
    backend: Backend,
) -> None:
    store = await seeded(backend)
    for i in range(5):
        assert await pay(store, f"r{i}", charge(HOUR, T0 + timedelta(seconds=i), count=5)) == "forwarding"
    later = T0 + timedelta(minutes=59, seconds=29)  # 10:59:59
    assert await pay(store, "r5", charge(HOUR, later, count=5)) == "denied"
    assert await total(store, HOUR, later) == SpendTotal(5000, 5)
    edge = T0 + timedelta(minutes=60, seconds=29)  # 11:00:59: an hour and 29 s later, the bucket still in
    assert await pay(store, "r6", charge(HOUR, edge, count=5)) == "denied"
    out = T0 + timedelta(minutes=60, seconds=30)  # 11:01:00: the bucket of 10:00 has left the window
    assert await total(store, HOUR, out) == SpendTotal()
    assert await pay(store, "r7", charge(HOUR, out, count=5)) == "forwarding"
    await store.close()


async def test_a_rolling_window_sums_every_bucket_of_the_window(backend: Backend) -> None:
    store = await seeded(backend)
    day = rolling_window(86400)  # 24-minute buckets
    for i in range(4):  # one payment every 6 hours
        at = T0 + timedelta(hours=6 * i)
        assert await pay(store, f"d{i}", charge(day, at, amount=4000)) == "forwarding"
    assert await total(store, day, T0 + timedelta(hours=18)) == SpendTotal(4000, 4)
    assert await pay(store, "d4", charge(day, T0 + timedelta(hours=23), amount=4000)) == "denied"
    gauge = await store.current_spend([("lim", period_of(day, T0 + timedelta(hours=23), "UTC"))], 10)
    assert [row[2:] for row in gauge] == [("lim", "usd", 4000, 4)]  # the metrics gauge sums the window too
    # 24 h and one bucket after the first payment, only the first has left the window
    assert (
        await pay(store, "d5", charge(day, T0 + timedelta(hours=24, minutes=24), amount=4000)) == "forwarding"
    )
    await store.close()


async def test_concurrent_reservations_across_two_buckets_stop_exactly_at_the_limit(backend: Backend) -> None:
    """Half the racers in the bucket of 10:00, half in 10:01: no row lock is common to them but the
    agent's, and the window's total must still never pass its limit."""
    store = await seeded(backend)
    racers = [charge(HOUR, T0 + timedelta(seconds=30 * (i % 2)), count=10) for i in range(40)]
    results = await asyncio.gather(
        *(store.record_decision(new(f"c{i}", charges=(c,)), T0.timestamp()) for i, c in enumerate(racers))
    )
    states = [r.record.state for r in results]
    assert states.count("forwarding") == 10 and states.count("denied") == 30
    assert await total(store, HOUR, T0 + timedelta(minutes=1)) == SpendTotal(10000, 10)
    await store.close()


async def test_a_release_a_partial_capture_and_a_recount_hit_the_bucket_the_charge_was_counted_in(
    backend: Backend,
) -> None:
    store = await seeded(backend)
    now = T0.timestamp()
    first = charge(HOUR, T0, amount=2500)
    await store.record_decision(new("a", charges=(first,)), now)
    await store.settle("auth_a", "pi_1", 200, b"{}", now)
    later = charge(HOUR, T0 + timedelta(minutes=30), amount=2500)  # another bucket
    await store.record_decision(new("b", charges=(later,)), now)
    assert await total(store, HOUR, T0 + timedelta(minutes=30)) == SpendTotal(2000, 2)
    await store.fail("auth_b", "declined", 402, b"{}", now)  # released from the bucket of 10:30
    assert await total(store, HOUR, T0 + timedelta(minutes=30)) == SpendTotal(1000, 1)
    await store.record_decision(new("cap", operation="payment_intent.capture", charges=()), now)
    await store.settle("auth_cap", "pi_1", 200, b"{}", now, holds=400)  # gives 600 back to 10:00
    assert await total(store, HOUR, T0 + timedelta(minutes=30)) == SpendTotal(400, 1)
    assert await store.reconcile("auth_b", COUNT_FIX, "reconcile", {}, now)  # the money moved after all
    assert await total(store, HOUR, T0 + timedelta(minutes=30)) == SpendTotal(1400, 2)
    if backend.redis_url:  # Redis loses its counters: the window is rebuilt from PostgreSQL's charges
        client = redis.Redis.from_url(backend.redis_url)
        client.flushall()
        client.close()
        assert await total(store, HOUR, T0 + timedelta(minutes=30)) == SpendTotal(1400, 2)
        assert await pay(store, "c", charge(HOUR, T0 + timedelta(minutes=31), amount=2399)) == "denied"
        assert await pay(store, "d", charge(HOUR, T0 + timedelta(minutes=31), amount=2400)) == "forwarding"
    await store.close()


async def test_an_hour_window_ends_on_the_hour_and_the_repeated_dst_hour_is_two_hours(
    backend: Backend,
) -> None:
    store = await seeded(backend)
    before = datetime(2026, 11, 22, 15, 59, 59, tzinfo=UTC)
    assert await pay(store, "h1", charge("hour", before, count=1)) == "forwarding"
    assert await pay(store, "h2", charge("hour", before - timedelta(minutes=59), count=1)) == "denied"
    assert await pay(store, "h3", charge("hour", before + timedelta(seconds=1), count=1)) == "forwarding"
    # New York, 1 Nov 2026: 01:00-02:00 happens twice (EDT, then EST); each is its own hour
    first, second = datetime(2026, 11, 1, 5, 30, tzinfo=UTC), datetime(2026, 11, 1, 6, 30, tzinfo=UTC)
    assert period_of("hour", first, "America/New_York") != period_of("hour", second, "America/New_York")
    assert await pay(store, "h4", charge("hour", first, count=1)) == "forwarding"
    assert await pay(store, "h5", charge("hour", second, count=1)) == "forwarding"
    await store.close()


async def test_a_day_is_the_local_date_across_dst_changes(backend: Backend) -> None:
    store = await seeded(backend)

    def berlin(at: datetime) -> Charge:
        return Charge("lim", period_of("day", at, "Europe/Berlin"), "usd", 1000, None, 1)

    # Berlin, 29 Mar 2026 is 23 hours long: from 23:00Z on the 28th to 22:00Z on the 29th
    assert await pay(store, "b1", berlin(datetime(2026, 3, 28, 22, 59, 59, tzinfo=UTC))) == "forwarding"
    assert await pay(store, "b2", berlin(datetime(2026, 3, 28, 23, 0, tzinfo=UTC))) == "forwarding"
    assert await pay(store, "b3", berlin(datetime(2026, 3, 29, 21, 59, 59, tzinfo=UTC))) == "denied"
    assert await pay(store, "b4", berlin(datetime(2026, 3, 29, 22, 0, tzinfo=UTC))) == "forwarding"
    # New York, 1 Nov 2026 is 25 hours long: 04:00Z to 05:00Z the next day
    ny = [datetime(2026, 11, 1, 4, 0, tzinfo=UTC), datetime(2026, 11, 2, 4, 59, 59, tzinfo=UTC)]
    assert await pay(store, "n1", charge("day", ny[0], count=1)) == "forwarding"
    assert await pay(store, "n2", charge("day", ny[1], count=1)) == "denied"
    assert await pay(store, "n3", charge("day", ny[1] + timedelta(seconds=1), count=1)) == "forwarding"
    await store.close()


async def test_all_time_never_resets(backend: Backend) -> None:
    store = await seeded(backend)
    assert await pay(store, "a1", charge("all_time", T0, count=1)) == "forwarding"
    assert await pay(store, "a2", charge("all_time", T0 + timedelta(days=3650), count=1)) == "denied"
    await store.close()


async def test_buckets_no_check_sums_any_more_are_pruned_and_the_windows_are_unchanged(
    backend: Backend,
) -> None:
    store = await seeded(backend)
    daily = Charge("daily", period_of("day", T0, "UTC"), "usd", 1000, None, None)
    assert await pay_all(store, "old", charge(HOUR, T0), daily) == "forwarding"
    assert await pay(store, "recent", charge(HOUR, T0 + timedelta(minutes=61))) == "forwarding"
    now = T0 + timedelta(hours=2, minutes=1)  # 121 buckets after the first: two windows and one back
    before = await total(store, HOUR, now)
    deleted = await store.prune_spend([("lim", period_of(HOUR, now, "UTC"))])
    assert deleted == (0 if backend.redis_url else 1)  # with Redis the spend table is not used
    assert await total(store, HOUR, now) == before == SpendTotal(1000, 1)  # the recent one, still in
    assert await store.prune_spend([("lim", period_of(HOUR, now, "UTC"))]) == 0
    # the same limit name with a 6-minute window: its range never reaches the hour's buckets
    six = rolling_window(360)
    assert await store.prune_spend([("lim", period_of(six, now + timedelta(hours=1), "UTC"))]) == 0
    assert await total(store, HOUR, now) == SpendTotal(1000, 1)
    _, days = await store.lookup("agt_1", "-", [("daily", daily.period)])
    assert days["daily"] == SpendTotal(1000, 1)  # a calendar period is history: never pruned
    await store.close()


async def pay_all(store: Store, key: str, *charges: Charge) -> str:
    return (await store.record_decision(new(key, charges=charges), T0.timestamp())).record.state


async def test_pruning_goes_on_batch_after_batch(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("proxy.store.sql.PRUNE_BATCH", 2)
    store = await seeded(backend)
    for i in range(5):
        assert await pay(store, f"b{i}", charge(HOUR, T0 + timedelta(minutes=i))) == "forwarding"
    now = T0 + timedelta(hours=3)
    deleted = await store.prune_spend([("lim", period_of(HOUR, now, "UTC"))])
    assert deleted == (0 if backend.redis_url else 5)
    await store.close()
