"""The x402 adapter: a 402 pinned to PaySentry's registry, signed with the SDK, and the answer after it."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest
from eth_account import Account
from x402.http.utils import decode_payment_signature_header

from adapters.mock_x402 import PAY_TO, USDC, Facilitator
from adapters.x402 import REFUSED, SETTLED, UNKNOWN, X402Adapter, origin_of, parse_settings
from proxy.errors import BadRequest, Forbidden

KEY = "0x4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"
ADAPTER = X402Adapter().configured({"allowed_origins": "https://api.example.com, http://127.0.0.1:4021"})


def required(**changes: Any) -> dict[str, str]:
    requirement = {
        "scheme": "exact",
        "network": "eip155:84532",
        "asset": USDC,
        "amount": "10000",
        "payTo": PAY_TO,
        "maxTimeoutSeconds": 60,
        "extra": {"name": "USDC", "version": "2"},
        **changes,
    }
    body = {"x402Version": 2, "resource": {"url": "https://api.example.com/r"}, "accepts": [requirement]}
    return {"PAYMENT-REQUIRED": base64.b64encode(json.dumps(body).encode()).decode()}


def test_a_402_becomes_a_payment_in_minor_units_of_the_registry_asset() -> None:
    quote = ADAPTER.quote(402, required(), b"")
    payment = ADAPTER.payment(quote, "GET", "https://api.example.com/r?q=1")
    assert (payment.operation, payment.amount, payment.currency, payment.destination) == (
        "x402",
        10000,
        "usdc",
        PAY_TO,
    )
    assert payment.x402["origin"] == "https://api.example.com" and payment.x402["network"] == "eip155:84532"
    assert quote.asset.decimals == 6


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"scheme": "upto"}, "scheme 'upto' is not supported"),
        ({"extra": {"assetTransferMethod": "permit2"}}, "permit2"),
        ({"network": "eip155:1"}, "not one this connection signs on"),
        ({"asset": "0x1111111111111111111111111111111111111111"}, "not in PaySentry's registry"),
        ({"extra": {"name": "Fake USDC", "version": "2"}}, "signing domain name"),
        ({"amount": "-5"}, "not a positive integer"),
        ({"amount": "١٠"}, "not a positive integer"),
        ({"payTo": "me"}, "not an EVM address"),
    ],
)
def test_what_paysentry_will_not_sign_is_refused_clearly(changes: dict[str, Any], why: str) -> None:
    with pytest.raises(BadRequest) as refused:
        ADAPTER.quote(402, required(**changes), b"")
    assert refused.value.code == "x402_unsupported" and why in refused.value.message


def test_only_allowed_origins_are_reached() -> None:
    assert ADAPTER.target("https://API.example.com:443/x") == "https://API.example.com:443/x"
    for url in (
        "https://other.example.com/x",
        "http://api.example.com/x",
        "https://user:pw@api.example.com/",
    ):
        with pytest.raises((Forbidden, BadRequest)):
            ADAPTER.target(url)
    assert origin_of("http://127.0.0.1:4021/report") == "http://127.0.0.1:4021"
    with pytest.raises(ValueError, match="needs allowed_origins"):
        parse_settings({})
    with pytest.raises(ValueError, match="not an origin"):
        parse_settings({"allowed_origins": "https://api.example.com/path"})


def test_the_signature_uses_the_registry_domain_and_verifies_offline() -> None:
    quote = ADAPTER.quote(402, required(maxTimeoutSeconds=86400, extra={}), b"")  # no domain in the 402
    signed = ADAPTER.sign(quote, KEY, time.time())
    assert signed.payer == Account.from_key(KEY).address
    assert signed.valid_before <= time.time() + 601  # capped: an unknown outcome is bounded in time
    name, header = signed.header
    payload = decode_payment_signature_header(header)
    assert name == "PAYMENT-SIGNATURE" and payload.x402_version == 2
    body = {
        "paymentPayload": payload.model_dump(by_alias=True),
        "paymentRequirements": json.loads(base64.b64decode(required()["PAYMENT-REQUIRED"]))["accepts"][0],
    }
    assert Facilitator().check(body) == (signed.payer, None)  # EIP-712 signer recovered with eth-account


def receipt(**fields: Any) -> dict[str, str]:
    answer = {
        "success": True,
        "payer": Account.from_key(KEY).address,
        "transaction": "0xabc",
        "network": "eip155:84532",
        "amount": "10000",
        **fields,
    }
    return {"PAYMENT-RESPONSE": base64.b64encode(json.dumps(answer).encode()).decode()}


@pytest.mark.parametrize(
    ("status", "headers", "outcome"),
    [
        (200, receipt(), SETTLED),
        (200, receipt(amount="20000"), UNKNOWN),
        (200, receipt(payer="0x0000000000000000000000000000000000000001"), UNKNOWN),
        (200, receipt(network="eip155:8453"), UNKNOWN),
        (200, receipt(amount=None), UNKNOWN),
        (402, receipt(success=False, errorReason="boom"), UNKNOWN),  # settlement failed: may still move
        (402, {}, REFUSED),  # verification refused before settlement
        (200, {}, UNKNOWN),
        (502, {}, UNKNOWN),
        (200, {"PAYMENT-RESPONSE": "not base64 json"}, UNKNOWN),
    ],
)
def test_only_a_matching_settlement_commits(status: int, headers: dict[str, str], outcome: str) -> None:
    quote = ADAPTER.quote(402, required(), b"")
    signed = ADAPTER.sign(quote, KEY, time.time())
    assert ADAPTER.settlement(quote, signed, status, headers).outcome == outcome
