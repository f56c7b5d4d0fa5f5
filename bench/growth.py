"""Does deciding slow down as history and agents pile up? The store's part of one decision (idempotency
lookup with the spend totals the rules read, then decide-and-reserve) on SQLite, measured with 1 thousand
and 1 million recorded decisions (authorizations and their events), and with 10 and 100 thousand agents.

    python -m bench.growth [--samples N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from bench.store import LIMITS, authorization
from proxy.store.sql import AUTH_COLUMNS
from proxy.store.sqlite import SqliteStore

AUTH_ROW = (  # columns named: the schema grows (a migration adds columns at the end)
    f"INSERT INTO authorizations ({AUTH_COLUMNS}) VALUES (?,?,?,?,'h','mock','payment_intent',1000,'usd','',"
    "'{}','allow','default','p','m','r','settled','[]',NULL,?,200,NULL,NULL,?,?)"
)
EVENT_ROW = (
    "INSERT INTO events (owner_id, agent_id, authorization_id, type, actor, data, at) VALUES (?,?,?,?,?,?,?)"
)


def fill(path: Path, history: int, agents: int) -> list[str]:
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
    db.commit()
    db.close()
    return ids


async def decision_time(history: int, agents: int, samples: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "growth.db"
        store = SqliteStore(str(path))
        await store.open()
        await store.close()
        ids = fill(path, history, agents)
        store = SqliteStore(str(path))
        await store.open()
        latencies = []
        for i in range(samples):
            agent = ids[(i * 7919) % len(ids)]
            started = time.perf_counter()
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
    args = parser.parse_args()
    sizes = [tuple(int(n) for n in pair.split(":")) for pair in args.sizes.split(",")]
    print("store part of a decision (lookup + decide-and-reserve), SQLite, one at a time")
    print(f"{'recorded decisions':>19}{'agents':>9}{'p50 ms':>9}{'p99 ms':>9}")
    for history, agents in sizes:
        p50, p99 = await decision_time(history, agents, args.samples)
        print(f"{history:>19,}{agents:>9,}{p50:>9.3f}{p99:>9.3f}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
