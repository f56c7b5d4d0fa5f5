"""The built-in mock of MercadoPago's payments API, served by the mock provider beside its Stripe surface.

Accounts are access tokens; each belongs to a site whose currency its payments carry (``ACCOUNTS``). It
speaks MercadoPago's wire format: JSON bodies, ``transaction_amount`` in the major unit, a mandatory
``X-Idempotency-Key`` (a retry with the same key returns the payment already created), ``201`` with the
payment's ``status`` (``approved``, or ``rejected`` for the test card token ``rejected`` or a payer named
``REJECTED``), refunds, reads, the search (``GET /v1/payments/search``, by creation date, paged), and errors as ``{"message", "error", "status", "cause"}``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, cast

from aiohttp import web

from adapters.mercadopago import CURRENCIES, plain_numbers, to_minor
from proxy.currency import exponent
from proxy.errors import BadRequest

# Test accounts by access token: the currency of each one's site.
ACCOUNTS = {f"APP_USR-paysentry-mock-{c}": c.upper() for c in sorted(CURRENCIES)}
REJECTING = {"rejected"}
SITE = timezone(timedelta(hours=-4))


def _error(status: int, error: str, message: str, code: int = 0) -> web.Response:
    body = {
        "message": message,
        "error": error,
        "status": status,
        "cause": [{"code": code, "description": message}],
    }
    return web.json_response(body, status=status)


def _number(minor: int, currency: str) -> Any:
    value = Decimal(minor).scaleb(-exponent(currency.lower()))
    return int(value) if value == value.to_integral_value() else float(value)


class MockMercadoPago:
    def __init__(self, requests: list[dict[str, Any]]) -> None:
        self.requests = requests  # shared with the mock provider's log
        self.payments: dict[str, dict[str, Any]] = {}
        self._idempotent: dict[str, tuple[str, int, bytes]] = {}
        self._ids = itertools.count(1_000_000_001)

    def reset(self) -> None:
        self.payments.clear()
        self._idempotent.clear()

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/payments", self._wrap(self._create))
        app.router.add_get("/v1/payments/search", self._wrap(self._search))  # before /{id}
        app.router.add_get("/v1/payments/{id}", self._wrap(self._read))
        app.router.add_put("/v1/payments/{id}", self._wrap(self._update))
        app.router.add_post("/v1/payments/{id}/refunds", self._wrap(self._refund))
        app.router.add_get("/users/me", self._wrap(self._me))

    def _wrap(
        self, handler: Callable[[web.Request, str, dict[str, Any]], web.Response]
    ) -> Callable[[web.Request], Any]:
        async def handle(request: web.Request) -> web.Response:
            body = await request.read()
            auth = request.headers.get("Authorization", "")
            currency = ACCOUNTS.get(auth.removeprefix("Bearer "))
            key = request.headers.get("X-Idempotency-Key")
            record: dict[str, Any] = {
                "method": request.method,
                "path": request.path,
                "idempotency_key": key,
                "traceparent": request.headers.get("traceparent"),
                "authorized": currency is not None,
                "at": time.time(),
            }
            self.requests.append(record)
            try:
                params = json.loads(body, parse_float=Decimal) if body else {}
            except ValueError:
                params = None
            record["params"] = plain_numbers(params)
            if currency is None:
                record["status"] = 401
                return _error(401, "unauthorized", "invalid access token", 2)
            if not isinstance(params, dict):
                record["status"] = 400
                return _error(400, "bad_request", "the body must be a JSON object", 1)
            fingerprint = hashlib.sha256(request.method.encode() + request.path.encode() + body).hexdigest()
            if request.method == "POST" and key and key in self._idempotent:
                seen, status, payload = self._idempotent[key]
                record["status"], record["replayed"] = status, True
                if seen != fingerprint:
                    return _error(409, "conflict", "the idempotency key was used with another request", 409)
                return web.Response(status=status, body=payload, content_type="application/json")
            response = handler(request, currency, params)
            record["status"] = response.status
            if request.method == "POST" and key:
                self._idempotent[key] = (fingerprint, response.status, cast(bytes, response.body))
            return response

        return handle

    def _me(self, request: web.Request, currency: str, params: dict[str, Any]) -> web.Response:
        return web.json_response({"id": 1, "site_id": currency, "currency_id": currency})

    def _create(self, request: web.Request, currency: str, params: dict[str, Any]) -> web.Response:
        if not request.headers.get("X-Idempotency-Key"):
            return _error(400, "bad_request", "header X-Idempotency-Key is required", 4292)
        if params.get("currency_id") not in (None, currency):
            return _error(400, "bad_request", f"currency_id must be {currency} for this account", 4)
        try:
            amount = to_minor(params.get("transaction_amount"), currency.lower(), "transaction_amount")
        except BadRequest as exc:
            return _error(400, "bad_request", exc.message, 4)
        if not params.get("payment_method_id"):
            return _error(400, "bad_request", "payment_method_id is required", 4020)
        payer = params.get("payer")
        payer = payer if isinstance(payer, dict) else {}
        rejected = params.get("token") in REJECTING or payer.get("first_name") == "REJECTED"
        payment_id, now = next(self._ids), time.time()
        payment = {
            "id": payment_id,
            "status": "rejected" if rejected else "approved",
            "status_detail": "cc_rejected_other_reason" if rejected else "accredited",
            "currency_id": currency,
            "transaction_amount": _number(amount, currency),
            "transaction_amount_refunded": 0,
            "captured": params.get("capture", True) is not False,
            "description": params.get("description"),
            "payment_method_id": params.get("payment_method_id"),
            "external_reference": params.get("external_reference"),
            "payer": plain_numbers(payer),
            "additional_info": plain_numbers(params.get("additional_info") or {}),
            "metadata": plain_numbers(params.get("metadata") or {}),
            "date_created": _date(now),
            "refunds": [],
            "_created": now,
            "_minor": amount,
            "_refunded": 0,
        }
        self.payments[str(payment_id)] = payment
        return web.json_response(_public(payment), status=201)

    def _search(self, request: web.Request, currency: str, params: dict[str, Any]) -> web.Response:
        """As MercadoPago's search: the account's payments, ``range=date_created`` between ``begin_date``
        and ``end_date`` (ISO 8601), ``sort=date_created`` ``criteria=asc|desc``, ``offset``, ``limit``
        (at most 100 here), answered as ``{paging: {total, limit, offset}, results}``."""
        query = request.query
        try:
            offset, limit = int(query.get("offset", "0")), int(query.get("limit", "30"))
            begin = datetime.fromisoformat(query["begin_date"]).timestamp() if "begin_date" in query else None
            end = datetime.fromisoformat(query["end_date"]).timestamp() if "end_date" in query else None
        except ValueError:
            return _error(400, "bad_request", "invalid search parameters", 4)
        if query.get("range", "date_created") != "date_created" or not 0 < limit <= 100 or offset < 0:
            return _error(400, "bad_request", "invalid search parameters", 4)
        found = [
            p
            for p in self.payments.values()
            if p["currency_id"] == currency
            and (begin is None or p["_created"] >= begin)
            and (end is None or p["_created"] <= end)
        ]
        found.sort(key=lambda p: p["_created"], reverse=query.get("criteria") == "desc")
        results = [_public(p) for p in found[offset : offset + limit]]
        return web.json_response(
            {"paging": {"total": len(found), "limit": limit, "offset": offset}, "results": results}
        )

    def _find(self, request: web.Request) -> dict[str, Any] | None:
        return self.payments.get(request.match_info["id"])

    def _read(self, request: web.Request, currency: str, params: dict[str, Any]) -> web.Response:
        payment = self._find(request)
        if payment is None or payment["currency_id"] != currency:
            return _error(404, "not_found", "Payment not found", 2000)
        return web.json_response(_public(payment))

    def _update(self, request: web.Request, currency: str, params: dict[str, Any]) -> web.Response:
        payment = self._find(request)
        if payment is None or payment["currency_id"] != currency:
            return _error(404, "not_found", "Payment not found", 2000)
        if params.get("status") == "cancelled":
            payment["status"] = "cancelled"
        if params.get("capture") is True:
            payment["captured"] = True
        return web.json_response(_public(payment))

    def _refund(self, request: web.Request, currency: str, params: dict[str, Any]) -> web.Response:
        payment = self._find(request)
        if payment is None or payment["currency_id"] != currency:
            return _error(404, "not_found", "Payment not found", 2000)
        left = payment["_minor"] - payment["_refunded"]
        try:
            amount = to_minor(params["amount"], currency.lower(), "amount") if "amount" in params else left
        except BadRequest as exc:
            return _error(400, "bad_request", exc.message, 4)
        if payment["status"] != "approved" or amount > left:
            return _error(400, "bad_request", "the amount exceeds what can be refunded", 2085)
        payment["_refunded"] += amount
        payment["transaction_amount_refunded"] = _number(payment["_refunded"], currency)
        if payment["_refunded"] == payment["_minor"]:
            payment["status"] = "refunded"
        refund = {
            "id": next(self._ids),
            "payment_id": payment["id"],
            "amount": _number(amount, currency),
            "status": "approved",
            "date_created": _date(time.time()),
        }
        payment["refunds"].append(refund)
        return web.json_response(refund, status=201)


def _date(at: float) -> str:
    """A date as MercadoPago writes it: ISO 8601 with milliseconds, in the site's offset (-04:00)."""
    return datetime.fromtimestamp(at, SITE).isoformat(timespec="milliseconds")


def _public(payment: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in payment.items() if not k.startswith("_")}
