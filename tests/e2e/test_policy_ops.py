"""Policy operations against a running sidecar: hot reload (broken then good) and replay of its history."""

from __future__ import annotations

import json
import textwrap
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import stripe

from tests.e2e.conftest import POLICY, Deployment, wait_until

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
