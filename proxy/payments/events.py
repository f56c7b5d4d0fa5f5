"""Provider events: what settles what PaySentry counted (an intent cancelled, a payout failed), and the
requests a provider makes for a decision in real time (card authorizations, ``proxy.payments.cards``).

An event is accepted only with a valid signature made with the connection's ``webhook_secret`` (kept
sealed with its other credentials) and a timestamp within the tolerance. Each event id is recorded once
per connection, in the same transaction as its effect, so a replayed or redelivered event changes nothing.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from adapters.base import Reply, WebhookEvent
from proxy.connections import Connection, ConnectionCache
from proxy.errors import AuthenticationFailed, NotFound, PaySentryError, UpstreamUnavailable
from proxy.metrics import Metrics
from proxy.payments.cards import RETRY, CardAuthorizer
from proxy.store import Store

if TYPE_CHECKING:
    from proxy.payments.reconcile import Reconciler

log = logging.getLogger("paysentry.webhooks")
WEBHOOKS = "paysentry_webhooks_total"
# What reconciling a notified object found, as a webhook result (its fixes keep their names:
# settled, released, counted, voided).
NOTIFIED = {
    "matched": "recorded",
    "amount_mismatch": "recorded",
    "untracked": "unmatched",
    "unknown_authorization": "unmatched",
    "not_forwarded": "unmatched",
}


class ProviderEvents:
    def __init__(
        self,
        store: Store,
        connections: ConnectionCache,
        cards: CardAuthorizer,
        metrics: Metrics,
        tolerance: float,
        clock: Callable[[], float] = time.time,
        *,
        reconciler: Reconciler | None = None,
    ) -> None:
        self.store, self.connections, self.cards, self.metrics = store, connections, cards, metrics
        self.tolerance, self.clock, self.reconciler = tolerance, clock, reconciler

    async def receive(self, connection_id: str, headers: Mapping[str, str], body: bytes) -> Reply:
        """One delivery: 2xx when handled (or already handled), 4xx when refused, 5xx when it could not
        be handled now (the provider redelivers)."""
        try:
            connection = await self._connection(connection_id)
            secret = connection.credentials.get("webhook_secret")
            if not secret:
                raise NotFound("this connection has no webhook_secret: add one to its credentials")
            event = connection.adapter.verify_webhook(headers, body, secret, self.clock(), self.tolerance)
            if event.request is not None:  # the provider waits for a decision
                self.metrics.inc(WEBHOOKS, result="authorization_request")
                return await self.cards.authorize(connection, event.request)
            if event.read is not None and self.reconciler is not None:
                return await self._read_and_apply(connection, event)
            card = None
            if event.used_card is not None:  # act first: the event is recorded once the card is handled
                if await self.store.webhook_seen(connection.id, event.id):
                    return self._answer(connection, event, "duplicate", None)
                card = await self.cards.card_used(connection, event.used_card)
                if card == RETRY:
                    raise UpstreamUnavailable(
                        "the provider did not cancel the one-time card; redeliver the event to retry"
                    )
            result = await self.store.apply_webhook(
                connection.owner_id,
                connection.id,
                event.id,
                event.type,
                event.provider_ref,
                event.outcome,
                self.clock(),
            )
        except PaySentryError as exc:  # 4xx: refused; 5xx: not handled now, the provider redelivers
            outcome = "rejected" if exc.status < 500 else "failed"
            self.metrics.inc(WEBHOOKS, result=outcome)
            log.warning(f"webhook {outcome}", extra={"fields": {"reason": exc.message}})
            return _json({"error": {"code": exc.code, "message": exc.message}}, exc.status)
        return self._answer(connection, event, result, card)

    async def _read_and_apply(self, connection: Connection, event: WebhookEvent) -> Reply:
        """A notification that names an object only (MercadoPago's): read the object and settle, release
        or count what PaySentry recorded for it from what it says, as reconciliation does (each change a
        conditional transition, so a redelivery racing this one changes nothing twice). Unreadable now:
        502, the provider redelivers."""
        assert self.reconciler is not None and event.read is not None
        if await self.store.webhook_seen(connection.id, event.id):
            return self._answer(connection, event, "duplicate", None)
        obj = connection.adapter.object_of(await self.reconciler.read(connection, event.read))
        result = "ignored"
        if obj is not None:
            applied = await self.reconciler.one_object(connection, obj, "provider")
            result = NOTIFIED.get(applied, applied)
        recorded = await self.store.apply_webhook(
            connection.owner_id, connection.id, event.id, event.type, event.provider_ref, None, self.clock()
        )
        return self._answer(connection, event, "duplicate" if recorded == "duplicate" else result, None)

    def _answer(self, connection: Connection, event: WebhookEvent, result: str, card: str | None) -> Reply:
        self.metrics.inc(WEBHOOKS, result=result)
        log.info(
            "webhook",
            extra={
                "fields": {"event": event.id, "type": event.type, "ref": event.provider_ref, "result": result}
            },
        )
        return connection.adapter.webhook_ack(result, {"card": card} if card is not None else {})

    async def _connection(self, connection_id: str) -> Connection:
        try:
            return await self.connections.get(connection_id)
        except AuthenticationFailed:  # missing or revoked; a store failure stays a 503 the provider retries
            raise NotFound("no such connection") from None


def _json(data: object, status: int) -> Reply:
    return Reply(status, json.dumps(data).encode(), {"Content-Type": "application/json"})
