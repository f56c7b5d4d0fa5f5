"""Policy operations against a running sidecar: hot reload (broken then good) and replay of its history."""

from __future__ import annotations

import json
import sqlite3
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import stripe

from tests.e2e.conftest import POLICY, Deployment, make_deployment, wait_until

pytestmark = pytest.mark.e2e

STRICTER = POLICY.replace("max_amount: 20000}", "max_amount: 2000}")  # per-payment cap $200 -> $20


def readyz(dep: Deployment) -> dict[str, Any]:
    with urllib.request.urlopen(dep.admin_url + "/readyz", timeout=5) as resp:
        return json.loads(resp.read())


def metrics(dep: Deployment) -> str:
    with urllib.request.urlopen(dep.admin_url + "/metrics", timeout=5) as resp:
        return resp.read().decode()


def test_broken_update_keeps_serving_and_good_update_switches(
    deployment: Deployment, stripe_sdk: Any
) -> None:
    policy_file = deployment.root / "policies" / "test.yaml"
    revision = readyz(deployment)["checks"]["policy"]["revision"]
    assert stripe_sdk.PaymentIntent.create(amount=3000, currency="usd").amount == 3000

    policy_file.write_text("name: test\nrules:\n  - {name: x, effect: deny, when: 'paymnet.amount > 1'}\n")
    wait_until(lambda: readyz(deployment)["checks"]["policy"]["last_reload_error"])
    ready = readyz(deployment)
    assert ready["ready"] is True and ready["checks"]["policy"]["revision"] == revision
    assert "paymnet.amount" in ready["checks"]["policy"]["last_reload_error"]
    assert 'paysentry_policy_reloads_total{result="error"}' in metrics(deployment)
    assert stripe_sdk.PaymentIntent.create(amount=3000, currency="usd").amount == 3000  # old decisions stand

    policy_file.write_text(textwrap.dedent(STRICTER))
    took = wait_until(lambda: readyz(deployment)["checks"]["policy"]["revision"] != revision)
    assert took < 5
    assert readyz(deployment)["checks"]["policy"]["last_reload_error"] is None
    with pytest.raises(stripe.error.CardError) as caught:
        stripe_sdk.PaymentIntent.create(amount=3000, currency="usd")
    assert caught.value.code == "per_payment_cap"
    decisions = deployment.owner_api("GET", "/v1/authorizations")[1]["data"]
    assert (
        len({d["revision"] for d in decisions}) == 2
    )  # every decision carries the revision it was made under


def test_replay_reports_what_a_candidate_would_change(
    deployment: Deployment, stripe_sdk: Any, tmp_path: Path
) -> None:
    for amount in (1000, 3000, 4000):
        stripe_sdk.PaymentIntent.create(amount=amount, currency="usd")
    with pytest.raises(stripe.error.CardError):
        stripe_sdk.PaymentIntent.create(amount=500, currency="eur")
    candidate = tmp_path / "candidate"
    candidate.mkdir()
    (candidate / "test.yaml").write_text(textwrap.dedent(STRICTER))
    result = deployment.cli("policy", "replay", str(candidate), "--since", "1h")
    lines = result.stdout.splitlines()
    assert lines[0].startswith("replayed 4 decisions since 1h") and lines[0].endswith("2 would change")
    changed = "\n".join(lines[1:])
    assert changed.count("allow (default) -> deny (per_payment_cap)") == 2
    assert "3000 USD" in changed and "4000 USD" in changed and "1000 USD" not in changed


def test_the_sweep_deletes_rolling_buckets_no_check_sums_and_keeps_the_window(tmp_path: Path) -> None:
    """A rolling hour's bucket from three hours ago is deleted by the first sweep; one from five minutes
    ago stays and still counts (its spend is what the owner sees)."""
    rolling = POLICY.replace(
        "    rules:",
        "      - {name: hourly, rolling: 1h, currency: usd, max_amount: 100000}\n    rules:",
    )
    dep = make_deployment(tmp_path, policy=rolling)
    minute = int(time.time()) // 60  # the rolling hour's buckets are minutes
    with sqlite3.connect(tmp_path / "paysentry.db") as db:
        for age, amount in ((180, 700), (5, 300)):
            period = f"rolling:3600:{minute - age:012d}"
            db.execute(
                "INSERT INTO spend VALUES (?, 'hourly', ?, 'usd', ?, 1)", (dep.agent_id, period, amount)
            )
    dep.start()
    try:

        def rows() -> list[int]:
            with sqlite3.connect(tmp_path / "paysentry.db") as db:
                found = db.execute("SELECT amount FROM spend WHERE limit_name='hourly' ORDER BY period")
                return [r[0] for r in found]

        wait_until(lambda: rows() == [300])
        assert dep.spend("hourly") == (300, 1)
        assert '"pruned": 1' in dep.logs() and "sweep failed" not in dep.logs()
    finally:
        dep.stop()
