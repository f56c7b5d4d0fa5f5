"""One agent call through the sidecar: authenticate, classify, decide, reserve, forward, settle.

    agent ──► authenticate (token cache) ──► adapter.classify
                 │ passthrough (moves no money) ──► forward with the owner's key, stream back
                 │ payment ──► idempotency lookup ──► replay an earlier decision
                 │             └─► decide (pure core) ──► record + reserve (one transaction)
                 │                  deny ─► provider-shaped 402 naming the rule
                 │                  hold ─► provider-shaped 402 carrying the approval id
                 │                  allow ─► forward ─► 2xx: settle (commit) / else: fail (release)

Every refusal is the provider's own error shape with a "do not retry" flag; every decision is recorded
with its audit event before the agent hears of it. Any failure of the store or the policy fails closed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from adapters.base import PASSTHROUGH, Adapter, Reply
from proxy.auth import TokenAuthenticator
from proxy.connections import Connection, ConnectionCache
from proxy.decide import decide, spend_keys
from proxy.errors import (
    AuthenticationFailed,
    BadRequest,
    Forbidden,
    IdempotencyMismatch,
    MethodNotAllowed,
    PaySentryError,
    RateLimited,
    RequestInFlight,
    RequestTimeout,
    StoreUnavailable,
    UpstreamUnavailable,
)
from proxy.forwarder import Forwarder, UpstreamReply
from proxy.holds import HoldCoordinator
from proxy.metrics import Metrics, Series
from proxy.model import DENY, HOLD, Agent, Decision, Payment
from proxy.policy.engine import Engine
from proxy.policy.reload import PolicyHolder
from proxy.ratelimit import Limiter
from proxy.secrets import Sealer, new_id, sealed_context
from proxy.store import (
    APPROVED,
    DENIED,
    EXPIRED,
    FAILED,
    FORWARDING,
    HELD,
    REJECTED,
    SETTLED,
    AgentRecord,
    AuthorizationRecord,
    DuplicateKey,
    NewAuthorization,
    Store,
)

log = logging.getLogger("paysentry.decisions")
W3C = TraceContextTextMapPropagator()
MAX_IDEMPOTENCY_KEY = 255
STAGES = ("authenticate", "lookup", "policy", "reserve", "upstream", "settle", "total")
_KIND_OF: dict[type, str] = {
    BadRequest: "invalid_request",
    AuthenticationFailed: "authentication",
    RateLimited: "rate_limit",
    IdempotencyMismatch: "idempotency",
}


class Pipeline:
    def __init__(
        self,
        store: Store,
        engine: Engine,
        policies: PolicyHolder,
        agents: TokenAuthenticator[AgentRecord],
        connections: ConnectionCache,
        forwarder: Forwarder,
        sealer: Sealer,
        default_adapter: Adapter,
        tracer: trace.Tracer,
        reservation_lease: float,
        metrics: Metrics,
        holds: HoldCoordinator,
        limiter: Limiter,
        body_timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store, self.engine, self.policies = store, engine, policies
        self.agents, self.connections, self.forwarder = agents, connections, forwarder
        self.sealer, self.default_adapter, self.tracer = sealer, default_adapter, tracer
        self.lease, self.clock, self.metrics, self.holds = reservation_lease, clock, metrics, holds
        self.limiter, self.body_timeout = limiter, body_timeout
        self._calls: set[asyncio.Task[Any]] = set()  # calls in flight, for a graceful shutdown
        self._durations = {
            stage: metrics.series("paysentry_stage_duration_seconds", stage=stage) for stage in STAGES
        }
        self._idle = asyncio.Event()
        self._idle.set()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self._calls.add(task)
        self._idle.clear()
        started = time.perf_counter()
        try:
            return await self._handle(request)
        finally:
            self._durations["total"].observe(time.perf_counter() - started)
            self._calls.discard(task)
            if not self._calls:
                self._idle.set()

    def _stage(self, name: str, call: trace.Span, kind: SpanKind = SpanKind.INTERNAL) -> _Stage:
        """A child span of the call (when the call's span is recorded), and its time in the stage-duration
        histogram."""
        return _Stage(self.tracer, self._durations[name], name, call, kind)

    async def drain(self, grace: float) -> int:
        """Wait up to ``grace`` seconds for the calls in flight; cancel those still running (each releases
        its reservation). Returns how many were cut off."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace)
            return 0
        cut = list(self._calls)
        for task in cut:
            task.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), 5)
        return len(cut)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        parent = W3C.extract(request.headers)  # continue the agent's trace (traceparent), nothing else
        with self.tracer.start_as_current_span("paysentry.call", parent, kind=SpanKind.SERVER) as span:
            span.set_attribute("http.request.method", request.method)
            span.set_attribute("url.path", request.path)
            adapter = self.default_adapter
            try:
                with self._stage("authenticate", span):
                    record = await self.agents.authenticate(_token(request), request.remote)
                    agent = Agent(
                        record.id, record.owner_id, record.name, record.connection_id, record.labels
                    )
                    span.set_attribute("paysentry.agent", agent.name)
                    span.set_attribute("paysentry.agent_id", agent.id)
                    if not await self.limiter.allow(agent.id):
                        raise RateLimited("Too many requests for this agent; slow down and retry.")
                    connection = await self.connections.get(agent.connection_id)
                adapter = connection.adapter
                span.set_attribute("paysentry.provider", adapter.name)
                return await self._dispatch(request, agent, connection, span)
            except PaySentryError as exc:
                span.set_attribute("paysentry.error", exc.code)
                if isinstance(exc, StoreUnavailable):
                    self.metrics.inc("paysentry_store_errors_total", where="payment")
                if exc.status >= 500:
                    span.set_status(Status(StatusCode.ERROR, exc.code))
                return _reply(
                    adapter.error(
                        exc.status,
                        _KIND_OF.get(type(exc), "api"),
                        exc.code,
                        exc.message,
                        exc.param,
                        retry=exc.status in (409, 429, 502, 503),
                    )
                )
            except web.HTTPException as exc:  # aiohttp's own refusals: body too large, bad framing
                span.set_attribute("paysentry.error", exc.reason)
                return _reply(
                    adapter.error(
                        exc.status,
                        "invalid_request",
                        "request_refused",
                        f"PaySentry refused the request: {exc.reason}",
                    )
                )
            except Exception:  # anything unforeseen fails closed, in the provider's shape
                log.exception("unexpected error; the call is refused")
                span.set_status(Status(StatusCode.ERROR, "internal"))
                return _reply(
                    adapter.error(
                        500,
                        "api",
                        "paysentry_internal_error",
                        "PaySentry failed to process this call; "
                        "nothing was forwarded unless the provider's answer says so.",
                        retry=False,
                    )
                )

    async def _dispatch(
        self, request: web.Request, agent: Agent, connection: Connection, span: trace.Span
    ) -> web.StreamResponse:
        adapter = connection.adapter
        _check_request(request, connection)
        try:
            async with asyncio.timeout(self.body_timeout):
                body = await request.read()
        except TimeoutError:
            raise RequestTimeout(
                f"the request body did not arrive within {self.body_timeout:g} s; nothing was done"
            ) from None
        classified = adapter.classify(
            request.method, request.path, request.content_type if body else "", body
        )
        url = connection.upstream + request.rel_url.raw_path_qs
        if classified.kind == PASSTHROUGH:
            span.set_attribute("paysentry.decision", "passthrough")
            headers = self.forwarder.request_headers(
                request.headers, adapter.credential_headers(connection.credentials)
            )
            W3C.inject(headers)  # the provider sees this call's span as the parent
            if classified.voids is None:
                return await self.forwarder.stream(request, request.method, url, headers, body)
            reply = await self.forwarder.send(request.method, url, headers, body)
            if 200 <= reply.status < 300:
                await self._void(agent, classified.voids, request)
            return web.Response(status=reply.status, body=reply.body, headers=reply.headers)
        assert classified.payment is not None
        request_hash = hashlib.sha256(
            b"\0".join([request.method.encode(), request.rel_url.raw_path_qs.encode(), body])
        ).hexdigest()
        # What is forwarded if allowed: where the provider can enforce the approval, the body says it.
        outgoing = adapter.prepare(classified.payment, body)
        return await self._pay(
            request, agent, connection, classified.payment, outgoing, request_hash, url, span
        )

    async def _void(self, agent: Agent, ref: str, request: web.Request) -> None:
        """The provider cancelled ``ref`` at the agent's request: release what it counted. The provider's
        answer goes back regardless; if the store fails, the spend stays counted (the provider's
        cancellation webhook releases it later)."""
        data = {"call": f"{request.method} {request.path}", "agent": agent.id}
        try:
            await self.store.void(agent.owner_id, ref, "agent", data, self.clock())
        except StoreUnavailable as exc:
            log.error("cancelled at the provider, spend not yet released: %s", exc.message)

    # -- a payment call -------------------------------------------------------------------------------------
    async def _pay(
        self,
        request: web.Request,
        agent: Agent,
        connection: Connection,
        payment: Payment,
        body: bytes,
        request_hash: str,
        url: str,
        span: trace.Span,
    ) -> web.StreamResponse:
        adapter = connection.adapter
        key = request.headers.get(adapter.idempotency_header) or ""
        if len(key) > MAX_IDEMPOTENCY_KEY:
            raise BadRequest(f"{adapter.idempotency_header} is longer than {MAX_IDEMPOTENCY_KEY} characters")
        key = key or new_id("psidem")
        policy_set = self.policies.current
        now = datetime.fromtimestamp(self.clock(), UTC)
        keys = spend_keys(policy_set, agent, now) if policy_set.uses_spend else []
        with self._stage("lookup", span):
            existing, totals = await self.store.lookup(agent.id, key, keys)
        if existing is not None and existing.request_hash != request_hash:
            raise IdempotencyMismatch(
                f"Keys for idempotent requests can only be used with the same parameters "
                f"they were first used with. Try using a key other than '{key}' if you "
                "meant to execute a different request."
            )
        if existing is not None and not _retryable(existing):
            return await self._replay(existing, agent, connection, url, request, body, key, span)
        payment = await self._resolve(payment, agent, connection)
        with self._stage("policy", span):
            decision = decide(policy_set, self.engine, payment, agent, totals, now)
        _annotate(span, payment, decision)
        new = authorization_for(agent, payment, decision, key, request_hash, self.clock(), self.lease)
        try:
            with self._stage("reserve", span):
                recorded = await self.store.record_decision(
                    new, self.clock(), existing.id if existing else None
                )
        except DuplicateKey:
            raise RequestInFlight(
                "A request with this Idempotency-Key is being processed; retry shortly."
            ) from None
        auth = recorded.record
        if recorded.exceeded is not None:
            span.set_attribute("paysentry.decision", DENY)
            span.set_attribute("paysentry.rule", auth.rule)
        log_decision(agent, auth)
        self.metrics.inc("paysentry_decisions_total", decision=auth.decision, rule=auth.rule)
        if auth.state == FORWARDING:
            return await self._forward(auth, connection, request, url, body, key, span)
        if auth.state == HELD and decision.approval is not None:
            return await self._held(auth, decision, agent, connection, request, url, body, key, span)
        return self._refusal(auth, connection.adapter)

    async def _held(
        self,
        auth: AuthorizationRecord,
        decision: Decision,
        agent: Agent,
        connection: Connection,
        request: web.Request,
        url: str,
        body: bytes,
        key: str,
        span: trace.Span,
    ) -> web.StreamResponse:
        """Announce the hold; when the rule allows waiting, keep the call open until the quorum decides."""
        assert decision.approval is not None and auth.approval_id is not None
        span.set_attribute("paysentry.hold_id", auth.approval_id)
        expires_at = self.clock() + (decision.hold_expires_in or 0)
        self.holds.on_hold(auth, decision.approval, agent, expires_at)
        if decision.approval.wait <= 0:
            return self._refusal(auth, connection.adapter)
        with self.tracer.start_as_current_span("paysentry.wait_for_approval") as waiting:
            state = await self.holds.wait(agent.owner_id, auth.approval_id, decision.approval.wait)
            waiting.set_attribute("paysentry.approval_state", state)
        if state == "approved" and await self.store.start_forwarding(
            auth.id, self.clock() + self.lease, self.clock()
        ):
            return await self._forward(auth, connection, request, url, body, key, span)
        latest = await self.store.get_authorization(agent.owner_id, auth.id) or auth
        if latest.state not in (HELD, REJECTED, EXPIRED):  # another call with this key took it forward
            raise RequestInFlight("A request with this Idempotency-Key is being processed; retry shortly.")
        return self._refusal(latest, connection.adapter)

    async def _resolve(self, payment: Payment, agent: Agent, connection: Connection) -> Payment:
        """Fill in the amount of a call on an earlier object (confirm, capture, refund without amount)."""
        if not payment.refers_to or (payment.amount and payment.currency):
            return payment
        earlier = await self.store.find_by_provider_ref(agent.owner_id, payment.refers_to)
        if earlier is not None and payment.operation.startswith("payment_intent."):
            amount = payment.amount or earlier.amount
            return replace(payment, amount=amount, currency=earlier.currency, already_counted=True)
        path = connection.adapter.lookup_path(payment)
        found = None
        if path:
            headers = self.forwarder.request_headers(
                {}, connection.adapter.credential_headers(connection.credentials)
            )
            reply = await self.forwarder.send("GET", connection.upstream + path, headers, b"")
            found = connection.adapter.amount_of(payment, reply.body) if reply.status == 200 else None
        if found is None:
            raise BadRequest(
                f"PaySentry could not find the amount of {payment.refers_to!r} at the provider, so "
                "it cannot decide this call",
                param="amount",
            )
        return replace(payment, amount=found[0], currency=found[1])

    async def _replay(
        self,
        auth: AuthorizationRecord,
        agent: Agent,
        connection: Connection,
        url: str,
        request: web.Request,
        body: bytes,
        key: str,
        span: trace.Span,
    ) -> web.StreamResponse:
        span.set_attribute("paysentry.replay", True)
        span.set_attribute("paysentry.authorization", auth.id)
        if auth.state == APPROVED:
            if not await self.store.start_forwarding(auth.id, self.clock() + self.lease, self.clock()):
                raise RequestInFlight(
                    "A request with this Idempotency-Key is being processed; retry shortly."
                )
            span.set_attribute("paysentry.decision", "allow")
            span.set_attribute("paysentry.hold_id", auth.approval_id or "")
            return await self._forward(auth, connection, request, url, body, key, span)
        if auth.state == FORWARDING:
            raise RequestInFlight("A request with this Idempotency-Key is being processed; retry shortly.")
        if (
            auth.state in (SETTLED, FAILED)
            and auth.response_status is not None
            and auth.response_body is not None
        ):
            payload = self.sealer.open(auth.response_body, sealed_context("response", auth.id))
            return web.Response(
                status=auth.response_status,
                body=payload,
                headers={
                    "Content-Type": "application/json",
                    "Idempotent-Replayed": "true",
                    "PaySentry-Authorization": auth.id,
                },
            )
        return self._refusal(auth, connection.adapter)

    async def _forward(
        self,
        auth: AuthorizationRecord,
        connection: Connection,
        request: web.Request,
        url: str,
        body: bytes,
        key: str,
        span: trace.Span,
    ) -> web.StreamResponse:
        adapter = connection.adapter
        inject = {**adapter.credential_headers(connection.credentials), adapter.idempotency_header: key}
        headers = self.forwarder.request_headers(request.headers, inject)
        try:
            with self._stage("upstream", span, SpanKind.CLIENT) as up:
                W3C.inject(headers)
                reply = await self.forwarder.send(request.method, url, headers, body)
                up.set_attribute("http.response.status_code", reply.status)
        except UpstreamUnavailable as exc:
            await self.store.fail(auth.id, exc.message, None, None, self.clock())
            raise
        except asyncio.CancelledError:  # shutdown grace ran out (or the client went away) mid-call
            reason = "the call was cut off before the provider answered (shutdown or disconnect)"
            await asyncio.shield(self.store.fail(auth.id, reason, None, None, self.clock()))
            raise
        with self._stage("settle", span):
            await self._settle(auth, adapter, reply)
        span.set_attribute("paysentry.upstream_status", reply.status)
        out = web.Response(status=reply.status, body=reply.body, headers=reply.headers)
        out.headers["PaySentry-Authorization"] = auth.id
        return out

    async def _settle(self, auth: AuthorizationRecord, adapter: Adapter, reply: UpstreamReply) -> None:
        sealed = self.sealer.seal(reply.body, sealed_context("response", auth.id))
        declined = adapter.declined_in(reply.body) if 200 <= reply.status < 300 else None
        if declined:  # the provider answered, but no money moved: release, and replay this answer
            await self.store.fail(auth.id, declined, reply.status, sealed, self.clock())
        elif 200 <= reply.status < 300:
            await self.store.settle(
                auth.id, adapter.provider_ref(reply.body), reply.status, sealed, self.clock()
            )
        elif reply.status >= 500 or reply.status == 409:
            # The provider did not finish: nothing is replayed, the agent may retry with the same key.
            await self.store.fail(auth.id, f"the provider answered {reply.status}", None, None, self.clock())
        else:
            await self.store.fail(
                auth.id, f"the provider refused ({reply.status})", reply.status, sealed, self.clock()
            )

    def _refusal(self, auth: AuthorizationRecord, adapter: Adapter) -> web.Response:
        extra = {
            "decision": auth.decision,
            "rule": auth.rule,
            "policy": auth.policy,
            "authorization": auth.id,
            "revision": auth.revision,
        }
        if auth.state == HELD:
            extra["approval_id"] = auth.approval_id
            message = (
                f"PaySentry is holding this payment for approval {auth.approval_id} (rule '{auth.rule}': "
                f"{auth.message}). Once it is approved, retry with the same Idempotency-Key."
            )
            return _reply(adapter.error(402, "policy", "approval_required", message, extra=extra))
        if auth.state == REJECTED:
            extra["approval_id"] = auth.approval_id
            message = (
                f"PaySentry: approval {auth.approval_id} for this payment was denied (rule '{auth.rule}')."
            )
            return _reply(adapter.error(402, "policy", "approval_denied", message, extra=extra))
        if auth.state == EXPIRED:
            extra["approval_id"] = auth.approval_id
            message = (
                f"PaySentry: approval {auth.approval_id} for this payment expired before anyone approved it."
            )
            return _reply(adapter.error(402, "policy", "approval_expired", message, extra=extra))
        assert auth.state == DENIED, auth.state
        where = f" of policy '{auth.policy}'" if auth.policy else ""
        message = f"PaySentry denied this payment by rule '{auth.rule}'{where}: {auth.message}"
        return _reply(adapter.error(402, "policy", auth.rule, message, extra=extra))


class _Stage:
    """One stage of a call: its span (current while it runs) and its duration, with no generator
    machinery on the hot path (a payment goes through six of these). When the call's own span is not
    recorded (nobody receives traces), neither is the stage's: the call's span stands in for it."""

    __slots__ = ("_tracer", "_series", "_name", "_call", "_kind", "_span", "_token", "_started")

    def __init__(
        self, tracer: trace.Tracer, series: Series, name: str, call: trace.Span, kind: SpanKind
    ) -> None:
        self._tracer, self._series, self._name, self._call, self._kind = tracer, series, name, call, kind
        self._token: object = None

    def __enter__(self) -> trace.Span:
        if self._call.is_recording():
            self._span = self._tracer.start_span(f"paysentry.{self._name}", kind=self._kind)
            self._token = otel_context.attach(trace.set_span_in_context(self._span))
        else:
            self._span = self._call
        self._started = time.perf_counter()
        return self._span

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        self._series.observe(time.perf_counter() - self._started)
        if self._token is None:
            return
        otel_context.detach(self._token)
        if exc is not None:
            self._span.record_exception(exc)
            self._span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        self._span.end()


def _retryable(auth: AuthorizationRecord) -> bool:
    """A call whose forwarding failed without an answer from the provider is decided again on retry."""
    return auth.state == FAILED and auth.response_status is None


def _check_request(request: web.Request, connection: Connection) -> None:
    """Refuse what could steer the call elsewhere or onto someone else's money."""
    adapter = connection.adapter
    if request.method not in adapter.methods:
        raise MethodNotAllowed(f"PaySentry does not forward {request.method} requests to {adapter.name}")
    if not request.raw_path.startswith("/"):  # the request target as sent: absolute-form or authority-form
        raise BadRequest("PaySentry is not a forward proxy: send the path only (origin-form), not a full URL")
    guarded = [h for h in request.headers if h.lower() in adapter.guarded_headers]
    if guarded:
        raise BadRequest(
            f"PaySentry does not forward the {guarded[0]} header: it would change whose money moves",
            param=guarded[0],
        )
    if adapter.account_header:
        accounts = request.headers.getall(adapter.account_header, [])
        if len(accounts) > 1 or (accounts and accounts[0] not in connection.allowed_accounts):
            raise Forbidden(
                f"{adapter.account_header} names an account this agent's owner has not allowed",
                param=adapter.account_header,
            )
    raw = request.rel_url.raw_path
    lowered = raw.lower()
    if "%2f" in lowered or "%5c" in lowered or "%2e" in lowered or "/../" in raw + "/" or "//" in raw:
        raise BadRequest("the request path contains an encoded or relative segment")


def _token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip() or None
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value).decode().split(":", 1)[0] or None
        except (binascii.Error, UnicodeDecodeError):
            return None
    return None


def authorization_for(
    agent: Agent,
    payment: Payment,
    decision: Decision,
    key: str,
    request_hash: str,
    now: float,
    lease: float,
) -> NewAuthorization:
    """The record of one decision, as the store reserves and keeps it."""
    hold = decision.outcome == HOLD
    return NewAuthorization(
        id=new_id("auth"),
        owner_id=agent.owner_id,
        agent_id=agent.id,
        idempotency_key=key,
        request_hash=request_hash,
        provider=payment.provider,
        operation=payment.operation,
        amount=payment.amount,
        currency=payment.currency,
        destination=payment.destination,
        payment=_payment_summary(payment),
        decision=decision.outcome,
        rule=decision.rule,
        policy=decision.policy,
        message=decision.message,
        revision=decision.revision,
        charges=decision.charges,
        approval_id=new_id("apr") if hold else None,
        hold_expires_at=now + (decision.hold_expires_in or 0) if hold else None,
        lease_expires_at=now + lease,
        approval=decision.approval,
        shadow=[
            {"policy": h.policy, "rule": h.rule, "effect": h.effect, "message": h.message}
            for h in decision.shadow
        ],
    )


def _payment_summary(payment: Payment) -> dict[str, Any]:
    """What the audit record keeps of a payment: the normalized fields, never the raw parameters."""
    return {
        "provider": payment.provider,
        "operation": payment.operation,
        "amount": payment.amount,
        "currency": payment.currency,
        "destination": payment.destination,
        "customer": payment.customer,
        "description": payment.description,
        "metadata": dict(payment.metadata),
        "method": payment.method,
        "path": payment.path,
        "refers_to": payment.refers_to,
        "categories": list(payment.categories),
        "merchant": dict(payment.merchant),
    }


def _annotate(span: trace.Span, payment: Payment, decision: Decision) -> None:
    span.set_attribute("paysentry.operation", payment.operation)
    span.set_attribute("paysentry.amount", payment.amount)
    span.set_attribute("paysentry.currency", payment.currency)
    span.set_attribute("paysentry.decision", decision.outcome)
    span.set_attribute("paysentry.rule", decision.rule)
    span.set_attribute("paysentry.policy_revision", decision.revision)
    if decision.shadow:
        span.set_attribute("paysentry.shadow", [f"{h.policy}.{h.rule}:{h.effect}" for h in decision.shadow])


def log_decision(agent: Agent, auth: AuthorizationRecord) -> None:
    if not log.isEnabledFor(logging.INFO):  # the audit log keeps every decision; this line is optional
        return
    context = trace.get_current_span().get_span_context()
    log.info(
        "decision",
        extra={
            "fields": {
                "trace_id": f"{context.trace_id:032x}",
                "authorization": auth.id,
                "agent": agent.name,
                "agent_id": agent.id,
                "operation": auth.operation,
                "amount": auth.amount,
                "currency": auth.currency,
                "decision": auth.decision,
                "rule": auth.rule,
                "policy": auth.policy,
                "revision": auth.revision,
                "state": auth.state,
                "approval_id": auth.approval_id,
            }
        },
    )


def _reply(error: Reply) -> web.Response:
    return web.Response(status=error.status, body=error.body, headers=dict(error.headers))


__all__ = ["Pipeline", "StoreUnavailable", "authorization_for", "log_decision"]
