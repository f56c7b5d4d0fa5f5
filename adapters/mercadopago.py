"""MercadoPago (API v1): JSON bodies, amounts as decimals of the major unit, ``X-Idempotency-Key``, and
MercadoPago-shaped errors (``{"message", "error", "status", "cause"}``).

A payment request carries no currency: the account's country decides it (ARS in Argentina, BRL in Brazil,
...). So a MercadoPago connection declares its account's currency (``paysentry provider add --setting
currency=ARS``), and every ``transaction_amount`` is converted to minor units with that currency's
exponent; an amount with more decimals than the currency has is refused rather than rounded. A request
that names ``currency_id`` must name the connection's.

Payments (``POST /v1/payments``) and refunds (``POST /v1/payments/{id}/refunds``) are decided. Reads, and
writes that move no money (customers, their cards, card tokens, capturing a payment already counted) pass
through; cancelling a payment passes through and, once MercadoPago accepts it, releases its spend. Any other write is ``unrecognized`` and refused unless the owner's policy allows it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import parse_qsl, urlencode

from adapters.base import (
    ATTRIBUTION,
    MOVED,
    NOT_MOVED,
    PASSTHROUGH,
    PAYMENT,
    PENDING,
    Classified,
    ProviderObject,
    ProviderPage,
    Reply,
    Setting,
    WebhookEvent,
    bounded_refund,
    check_setting_names,
)
from proxy import safejson
from proxy.currency import exponent
from proxy.errors import BadRequest, WebhookRejected
from proxy.model import UNRECOGNIZED, Payment

# The currencies of MercadoPago's sites (Argentina, Brazil, Mexico, Chile, Colombia, Peru, Uruguay).
CURRENCIES = frozenset({"ars", "brl", "mxn", "clp", "cop", "pen", "uyu"})
MAX_MINOR = 10**15
_ID = r"([0-9A-Za-z_-]+)"
PAYMENTS = re.compile(r"^/v1/payments$")
REFUNDS = re.compile(rf"^/v1/payments/{_ID}/refunds$")
ONE_PAYMENT = re.compile(rf"^/v1/payments/{_ID}$")
SAFE_WRITES = [
    re.compile(p)
    for p in (
        r"^/v1/customers$",
        rf"^/v1/customers/{_ID}$",
        rf"^/v1/customers/{_ID}/cards$",
        rf"^/v1/customers/{_ID}/cards/{_ID}$",
        r"^/v1/card_tokens$",
    )
]
_ERRORS = {  # our error kinds -> MercadoPago's "error" names
    "invalid_request": "bad_request",
    "authentication": "unauthorized",
    "policy": "payment_required",
    "rate_limit": "too_many_requests",
    "idempotency": "conflict",
    "api": "internal_error",
}
# What a 2xx payment answer can still say: the payment exists but no money moved.
DECLINED_STATUSES = frozenset({"rejected", "cancelled"})
# A payment's status -> whether the money moved. Refunded and charged back payments did move it: a
# refund is its own operation, counted as such. Any other status (pending, in_process, authorized,
# in_mediation) may still move it.
OUTCOMES = {
    "approved": MOVED,
    "refunded": MOVED,
    "charged_back": MOVED,
    "rejected": NOT_MOVED,
    "cancelled": NOT_MOVED,
}
SEARCH = "/v1/payments/search"
PAGE_SIZE = 100


def payment_object(obj: Any) -> ProviderObject | None:
    """A MercadoPago payment as reconciliation compares it (None when it is not a payment)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("id"), (int, str)):
        return None
    currency = str(obj.get("currency_id") or "").lower()
    try:
        amount = to_minor(Decimal(str(obj.get("transaction_amount"))), currency, "transaction_amount")
    except (BadRequest, InvalidOperation, KeyError, ValueError):
        amount = 0
    status = str(obj.get("status") or "")
    metadata = obj.get("metadata")
    tag = metadata.get(ATTRIBUTION) if isinstance(metadata, dict) else None
    try:
        created = datetime.fromisoformat(str(obj.get("date_created"))).timestamp()
    except ValueError:
        created = 0.0
    return ProviderObject(
        ref=str(obj["id"]),
        operation="payment",
        amount=amount,
        currency=currency,
        outcome=OUTCOMES.get(status, PENDING),
        status=status,
        created=created,
        authorization=tag if isinstance(tag, str) and tag else None,
        body=json.dumps(plain_numbers(obj)).encode(),
    )


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def to_minor(value: Any, currency: str, param: str) -> int:
    """``to_minor(Decimal("700.50"), "ars") == 70050``; ``to_minor(1500, "clp") == 1500``."""
    if isinstance(value, bool) or not isinstance(value, (int, Decimal)):
        raise BadRequest(f"{param} must be a number (major units, e.g. 700.50), got {value!r}", param=param)
    exp = exponent(currency)
    try:
        scaled = Decimal(value).scaleb(exp)
        huge = scaled.is_finite() and scaled.adjusted() >= 20  # 1e999999: never made into an int
        whole = scaled.is_finite() and not huge and scaled == scaled.to_integral_value()
    except ArithmeticError:  # InvalidOperation, Overflow
        raise BadRequest(f"{param} is not a valid amount", param=param) from None
    if huge:
        raise BadRequest(f"{param} must be a positive amount below {MAX_MINOR} minor units", param=param)
    if not whole:
        raise BadRequest(
            f"{param} {value} has more decimals than {currency.upper()} allows ({exp})", param=param
        )
    minor = int(scaled)
    if minor <= 0 or minor >= MAX_MINOR:
        raise BadRequest(f"{param} must be a positive amount, got {value}", param=param)
    return minor


def _json(body: bytes, content_type: str) -> dict[str, Any]:
    if not body:
        return {}
    if not content_type.startswith("application/json"):
        raise BadRequest(f"MercadoPago requests are application/json, not {content_type or 'untyped'}")
    try:
        value = safejson.loads(body, parse_float=Decimal)
    except ValueError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadRequest("the request body must be a JSON object")
    return value


def _text(params: Mapping[str, Any], key: str) -> str:
    value = params.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRequest(f"{key} must be a string", param=key)
    return value


def _payer_email(params: Mapping[str, Any]) -> str:
    payer = params.get("payer")
    if payer is None:
        return ""
    if not isinstance(payer, dict):
        raise BadRequest("payer must be an object", param="payer")
    return _text(payer, "email")


def _item_categories(params: Mapping[str, Any]) -> tuple[str, ...]:
    info = params.get("additional_info")
    if info is None:
        return ()
    items = info.get("items") if isinstance(info, dict) else None
    if not isinstance(info, dict) or not isinstance(items, (list, type(None))):
        raise BadRequest("additional_info.items must be a list of items", param="additional_info.items")
    categories: list[str] = []
    for i, item in enumerate(items or []):
        if not isinstance(item, dict):
            raise BadRequest("each item must be an object", param=f"additional_info.items[{i}]")
        category = item.get("category_id")
        if category is not None and not isinstance(category, str):
            raise BadRequest("category_id must be a string", param=f"additional_info.items[{i}].category_id")
        if category and category not in categories:
            categories.append(category)
    return tuple(categories)


def _metadata(params: Mapping[str, Any]) -> dict[str, str]:
    meta = params.get("metadata")
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise BadRequest("metadata must be an object", param="metadata")
    if ATTRIBUTION in meta:
        raise BadRequest(
            f"metadata.{ATTRIBUTION} is set by PaySentry (the authorization that allowed the payment); "
            "leave it out",
            param=f"metadata.{ATTRIBUTION}",
        )
    scalars = {
        k: v for k, v in meta.items() if isinstance(v, (str, int, Decimal)) and not isinstance(v, bool)
    }
    return {str(k): str(v) for k, v in scalars.items()}


def plain_numbers(value: Any) -> Any:
    """JSON decimals back to plain numbers, for ``payment.params`` (policies compare them as numbers)."""
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, dict):
        return {k: plain_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_numbers(v) for v in value]
    return value


class MercadoPagoAdapter:
    name = "mercadopago"
    default_upstream = "https://api.mercadopago.com"
    idempotency_header = "X-Idempotency-Key"
    methods = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE"})
    guarded_headers: frozenset[str] = frozenset()
    account_header: str | None = None
    operations: Mapping[str, str] = {
        "payment": "/v1/payments",
        "refund": "/v1/payments/123456789/refunds",
    }
    settings: Mapping[str, Setting] = {
        "currency": Setting(
            "the account's currency, which MercadoPago requests do not carry: one of "
            + ", ".join(sorted(c.upper() for c in CURRENCIES)),
            required=True,
        )
    }

    def __init__(self, currency: str = "") -> None:
        self.currency = currency

    def configured(self, settings: Mapping[str, str]) -> MercadoPagoAdapter:
        check_setting_names(self.name, self.settings, settings)
        currency = settings["currency"].lower()
        if currency not in CURRENCIES:
            raise ValueError(
                f"currency {settings['currency']!r} is not a MercadoPago account's currency; one of "
                + ", ".join(sorted(c.upper() for c in CURRENCIES))
            )
        return MercadoPagoAdapter(currency)

    # -- classification ---------------------------------------------------------------------------------
    def classify(self, method: str, path: str, content_type: str, body: bytes) -> Classified:
        if method in ("GET", "HEAD"):
            return Classified(PASSTHROUGH)
        if method in ("POST", "DELETE") and any(p.match(path) for p in SAFE_WRITES):
            return Classified(PASSTHROUGH)
        params = _json(body, content_type)
        if method == "POST" and PAYMENTS.match(path):
            return Classified(PAYMENT, self._payment(path, params))
        refund = REFUNDS.match(path)
        if method == "POST" and refund:
            return Classified(PAYMENT, self._refund(path, params, refund.group(1)))
        one_payment = ONE_PAYMENT.match(path)
        if method == "PUT" and one_payment and params == {"status": "cancelled"}:
            return Classified(PASSTHROUGH, voids=one_payment.group(1))
        if method == "PUT" and one_payment and params.get("capture") is True and set(params) <= {"capture"}:
            # Capturing a payment authorized earlier: counted when it was created, and the capture
            # cannot exceed it; only the agent that made it may.
            return Classified(PASSTHROUGH, acts_on=one_payment.group(1))
        return Classified(
            PAYMENT,
            Payment(
                provider=self.name,
                operation=UNRECOGNIZED,
                amount=0,
                currency="",
                method=method,
                path=path,
                params=plain_numbers(params),
            ),
        )

    def _currency(self, params: Mapping[str, Any]) -> str:
        if not self.currency:
            raise BadRequest("this MercadoPago connection has no currency; its owner must set one")
        named = params.get("currency_id")
        if named is not None and (not isinstance(named, str) or named.lower() != self.currency):
            raise BadRequest(
                f"currency_id {named!r} is not this account's currency ({self.currency.upper()})",
                param="currency_id",
            )
        return self.currency

    def _payment(self, path: str, params: Mapping[str, Any]) -> Payment:
        if "transaction_amount" not in params:
            raise BadRequest("transaction_amount is required", param="transaction_amount")
        currency = self._currency(params)
        metadata = _metadata(params)
        reference = _text(params, "external_reference")
        if reference:
            metadata.setdefault("external_reference", reference)
        return Payment(
            provider=self.name,
            operation="payment",
            amount=to_minor(params["transaction_amount"], currency, "transaction_amount"),
            currency=currency,
            method="POST",
            path=path,
            customer=_payer_email(params),
            # the seller the money goes to: a marketplace names it; "" is the connection's own account
            payee=str(params.get("collector_id") or ""),
            payee_kind="collector",
            description=_text(params, "description"),
            metadata=metadata,
            params=plain_numbers(params),
            categories=_item_categories(params),
        )

    def _refund(self, path: str, params: Mapping[str, Any], payment_id: str) -> Payment:
        currency = self._currency(params)
        amount = params.get("amount")
        return Payment(
            provider=self.name,
            operation="refund",
            amount=0 if amount is None else to_minor(amount, currency, "amount"),
            currency="",  # the refunded payment's, once looked up
            method="POST",
            path=path,
            destination=payment_id,
            payee=payment_id,  # the money goes back to the refunded payment's payer
            payee_kind="payment",
            refers_to=payment_id,
            params=plain_numbers(params),
        )

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
        cause: dict[str, Any] = {"code": code, "description": message}
        if param:
            cause["data"] = param
        error: dict[str, Any] = {
            "message": message,
            "error": _ERRORS.get(kind, "internal_error"),
            "status": status,
            "cause": [cause],
        }
        if extra:
            error["paysentry"] = dict(extra)
        headers = {"Content-Type": "application/json"}
        if retry and status == 429:
            headers["Retry-After"] = "1"
        return Reply(status, json.dumps(error).encode(), headers)

    def prepare(self, payment: Payment, body: bytes) -> bytes:
        return body

    def attribute(self, payment: Payment, body: bytes, authorization_id: str) -> bytes:
        """``metadata.paysentry_authorization`` in the payment's JSON (its other metadata kept). Refunds
        are not tagged: MercadoPago lists payments, and a refund is found in its payment."""
        if payment.operation != "payment":
            return body
        params = json.loads(body)
        metadata = params.get("metadata") or {}
        params["metadata"] = {**metadata, ATTRIBUTION: authorization_id}
        return json.dumps(params, separators=(",", ":")).encode()

    # -- the provider's records ------------------------------------------------------------------------
    def listings(self, since: float, until: float) -> Sequence[str]:
        query = {
            "range": "date_created",
            "begin_date": _iso(since),
            "end_date": _iso(until),
            "sort": "date_created",
            "criteria": "asc",
            "offset": 0,
            "limit": PAGE_SIZE,
        }
        return [f"{SEARCH}?{urlencode(query)}"]

    def page(self, target: str, body: bytes) -> ProviderPage:
        found = self._object(body)
        results = found.get("results") if found else None
        paging = found.get("paging") if found else None
        if not isinstance(results, list) or not isinstance(paging, dict):
            raise ValueError(f"{SEARCH} did not answer a MercadoPago search (results, paging)")
        objects = tuple(o for o in map(payment_object, results) if o is not None)
        query = dict(parse_qsl(target.split("?", 1)[1] if "?" in target else ""))
        offset = int(query.get("offset", "0")) + len(results)
        total = paging.get("total")
        if not results or not isinstance(total, int) or offset >= total:
            return ProviderPage(objects, None)
        return ProviderPage(objects, f"{SEARCH}?{urlencode({**query, 'offset': offset})}")

    def object_of(self, body: bytes) -> ProviderObject | None:
        return payment_object(self._object(body))

    def part_of(self, body: bytes) -> None:
        return None  # a payment is made by its own call

    def webhook_ack(self, result: str, extra: Mapping[str, str]) -> Reply:
        """MercadoPago takes a 200 or 201 as delivered (and retries otherwise); the body is ignored."""
        body = json.dumps({"received": True, "result": result, **extra}).encode()
        return Reply(200, body, {"Content-Type": "application/json"})

    def is_one_time_card(self, payment_summary: Mapping[str, Any]) -> bool:
        return False  # PaySentry creates no MercadoPago cards

    def card_cancel_should_retry(self, status: int) -> bool:
        # No card to cancel; MercadoPago's rule for any call: unreachable, too many requests, or failing.
        return status in (0, 429) or status >= 500

    def declined_in(self, body: bytes) -> str | None:
        obj = self._object(body)
        status = obj.get("status") if obj else None
        if obj and status in DECLINED_STATUSES:
            return f"MercadoPago answered the payment {status} ({obj.get('status_detail') or 'no detail'})"
        return None

    def holds_in(self, operation: str, body: bytes) -> int | None:
        return None  # a MercadoPago capture is whole (PaySentry forwards no partial one)

    def undecided_in(self, body: bytes) -> bool:
        return False  # a payment read back is decided, even "in_process" (its outcome arrives by event)

    def cancelled_in(self, body: bytes) -> bool:
        return (self._object(body) or {}).get("status") == "cancelled"

    def credential_headers(self, credentials: Mapping[str, str]) -> dict[str, str]:
        return {"Authorization": f"Bearer {credentials['secret_key']}"}

    @staticmethod
    def _object(body: bytes) -> dict[str, Any] | None:
        try:
            obj = safejson.loads(body, parse_float=Decimal)
        except ValueError:
            return None
        return obj if isinstance(obj, dict) else None

    def provider_ref(self, body: bytes) -> str | None:
        ref = (self._object(body) or {}).get("id")
        return str(ref) if isinstance(ref, (int, str)) and not isinstance(ref, bool) else None

    def lookup_path(self, payment: Payment) -> str | None:
        return f"/v1/payments/{payment.refers_to}" if payment.refers_to else None

    def amount_of(self, payment: Payment, body: bytes) -> tuple[int, str] | None:
        obj = self._object(body)
        try:
            assert obj is not None
            currency = str(obj["currency_id"]).lower()
            total = to_minor(obj["transaction_amount"], currency, "transaction_amount")
            refunded = obj.get("transaction_amount_refunded") or 0
            done = to_minor(refunded, currency, "transaction_amount_refunded") if refunded else 0
        except (AssertionError, KeyError, BadRequest):
            return None
        if payment.operation == "refund":
            return bounded_refund(payment, total - done, currency)
        return payment.amount or total - done, currency

    def verify_webhook(
        self, headers: Mapping[str, str], body: bytes, secret: str, now: float, tolerance: float
    ) -> WebhookEvent:
        """MercadoPago's scheme: ``x-signature: ts=<ts>,v1=<hex>`` and ``x-request-id``; the HMAC-SHA256
        covers ``id:<data.id>;request-id:<x-request-id>;ts:<ts>;`` (absent parts left out)."""
        timestamp, signatures = "", []
        for item in headers.get("x-signature", "").split(","):
            name, _, value = item.strip().partition("=")
            if name == "ts" and value.isascii() and value.isdigit() and len(value) <= 16:
                timestamp = value
            elif name == "v1":
                signatures.append(value)
        if not timestamp or not signatures:
            raise WebhookRejected("the x-signature header is missing or has no ts= and v1= parts")
        event = self._object(body)
        data = event.get("data") if event else None
        data_id = data.get("id") if isinstance(data, dict) else None
        if event is None or not isinstance(data_id, (str, int)) or isinstance(data_id, bool):
            raise WebhookRejected("the notification is not a JSON object with data.id")
        data_id = str(data_id).lower()
        manifest = f"id:{data_id};"
        request_id = headers.get("x-request-id", "")
        if request_id:
            manifest += f"request-id:{request_id};"
        manifest += f"ts:{timestamp};"
        expected = hmac.new(secret.encode(), manifest.encode(), hashlib.sha256).hexdigest()
        if not any(hmac.compare_digest(expected.encode(), s.encode()) for s in signatures):
            raise WebhookRejected("no v1 signature in x-signature matches this notification")
        seconds = int(timestamp) / 1000 if len(timestamp) > 11 else int(timestamp)  # ms or s
        if abs(now - seconds) > tolerance:
            raise WebhookRejected(
                f"the signature's timestamp is {int(now - seconds)} s from now, outside the "
                f"{int(tolerance)} s tolerance (a replayed or delayed notification)"
            )
        kind = event.get("action") or event.get("type")
        event_id = event.get("id")
        if not isinstance(kind, str) or not isinstance(event_id, (str, int)):
            raise WebhookRejected("the notification has no id or no action/type")
        # A notification only says that something changed, not what the payment became: read it.
        about_payment = event.get("type") == "payment" or kind.startswith("payment.")
        read = f"/v1/payments/{data_id}" if about_payment and re.fullmatch(r"[0-9a-z_-]+", data_id) else None
        return WebhookEvent(str(event_id), kind, data_id, None, read=read)
