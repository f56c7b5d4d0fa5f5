"""An agent trying to move money PaySentry does not count, through the real `paysentry` process, the
official Stripe SDK and the built-in mock provider (which behaves like Stripe on these edges: a declined
create leaves its intent, replays are per key). Each test is one bypass that used to work."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import stripe

from tests.e2e.conftest import Deployment, make_deployment, wait_until
from tests.e2e.test_adversarial import request

pytestmark = pytest.mark.e2e
DECLINED, GOOD = "pm_card_chargeDeclined", "pm_card_visa"


@pytest.fixture
def dep(tmp_path: Path) -> Iterator[Deployment]:
    deployment = make_deployment(tmp_path)
    deployment.start()
    yield deployment
    deployment.stop()


def client(dep: Deployment, token: str) -> Any:
    return stripe.StripeClient(token, base_addresses={"api": dep.agent_url}, max_network_retries=0)


def moved(dep: Deployment) -> int:
    """What the provider moved: the intents it holds as succeeded."""
    return sum(o["amount"] for o in dep.mock("objects") if o.get("status") == "succeeded")


def test_a_declined_create_does_not_make_the_later_confirm_free(dep: Deployment) -> None:
    sdk = client(dep, dep.agent_token)
    for round in range(4):  # the daily budget is $100: four rounds of $49.99 would be $199.96
        with pytest.raises(stripe.CardError) as declined:
            sdk.v1.payment_intents.create(
                params={"amount": 4999, "currency": "usd", "confirm": True, "payment_method": DECLINED}
            )
        error = declined.value.json_body["error"]
        if round >= 2:  # the budget is spent: PaySentry refuses before the provider sees anything
            assert error["code"] == "daily_budget"
            continue
        assert error["code"] == "card_declined"  # the provider's decline; the intent exists
        sdk.v1.payment_intents.confirm(error["payment_intent"]["id"], params={"payment_method": GOOD})
    assert moved(dep) == 9998 and dep.spend() == (9998, 2)  # counted, and the budget held


def test_agents_never_share_a_provider_key_or_objects(dep: Deployment) -> None:
    other = json.loads(dep.cli("agent", "create", "bot2").stdout)["token"]
    mine = client(dep, dep.agent_token).v1.payment_intents.create(
        params={"amount": 1000, "currency": "usd"}, options={"idempotency_key": "shared"}
    )
    theirs = client(dep, other).v1.payment_intents.create(
        params={"amount": 1000, "currency": "usd"}, options={"idempotency_key": "shared"}
    )
    assert theirs.id != mine.id and theirs.client_secret != mine.client_secret  # not my stored answer
    with pytest.raises(stripe.PermissionError):  # my intent is not theirs to confirm or cancel
        client(dep, other).v1.payment_intents.confirm(mine.id, params={"payment_method": GOOD})
    with pytest.raises(stripe.PermissionError):
        client(dep, other).v1.payment_intents.cancel(mine.id)
    assert dep.spend() == (1000, 1)  # my reservation was not released by their cancel


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        ("/v1/payouts?method=instant", {}),
        ("/v1/payment_intents?transfer_data[destination]=acct_x", {}),
        ("/v1/payment_intents", {"Stripe_Account": "acct_x"}),
    ],
)
def test_what_could_steer_money_outside_the_body_is_refused(
    dep: Deployment, target: str, headers: dict[str, str]
) -> None:
    body = b"amount=1000&currency=usd"
    headers = {"Content-Type": "application/x-www-form-urlencoded", **headers}
    status, answer = request(dep, "POST", target, headers, body)
    assert status == 400 and json.loads(answer)["error"]["param"]
    assert dep.mock_payments() == [] and dep.spend() == (0, 0)


def test_a_refund_is_bounded_by_what_was_captured(dep: Deployment) -> None:
    sdk = client(dep, dep.agent_token)
    intent = sdk.v1.payment_intents.create(params={"amount": 2000, "currency": "usd", "confirm": True})
    with pytest.raises(stripe.InvalidRequestError) as above:
        sdk.v1.refunds.create(params={"payment_intent": intent.id, "amount": 2500})
    assert above.value.param == "amount"
    sdk.v1.refunds.create(params={"payment_intent": intent.id})  # the rest: 2000
    with pytest.raises(stripe.InvalidRequestError):  # nothing left: no negative refund reserved
        sdk.v1.refunds.create(params={"payment_intent": intent.id})


def test_a_partial_capture_gives_the_rest_back_and_a_captured_intent_releases_nothing(
    dep: Deployment,
) -> None:
    sdk = client(dep, dep.agent_token)
    intent = sdk.v1.payment_intents.create(
        params={
            "amount": 4000,
            "currency": "usd",
            "capture_method": "manual",
            "confirm": True,
            "payment_method": GOOD,
        }
    )
    assert intent.status == "requires_capture" and dep.spend() == (4000, 1)
    captured = sdk.v1.payment_intents.capture(intent.id, params={"amount_to_capture": 1500})
    assert captured.amount_received == 1500 and dep.spend() == (1500, 1)  # the 2500 given back
    with pytest.raises(stripe.InvalidRequestError):  # the provider refuses: it succeeded
        sdk.v1.payment_intents.cancel(intent.id)
    assert dep.spend() == (1500, 1)
    for amount in (4500, 4000):  # the room given back is spendable again
        sdk.v1.payment_intents.create(params={"amount": amount, "currency": "usd", "confirm": True})
    with pytest.raises(stripe.CardError) as full:  # the budget of $100 is exactly spent
        sdk.v1.payment_intents.create(params={"amount": 1, "currency": "usd", "confirm": True})
    assert full.value.code == "daily_budget"
    received = sum(o.get("amount_received", 0) for o in dep.mock("objects"))
    assert received == 10000 and dep.spend() == (10000, 3)


def test_an_increment_and_a_charge_capture_are_decided_and_counted_for_what_they_add(dep: Deployment) -> None:
    """`increment_authorization` raises what an authorized intent holds, and a charge made with
    capture=false is captured later: both used to be unrecognized writes, which an owner's allow rule
    would have let through uncounted. Each is decided as a payment of the object's new total and counts
    what it adds; a capture of less gives the rest back."""
    sdk = client(dep, dep.agent_token)
    manual = {"currency": "usd", "capture_method": "manual", "confirm": True, "payment_method": GOOD}
    intent = sdk.v1.payment_intents.create(params={"amount": 2000, **manual})
    assert dep.spend()[0] == 2000
    raised = sdk.v1.payment_intents.increment_authorization(intent.id, params={"amount": 4500})
    assert raised.amount == 4500 and dep.spend()[0] == 4500  # counted the 2500 it adds, not 4500 more
    with pytest.raises(stripe.CardError) as held:  # a total above $50 needs a human, like a payment
        sdk.v1.payment_intents.increment_authorization(intent.id, params={"amount": 6000})
    assert held.value.code == "approval_required" and dep.spend()[0] == 6000  # the hold reserves its 1500
    wait_until(lambda: dep.spend()[0] == 4500)  # nobody approves: the hold expires and gives it back
    captured = sdk.v1.payment_intents.capture(intent.id, params={"amount_to_capture": 3000})
    assert captured.amount_received == 3000 and dep.spend()[0] == 3000  # the 1500 given back
    charge = sdk.v1.charges.create(
        params={"amount": 2000, "currency": "usd", "source": "tok_visa", "capture": False}
    )
    assert dep.spend()[0] == 5000
    done = sdk.v1.charges.capture(charge.id, params={"amount": 1200})
    assert done.amount_captured == 1200 and dep.spend()[0] == 4200
    objects = {o["id"]: o for o in dep.mock("objects")}
    assert objects[intent.id]["amount_received"] + objects[charge.id]["amount_captured"] == 4200
    other = json.loads(dep.cli("agent", "create", "other").stdout)["token"]
    with pytest.raises(stripe.PermissionError):  # another agent's intent: never raised by it
        client(dep, other).v1.payment_intents.increment_authorization(intent.id, params={"amount": 4000})
