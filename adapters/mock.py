"""The built-in mock payment provider: a small Stripe-compatible server, and its adapter.

It lets the quick start and the tests pay with no account and no network. It speaks Stripe's wire format
(form bodies, bearer auth, ``Idempotency-Key`` replay, Stripe-shaped errors), keeps every object it
creates and every request it received, and follows Stripe's test conventions for failures:
``payment_method=pm_card_chargeDeclined`` or ``source=tok_chargeDeclined`` decline with a 402 (a declined
intent still exists, carried in ``error.payment_intent``, and can be confirmed later with another method),
and ``metadata[mock_delay_ms]=N`` answers N ms *after* the work is done (a client that times out has still
moved the money, as with a real provider). An intent with ``capture_method=manual`` is authorized when
confirmed and captured later, wholly or in part (the rest goes back), and its authorization can be raised
(``increment_authorization``); a charge made with ``capture=false`` is captured later the same way; a
succeeded intent cannot be cancelled, and no capture exceeds what is capturable.

Lists (``GET /v1/<objects>``) page as Stripe's do: newest first, ``created[gte]`` and its siblings,
``limit``, ``starting_after``, ``has_more``. Introspection (not part of Stripe): ``GET /_mock/requests``,
``GET /_mock/objects``, ``POST /_mock/reset``.
MercadoPago's payments API is served beside it (``adapters/mock_mercadopago.py``): ``/v1/payments...``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import time
from typing import Any, cast

from aiohttp import web

from adapters.formencode import parse_form
from adapters.mock_mercadopago import MockMercadoPago
from adapters.stripe import StripeAdapter
from proxy.errors import BadRequest

DEFAULT_PORT = 12111
DEFAULT_SECRET_KEY = "sk_test_paysentry_mock"
DECLINING = {"pm_card_chargeDeclined", "tok_chargeDeclined"}
COLLECTIONS = {
    "payment_intents": "pi",
    "charges": "ch",
    "transfers": "tr",
    "payouts": "po",
    "refunds": "re",
    "customers": "cus",
    "payment_methods": "pm",
    "setup_intents": "seti",
    "products": "prod",
    "prices": "price",
}


class MockAdapter(StripeAdapter):
    """Stripe's adapter, pointed at the built-in mock provider by default."""

    name = "mock"
    default_upstream = f"http://127.0.0.1:{DEFAULT_PORT}"


def _error(status: int, kind: str, message: str, code: str = "", param: str = "") -> web.Response:
    error = {"type": kind, "message": message}
    if code:
        error["code"] = code
    if param:
        error["param"] = param
    return web.json_response({"error": error}, status=status, headers={"Request-Id": _new_id("req")})


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


class MockProvider:
    def __init__(self, secret_key: str = DEFAULT_SECRET_KEY) -> None:
        self.secret_key = secret_key
        self.requests: list[dict[str, Any]] = []
        self.objects: dict[str, dict[str, Any]] = {}
        self._idempotent: dict[str, tuple[str, int, bytes]] = {}
        self._in_flight: set[str] = set()
        self.mercadopago = MockMercadoPago(self.requests)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/_mock/requests", self._list_requests)
        app.router.add_get("/_mock/objects", self._list_objects)
        app.router.add_post("/_mock/reset", self._reset)
        self.mercadopago.add_routes(app)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _list_requests(self, request: web.Request) -> web.Response:
        return web.json_response({"data": self.requests})

    async def _list_objects(self, request: web.Request) -> web.Response:
        kind = request.query.get("object")
        data = [o for o in self.objects.values() if not kind or o.get("object") == kind]
        return web.json_response({"data": data})

    async def _reset(self, request: web.Request) -> web.Response:
        self.requests.clear()
        self.objects.clear()
        self._idempotent.clear()
        self.mercadopago.reset()
        return web.json_response({"reset": True})

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        auth = request.headers.get("Authorization", "")
        authorized = hmac.compare_digest(auth.encode(), f"Bearer {self.secret_key}".encode())
        key = request.headers.get("Idempotency-Key")
        try:
            params = parse_form(body) if request.method == "POST" else dict(request.query)
        except BadRequest as exc:
            return _error(400, "invalid_request_error", exc.message, param=exc.param or "")
        record = {
            "method": request.method,
            "path": request.path,
            "params": params,
            "idempotency_key": key,
            "stripe_account": request.headers.get("Stripe-Account"),
            "traceparent": request.headers.get("traceparent"),
            "authorized": authorized,
            "at": time.time(),
        }
        if not authorized:
            record["status"] = 401
            self.requests.append(record)
            return _error(401, "invalid_request_error", "Invalid API Key provided.")
        fingerprint = hashlib.sha256(request.method.encode() + request.path.encode() + body).hexdigest()
        if key and request.method == "POST" and key in self._idempotent:
            seen, status, payload = self._idempotent[key]
            record["status"], record["replayed"] = status, True
            self.requests.append(record)
            if seen != fingerprint:
                return _error(
                    400,
                    "idempotency_error",
                    "Keys for idempotent requests can only be used with the "
                    "same parameters they were first used with.",
                )
            return web.Response(
                status=status,
                body=payload,
                content_type="application/json",
                headers={"Idempotent-Replayed": "true"},
            )
        if key and request.method == "POST" and key in self._in_flight:
            record["status"] = 409
            self.requests.append(record)
            return _error(
                409,
                "idempotency_error",
                "There is currently another in-progress request using this "
                f"Idempotent Key: {key}. Please try again later.",
            )
        if key and request.method == "POST":
            self._in_flight.add(key)
        try:
            metadata = params.get("metadata")
            delay = metadata.get("mock_delay_ms") if isinstance(metadata, dict) else None
            response = self._route(request.method, request.path, params)
            if (
                delay and str(delay).isascii() and str(delay).isdigit() and len(str(delay)) < 6
            ):  # like a slow provider: done, then answered late
                await asyncio.sleep(int(delay) / 1000)
        finally:
            self._in_flight.discard(key or "")
        record["status"] = response.status
        self.requests.append(record)
        if key and request.method == "POST":
            self._idempotent[key] = (fingerprint, response.status, cast(bytes, response.body))
        return response

    # -- the Stripe-compatible surface ------------------------------------------------------------------
    def _route(self, method: str, path: str, params: dict[str, Any]) -> web.Response:
        parts = path.strip("/").split("/")
        if parts[0] != "v1" or len(parts) < 2:
            return _error(404, "invalid_request_error", f"Unrecognized request URL ({method}: {path}).")
        collection = "/".join(parts[1:3]) if parts[1] == "issuing" else parts[1]
        rest = parts[3:] if parts[1] == "issuing" else parts[2:]
        if method == "GET":
            return self._read(collection, rest, params)
        if method == "DELETE" and collection == "customers" and len(rest) == 1:
            obj = self.objects.pop(rest[0], None)
            return (
                web.json_response({"id": rest[0], "object": "customer", "deleted": True})
                if obj
                else _error(
                    404, "invalid_request_error", f"No such customer: '{rest[0]}'", "resource_missing"
                )
            )
        if method != "POST":
            return _error(404, "invalid_request_error", f"Unrecognized request URL ({method}: {path}).")
        try:
            if not rest:
                return self._create(collection, params)
            return self._act(collection, rest, params)
        except BadRequest as exc:
            return _error(400, "invalid_request_error", exc.message, "parameter_missing", exc.param or "")

    def _read(self, collection: str, rest: list[str], params: dict[str, Any]) -> web.Response:
        if not rest:
            return self._list(collection, params)
        obj = self.objects.get(rest[0])
        if obj is None or obj.get("_collection") != collection:
            return _error(
                404, "invalid_request_error", f"No such object: '{rest[0]}'", "resource_missing", "id"
            )
        return web.json_response(_public(obj))

    def _list(self, collection: str, params: dict[str, Any]) -> web.Response:
        """As Stripe lists: newest first, ``created[gte|gt|lte|lt]`` filters, ``limit`` (1-100, default 10),
        ``starting_after`` (the page after that object), ``has_more``."""
        try:
            limit = int(params.get("limit", "10"))
            bounds = {
                op: int(params[f"created[{op}]"])
                for op in ("gte", "gt", "lte", "lt")
                if f"created[{op}]" in params
            }
        except ValueError:
            return _error(400, "invalid_request_error", "Invalid integer in the list parameters.")
        if not 1 <= limit <= 100:
            return _error(400, "invalid_request_error", "limit must be between 1 and 100.", param="limit")
        tests = {
            "gte": lambda c, b: c >= b,
            "gt": lambda c, b: c > b,
            "lte": lambda c, b: c <= b,
            "lt": lambda c, b: c < b,
        }
        data = [
            o
            for o in reversed(list(self.objects.values()))  # newest first (insertion order breaks ties)
            if o.get("_collection") == collection
            and all(tests[op](o["created"], bound) for op, bound in bounds.items())
        ]
        after = params.get("starting_after")
        if after:
            ids = [o["id"] for o in data]
            if after not in ids:
                return _error(
                    404,
                    "invalid_request_error",
                    f"No such object: '{after}'",
                    "resource_missing",
                    "starting_after",
                )
            data = data[ids.index(after) + 1 :]
        page = data[:limit]
        return web.json_response(
            {
                "object": "list",
                "data": [_public(o) for o in page],
                "has_more": len(data) > limit,
                "url": f"/v1/{collection}",
            }
        )

    def _create(self, collection: str, params: dict[str, Any]) -> web.Response:
        if collection == "issuing/cards":
            prefix, kind = "ic", "issuing.card"
        elif collection in COLLECTIONS:
            prefix, kind = COLLECTIONS[collection], collection.rstrip("s")
        else:
            return _error(404, "invalid_request_error", f"Unrecognized request URL (POST: /v1/{collection}).")
        declined = params.get("payment_method") in DECLINING or params.get("source") in DECLINING
        if declined and collection != "payment_intents":
            return _error(402, "card_error", "Your card was declined.", "card_declined")
        obj: dict[str, Any] = {
            "id": _new_id(prefix),
            "object": kind,
            "_collection": collection,
            "created": int(time.time()),
            "livemode": False,
            **_plain(params),
        }
        if "amount" in params:
            obj["amount"] = _int(params, "amount")
        if collection == "payment_intents":
            obj["status"], obj["amount_received"] = "requires_confirmation", 0
            if params.get("confirm") == "true" and not declined:
                _confirm(obj)
            obj["client_secret"] = f"{obj['id']}_secret_{secrets.token_hex(8)}"
            if declined:  # as Stripe: the intent exists, and the decline carries it
                obj["status"] = "requires_payment_method"
                obj["last_payment_error"] = {"type": "card_error", "code": "card_declined"}
                self.objects[obj["id"]] = obj
                return _declined(obj)
        elif collection == "charges":  # capture=false: authorized, captured later (wholly or in part)
            captured = params.get("capture") != "false"
            obj.update(status="succeeded", paid=True, amount_refunded=0, captured=captured)
            obj["amount_captured"] = obj.get("amount", 0) if captured else 0
        elif collection == "refunds":
            target = self.objects.get(params.get("charge") or params.get("payment_intent") or "")
            if target is None:
                return _error(
                    404,
                    "invalid_request_error",
                    "No such charge or payment intent",
                    "resource_missing",
                    "charge",
                )
            obj.setdefault("amount", target.get("amount", 0) - target.get("amount_refunded", 0))
            obj.update(currency=target.get("currency"), status="succeeded")
            target["amount_refunded"] = target.get("amount_refunded", 0) + obj["amount"]
        elif collection == "issuing/cards":
            obj.update(status="active", last4="4242")
        self.objects[obj["id"]] = obj
        return web.json_response(_public(obj))

    def _act(self, collection: str, rest: list[str], params: dict[str, Any]) -> web.Response:
        obj = self.objects.get(rest[0])
        if obj is None or obj.get("_collection") != collection:
            return _error(
                404, "invalid_request_error", f"No such object: '{rest[0]}'", "resource_missing", "id"
            )
        action = rest[1] if len(rest) > 1 else "update"
        if collection == "payment_intents" and action == "increment_authorization":
            if obj.get("status") != "requires_capture":
                return _error(
                    400,
                    "invalid_request_error",
                    "Only an authorized, uncaptured PaymentIntent can be incremented.",
                )
            if _int_or(params, "amount", 0) <= obj["amount"]:
                return _error(
                    400,
                    "invalid_request_error",
                    "amount must be greater than the current amount.",
                    param="amount",
                )
            obj.update(amount=_int(params, "amount"), amount_capturable=_int(params, "amount"))
            return web.json_response(_public(obj))
        if collection == "charges" and action == "capture":
            if obj.get("captured"):
                return _error(400, "invalid_request_error", f"Charge {obj['id']} has already been captured.")
            amount = _int_or(params, "amount", obj["amount"])
            if amount > obj["amount"]:
                return _error(
                    400, "invalid_request_error", "amount exceeds the amount authorized.", param="amount"
                )
            obj.update(captured=True, amount_captured=amount)
            return web.json_response(_public(obj))
        if collection == "payment_intents" and action in ("confirm", "capture", "cancel"):
            if params.get("payment_method") in DECLINING:
                obj["status"] = "requires_payment_method"
                obj["last_payment_error"] = {"type": "card_error", "code": "card_declined"}
                return _declined(obj)
            status = obj.get("status")
            if action == "cancel" and status in ("succeeded", "canceled"):
                return _error(
                    400,
                    "invalid_request_error",
                    f"This PaymentIntent's status is {status}; it cannot be canceled.",
                )
            if action == "capture" and status != "requires_capture":
                return _error(
                    400,
                    "invalid_request_error",
                    f"This PaymentIntent could not be captured because it has a status of {status}.",
                )
            if action == "capture" and _int_or(params, "amount_to_capture", 0) > obj["amount_capturable"]:
                return _error(
                    400, "invalid_request_error", "amount_to_capture exceeds the amount capturable."
                )
            if action == "confirm" and status not in ("requires_confirmation", "requires_payment_method"):
                return _error(
                    400,
                    "invalid_request_error",
                    f"This PaymentIntent's status is {status}; it cannot be confirmed.",
                )
            if action == "cancel":
                obj.update(status="canceled", amount_capturable=0)
            elif action == "confirm":
                _confirm(obj)
            else:  # a partial capture gives the rest back to the cardholder
                captured = _int(params, "amount_to_capture") if "amount_to_capture" in params else None
                obj.update(
                    status="succeeded",
                    amount_received=obj["amount_capturable"] if captured is None else captured,
                    amount_capturable=0,
                )
        elif action == "update":
            obj.update(_plain(params))
        else:
            obj.setdefault("actions", []).append(action)
        return web.json_response(_public(obj))


def _confirm(intent: dict[str, Any]) -> None:
    """As Stripe: a manual-capture intent is authorized (its amount capturable), any other is paid."""
    intent.pop("last_payment_error", None)
    if intent.get("capture_method") == "manual":
        intent.update(status="requires_capture", amount_capturable=intent["amount"])
    else:
        intent.update(status="succeeded", amount_received=intent["amount"])


def _declined(intent: dict[str, Any]) -> web.Response:
    error = {
        "type": "card_error",
        "code": "card_declined",
        "message": "Your card was declined.",
        "payment_intent": _public(intent),
    }
    return web.json_response({"error": error}, status=402)


def _int_or(params: dict[str, Any], key: str, default: int) -> int:
    return _int(params, key) if key in params else default


def _int(params: dict[str, Any], key: str) -> int:
    value = params.get(key, "")
    if not isinstance(value, str) or not (value.isascii() and value.isdigit()) or len(value) > 18:
        raise BadRequest(f"Invalid integer: {value!r}", param=key)
    return int(value)


def _plain(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k not in ("confirm", "expand")}


def _public(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if not k.startswith("_")}


def serve_mock(
    host: str = "127.0.0.1", port: int = DEFAULT_PORT, secret_key: str = DEFAULT_SECRET_KEY
) -> None:
    """Run the mock provider on its own (``paysentry mock-provider``)."""
    print(json.dumps({"msg": "mock provider listening", "url": f"http://{host}:{port}"}), flush=True)
    web.run_app(MockProvider(secret_key).app(), host=host, port=port, print=None)
