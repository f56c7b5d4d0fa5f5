"""A fleet under faults: replicas of the real `paysentry` process on one PostgreSQL (with or without
Redis), many agents paying against their limits at once, replicas killed with SIGKILL every few seconds
and the database restarted mid-run; then the outcomes are resolved and what the provider moved is
compared, agent by agent, with the limits and with what PaySentry counted.

    python -m bench.chaos [--stores postgres,postgres+redis] [--agents 16] [--limit 100] [--payments 130]
                          [--replicas 3] [--kill-every 2-4] [--duration 60] [--seed 1]

Each agent may make ``--limit`` payments of $10 a day (count and amount). Its client makes ``--payments``
attempts paced over ``--duration`` seconds, each with a new Idempotency-Key; a call that fails without a decision (a cut connection, a
502/503, a 409) is retried with the same key on the next replica, as an SDK behind a load balancer would,
up to five times, and a third of them are abandoned after the first failure (an agent that never
retries: only resolution can learn their outcome). Printed per store: the calls made, the kills, what
the provider moved against the limit, what PaySentry counted, and the agents where the two differ.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from tests.e2e.conftest import Deployment, make_deployment, mock_provider_process
from tests.servers import Postgres, Redis, free_port

AMOUNT = 1000  # $10
UNDECIDED = (0, 409, 500, 502, 503)  # no decision reached the agent: an SDK retries with the same key


@dataclass
class Report:
    store: str
    calls: Counter[int] = field(default_factory=Counter)
    kills: int = 0
    restarts: int = 0
    moved: dict[str, tuple[int, int]] = field(default_factory=dict)  # agent: (amount, count)
    counted: dict[str, tuple[int, int]] = field(default_factory=dict)
    unresolved: int = 0
    resolve_seconds: float = 0.0

    def over_limit(self, limit: int) -> list[str]:
        return [a for a, (amount, count) in self.moved.items() if count > limit or amount > limit * AMOUNT]

    def drift(self) -> list[str]:
        return [a for a in self.moved if self.moved[a] != self.counted.get(a, (0, 0))]


def policy(limit: int) -> str:
    return f"""
    name: chaos
    limits:
      - {{name: daily_budget, window: day, currency: usd, max_amount: {limit * AMOUNT}, max_count: {limit}}}
    rules: []
"""


def pay(replica: Deployment, token: str, key: str, agent: str, delay: int) -> int:
    body = f"amount={AMOUNT}&currency=usd&confirm=true&metadata[agent]={agent}"
    if delay:
        body += f"&metadata[mock_delay_ms]={delay}"
    request = urllib.request.Request(
        f"{replica.agent_url}/v1/payment_intents",
        body.encode(),
        {
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/x-www-form-urlencoded",
            "Idempotency-Key": key,
        },
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=15) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0  # refused or cut: the replica is down or was killed mid-call


def query(url: str, sql: str) -> list[tuple[Any, ...]]:
    async def fetch() -> list[tuple[Any, ...]]:
        conn = await asyncpg.connect(url)
        try:
            return [tuple(r) for r in await conn.fetch(sql)]
        finally:
            await conn.close()

    return asyncio.run(fetch())


def run(
    root: Path,
    postgres: Postgres,
    url: str,
    redis_url: str,
    *,
    agents: int,
    limit: int,
    payments: int,
    replicas: int,
    kill_every: tuple[float, float],
    duration: float,
    seed: int,
) -> Report:
    rng = random.Random(seed)
    report = Report("postgres+redis" if redis_url else "postgres")
    extra = "reservation_lease: 2s\nstore_timeout: 2s\n" + (f"redis_url: {redis_url}\n" if redis_url else "")
    with mock_provider_process() as upstream:
        first = make_deployment(root, policy(limit), upstream=upstream, store=url, extra_config=extra)
        fleet = [first, *(first.replica(i) for i in range(1, replicas))]
        tokens: dict[str, str] = {}
        ids: dict[str, str] = {}
        for i in range(agents):
            made = json.loads(first.cli("agent", "create", f"a{i}").stdout)
            tokens[f"a{i}"], ids[f"a{i}"] = made["token"], made["id"]
        for replica in fleet:
            replica.start()
        stop = threading.Event()
        lock = threading.Lock()

        began = time.monotonic()

        def client(agent: str, seed: int) -> None:
            mine = random.Random(seed)
            for n in range(payments):  # paced over the run, so the faults meet the calls
                time.sleep(max(0.0, began + n * duration / payments - time.monotonic()))
                key, abandon = f"{agent}-{n}", mine.random() < 1 / 3
                for attempt in range(6):
                    replica = fleet[(n + attempt) % len(fleet)]
                    status = pay(replica, tokens[agent], key, agent, mine.choice((0, 0, 50, 300)))
                    with lock:
                        report.calls[status] += 1
                    if status not in UNDECIDED or abandon:
                        break
                    time.sleep(0.3)

        def chaos() -> None:
            restarted = False
            while not stop.wait(rng.uniform(*kill_every)):
                if not restarted and time.monotonic() - began > duration / 3:
                    postgres.stop("immediate")  # like a crash of the database
                    time.sleep(1.0)
                    postgres.start()
                    restarted, report.restarts = True, report.restarts + 1
                    continue
                victim = rng.choice([r for r in fleet if r.process is not None] or fleet)
                if victim.process is not None:
                    victim.process.send_signal(signal.SIGKILL)
                    victim.process.wait()
                    victim.process = None
                    report.kills += 1
                time.sleep(rng.uniform(0.2, 1.0))
                for replica in fleet:
                    if replica.process is None:
                        # one restarted while the database is away may not come up: the next round retries
                        with suppress(AssertionError):
                            replica.start()

        killer = threading.Thread(target=chaos, daemon=True)
        try:
            killer.start()
            with ThreadPoolExecutor(max_workers=agents) as pool:
                list(pool.map(lambda i: client(f"a{i}", seed * 1000 + i), range(agents)))
            stop.set()
            killer.join()
            for replica in fleet:
                if replica.process is None:
                    replica.start()
            started = time.monotonic()
            open_states = "SELECT count(*) FROM authorizations WHERE state IN ('forwarding', 'in_doubt')"
            while query(url, open_states)[0][0] and time.monotonic() - started < 120:
                time.sleep(0.5)
            report.resolve_seconds = time.monotonic() - started
            report.unresolved = query(url, open_states)[0][0]
            for intent in first.mock("objects"):
                agent = (intent.get("metadata") or {}).get("agent")
                if intent.get("object") == "payment_intent" and agent and intent.get("status") == "succeeded":
                    amount, count = report.moved.get(agent, (0, 0))
                    report.moved[agent] = (amount + intent["amount_received"], count + 1)
            for agent, agent_id in ids.items():
                rows = first.owner_api("GET", f"/v1/agents/{agent_id}/spend")[1]["data"]
                spent = [(r["amount"], r["count"]) for r in rows if r["limit"] == "daily_budget"]
                report.counted[agent] = spent[-1] if spent else (0, 0)
                report.moved.setdefault(agent, (0, 0))
        finally:
            stop.set()
            for replica in fleet:
                replica.stop()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stores", default="postgres,postgres+redis")
    parser.add_argument("--agents", type=int, default=16)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--payments", type=int, default=130)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--kill-every", default="2-4")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds the agents pay over")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    low, high = (float(x) for x in args.kill_every.split("-"))
    rows = []
    for store in args.stores.split(","):
        with tempfile.TemporaryDirectory(prefix="paysentry-chaos-") as tmp:
            root = Path(tmp)
            root.chmod(0o755)  # PostgreSQL runs as its own user under it
            postgres = Postgres(root / "pg", free_port()).start()
            redis = Redis(root / "redis", free_port()).start() if store == "postgres+redis" else None
            try:
                url = postgres.create_database("chaos")
                (root / "fleet").mkdir()
                report = run(
                    root / "fleet",
                    postgres,
                    url,
                    redis.url if redis else "",
                    agents=args.agents,
                    limit=args.limit,
                    payments=args.payments,
                    replicas=args.replicas,
                    kill_every=(low, high),
                    duration=args.duration,
                    seed=args.seed,
                )
            finally:
                if redis is not None:
                    redis.stop()
                postgres.stop()
        rows.append(report)
    print(
        f"{'store':<16}{'calls':>7}{'200':>6}{'402':>6}{'cut/5xx':>8}{'kills':>6}{'db':>4}"
        f"{'moved':>8}{'of':>7}{'counted':>8}{'over':>6}{'drift':>6}{'open':>6}{'resolve s':>10}"
    )
    for r in rows:
        moved = sum(c for _, c in r.moved.values())
        counted = sum(c for _, c in r.counted.values())
        undecided = sum(n for status, n in r.calls.items() if status in UNDECIDED)
        print(
            f"{r.store:<16}{sum(r.calls.values()):>7}{r.calls[200]:>6}{r.calls[402]:>6}{undecided:>8}"
            f"{r.kills:>6}{r.restarts:>4}{moved:>8}{args.limit * args.agents:>7}{counted:>8}"
            f"{len(r.over_limit(args.limit)):>6}{len(r.drift()):>6}{r.unresolved:>6}{r.resolve_seconds:>10.1f}"
        )
    print("moved/counted: payments the provider executed / PaySentry counted, all agents; over: agents past")
    print("their limit at the provider; drift: agents whose moved and counted differ; open: calls unresolved")


if __name__ == "__main__":
    main()
