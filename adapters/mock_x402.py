"""A paid resource and a facilitator for x402, offline: the demo of ``make run`` and the end-to-end tests.

The resource is a Flask app behind the official SDK's own server middleware (``x402.http.middleware.
flask``), which asks the facilitator to verify and settle. The facilitator needs no chain: it recovers
the EIP-712 signer of the EIP-3009 ``transferWithAuthorization`` with ``eth-account`` (its own table
of signing domains, not the payment's), checks payer, amount, payee, validity window and nonce, and
records settlements (a used nonce is refused). Faults are injectable (``POST /_faults``): ``verify:
refuse``; ``settle``: ``pending`` (success false, and the transfer happens), ``dropped`` (success false,
and it never does), ``error_after`` (the transfer recorded, then a 500), ``timeout`` (recorded, then no
answer for 10 s), ``fail`` (refused). ``POST /rpc`` answers ``eth_call`` of ``authorizationState`` from
the settlements, as the token contract on the chain would.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from typing import Any

from aiohttp import web

NETWORK = "eip155:84532"  # Base Sepolia
USDC = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
OTHER_ASSET = "0x1111111111111111111111111111111111111111"
PAY_TO = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"
OTHER_PAY_TO = "0x8ba1f109551bD432803012645Ac136ddd64DBA72"
DOMAINS = {(NETWORK, USDC.lower()): ("USDC", "2", 84532)}
# path -> (amount in USDC minor units, asset, payTo, max timeout seconds)
PRICES: dict[str, tuple[int, str, str, int]] = {
    "/report": (10_000, USDC, PAY_TO, 60),  # 0.01 USDC
    "/premium": (2_000_000, USDC, PAY_TO, 60),  # 2 USDC
    "/other-payee": (10_000, USDC, OTHER_PAY_TO, 60),
    "/other-asset": (10_000, OTHER_ASSET, PAY_TO, 60),
    "/quick": (10_000, USDC, PAY_TO, 2),  # a 2-second authorization
}
_TYPES = {
    "EIP712Domain": [
        {"name": "name", "type": "string"},
        {"name": "version", "type": "string"},
        {"name": "chainId", "type": "uint256"},
        {"name": "verifyingContract", "type": "address"},
    ],
    "TransferWithAuthorization": [
        {"name": "from", "type": "address"},
        {"name": "to", "type": "address"},
        {"name": "value", "type": "uint256"},
        {"name": "validAfter", "type": "uint256"},
        {"name": "validBefore", "type": "uint256"},
        {"name": "nonce", "type": "bytes32"},
    ],
}


class Facilitator:
    def __init__(self) -> None:
        self.settlements: dict[str, dict[str, Any]] = {}  # nonce -> what was transferred
        self.faults: dict[str, str] = {}
        self.lock = asyncio.Lock()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/supported", self.supported)
        app.router.add_post("/verify", self.verify)
        app.router.add_post("/settle", self.settle)
        app.router.add_post("/rpc", self.rpc)
        app.router.add_post("/_faults", self.set_faults)
        app.router.add_get("/_settlements", self.list_settlements)
        return app

    async def supported(self, request: web.Request) -> web.Response:
        kinds = [{"x402Version": 2, "scheme": "exact", "network": NETWORK}]
        return web.json_response({"kinds": kinds, "extensions": [], "signers": {}})

    async def set_faults(self, request: web.Request) -> web.Response:
        self.faults = {str(k): str(v) for k, v in (await request.json()).items() if v}
        return web.json_response(self.faults)

    async def list_settlements(self, request: web.Request) -> web.Response:
        return web.json_response({"data": list(self.settlements.values())})

    async def verify(self, request: web.Request) -> web.Response:
        body = await request.json()
        payer, problem = self.check(body)
        if problem is None and self.faults.get("verify") == "refuse":
            problem = "refused_by_fault"
        return web.json_response({"isValid": problem is None, "invalidReason": problem, "payer": payer})

    async def rpc(self, request: web.Request) -> web.Response:
        """The chain, as far as PaySentry reads it: ``eth_call`` of EIP-3009 ``authorizationState(payer,
        nonce)`` answers whether a transfer used that authorization."""
        call = await request.json()
        data = str(call["params"][0]["data"]).lower()
        if call.get("method") != "eth_call" or not data.startswith("0xe94a0102") or len(data) != 138:
            return web.json_response({"jsonrpc": "2.0", "id": call.get("id"), "error": {"code": -32601}})
        payer, nonce = "0x" + data[10 + 24 : 74], "0x" + data[74:]
        used = any(
            s["nonce"].lower() == nonce and s["payer"].lower() == payer for s in self.settlements.values()
        )
        return web.json_response(
            {"jsonrpc": "2.0", "id": call.get("id"), "result": "0x" + f"{int(used):064x}"}
        )

    async def settle(self, request: web.Request) -> web.Response:
        body = await request.json()
        requirements = body["paymentRequirements"]
        async with self.lock:
            payer, problem = self.check(body)
            fault = self.faults.get("settle", "")
            if problem is None and fault == "fail":
                problem = "refused_by_fault"
            if problem is not None:
                return web.json_response(_settled(False, payer, "", requirements, problem))
            if fault == "dropped":  # pending, and the transfer never happens
                return web.json_response(_settled(False, payer, "", requirements, "settlement_pending"))
            auth = body["paymentPayload"]["payload"]["authorization"]
            tx = "0x" + hashlib.sha256(auth["nonce"].encode()).hexdigest()
            self.settlements[auth["nonce"]] = {
                "nonce": auth["nonce"],
                "payer": payer,
                "to": auth["to"],
                "value": int(auth["value"]),
                "network": requirements["network"],
                "transaction": tx,
                "at": time.time(),
            }
        if fault == "pending":
            return web.json_response(_settled(False, payer, tx, requirements, "settlement_pending"))
        if fault == "error_after":
            return web.json_response({"error": "internal"}, status=500)
        if fault == "timeout":
            await asyncio.sleep(10)
        return web.json_response(_settled(True, payer, tx, requirements, None))

    def check(self, body: dict[str, Any]) -> tuple[str | None, str | None]:
        """(payer, None) when the authorization is valid for the requirements; else (payer, reason)."""
        from eth_account import Account
        from eth_account.messages import encode_typed_data

        requirements = body["paymentRequirements"]
        payload = body["paymentPayload"]["payload"]
        auth = payload["authorization"]
        domain = DOMAINS.get((requirements["network"], str(requirements["asset"]).lower()))
        if domain is None:
            return None, "unsupported_asset"
        name, version, chain_id = domain
        message = {
            "from": auth["from"],
            "to": auth["to"],
            "value": int(auth["value"]),
            "validAfter": int(auth["validAfter"]),
            "validBefore": int(auth["validBefore"]),
            "nonce": bytes.fromhex(auth["nonce"].removeprefix("0x")),
        }
        typed = {
            "types": _TYPES,
            "primaryType": "TransferWithAuthorization",
            "domain": {"name": name, "version": version, "chainId": chain_id, "verifyingContract": USDC},
            "message": message,
        }
        try:
            signer = Account.recover_message(
                encode_typed_data(full_message=typed), signature=payload["signature"]
            )
        except Exception:
            return None, "invalid_signature"
        now = time.time()
        checks = [
            (signer.lower() == auth["from"].lower(), "invalid_signature"),
            (auth["to"].lower() == requirements["payTo"].lower(), "payee_mismatch"),
            (int(auth["value"]) == int(requirements["amount"]), "amount_mismatch"),
            (int(auth["validAfter"]) <= now < int(auth["validBefore"]), "outside_validity_window"),
            (auth["nonce"] not in self.settlements, "nonce_already_used"),
        ]
        return signer, next((reason for ok, reason in checks if not ok), None)


def _settled(
    ok: bool, payer: str | None, tx: str, requirements: dict[str, Any], reason: str | None
) -> dict[str, Any]:
    answer: dict[str, Any] = {"success": ok, "transaction": tx, "network": requirements["network"]}
    if payer:
        answer["payer"] = payer
    if ok:
        answer["amount"] = str(requirements["amount"])
    if reason:
        answer["errorReason"] = reason
    return answer


def resource_app(facilitator_url: str) -> Any:
    """The paid resource: Flask behind the SDK's payment middleware, one route per entry of PRICES."""
    from flask import Flask, request
    from x402 import x402ResourceServerSync
    from x402.http import FacilitatorConfig, HTTPFacilitatorClientSync
    from x402.http.middleware.flask import PaymentMiddleware
    from x402.http.types import PaymentOption, RouteConfig
    from x402.mechanisms.evm.exact import register_exact_evm_server
    from x402.schemas import AssetAmount

    app = Flask("paysentry-x402-demo")
    received: list[str] = []  # payment headers received (what a merchant sees): a replay test reuses one

    def paid() -> Any:
        header = request.headers.get("PAYMENT-SIGNATURE") or request.headers.get("X-PAYMENT")
        if header:
            received.append(header)
        return {"resource": request.path, "data": "the paid content", "at": time.time()}

    for path in PRICES:
        app.add_url_rule(path, path, paid)
    app.add_url_rule("/free", "free", lambda: {"resource": "/free", "data": "free content"})
    app.add_url_rule("/_received", "received", lambda: {"data": received})
    routes: dict[str, Any] = {}
    for path, (amount, asset, pay_to, timeout) in PRICES.items():
        price = AssetAmount(amount=str(amount), asset=asset, extra={"name": "USDC", "version": "2"})
        option = PaymentOption(
            scheme="exact", pay_to=pay_to, price=price, network=NETWORK, max_timeout_seconds=timeout
        )
        routes[f"GET {path}"] = RouteConfig(accepts=option, description=f"demo resource {path}")
    server = x402ResourceServerSync(HTTPFacilitatorClientSync(FacilitatorConfig(url=facilitator_url)))
    register_exact_evm_server(server, NETWORK)
    PaymentMiddleware(app, routes, server)
    return app


def serve_facilitator(host: str, port: int) -> None:
    print(f"x402 facilitator listening on http://{host}:{port}", flush=True)
    web.run_app(Facilitator().app(), host=host, port=port, print=None, access_log=None)


def serve_resource(host: str, port: int, facilitator_url: str) -> None:
    from werkzeug.serving import make_server

    server = make_server(host, port, resource_app(facilitator_url), threaded=True)
    print(f"x402 paid resource listening on http://{host}:{port}", flush=True)
    server.serve_forever()


def serve_demo(host: str, facilitator_port: int, resource_port: int) -> None:
    """Both at once (``make run``): the resource in a thread, the facilitator in the main loop."""
    url = f"http://{host}:{facilitator_port}"
    threading.Thread(target=serve_resource, args=(host, resource_port, url), daemon=True).start()
    serve_facilitator(host, facilitator_port)
