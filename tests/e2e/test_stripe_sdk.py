"""The official Stripe SDK pays through a real `paysentry` process in front of the mock provider."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import stripe

from tests.e2e.conftest import MOCK_SECRET, Deployment, make_deployment, wait_until

pytestmark = pytest.mark.e2e


def raw(
    dep: Deployment, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    request = urllib.request.Request(
        dep.agent_url + path,
        data=body or None,
        method=method,
        headers={"Content-Type": "application/x-www-form-urlencoded", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def test_allowed_payment_is_forwarded_with_the_owner_key(deployment: Deployment, stripe_sdk: Any) -> None:
    intent = stripe_sdk.PaymentIntent.create(amount=1500, currency="usd", metadata={"purpose": "ads"})
    assert intent.amount == 1500 and intent.id.startswith("pi_")
    [seen] = deployment.mock_payments()
    assert seen["authorized"] is True  # the mock provider got its own secret key, not the agent token
    auth_id = deployment.owner_api("GET", "/v1/authorizations")[1]["data"][0]["id"]
    # the agent's metadata, and the authorization that allowed the call (reconciliation matches on it)
    assert seen["params"]["metadata"] == {"purpose": "ads", "paysentry_authorization": auth_id}
    assert seen["idempotency_key"]  # the SDK's key is passed on
    status, spend = deployment.owner_api("GET", f"/v1/agents/{_agent_id(deployment)}/spend")
    assert status == 200 and spend["data"][0]["amount"] == 1500
    confirmed = stripe_sdk.PaymentIntent.confirm(intent.id)
    assert confirmed.status == "succeeded"
    assert (
        deployment.owner_api("GET", f"/v1/agents/{_agent_id(deployment)}/spend")[1]["data"][0]["amount"]
        == 1500
    )


def test_denied_payment_raises_the_sdk_error_naming_the_rule(deployment: Deployment, stripe_sdk: Any) -> None:
    with pytest.raises(stripe.error.CardError) as caught:
        stripe_sdk.PaymentIntent.create(amount=1000, currency="eur")
    err = caught.value
    assert err.http_status == 402 and err.code == "usd_only"
    assert "usd_only" in str(err) and "USD only" in str(err)
    assert err.headers["stripe-should-retry"] == "false"
    with pytest.raises(stripe.error.CardError) as caught:
        stripe_sdk.PaymentIntent.create(amount=30000, currency="usd")
    assert caught.value.code == "per_payment_cap" and "200.00 USD" in str(caught.value)
    assert deployment.mock_payments() == []


def test_hold_then_cli_approval_forwards_exactly_once(deployment: Deployment, stripe_sdk: Any) -> None:
    with pytest.raises(stripe.error.CardError) as caught:
        stripe_sdk.PaymentIntent.create(amount=6000, currency="usd", idempotency_key="order-1")
    err = caught.value
    approval_id = err.json_body["error"]["paysentry"]["approval_id"]
    assert err.code == "approval_required" and approval_id in str(err) and "large_payment" in str(err)
    with pytest.raises(stripe.error.CardError):  # still held
        stripe_sdk.PaymentIntent.create(amount=6000, currency="usd", idempotency_key="order-1")
    listed = json.loads(deployment.cli("approvals", "list").stdout)
    assert [a["id"] for a in listed] == [approval_id]
    deployment.cli("approvals", "approve", approval_id, "--reason", "expected spend")
    first = stripe_sdk.PaymentIntent.create(amount=6000, currency="usd", idempotency_key="order-1")
    again = stripe_sdk.PaymentIntent.create(amount=6000, currency="usd", idempotency_key="order-1")
    assert first.id == again.id
    assert len(deployment.mock_payments()) == 1
    events = deployment.owner_api("GET", "/v1/events?after=0")[1]["data"]
    assert [e["type"] for e in events if e["authorization_id"]][-5:] == [
        "authorization.held",
        "approval.vote",
        "approval.approved",
        "authorization.forwarding",
        "authorization.settled",
    ]
    # the local CLI decides as the owner it names (an operator on the host); the vote says how
    approved = next(e for e in events if e["type"] == "approval.approved")
    vote = next(e for e in events if e["type"] == "approval.vote")
    assert approved["actor"] == "owner:acme" and vote["data"]["authenticated"]["via"] == "cli"


def test_denied_and_expired_holds_stay_refused_and_release(deployment: Deployment, stripe_sdk: Any) -> None:
    with pytest.raises(stripe.error.CardError) as caught:
        stripe_sdk.PaymentIntent.create(amount=6000, currency="usd", idempotency_key="deny-me")
    approval_id = caught.value.json_body["error"]["paysentry"]["approval_id"]
    status, body = deployment.owner_api("POST", f"/v1/approvals/{approval_id}/deny", {"reason": "not today"})
    assert status == 200 and body["state"] == "denied"
    with pytest.raises(stripe.error.CardError) as caught:
        stripe_sdk.PaymentIntent.create(amount=6000, currency="usd", idempotency_key="deny-me")
    assert caught.value.code == "approval_denied"

    with pytest.raises(stripe.error.CardError) as caught:
        stripe_sdk.PaymentIntent.create(amount=7000, currency="usd", idempotency_key="let-expire")
    expiring = caught.value.json_body["error"]["paysentry"]["approval_id"]
    wait_until(lambda: deployment.owner_api("GET", f"/v1/approvals/{expiring}")[1]["state"] == "expired")
    with pytest.raises(stripe.error.CardError) as caught:
        stripe_sdk.PaymentIntent.create(amount=7000, currency="usd", idempotency_key="let-expire")
    assert caught.value.code == "approval_expired"
    assert (
        deployment.owner_api("GET", f"/v1/agents/{_agent_id(deployment)}/spend")[1]["data"][0]["amount"] == 0
    )
    assert deployment.mock_payments() == []


def test_fifty_concurrent_payments_forward_exactly_the_daily_limit(
    deployment: Deployment, stripe_sdk: Any
) -> None:
    def pay(i: int) -> str:
        try:
            return stripe_sdk.PaymentIntent.create(amount=1000, currency="usd").id
        except stripe.error.CardError as exc:
            return f"refused:{exc.code}"

    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(pay, range(50)))
    assert sum(r.startswith("pi_") for r in results) == 10
    assert results.count("refused:daily_budget") == 40
    assert len(deployment.mock_payments()) == 10  # counted at the provider
    spend = deployment.owner_api("GET", f"/v1/agents/{_agent_id(deployment)}/spend")[1]["data"][0]
    assert (spend["amount"], spend["count"]) == (10000, 10)
    events = deployment.owner_api("GET", "/v1/events?after=0&limit=1000")[1]["data"]
    assert sum(e["type"] in ("authorization.forwarding", "authorization.denied") for e in events) == 50


def test_provider_refusal_releases_the_reservation(deployment: Deployment, stripe_sdk: Any) -> None:
    with pytest.raises(stripe.error.CardError) as caught:
        stripe_sdk.PaymentIntent.create(
            amount=2000, currency="usd", payment_method="pm_card_chargeDeclined", confirm=True
        )
    assert caught.value.code == "card_declined"  # the provider's own error, relayed unchanged
    assert (
        deployment.owner_api("GET", f"/v1/agents/{_agent_id(deployment)}/spend")[1]["data"][0]["amount"] == 0
    )


def test_reads_safe_writes_and_refunds(deployment: Deployment, stripe_sdk: Any) -> None:
    customer = stripe_sdk.Customer.create(email="agent@example.com")
    assert stripe_sdk.Customer.retrieve(customer.id).email == "agent@example.com"
    charge = stripe_sdk.Charge.create(amount=2500, currency="usd", source="tok_visa", customer=customer.id)
    refund = stripe_sdk.Refund.create(charge=charge.id)
    assert refund.amount == 2500
    auths = deployment.owner_api("GET", "/v1/authorizations")[1]["data"]
    assert {(a["operation"], a["amount"], a["state"]) for a in auths} == {
        ("charge", 2500, "settled"),
        ("refund", 2500, "settled"),
    }


def test_idempotency_key_reused_with_another_body(deployment: Deployment, stripe_sdk: Any) -> None:
    stripe_sdk.PaymentIntent.create(amount=1000, currency="usd", idempotency_key="k-1")
    with pytest.raises(stripe.error.IdempotencyError):
        stripe_sdk.PaymentIntent.create(amount=2000, currency="usd", idempotency_key="k-1")
    assert len(deployment.mock_payments()) == 1


def test_bad_requests_get_clear_errors_and_change_nothing(deployment: Deployment) -> None:
    auth = {"Authorization": f"Bearer {deployment.agent_token}"}
    cases = [
        (raw(deployment, "POST", "/v1/payment_intents", b"amount=1", {}), 401, "invalid_api_key"),
        (
            raw(
                deployment,
                "POST",
                "/v1/payment_intents",
                b"amount=1",
                {"Authorization": "Bearer " + deployment.agent_token[:-3] + "abc"},
            ),
            401,
            "invalid_api_key",
        ),
        (
            raw(
                deployment,
                "POST",
                "/v1/payment_intents",
                b"amount=1",
                {"Authorization": "Bearer sk_live_notours"},
            ),
            401,
            "invalid_api_key",
        ),
        (
            raw(deployment, "POST", "/v1/payment_intents", b"amount=ten&currency=usd", auth),
            400,
            "parameter_invalid",
        ),
        (
            raw(deployment, "POST", "/v1/payment_intents", b"amount=1&amount=2&currency=usd", auth),
            400,
            "parameter_invalid",
        ),
        (raw(deployment, "POST", "/v1/payment_intents", b"%ff%fe=1", auth), 400, "parameter_invalid"),
        (raw(deployment, "GET", "/admin/secrets", b"", auth), 404, "resource_missing"),
        (raw(deployment, "POST", "/v1/subscriptions", b"customer=cus_1", auth), 402, "unrecognized_write"),
        (
            raw(
                deployment,
                "POST",
                "/v1/payment_intents",
                b"amount=1&currency=usd",
                {**auth, "Stripe-Account": "acct_other"},
            ),
            403,
            "forbidden",
        ),
        (raw(deployment, "GET", "/v1/customers/..%2f..%2fadmin", b"", auth), 400, "parameter_invalid"),
    ]
    for (status, headers, body), want_status, want_code in cases:
        assert status == want_status, body
        assert body["error"]["code"] == want_code, body
        assert headers.get("Stripe-Should-Retry") == "false"  # the SDK must not retry a refusal
        assert body["error"]["message"]
        assert deployment.agent_token not in json.dumps(body)
    assert [r for r in deployment.mock() if r["method"] == "POST"] == []
    states = [a["state"] for a in deployment.owner_api("GET", "/v1/authorizations")[1]["data"]]
    assert states == ["denied"]  # only the unrecognized write was decided (and refused)


def test_revoked_agent_is_refused(deployment: Deployment, stripe_sdk: Any) -> None:
    stripe_sdk.Customer.create(email="x@example.com")
    status, _ = deployment.owner_api("POST", f"/v1/agents/{_agent_id(deployment)}/revoke")
    assert status == 200
    with pytest.raises(stripe.error.AuthenticationError):
        stripe_sdk.Customer.create(email="y@example.com")


def test_owner_api_needs_the_owner_token(deployment: Deployment) -> None:
    assert deployment.owner_api("GET", "/v1/agents", token="pso_0000000000000000_x")[0] == 401
    assert deployment.owner_api("GET", "/v1/agents", token=deployment.agent_token)[0] == 401
    status, body = deployment.owner_api("GET", "/readyz")
    assert status == 200 and body["ready"] is True


def test_against_a_separate_stripe_compatible_server(tmp_path: Path) -> None:
    """The `stripe` adapter in front of a Stripe-compatible server running as its own process."""
    from tests.e2e.conftest import mock_provider_process

    with mock_provider_process() as upstream:
        dep = make_deployment(tmp_path, provider="stripe", upstream=upstream)
        dep.start()
        try:
            stripe.api_base, stripe.api_key = dep.agent_url, dep.agent_token
            assert stripe.PaymentIntent.create(amount=1200, currency="usd").amount == 1200
            with pytest.raises(stripe.error.CardError):
                stripe.Transfer.create(amount=500, currency="eur", destination="acct_1")
            assert [r["path"] for r in dep.mock_payments()] == ["/v1/payment_intents"]
        finally:
            dep.stop()
        assert MOCK_SECRET not in dep.logs() and dep.agent_token not in dep.logs()


def _agent_id(dep: Deployment) -> str:
    return dep.owner_api("GET", "/v1/agents")[1]["data"][0]["id"]


def test_a_timeout_stays_counted_and_a_retry_with_the_same_key_learns_the_outcome(
    deployment: Deployment, stripe_sdk: Any
) -> None:
    slow = {
        "amount": 1000,
        "currency": "usd",
        "metadata": {"mock_delay_ms": "3500"},
        "idempotency_key": "slow-1",
    }
    with pytest.raises(stripe.error.APIError) as caught:  # upstream_timeout is 3 s in the test deployment
        stripe_sdk.PaymentIntent.create(**slow)
    assert caught.value.http_status == 502 and "not known yet" in str(caught.value)
    assert caught.value.headers["stripe-should-retry"] == "true"
    agent = _agent_id(deployment)
    spend = deployment.owner_api("GET", f"/v1/agents/{agent}/spend")[1]["data"][0]
    assert spend["amount"] == 1000  # the provider may have made it: still counted, nothing guessed
    # The SDK's own retries: re-sent with the same key (409 while the provider still works on it, then
    # the provider's replay), never decided anew.
    stripe_sdk.max_network_retries = 8
    intent = stripe_sdk.PaymentIntent.create(**slow)
    assert intent.amount == 1000
    assert len(deployment.mock_payments()) == 1  # executed once at the provider
    spend = deployment.owner_api("GET", f"/v1/agents/{agent}/spend")[1]["data"][0]
    assert (spend["amount"], spend["count"]) == (1000, 1)  # counted once
