"""The Stripe adapter: route recognition, bracketed form bodies, and Stripe-shaped errors."""

from __future__ import annotations

import hashlib
import hmac
import json
from urllib.parse import urlencode

import pytest

from adapters.formencode import parse_form
from adapters.mock import MockAdapter
from adapters.stripe import StripeAdapter
from proxy.errors import BadRequest, RouteNotFound, WebhookRejected

FORM = "application/x-www-form-urlencoded"
STRIPE = StripeAdapter()


def classify(path: str, params: dict[str, str] | str, method: str = "POST"):
    body = params if isinstance(params, str) else urlencode(params)
    return STRIPE.classify(method, path, FORM, body.encode())


def test_bracketed_keys_become_nested_values() -> None:
    parsed = parse_form(
        b"a=1&metadata[purpose]=ads&metadata[k]=&items[0][price]=p1&items[1][price]=p2"
        b"&expand[]=x&expand[]=y&transfer_data[destination]=acct_1"
    )
    assert parsed == {
        "a": "1",
        "metadata": {"purpose": "ads", "k": ""},
        "items": [{"price": "p1"}, {"price": "p2"}],
        "expand": ["x", "y"],
        "transfer_data": {"destination": "acct_1"},
    }
    assert parse_form("items[²]=a&items[٣]=b".encode()) == {"items": {"²": "a", "٣": "b"}}  # not indexes


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"amount=1&amount=2", "amount"),
        (b"metadata=x&metadata[k]=v", "metadata[k]"),
        (b"a]b=1", "a]b"),
        (b"a[[b]=1", "a[[b]"),
    ],
)
def test_ambiguous_bodies_are_refused_with_the_parameter(body: bytes, param: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_form(body)
    assert caught.value.param == param


def test_payment_intent_is_normalized() -> None:
    call = classify(
        "/v1/payment_intents",
        {
            "amount": "2000",
            "currency": "USD",
            "customer": "cus_1",
            "transfer_data[destination]": "acct_9",
            "metadata[purpose]": "ads",
            "description": "ads",
        },
    )
    p = call.payment
    assert call.kind == "payment" and p is not None
    assert (p.operation, p.amount, p.currency, p.destination, p.customer) == (
        "payment_intent",
        2000,
        "usd",
        "acct_9",
        "cus_1",
    )
    assert p.metadata == {"purpose": "ads"}
    assert p.params["transfer_data"] == {"destination": "acct_9"}


@pytest.mark.parametrize(
    ("path", "params", "operation", "amount", "destination"),
    [
        (
            "/v1/charges",
            {"amount": "500", "currency": "usd", "destination[account]": "acct_2"},
            "charge",
            500,
            "acct_2",
        ),
        (
            "/v1/transfers",
            {"amount": "700", "currency": "usd", "destination": "acct_3"},
            "transfer",
            700,
            "acct_3",
        ),
        ("/v1/payouts", {"amount": "900", "currency": "usd", "destination": "ba_1"}, "payout", 900, "ba_1"),
        ("/v1/refunds", {"charge": "ch_1", "amount": "100"}, "refund", 100, "ch_1"),
        (
            "/v1/issuing/cards",
            {
                "currency": "usd",
                "cardholder": "ich_1",
                "type": "virtual",
                "spending_controls[spending_limits][0][amount]": "5000",
                "spending_controls[spending_limits][0][interval]": "all_time",
            },
            "issuing_card",
            5000,
            "ich_1",
        ),
        (
            "/v1/payment_intents/pi_123/capture",
            {"amount_to_capture": "300"},
            "payment_intent.capture",
            300,
            "",
        ),
        ("/v1/payment_intents/pi_123/confirm", {}, "payment_intent.confirm", 0, ""),
        (
            "/v1/payment_intents/pi_123/increment_authorization",
            {"amount": "4500"},
            "payment_intent.increment_authorization",
            4500,
            "",
        ),
        ("/v1/charges/ch_123/capture", {"amount": "1200"}, "charge.capture", 1200, ""),
        ("/v1/charges/ch_123/capture", {}, "charge.capture", 0, ""),
    ],
)
def test_money_routes(
    path: str, params: dict[str, str], operation: str, amount: int, destination: str
) -> None:
    p = classify(path, params).payment
    assert p is not None
    assert (p.operation, p.amount, p.destination) == (operation, amount, destination)


def test_reads_and_safe_writes_pass_through() -> None:
    assert classify("/v1/customers/cus_1", "", "GET").kind == "passthrough"
    assert classify("/v1/customers", {"email": "a@b.c"}).kind == "passthrough"
    assert classify("/v1/payment_methods/pm_1/attach", {"customer": "cus_1"}).kind == "passthrough"


def test_unknown_writes_are_unrecognized_not_forwarded() -> None:
    p = classify("/v1/subscriptions", {"customer": "cus_1"}).payment
    assert p is not None and p.operation == "unrecognized"
    p = classify("/v1/payment_intents/pi_1", {"amount": "99999"}).payment  # an update can change the amount
    assert p is not None and p.operation == "unrecognized"


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"currency": "usd"}, "amount"),
        ({"amount": "10.5", "currency": "usd"}, "amount"),
        ({"amount": "-5", "currency": "usd"}, "amount"),
        ({"amount": "²", "currency": "usd"}, "amount"),  # a digit to str.isdigit, not a number
        ({"amount": "100"}, "currency"),
        ({"amount": "100", "currency": "dollars"}, "currency"),
        ({"amount": "100", "currency": "usd", "metadata": "x"}, "metadata"),
    ],
)
def test_bad_payments_name_the_parameter(params: dict[str, str], param: str) -> None:
    with pytest.raises(BadRequest) as caught:
        classify("/v1/payment_intents", params)
    assert caught.value.param == param


def test_cards_need_a_spending_limit() -> None:
    with pytest.raises(BadRequest) as caught:
        classify("/v1/issuing/cards", {"currency": "usd", "cardholder": "ich_1"})
    assert caught.value.param == "spending_controls[spending_limits]"


def test_json_bodies_and_foreign_paths_are_refused() -> None:
    with pytest.raises(BadRequest):
        STRIPE.classify("POST", "/v1/payment_intents", "application/json", b'{"amount": 1}')
    with pytest.raises(RouteNotFound):
        classify("/admin", "", "GET")


def test_errors_are_stripe_shaped_and_not_retryable() -> None:
    reply = STRIPE.error(402, "policy", "daily_budget", "over budget", extra={"rule": "daily_budget"})
    body = json.loads(reply.body)
    assert reply.status == 402
    assert reply.headers["Stripe-Should-Retry"] == "false"
    assert body["error"]["code"] == "daily_budget"
    assert body["error"]["message"] == "over budget"
    assert body["error"]["paysentry"] == {"rule": "daily_budget"}


def test_a_card_is_forwarded_with_exactly_the_approved_controls() -> None:
    from adapters.formencode import encode_form, parse_form
    from adapters.stripe import StripeAdapter

    adapter = StripeAdapter()
    sent = (
        b"cardholder=ich_1&currency=usd&type=virtual"
        b"&spending_controls[spending_limits][0][amount]=5000&spending_controls[spending_limits][0][interval]=daily"
        b"&spending_controls[spending_limits][1][amount]=900&spending_controls[spending_limits][1][interval]=per_authorization"
        b"&spending_controls[allowed_categories][0]=book_stores&spending_controls[blocked_categories][0]=taxicabs_limousines"
        b"&metadata[paysentry_one_time]=true"
    )
    payment = adapter.classify("POST", "/v1/issuing/cards", "application/x-www-form-urlencoded", sent).payment
    assert payment is not None and payment.amount == 5000 and payment.categories == ("book_stores",)
    out = parse_form(adapter.prepare(payment, sent))
    assert out["spending_controls"] == {
        "spending_limits": [{"amount": "5000", "interval": "all_time"}],
        "allowed_categories": ["book_stores"],
        "blocked_categories": ["taxicabs_limousines"],
    }
    assert out["cardholder"] == "ich_1" and out["metadata"] == {"paysentry_one_time": "true"}
    # Other payments are forwarded byte for byte.
    intent = b"amount=100&currency=usd"
    other = adapter.classify(
        "POST", "/v1/payment_intents", "application/x-www-form-urlencoded", intent
    ).payment
    assert other is not None and adapter.prepare(other, intent) == intent
    nested = {"a": "1", "b": {"c": ["x", "y"], "d": {"e": "ü &="}}}
    assert parse_form(encode_form(nested)) == nested


MONEY_BODY = {
    "amount": "100",
    "currency": "usd",
    "destination": "acct_1",
    "charge": "ch_1",
    "spending_controls[spending_limits][0][amount]": "100",
    "spending_controls[spending_limits][0][interval]": "daily",
}


def signed(event: dict[str, object], now: int = 1_800_000_000) -> tuple[dict[str, str], bytes]:
    body = json.dumps(event).encode()
    mac = hmac.new(b"whsec", f"{now}.".encode() + body, hashlib.sha256).hexdigest()
    return {"Stripe-Signature": f"t={now},v1={mac}"}, body


def test_each_declared_operation_is_what_its_example_path_produces() -> None:
    for operation, path in STRIPE.operations.items():
        if operation == "issuing_authorization":  # asked for by a webhook, not by an agent's call
            continue
        call = classify(path, MONEY_BODY)
        assert call.payment is not None and call.payment.operation == operation, path
    headers, body = signed(
        {
            "id": "evt_1",
            "type": "issuing_authorization.request",
            "data": {"object": {"id": "iauth_example", "amount": 5, "currency": "usd", "card": "ic_1"}},
        }
    )
    request = STRIPE.verify_webhook(headers, body, "whsec", 1_800_000_000, 300).request
    assert request is not None
    assert STRIPE.operations[request.payment.operation] == request.payment.path


def test_a_signature_timestamp_in_other_digits_is_rejected_not_a_crash() -> None:
    with pytest.raises(WebhookRejected, match="no t= and v1= parts"):
        STRIPE.verify_webhook({"Stripe-Signature": "t=²,v1=ab"}, b"{}", "whsec", 0, 300)


def test_stripe_takes_no_connection_settings() -> None:
    assert STRIPE.configured({}) is STRIPE
    with pytest.raises(
        ValueError, match="unknown setting currency for a stripe connection; its settings: none"
    ):
        STRIPE.configured({"currency": "usd"})


def test_a_handled_event_is_acknowledged_with_a_200_saying_what_was_done() -> None:
    reply = STRIPE.webhook_ack("recorded", {"card": "cancelled"})
    assert reply.status == 200 and reply.headers["Content-Type"] == "application/json"
    assert json.loads(reply.body) == {"received": True, "result": "recorded", "card": "cancelled"}


@pytest.mark.parametrize(
    ("summary", "one_time"),
    [
        ({"operation": "issuing_card", "metadata": {"paysentry_one_time": "true"}}, True),
        ({"operation": "issuing_card", "metadata": {"paysentry_one_time": "false"}}, False),
        ({"operation": "issuing_card", "metadata": {}}, False),
        ({"operation": "issuing_card"}, False),
        ({"operation": "issuing_card", "metadata": "paysentry_one_time"}, False),
        ({"operation": "payment_intent", "metadata": {"paysentry_one_time": "true"}}, False),
    ],
)
def test_a_card_is_one_time_when_created_with_the_flag(summary: dict[str, object], one_time: bool) -> None:
    assert STRIPE.is_one_time_card(summary) is one_time


def test_cancelling_a_card_is_retried_unless_stripe_refused_the_change() -> None:
    statuses = (0, 200, 400, 401, 402, 403, 404, 409, 429, 500, 502)
    assert [s for s in statuses if STRIPE.card_cancel_should_retry(s)] == [0, 401, 403, 409, 429, 500, 502]


def test_the_mock_provider_is_stripe_behind_the_port() -> None:
    mock = MockAdapter()
    assert mock.operations == STRIPE.operations and mock.settings == STRIPE.settings
    assert mock.webhook_ack("voided", {}).body == STRIPE.webhook_ack("voided", {}).body
    assert mock.is_one_time_card({"operation": "issuing_card", "metadata": {"paysentry_one_time": "true"}})
    assert mock.card_cancel_should_retry(429) and not mock.card_cancel_should_retry(404)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/payment_intents", "amount=1000&currency=usd&metadata[order]=42"),
        ("/v1/payouts", "amount=500&currency=usd"),
        ("/v1/transfers", "amount=500&currency=usd&destination=acct_1&metadata="),
        (
            "/v1/issuing/cards",
            "cardholder=ich_1&currency=usd&type=virtual"
            "&spending_controls[spending_limits][0][amount]=900&spending_controls[spending_limits][0][interval]=daily",
        ),
    ],
)
def test_calls_that_create_an_object_are_tagged_with_their_authorization(path: str, body: str) -> None:
    payment = classify(path, body).payment
    assert payment is not None
    prepared = STRIPE.prepare(payment, body.encode())
    tagged = STRIPE.attribute(payment, prepared, "auth_abc")
    params = parse_form(tagged)
    assert params["metadata"]["paysentry_authorization"] == "auth_abc"
    assert {k: v for k, v in params["metadata"].items() if k != "paysentry_authorization"} == (
        {"order": "42"} if "order" in body else {}
    )
    assert {k: v for k, v in params.items() if k != "metadata"} == {
        k: v for k, v in parse_form(prepared).items() if k != "metadata"
    }
    assert STRIPE.attribute(payment, prepared, "auth_abc") == tagged  # a re-send is the same request


def test_an_agent_cannot_set_the_attribution_itself() -> None:
    with pytest.raises(BadRequest, match="set by PaySentry") as raised:
        classify("/v1/payment_intents", "amount=1&currency=usd&metadata[paysentry_authorization]=auth_x")
    assert raised.value.param == "metadata[paysentry_authorization]"


@pytest.mark.parametrize(
    ("path", "params", "payee", "kind"),
    [
        (
            "/v1/payment_intents",
            {"amount": "100", "currency": "usd", "customer": "cus_1"},
            "cus_1",
            "customer",
        ),
        (
            "/v1/payment_intents",
            {"amount": "100", "currency": "usd", "customer": "cus_1", "transfer_data[destination]": "acct_1"},
            "acct_1",
            "account",
        ),
        (
            "/v1/payment_intents",
            {"amount": "100", "currency": "usd", "on_behalf_of": "acct_2"},
            "acct_2",
            "account",
        ),
        ("/v1/payment_intents", {"amount": "100", "currency": "usd"}, "", ""),
        (
            "/v1/charges",
            {"amount": "100", "currency": "usd", "destination[account]": "acct_3"},
            "acct_3",
            "account",
        ),
        ("/v1/charges", {"amount": "100", "currency": "usd", "customer": "cus_2"}, "cus_2", "customer"),
        ("/v1/transfers", {"amount": "100", "currency": "usd", "destination": "acct_4"}, "acct_4", "account"),
        ("/v1/payouts", {"amount": "100", "currency": "usd"}, "", "bank_account"),
        ("/v1/refunds", {"charge": "ch_1"}, "ch_1", "payment"),
    ],
)
def test_the_payee_of_every_money_moving_call(
    path: str, params: dict[str, str], payee: str, kind: str
) -> None:
    payment = classify(path, params).payment
    assert payment is not None and (payment.payee, payment.payee_kind) == (payee, kind)


def test_an_increment_names_its_new_total() -> None:
    with pytest.raises(BadRequest, match="amount"):
        classify("/v1/payment_intents/pi_1/increment_authorization", {})
    payment = classify("/v1/payment_intents/pi_1/increment_authorization", {"amount": "10"}).payment
    assert payment is not None and payment.refers_to == "pi_1"


def test_a_captured_charge_holds_what_it_captured() -> None:
    body = json.dumps({"object": "charge", "captured": True, "amount": 2000, "amount_captured": 1200})
    assert STRIPE.holds_in("charge.capture", body.encode()) == 1200
    assert STRIPE.holds_in("charge.capture", body.replace("true", "false").encode()) is None
    assert STRIPE.holds_in("charge", body.encode()) is None


def test_a_refund_of_an_intent_is_bounded_by_what_its_charge_has_left() -> None:
    """Stripe keeps an intent's refunds on its charge (``latest_charge``, read expanded), not on the
    intent: a second refund may take only what the first left."""
    refund = classify("/v1/refunds", {"payment_intent": "pi_1"}).payment
    assert (
        refund is not None and STRIPE.lookup_path(refund) == "/v1/payment_intents/pi_1?expand[]=latest_charge"
    )
    intent = {"object": "payment_intent", "amount": 3000, "amount_received": 3000, "currency": "usd"}
    read = json.dumps({**intent, "latest_charge": {"object": "charge", "amount_refunded": 1000}}).encode()
    assert STRIPE.amount_of(refund, read) == (2000, "usd")
    larger = classify("/v1/refunds", {"payment_intent": "pi_1", "amount": "2500"}).payment
    assert larger is not None
    with pytest.raises(BadRequest, match="left to refund"):
        STRIPE.amount_of(larger, read)
