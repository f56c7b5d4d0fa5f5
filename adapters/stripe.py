"""Stripe (API v1): routes, bracketed form bodies, amounts in minor units, Stripe-shaped errors.

Payment calls are normalized into one ``Payment``. Reads, and writes that move no money (customers,
payment methods, ...), pass through. Any other write is ``unrecognized`` and refused unless the owner's
policy allows it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlencode

from adapters.base import (
    ATTRIBUTION,
    CONFIRM,
    MOVED,
    NOT_MOVED,
    PASSTHROUGH,
    PAYMENT,
    PENDING,
    VOID,
    AuthorizationRequest,
    CardUse,
    Classified,
    ProviderObject,
    ProviderPage,
    Reply,
    Setting,
    WebhookEvent,
    bounded_refund,
    check_setting_names,
)
from adapters.formencode import encode_form, parse_form
from proxy import safejson
from proxy.errors import BadRequest, RouteNotFound, WebhookRejected
from proxy.model import UNRECOGNIZED, Payment

_ID = r"([A-Za-z0-9_]+)"
SAFE_WRITES = [
    re.compile(p)
    for p in (
        r"^/v1/customers$",
        rf"^/v1/customers/{_ID}$",
        r"^/v1/payment_methods$",
        rf"^/v1/payment_methods/{_ID}(/attach|/detach)?$",
        r"^/v1/setup_intents$",
        r"^/v1/products$",
        r"^/v1/prices$",
    )
]
CANCEL = re.compile(rf"^/v1/payment_intents/{_ID}/cancel$")
SAFE_DELETES = [re.compile(rf"^/v1/customers/{_ID}$")]
# Events that settle what PaySentry counted: the money will not move (release its spend) or it did.
WEBHOOK_OUTCOMES = {
    "payment_intent.canceled": VOID,
    "payout.canceled": VOID,
    "payout.failed": VOID,
    "payment_intent.succeeded": CONFIRM,
    "payout.paid": CONFIRM,
}
# The card metadata flag an agent sets for a card that may be used once: PaySentry cancels it after its
# first captured authorization.
ONE_TIME = "paysentry_one_time"
# Answers to cancelling a card after which a redelivered event may succeed: the key lacked the right or
# was rotated (401, 403), the card was being changed (409), too many requests (429).
CANCEL_RETRIES = frozenset({401, 403, 409, 429})
DEFAULT_API_VERSION = "2025-10-29.clover"
# Operations whose call creates an object (tagged with the authorization); the rest act on one.
CREATES = frozenset({"payment_intent", "charge", "transfer", "payout", "refund", "issuing_card"})
_KINDS = {  # our error kinds -> Stripe error types
    "invalid_request": "invalid_request_error",
    "authentication": "invalid_request_error",
    "policy": "card_error",
    "rate_limit": "invalid_request_error",
    "idempotency": "idempotency_error",
    "api": "api_error",
}


# The lists reconciliation reads (each object's "object" names the operation that makes it), 100 a page.
LISTS = {
    "/v1/payment_intents": "payment_intent",
    "/v1/charges": "charge",
    "/v1/transfers": "transfer",
    "/v1/payouts": "payout",
    "/v1/refunds": "refund",
    "/v1/issuing/cards": "issuing_card",
}
OPERATION_OF = {
    "payment_intent": "payment_intent",
    "charge": "charge",
    "transfer": "transfer",
    "payout": "payout",
    "refund": "refund",
    "issuing.card": "issuing_card",
}
_OUTCOMES = {  # the provider's status of each kind of object -> whether the money moved
    "payment_intent": {"succeeded": MOVED, "canceled": NOT_MOVED},
    "charge": {"succeeded": MOVED, "failed": NOT_MOVED},
    "payout": {"paid": MOVED, "failed": NOT_MOVED, "canceled": NOT_MOVED},
    "refund": {"succeeded": MOVED, "failed": NOT_MOVED, "canceled": NOT_MOVED},
}


def stripe_object(obj: Any) -> ProviderObject | None:
    """A Stripe object as reconciliation compares it; None for objects PaySentry does not count (a charge
    an intent made is the intent's)."""
    if not isinstance(obj, Mapping) or not isinstance(obj.get("id"), str):
        return None
    operation = OPERATION_OF.get(str(obj.get("object")))
    if operation is None or (operation == "charge" and obj.get("payment_intent")):
        return None
    status = str(obj.get("status") or "")
    if operation == "transfer":
        outcome, status = (NOT_MOVED, "reversed") if obj.get("reversed") is True else (MOVED, "paid")
    elif operation == "issuing_card":
        outcome = MOVED  # counted when made, whatever became of it: its use is its authorizations
    else:
        outcome = _OUTCOMES[operation].get(status, PENDING)
        if status == "requires_payment_method" and obj.get("last_payment_error"):
            outcome = NOT_MOVED  # declined: made, and nothing moved unless it is confirmed again
    amount: Any = _card_amount(obj) if operation == "issuing_card" else obj.get("amount")
    received = obj.get("amount_received") if operation == "payment_intent" else None
    if operation == "charge" and obj.get("captured") is True:
        received = obj.get("amount_captured")  # a charge made with capture=false, captured in part or whole
    if outcome == MOVED and isinstance(received, int) and received:
        amount = received  # what was captured
    metadata = obj.get("metadata")
    tag = metadata.get(ATTRIBUTION) if isinstance(metadata, Mapping) else None
    created = obj.get("created")
    try:
        whole = int(amount)
    except (TypeError, ValueError):
        whole = 0
    return ProviderObject(
        ref=obj["id"],
        operation=operation,
        amount=whole,
        currency=str(obj.get("currency") or "").lower(),
        outcome=outcome,
        status=status,
        created=float(created) if isinstance(created, (int, float)) else 0.0,
        authorization=tag if isinstance(tag, str) and tag else None,
        body=json.dumps(obj).encode(),
    )


def _card_amount(card: Mapping[str, Any]) -> int:
    controls = card.get("spending_controls")
    limits = controls.get("spending_limits") if isinstance(controls, Mapping) else None
    amounts = [
        int(entry["amount"])
        for entry in (limits if isinstance(limits, list) else [])
        if isinstance(entry, Mapping) and str(entry.get("amount", "")).isdigit()
    ]
    return max(amounts, default=0)


def _text(params: Mapping[str, Any], key: str) -> str:
    value = params.get(key, "")
    if not isinstance(value, str):
        raise BadRequest(f"{key} must be a string", param=key)
    return value


def _amount(params: Mapping[str, Any], key: str, required: bool) -> int | None:
    raw = params.get(key)
    if raw is None or raw == "":
        if required:
            raise BadRequest(f"Missing required param: {key}.", param=key)
        return None
    if not isinstance(raw, str) or not (raw.isascii() and raw.isdigit()) or len(raw) > 15:
        raise BadRequest(
            f"Invalid integer: {raw!r}; {key} is a whole number of the currency's minor unit (cents)",
            param=key,
        )
    return int(raw)


def _currency(params: Mapping[str, Any], required: bool = True) -> str:
    raw = params.get("currency", "")
    if not raw:
        if required:
            raise BadRequest("Missing required param: currency.", param="currency")
        return ""
    if not isinstance(raw, str) or not re.fullmatch(r"[A-Za-z]{3}", raw):
        raise BadRequest(f"Invalid currency: {raw!r} (a three-letter ISO code such as usd)", param="currency")
    return raw.lower()


def _payee(first: str, first_kind: str, second: str, second_kind: str) -> dict[str, str]:
    """Who receives a payment: the connected account it goes to, else its customer (a plain intent)."""
    if first:
        return {"payee": first, "payee_kind": first_kind}
    return {"payee": second, "payee_kind": second_kind if second else ""}


def _nested(params: Mapping[str, Any], *keys: str) -> str:
    node: Any = params
    for key in keys:
        if not isinstance(node, Mapping):
            return ""
        node = node.get(key)
    return node if isinstance(node, str) else ""


def _metadata(params: Mapping[str, Any]) -> dict[str, str]:
    meta = params.get("metadata", {})
    if meta == "":
        return {}
    if not isinstance(meta, Mapping) or not all(isinstance(v, str) for v in meta.values()):
        raise BadRequest("metadata must be a set of key-value strings", param="metadata")
    if ATTRIBUTION in meta:
        raise BadRequest(
            f"metadata[{ATTRIBUTION}] is set by PaySentry (the authorization that allowed the call); "
            "leave it out",
            param=f"metadata[{ATTRIBUTION}]",
        )
    return dict(meta)


def _card_limit(params: Mapping[str, Any]) -> int:
    limits = params.get("spending_controls", {})
    limits = limits.get("spending_limits") if isinstance(limits, Mapping) else None
    amounts = []
    for i, entry in enumerate(limits if isinstance(limits, list) else []):
        if isinstance(entry, Mapping):
            amounts.append(_amount(entry, "amount", True) or 0)
        else:
            raise BadRequest(
                "each spending limit needs amount and interval",
                param=f"spending_controls[spending_limits][{i}]",
            )
    if not amounts:
        raise BadRequest(
            "PaySentry needs spending_controls[spending_limits] on a card, so that what the card "
            "can spend is bounded and can be decided",
            param="spending_controls[spending_limits]",
        )
    return max(amounts)


def _categories(params: Mapping[str, Any], key: str) -> tuple[str, ...]:
    controls = params.get("spending_controls")
    raw = controls.get(key, []) if isinstance(controls, Mapping) else []
    if raw == "":
        return ()
    if not isinstance(raw, list) or not all(isinstance(c, str) and c for c in raw):
        raise BadRequest(
            f"spending_controls[{key}] must be a list of category names", param=f"spending_controls[{key}]"
        )
    return tuple(raw)


def _ref(value: Any) -> str:
    """An id given either as a string or as an expanded object."""
    if isinstance(value, Mapping):
        value = value.get("id")
    return value if isinstance(value, str) else ""


_last: tuple[bytes, dict[str, Any]] = (b"", {})


def _json_object(body: bytes) -> dict[str, Any]:
    """The JSON object of a provider answer ({} for anything else). The service asks several questions of
    one answer (declined? undecided? what it holds? its id?): the same bytes are parsed once. Callers
    only read the object."""
    global _last
    if _last[0] is body:
        return _last[1]
    try:
        parsed = safejson.loads(body)
    except ValueError:
        parsed = None
    obj: dict[str, Any] = parsed if isinstance(parsed, dict) else {}
    _last = (body, obj)
    return obj


class StripeAdapter:
    name = "stripe"
    default_upstream = "https://api.stripe.com"
    idempotency_header = "Idempotency-Key"
    methods = frozenset({"GET", "HEAD", "POST", "DELETE"})
    guarded_headers = frozenset({"stripe-context"})
    account_header: str | None = "Stripe-Account"
    operations: Mapping[str, str] = {
        "payment_intent": "/v1/payment_intents",
        "payment_intent.confirm": "/v1/payment_intents/pi_example/confirm",
        "payment_intent.capture": "/v1/payment_intents/pi_example/capture",
        "payment_intent.increment_authorization": "/v1/payment_intents/pi_example/increment_authorization",
        "charge": "/v1/charges",
        "charge.capture": "/v1/charges/ch_example/capture",
        "transfer": "/v1/transfers",
        "payout": "/v1/payouts",
        "refund": "/v1/refunds",
        "issuing_card": "/v1/issuing/cards",
        "issuing_authorization": "/v1/issuing/authorizations/iauth_example",  # a webhook's request
    }
    settings: Mapping[str, Setting] = {}

    def __init__(self) -> None:
        self._routes: list[
            tuple[re.Pattern[str], Callable[[Mapping[str, Any], re.Match[str]], dict[str, Any]]]
        ] = [
            (re.compile(r"^/v1/payment_intents$"), self._payment_intent),
            (re.compile(rf"^/v1/payment_intents/{_ID}/confirm$"), self._confirm),
            (re.compile(rf"^/v1/payment_intents/{_ID}/capture$"), self._capture),
            (re.compile(rf"^/v1/payment_intents/{_ID}/increment_authorization$"), self._increment),
            (re.compile(r"^/v1/charges$"), self._charge),
            (re.compile(rf"^/v1/charges/{_ID}/capture$"), self._charge_capture),
            (re.compile(r"^/v1/transfers$"), self._simple("transfer", "destination", required_dest=True)),
            (re.compile(r"^/v1/payouts$"), self._simple("payout", "destination")),
            (re.compile(r"^/v1/refunds$"), self._refund),
            (re.compile(r"^/v1/issuing/cards$"), self._issuing_card),
        ]

    def configured(self, settings: Mapping[str, str]) -> StripeAdapter:
        check_setting_names(self.name, self.settings, settings)
        return self

    # -- classification ---------------------------------------------------------------------------------
    def classify(self, method: str, path: str, content_type: str, body: bytes) -> Classified:
        if not path.startswith("/v1/"):
            raise RouteNotFound(
                f"Unrecognized request URL ({method}: {path}). PaySentry forwards Stripe API "
                "paths under /v1/."
            )
        if method in ("GET", "HEAD"):
            return Classified(PASSTHROUGH)
        if method == "DELETE" and any(p.match(path) for p in SAFE_DELETES):
            return Classified(PASSTHROUGH)
        if method == "POST" and any(p.match(path) for p in SAFE_WRITES):
            return Classified(PASSTHROUGH)
        cancel = CANCEL.match(path)
        if method == "POST" and cancel:
            return Classified(PASSTHROUGH, voids=cancel.group(1))
        params = self._params(content_type, body) if method == "POST" else {}
        for pattern, build in self._routes:
            match = pattern.match(path)
            if match and method == "POST":
                fields = build(params, match)
                return Classified(
                    PAYMENT, Payment(provider=self.name, method=method, path=path, params=params, **fields)
                )
        return Classified(
            PAYMENT,
            Payment(
                provider=self.name,
                operation=UNRECOGNIZED,
                amount=0,
                currency="",
                method=method,
                path=path,
                params=params,
            ),
        )

    def _params(self, content_type: str, body: bytes) -> dict[str, Any]:
        if body and not content_type.startswith("application/x-www-form-urlencoded"):
            raise BadRequest(
                f"Stripe requests are application/x-www-form-urlencoded, not {content_type or 'untyped'}"
            )
        return parse_form(body)

    @staticmethod
    def _common(params: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "customer": _text(params, "customer"),
            "description": _text(params, "description"),
            "metadata": _metadata(params),
        }

    def _payment_intent(self, params: Mapping[str, Any], _: re.Match[str]) -> dict[str, Any]:
        destination = _nested(params, "transfer_data", "destination") or _text(params, "on_behalf_of")
        return {
            "operation": "payment_intent",
            "amount": _amount(params, "amount", True),
            "currency": _currency(params),
            "destination": destination,
            **_payee(destination, "account", _text(params, "customer"), "customer"),
            **self._common(params),
        }

    def _confirm(self, params: Mapping[str, Any], match: re.Match[str]) -> dict[str, Any]:
        return {
            "operation": "payment_intent.confirm",
            "amount": 0,
            "currency": "",
            "refers_to": match.group(1),
            **self._common(params),
        }

    def _capture(self, params: Mapping[str, Any], match: re.Match[str]) -> dict[str, Any]:
        amount = _amount(params, "amount_to_capture", False)
        return {
            "operation": "payment_intent.capture",
            "amount": amount if amount is not None else 0,
            "currency": "",
            "refers_to": match.group(1),
            **self._common(params),
        }

    def _increment(self, params: Mapping[str, Any], match: re.Match[str]) -> dict[str, Any]:
        """``amount`` is the intent's new authorized total: decided as a payment of that total, counted for
        what it adds to what the intent already counted."""
        return {
            "operation": "payment_intent.increment_authorization",
            "amount": _amount(params, "amount", True),
            "currency": "",
            "refers_to": match.group(1),
            **self._common(params),
        }

    def _charge_capture(self, params: Mapping[str, Any], match: re.Match[str]) -> dict[str, Any]:
        amount = _amount(params, "amount", False)
        return {
            "operation": "charge.capture",
            "amount": amount if amount is not None else 0,
            "currency": "",
            "refers_to": match.group(1),
            **self._common(params),
        }

    def _charge(self, params: Mapping[str, Any], _: re.Match[str]) -> dict[str, Any]:
        destination = (
            _nested(params, "destination", "account")
            or _nested(params, "destination")
            or _nested(params, "transfer_data", "destination")
        )
        return {
            "operation": "charge",
            "amount": _amount(params, "amount", True),
            "currency": _currency(params),
            "destination": destination,
            **_payee(
                destination or _text(params, "on_behalf_of"), "account", _text(params, "customer"), "customer"
            ),
            **self._common(params),
        }

    def _simple(
        self, operation: str, dest_key: str, required_dest: bool = False
    ) -> Callable[[Mapping[str, Any], re.Match[str]], dict[str, Any]]:
        def build(params: Mapping[str, Any], _: re.Match[str]) -> dict[str, Any]:
            destination = _text(params, dest_key)
            if required_dest and not destination:
                raise BadRequest(f"Missing required param: {dest_key}.", param=dest_key)
            kind = "account" if operation == "transfer" else "bank_account"  # a payout: the default one if ""
            return {
                "operation": operation,
                "amount": _amount(params, "amount", True),
                "currency": _currency(params),
                "destination": destination,
                "payee": destination,
                "payee_kind": kind,
                **self._common(params),
            }

        return build

    def _refund(self, params: Mapping[str, Any], _: re.Match[str]) -> dict[str, Any]:
        target = _text(params, "charge") or _text(params, "payment_intent")
        if not target:
            raise BadRequest("A refund needs charge or payment_intent.", param="charge")
        amount = _amount(params, "amount", False)
        return {
            "operation": "refund",
            "amount": amount if amount is not None else 0,
            "currency": "",
            "destination": target,
            "payee": target,  # the money goes back to whoever paid the refunded charge or intent
            "payee_kind": "payment",
            "refers_to": target,
            **self._common(params),
        }

    def _issuing_card(self, params: Mapping[str, Any], _: re.Match[str]) -> dict[str, Any]:
        common = self._common(params)
        if common["metadata"].get(ONE_TIME, "true") not in ("true", "false"):
            raise BadRequest(f"metadata[{ONE_TIME}] is true or false", param=f"metadata[{ONE_TIME}]")
        _categories(params, "blocked_categories")  # checked here, kept as sent by prepare()
        return {
            "operation": "issuing_card",
            "amount": _card_limit(params),
            "currency": _currency(params),
            "destination": _text(params, "cardholder"),
            "payee": _text(params, "cardholder"),
            "payee_kind": "cardholder",
            "categories": _categories(params, "allowed_categories"),
            **common,
        }

    def prepare(self, payment: Payment, body: bytes) -> bytes:
        """A card is created with exactly what was approved: one all-time spending limit of the approved
        amount (so no interval can renew it) and the allowed categories the policy saw."""
        if payment.operation != "issuing_card":
            return body
        params = dict(payment.params)
        sent = params.get("spending_controls")
        controls: dict[str, Any] = {
            "spending_limits": [{"amount": str(payment.amount), "interval": "all_time"}],
        }
        if payment.categories:
            controls["allowed_categories"] = list(payment.categories)
        blocked = _categories(params, "blocked_categories")
        if blocked:
            controls["blocked_categories"] = list(blocked)
        if isinstance(sent, Mapping) and sent.get("spending_limits_currency"):
            controls["spending_limits_currency"] = sent["spending_limits_currency"]
        params["spending_controls"] = controls
        return encode_form(params)

    def attribute(self, payment: Payment, body: bytes, authorization_id: str) -> bytes:
        """``metadata[paysentry_authorization]=<id>`` after the agent's own parameters (its metadata
        kept); ``metadata=`` (clearing it) cannot take a key beside it, so it is replaced."""
        if payment.operation not in CREATES:
            return body
        tag = urlencode([(f"metadata[{ATTRIBUTION}]", authorization_id)]).encode()
        if payment.params.get("metadata") == "":
            params = parse_form(body)
            params["metadata"] = {ATTRIBUTION: authorization_id}
            return encode_form(params)
        return body + b"&" + tag if body else tag

    # -- the provider's records ------------------------------------------------------------------------
    def listings(self, since: float, until: float) -> Sequence[str]:
        window = urlencode({"created[gte]": int(since), "created[lte]": int(until), "limit": 100})
        return [f"{path}?{window}" for path in LISTS]

    def page(self, target: str, body: bytes) -> ProviderPage:
        try:
            listed = json.loads(body)
            data = listed["data"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{target.split('?')[0]} did not answer a Stripe list") from None
        if not isinstance(data, list):
            raise ValueError(f"{target.split('?')[0]} did not answer a Stripe list")
        objects = tuple(o for o in map(stripe_object, data) if o is not None)
        last = data[-1].get("id") if data and isinstance(data[-1], Mapping) else None
        if listed.get("has_more") is not True or not isinstance(last, str):
            return ProviderPage(objects, None)
        base = target.split("&starting_after=", 1)[0]
        return ProviderPage(objects, f"{base}&{urlencode({'starting_after': last})}")

    def object_of(self, body: bytes) -> ProviderObject | None:
        try:
            return stripe_object(json.loads(body))
        except ValueError:
            return None

    def part_of(self, body: bytes) -> str | None:
        try:
            obj = safejson.loads(body)
        except ValueError:
            return None
        intent = (
            obj.get("payment_intent") if isinstance(obj, Mapping) and obj.get("object") == "charge" else None
        )
        return intent if isinstance(intent, str) and intent.startswith("pi_") else None

    # -- the rest of the port -----------------------------------------------------------------------------
    def error(
        self,
        status: int,
        kind: str,
        code: str,
        message: str,
        param: str | None = None,
        extra: Mapping[str, Any] | None = None,
        retry: bool = False,
    ) -> Reply:
        error: dict[str, Any] = {"type": _KINDS.get(kind, "api_error"), "code": code, "message": message}
        if param:
            error["param"] = param
        if extra:
            error["paysentry"] = dict(extra)
        body = json.dumps({"error": error}).encode()
        return Reply(
            status,
            body,
            {"Content-Type": "application/json", "Stripe-Should-Retry": "true" if retry else "false"},
        )

    def webhook_ack(self, result: str, extra: Mapping[str, str]) -> Reply:
        """Stripe takes any 2xx as delivered (and redelivers otherwise); the body is for whoever reads
        the endpoint's delivery log."""
        body = json.dumps({"received": True, "result": result, **extra}).encode()
        return Reply(200, body, {"Content-Type": "application/json"})

    def is_one_time_card(self, payment_summary: Mapping[str, Any]) -> bool:
        metadata = payment_summary.get("metadata")
        return (
            payment_summary.get("operation") == "issuing_card"
            and isinstance(metadata, Mapping)
            and metadata.get(ONE_TIME) == "true"
        )

    def card_cancel_should_retry(self, status: int) -> bool:
        return status == 0 or status >= 500 or status in CANCEL_RETRIES

    def declined_in(self, body: bytes) -> str | None:
        """Stripe refuses a call with a 4xx (a declined card is a 402). A card authorization read back
        (resolving one whose answer was not recorded) is declined when it is decided and not approved,
        or was reversed."""
        obj = _json_object(body)
        if obj.get("object") != "issuing.authorization":
            return None
        if obj.get("status") == "reversed":
            return "the card authorization was reversed"
        if obj.get("approved") is not True and not obj.get("pending_request"):
            return "the card authorization was declined"
        return None

    def holds_in(self, operation: str, body: bytes) -> int | None:
        """A captured intent moves what it received, a captured charge what it captured: a partial capture
        gives the rest back."""
        obj = _json_object(body)
        if operation == "payment_intent.capture" and obj.get("object") == "payment_intent":
            moved, done = obj.get("amount_received"), obj.get("status") == "succeeded"
        elif operation == "charge.capture" and obj.get("object") == "charge":
            moved, done = obj.get("amount_captured"), obj.get("captured") is True
        else:
            return None
        if not done or not isinstance(moved, int) or isinstance(moved, bool):
            return None
        return moved

    def undecided_in(self, body: bytes) -> bool:
        obj = _json_object(body)
        return obj.get("object") == "issuing.authorization" and bool(obj.get("pending_request"))

    def cancelled_in(self, body: bytes) -> bool:
        return _json_object(body).get("status") == "canceled"

    def credential_headers(self, credentials: Mapping[str, str]) -> dict[str, str]:
        return {"Authorization": f"Bearer {credentials['secret_key']}"}

    def provider_ref(self, body: bytes) -> str | None:
        """The object's id, also of a refusal that still made one (a declined create's intent, carried in
        ``error.payment_intent``)."""
        obj: Any = _json_object(body)
        error = obj.get("error")
        if isinstance(error, dict):
            obj = error.get("payment_intent") if isinstance(error.get("payment_intent"), dict) else {}
        ref = obj.get("id")
        return ref if isinstance(ref, str) else None

    def lookup_path(self, payment: Payment) -> str | None:
        ref = payment.refers_to
        if ref.startswith("pi_"):  # its charge expanded: what a refund may still take is the charge's
            return f"/v1/payment_intents/{ref}?expand[]=latest_charge"
        if ref.startswith(("ch_", "py_")):
            return f"/v1/charges/{ref}"
        return None

    def verify_webhook(
        self, headers: Mapping[str, str], body: bytes, secret: str, now: float, tolerance: float
    ) -> WebhookEvent:
        """Stripe's scheme: ``Stripe-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "<t>." + body>``."""
        header = headers.get("Stripe-Signature", "")
        timestamp, signatures = None, []
        for item in header.split(","):
            name, _, value = item.strip().partition("=")
            if name == "t" and value.isascii() and value.isdigit() and len(value) <= 12:
                timestamp = int(value)
            elif name == "v1":
                signatures.append(value)
        if timestamp is None or not signatures:
            raise WebhookRejected("the Stripe-Signature header is missing or has no t= and v1= parts")
        expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
        if not any(hmac.compare_digest(expected.encode(), s.encode()) for s in signatures):  # any text
            raise WebhookRejected("no v1 signature in Stripe-Signature matches this body")
        if abs(now - timestamp) > tolerance:
            raise WebhookRejected(
                f"the signature's timestamp is {int(now - timestamp)} s from now, outside the "
                f"{int(tolerance)} s tolerance (a replayed or delayed event)"
            )
        try:
            event = safejson.loads(body)
            event_id, event_type = event["id"], event["type"]
            obj = event.get("data", {}).get("object", {})
        except (ValueError, KeyError, TypeError, AttributeError):
            raise WebhookRejected("the event is not a JSON object with id, type and data.object") from None
        if not isinstance(event_id, str) or not isinstance(event_type, str) or not isinstance(obj, dict):
            raise WebhookRejected("the event is not a JSON object with id, type and data.object")
        if event_type.startswith(("issuing_authorization.", "issuing_transaction.")):
            return self._issuing_event(event_id, event_type, obj, event.get("api_version"))
        ref = obj.get("id")
        return WebhookEvent(
            event_id, event_type, ref if isinstance(ref, str) else None, WEBHOOK_OUTCOMES.get(event_type)
        )

    # -- Issuing: real-time authorization and what follows it ------------------------------------------------
    def _issuing_event(
        self, event_id: str, event_type: str, obj: Mapping[str, Any], api_version: Any
    ) -> WebhookEvent:
        """An authorization asks for a decision (``.request``), then is created approved or declined,
        may be reversed, and is captured by a transaction."""
        ref = _ref(obj)
        if event_type == "issuing_authorization.request":
            version = api_version if isinstance(api_version, str) and api_version else DEFAULT_API_VERSION
            return WebhookEvent(
                event_id, event_type, ref, None, request=self._authorization_request(ref, obj, version)
            )
        if event_type == "issuing_authorization.created":
            return WebhookEvent(event_id, event_type, ref, CONFIRM if obj.get("approved") is True else VOID)
        if event_type == "issuing_authorization.updated" and obj.get("status") == "reversed":
            return WebhookEvent(event_id, event_type, ref, VOID)
        if event_type == "issuing_transaction.created" and obj.get("type") == "capture":
            card = _ref(obj.get("card"))
            cancel = CardUse(card, "POST", f"/v1/issuing/cards/{card}", b"status=canceled") if card else None
            return WebhookEvent(
                event_id, event_type, _ref(obj.get("authorization")) or None, CONFIRM, used_card=cancel
            )
        return WebhookEvent(event_id, event_type, ref or None, None)

    def _authorization_request(self, ref: str, obj: Mapping[str, Any], version: str) -> AuthorizationRequest:
        pending = obj.get("pending_request")
        source = pending if isinstance(pending, Mapping) else obj
        merchant = obj.get("merchant_data")
        merchant = merchant if isinstance(merchant, Mapping) else {}
        amount, currency, card = source.get("amount"), source.get("currency"), obj.get("card")
        if not ref or not isinstance(amount, int) or isinstance(amount, bool) or amount < 0:
            raise WebhookRejected("the authorization request has no id or no whole amount")
        if not isinstance(currency, str) or not re.fullmatch(r"[A-Za-z]{3}", currency) or not _ref(card):
            raise WebhookRejected("the authorization request has no currency or no card")
        fields = {
            name: merchant.get(name) for name in ("name", "category", "category_code", "country", "city")
        }
        texts = {k: v for k, v in fields.items() if isinstance(v, str)}
        cardholder = _ref(card.get("cardholder")) if isinstance(card, Mapping) else ""
        payment = Payment(
            provider=self.name,
            operation="issuing_authorization",
            amount=amount,
            currency=currency.lower(),
            method="POST",
            path=f"/v1/issuing/authorizations/{ref}",
            destination=texts.get("name", ""),
            payee=texts.get("name", ""),
            payee_kind="merchant",
            customer=cardholder or _ref(obj.get("cardholder")),
            refers_to=_ref(card),
            categories=(texts["category"],) if texts.get("category") else (),
            merchant=texts,
        )

        def answer(approved: bool, metadata: Mapping[str, str]) -> Reply:
            body = json.dumps({"approved": approved, "metadata": dict(metadata)}).encode()
            return Reply(200, body, {"Content-Type": "application/json", "Stripe-Version": version})

        return AuthorizationRequest(ref, payment, answer)

    def amount_of(self, payment: Payment, body: bytes) -> tuple[int, str] | None:
        """What the call moves: the amount it names, else the object's. A refund is bounded by what was
        captured and not yet refunded (an intent's ``amount_received``, a charge's amount)."""
        try:
            obj = safejson.loads(body)
            currency = str(obj["currency"]).lower()
            if payment.operation != "refund":
                return payment.amount or int(obj["amount"]), currency
            captured = obj.get("amount_received") if obj.get("object") == "payment_intent" else None
            charge = obj.get("latest_charge")  # an intent's refunds are its charge's
            refunded = int((charge if isinstance(charge, dict) else obj).get("amount_refunded") or 0)
            remaining = int(obj["amount"] if captured is None else captured) - refunded
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        return bounded_refund(payment, remaining, currency)
