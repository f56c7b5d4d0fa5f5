"""The payment service: where a payment is decided. It knows no HTTP framework.

    AgentCall ──► authenticate (token cache, rate limit) ──► guards ──► adapter.classify
                    │ passthrough (moves no money) ──► Outcome(stream=...) relayed by the listener
                    │ payment ──► authorize(PaymentCall)
                    │               idempotency lookup ──► replay an earlier decision
                    │               └─► decide (pure core) ──► record + reserve (one transaction)
                    │                    deny ─► provider-shaped 402 naming the rule
                    │                    hold ─► provider-shaped 402 carrying the approval id (or wait)
                    │                    allow ─► upstream ─► 2xx: settle (commit) / else: fail (release)

Every refusal is the provider's own error shape with a "do not retry" flag; every decision is recorded
with its audit event before the agent hears of it. Any failure of the store or the policy fails closed.
Real-time card authorizations (``proxy.payments.cards``) and provider events (``proxy.payments.events``)
use the same lookup-decide-record step (``decide_and_record``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from contextvars import Token
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from multidict import CIMultiDict
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from adapters.base import PASSTHROUGH, Adapter
from proxy.auth import TokenAuthenticator
from proxy.connections import Connection, ConnectionCache
from proxy.decide import decide, spend_keys
from proxy.errors import (
    AuthenticationFailed,
    BadRequest,
    Forbidden,
    IdempotencyMismatch,
    ObjectBeingResolved,
    PaySentryError,
    RateLimited,
    RequestInFlight,
    StoreUnavailable,
    UpstreamUnavailable,
)
from proxy.holds import HoldCoordinator
from proxy.metrics import Metrics, Series
from proxy.model import DENY, HOLD, UNRECOGNIZED, Agent, Decision, Payment
from proxy.payments.calls import AgentCall, Outcome, PaymentCall, provider_idempotency_key
from proxy.payments.guards import bearer_token, check_call, idempotency_key
from proxy.payments.records import annotate, authorization_for, log_decision, pack_request, unpack_request
from proxy.policy.engine import Engine
from proxy.policy.reload import PolicyHolder
from proxy.ratelimit import Limiter
from proxy.redact import mask_cards
from proxy.secrets import Sealer, new_id, sealed_context
from proxy.store import (
    APPROVED,
    DENIED,
    EXPIRED,
    FAILED,
    FORWARDING,
    HELD,
    IN_DOUBT,
    REJECTED,
    SETTLED,
    UNRESOLVED_STATES,
    VOIDED,
    AgentRecord,
    AuthorizationRecord,
    DuplicateKey,
    Store,
    Unresolved,
)
from proxy.upstream import Upstream, UpstreamReply, provider_request

log = logging.getLogger("paysentry.payments")
W3C = TraceContextTextMapPropagator()
MAX_IDEMPOTENCY_KEY = 255
STAGES = ("authenticate", "lookup", "policy", "reserve", "upstream", "settle", "total")
RESOLVE_BATCH = 16  # unresolved calls one replica claims and re-sends at once
# A call is re-sent with its idempotency key only while the provider still holds the key (Stripe keeps keys
# at least 24 hours): later, a re-send could be taken for a new call. An older call stays in doubt, and
# reconciliation resolves it from the provider's records (its object carries the authorization's tag).
RESEND_WITHIN = 23 * 3600.0
TOO_OLD = (
    "too old to re-send safely (the provider keeps idempotency keys about a day): it stays counted and "
    "reconciliation resolves it from the provider's records"
)
NOT_THEIRS = "{ref} was not made by this agent; an agent acts only on its own objects"
IN_FLIGHT = "A request with this Idempotency-Key is being processed; retry shortly."
_KIND_OF: dict[type, str] = {
    BadRequest: "invalid_request",
    AuthenticationFailed: "authentication",
    RateLimited: "rate_limit",
    IdempotencyMismatch: "idempotency",
}


@dataclass(frozen=True, slots=True)
class Policies:
    """The policy set in force and the CEL engine that evaluates it."""

    holder: PolicyHolder
    engine: Engine


@dataclass(frozen=True, slots=True)
class Decided:
    """What ``decide_and_record`` found or made: an earlier record under the same key (``replay``), or the
    new one, with the decision that made it."""

    record: AuthorizationRecord
    replay: bool
    decision: Decision | None = None
    call: PaymentCall | None = None  # the call, its forwarded body attributed to the record


class PaymentService:
    def __init__(
        self,
        *,
        store: Store,
        policies: Policies,
        agents: TokenAuthenticator[AgentRecord],
        connections: ConnectionCache,
        upstream: Upstream,
        sealer: Sealer,
        holds: HoldCoordinator,
        limiter: Limiter,
        metrics: Metrics,
        tracer: trace.Tracer,
        default_adapter: Adapter,
        reservation_lease: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store, self.policies, self.agents, self.connections = store, policies, agents, connections
        self.upstream, self.sealer, self.holds, self.limiter = upstream, sealer, holds, limiter
        self.metrics, self.tracer, self.default_adapter = metrics, tracer, default_adapter
        self.lease, self.clock = reservation_lease, clock
        self._calls: set[asyncio.Task[Any]] = set()  # calls in flight, for a graceful shutdown
        self._durations = {
            stage: metrics.series("paysentry_stage_duration_seconds", stage=stage) for stage in STAGES
        }
        self._idle = asyncio.Event()
        self._idle.set()
        # Resolvers of providers whose unknown outcomes are not learned by re-sending the call (x402:
        # a signed header is never kept), by provider name.
        self.resolvers: dict[str, Callable[[Unresolved], Awaitable[str]]] = {}

    # -- the agent's entry ----------------------------------------------------------------------------------
    async def agent_call(self, call: AgentCall) -> Outcome:
        """One call of an agent: whatever happens, an Outcome in the provider's shape."""
        task = asyncio.current_task()
        assert task is not None
        self._calls.add(task)
        self._idle.clear()
        started = time.perf_counter()
        try:
            return await self._agent_call(call)
        finally:
            self._durations["total"].observe(time.perf_counter() - started)
            self._calls.discard(task)
            if not self._calls:
                self._idle.set()

    async def drain(self, grace: float) -> int:
        """Wait up to ``grace`` seconds for the calls in flight; cancel those still running. Returns how
        many were cut off."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace)
            return 0
        cut = list(self._calls)
        for task in cut:
            task.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), 5)
        return len(cut)

    async def _agent_call(self, call: AgentCall) -> Outcome:
        parent = W3C.extract(call.headers)  # continue the agent's trace (traceparent), nothing else
        with self.tracer.start_as_current_span("paysentry.call", parent, kind=SpanKind.SERVER) as span:
            span.set_attribute("http.request.method", call.method)
            span.set_attribute("url.path", mask_cards(call.path))
            adapter = self.default_adapter
            try:
                with self._stage("authenticate", span):
                    agent, connection = await self._authenticate(call, span)
                adapter = connection.adapter
                span.set_attribute("paysentry.provider", adapter.name)
                return await self._dispatch(call, agent, connection, span)
            except PaySentryError as exc:
                span.set_attribute("paysentry.error", exc.code)
                if isinstance(exc, StoreUnavailable):
                    self.metrics.inc("paysentry_store_errors_total", where="payment")
                if exc.status >= 500:
                    span.set_status(Status(StatusCode.ERROR, exc.code))
                return Outcome.of(
                    adapter.error(
                        exc.status,
                        _KIND_OF.get(type(exc), "api"),
                        exc.code,
                        exc.message,
                        exc.param,
                        retry=exc.status in (409, 429, 502, 503),
                    )
                )
            except Exception:  # anything unforeseen fails closed, in the provider's shape
                log.exception("unexpected error; the call is refused")
                span.set_status(Status(StatusCode.ERROR, "internal"))
                return Outcome.of(
                    adapter.error(
                        500,
                        "api",
                        "paysentry_internal_error",
                        "PaySentry failed to process this call; "
                        "nothing was forwarded unless the provider's answer says so.",
                        retry=False,
                    )
                )

    async def _authenticate(self, call: AgentCall, span: trace.Span) -> tuple[Agent, Connection]:
        record = await self.agents.authenticate(bearer_token(call.headers), call.remote)
        agent = Agent(record.id, record.owner_id, record.name, record.connection_id, record.labels)
        span.set_attribute("paysentry.agent", agent.name)
        span.set_attribute("paysentry.agent_id", agent.id)
        if not await self.limiter.allow(agent.id):
            raise RateLimited("Too many requests for this agent; slow down and retry.")
        return agent, await self.connections.get(agent.connection_id)

    async def _dispatch(
        self, call: AgentCall, agent: Agent, connection: Connection, span: trace.Span
    ) -> Outcome:
        adapter = connection.adapter
        check_call(call, connection)
        body = await call.read_body()
        classified = adapter.classify(call.method, call.path, call.content_type if body else "", body)
        url = connection.upstream + call.target
        key = idempotency_key(call.headers, adapter.idempotency_header, MAX_IDEMPOTENCY_KEY)
        moves_money = classified.kind != PASSTHROUGH or classified.acts_on or classified.voids
        if (
            moves_money and call.query
        ):  # a call on money is decided on its body; the provider may read the query too
            name = next(iter(call.query))
            raise BadRequest(
                f"PaySentry does not forward query parameters on calls that move money ({name!r}): "
                "send every parameter in the body, where it is decided",
                param=name,
            )
        if classified.kind == PASSTHROUGH and classified.voids is None:
            span.set_attribute("paysentry.decision", "passthrough")
            if (
                classified.acts_on is not None
                and (
                    await self._owned(agent, classified.acts_on, connection, _account(call.headers, adapter))
                )[0]
                is None
            ):
                # A call that moves money on an object (a MercadoPago capture) is counted with the object:
                # one PaySentry did not authorize for this agent would move money undecided.
                raise Forbidden(
                    f"PaySentry has no record of {classified.acts_on} authorized for this agent (made "
                    "elsewhere, or its outcome not known yet): it does not forward this call on it",
                    param="id",
                )
            request = provider_request(
                adapter,
                connection.credentials,
                call.method,
                url,
                call.headers,
                body,
                provider_idempotency_key(agent.id, key) if key else None,
            )
            unreachable = adapter.error(
                502, "api", UpstreamUnavailable.code, "the provider could not be reached", retry=True
            )
            return replace(Outcome.of(unreachable), stream=request)
        key = key or new_id("psidem")
        if classified.voids is not None:
            return await self._cancel(call, agent, connection, classified.voids, url, body, key)
        assert classified.payment is not None
        # The key is tied to everything that decides where the money goes: a retry naming another
        # connected account is another request (Stripe scopes its keys per account).
        account = ",".join(call.headers.getall(adapter.account_header, [])) if adapter.account_header else ""
        request_hash = hashlib.sha256(
            b"\0".join([call.method.encode(), call.target.encode(), body, account.encode()])
        ).hexdigest()
        # What is forwarded if allowed: where the provider can enforce the approval, the body says it.
        outgoing = adapter.prepare(classified.payment, body)
        forward = provider_request(
            adapter,
            connection.credentials,
            call.method,
            url,
            call.headers,
            outgoing,
            provider_idempotency_key(agent.id, key),
        )
        payment_call = PaymentCall(agent, connection, classified.payment, key, request_hash, forward)
        return await self.authorize(payment_call, span)

    async def _cancel(
        self,
        call: AgentCall,
        agent: Agent,
        connection: Connection,
        ref: str,
        url: str,
        body: bytes,
        key: str,
    ) -> Outcome:
        """Cancel an object: only its maker may (another agent's object is refused before anything is
        sent); once the provider's answer shows it cancelled, the spend it counted is released. The provider's answer goes
        back regardless; if the store fails, the spend stays counted (the provider's cancellation event
        releases it later)."""
        await self._owned(agent, ref, connection, _account(call.headers, connection.adapter))
        request = provider_request(
            connection.adapter,
            connection.credentials,
            call.method,
            url,
            call.headers,
            body,
            provider_idempotency_key(agent.id, key),
        )
        reply = await self.upstream.send(request)
        if 200 <= reply.status < 300 and connection.adapter.cancelled_in(reply.body):
            data = {"call": mask_cards(f"{call.method} {call.path}"), "agent": agent.id}
            try:
                await self.store.void(agent.owner_id, ref, "agent", data, self.clock())
            except StoreUnavailable as exc:
                log.error("cancelled at the provider, spend not yet released: %s", exc.message)
        return Outcome(reply.status, reply.body, reply.headers)

    async def _owned(
        self, agent: Agent, ref: str, connection: Connection, account: str = ""
    ) -> tuple[AuthorizationRecord | None, UpstreamReply | None]:
        """The record of the provider object ``ref`` as PaySentry knows it, refusing an object another agent
        of the owner made (agents never act on each other's objects). An object PaySentry has not seen
        made (made elsewhere, or by a call still in doubt) is read from the provider: the authorization
        its attribution tag names tells whose it is (read in the connected ``account`` the call names, where
        the object lives). Returns the record, and the read if one was made."""
        maker = await self.store.maker_of(agent.owner_id, ref)
        if maker is not None:
            if maker != agent.id:
                raise Forbidden(NOT_THEIRS.format(ref=ref), param="id")
            await self._nothing_pending(agent, ref)
            return await self.store.find_by_provider_ref(agent.owner_id, ref), None
        read = await self._read_object(connection, ref, account)
        if read is None or read.status == 404:
            return None, read  # made outside PaySentry
        whole = connection.adapter.part_of(read.body) if read.status == 200 else None
        if whole is not None and whole != ref:  # a charge an intent made: the intent's maker owns it
            record, _ = await self._owned(agent, whole, connection, account)
            return record, read
        found = connection.adapter.object_of(read.body) if read.status == 200 else None
        if found is None:  # a read that does not answer is not taken for "no tag": refused, to retry
            raise UpstreamUnavailable(
                f"PaySentry could not read {ref} from the provider ({read.status}) to check whose it is"
            )
        if found.authorization:
            tagged = await self.store.get_authorization(agent.owner_id, found.authorization)
            if tagged is None or tagged.agent_id != agent.id:  # another agent's, or another owner's
                raise Forbidden(NOT_THEIRS.format(ref=ref), param="id")
            if tagged.state in UNRESOLVED_STATES:
                # The call that made it still holds its spend, its outcome unknown. Counting this call in
                # full would count the object twice once that call settles; counting it as counted would
                # count nothing if that call were released. So it waits for the outcome, which the
                # resolution job learns from the provider (the object exists: that call will settle).
                raise ObjectBeingResolved(
                    f"{ref} was made by this agent's call {tagged.id}, whose outcome PaySentry is still "
                    "learning from the provider; retry shortly",
                    param="id",
                )
        # Made elsewhere, or by this agent's call that was refused or released: nothing of it is counted
        # any more, so a call on it counts in full.
        await self._nothing_pending(agent, ref)
        return None, read

    async def _nothing_pending(self, agent: Agent, ref: str) -> None:
        """Refuse, to retry, a call on an object another call on it has left unresolved (a confirm or an
        increment in doubt): what it counts depends on what that one did."""
        pending = await self.store.unresolved_on(agent.owner_id, ref)
        if pending is not None:
            raise ObjectBeingResolved(
                f"{ref} has a call ({pending.id}) whose outcome PaySentry is still learning from the "
                "provider; retry shortly",
                param="id",
            )

    async def _read_object(self, connection: Connection, ref: str, account: str = "") -> UpstreamReply | None:
        """The provider's object ``ref``, read with the owner's key (None: the adapter cannot read it), in
        the connected ``account`` when the call names one (already checked against the connection's)."""
        adapter = connection.adapter
        path = adapter.lookup_path(Payment(adapter.name, "", 0, "", "GET", "", refers_to=ref))
        if not path:
            return None
        incoming = {adapter.account_header: account} if account and adapter.account_header else {}
        request = provider_request(
            adapter, connection.credentials, "GET", connection.upstream + path, incoming, b""
        )
        return await self.upstream.send(request)

    # -- a payment ------------------------------------------------------------------------------------------
    async def authorize(self, call: PaymentCall, span: trace.Span) -> Outcome:
        """Decide, record and carry out one payment call; the Outcome is what the agent is told."""
        decided = await self.decide_and_record(call, span)
        call = decided.call or call
        auth = decided.record
        if decided.replay:
            return await self._replay(auth, call, span)
        if auth.state == FORWARDING:
            return await self._forward(auth, call, span)
        decision = decided.decision
        if auth.state == HELD and decision is not None and decision.approval is not None:
            return await self._held(auth, decision, call, span)
        return self._refusal(auth, call.connection.adapter)

    async def decide_and_record(self, call: PaymentCall, span: trace.Span, *, holds: bool = True) -> Decided:
        """The one step every way of deciding money goes through: look the key up (an earlier decision is
        replayed), decide with the policies, and record the decision with its reservation in one
        transaction. ``holds=False``: nothing can wait (a card authorization), a hold declines."""
        agent = call.agent
        policy_set = self.policies.holder.current
        now = datetime.fromtimestamp(self.clock(), UTC)
        keys = spend_keys(policy_set, agent, now) if policy_set.uses_spend else []
        with self._stage("lookup", span):
            existing, totals = await self.store.lookup(agent.id, call.idempotency_key, keys)
        if existing is not None and existing.request_hash != call.request_hash:
            raise IdempotencyMismatch(
                f"Keys for idempotent requests can only be used with the same parameters "
                f"they were first used with. Try using a key other than '{call.idempotency_key}' if you "
                "meant to execute a different request."
            )
        if existing is not None and not _retryable(existing):
            return Decided(existing, replay=True, call=self._attributed(call, existing.id))
        forwarded = call.forward.headers if call.forward is not None else {}
        payment = await self._resolve(
            call.payment, agent, call.connection, _account(forwarded, call.connection.adapter)
        )
        with self._stage("policy", span):
            decision = decide(policy_set, self.policies.engine, payment, agent, totals, now)
        if decision.outcome == HOLD and not holds:
            decision = replace(
                decision,
                outcome=DENY,
                charges=(),
                approval=None,
                hold_expires_in=None,
                message=f"a card authorization cannot wait for approval: {decision.message}",
            )
        annotate(span, payment, decision)
        auth_id = existing.id if existing else new_id("auth")
        call = self._attributed(call, auth_id)
        new = authorization_for(
            agent,
            payment,
            decision,
            call.idempotency_key,
            call.request_hash,
            self.clock(),
            self.lease,
            auth_id,
            self._sealed_request(call, auth_id) if decision.outcome != DENY else None,
        )
        new = replace(new, notify=tuple(self.holds.webhooks))  # a hold's notifications: in its transaction
        try:
            with self._stage("reserve", span):
                recorded = await self.store.record_decision(
                    new, self.clock(), existing.id if existing else None
                )
        except DuplicateKey:
            raise RequestInFlight(IN_FLIGHT) from None
        auth = recorded.record
        if recorded.exceeded is not None:
            span.set_attribute("paysentry.decision", DENY)
            span.set_attribute("paysentry.rule", auth.rule)
        log_decision(agent, auth)
        self.metrics.inc("paysentry_decisions_total", decision=auth.decision, rule=auth.rule)
        return Decided(auth, replay=False, decision=decision, call=call)

    async def _held(
        self, auth: AuthorizationRecord, decision: Decision, call: PaymentCall, span: trace.Span
    ) -> Outcome:
        """Announce the hold; when the rule allows waiting, keep the call open until the quorum decides."""
        assert decision.approval is not None and auth.approval_id is not None
        agent = call.agent
        span.set_attribute("paysentry.hold_id", auth.approval_id)
        expires_at = self.clock() + (decision.hold_expires_in or 0)
        self.holds.on_hold(auth, decision.approval, agent, expires_at)
        if decision.approval.wait <= 0:
            return self._refusal(auth, call.connection.adapter)
        with self.tracer.start_as_current_span("paysentry.wait_for_approval") as waiting:
            state = await self.holds.wait(agent.owner_id, auth.approval_id, decision.approval.wait)
            waiting.set_attribute("paysentry.approval_state", state)
        if state == "approved" and await self.store.start_forwarding(
            auth.id, self.clock() + self.lease, self.clock()
        ):
            return await self._forward(auth, call, span)
        latest = await self.store.get_authorization(agent.owner_id, auth.id) or auth
        if latest.state not in (HELD, REJECTED, EXPIRED):  # another call with this key took it forward
            raise RequestInFlight(IN_FLIGHT)
        return self._refusal(latest, call.connection.adapter)

    async def _resolve(
        self, payment: Payment, agent: Agent, connection: Connection, account: str = ""
    ) -> Payment:
        """Fill in the amount of a call on an earlier object (confirm, capture, refund without amount)."""
        if not payment.refers_to:
            return payment
        earlier, read = await self._owned(agent, payment.refers_to, connection, account)
        if payment.amount and payment.currency:
            return payment
        family = payment.operation.split(".")[0]
        if (
            earlier is not None
            and "." in payment.operation
            and earlier.operation != UNRECOGNIZED
            and earlier.operation.split(".")[0] != family
        ):  # a lifecycle call on a part (the charge of an intent): counted with its whole, so only a call
            # on the whole is decided against what it counted
            raise BadRequest(
                f"{payment.refers_to} is part of {earlier.provider_ref}, which PaySentry counts as a "
                f"{earlier.operation}: act on {earlier.provider_ref} instead",
                param="id",
            )
        if earlier is not None and family == earlier.operation.split(".")[0]:
            # A lifecycle call (confirm, capture) on an object counted when it was made: decided, and
            # counted only for what it adds.
            amount = payment.amount or earlier.amount
            made = earlier.payment  # decided as the object is: its payee, destination and customer too
            return replace(
                payment,
                amount=amount,
                currency=earlier.currency,
                counted=earlier.amount,
                destination=payment.destination or earlier.destination,
                payee=payment.payee or str(made.get("payee") or ""),
                payee_kind=payment.payee_kind or str(made.get("payee_kind") or ""),
                customer=payment.customer or str(made.get("customer") or ""),
            )
        reply = read or await self._read_object(connection, payment.refers_to, account)  # read once
        found = None
        if reply is not None and reply.status == 200:
            found = connection.adapter.amount_of(payment, reply.body)
        if found is None:
            raise BadRequest(
                f"PaySentry could not find the amount of {payment.refers_to!r} at the provider, so "
                "it cannot decide this call",
                param="amount",
            )
        return replace(payment, amount=found[0], currency=found[1])

    async def _replay(self, auth: AuthorizationRecord, call: PaymentCall, span: trace.Span) -> Outcome:
        span.set_attribute("paysentry.replay", True)
        span.set_attribute("paysentry.authorization", auth.id)
        now = self.clock()
        if auth.state == APPROVED:
            if not await self.store.start_forwarding(auth.id, now + self.lease, now):
                raise RequestInFlight(IN_FLIGHT)
            span.set_attribute("paysentry.decision", "allow")
            span.set_attribute("paysentry.hold_id", auth.approval_id or "")
            return await self._forward(auth, call, span)
        if auth.state in UNRESOLVED_STATES:  # its outcome is unknown: ask the provider, never decide anew
            if now - auth.created_at > RESEND_WITHIN and call.forward is not None:
                raise RequestInFlight(f"The outcome of this call is not known yet; it is {TOO_OLD}.")
            attempts = await self.store.claim(auth.id, now + self.lease, now)
            if attempts is None:
                raise RequestInFlight(IN_FLIGHT)
            return await self._forward(auth, call, span, resends=attempts)
        if (
            auth.state in (SETTLED, FAILED, VOIDED)
            and auth.response_status is not None
            and auth.response_body is not None
        ):
            payload = self.sealer.open(auth.response_body, sealed_context("response", auth.id))
            return Outcome(
                auth.response_status,
                payload,
                {
                    "Content-Type": "application/json",
                    "Idempotent-Replayed": "true",
                    "PaySentry-Authorization": auth.id,
                },
            )
        return self._refusal(auth, call.connection.adapter)

    async def _forward(
        self, auth: AuthorizationRecord, call: PaymentCall, span: trace.Span, resends: int = 0
    ) -> Outcome:
        """Send the call and record what the provider answered. When no answer tells what happened (a
        timeout, a lost connection, a 5xx, the call cut off), the spend stays reserved and the call is
        *in doubt* until the provider's answer is learned by re-sending it with the same key (a same-key
        retry of the agent, or the resolution job). Only a first send that never connected is released.
        ``resends``: how many times the call was sent before (the backoff of a re-send that learns nothing)."""
        adapter = call.connection.adapter
        assert call.forward is not None, "a call the provider asked for is not forwarded"
        try:
            with self._stage("upstream", span, SpanKind.CLIENT) as up:
                W3C.inject(call.forward.headers)  # the upstream stage's span is the provider's parent
                reply = await self.upstream.send(call.forward)
                up.set_attribute("http.response.status_code", reply.status)
        except UpstreamUnavailable as exc:
            if not resends and not exc.maybe_sent:
                await self.store.fail(auth.id, exc.message, None, None, self.clock())
                raise
            await self._in_doubt(auth.id, exc.message, resends)
            raise UpstreamUnavailable(
                f"{exc.message}; whether the payment was made is not known yet, so its spend stays counted "
                "until the provider says: retry with the same Idempotency-Key to learn the outcome"
            ) from exc
        except asyncio.CancelledError:  # shutdown grace ran out (or the client went away) mid-call
            reason = "the call was cut off before the provider answered (shutdown or disconnect)"
            await asyncio.shield(self._in_doubt(auth.id, reason, resends))
            raise
        with self._stage("settle", span):
            try:
                await self._conclude(auth, adapter, reply, resends)
            except StoreUnavailable as exc:  # the provider answered: the agent hears it all the same
                self.metrics.inc("paysentry_store_errors_total", where="settle")
                log.error(
                    "the provider answered %s but the store could not record it (%s); the authorization "
                    "stays reserved and is resolved from the provider",
                    reply.status,
                    exc.message,
                )
        span.set_attribute("paysentry.upstream_status", reply.status)
        headers = dict(reply.headers)
        headers["PaySentry-Authorization"] = auth.id
        return Outcome(reply.status, reply.body, headers)

    async def _conclude(
        self, auth: AuthorizationRecord, adapter: Adapter, reply: UpstreamReply, resends: int
    ) -> str:
        """Record what an answer of the provider says: settled (money moved), failed (it refused: the
        spend is released and the answer replayed) or in doubt (a 5xx or 409 tells nothing). ``resends``:
        how many times the call had been sent before this answer."""
        now = self.clock()
        # A re-sent call refused for being this request (the key rolled: 401, 403) says nothing of the
        # first send, which may have moved the money: still in doubt.
        if reply.status >= 500 or reply.status in (409, 429) or (resends and reply.status in (401, 403)):
            await self._in_doubt(auth.id, f"the provider answered {reply.status}", resends)
            return IN_DOUBT
        if 200 <= reply.status < 300 and adapter.undecided_in(reply.body):
            await self._in_doubt(auth.id, "the provider has not decided yet", resends)
            return IN_DOUBT
        sealed = self.sealer.seal(reply.body, sealed_context("response", auth.id))
        declined = adapter.declined_in(reply.body) if 200 <= reply.status < 300 else None
        if declined:  # the provider answered, but no money moved: release, and replay this answer
            await self.store.fail(auth.id, declined, reply.status, sealed, now)
            return FAILED
        if 200 <= reply.status < 300:
            holds = adapter.holds_in(auth.operation, reply.body)
            ref = adapter.provider_ref(reply.body)
            await self.store.settle(auth.id, ref, reply.status, sealed, now, holds)
            return SETTLED
        reason, made = f"the provider refused ({reply.status})", adapter.provider_ref(reply.body)
        await self.store.fail(auth.id, reason, reply.status, sealed, now, made)
        return FAILED

    async def _in_doubt(self, auth_id: str, reason: str, attempts: int) -> None:
        now = self.clock()
        await self.store.set_in_doubt(auth_id, reason, now + retry_delay(attempts), now)

    @staticmethod
    def _attributed(call: PaymentCall, auth_id: str) -> PaymentCall:
        """The call with its forwarded body tagged with the authorization (for calls that create an
        object), so the provider's records name it. The request hash stays the agent's body's."""
        if call.forward is None:
            return call
        body = call.connection.adapter.attribute(call.payment, call.forward.body, auth_id)
        return call if body is call.forward.body else replace(call, forward=replace(call.forward, body=body))

    def _sealed_request(self, call: PaymentCall, auth_id: str) -> bytes | None:
        """What resolution sends if the outcome is not recorded: the call itself, or what reads it."""
        request = call.forward or call.learn
        if request is None:
            return None
        target = request.url.removeprefix(call.connection.upstream)
        packed = pack_request(request.method, target, request.headers, request.body)
        return self.sealer.seal(packed, sealed_context("request", auth_id))

    # -- resolution: what the provider did with calls whose outcome is unknown ----------------------------
    async def resolve_unresolved(self, limit: int = RESOLVE_BATCH) -> dict[str, int]:
        """Claim up to ``limit`` unresolved calls due (in doubt, or forwarding past the lease of a sidecar
        that stopped) and re-send them at once, each with its idempotency key: the provider replays its
        answer (or, if it never received the call, makes it: its spend is still reserved). What the answer
        says is recorded; what stays unknown is tried again later with backoff, never released. Runs on
        every replica; each call is claimed by one. A batch is small and sent concurrently, so that every
        claimed call is re-sent well within its lease (one slow provider never holds the others)."""
        now = self.clock()
        claimed = await self.store.claim_unresolved(now + self.lease, now, limit)
        outcomes = await asyncio.gather(*(self._resolve_claimed(item) for item in claimed))
        results: dict[str, int] = {}
        for result in outcomes:
            results[result] = results.get(result, 0) + 1
            self.metrics.inc("paysentry_resolutions_total", result=result)
        return results

    async def _resolve_claimed(self, item: Unresolved) -> str:
        try:
            resolver = self.resolvers.get(item.record.provider)
            if resolver is not None:
                return await resolver(item)
            return await self._resolve_one(item.record, item.request, item.attempts)
        except PaySentryError as exc:  # the store, the connection gone, the agent revoked: try again later
            log.warning("could not resolve %s: %s", item.record.id, exc.message)
            with contextlib.suppress(PaySentryError):  # the store away: its lease lapses, claimed again
                await self._in_doubt(item.record.id, exc.message, item.attempts + 1)
            return IN_DOUBT

    async def _resolve_one(self, auth: AuthorizationRecord, sealed: bytes | None, attempts: int) -> str:
        record = await self.store.get_agent(auth.agent_id)
        if record is None or sealed is None:
            await self._in_doubt(auth.id, "nothing to re-send: the call was not kept", attempts + 1)
            return IN_DOUBT
        connection = await self.connections.get(record.connection_id)
        method, target, headers, body = unpack_request(
            self.sealer.open(sealed, sealed_context("request", auth.id))
        )
        if method != "GET" and self.clock() - auth.created_at > RESEND_WITHIN:
            await self._in_doubt(auth.id, TOO_OLD, attempts + 1)
            return IN_DOUBT
        request = provider_request(
            connection.adapter,
            connection.credentials,
            method,
            connection.upstream + target,
            CIMultiDict(headers),
            body,
            provider_idempotency_key(auth.agent_id, auth.idempotency_key),
        )
        try:
            reply = await self.upstream.send(request)
        except UpstreamUnavailable as exc:
            await self._in_doubt(auth.id, exc.message, attempts + 1)
            return IN_DOUBT
        return await self._conclude(auth, connection.adapter, reply, attempts + 1)

    def _refusal(self, auth: AuthorizationRecord, adapter: Adapter) -> Outcome:
        extra: dict[str, str | None] = {
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
            return Outcome.of(adapter.error(402, "policy", "approval_required", message, extra=extra))
        if auth.state == REJECTED:
            extra["approval_id"] = auth.approval_id
            message = (
                f"PaySentry: approval {auth.approval_id} for this payment was denied (rule '{auth.rule}')."
            )
            return Outcome.of(adapter.error(402, "policy", "approval_denied", message, extra=extra))
        if auth.state == EXPIRED:
            extra["approval_id"] = auth.approval_id
            message = (
                f"PaySentry: approval {auth.approval_id} for this payment expired before anyone approved it."
            )
            return Outcome.of(adapter.error(402, "policy", "approval_expired", message, extra=extra))
        assert auth.state == DENIED, auth.state
        where = f" of policy '{auth.policy}'" if auth.policy else ""
        message = f"PaySentry denied this payment by rule '{auth.rule}'{where}: {auth.message}"
        return Outcome.of(adapter.error(402, "policy", auth.rule, message, extra=extra))

    def _stage(self, name: str, call: trace.Span, kind: SpanKind = SpanKind.INTERNAL) -> Stage:
        return Stage(self.tracer, self._durations[name], name, call, kind)


class Stage:
    """One stage of a call: its span (current while it runs) and its duration, with no generator
    machinery on the hot path (a payment goes through six of these). When the call's own span is not
    recorded (nobody receives traces), neither is the stage's: the call's span stands in for it."""

    __slots__ = ("_tracer", "_series", "_name", "_call", "_kind", "_span", "_token", "_started")

    def __init__(
        self, tracer: trace.Tracer, series: Series, name: str, call: trace.Span, kind: SpanKind
    ) -> None:
        self._tracer, self._series, self._name, self._call, self._kind = tracer, series, name, call, kind
        self._token: Token[otel_context.Context] | None = None

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


def retry_delay(attempts: int) -> float:
    """Seconds before an unresolved call is re-sent again: 5 s, doubling, at most an hour."""
    return float(min(5 * 2**attempts, 3600))


def _retryable(auth: AuthorizationRecord) -> bool:
    """A call whose forwarding failed without an answer from the provider is decided again on retry."""
    return auth.state == FAILED and auth.response_status is None


def _account(headers: Mapping[str, str], adapter: Adapter) -> str:
    """The connected account a call names (``Stripe-Account``), "" for the platform's own."""
    return headers.get(adapter.account_header, "") if adapter.account_header else ""
