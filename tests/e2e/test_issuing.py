"""Cards for agents (Stripe Issuing): a card is created with exactly the approved spending controls, its
authorizations are decided in real time by the same policies, and later events settle the spend."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Deployment, make_deployment
from tests.e2e.test_webhooks import deliver, events_of, signature

POLICY = """
    name: cards
    limits:
      - {name: card_budget, window: day, currency: usd, max_amount: 10000, operations: [issuing_card]}
      - {name: card_spend, window: day, currency: usd, max_amount: 6000, operations: [issuing_authorization]}
    rules:
      - name: no_gambling_cards
        effect: deny
        when: payment.operation == "issuing_card" && "betting_casino_gambling" in payment.categories
        message: no cards for gambling
      - name: no_gambling
        effect: deny
        when: payment.operation == "issuing_authorization" && merchant.category == "betting_casino_gambling"
        message: agents do not gamble
      - name: domestic_only
        effect: deny
        when: payment.operation == "issuing_authorization" && merchant.country != "US"
        message: cards are used with US merchants only
      - name: big_purchase
        effect: hold
        when: payment.operation == "issuing_authorization" && payment.amount > 4000
        message: purchases above $40 need a human
"""
SOFTWARE = {
    "name": "JetBrains",
    "category": "computer_software_stores",
    "category_code": "5734",
    "country": "US",
    "city": "Boston",
}


@pytest.fixture
def cards(tmp_path: Path) -> Iterator[Deployment]:
    dep = make_deployment(tmp_path, POLICY)
    dep.start()
    yield dep
    dep.stop()


def create_card(dep: Deployment, one_time: bool = True, **controls: Any) -> Any:
    import stripe

    client = stripe.StripeClient(
        dep.agent_token, base_addresses={"api": dep.agent_url}, max_network_retries=0
    )
    spending = {"spending_limits": [{"amount": 5000, "interval": "daily"}], **controls}
    return client.v1.issuing.cards.create(
        {
            "cardholder": "ich_agent",
            "currency": "usd",
            "type": "virtual",
            "spending_controls": spending,  # type: ignore[typeddict-item]
            "metadata": {"paysentry_one_time": "true" if one_time else "false"},
        }
    )


def stripe_event(kind: str, obj: dict[str, Any], event_id: str) -> bytes:
    return json.dumps(
        {
            "id": event_id,
            "object": "event",
            "type": kind,
            "api_version": "2025-10-29.clover",
            "data": {"object": obj},
        }
    ).encode()


def authorization(
    auth_id: str, card: str, amount: int, merchant: dict[str, str] | None = None
) -> dict[str, Any]:
    return {
        "id": auth_id,
        "object": "issuing.authorization",
        "amount": 0,
        "currency": "usd",
        "approved": False,
        "status": "pending",
        "pending_request": {"amount": amount, "currency": "usd", "is_amount_controllable": False},
        "merchant_data": merchant or SOFTWARE,
        "card": {"id": card, "object": "issuing.card", "cardholder": {"id": "ich_agent"}},
        "cardholder": "ich_agent",
    }


def ask(dep: Deployment, auth_id: str, card: str, amount: int, merchant: dict[str, str] | None = None) -> Any:
    """Stripe's authorization request; returns (status, answer, Stripe-Version header)."""
    body = stripe_event(
        "issuing_authorization.request", authorization(auth_id, card, amount, merchant), f"evt_{auth_id}"
    )
    request = urllib.request.Request(
        f"{dep.admin_url}/v1/webhooks/{dep.connection_id}",
        body,
        {"Content-Type": "application/json", "Stripe-Signature": signature(body)},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read()), resp.headers.get("Stripe-Version")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), None


def notify(dep: Deployment, kind: str, obj: dict[str, Any], event_id: str) -> Any:
    body = stripe_event(kind, obj, event_id)
    return deliver(dep, body, signature(body))


def mock_card(dep: Deployment, card_id: str) -> dict[str, Any]:
    return next(c for c in dep.mock("objects?object=issuing.card") if c["id"] == card_id)


@pytest.mark.e2e
def test_a_card_carries_exactly_the_approved_spending_controls(cards: Deployment) -> None:
    card = create_card(cards, allowed_categories=["computer_software_stores"])
    assert cards.spend("card_budget") == (5000, 1)
    controls = mock_card(cards, card.id)["spending_controls"]
    # The agent asked for $50 a day; the card may spend $50 in all, in the approved categories only.
    assert controls == {
        "spending_limits": [{"amount": "5000", "interval": "all_time"}],
        "allowed_categories": ["computer_software_stores"],
    }
    import stripe

    with pytest.raises(stripe.CardError) as refused:
        create_card(cards, allowed_categories=["betting_casino_gambling"])
    assert refused.value.code == "no_gambling_cards"
    assert cards.spend("card_budget") == (5000, 1)


@pytest.mark.e2e
def test_authorizations_are_decided_by_the_policies_and_recorded(cards: Deployment) -> None:
    card = create_card(cards).id
    status, answer, version = ask(cards, "iauth_ok", card, 2500)
    assert status == 200 and answer["approved"] is True and version == "2025-10-29.clover"
    assert answer["metadata"]["paysentry_rule"] == "default"
    assert cards.spend("card_spend") == (2500, 1)

    declined = {
        "no_gambling": ask(
            cards, "iauth_casino", card, 100, {**SOFTWARE, "category": "betting_casino_gambling"}
        ),
        "domestic_only": ask(cards, "iauth_abroad", card, 100, {**SOFTWARE, "country": "FR"}),
        "big_purchase": ask(cards, "iauth_big", card, 4500),  # a hold rule cannot wait: it declines
        "unknown_card": ask(cards, "iauth_stranger", "ic_not_ours", 100),
    }
    for rule, (status, answer, _) in declined.items():
        assert status == 200 and answer["approved"] is False and answer["metadata"]["paysentry_rule"] == rule
    assert cards.spend("card_spend") == (2500, 1)

    records = {  # by the provider's authorization id, which the path names
        a["payment"]["path"].rsplit("/", 1)[-1]: a
        for a in cards.owner_api("GET", "/v1/authorizations")[1]["data"]
        if a["operation"] == "issuing_authorization"
    }
    assert (
        records["iauth_ok"]["state"] == "settled"
        and records["iauth_ok"]["operation"] == "issuing_authorization"
    )
    assert set(records) == {"iauth_ok", "iauth_casino", "iauth_abroad", "iauth_big"}  # not the stranger's
    big = records["iauth_big"]
    assert big["decision"] == "deny" and "cannot wait for approval" in big["message"]
    assert big["payment"]["merchant"]["name"] == "JetBrains"
    assert any(e["type"] == "card_authorization.declined" for e in events_of(cards))

    # Stripe asking again about the same authorization gets the same answer, counted once.
    assert ask(cards, "iauth_ok", card, 2500)[1]["approved"] is True
    assert cards.spend("card_spend") == (2500, 1)
    # Over the day's card spend: declined by the limit.
    status, answer, _ = ask(cards, "iauth_more", card, 3900)
    assert answer["approved"] is False and answer["metadata"]["paysentry_rule"] == "card_spend"


@pytest.mark.e2e
def test_unsigned_or_stale_requests_are_refused(cards: Deployment) -> None:
    card = create_card(cards).id
    body = stripe_event("issuing_authorization.request", authorization("iauth_x", card, 100), "evt_x")
    assert deliver(cards, body, None)[0] == 400
    assert deliver(cards, body, signature(body, secret="whsec_guess"))[0] == 400
    import time

    assert deliver(cards, body, signature(body, at=time.time() - 301))[0] == 400
    assert cards.spend("card_spend") == (0, 0)
    assert not [
        a
        for a in cards.owner_api("GET", "/v1/authorizations")[1]["data"]
        if a["operation"] == "issuing_authorization"
    ]


@pytest.mark.e2e
def test_spend_stays_right_across_authorization_capture_and_reversal(cards: Deployment) -> None:
    card = create_card(cards).id
    assert ask(cards, "iauth_1", card, 2500)[1]["approved"] is True
    created = {**authorization("iauth_1", card, 2500), "approved": True, "amount": 2500}
    assert notify(cards, "issuing_authorization.created", created, "evt_c1")[1]["result"] == "recorded"
    assert cards.spend("card_spend") == (2500, 1)

    # Captured: the spend stays, and the one-time card is cancelled at the provider.
    capture = {
        "id": "ipi_1",
        "object": "issuing.transaction",
        "type": "capture",
        "amount": -2500,
        "authorization": "iauth_1",
        "card": card,
    }
    status, result = notify(cards, "issuing_transaction.created", capture, "evt_t1")
    assert status == 200 and result == {"received": True, "result": "recorded", "card": "cancelled"}
    assert cards.spend("card_spend") == (2500, 1)
    assert mock_card(cards, card)["status"] == "canceled"
    assert any(e["type"] == "card.cancelled" for e in events_of(cards))
    # The same capture event again changes nothing (and does not cancel twice).
    assert notify(cards, "issuing_transaction.created", capture, "evt_t1")[1]["result"] == "duplicate"

    # Approved by PaySentry, then declined by Stripe (its own controls): released.
    reusable = create_card(cards, one_time=False).id
    assert ask(cards, "iauth_2", reusable, 3000)[1]["approved"] is True
    assert cards.spend("card_spend") == (5500, 2)
    refused = {**authorization("iauth_2", reusable, 3000), "approved": False, "status": "closed"}
    assert notify(cards, "issuing_authorization.created", refused, "evt_c2")[1]["result"] == "voided"
    assert cards.spend("card_spend") == (2500, 1)

    # Approved, then reversed by the merchant: released.
    assert ask(cards, "iauth_3", reusable, 2000)[1]["approved"] is True
    assert cards.spend("card_spend") == (4500, 2)
    reversed_ = {**authorization("iauth_3", reusable, 2000), "approved": True, "status": "reversed"}
    assert notify(cards, "issuing_authorization.updated", reversed_, "evt_u3")[1]["result"] == "voided"
    assert cards.spend("card_spend") == (2500, 1)

    # A capture on a card kept for reuse leaves the card active.
    assert ask(cards, "iauth_4", reusable, 1000)[1]["approved"] is True
    capture = {**capture, "id": "ipi_4", "authorization": "iauth_4", "card": reusable}
    assert notify(cards, "issuing_transaction.created", capture, "evt_t4")[1]["card"] == "kept"
    assert mock_card(cards, reusable)["status"] == "active"
    assert cards.spend("card_spend") == (3500, 2)


@pytest.mark.e2e
def test_a_card_cancellation_the_provider_misses_is_retried_on_redelivery(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from tests.servers import free_port, wait_for_port

    port = free_port()

    def provider() -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "mock-provider", "--listen", f"127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
        )
        wait_for_port(port, "mock provider")
        return process

    mock = provider()
    dep = make_deployment(tmp_path, POLICY, upstream=f"http://127.0.0.1:{port}")
    dep.start()
    try:
        card = create_card(dep).id
        assert ask(dep, "iauth_1", card, 1000)[1]["approved"] is True
        mock.terminate()
        mock.wait(timeout=10)
        capture = {"id": "ipi_1", "type": "capture", "authorization": "iauth_1", "card": card}
        status, answer = notify(dep, "issuing_transaction.created", capture, "evt_t1")
        assert status == 502 and "redeliver" in answer["error"]["message"]  # not recorded: Stripe retries
        mock = provider()  # back, but it lost its cards: it refuses the change, retrying would not help
        status, answer = notify(dep, "issuing_transaction.created", capture, "evt_t1")
        assert (status, answer["result"], answer["card"]) == (200, "recorded", "cancel_refused")
        assert notify(dep, "issuing_transaction.created", capture, "evt_t1")[1]["result"] == "duplicate"
        cards_events = [e["type"] for e in events_of(dep) if e["type"].startswith("card.")]
        assert cards_events == ["card.cancel_failed", "card.cancel_refused"]  # each attempt audited
        assert dep.spend("card_spend") == (1000, 1)
    finally:
        dep.stop()
        mock.terminate()
        mock.wait(timeout=10)
