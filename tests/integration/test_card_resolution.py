"""A card authorization whose answer was never recorded (the store failed as it settled, the deadline cut
the decision off, the sidecar died) keeps its spend until the provider says what it did: resolution reads
the authorization back and settles or releases from what it shows. On every store."""

from __future__ import annotations

import json
from typing import Any

import pytest
from multidict import CIMultiDict
from opentelemetry import trace

from adapters.stripe import StripeAdapter
from proxy.connections import Connection
from proxy.errors import StoreUnavailable
from proxy.metrics import Metrics
from proxy.model import Agent
from proxy.payments.calls import PaymentCall, provider_idempotency_key
from proxy.payments.cards import CardAuthorizer
from proxy.store import FAILED, FORWARDING, IN_DOUBT, SETTLED
from proxy.upstream import UpstreamReply, UpstreamRequest, provider_request
from tests.conftest import Backend
from tests.integration.test_money_property import NOW, make_service, seed
from tests.unit.test_realtime import request as authorization_request

ADAPTER = StripeAdapter()
APPROVED = {"approved": True, "status": "pending", "pending_request": None}
DECLINED = {"approved": False, "status": "closed", "pending_request": None}
WAITING = {"approved": False, "status": "pending", "pending_request": {"amount": 1200}}


class Provider:
    """Stripe as far as these calls go: it creates the card, and answers a read of the authorization
    with what it decided (its own fallback, or PaySentry's answer)."""

    def __init__(self, authorization: dict[str, Any]) -> None:
        self.authorization = authorization
        self.reads: list[str] = []

    async def __call__(self, request: UpstreamRequest) -> UpstreamReply:
        headers = CIMultiDict({"Content-Type": "application/json"})
        if request.method == "POST" and request.url.endswith("/v1/issuing/cards"):
            body = {"id": "ic_1", "object": "issuing.card", "status": "active"}
            return UpstreamReply(200, headers, json.dumps(body).encode())
        assert request.method == "GET" and request.url.endswith("/v1/issuing/authorizations/iauth_1")
        self.reads.append(request.url)
        body = {"id": "iauth_1", "object": "issuing.authorization", "amount": 1200, **self.authorization}
        return UpstreamReply(200, headers, json.dumps(body).encode())


@pytest.mark.parametrize(
    ("reads", "state", "spent"),
    [(DECLINED, FAILED, 0), (APPROVED, SETTLED, 1200), (WAITING, IN_DOUBT, 1200)],
    ids=["declined", "approved", "undecided"],
)
async def test_an_unrecorded_card_answer_is_resolved_from_the_provider(
    backend: Backend, reads: dict[str, Any], state: str, spent: int
) -> None:
    store = backend.store()
    await store.open(migrate=True)
    owner, agent = "own_c", Agent("agt_c", "own_c", "bot", "conn_c")
    connection = Connection("conn_c", owner, ADAPTER, "http://provider.test", {"secret_key": "sk"})
    await seed(store, owner, connection, [agent])
    provider, clock = Provider(reads), [NOW]
    service = make_service(store, provider, connection, clock)
    body = b"cardholder=ich_1&currency=usd&type=virtual&spending_controls[spending_limits][0][amount]=5000"
    classified = ADAPTER.classify("POST", "/v1/issuing/cards", "application/x-www-form-urlencoded", body)
    assert classified.payment is not None
    forward = provider_request(
        ADAPTER,
        connection.credentials,
        "POST",
        connection.upstream + "/v1/issuing/cards",
        {"Content-Type": "application/x-www-form-urlencoded"},
        body,
        provider_idempotency_key(agent.id, "card"),
    )
    card = PaymentCall(agent, connection, classified.payment, "card", "h", forward)
    assert (await service.authorize(card, trace.INVALID_SPAN)).status == 200

    settle = store.settle

    async def failing(*args: Any) -> None:  # the store goes away as the card authorization settles
        raise StoreUnavailable("the store is down")

    store.settle = failing  # type: ignore[method-assign]
    cards = CardAuthorizer(service, store, Metrics(otlp=False), trace.get_tracer("t"), 2.0, lambda: clock[0])
    answer = json.loads((await cards.authorize(connection, authorization_request())).body)
    assert answer["approved"] is False  # what could not be recorded is declined
    store.settle = settle  # type: ignore[method-assign]
    (auth,) = [
        a for a in await store.list_authorizations(owner, agent.id, 10) if a.idempotency_key == "iauth_1"
    ]
    assert auth.state == FORWARDING

    async def card_spend() -> int:
        rows = await store.spend_of(owner, agent.id)
        return sum(r["amount"] for r in rows if r["limit"] == "daily_budget") - 5000  # the card's own

    assert await card_spend() == 1200  # unknown: kept counted
    clock[0] += 100  # past the lease
    await service.resolve_unresolved()
    resolved = await store.get_authorization(owner, auth.id)
    assert resolved is not None and resolved.state == state and len(provider.reads) == 1
    assert await card_spend() == spent
    await store.close()
