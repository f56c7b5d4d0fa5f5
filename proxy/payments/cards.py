"""Real-time card authorizations: the provider asks, PaySentry decides within its deadline.

A card created through PaySentry (``issuing_card``) belongs to the agent that asked for it. When the card
is used, the provider sends an authorization request to the connection's webhook endpoint; it is decided
by the payment service like any payment of that agent (the merchant's name, category and country are
policy variables), its spend is reserved and committed in one step, and the provider gets approve or
decline. Holds cannot wait here, so a hold rule declines with its reason. Anything that goes wrong, or a
decision that does not finish within ``deadline``, declines: the provider's own fallback is never relied on.

What follows settles the spend through the ordinary event path: the authorization created but not
approved, or reversed, releases it; a capture confirms it (and cancels a one-time card).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from adapters.base import AuthorizationRequest, CardUse, Reply
from proxy.connections import Connection
from proxy.errors import PaySentryError, UpstreamUnavailable
from proxy.metrics import Metrics
from proxy.model import DENY, Agent
from proxy.payments.calls import PaymentCall
from proxy.payments.service import PaymentService
from proxy.secrets import sealed_context
from proxy.store import FORWARDING, SETTLED, Store
from proxy.upstream import provider_request

log = logging.getLogger("paysentry.cards")
RETRY = "cancel_failed"


class CardAuthorizer:
    def __init__(
        self,
        payments: PaymentService,
        store: Store,
        metrics: Metrics,
        tracer: trace.Tracer,
        deadline: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.payments, self.store, self.metrics, self.tracer = payments, store, metrics, tracer
        self.deadline, self.clock = deadline, clock

    async def authorize(self, connection: Connection, request: AuthorizationRequest) -> Reply:
        """Approve or decline; every answer names the rule, and every decision made is recorded."""
        with self.tracer.start_as_current_span("paysentry.card_authorization", kind=SpanKind.SERVER) as span:
            span.set_attribute("paysentry.provider_authorization", request.id)
            span.set_attribute("paysentry.amount", request.payment.amount)
            span.set_attribute("paysentry.currency", request.payment.currency)
            try:
                async with asyncio.timeout(self.deadline):
                    approved, meta = await self._decide(connection, request, span)
            except TimeoutError:
                approved, meta = False, {"paysentry_rule": "deadline"}
                log.error("card authorization not decided within %.1f s; declined", self.deadline)
            except PaySentryError as exc:  # the store or the policy is unavailable: decline
                approved, meta = False, {"paysentry_rule": exc.code}
                log.error("card authorization declined: %s", exc.message)
            except Exception:  # anything unforeseen declines too: never the provider's fallback
                approved, meta = False, {"paysentry_rule": "paysentry_internal_error"}
                log.exception("card authorization failed; declined")
            span.set_attribute("paysentry.decision", "allow" if approved else DENY)
            span.set_attribute("paysentry.rule", meta.get("paysentry_rule", ""))
            self.metrics.inc(
                "paysentry_card_authorizations_total",
                decision="approved" if approved else "declined",
                rule=meta.get("paysentry_rule", ""),
            )
            return request.answer(approved, meta)

    async def _decide(
        self, connection: Connection, request: AuthorizationRequest, span: trace.Span
    ) -> tuple[bool, dict[str, str]]:
        payment = request.payment
        card = await self.store.find_by_provider_ref(connection.owner_id, payment.refers_to)
        record = await self.store.get_agent(card.agent_id) if card is not None else None
        if card is None or record is None or record.connection_id != connection.id:
            await self.store.record_event(
                connection.owner_id,
                None,
                None,
                "card_authorization.declined",
                "provider",
                {
                    "authorization": request.id,
                    "card": payment.refers_to,
                    "reason": "card not issued by PaySentry",
                },
                self.clock(),
            )
            return False, {"paysentry_rule": "unknown_card"}
        if record.revoked_at is not None:
            return False, {"paysentry_rule": "agent_revoked"}
        agent = Agent(record.id, record.owner_id, record.name, record.connection_id, record.labels)
        digest = hashlib.sha256(f"{request.id}:{payment.amount}:{payment.currency}".encode()).hexdigest()
        # Should the answer go unrecorded (the store failing, the deadline, a crash), resolution reads the
        # authorization back from the provider: what it was told, approved or not, settles the spend.
        learn = provider_request(
            connection.adapter,
            connection.credentials,
            "GET",
            connection.upstream + payment.path,
            {},
            b"",
        )
        call = PaymentCall(agent, connection, payment, request.id, digest, learn=learn)
        decided = await self.payments.decide_and_record(call, span, holds=False)
        auth = decided.record
        if decided.replay:  # the provider asked again: the same answer
            return auth.state == SETTLED, _meta(auth.id, auth.rule)
        if auth.state != FORWARDING:
            return False, _meta(auth.id, auth.rule)
        answer = request.answer(True, _meta(auth.id, auth.rule))
        sealed = self.payments.sealer.seal(answer.body, sealed_context("response", auth.id))
        await self.store.settle(auth.id, request.id, answer.status, sealed, self.clock())
        return True, _meta(auth.id, auth.rule)

    async def card_used(self, connection: Connection, use: CardUse) -> str:
        """After a captured authorization: cancel the card when it was issued for one use. Returns what
        was done: ``cancelled``, ``kept`` (not a one-time card), ``cancel_refused`` (the provider refused
        the change: retrying will not help, recorded for the owner) or ``RETRY`` (the provider could not
        be reached or failed: the event should be delivered again)."""
        adapter = connection.adapter
        card = await self.store.find_by_provider_ref(connection.owner_id, use.card)
        if card is None or not adapter.is_one_time_card(card.payment):
            return "kept"
        request = provider_request(
            adapter,
            connection.credentials,
            use.method,
            connection.upstream + use.path,
            {"Content-Type": use.content_type},
            use.body,
        )
        try:
            status = (await self.payments.upstream.send(request)).status
        except UpstreamUnavailable:
            status = 0
        if adapter.card_cancel_should_retry(status):
            result = RETRY
        else:
            result = "cancelled" if 200 <= status < 300 else "cancel_refused"
        await self.store.record_event(
            connection.owner_id,
            card.agent_id,
            card.id,
            f"card.{result}",
            "paysentry",
            {"card": use.card, "provider_status": status},
            self.clock(),
        )
        return result


def _meta(authorization: str, rule: str) -> dict[str, str]:
    return {"paysentry_authorization": authorization, "paysentry_rule": rule}
