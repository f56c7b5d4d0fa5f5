"""Does deciding slow down as history and agents pile up? The store's part of one decision (idempotency
lookup with the spend totals the rules read, then decide-and-reserve) on SQLite, measured with 1 thousand
and 1 million recorded decisions (authorizations and their events), and with 10 and 100 thousand agents;
then with a rolling one-hour window (instead of the day and month ones) whose buckets a month of history
has filled: its total is a sum over at most 63 rows, whatever the history.

    python -m bench.growth [--samples N] [--sizes H:A,...] [--windows calendar,rolling]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import statistics
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from bench.store import LIMITS, authorization
from proxy.model import Charge
from proxy.store import NewAuthorization
from proxy.store.sql import AUTH_COLUMNS
from proxy.store.sqlite import SqliteStore
from proxy.windows import period_of, rolling_window

HOURLY = rolling_window(3600)

AUTH_ROW = (  # columns named: the schema grows (a migration adds columns at the end)
    f"INSERT INTO authorizations ({AUTH_COLUMNS}) VALUES (?,?,?,?,'h','mock','payment_intent',1000,'usd','',"
    "'{}','allow','default','p','m','r','settled','[]',NULL,?,200,NULL,NULL,?,?)"
)
EVENT_ROW = (
    "INSERT INTO events (owner_id, agent_id, authorization_id, type, actor, data, at) VALUES (?,?,?,?,?,?,?)"
)


def fill(path: Path, history: int, agents: int, rolling: bool = False) -> list[str]:
    db = sqlite3.connect(path)
    db.execute("PRAGMA synchronous = OFF")
    db.execute("INSERT INTO owners VALUES ('own_1', 'bench', 'x', 1)")
    db.execute(
        "INSERT INTO connections (id, owner_id, provider, name, upstream, credentials, created_at) "
        "VALUES ('conn_1','own_1','mock','default','http://x',x'00',1)"
    )
    ids = [f"agt_{i:08d}" for i in range(agents)]
    db.executemany(
        "INSERT INTO agents VALUES (?, 'own_1', 'conn_1', ?, '{\"team\": \"ads\"}', 'x', 1, NULL)",
        ((a, a) for a in ids),
    )
    batch = 50_000
    for start in range(0, history, batch):
        rows = range(start, min(start + batch, history))
        db.executemany(
            AUTH_ROW,
            ((f"auth_h{i}", "own_1", ids[i % agents], f"old-{i}", f"pi_{i}", 1.0 + i, 1.0 + i) for i in rows),
        )
        db.executemany(
            EVENT_ROW,
            (
                (
                    "own_1",
                    ids[i % agents],
                    f"auth_h{i}",
                    "authorization.settled",
                    "provider",
                    json.dumps({"status": 200}),
                    1.0 + i,
                )
                for i in rows
            ),
        )
    if rolling:  # a month of minute buckets per agent (at most 43,200), as a month of payments leaves them
        start = int(time.time()) // 60 - 30 * 1440
        buckets = min(30 * 1440, history // agents + 1)
        db.executemany(
            "INSERT INTO spend VALUES (?, 'hourly', ?, 'usd', 1000, 1)",
            ((a, f"{HOURLY}:{start + b:012d}") for a in ids for b in range(buckets)),
        )
    db.commit()
    db.close()
    return ids


def rolling_authorization(i: int, agent: str) -> NewAuthorization:
    period = period_of(HOURLY, datetime.now(UTC), "UTC")
    return replace(authorization(i, agent), charges=(Charge("hourly", period, "usd", 1000, 10**15, None),))


async def decision_time(
    history: int, agents: int, samples: int, rolling: bool = False
) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "growth.db"
        store = SqliteStore(str(path))
        await store.open()
        await store.close()
        ids = fill(path, history, agents, rolling)
        store = SqliteStore(str(path))
        await store.open()
        latencies = []
        for i in range(samples):
            agent = ids[(i * 7919) % len(ids)]
            started = time.perf_counter()
            if rolling:
                keys = [("hourly", period_of(HOURLY, datetime.now(UTC), "UTC"))]
                await store.lookup(agent, f"new-{i}", keys)
                await store.record_decision(rolling_authorization(10**9 + i, agent), time.time())
            else:
                await store.lookup(agent, f"new-{i}", [(name, period) for name, period, _ in LIMITS])
                await store.record_decision(authorization(10**9 + i, agent), time.time())
            latencies.append((time.perf_counter() - started) * 1000)
        await store.close()
    latencies.sort()
    return statistics.median(latencies), latencies[int(len(latencies) * 0.99)]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument(
        "--sizes",
        default="1000:10,1000000:10,1000:100000,1000000:100000",
        help="recorded decisions:agents pairs, comma-separated",
    )
    parser.add_argument("--windows", default="calendar,rolling", help="calendar (day + month), rolling (1h)")
    args = parser.parse_args()
    sizes = [tuple(int(n) for n in pair.split(":")) for pair in args.sizes.split(",")]
    print("store part of a decision (lookup + decide-and-reserve), SQLite, one at a time")
    print(f"{'window':>12}{'recorded decisions':>19}{'agents':>9}{'p50 ms':>9}{'p99 ms':>9}")
    for window in args.windows.split(","):
        for history, agents in sizes:
            p50, p99 = await decision_time(history, agents, args.samples, window == "rolling")
            print(f"{window:>12}{history:>19,}{agents:>9,}{p50:>9.3f}{p99:>9.3f}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
