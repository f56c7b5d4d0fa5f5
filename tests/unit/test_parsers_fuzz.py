"""Property-based fuzz of what parses agent and provider input: any bytes either parse into a well-formed
result or are refused with PaySentry's own clear error; nothing else escapes."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from urllib.parse import quote

from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.formencode import parse_form
from adapters.stripe import StripeAdapter
from proxy.errors import BadRequest, RouteNotFound, WebhookRejected

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
