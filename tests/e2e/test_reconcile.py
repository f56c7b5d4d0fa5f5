"""Reconciliation end to end: real `paysentry` processes, the mock provider's lists, the Stripe SDK as the
agent, the CLI as the owner, MercadoPago notifications signed as MercadoPago signs them."""

from __future__ import annotations

import hashlib
import hmac
import json
import sqlite3
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import MOCK_SECRET, WEBHOOK_SECRET, Deployment, make_deployment, wait_until
from tests.e2e.test_mercadopago_sdk import POLICY as MP_POLICY
from tests.e2e.test_mercadopago_sdk import keyed, order, sdk

MP_TOKEN = "APP_USR-paysentry-mock-ars"


def at_mock(dep: Deployment, method: str, path: str, body: bytes, headers: dict[str, str]) -> Any:
    """A call made straight at the provider (the owner's dashboard, another integration): not PaySentry."""
    request = urllib.request.Request(dep.mock_url + path, body, headers, method=method)
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())


def lose_the_settle(dep: Deployment, auth_id: str, amount: int) -> None:
    """What a lost settle leaves: the authorization failed and its spend released, while the provider
    executed the call."""
    db = sqlite3.connect(dep.root / "paysentry.db")
    with db:
        db.execute("UPDATE authorizations SET state='failed' WHERE id=?", (auth_id,))
        db.execute("UPDATE spend SET amount=amount-?, count=count-1 WHERE agent_id=?", (amount, dep.agent_id))
    db.close()


def events(dep: Deployment, kind: str) -> list[dict[str, Any]]:
    return [e for e in dep.owner_api("GET", "/v1/events?after=0&limit=1000")[1]["data"] if e["type"] == kind]


@pytest.mark.e2e
def test_reconcile_counts_a_lost_settle_and_reports_what_was_made_outside(
    deployment: Deployment, stripe_sdk: Any
) -> None:
    intent = stripe_sdk.PaymentIntent.create(amount=1500, currency="usd", confirm=True, idempotency_key="r-1")
    auth_id = deployment.owner_api("GET", "/v1/authorizations")[1]["data"][0]["id"]
    lose_the_settle(deployment, auth_id, 1500)
    assert deployment.spend() == (0, 0)
    outside = at_mock(
        deployment,
        "POST",
        "/v1/payment_intents",
        b"amount=2000&currency=usd&confirm=true",
        {"Authorization": f"Bearer {MOCK_SECRET}", "Content-Type": "application/x-www-form-urlencoded"},
    )

    run = deployment.cli("reconcile", "--since", "1h", check=False)  # the harness asks for -o json
    assert run.returncode == 5, run.stdout + run.stderr  # drift remains: the payment made outside
    [report] = json.loads(run.stdout)
    assert [(f["fix"], f["ref"]) for f in report["fixed"]] == [("counted", intent.id)]
    assert [u["kind"] for u in report["unexplained"]] == ["untracked"]  # the one made at the mock
    assert report["drift"] == {"usd": 2000}
    assert deployment.spend() == (1500, 1)  # counted again: the provider moved it
    auth = deployment.owner_api("GET", f"/v1/authorizations/{auth_id}")[1]
    assert auth["state"] == "settled" and auth["provider_ref"] == intent.id
    [fix] = events(deployment, "authorization.reconciled")
    assert fix["authorization_id"] == auth_id and fix["data"]["fix"] == "counted"

    again = deployment.cli("reconcile", "--since", "1h", "-o", "json", check=False)
    assert again.returncode == 5
    [report] = json.loads(again.stdout)
    assert report["fixed"] == [] and report["matched"] == 1  # counted once, whatever runs again
    assert [(u["kind"], u["ref"], u["amount"]) for u in report["unexplained"]] == [
        ("untracked", outside["id"], 2000)
    ]
    assert deployment.spend() == (1500, 1) and len(events(deployment, "authorization.reconciled")) == 1
    # A same-key retry of the agent replays the provider's object, not a new decision.
    replay = stripe_sdk.PaymentIntent.create(amount=1500, currency="usd", confirm=True, idempotency_key="r-1")
    assert replay.id == intent.id and deployment.spend() == (1500, 1)

    status, view = deployment.owner_api("GET", "/v1/reconciliation")
    assert status == 200 and [r["drift"] for r in view["data"]] == [{"usd": 2000}]
    assert deployment.owner_api("GET", "/v1/reconciliation", token="pso_x_y")[0] == 401
    bad = deployment.cli("reconcile", "--since", "yesterday", check=False)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1  # a usage error


@pytest.mark.e2e
def test_the_periodic_job_fixes_and_shows_the_drift(tmp_path: Path) -> None:
    import stripe

    dep = make_deployment(tmp_path, extra_config="reconcile_interval: 0.5s\nreconcile_window: 1h\n")
    dep.start()
    try:
        stripe.api_base, stripe.api_key, stripe.max_network_retries = dep.agent_url, dep.agent_token, 0
        stripe.PaymentIntent.create(amount=1200, currency="usd", confirm=True)
        auth_id = dep.owner_api("GET", "/v1/authorizations")[1]["data"][0]["id"]
        lose_the_settle(dep, auth_id, 1200)
        at_mock(
            dep,
            "POST",
            "/v1/charges",
            b"amount=700&currency=usd&source=tok_visa",
            {"Authorization": f"Bearer {MOCK_SECRET}", "Content-Type": "application/x-www-form-urlencoded"},
        )
        wait_until(lambda: dep.spend() == (1200, 1))
        metrics = urllib.request.urlopen(f"{dep.admin_url}/metrics", timeout=5).read().decode()
        assert 'paysentry_reconcile_fixes_total{fix="counted"} 1' in metrics
        drift = f'paysentry_reconcile_drift{{connection="{dep.connection_id}",currency="usd"}} 700'
        wait_until(
            lambda: drift in urllib.request.urlopen(f"{dep.admin_url}/metrics", timeout=5).read().decode()
        )
        assert dep.spend() == (1200, 1)  # the job keeps running: counted once
    finally:
        dep.stop()


def notify(dep: Deployment, payment_id: str, event_id: int) -> tuple[int, Any]:
    """A MercadoPago notification, signed as MercadoPago signs: it names the payment, nothing more."""
    ts, request_id = str(int(time.time() * 1000)), f"req-{event_id}"
    manifest = f"id:{payment_id};request-id:{request_id};ts:{ts};"
    mac = hmac.new(WEBHOOK_SECRET.encode(), manifest.encode(), hashlib.sha256).hexdigest()
    body = json.dumps(
        {"id": event_id, "type": "payment", "action": "payment.updated", "data": {"id": payment_id}}
    )
    headers = {
        "Content-Type": "application/json",
        "x-signature": f"ts={ts},v1={mac}",
        "x-request-id": request_id,
    }
    request = urllib.request.Request(
        f"{dep.admin_url}/v1/webhooks/{dep.connection_id}", body.encode(), headers
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        return resp.status, json.loads(resp.read())


@pytest.fixture
def mp(tmp_path: Path) -> Iterator[Deployment]:
    dep = make_deployment(
        tmp_path,
        MP_POLICY,
        provider="mercadopago",
        provider_args=("--setting", "currency=ARS"),
        secret_key=MP_TOKEN,
    )
    dep.start()
    yield dep
    dep.stop()


@pytest.mark.e2e
def test_a_mercadopago_notification_reads_the_payment_and_settles_or_releases(mp: Deployment) -> None:
    payment = sdk(mp).payment().create(order(700.50), keyed("mp-1"))["response"]
    auth_id = mp.owner_api("GET", "/v1/authorizations")[1]["data"][0]["id"]
    assert payment["metadata"] == {"paysentry_authorization": auth_id}  # attributed at MercadoPago
    db = sqlite3.connect(mp.root / "paysentry.db")
    with db:  # as a timeout leaves it: in doubt, not due for the resolution job yet
        db.execute(
            "UPDATE authorizations SET state='in_doubt', provider_ref=NULL, lease_expires_at=? WHERE id=?",
            (time.time() + 3600, auth_id),
        )
    db.close()
    assert notify(mp, str(payment["id"]), 1) == (200, {"received": True, "result": "settled"})
    auth = mp.owner_api("GET", f"/v1/authorizations/{auth_id}")[1]
    assert auth["state"] == "settled" and auth["provider_ref"] == str(payment["id"])
    assert mp.spend("daily_ars") == (70050, 1)
    assert notify(mp, str(payment["id"]), 1)[1]["result"] == "duplicate"

    at_mock(  # cancelled at MercadoPago, outside PaySentry; its notification releases the spend
        mp,
        "PUT",
        f"/v1/payments/{payment['id']}",
        b'{"status": "cancelled"}',
        {"Authorization": f"Bearer {MP_TOKEN}", "Content-Type": "application/json"},
    )
    assert notify(mp, str(payment["id"]), 2)[1]["result"] == "voided"
    assert mp.spend("daily_ars") == (0, 0)
    assert notify(mp, str(payment["id"]), 3)[1]["result"] == "recorded"  # nothing released twice
    assert mp.spend("daily_ars") == (0, 0)
    fixes = [e["data"]["fix"] for e in events(mp, "authorization.reconciled")]
    assert fixes == ["settled", "voided"] and all(
        e["actor"] == "provider" for e in events(mp, "authorization.reconciled")
    )
