"""x402: HTTP 402 Payment Required, answered with a signed stablecoin authorization.

Everything PaySentry knows of x402 is here: the networks and assets it will sign for (its own registry:
token decimals and EIP-712 signing domains never come from a 402), how a 402's payment requirements
become a ``Payment``, how an authorization is signed (with the official ``x402`` SDK's ``exact`` EVM
scheme over EIP-3009 ``transferWithAuthorization``), the wire headers of protocol v2 (``PAYMENT-REQUIRED``,
``PAYMENT-SIGNATURE``, ``PAYMENT-RESPONSE``) and v1 (the 402's JSON body, ``X-PAYMENT``,
``X-PAYMENT-RESPONSE``), and what an answer after a signed header says became of the money.

Supported: scheme ``exact`` with EIP-3009 (``transferWithAuthorization``) on the networks and assets of
``NETWORKS``. Refused with a clear message: other schemes (``upto``, batch settlement), ``permit2``
transfers, any network or asset not in the registry, a 402 whose signing domain differs from the
registry's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from adapters.base import Classified, ProviderPage, Reply, Setting, WebhookEvent
from proxy.errors import BadRequest, Forbidden, WebhookRejected
from proxy.model import Payment

PROVIDER = OPERATION = "x402"
PAYMENT_REQUIRED, PAYMENT_SIGNATURE, PAYMENT_RESPONSE = (
    "PAYMENT-REQUIRED",
    "PAYMENT-SIGNATURE",
    "PAYMENT-RESPONSE",
)
X_PAYMENT, X_PAYMENT_RESPONSE = "X-PAYMENT", "X-PAYMENT-RESPONSE"
# Headers an agent may never send through: a payment credential is PaySentry's to make.
PAYMENT_HEADERS = frozenset(
    h.lower() for h in (PAYMENT_SIGNATURE, X_PAYMENT, PAYMENT_RESPONSE, X_PAYMENT_RESPONSE)
)
MAX_AMOUNT = 2**63 - 1
MAX_VALIDITY = (
    600  # longest validity PaySentry signs for (seconds): it bounds how long an outcome is in doubt
)


@dataclass(frozen=True, slots=True)
class Asset:
    """A token PaySentry signs for: its contract, decimals and EIP-712 domain (name, version)."""

    symbol: str
    address: str
    decimals: int
    name: str
    version: str


@dataclass(frozen=True, slots=True)
class Network:
    id: str  # CAIP-2, e.g. eip155:8453
    chain_id: int
    v1_name: str  # the legacy (v1) network name
    assets: tuple[Asset, ...]

    def asset(self, address: str) -> Asset | None:
        return next((a for a in self.assets if a.address.lower() == address.lower()), None)


# PaySentry's registry: only these are ever signed for. Values from Circle's published USDC deployments.
NETWORKS: dict[str, Network] = {
    n.id: n
    for n in (
        Network(
            "eip155:8453",
            8453,
            "base",
            (Asset("usdc", "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913", 6, "USD Coin", "2"),),
        ),
        Network(
            "eip155:84532",
            84532,
            "base-sepolia",
            (Asset("usdc", "0x036CbD53842c5426634e7929541eC2318f3dCF7e", 6, "USDC", "2"),),
        ),
    )
}
_BY_V1_NAME = {n.v1_name: n for n in NETWORKS.values()}


@dataclass(frozen=True, slots=True)
class Quote:
    """One payment requirement of a 402, checked against the registry: what would be signed."""

    version: int  # x402 protocol version, 1 or 2
    network: Network
    asset: Asset
    amount: int  # minor units of the asset
    pay_to: str
    scheme: str
    max_timeout: int
    requirement: Any = field(repr=False)  # the SDK's PaymentRequirements / PaymentRequirementsV1, as sent
    resource: Any = field(default=None, repr=False)  # v2: the 402's ResourceInfo


@dataclass(frozen=True, slots=True)
class Signed:
    """A signed authorization: the header to send (a bearer credential: never stored or logged) and what
    it authorizes (kept)."""

    header: tuple[str, str] = field(repr=False)
    payer: str
    nonce: str
    valid_before: int
    valid_after: int


# What an answer after the signed header says became of the money.
SETTLED, REFUSED, UNKNOWN = "settled", "refused", "unknown"


@dataclass(frozen=True, slots=True)
class Settlement:
    outcome: str  # SETTLED, REFUSED (verification refused before settlement: nothing moved) or UNKNOWN
    reason: str
    transaction: str | None = None


def origin_of(url: str) -> str:
    """``scheme://host[:port]`` of an http(s) URL, the default port left out; ValueError otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        raise ValueError(f"not an http(s) URL without credentials: {url!r}")
    port = parts.port  # ValueError on a bad port
    default = {"http": 80, "https": 443}[parts.scheme]
    host = parts.hostname.lower()
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}" + (f":{port}" if port and port != default else "")


@dataclass(frozen=True, slots=True)
class X402Settings:
    """A connection's settings: the origins its agents may pay, the networks it signs on."""

    allowed_origins: frozenset[str]
    networks: frozenset[str]
    rpc_url: str = ""  # a JSON-RPC endpoint of the chain: whether a signed authorization was used


def parse_settings(settings: Mapping[str, str]) -> X402Settings:
    origins = [o.strip() for o in settings.get("allowed_origins", "").split(",") if o.strip()]
    normalized = set()
    for origin in origins:
        try:
            normalized.add(origin_of(origin))
        except ValueError as exc:
            raise ValueError(f"allowed_origins: {exc}") from None
        if origin_of(origin) != origin.rstrip("/").lower() and urlsplit(origin).path not in ("", "/"):
            raise ValueError(f"allowed_origins: {origin!r} is not an origin (no path)")
    if not normalized:
        raise ValueError(
            "an x402 connection needs allowed_origins (comma-separated, e.g. https://api.example.com)"
        )
    networks = [n.strip() for n in settings.get("networks", "").split(",") if n.strip()] or list(NETWORKS)
    unknown = sorted(set(networks) - set(NETWORKS))
    if unknown:
        raise ValueError(f"networks: unknown {', '.join(unknown)}; PaySentry signs on {', '.join(NETWORKS)}")
    rpc_url = settings.get("rpc_url", "").strip()
    if rpc_url:
        try:
            origin_of(rpc_url)
        except ValueError as exc:
            raise ValueError(f"rpc_url: {exc}") from None
    return X402Settings(frozenset(normalized), frozenset(networks), rpc_url)


# ``authorizationState(address,bytes32)`` of EIP-3009: whether an authorization's nonce was used.
AUTHORIZATION_STATE = "0xe94a0102"


def authorization_state_call(asset: str, payer: str, nonce: str) -> bytes:
    """The JSON-RPC ``eth_call`` body asking the token whether ``payer``'s authorization ``nonce`` was used
    (a transfer made with it), at the latest block."""
    address = payer.lower().removeprefix("0x").rjust(64, "0")
    data = AUTHORIZATION_STATE + address + nonce.lower().removeprefix("0x").rjust(64, "0")
    params = [{"to": asset, "data": data}, "latest"]
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_call", "params": params}).encode()


def authorization_used(body: bytes) -> bool | None:
    """What an ``authorizationState`` answer says: True (used), False (not used) or None (no answer)."""
    try:
        result = json.loads(body).get("result")
    except (ValueError, AttributeError):
        return None
    if not isinstance(result, str) or not result.startswith("0x") or len(result) != 66:
        return None
    try:
        return int(result, 16) != 0
    except ValueError:
        return None


class X402Adapter:
    """The x402 provider. Its agents reach paid resources at ``/x402/<url-encoded URL>`` (see
    ``proxy.payments.x402``); provider-API calls (``classify``) are not part of it."""

    name = PROVIDER
    operations: Mapping[str, str] = {OPERATION: "/x402/https%3A%2F%2Fapi.example.com%2Freport"}
    settings: Mapping[str, Setting] = {
        "allowed_origins": Setting(
            "comma-separated origins agents may reach and pay (https://api.example.com,...)", required=True
        ),
        "networks": Setting(f"comma-separated CAIP-2 networks to sign on (default: {', '.join(NETWORKS)})"),
        "rpc_url": Setting(
            "a JSON-RPC endpoint of the chain, read (eth_call) to learn whether a signed authorization "
            "whose answer was lost was used; without it such a payment stays counted"
        ),
    }
    default_upstream = "x402:"
    idempotency_header = "Idempotency-Key"
    methods = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"})
    guarded_headers = PAYMENT_HEADERS
    account_header: str | None = None

    def __init__(self, config: X402Settings | None = None) -> None:
        self.config = config or X402Settings(frozenset(), frozenset(NETWORKS))

    def configured(self, settings: Mapping[str, str]) -> X402Adapter:
        from adapters.base import check_setting_names

        check_setting_names(self.name, self.settings, settings)
        return X402Adapter(parse_settings(settings))

    # -- the resource the agent asks for ----------------------------------------------------------------
    def target(self, url: str) -> str:
        """The URL to fetch, refused (403) unless its origin is one the owner allows."""
        try:
            origin = origin_of(url)
        except ValueError as exc:
            raise BadRequest(f"PaySentry x402: {exc}", param="url") from None
        if origin not in self.config.allowed_origins:
            raise Forbidden(
                f"PaySentry x402: {origin} is not an origin this connection's owner allows "
                "(ask the owner to add it to allowed_origins)",
                code="x402_origin_not_allowed",
            )
        return url

    # -- a 402 becomes a quote, a quote a payment ----------------------------------------------------------
    def quote(self, status: int, headers: Mapping[str, str], body: bytes) -> Quote:
        """The first payment requirement of a 402 PaySentry can sign for; BadRequest (code
        ``x402_unsupported``) saying why none is, naming the first requirement's problem."""
        from x402.http.utils import decode_payment_required_header
        from x402.schemas import PaymentRequired
        from x402.schemas.v1 import PaymentRequiredV1

        try:
            header = headers.get(PAYMENT_REQUIRED)
            if header:
                required: PaymentRequired | PaymentRequiredV1 = decode_payment_required_header(header)
            else:
                required = PaymentRequiredV1.model_validate(json.loads(body))
        except Exception as exc:  # pydantic, base64, JSON: the 402 is not one PaySentry can read
            raise _unsupported(
                f"the resource's 402 carries no readable payment requirements ({type(exc).__name__})"
            ) from None
        problems: list[str] = []
        for requirement in required.accepts:
            try:
                return self._quote(required.x402_version, requirement, getattr(required, "resource", None))
            except ValueError as exc:
                problems.append(str(exc))
        raise _unsupported("; ".join(problems) or "the 402 lists no payment requirements")

    def _quote(self, version: int, requirement: Any, resource: Any) -> Quote:
        scheme = str(requirement.scheme)
        if scheme != "exact":
            raise ValueError(f"scheme {scheme!r} is not supported (PaySentry signs 'exact' only)")
        extra = requirement.extra if isinstance(requirement.extra, dict) else {}
        if extra.get("assetTransferMethod", "eip3009") != "eip3009":
            raise ValueError(
                f"asset transfer method {extra.get('assetTransferMethod')!r} is not supported (eip3009 only)"
            )
        network = NETWORKS.get(str(requirement.network)) or _BY_V1_NAME.get(str(requirement.network))
        if network is None or network.id not in self.config.networks:
            raise ValueError(f"network {requirement.network!r} is not one this connection signs on")
        asset = network.asset(str(requirement.asset))
        if asset is None:
            raise ValueError(f"asset {requirement.asset!r} on {network.id} is not in PaySentry's registry")
        for key, pinned in (("name", asset.name), ("version", asset.version)):
            if key in extra and str(extra[key]) != pinned:
                raise ValueError(
                    f"the 402's signing domain {key} {extra[key]!r} differs from {asset.symbol}'s {pinned!r}"
                )
        text = str(requirement.get_amount())
        if not (text.isascii() and text.isdigit()) or len(text) > 19 or not 0 < int(text) <= MAX_AMOUNT:
            raise ValueError(f"amount {text[:40]!r} is not a positive integer of minor units")
        pay_to = str(requirement.pay_to)
        if not (pay_to.startswith("0x") and len(pay_to) == 42 and _is_hex(pay_to[2:])):
            raise ValueError(f"payTo {pay_to[:60]!r} is not an EVM address")
        timeout = int(requirement.max_timeout_seconds)
        return Quote(version, network, asset, int(text), pay_to, scheme, timeout, requirement, resource)

    def payment(self, quote: Quote, method: str, url: str) -> Payment:
        from eth_utils.address import to_checksum_address

        payee = to_checksum_address(quote.pay_to)
        description = getattr(quote.resource, "description", None) or getattr(
            quote.requirement, "description", ""
        )
        return Payment(
            provider=PROVIDER,
            operation=OPERATION,
            amount=quote.amount,
            currency=quote.asset.symbol,
            method=method,
            path=urlsplit(url).path or "/",
            destination=payee,
            description=str(description or ""),
            x402={
                "payee": payee,
                "asset": to_checksum_address(quote.asset.address),
                "network": quote.network.id,
                "scheme": quote.scheme,
                "resource": url,
                "origin": origin_of(url),
            },
        )

    # -- signing -------------------------------------------------------------------------------------------
    def sign(self, quote: Quote, private_key: str, now: float) -> Signed:
        """Sign the quote with the wallet key through the SDK's ``exact`` scheme. The domain (name,
        version, verifying contract, chain id) is the registry's; validity at most ``MAX_VALIDITY``."""
        from eth_account import Account
        from x402.http.utils import encode_payment_signature_header
        from x402.mechanisms.evm.exact.client import ExactEvmScheme
        from x402.mechanisms.evm.exact.v1.client import ExactEvmSchemeV1
        from x402.mechanisms.evm.signers import EthAccountSigner
        from x402.schemas import PaymentPayload
        from x402.schemas.v1 import PaymentPayloadV1

        signer = EthAccountSigner(Account.from_key(private_key))
        timeout = max(1, min(quote.max_timeout, MAX_VALIDITY))
        pinned = quote.requirement.model_copy(
            update={
                "asset": quote.asset.address,
                "max_timeout_seconds": timeout,
                "extra": {
                    **_extra(quote.requirement),
                    "name": quote.asset.name,
                    "version": quote.asset.version,
                },
            }
        )
        if quote.version == 2:
            pinned = pinned.model_copy(update={"network": quote.network.id})
            inner = ExactEvmScheme(signer).create_payment_payload(pinned)
            payload: PaymentPayload | PaymentPayloadV1 = PaymentPayload(
                x402_version=2, payload=inner, accepted=quote.requirement, resource=quote.resource
            )
            name = PAYMENT_SIGNATURE
        else:
            inner = ExactEvmSchemeV1(signer).create_payment_payload(pinned)
            payload = PaymentPayloadV1(
                x402_version=1, scheme=quote.scheme, network=quote.requirement.network, payload=inner
            )
            name = X_PAYMENT
        auth = inner["authorization"]
        if int(auth["validBefore"]) > now + timeout + 60:  # the SDK's clock and ours disagree: refuse
            raise ValueError("the signed validity is longer than PaySentry allows")
        return Signed(
            (name, encode_payment_signature_header(payload)),
            str(auth["from"]),
            str(auth["nonce"]),
            int(auth["validBefore"]),
            int(auth["validAfter"]),
        )

    # -- the answer after the signed header ----------------------------------------------------------------
    def settlement(self, quote: Quote, signed: Signed, status: int, headers: Mapping[str, str]) -> Settlement:
        """Committed only on a settlement response saying success with the payer, network and amount
        signed; refused (nothing moved) on a 402 without one (verification refused before settlement);
        anything else is unknown: the money may have moved."""
        from x402.http.utils import decode_payment_response_header

        header = headers.get(PAYMENT_RESPONSE) or headers.get(X_PAYMENT_RESPONSE)
        if not header:
            if status == 402:
                return Settlement(REFUSED, "the resource refused the payment before settling it (402)")
            return Settlement(UNKNOWN, f"the resource answered {status} without a settlement response")
        try:
            settled = decode_payment_response_header(header)
        except Exception as exc:
            return Settlement(UNKNOWN, f"the settlement response is unreadable ({type(exc).__name__})")
        transaction = str(settled.transaction or "") or None
        if not settled.success:
            reason = settled.error_reason or "unknown"
            return Settlement(UNKNOWN, f"the settlement did not succeed ({reason})", transaction)
        network_ok = settled.network in (quote.network.id, quote.network.v1_name)
        checks = {
            "payer": (settled.payer or "").lower() == signed.payer.lower(),
            "network": network_ok,
            "amount": settled.amount is not None and settled.amount == str(quote.amount),
        }
        wrong = [name for name, ok in checks.items() if not ok]
        if wrong:
            return Settlement(
                UNKNOWN,
                f"the settlement response's {', '.join(wrong)} differ from what was signed",
                transaction,
            )
        return Settlement(SETTLED, "settled", transaction)

    # -- the adapter port ----------------------------------------------------------------------------------
    def classify(self, method: str, path: str, content_type: str, body: bytes) -> Classified:
        raise BadRequest(
            "an x402 connection pays HTTP resources: call /x402/<url-encoded URL> on the sidecar",
            param="path",
        )

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
        error: dict[str, Any] = {"type": kind, "code": code, "message": message}
        if param:
            error["param"] = param
        if extra:
            error["paysentry"] = dict(extra)
        headers = {"Content-Type": "application/json", "PaySentry-Should-Retry": "true" if retry else "false"}
        return Reply(status, json.dumps({"error": error}).encode(), headers)

    def prepare(self, payment: Payment, body: bytes) -> bytes:
        return body

    def attribute(self, payment: Payment, body: bytes, authorization_id: str) -> bytes:
        return body

    def declined_in(self, body: bytes) -> str | None:
        return None

    def holds_in(self, operation: str, body: bytes) -> int | None:
        return None

    def undecided_in(self, body: bytes) -> bool:
        return False

    def cancelled_in(self, body: bytes) -> bool:
        return False

    def credential_headers(self, credentials: Mapping[str, str]) -> dict[str, str]:
        return {}  # the wallet key signs; it is never sent

    def provider_ref(self, body: bytes) -> str | None:
        return None

    def lookup_path(self, payment: Payment) -> str | None:
        return None

    def amount_of(self, payment: Payment, body: bytes) -> tuple[int, str] | None:
        return None

    def listings(self, since: float, until: float) -> Sequence[str]:
        return ()

    def page(self, target: str, body: bytes) -> ProviderPage:
        raise ValueError("x402 has no provider lists")

    def object_of(self, body: bytes) -> None:
        return None

    def part_of(self, body: bytes) -> None:
        return None

    def verify_webhook(
        self, headers: Mapping[str, str], body: bytes, secret: str, now: float, tolerance: float
    ) -> WebhookEvent:
        raise WebhookRejected("x402 connections take no webhooks")

    def webhook_ack(self, result: str, extra: Mapping[str, str]) -> Reply:
        return Reply(200, b"{}", {"Content-Type": "application/json"})

    def is_one_time_card(self, payment_summary: Mapping[str, Any]) -> bool:
        return False

    def card_cancel_should_retry(self, status: int) -> bool:
        return False


def _unsupported(why: str) -> BadRequest:
    return BadRequest(f"PaySentry x402 will not pay this resource: {why}", code="x402_unsupported")


def _extra(requirement: Any) -> dict[str, Any]:
    return dict(requirement.extra) if isinstance(requirement.extra, dict) else {}


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)
