"""The MercadoPago adapter: amounts to minor units by currency, routes, errors and notification signatures."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from decimal import Decimal

import pytest

from adapters import REGISTRY
from adapters.base import PASSTHROUGH, PAYMENT
from adapters.mercadopago import MercadoPagoAdapter, to_minor
from proxy.errors import BadRequest, WebhookRejected
from proxy.model import UNRECOGNIZED

ARS = MercadoPagoAdapter("ars")


@pytest.mark.parametrize(
    ("value", "currency", "minor"),
    [
        (Decimal("700.50"), "ars", 70050),
        (Decimal("123.45"), "brl", 12345),
        (15000, "clp", 15000),
        (Decimal("15000.0"), "clp", 15000),
        (Decimal("0.01"), "mxn", 1),
        (Decimal("1E+2"), "uyu", 10000),
    ],
)
def test_amounts_convert_by_the_currencys_exponent(value: object, currency: str, minor: int) -> None:
    assert to_minor(value, currency, "transaction_amount") == minor


@pytest.mark.parametrize(
    ("value", "currency", "says"),
    [
        (Decimal("1500.5"), "clp", r"more decimals than CLP allows \(0\)"),
        (Decimal("10.005"), "ars", r"more decimals than ARS allows \(2\)"),
        ("700.50", "ars", "must be a number"),
        (True, "ars", "must be a number"),
        (0, "ars", "positive"),
        (Decimal("-5"), "brl", "positive"),
        (Decimal("1E+20"), "ars", "positive"),
        (Decimal("NaN"), "ars", "decimals"),
    ],
)
def test_bad_amounts_are_refused_with_the_reason(value: object, currency: str, says: str) -> None:
    with pytest.raises(BadRequest, match=says) as raised:
        to_minor(value, currency, "transaction_amount")
    assert raised.value.param == "transaction_amount"


def body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def test_a_payment_is_normalized() -> None:
    sent = body(
        transaction_amount=700.5,
        description="cables",
        external_reference="order-9",
        payer={"email": "a@b.c"},
        metadata={"purpose": "office", "nested": {"x": 1}},
        additional_info={"items": [{"category_id": "electronics"}, {"category_id": "electronics"}, {}]},
    )
    classified = ARS.classify("POST", "/v1/payments", "application/json", sent)
    payment = classified.payment
    assert classified.kind == PAYMENT and payment is not None
    assert (payment.operation, payment.amount, payment.currency) == ("payment", 70050, "ars")
    assert payment.customer == "a@b.c" and payment.description == "cables"
    assert payment.categories == ("electronics",)
    assert payment.metadata == {"purpose": "office", "external_reference": "order-9"}
    assert payment.params["transaction_amount"] == 700.5


def test_routes() -> None:
    def kind(method: str, path: str, sent: bytes = b"") -> str:
        classified = ARS.classify(method, path, "application/json", sent)
        return classified.payment.operation if classified.payment else classified.kind

    assert kind("GET", "/v1/payments/123") == PASSTHROUGH
    assert kind("GET", "/users/me") == PASSTHROUGH
    assert kind("POST", "/v1/customers", body(email="x@y.z")) == PASSTHROUGH
    assert kind("POST", "/v1/card_tokens", body(card_id="1")) == PASSTHROUGH
    assert kind("PUT", "/v1/payments/123", body(status="cancelled")) == PASSTHROUGH
    assert kind("PUT", "/v1/payments/123", body(capture=True)) == PASSTHROUGH
    assert kind("PUT", "/v1/payments/123", body(capture=True, transaction_amount=99)) == UNRECOGNIZED
    assert kind("POST", "/v1/payments/123/refunds", b"") == "refund"
    assert kind("POST", "/checkout/preferences", body(items=[])) == UNRECOGNIZED
    assert kind("POST", "/v1/advanced_payments", body()) == UNRECOGNIZED
    assert (
        ARS.classify("PUT", "/v1/payments/123", "application/json", body(status="cancelled")).voids == "123"
    )
    assert ARS.classify("PUT", "/v1/payments/123", "application/json", body(capture=True)).voids is None
    refund = ARS.classify("POST", "/v1/payments/123/refunds", "application/json", body(amount=10.5)).payment
    assert refund is not None and (refund.amount, refund.refers_to) == (1050, "123")


@pytest.mark.parametrize(
    ("content_type", "sent", "says"),
    [
        ("application/x-www-form-urlencoded", b"transaction_amount=1", "application/json"),
        ("application/json", b"{not json", "not valid JSON"),
        ("application/json", b"[1]", "JSON object"),
        ("application/json", body(description="no amount"), "transaction_amount is required"),
        ("application/json", body(transaction_amount=1, currency_id="BRL"), "not this account's currency"),
        ("application/json", body(transaction_amount=1, payer="me"), "payer must be an object"),
        ("application/json", body(transaction_amount=1, additional_info={"items": "x"}), "items"),
    ],
)
def test_malformed_payments_are_refused(content_type: str, sent: bytes, says: str) -> None:
    with pytest.raises(BadRequest, match=says):
        ARS.classify("POST", "/v1/payments", content_type, sent)


def test_a_connection_must_name_its_accounts_currency() -> None:
    adapter = REGISTRY.adapter("mercadopago")
    assert adapter.settings["currency"].required
    assert adapter.configured({"currency": "BRL"}).currency == "brl"  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="needs the setting currency; its settings: currency .*ARS"):
        adapter.configured({})
    with pytest.raises(ValueError, match="'usd' is not a MercadoPago account's currency; one of ARS"):
        adapter.configured({"currency": "usd"})
    with pytest.raises(ValueError, match="unknown setting site .* its settings: currency"):
        adapter.configured({"currency": "ars", "site": "MLA"})


def test_each_declared_operation_is_what_its_example_path_classifies_as() -> None:
    bodies = {"payment": body(transaction_amount=10), "refund": body(amount=5)}
    assert set(ARS.operations) == set(bodies)
    for operation, path in ARS.operations.items():
        classified = ARS.classify("POST", path, "application/json", bodies[operation])
        assert classified.payment is not None and classified.payment.operation == operation


def test_a_signature_timestamp_in_other_digits_is_rejected_not_a_crash() -> None:
    with pytest.raises(WebhookRejected, match="no ts= and v1= parts"):
        ARS.verify_webhook({"x-signature": "ts=²,v1=ab"}, b"{}", "secret", 0, 300)


def test_a_handled_notification_is_acknowledged_with_a_200() -> None:
    reply = ARS.webhook_ack("recorded", {})
    assert reply.status == 200 and json.loads(reply.body) == {"received": True, "result": "recorded"}


def test_mercadopago_has_no_one_time_cards_and_retries_what_may_pass_later() -> None:
    assert not ARS.is_one_time_card({"operation": "payment", "metadata": {"paysentry_one_time": "true"}})
    assert [s for s in (0, 200, 400, 401, 404, 409, 429, 500, 503) if ARS.card_cancel_should_retry(s)] == [
        0,
        429,
        500,
        503,
    ]


def test_errors_have_mercadopagos_shape() -> None:
    reply = ARS.error(402, "policy", "no_gambling", "denied", extra={"rule": "no_gambling"})
    answer = json.loads(reply.body)
    assert reply.status == 402 and answer["status"] == 402 and answer["message"] == "denied"
    assert answer["error"] == "payment_required" and answer["cause"][0]["code"] == "no_gambling"
    assert answer["paysentry"] == {"rule": "no_gambling"}


def test_a_2xx_rejected_payment_is_declined() -> None:
    assert ARS.declined_in(body(id=1, status="approved")) is None
    assert "rejected" in (ARS.declined_in(body(id=1, status="rejected", status_detail="cc_x")) or "")
    assert ARS.provider_ref(body(id=123)) == "123"


def sign(data_id: str, request_id: str, ts: int, secret: str = "mp_secret") -> str:
    manifest = f"id:{data_id};request-id:{request_id};ts:{ts};"
    return f"ts={ts},v1={hmac.new(secret.encode(), manifest.encode(), hashlib.sha256).hexdigest()}"


def test_notifications_are_verified() -> None:
    now = int(time.time())
    note = body(id=555, action="payment.updated", type="payment", data={"id": "ABC123"})
    headers = {"x-signature": sign("abc123", "req-1", now), "x-request-id": "req-1"}
    event = ARS.verify_webhook(headers, note, "mp_secret", now, 300)
    assert (event.id, event.type, event.provider_ref, event.outcome) == (
        "555",
        "payment.updated",
        "abc123",
        None,
    )
    millis = {"x-signature": sign("abc123", "req-1", now * 1000), "x-request-id": "req-1"}
    assert ARS.verify_webhook(millis, note, "mp_secret", now, 300).id == "555"
    for bad, says in [
        ({}, "missing"),
        ({"x-signature": sign("abc123", "req-1", now, "guess"), "x-request-id": "req-1"}, "matches"),
        ({"x-signature": sign("abc123", "req-2", now), "x-request-id": "req-1"}, "matches"),
        ({"x-signature": sign("abc123", "req-1", now - 301), "x-request-id": "req-1"}, "tolerance"),
    ]:
        with pytest.raises(WebhookRejected, match=says):
            ARS.verify_webhook(bad, note, "mp_secret", now, 300)


def test_a_payment_is_tagged_with_its_authorization_keeping_the_agents_metadata() -> None:
    body = json.dumps({"transaction_amount": 700.50, "payment_method_id": "visa", "metadata": {"o": 1}})
    payment = ARS.classify("POST", "/v1/payments", "application/json", body.encode()).payment
    assert payment is not None
    tagged = ARS.attribute(payment, body.encode(), "auth_abc")
    sent = json.loads(tagged, parse_float=Decimal)
    assert sent["metadata"] == {"o": 1, "paysentry_authorization": "auth_abc"}
    assert sent["transaction_amount"] == Decimal("700.5") and sent["payment_method_id"] == "visa"
    assert ARS.attribute(payment, body.encode(), "auth_abc") == tagged
    refund = ARS.classify("POST", "/v1/payments/1/refunds", "application/json", b'{"amount": 1}').payment
    assert refund is not None and ARS.attribute(refund, b'{"amount": 1}', "auth_abc") == b'{"amount": 1}'
    with pytest.raises(BadRequest, match="set by PaySentry"):
        ARS.classify(
            "POST",
            "/v1/payments",
            "application/json",
            b'{"transaction_amount": 1, "metadata": {"paysentry_authorization": "auth_x"}}',
        )


def test_the_payee_is_the_collector_or_the_refunded_payment() -> None:
    marketplace = ARS.classify(
        "POST", "/v1/payments", "application/json", body(transaction_amount=10, collector_id=77)
    )
    assert marketplace.payment is not None
    assert (marketplace.payment.payee, marketplace.payment.payee_kind) == ("77", "collector")
    own = ARS.classify("POST", "/v1/payments", "application/json", body(transaction_amount=10))
    assert own.payment is not None and (own.payment.payee, own.payment.payee_kind) == ("", "collector")


def test_a_refund_is_bounded_by_what_the_payment_has_left() -> None:
    payment = {"id": 1, "currency_id": "ARS", "transaction_amount": 100, "transaction_amount_refunded": 40}
    read = json.dumps(payment).encode()

    def refund(body: bytes) -> object:
        classified = ARS.classify("POST", "/v1/payments/1/refunds", "application/json", body).payment
        assert classified is not None
        return ARS.amount_of(classified, read)

    assert refund(b'{"amount": 60}') == (6000, "ars")
    assert refund(b"") == (6000, "ars")  # no amount: all that is left
    with pytest.raises(BadRequest, match="has 60.00 ARS left to refund"):
        refund(b'{"amount": 60.01}')
