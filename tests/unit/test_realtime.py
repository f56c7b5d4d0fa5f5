"""Real-time card authorizations fail closed: a slow, failing or buggy store declines within the deadline."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from typing import Any

import pytest
from opentelemetry import trace

from adapters.base import AuthorizationRequest
from adapters.stripe import StripeAdapter
from proxy.connections import Connection
from proxy.errors import StoreUnavailable
from proxy.metrics import Metrics
from proxy.payments.cards import CardAuthorizer

ADAPTER = StripeAdapter()


def request() -> AuthorizationRequest:
    obj = {
        "id": "iauth_1",
        "pending_request": {"amount": 1200, "currency": "usd"},
        "merchant_data": {"name": "Shop", "category": "book_stores", "country": "US"},
        "card": {"id": "ic_1", "cardholder": {"id": "ich_1"}},
    }
    body = json.dumps(
        {"id": "evt_1", "type": "issuing_authorization.request", "data": {"object": obj}}
    ).encode()
    now = int(time.time())
    mac = hmac.new(b"whsec", f"{now}.".encode() + body, hashlib.sha256).hexdigest()
    event = ADAPTER.verify_webhook({"Stripe-Signature": f"t={now},v1={mac}"}, body, "whsec", now, 300)
    assert event.request is not None
    return event.request


def test_a_request_becomes_a_payment_with_its_merchant() -> None:
    payment = request().payment
    assert (payment.operation, payment.amount, payment.currency) == ("issuing_authorization", 1200, "usd")
    assert payment.refers_to == "ic_1" and payment.customer == "ich_1" and payment.destination == "Shop"
    assert payment.categories == ("book_stores",) and payment.merchant["country"] == "US"


class SlowStore:
    async def find_by_provider_ref(self, owner_id: str, ref: str) -> Any:
        await asyncio.sleep(30)


class BuggyStore:
    async def find_by_provider_ref(self, owner_id: str, ref: str) -> Any:
        raise KeyError("a bug")


class BrokenStore:
    async def find_by_provider_ref(self, owner_id: str, ref: str) -> Any:
        raise StoreUnavailable("the store is unavailable")


@pytest.mark.parametrize(
    ("store", "rule"),
    [
        (SlowStore(), "deadline"),
        (BrokenStore(), "paysentry_store_unavailable"),
        (BuggyStore(), "paysentry_internal_error"),
    ],
)
async def test_no_decision_in_time_declines(store: Any, rule: str) -> None:
    cards = CardAuthorizer(
        None,  # type: ignore[arg-type]  # never reached: the store fails first
        store,
        Metrics(otlp=False),
        trace.get_tracer("test"),
        0.2,
    )
    connection = Connection("conn_1", "own_1", ADAPTER, "http://127.0.0.1:1", {"secret_key": "sk"})
    started = time.monotonic()
    reply = await cards.authorize(connection, request())
    assert time.monotonic() - started < 5  # bounded by the deadline, not by the slow store
    answer = json.loads(reply.body)
    assert reply.status == 200 and answer["approved"] is False
    assert answer["metadata"]["paysentry_rule"] == rule
