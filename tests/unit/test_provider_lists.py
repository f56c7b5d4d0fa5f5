"""Reading the providers' own records: each adapter's list pages (targets, cursors, objects) against the
built-in mock provider's list endpoints, which filter and page as Stripe's and MercadoPago's do."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from adapters.base import MOVED, NOT_MOVED, PENDING, ProviderObject
from adapters.mercadopago import MercadoPagoAdapter, payment_object
from adapters.mock import DEFAULT_SECRET_KEY, MockProvider
from adapters.stripe import StripeAdapter, stripe_object

STRIPE = StripeAdapter()
ARS = MercadoPagoAdapter("ars")
MP_TOKEN = "APP_USR-paysentry-mock-ars"


@pytest.fixture
async def mock() -> AsyncIterator[TestClient[Any, Any]]:
    client = TestClient(TestServer(MockProvider().app()))
    await client.start_server()
    yield client
    await client.close()


async def stripe_post(client: TestClient[Any, Any], path: str, form: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {DEFAULT_SECRET_KEY}"}
    resp = await client.post(
        path, data=form, headers={**headers, "Content-Type": "application/x-www-form-urlencoded"}
    )
    body = await resp.json()
    return body["error"]["payment_intent"] if resp.status == 402 else body


async def read_all(
    client: TestClient[Any, Any], adapter: Any, token: str, since: float
) -> list[ProviderObject]:
    """Every object of every list, following each page's cursor as the reconciler does."""
    objects, pages = [], 0
    for target in adapter.listings(since, time.time() + 5):
        next_target = target
        while next_target is not None:
            resp = await client.get(next_target, headers={"Authorization": f"Bearer {token}"})
            assert resp.status == 200, await resp.text()
            page = adapter.page(next_target, await resp.read())
            objects += page.objects
            next_target, pages = page.next, pages + 1
    assert pages >= 1
    return objects


async def test_stripe_lists_are_read_to_the_last_page_with_each_objects_outcome_and_tag(
    mock: TestClient[Any, Any],
) -> None:
    since = time.time() - 1
    for i in range(103):  # past one page of 100
        await stripe_post(mock, "/v1/payment_intents", f"amount={100 + i}&currency=usd&confirm=true")
    tagged = await stripe_post(
        mock, "/v1/payment_intents", "amount=5&currency=USD&metadata[paysentry_authorization]=auth_1"
    )
    declined = await stripe_post(
        mock,
        "/v1/payment_intents",
        "amount=7&currency=usd&confirm=true&payment_method=pm_card_chargeDeclined",
    )
    await stripe_post(mock, "/v1/payouts", "amount=900&currency=usd")
    refund_of = await stripe_post(mock, "/v1/payment_intents", "amount=50&currency=usd&confirm=true")
    await stripe_post(mock, "/v1/refunds", f"payment_intent={refund_of['id']}&amount=20")
    objects = await read_all(mock, STRIPE, DEFAULT_SECRET_KEY, since)
    by_ref = {o.ref: o for o in objects}
    assert len(objects) == len(by_ref) == 103 + 3 + 1 + 1  # every object once, across pages
    assert by_ref[tagged["id"]].authorization == "auth_1" and by_ref[tagged["id"]].outcome == PENDING
    assert by_ref[tagged["id"]].currency == "usd"
    assert by_ref[declined["id"]].outcome == NOT_MOVED  # declined: made, nothing moved
    refunds = [o for o in objects if o.operation == "refund"]
    assert [(o.amount, o.outcome) for o in refunds] == [(20, MOVED)]
    [payout] = [o for o in objects if o.operation == "payout"]
    assert payout.outcome == PENDING and payout.amount == 900
    assert json.loads(by_ref[refund_of["id"]].body)["amount_refunded"] == 20


async def test_stripe_lists_honour_the_window(mock: TestClient[Any, Any]) -> None:
    await stripe_post(mock, "/v1/payment_intents", "amount=100&currency=usd")
    assert await read_all(mock, STRIPE, DEFAULT_SECRET_KEY, time.time() + 2) == []


def test_a_stripe_list_page_gives_the_cursor_after_its_last_object() -> None:
    body = json.dumps(
        {
            "object": "list",
            "has_more": True,
            "data": [
                {
                    "id": "pi_2",
                    "object": "payment_intent",
                    "amount": 10,
                    "currency": "eur",
                    "status": "canceled",
                    "created": 5,
                },
                {
                    "id": "ch_1",
                    "object": "charge",
                    "payment_intent": "pi_2",
                    "amount": 10,
                    "status": "succeeded",
                },
                {"id": "tr_1", "object": "transfer", "amount": 3, "currency": "usd", "reversed": True},
            ],
        }
    ).encode()
    page = STRIPE.page("/v1/payment_intents?created%5Bgte%5D=1&limit=100&starting_after=pi_1", body)
    assert page.next == "/v1/payment_intents?created%5Bgte%5D=1&limit=100&starting_after=tr_1"
    assert [(o.ref, o.outcome, o.created) for o in page.objects] == [
        ("pi_2", NOT_MOVED, 5.0),
        ("tr_1", NOT_MOVED, 0.0),
    ]
    with pytest.raises(ValueError):
        STRIPE.page("/v1/payouts?limit=100", b'{"error": {"type": "api_error"}}')
    card = stripe_object(
        {
            "id": "ic_1",
            "object": "issuing.card",
            "currency": "usd",
            "status": "canceled",
            "spending_controls": {"spending_limits": [{"amount": 300, "interval": "all_time"}]},
        }
    )
    assert card is not None and (card.operation, card.amount, card.outcome) == ("issuing_card", 300, MOVED)


async def test_mercadopago_search_is_paged_by_offset_and_names_the_authorization(
    mock: TestClient[Any, Any],
) -> None:
    since = time.time() - 1
    headers = {"Authorization": f"Bearer {MP_TOKEN}", "X-Idempotency-Key": ""}
    for i, extra in enumerate(
        ({}, {"metadata": {"paysentry_authorization": "auth_mp"}}, {"token": "rejected"})
    ):
        body = {"transaction_amount": 10.5 + i, "payment_method_id": "visa", **extra}
        resp = await mock.post("/v1/payments", json=body, headers={**headers, "X-Idempotency-Key": f"k{i}"})
        assert resp.status == 201
    [first] = ARS.listings(since, time.time() + 5)
    assert first.startswith("/v1/payments/search?range=date_created&begin_date=")
    small = first.replace("limit=100", "limit=2")  # pages of two: the cursor is the offset
    resp = await mock.get(small, headers=headers)
    page = ARS.page(small, await resp.read())
    assert len(page.objects) == 2 and page.next is not None and "offset=2" in page.next
    resp = await mock.get(page.next, headers=headers)
    last = ARS.page(page.next, await resp.read())
    assert last.next is None
    objects = [*page.objects, *last.objects]
    assert [(o.amount, o.outcome, o.authorization) for o in objects] == [
        (1050, MOVED, None),
        (1150, MOVED, "auth_mp"),
        (1250, NOT_MOVED, None),
    ]
    assert all(o.currency == "ars" and abs(o.created - time.time()) < 60 for o in objects)
    with pytest.raises(ValueError):
        ARS.page(first, b'{"message": "nope"}')
    pending = payment_object({"id": 7, "status": "in_process", "currency_id": "ARS", "transaction_amount": 1})
    assert pending is not None and pending.outcome == PENDING and pending.amount == 100
