"""Store throughput: the store's part of each allowed payment (idempotency lookup, decide-and-reserve,
settle) on SQLite, PostgreSQL and PostgreSQL + Redis, for one hot agent and for many agents.

    python -m bench.store [--payments N] [--concurrency C] [--agents A]

PostgreSQL and Redis are started from the Debian packages on loopback ports in a temporary folder (as the
tests do). Each payment reserves against two limits (a day and a month window) that it never exceeds.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from proxy.bootstrap import open_store
from proxy.model import Charge
from proxy.store import AgentRecord, ConnectionRecord, NewAuthorization, OwnerRecord, Store
from tests.servers import Postgres, Redis, free_port

LIMITS = (("daily_budget", "day:2026-11-22", 10**15), ("monthly_budget", "month:2026-11", 10**15))


def authorization(i: int, agent: str) -> NewAuthorization:
    return NewAuthorization(
        id=f"auth_{i:012d}",
        owner_id="own_1",
        agent_id=agent,
        idempotency_key=f"key-{i}",
        request_hash="h",
        provider="mock",
        operation="payment_intent",
        amount=1000,
        currency="usd",
        destination="",
        payment={"amount": 1000, "currency": "usd"},
        decision="allow",
        rule="default",
        policy="bench",
        message="",
        revision="r",
        charges=tuple(Charge(name, period, "usd", 1000, cap, None) for name, period, cap in LIMITS),
        lease_expires_at=time.time() + 600,
    )


async def seed(store: Store, agents: int) -> list[str]:
    await store.create_owner(OwnerRecord("own_1", "bench", "x", 1.0))
    await store.add_connection(ConnectionRecord("conn_1", "own_1", "mock", "default", "http://x", b"s", 1.0))
    ids = [f"agt_{i:08d}" for i in range(agents)]
    for agent_id in ids:
        await store.create_agent(AgentRecord(agent_id, "own_1", "conn_1", agent_id, {}, "x", 1.0))
    return ids


async def run(store: Store, agents: list[str], payments: int, concurrency: int) -> tuple[float, float, float]:
    latencies: list[float] = []
    counter = iter(range(payments))

    async def worker() -> None:
        for i in counter:
            agent = agents[i % len(agents)]
            started = time.perf_counter()
            await store.lookup(agent, f"key-{i}", [(name, period) for name, period, _ in LIMITS])
            recorded = await store.record_decision(authorization(i, agent), time.time())
            await store.settle(recorded.record.id, f"pi_{i}", 200, b"{}", time.time())
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return payments / elapsed, statistics.median(latencies) * 1e3, latencies[int(len(latencies) * 0.99)] * 1e3


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--payments", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--agents", type=int, default=1000)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="paysentry-bench-"))
    root.chmod(0o755)
    postgres = Postgres(root / "pg", free_port()).start()
    redis = Redis(root / "redis", free_port()).start()
    databases = iter(range(100))
    print(
        f"store work per allowed payment (lookup + reserve + settle), {args.payments} payments, "
        f"concurrency {args.concurrency}"
    )
    print(f"{'store':<16}{'agents':>8}{'payments/s':>12}{'p50 ms':>9}{'p99 ms':>9}")
    try:
        for name in ("sqlite", "postgres", "postgres+redis"):
            for agents in (1, args.agents):
                if name == "sqlite":
                    url, redis_url = f"sqlite:///{root / f'bench-{agents}.db'}", ""
                else:
                    url = postgres.create_database(f"bench{next(databases)}")
                    redis_url = redis.url if name == "postgres+redis" else ""
                    if redis_url:
                        import redis as redis_client

                        redis_client.Redis(host="127.0.0.1", port=redis.port).flushall()
                store = open_store(url, redis_url=redis_url)
                await store.open(migrate=True)
                ids = await seed(store, agents)
                rate, p50, p99 = await run(store, ids, args.payments, args.concurrency)
                await store.close()
                print(f"{name:<16}{agents:>8}{rate:>12.0f}{p50:>9.2f}{p99:>9.2f}", flush=True)
    finally:
        redis.stop()
        postgres.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
