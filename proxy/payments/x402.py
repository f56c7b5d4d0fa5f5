"""Paying HTTP resources with x402 on an agent's behalf: the wallet key stays with PaySentry.

    agent ──► GET /x402/<url-encoded URL> (PaySentry token, no x402 library, no key)
      └─► origin allowed? ──► fetch it (agent's payment headers stripped) ──► not 402: the answer as is
            └─► 402 ──► quote (pinned to PaySentry's registry) ──► Payment (operation x402)
                  └─► decide_and_record (idempotency, policies, reservation, audit: as every payment)
                        deny / hold ─► PaySentry's own 402 naming the rule (the hold's approval id)
                        allow ─► sign (the SDK's exact EVM scheme) ─► record the nonce ─► retry with
                                 the payment header ─► settlement response ─► settle / release / in doubt

An outcome is committed only when the settlement response says success with the payer, network and
amount signed; released when the resource refused the payment before settling (a 402 without a
settlement response, or a connection never made); otherwise *in doubt*, its spend kept, until the
signed authorization's ``validBefore`` has passed: then nothing can use it any more, and the resolution job
asks the chain whether something did (EIP-3009 ``authorizationState`` through the connection's
``rpc_url``): used, it is settled; unused, released; without an answer it stays counted (``resolve``). A signed header is a bearer credential: it is sent once and
never stored, logged or re-sent; a same-key retry replays the recorded answer and never signs again.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from urllib.parse import unquote

from multidict import CIMultiDict
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from adapters.x402 import (
    PAYMENT_HEADERS,
    REFUSED,
    SETTLED,
    Quote,
    X402Adapter,
    authorization_state_call,
    authorization_used,
)
from proxy.connections import Connection
from proxy.errors import (
    BadRequest,
    Conflict,
    PaySentryError,
    RequestInFlight,
    StoreUnavailable,
    UpstreamUnavailable,
)
from proxy.model import Agent
from proxy.payments.calls import AgentCall, Outcome, PaymentCall
from proxy.payments.guards import idempotency_key
from proxy.payments.service import IN_FLIGHT, PaymentService
from proxy.secrets import new_id, sealed_context
from proxy.store import (
    APPROVED,
    FAILED,
    FORWARDING,
    HELD,
    IN_DOUBT,
    UNRESOLVED_STATES,
    VOIDED,
    AuthorizationRecord,
    DuplicateKey,
    Unresolved,
    X402Signature,
)
from proxy.store import (
    SETTLED as SETTLED_STATE,
)
from proxy.upstream import DROP_REQUEST, UpstreamReply, UpstreamRequest

log = logging.getLogger("paysentry.x402")
PREFIX = "/x402/"
GRACE = 3.0  # seconds past validBefore before the chain is asked whether it was used (clock skew)
CHAIN_RETRY = 300.0  # seconds before asking again when the chain could not tell
NOT_FORWARDED = DROP_REQUEST | PAYMENT_HEADERS | {"idempotency-key", "accept-encoding"}


class X402Payments:
    def __init__(self, payments: PaymentService, clock: Callable[[], float] = time.time) -> None:
        self.payments, self.clock = payments, clock
        self.store, self.upstream = payments.store, payments.upstream
        self.adapter = X402Adapter()  # the error shape before the agent's connection is known

    # -- the agent's entry ----------------------------------------------------------------------------------
    async def call(self, call: AgentCall) -> Outcome:
        tracer = self.payments.tracer
        with tracer.start_as_current_span("paysentry.x402", kind=SpanKind.SERVER) as span:
            span.set_attribute("http.request.method", call.method)
            try:
                return await self._call(call, span)
            except PaySentryError as exc:
                span.set_attribute("paysentry.error", exc.code)
                if exc.status >= 500:
                    span.set_status(Status(StatusCode.ERROR, exc.code))
                kind = "policy" if exc.code.startswith("x402_") else "invalid_request"
                retry = exc.status in (409, 429, 502, 503)
                return Outcome.of(
                    self.adapter.error(exc.status, kind, exc.code, exc.message, exc.param, retry=retry)
                )
            except Exception:  # anything unforeseen fails closed
                log.exception("unexpected error; the x402 call is refused")
                message = "PaySentry failed to process this call; nothing was paid unless its record says so."
                return Outcome.of(self.adapter.error(500, "api", "paysentry_internal_error", message))

    async def _call(self, call: AgentCall, span: trace.Span) -> Outcome:
        agent, connection = await self.payments._authenticate(call, span)
        adapter = connection.adapter
        if not isinstance(adapter, X402Adapter):
            raise BadRequest("this agent's connection is not an x402 connection", code="x402_not_configured")
        url = adapter.target(target_url(call.target))
        span.set_attribute("url.full", url.split("?", 1)[0])
        body = await call.read_body()
        headers = CIMultiDict((k, v) for k, v in call.headers.items() if k.lower() not in NOT_FORWARDED)
        first = await self.upstream.send(UpstreamRequest(call.method, url, headers.copy(), body))
        if first.status != 402:  # nothing to pay: the answer as is
            return _relayed(first, {})
        quote = adapter.quote(first.status, first.headers, first.body)
        payment = adapter.payment(quote, call.method, url)
        key = idempotency_key(call.headers, adapter.idempotency_header, 255) or new_id("psidem")
        digest = hashlib.sha256(b"\0".join([call.method.encode(), url.encode(), body])).hexdigest()
        paying = PaymentCall(agent, connection, payment, key, digest)
        decided = await self.payments.decide_and_record(paying, span)
        auth = decided.record
        request = UpstreamRequest(call.method, url, headers, body)
        if decided.replay:
            return await self._replay(auth, paying, quote, request)
        if auth.state == FORWARDING:
            return await self._pay(auth, agent, connection, quote, request)
        decision = decided.decision
        if auth.state == HELD and decision is not None and decision.approval is not None:
            expires_at = self.clock() + (decision.hold_expires_in or 0)
            self.payments.holds.on_hold(auth, decision.approval, agent, expires_at)
        return self.payments._refusal(auth, adapter)

    async def _replay(
        self, auth: AuthorizationRecord, call: PaymentCall, quote: Quote, request: UpstreamRequest
    ) -> Outcome:
        """The same key again: an approved hold is paid now (once); an unknown outcome is never paid
        again; an ended one replays its answer; a refusal is refused again."""
        now = self.clock()
        if auth.state == APPROVED:
            if (auth.amount, auth.currency, auth.destination) != (
                call.payment.amount,
                call.payment.currency,
                call.payment.destination,
            ):
                raise Conflict(
                    "the resource now asks for another payment than the one approved; "
                    "ask again with a new Idempotency-Key",
                    code="x402_requirements_changed",
                )
            if not await self.store.start_forwarding(auth.id, now + self.payments.lease, now):
                raise RequestInFlight(IN_FLIGHT)
            return await self._pay(auth, call.agent, call.connection, quote, request)
        if auth.state == IN_DOUBT:
            raise Conflict(
                "whether this payment settled is not known yet: its spend stays counted until the resource's "
                "settlement is learned or the authorization expires; it is never paid twice",
                code="x402_in_doubt",
            )
        if auth.state in UNRESOLVED_STATES:
            raise RequestInFlight(IN_FLIGHT)
        if auth.state in (SETTLED_STATE, FAILED, VOIDED) and auth.response_body is not None:
            packed = self.payments.sealer.open(auth.response_body, sealed_context("response", auth.id))
            reply = unpack_reply(packed)
            return _relayed(reply, {"Idempotent-Replayed": "true", "PaySentry-Authorization": auth.id})
        return self.payments._refusal(auth, call.connection.adapter)

    async def _pay(
        self,
        auth: AuthorizationRecord,
        agent: Agent,
        connection: Connection,
        quote: Quote,
        request: UpstreamRequest,
    ) -> Outcome:
        adapter = connection.adapter
        assert isinstance(adapter, X402Adapter)
        now = self.clock()
        try:
            signed = adapter.sign(quote, connection.credentials["secret_key"], now)
        except Exception as exc:  # a bad key, the SDK refusing: nothing was signed
            reason = f"the authorization could not be signed ({type(exc).__name__})"
            await self.store.fail(auth.id, reason, None, None, now)
            raise PaySentryError(
                f"PaySentry x402: {reason}; check the wallet key", code="x402_signing_failed"
            ) from None
        record = X402Signature(
            signed.nonce,
            auth.id,
            agent.owner_id,
            agent.id,
            quote.network.id,
            quote.asset.address,
            signed.payer,
            quote.pay_to,
            quote.amount,
            signed.valid_after,
            signed.valid_before,
            now,
        )
        try:
            await self.store.record_x402_signature(record)
        except (DuplicateKey, StoreUnavailable) as exc:  # not recorded: never sent
            reason = "nonce already used" if isinstance(exc, DuplicateKey) else "the store failed"
            await self.store.fail(
                auth.id, f"the signed authorization was not recorded ({reason})", None, None, now
            )
            raise StoreUnavailable(f"PaySentry could not record the signed authorization ({reason})") from exc
        headers = request.headers.copy()
        headers[signed.header[0]] = signed.header[1]
        try:
            reply = await self.upstream.send(
                UpstreamRequest(request.method, request.url, headers, request.body)
            )
        except UpstreamUnavailable as exc:
            if not exc.maybe_sent:  # never connected: the header went nowhere
                await self.store.fail(auth.id, exc.message, None, None, self.clock())
                raise
            await self._in_doubt(auth.id, exc.message, signed.valid_before)
            raise UpstreamUnavailable(
                f"{exc.message}; whether the payment settled is not known, so its spend stays counted until "
                f"the authorization expires ({_iso(signed.valid_before)})"
            ) from exc
        except asyncio.CancelledError:
            reason = "the call was cut off after the signed header was sent (shutdown or disconnect)"
            await asyncio.shield(self._in_doubt(auth.id, reason, signed.valid_before))
            raise
        settlement = adapter.settlement(quote, signed, reply.status, reply.headers)
        sealed = self.payments.sealer.seal(pack_reply(reply), sealed_context("response", auth.id))
        later = self.clock()
        try:
            if settlement.outcome == SETTLED:
                await self.store.settle(
                    auth.id, settlement.transaction or signed.nonce, reply.status, sealed, later
                )
            elif settlement.outcome == REFUSED:
                await self.store.fail(auth.id, settlement.reason, reply.status, sealed, later)
            else:
                await self._in_doubt(auth.id, settlement.reason, signed.valid_before)
        except StoreUnavailable as exc:  # the resource answered: the agent hears it; resolution follows
            log.error(
                "x402 answer %s not recorded (%s); resolved after validBefore", reply.status, exc.message
            )
        outcome = {SETTLED: "settled", REFUSED: "released"}.get(settlement.outcome, "in_doubt")
        return _relayed(reply, {"PaySentry-Authorization": auth.id, "PaySentry-X402-Outcome": outcome})

    async def _in_doubt(self, auth_id: str, reason: str, valid_before: int) -> None:
        await self.store.set_in_doubt(auth_id, reason, valid_before + GRACE, self.clock())

    # -- resolution -----------------------------------------------------------------------------------------
    async def resolve(self, item: Unresolved) -> str:
        """An x402 payment whose outcome is unknown, claimed by the resolution job. Nothing is re-sent (the
        signed header was never kept): nothing signed is released at once; a signed authorization stays
        in doubt until its ``validBefore`` (plus a grace) has passed, when it can no longer settle, and is
        then released."""
        auth, now = item.record, self.clock()
        signature = await self.store.x402_signature(auth.id)
        if signature is None:
            await self.store.fail(auth.id, "nothing was signed for this payment", None, None, now)
            return FAILED
        if now < signature.valid_before + GRACE:
            reason = "not settled as far as PaySentry knows; it may settle until its validBefore"
            await self.store.set_in_doubt(auth.id, reason, signature.valid_before + GRACE, now)
            return IN_DOUBT
        # Past validBefore nothing can use it any more; whether something did is on the chain.
        used = await self._used_on_chain(auth, signature)
        if used is None:
            reason = (
                "expired, and whether it was used is not known (no rpc_url, or the chain did not answer): "
                "it stays counted"
            )
            await self.store.set_in_doubt(auth.id, reason, now + CHAIN_RETRY, now)
            return IN_DOUBT
        if used:
            reason = f"its authorization (nonce {signature.nonce}) was used on chain: the payment was made"
            answer = self.adapter.error(
                502,
                "api",
                "x402_answer_lost",
                f"PaySentry x402: {reason} and counted, but the resource's answer was lost; "
                "request the resource again with a new Idempotency-Key (that pays again)",
            )
            reply = UpstreamReply(answer.status, CIMultiDict(answer.headers), answer.body)
            sealed = self.payments.sealer.seal(pack_reply(reply), sealed_context("response", auth.id))
            await self.store.settle(auth.id, signature.nonce, answer.status, sealed, now)
            return SETTLED_STATE
        reason = f"the signed authorization expired at {_iso(signature.valid_before)} unused on chain"
        refusal = self.adapter.error(402, "policy", "x402_expired_unsettled", f"PaySentry x402: {reason}")
        reply = UpstreamReply(refusal.status, CIMultiDict(refusal.headers), refusal.body)
        sealed = self.payments.sealer.seal(pack_reply(reply), sealed_context("response", auth.id))
        await self.store.fail(auth.id, reason, refusal.status, sealed, now)
        return FAILED

    async def _used_on_chain(self, auth: AuthorizationRecord, signature: X402Signature) -> bool | None:
        """Whether the token contract shows the authorization's nonce used (``authorizationState``), read
        through the connection's ``rpc_url``; None when there is none or it does not answer."""
        agent = await self.store.get_agent(auth.agent_id)
        if agent is None:
            return None
        adapter = (await self.payments.connections.get(agent.connection_id)).adapter
        rpc = adapter.config.rpc_url if isinstance(adapter, X402Adapter) else ""
        if not rpc:
            return None
        body = authorization_state_call(signature.asset, signature.payer, signature.nonce)
        request = UpstreamRequest("POST", rpc, CIMultiDict({"Content-Type": "application/json"}), body)
        try:
            reply = await self.upstream.send(request)
        except UpstreamUnavailable:
            return None
        return authorization_used(reply.body) if reply.status == 200 else None


def target_url(target: str) -> str:
    """The URL an agent asks for: ``/x402/`` followed by the URL, percent-encoded once (or as is)."""
    if not target.startswith(PREFIX):
        raise BadRequest("call /x402/<url-encoded URL>", param="url")
    url = unquote(target[len(PREFIX) :])
    if not url.startswith(("http://", "https://")) or any(c in url for c in "\r\n\0 "):
        raise BadRequest("PaySentry x402: give the resource's full http(s) URL after /x402/", param="url")
    return url


def pack_reply(reply: UpstreamReply) -> bytes:
    """The resource's answer as kept (sealed) for a same-key retry to replay."""
    headers = [[k, v] for k, v in reply.headers.items()]
    data = {"status": reply.status, "headers": headers, "body": base64.b64encode(reply.body).decode()}
    return json.dumps(data).encode()


def unpack_reply(packed: bytes) -> UpstreamReply:
    data = json.loads(packed)
    headers = CIMultiDict((str(k), str(v)) for k, v in data["headers"])
    return UpstreamReply(int(data["status"]), headers, base64.b64decode(data["body"]))


def _relayed(reply: UpstreamReply, extra: dict[str, str]) -> Outcome:
    headers = {k: v for k, v in reply.headers.items() if k.lower() != "content-encoding"}
    return Outcome(reply.status, reply.body, {**headers, **extra})


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")
