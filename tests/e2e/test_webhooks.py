"""Inbound Stripe webhooks: a signed, fresh event settles what it names, once; anything else changes nothing."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.e2e.conftest import WEBHOOK_SECRET, Deployment


def event(kind: str, object_id: str, event_id: str) -> bytes:
    return json.dumps(
        {"id": event_id, "object": "event", "type": kind, "data": {"object": {"id": object_id}}}
    ).encode()


def signature(body: bytes, at: float | None = None, secret: str = WEBHOOK_SECRET) -> str:
    t = int(time.time() if at is None else at)
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def deliver(
    dep: Deployment, body: bytes, header: str | None, connection: str | None = None
) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if header is not None:
        headers["Stripe-Signature"] = header
    request = urllib.request.Request(
        f"{dep.admin_url}/v1/webhooks/{connection or dep.connection_id}", body, headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def events_of(dep: Deployment) -> list[dict[str, Any]]:
    return dep.owner_api("GET", "/v1/events?after=0&limit=500")[1]["data"]


@pytest.mark.e2e
def test_a_cancelled_intent_releases_its_spend_once(deployment: Deployment, stripe_sdk: Any) -> None:
    intent = stripe_sdk.PaymentIntent.create(amount=3000, currency="usd", idempotency_key="wh-1")
    assert deployment.spend() == (3000, 1)

    body = event("payment_intent.canceled", intent.id, "evt_cancel_1")
    header = signature(body)
    assert deliver(deployment, body, header) == (200, {"received": True, "result": "voided"})
    assert deployment.spend() == (0, 0)
    status, auth = deployment.owner_api("GET", "/v1/authorizations")
    assert auth["data"][0]["state"] == "voided"
    audit = [e for e in events_of(deployment) if e["type"] == "authorization.voided"]
    assert len(audit) == 1 and audit[0]["actor"] == "provider"

    # Stripe redelivers; an attacker replays: the same event changes nothing.
    assert deliver(deployment, body, header) == (200, {"received": True, "result": "duplicate"})
    # Another event about the same, already voided, intent is recorded but releases nothing more.
    again = event("payment_intent.canceled", intent.id, "evt_cancel_2")
    assert deliver(deployment, again, signature(again))[1]["result"] == "recorded"
    assert deployment.spend() == (0, 0)

    unknown = event("payment_intent.canceled", "pi_not_ours", "evt_other")
    assert deliver(deployment, unknown, signature(unknown))[1]["result"] == "unmatched"
    irrelevant = event("customer.created", "cus_1", "evt_customer")
    assert deliver(deployment, irrelevant, signature(irrelevant))[1]["result"] == "ignored"


@pytest.mark.e2e
def test_unsigned_forged_stale_or_misdirected_events_change_nothing(
    deployment: Deployment, stripe_sdk: Any
) -> None:
    intent = stripe_sdk.PaymentIntent.create(amount=2500, currency="usd", idempotency_key="wh-2")
    body = event("payment_intent.canceled", intent.id, "evt_forged")
    tampered = event("payment_intent.canceled", intent.id, "evt_forged_2")
    before = len(events_of(deployment))
    attempts = {
        "no header": (body, None, None),
        "garbage header": (body, "nonsense", None),
        "wrong secret": (body, signature(body, secret="whsec_guess"), None),
        "signature of another body": (tampered, signature(body), None),
        "stale timestamp": (body, signature(body, at=time.time() - 301), None),
        "future timestamp": (body, signature(body, at=time.time() + 301), None),
        "unknown connection": (body, signature(body), "conn_0000000000000000"),
    }
    for name, (payload, header, connection) in attempts.items():
        status, answer = deliver(deployment, payload, header, connection)
        assert status in (400, 404), name
        assert answer["error"]["message"], name
    assert deliver(deployment, b"not json", signature(b"not json"))[0] == 400
    assert deployment.spend() == (2500, 1)
    assert len(events_of(deployment)) == before
    # A valid delivery of the same event still works afterwards: the refusals recorded nothing.
    assert deliver(deployment, body, signature(body))[1]["result"] == "voided"
    metrics = urllib.request.urlopen(f"{deployment.admin_url}/metrics", timeout=5).read().decode()
    assert 'paysentry_webhooks_total{result="rejected"} 8' in metrics


@pytest.mark.e2e
def test_an_intent_cancelled_through_the_sidecar_releases_its_spend_at_once(
    deployment: Deployment, stripe_sdk: Any
) -> None:
    intent = stripe_sdk.PaymentIntent.create(amount=2000, currency="usd", idempotency_key="cx-1")
    assert deployment.spend() == (2000, 1)
    cancelled = stripe_sdk.PaymentIntent.cancel(intent.id)
    assert cancelled.status == "canceled"
    assert deployment.spend() == (0, 0)
    auth = deployment.owner_api("GET", "/v1/authorizations")[1]["data"][0]
    assert auth["state"] == "voided"
    voided = [e for e in events_of(deployment) if e["type"] == "authorization.voided"]
    assert len(voided) == 1 and voided[0]["actor"] == "agent"
    # Stripe's own event arrives later: recorded, nothing released twice.
    body = event("payment_intent.canceled", intent.id, "evt_cx")
    assert deliver(deployment, body, signature(body))[1]["result"] == "recorded"
    assert deployment.spend() == (0, 0)
    # A cancel the provider refuses (already cancelled) releases nothing.
    with pytest.raises(stripe_sdk.InvalidRequestError):
        stripe_sdk.PaymentIntent.cancel("pi_unknown")
    assert deployment.spend() == (0, 0)
