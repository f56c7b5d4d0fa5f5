"""A fleet: three sidecar processes on one PostgreSQL share one truth. 300 concurrent payments against one
agent's budget stop at exactly the limit; a sidecar killed mid-payment and a database restarted mid-load
leave no reserved spend behind."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bench.chaos import query
from tests.e2e.conftest import Deployment, fresh_redis, make_deployment, mock_provider_process, wait_until
from tests.servers import Postgres

BUDGET = """
    name: fleet
    limits:
      - {name: daily_budget, window: day, currency: usd, max_amount: 100000}
    rules: []
"""


def pay(dep: Deployment, key: str, amount: int = 1000, extra: str = "", timeout: float = 30) -> int:
    request = urllib.request.Request(
        f"{dep.agent_url}/v1/payment_intents",
        f"amount={amount}&currency=usd{extra}".encode(),
        {
            "Authorization": f"Bearer {dep.agent_token}",
            "Content-Type": "application/x-www-form-urlencoded",
            "Idempotency-Key": key,
        },
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0  # the connection was cut


def fleet(root: Path, store: str, upstream: str, size: int = 3, redis_url: str = "") -> list[Deployment]:
    extra = f"redis_url: {redis_url}\n" if redis_url else ""
    first = make_deployment(root, BUDGET, upstream=upstream, store=store, extra_config=extra)
    return [first, *(first.replica(i) for i in range(1, size))]


@pytest.mark.e2e
@pytest.mark.parametrize("with_redis", [False, True], ids=["postgres", "postgres+redis"])
def test_three_sidecars_on_one_postgres_stop_at_exactly_the_limit(
    tmp_path: Path, postgres_url: str, with_redis: bool, request: pytest.FixtureRequest
) -> None:
    redis_url = fresh_redis(request, with_redis)
    with mock_provider_process() as upstream:
        sidecars = fleet(tmp_path, postgres_url, upstream, redis_url=redis_url)
        for s in sidecars:
            s.start()
        try:
            with ThreadPoolExecutor(max_workers=60) as pool:
                statuses = list(pool.map(lambda i: pay(sidecars[i % 3], f"f-{i}"), range(300)))
            provider = [r for r in sidecars[0].mock() if r["method"] == "POST" and r["status"] == 200]
            spend = sidecars[1].spend()  # the owner's view, from any replica
        finally:
            for s in sidecars:
                s.stop()

    assert Counter(statuses) == {200: 100, 402: 200}
    assert len(provider) == 100  # the provider saw exactly the allowed payments
    decisions = query(
        postgres_url,
        "SELECT type, count(*) FROM events WHERE type IN "
        "('authorization.forwarding', 'authorization.denied') GROUP BY type ORDER BY type",
    )
    assert [tuple(r) for r in decisions] == [("authorization.denied", 200), ("authorization.forwarding", 100)]
    assert spend == (sum(int(p["params"]["amount"]) for p in provider), 100)


@pytest.mark.e2e
def test_a_sidecar_killed_mid_payment_stays_counted_until_the_provider_says(
    tmp_path: Path, postgres_url: str
) -> None:
    with mock_provider_process() as upstream:
        victim, survivor = fleet(tmp_path, postgres_url, upstream, size=2)
        config = victim.config.read_text() + "reservation_lease: 1s\n"
        victim.config.write_text(config)
        survivor.config.write_text(survivor.config.read_text() + "reservation_lease: 1s\n")
        victim.start()
        survivor.start()
        try:
            with ThreadPoolExecutor(max_workers=1) as pool:
                pending = pool.submit(pay, victim, "kill-1", 1000, "&metadata[mock_delay_ms]=3000")
                wait_until(
                    lambda: query(postgres_url, "SELECT state FROM authorizations") == [("forwarding",)]
                )
                assert victim.process is not None
                victim.process.send_signal(signal.SIGKILL)  # between reserve and commit
                assert pending.result(timeout=10) == 0
            reserved = query(postgres_url, "SELECT amount, count FROM spend")
            assert [tuple(r) for r in reserved] == [(1000, 1)]  # still counted: the outcome is unknown

            # Never released for lack of an answer: the survivor (its resolution job, or the agent's
            # same-key retry) re-sends the call with the same key until the provider's answer is learned.
            def retry() -> int:
                return pay(survivor, "kill-1", 1000, "&metadata[mock_delay_ms]=3000")

            wait_until(lambda: retry() == 200, timeout=30, interval=0.5)
            assert query(postgres_url, "SELECT amount, count FROM spend") == [(1000, 1)]  # never released
            assert [r[0] for r in query(postgres_url, "SELECT state FROM authorizations")] == ["settled"]
            released = query(
                postgres_url, "SELECT count(*) FROM events WHERE data LIKE '%\"released\": true%'"
            )
            assert released[0][0] == 0
            assert len([r for r in survivor.mock() if r["status"] == 200 and not r.get("replayed")]) == 1
            assert query(postgres_url, "SELECT amount, count FROM spend") == [(1000, 1)]
        finally:
            victim.stop()
            survivor.stop()
        victim.process = None


@pytest.mark.e2e
def test_a_database_restart_fails_calls_closed_then_recovers(
    tmp_path: Path, postgres_server: Postgres
) -> None:
    url = postgres_server.create_database("restart")
    with mock_provider_process() as upstream:
        (dep,) = fleet(tmp_path, url, upstream, size=1)
        dep.config.write_text(dep.config.read_text() + "store_timeout: 2s\n")
        dep.start()
        try:
            assert pay(dep, "before") == 200
            postgres_server.stop("immediate")  # like a crash
            started = time.monotonic()
            assert pay(dep, "during", timeout=15) == 503  # fail closed, Stripe-shaped, bounded
            assert time.monotonic() - started < 10
            ready = urllib.request.Request(f"{dep.admin_url}/readyz")
            with pytest.raises(urllib.error.HTTPError) as not_ready:
                urllib.request.urlopen(ready, timeout=15)
            assert not_ready.value.code == 503
            postgres_server.start()
            wait_until(lambda: pay(dep, "after") == 200, timeout=20, interval=0.2)  # recovered, no restart
            assert json.loads(urllib.request.urlopen(ready, timeout=5).read())["ready"] is True
        finally:
            dep.stop()
    keys = query(url, "SELECT idempotency_key, state FROM authorizations ORDER BY created_at")
    assert [tuple(r) for r in keys] == [("before", "settled"), ("after", "settled")]
    assert query(url, "SELECT amount, count FROM spend") == [(2000, 2)]
