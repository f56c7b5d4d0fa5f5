"""Property-based fuzz of what parses agent and provider input: any bytes either parse into a well-formed
result or are refused with PaySentry's own clear error; nothing else escapes."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import time
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.formencode import parse_form
from adapters.mercadopago import MercadoPagoAdapter
from adapters.stripe import StripeAdapter
from proxy import safejson
from proxy.errors import BadRequest, RouteNotFound, WebhookRejected
from proxy.redact import luhn_valid, mask_cards

ADAPTER = StripeAdapter()
PATHS = [
    "/v1/payment_intents",
    "/v1/payment_intents/pi_1/confirm",
    "/v1/payment_intents/pi_1/capture",
    "/v1/charges",
    "/v1/transfers",
    "/v1/payouts",
    "/v1/refunds",
    "/v1/issuing/cards",
    "/v1/customers",
    "/v1/subscriptions",
]
FIELDS = ["amount", "currency", "destination", "customer", "payment_intent", "charge", "amount_to_capture"]
key = st.one_of(
    st.sampled_from(FIELDS),
    st.builds(
        lambda f, k: f"{f}[{k}]",
        st.sampled_from(["metadata", "transfer_data", "spending_controls"]),
        st.text(max_size=8),
    ),
    st.text(max_size=12),
)
value = st.one_of(
    st.integers(-(10**20), 10**20).map(str),
    st.sampled_from(["usd", "USD", "eur", "", "xx"]),
    st.text(max_size=16),
)
form = st.lists(st.tuples(key, value), max_size=12).map(
    lambda pairs: "&".join(f"{quote(k, safe='[]')}={quote(v)}" for k, v in pairs).encode()
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=300), form))
def test_form_parser_returns_nested_params_or_a_clear_error(body: bytes) -> None:
    try:
        params = parse_form(body)
    except BadRequest as exc:
        assert exc.message
        return
    assert isinstance(params, dict)


@settings(max_examples=600, deadline=None)
@given(
    st.sampled_from(["POST", "GET", "DELETE", "HEAD"]),
    st.one_of(st.sampled_from(PATHS), st.text(max_size=30).map(lambda s: "/v1/" + s), st.text(max_size=20)),
    st.sampled_from(["application/x-www-form-urlencoded", "application/json", ""]),
    st.one_of(form, st.binary(max_size=200)),
)
def test_stripe_classification_is_well_formed_or_refused(
    method: str, path: str, ctype: str, body: bytes
) -> None:
    try:
        classified = ADAPTER.classify(method, path, ctype, body)
    except (BadRequest, RouteNotFound) as exc:
        assert exc.message and exc.status in (400, 404)
        return
    payment = classified.payment
    if payment is not None:
        assert isinstance(payment.amount, int) and payment.amount >= 0
        assert payment.currency == payment.currency.lower()


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(max_size=120),
        st.builds(lambda t, s: f"t={t},v1={s}", st.integers(0, 2**40), st.text(max_size=70)),
    ),
    st.binary(max_size=200),
)
def test_webhook_verification_refuses_anything_unsigned(header: str, body: bytes) -> None:
    try:
        ADAPTER.verify_webhook({"Stripe-Signature": header}, body, "whsec_x", time.time(), 300)
    except WebhookRejected as exc:
        assert exc.message
    else:
        raise AssertionError("an unsigned event was accepted")


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.recursive(
            st.none() | st.text(max_size=5) | st.integers(),
            lambda c: st.lists(c) | st.dictionaries(st.text(max_size=5), c),
            max_leaves=8,
        ).map(lambda o: json.dumps(o).encode()),
    )
)
def test_a_correctly_signed_but_malformed_event_is_refused_clearly(body: bytes) -> None:
    now = int(time.time())
    mac = hmac.new(b"whsec_x", f"{now}.".encode() + body, hashlib.sha256).hexdigest()
    try:
        event = ADAPTER.verify_webhook({"Stripe-Signature": f"t={now},v1={mac}"}, body, "whsec_x", now, 300)
    except WebhookRejected as exc:
        assert "event" in exc.message
    else:
        assert isinstance(event.id, str) and isinstance(event.type, str)


# -- Unicode digits, huge numbers, deep nesting, invalid bytes -------------------------------------------
UNICODE_DIGITS = st.sampled_from(["²", "٣", "１２", "߂", "৪", "9" * 5000, "1" * 19, "1e999999", "-0", " 1"])
NESTED = st.integers(1, 20_000).map(lambda n: b"[" * n + b"]" * n) | st.integers(1, 20_000).map(
    lambda n: b'{"a":' * n + b"1" + b"}" * n
)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(PATHS[:8]),
    st.lists(
        st.tuples(
            st.sampled_from(FIELDS + ["spending_controls[spending_limits][0][amount]"]), UNICODE_DIGITS
        ),
        min_size=1,
        max_size=4,
    ),
)
def test_stripe_amounts_in_any_digits_are_refused_clearly(path: str, pairs: list[tuple[str, str]]) -> None:
    body = "&".join(f"{quote(k, safe='[]')}={quote(v)}" for k, v in pairs).encode()
    try:
        ADAPTER.classify("POST", path, "application/x-www-form-urlencoded", body)
    except (BadRequest, RouteNotFound) as exc:
        assert exc.message


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        NESTED,
        st.binary(max_size=200),
        st.builds(
            lambda amount, extra: (
                json.dumps({"transaction_amount": "AMOUNT", **extra}).replace('"AMOUNT"', amount).encode()
            ),
            st.sampled_from(
                ["1e999999", "1e-999999", "9" * 5000, "NaN", "Infinity", "-1", "0.001", "[" * 3000, "1E+19"]
            ),
            st.dictionaries(
                st.sampled_from(["metadata", "payer", "additional_info", "currency_id"]), st.text(max_size=4)
            ),
        ),
    ),
    st.sampled_from(["/v1/payments", "/v1/payments/1/refunds", "/v1/payments/1", "/v1/orders"]),
)
def test_mercadopago_bodies_parse_or_are_refused_clearly(body: bytes, path: str) -> None:
    adapter = MercadoPagoAdapter("ars")
    for method in ("POST", "PUT"):
        try:
            classified = adapter.classify(method, path, "application/json", body)
        except BadRequest as exc:
            assert exc.message
        else:
            assert classified.payment is None or classified.payment.amount >= 0


@settings(max_examples=300, deadline=None)
@given(
    st.builds(lambda t, v: f"t={t},v1={v}", UNICODE_DIGITS, st.text(max_size=10)),
    st.builds(lambda t, v: f"ts={t},v1={v}", UNICODE_DIGITS, st.text(max_size=10)),
    NESTED | st.binary(max_size=100),
)
def test_webhook_signatures_with_any_digits_are_refused(
    stripe_header: str, mp_header: str, body: bytes
) -> None:
    with pytest.raises(WebhookRejected):
        ADAPTER.verify_webhook({"Stripe-Signature": stripe_header}, body, "whsec_x", time.time(), 300)
    with pytest.raises(WebhookRejected):
        MercadoPagoAdapter("ars").verify_webhook({"x-signature": mp_header}, body, "s", time.time(), 300)


@settings(max_examples=200, deadline=None)
@given(NESTED | st.binary(max_size=300))
def test_a_signed_deeply_nested_event_is_refused_not_a_recursion_error(body: bytes) -> None:
    now = int(time.time())
    mac = hmac.new(b"whsec_x", f"{now}.".encode() + body, hashlib.sha256).hexdigest()
    try:
        ADAPTER.verify_webhook({"Stripe-Signature": f"t={now},v1={mac}"}, body, "whsec_x", now, 300)
    except WebhookRejected as exc:
        assert exc.message


@settings(max_examples=300, deadline=None)
@given(st.one_of(NESTED, st.binary(max_size=300), st.text(max_size=100)))
def test_bounded_json_fails_only_with_value_error(data: bytes | str) -> None:
    with contextlib.suppress(ValueError):
        safejson.loads(data)


# -- card numbers in free text -----------------------------------------------------------------------------
def _with_check_digit(prefix: str) -> str:
    return next(prefix + d for d in "0123456789" if luhn_valid(prefix + d))


CARDS = st.builds(
    _with_check_digit, st.integers(12, 18).flatmap(lambda n: st.text("0123456789", min_size=n, max_size=n))
)


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=20), CARDS, st.sampled_from(["", " ", "-"]), st.text(max_size=20))
def test_card_numbers_in_free_text_are_masked(before: str, card: str, group: str, after: str) -> None:
    written = group.join(card[i : i + 4] for i in range(0, len(card), 4))
    text = f"{before}| {written} |{after}"  # "|" ends a run of digits
    masked = mask_cards(text)
    assert written not in masked and card not in masked.replace(" ", "").replace("-", "").split("|")[1]
    assert masked.count("*") >= len(card) - 4 and mask_cards(masked) == masked
    assert BadRequest(f"Invalid integer: {text!r}").message == mask_cards(f"Invalid integer: {text!r}")


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=["Nd"]), max_size=60))
def test_text_without_digits_is_left_alone(text: str) -> None:
    assert mask_cards(text) == text
