"""The official `mercadopago` SDK pays through the sidecar, against the mock MercadoPago upstream.

The agent holds only its PaySentry token; the SDK reaches the sidecar through an HttpClient that swaps
MercadoPago's base URL for the sidecar's (the SDK keeps its base URL in a private class attribute).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mercadopago
import pytest
from mercadopago.config import RequestOptions
from mercadopago.errors.exceptions import MPPaymentError
from mercadopago.http import HttpClient

from proxy.payments.calls import provider_idempotency_key
from tests.e2e.conftest import Deployment, make_deployment

API = "https://api.mercadopago.com"
POLICY = """
    name: latam
    limits:
      - {name: per_payment_cap, window: payment, currency: ars, max_amount: 5000000}
      - {name: daily_ars, window: day, currency: ars, max_amount: 10000000, operations: [payment]}
      - {name: refunds_ars, window: day, currency: ars, max_amount: 50000, operations: [refund]}
      - {name: daily_brl, window: day, currency: brl, max_amount: 100000, operations: [payment]}
      - {name: daily_clp, window: day, currency: clp, max_amount: 1000000, operations: [payment]}
    rules:
      - name: no_gambling
        effect: deny
        when: '"gambling" in payment.categories'
        message: agents do not buy gambling items
      - name: large_ars
        effect: hold
        when: payment.currency == "ars" && payment.amount > 2000000
        message: above 20,000.00 ARS needs a human
        hold_expiry: 1h
"""


class ViaSidecar(HttpClient):
    """The SDK's own HTTP client, sending to the sidecar instead of api.mercadopago.com."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        return super().request(method, url.replace(API, self.base_url, 1), **kwargs)


def sdk(dep: Deployment, token: str | None = None) -> Any:
    return mercadopago.SDK(token or dep.agent_token, http_client=ViaSidecar(dep.agent_url))


def keyed(key: str) -> Any:
    """Request options carrying the agent's own idempotency key (the SDK makes a new one per call)."""
    return RequestOptions(custom_headers={"x-idempotency-key": key})


def order(amount: Any, category: str = "electronics", **extra: Any) -> dict[str, Any]:
    return {
        "transaction_amount": amount,
        "description": "USB cables",
        "payment_method_id": "visa",
        "token": "card-token-1",
        "installments": 1,
        "payer": {"email": "buyer@example.com"},
        "additional_info": {"items": [{"title": "cable", "category_id": category, "quantity": 2}]},
        **extra,
    }


@pytest.fixture
def mp(tmp_path: Path) -> Iterator[Deployment]:
    dep = make_deployment(
        tmp_path,
        POLICY,
        provider="mercadopago",
        provider_args=("--setting", "currency=ARS"),
        secret_key="APP_USR-paysentry-mock-ars",
    )
    dep.start()
    yield dep
    dep.stop()


def mp_requests(dep: Deployment, path_prefix: str = "/v1/payments") -> list[dict[str, Any]]:
    return [r for r in dep.mock() if r["path"].startswith(path_prefix)]


@pytest.mark.e2e
def test_an_allowed_payment_is_forwarded_with_the_owners_token_and_counted(mp: Deployment) -> None:
    result = sdk(mp).payment().create(order(700.50), keyed("order-1"))
    assert result["status"] == 201, result
    payment = result["response"]
    assert payment["status"] == "approved" and payment["currency_id"] == "ARS"
    assert payment["transaction_amount"] == 700.5
    assert mp.spend("daily_ars") == (70050, 1)  # 700.50 ARS in centavos

    seen = mp_requests(mp)
    assert len(seen) == 1 and seen[0]["authorized"]  # the owner's access token, not the agent's
    assert seen[0]["idempotency_key"] == provider_idempotency_key(mp.agent_id, "order-1")  # per agent
    auth = mp.owner_api("GET", "/v1/authorizations")[1]["data"][0]
    assert auth["operation"] == "payment" and auth["state"] == "settled"
    assert auth["provider_ref"] == str(payment["id"])

    # A retry with the same key (the agent's own) counts once; the provider is not called again.
    again = sdk(mp).payment().create(order(700.50), keyed("order-1"))
    assert again["response"]["id"] == payment["id"]
    assert mp.spend("daily_ars") == (70050, 1) and len(mp_requests(mp)) == 1
    # The SDK's own per-call keys: each call is a new payment (see the README on retries).
    assert sdk(mp).payment().create(order(10))["status"] == 201
    assert mp.spend("daily_ars") == (71050, 2)


@pytest.mark.e2e
def test_a_denied_payment_gets_a_mercadopago_shaped_error_naming_the_rule(mp: Deployment) -> None:
    result = sdk(mp).payment().create(order(50, category="gambling"))
    assert result["status"] == 402
    body = result["response"]
    assert set(body) >= {"message", "error", "status", "cause"} and body["status"] == 402
    assert "no_gambling" in body["message"] and body["cause"][0]["code"] == "no_gambling"
    assert body["paysentry"]["rule"] == "no_gambling"
    with pytest.raises(MPPaymentError) as raised:
        result.raise_for_status()
    assert "no_gambling" in raised.value.message and raised.value.causes[0]["code"] == "no_gambling"
    assert mp_requests(mp) == [] and mp.spend("daily_ars") == (0, 0)

    # Bad input: a clear error, nothing counted or forwarded.
    bad = sdk(mp).payment().create(order("seven"))
    assert bad["status"] == 400 and "transaction_amount" in bad["response"]["message"]
    foreign = sdk(mp).payment().create(order(10, currency_id="BRL"))
    assert foreign["status"] == 400 and "ARS" in foreign["response"]["message"]
    assert mp_requests(mp) == []


@pytest.mark.e2e
def test_a_held_payment_goes_through_once_approved(mp: Deployment) -> None:
    held = sdk(mp).payment().create(order(25000), keyed("big-order"))
    assert held["status"] == 402
    approval_id = held["response"]["paysentry"]["approval_id"]
    assert "approval" in held["response"]["message"] and mp_requests(mp) == []

    status, _ = mp.owner_api("POST", f"/v1/approvals/{approval_id}/approve", {"reason": "known vendor"})
    assert status == 200
    paid = sdk(mp).payment().create(order(25000), keyed("big-order"))
    assert paid["status"] == 201 and paid["response"]["status"] == "approved"
    assert mp.spend("daily_ars") == (2500000, 1)
    assert len(mp_requests(mp)) == 1


@pytest.mark.e2e
def test_refunds_are_decided_in_the_payments_currency(mp: Deployment) -> None:
    payment = sdk(mp).payment().create(order(1000))["response"]
    partial = sdk(mp).refund().create(payment["id"], {"amount": 100.25})
    assert partial["status"] == 201 and partial["response"]["amount"] == 100.25
    assert mp.spend("refunds_ars") == (10025, 1)
    # Without an amount: what is left of the payment, looked up at the provider (899.75 ARS).
    over = sdk(mp).refund().create(payment["id"])
    assert over["status"] == 402 and over["response"]["cause"][0]["code"] == "refunds_ars"
    assert "899.75 ARS" in over["response"]["message"]
    assert mp.spend("refunds_ars") == (10025, 1)
    refunds = [r for r in mp_requests(mp) if r["path"].endswith("/refunds")]
    assert len(refunds) == 1
    # Reads pass through with the owner's token.
    read = sdk(mp).payment().get(payment["id"])
    assert read["status"] == 200 and read["response"]["transaction_amount_refunded"] == 100.25


@pytest.mark.e2e
def test_a_payment_the_provider_rejects_releases_its_spend(mp: Deployment) -> None:
    result = sdk(mp).payment().create(order(300, token="rejected"), keyed("rejected-1"))
    assert result["status"] == 201 and result["response"]["status"] == "rejected"
    assert mp.spend("daily_ars") == (0, 0)
    auth = mp.owner_api("GET", "/v1/authorizations")[1]["data"][0]
    assert auth["state"] == "failed"
    # The same key replays the provider's answer; nothing more is counted or sent.
    again = sdk(mp).payment().create(order(300, token="rejected"), keyed("rejected-1"))
    assert again["response"]["id"] == result["response"]["id"]
    assert len(mp_requests(mp)) == 1 and mp.spend("daily_ars") == (0, 0)


@pytest.mark.e2e
def test_amounts_land_in_each_currencys_minor_units(mp: Deployment) -> None:
    agents = {"ars": mp.agent_token}
    for currency in ("brl", "clp"):
        mp.cli(
            "provider",
            "add",
            "--provider",
            "mercadopago",
            "--name",
            currency,
            "--setting",
            f"currency={currency}",
            "--upstream",
            mp.mock_url,
            "--credentials-file",
            "-",
            stdin=json.dumps({"secret_key": f"APP_USR-paysentry-mock-{currency}"}),
        )
        created = json.loads(mp.cli("agent", "create", f"bot-{currency}", "--connection", currency).stdout)
        agents[currency] = created["token"]

    assert sdk(mp, agents["ars"]).payment().create(order(1234.56))["status"] == 201
    assert sdk(mp, agents["brl"]).payment().create(order(123.45))["status"] == 201
    assert sdk(mp, agents["clp"]).payment().create(order(15000))["status"] == 201
    decided = {a["currency"]: a["amount"] for a in mp.owner_api("GET", "/v1/authorizations")[1]["data"]}
    assert decided == {"ars": 123456, "brl": 12345, "clp": 15000}

    # CLP has no decimals: an amount with centavos is refused, not rounded.
    fraction = sdk(mp, agents["clp"]).payment().create(order(1500.5))
    assert fraction["status"] == 400 and "CLP" in fraction["response"]["message"]
    # A connection without its account's currency cannot be added.
    refused = mp.cli(
        "provider",
        "add",
        "--provider",
        "mercadopago",
        "--name",
        "nocurrency",
        "--credentials-file",
        "-",
        stdin=json.dumps({"secret_key": "APP_USR-x"}),
        check=False,
    )
    assert refused.returncode != 0 and "needs the setting currency" in refused.stderr


@pytest.mark.e2e
def test_a_payment_cancelled_through_the_sidecar_releases_its_spend(mp: Deployment) -> None:
    payment = sdk(mp).payment().create(order(300, capture=False))["response"]
    assert mp.spend("daily_ars") == (30000, 1)
    steered = urllib.request.Request(  # a capture moves money: nothing of it travels beside the body
        f"{mp.agent_url}/v1/payments/{payment['id']}?transaction_amount=1",
        b'{"capture": true}',
        {"Authorization": f"Bearer {mp.agent_token}", "Content-Type": "application/json"},
        method="PUT",
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(steered, timeout=10)
    assert refused.value.code == 400 and b"query parameters" in refused.value.read()
    captured = sdk(mp).payment().update(payment["id"], {"capture": True})  # counted at creation
    assert captured["status"] == 200 and mp.spend("daily_ars") == (30000, 1)
    other = sdk(mp).payment().create(order(200))["response"]
    cancelled = sdk(mp).payment().update(other["id"], {"status": "cancelled"})
    assert cancelled["status"] == 200 and cancelled["response"]["status"] == "cancelled"
    assert mp.spend("daily_ars") == (30000, 1)
    states = {a["provider_ref"]: a["state"] for a in mp.owner_api("GET", "/v1/authorizations")[1]["data"]}
    assert states == {str(payment["id"]): "settled", str(other["id"]): "voided"}
    # Any other change to a payment is a write PaySentry does not know: refused.
    changed = sdk(mp).payment().update(payment["id"], {"transaction_amount": 9999})
    assert changed["status"] == 402 and changed["response"]["cause"][0]["code"] == "unrecognized_write"


@pytest.mark.e2e
def test_a_payment_authorized_outside_paysentry_is_not_captured_through_it(mp: Deployment) -> None:
    """An authorized payment the owner made elsewhere (straight at MercadoPago) is not an agent's to
    capture: its capture would move money no policy decided."""
    made = urllib.request.Request(
        f"{mp.mock_url}/v1/payments",
        json.dumps(order(500, capture=False)).encode(),
        {
            "Authorization": "Bearer APP_USR-paysentry-mock-ars",
            "Content-Type": "application/json",
            "X-Idempotency-Key": "made-at-the-dashboard",
        },
        method="POST",
    )
    with urllib.request.urlopen(made, timeout=10) as resp:
        outside = json.loads(resp.read())
    assert outside["captured"] is False
    captured = sdk(mp).payment().update(outside["id"], {"capture": True})
    assert captured["status"] == 403, captured
    assert not [r for r in mp_requests(mp) if r["method"] == "PUT"]  # never reached MercadoPago
