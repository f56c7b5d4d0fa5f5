"""SIGTERM: readiness fails at once, the agent listener stops accepting, a call in flight finishes within
the grace period and its spend is committed; one still running at the deadline is cut, stays counted (its
outcome is unknown) and is resolved from the provider once a sidecar runs again."""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Deployment, make_deployment, wait_until


def slow_payment(dep: Deployment, delay_ms: int, out: dict[str, Any]) -> None:
    body = f"amount=1500&currency=usd&metadata[mock_delay_ms]={delay_ms}".encode()
    request = urllib.request.Request(
        f"{dep.agent_url}/v1/payment_intents",
        body,
        {
            "Authorization": f"Bearer {dep.agent_token}",
            "Content-Type": "application/x-www-form-urlencoded",
            "Idempotency-Key": "drain-1",
        },
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            out["status"], out["body"] = resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        out["status"] = exc.code
    except OSError as exc:  # cut off
        out["error"] = repr(exc)


def rows(dep: Deployment) -> tuple[list[str], list[tuple[str, int, int]]]:
    db = sqlite3.connect(dep.root / "paysentry.db")
    try:
        states = [r[0] for r in db.execute("SELECT state FROM authorizations")]
        spend = db.execute("SELECT limit_name, amount, count FROM spend ORDER BY limit_name").fetchall()
        return states, spend
    finally:
        db.close()


def readiness(dep: Deployment) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"{dep.admin_url}/readyz", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def start_slow_call_then_sigterm(dep: Deployment, delay_ms: int) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}
    caller = threading.Thread(target=slow_payment, args=(dep, delay_ms, out))
    caller.start()
    wait_until(lambda: rows(dep)[0] == ["forwarding"], timeout=5)  # reserved, on its way to the provider
    assert dep.process is not None
    dep.process.send_signal(signal.SIGTERM)
    return caller, out


@pytest.mark.e2e
def test_sigterm_lets_a_call_in_flight_finish_and_commit(tmp_path: Path) -> None:
    dep = make_deployment(tmp_path, extra_config="shutdown_grace: 10s\nupstream_timeout: 10s\n")
    dep.start()
    caller, out = start_slow_call_then_sigterm(dep, 1500)
    wait_until(lambda: readiness(dep)[0] == 503)
    status, ready = readiness(dep)
    assert status == 503 and ready["checks"]["draining"] is True
    with pytest.raises(urllib.error.URLError):  # no longer accepting agents' connections
        urllib.request.urlopen(f"{dep.agent_url}/v1/customers", timeout=2)
    caller.join(timeout=20)
    assert out.get("status") == 200 and out["body"]["amount"] == 1500
    assert dep.process is not None and dep.process.wait(timeout=20) == 0
    assert rows(dep) == (["settled"], [("daily_budget", 1500, 1)])  # committed, nothing left reserved


@pytest.mark.e2e
def test_a_call_still_running_when_the_grace_ends_is_cut_and_resolved_later(tmp_path: Path) -> None:
    extra = "shutdown_grace: 500ms\nupstream_timeout: 20s\nsweep_interval: 1s\n"
    dep = make_deployment(tmp_path, extra_config=extra)
    dep.start()
    caller, out = start_slow_call_then_sigterm(dep, 5000)
    caller.join(timeout=20)
    assert "status" not in out or out["status"] >= 500
    assert dep.process is not None and dep.process.wait(timeout=20) == 0
    assert rows(dep) == (["in_doubt"], [("daily_budget", 1500, 1)])  # cut off: unknown, still counted
    assert '"draining"' in dep.logs()
    dep.start()  # the next sidecar's resolution job asks the provider (re-sends with the same key)
    try:
        wait_until(lambda: rows(dep)[0] == ["settled"], timeout=30, interval=0.2)
        assert rows(dep) == (["settled"], [("daily_budget", 1500, 1)])
    finally:
        dep.stop()
