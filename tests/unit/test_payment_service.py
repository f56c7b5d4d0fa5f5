"""The payment service with fakes: no socket, no database. A fixed clock, a fake upstream built from a plain
function, the payment path of the store in memory."""

from __future__ import annotations

import asyncio
import json
import os
import textwrap
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDict
from opentelemetry import trace

from adapters.formencode import parse_form
from adapters.stripe import StripeAdapter
from proxy.connections import Connection
from proxy.errors import IdempotencyMismatch, RequestInFlight, StoreUnavailable, UpstreamUnavailable
from proxy.metrics import Metrics
from proxy.model import Agent
from proxy.payments.calls import AgentCall, Outcome, PaymentCall, provider_idempotency_key
from proxy.payments.service import PaymentService, Policies
from proxy.policy.engine import make_engine
from proxy.policy.reload import PolicyHolder
from proxy.secrets import Sealer
from proxy.store import FAILED, FORWARDING, HELD, IN_DOUBT, SETTLED, AgentRecord
from proxy.upstream import FakeUpstream, UpstreamReply, UpstreamRequest, provider_request
from tests.unit.fakes import (
    AllowAll,
    FakeAgents,
    FakeAuthorizations,
    FakeConnections,
    FakeHolds,
    FakeProvider,
    FakeStripe,
)

ADAPTER = StripeAdapter()
NOW = 1_790_000_000.0
POLICY = """
    name: test
    limits:
      - {name: daily_budget, window: day, currency: usd, max_amount: 10000}
    rules:
      - {name: usd_only, effect: deny, when: 'payment.currency != "usd"', message: USD only}
      - {name: large_payment, effect: hold, when: payment.amount > 5000, message: needs a human}
"""
AGENT = Agent("agt_1", "own_1", "bot", "conn_1")
AGENT_RECORD = AgentRecord("agt_1", "own_1", "conn_1", "bot", {}, "hash", NOW)
CONNECTION = Connection("conn_1", "own_1", ADAPTER, "http://provider.test", {"secret_key": "sk_owner"})
Handler = Callable[[UpstreamRequest], Awaitable[UpstreamReply]]


def intent(amount: int = 1000) -> Handler:
    async def handler(request: UpstreamRequest) -> UpstreamReply:
        body = json.dumps({"id": "pi_1", "object": "payment_intent", "amount": amount}).encode()
        return UpstreamReply(200, CIMultiDict({"Content-Type": "application/json"}), body)

    return handler


def answering(status: int) -> Handler:
    async def handler(request: UpstreamRequest) -> UpstreamReply:
        return UpstreamReply(status, CIMultiDict(), b'{"error": {"type": "api_error"}}')

    return handler


def raising(maybe_sent: bool) -> Handler:
    async def handler(request: UpstreamRequest) -> UpstreamReply:
        raise UpstreamUnavailable("the provider could not be reached", maybe_sent=maybe_sent)

    return handler


class World:
    def __init__(
        self,
        tmp_path: Path,
        handler: Handler,
        holds: FakeHolds | None = None,
        clock: list[float] | None = None,
    ) -> None:
        self.now = clock or [NOW]
        (tmp_path / "p.yaml").write_text(textwrap.dedent(POLICY))
        engine = make_engine("cel-expr-python")
        self.store = FakeAuthorizations()
        self.store.agents[AGENT.id] = AGENT_RECORD
        self.upstream = FakeUpstream(handler)
        self.holds = holds or FakeHolds()
        self.service = PaymentService(
            store=self.store,  # type: ignore[arg-type]
            policies=Policies(PolicyHolder(str(tmp_path), engine), engine),
            agents=FakeAgents(AGENT_RECORD),  # type: ignore[arg-type]
            connections=FakeConnections(CONNECTION),  # type: ignore[arg-type]
            upstream=self.upstream,
            sealer=Sealer([("k1", os.urandom(32))]),
            holds=self.holds,  # type: ignore[arg-type]
            limiter=AllowAll(),
            metrics=Metrics(otlp=False),
            tracer=trace.get_tracer("test"),
            default_adapter=ADAPTER,
            reservation_lease=30.0,
            clock=lambda: self.now[0],
        )

    async def pay(self, body: bytes, key: str = "k1") -> Outcome:
        classified = ADAPTER.classify(
            "POST", "/v1/payment_intents", "application/x-www-form-urlencoded", body
        )
        assert classified.payment is not None
        forward = provider_request(
            ADAPTER,
            CONNECTION.credentials,
            "POST",
            CONNECTION.upstream + "/v1/payment_intents",
            {"Authorization": "Bearer agent-token", "Content-Type": "application/x-www-form-urlencoded"},
            body,
            provider_idempotency_key(AGENT.id, key),
        )
        call = PaymentCall(AGENT, CONNECTION, classified.payment, key, f"hash:{body!r}", forward)
        return await self.service.authorize(call, trace.INVALID_SPAN)

    async def agent_call(
        self, target: str, body: bytes = b"", headers: dict[str, str] | None = None, method: str = "POST"
    ) -> Outcome:
        path = target.split("?", 1)[0]
        query = dict(p.split("=", 1) for p in target.split("?", 1)[1].split("&")) if "?" in target else {}

        async def read() -> bytes:
            return body

        call = AgentCall(
            method,
            path,
            path,
            target,
            query,
            CIMultiDict({"Authorization": "Bearer psk_x_y", **(headers or {})}),
            "application/x-www-form-urlencoded",
            "127.0.0.1",
            read,
        )
        return await self.service.agent_call(call)

    def only_row(self) -> Any:
        (row,) = self.store.rows.values()
        return row


async def test_allowed_payment_is_forwarded_with_the_owners_key_and_committed(tmp_path: Path) -> None:
    world = World(tmp_path, intent())
    outcome = await world.pay(b"amount=1000&currency=usd")
    assert outcome.status == 200 and json.loads(outcome.body)["id"] == "pi_1"
    (sent,) = world.upstream.sent
    assert sent.headers["Authorization"] == "Bearer sk_owner"
    assert sent.headers["Idempotency-Key"] == provider_idempotency_key(AGENT.id, "k1")
    row = world.only_row()
    assert (row.state, row.provider_ref) == (SETTLED, "pi_1")
    assert world.store.spent(AGENT.id, "daily_budget") == 1000


async def test_denied_payment_names_the_rule_and_sends_nothing(tmp_path: Path) -> None:
    world = World(tmp_path, intent())
    outcome = await world.pay(b"amount=1000&currency=eur")
    error = json.loads(outcome.body)["error"]
    assert outcome.status == 402 and error["code"] == "usd_only"
    assert world.upstream.sent == [] and world.store.spent(AGENT.id, "daily_budget") == 0


async def test_a_limit_refuses_what_would_pass_it(tmp_path: Path) -> None:
    world = World(tmp_path, intent())
    for i in range(2):
        assert (await world.pay(b"amount=4000&currency=usd", key=f"k{i}")).status == 200
    outcome = await world.pay(b"amount=4000&currency=usd", key="k3")
    assert outcome.status == 402 and json.loads(outcome.body)["error"]["code"] == "daily_budget"
    assert len(world.upstream.sent) == 2 and world.store.spent(AGENT.id, "daily_budget") == 8000


async def test_held_payment_is_announced_and_reserved_but_not_sent(tmp_path: Path) -> None:
    world = World(tmp_path, intent())
    outcome = await world.pay(b"amount=6000&currency=usd")
    error = json.loads(outcome.body)["error"]
    assert outcome.status == 402 and error["code"] == "approval_required"
    row = world.only_row()
    assert row.state == HELD and world.holds.announced == [row.id]
    assert world.upstream.sent == [] and world.store.spent(AGENT.id, "daily_budget") == 6000


async def test_a_retry_with_the_same_key_replays_the_stored_answer(tmp_path: Path) -> None:
    world = World(tmp_path, intent())
    first = await world.pay(b"amount=1000&currency=usd")
    again = await world.pay(b"amount=1000&currency=usd")
    assert again.body == first.body and again.headers["Idempotent-Replayed"] == "true"
    assert len(world.upstream.sent) == 1 and world.store.spent(AGENT.id, "daily_budget") == 1000


async def test_the_same_key_for_another_request_is_refused(tmp_path: Path) -> None:
    world = World(tmp_path, intent())
    await world.pay(b"amount=1000&currency=usd")
    with pytest.raises(IdempotencyMismatch):
        await world.pay(b"amount=2000&currency=usd")
    assert len(world.upstream.sent) == 1 and world.store.spent(AGENT.id, "daily_budget") == 1000


async def test_a_provider_never_reached_releases_the_spend(tmp_path: Path) -> None:
    world = World(tmp_path, raising(maybe_sent=False))
    with pytest.raises(UpstreamUnavailable):
        await world.pay(b"amount=1000&currency=usd")
    assert world.only_row().state == FAILED and world.store.spent(AGENT.id, "daily_budget") == 0


async def test_a_timeout_keeps_the_spend_and_a_same_key_retry_learns_the_outcome(tmp_path: Path) -> None:
    provider = FakeProvider(["timeout"])
    world = World(tmp_path, provider)
    with pytest.raises(UpstreamUnavailable) as lost:
        await world.pay(b"amount=1000&currency=usd")
    assert "not known" in lost.value.message and lost.value.maybe_sent
    assert world.only_row().state == IN_DOUBT and world.store.spent(AGENT.id, "daily_budget") == 1000
    again = await world.pay(b"amount=1000&currency=usd")  # re-sent with the same key: replayed
    assert again.status == 200 and provider.moved == [1000]
    assert world.only_row().state == SETTLED and world.store.spent(AGENT.id, "daily_budget") == 1000


@pytest.mark.parametrize("fault", ["error", "timeout"])
async def test_an_unknown_outcome_is_never_decided_again(tmp_path: Path, fault: str) -> None:
    """A retry of a call in doubt is re-sent, never decided anew: even a policy that would now refuse it
    (the budget spent meanwhile) does not turn money that moved into "denied"."""
    provider = FakeProvider([fault])
    world = World(tmp_path, provider)
    first = await world.pay(b"amount=4000&currency=usd", key="a") if fault == "error" else None
    if fault == "timeout":
        with pytest.raises(UpstreamUnavailable):
            await world.pay(b"amount=4000&currency=usd", key="a")
    assert first is None or first.status == 500
    assert (await world.pay(b"amount=4000&currency=usd", key="b")).status == 200
    again = await world.pay(b"amount=4000&currency=usd", key="a")
    assert again.status == 200 and sum(provider.moved) == world.store.spent(AGENT.id, "daily_budget")


async def test_the_resolution_job_settles_what_a_stopped_sidecar_left(tmp_path: Path) -> None:
    provider = FakeProvider(["timeout", "unreachable"])
    clock = [NOW]
    world = World(tmp_path, provider, clock=clock)
    with pytest.raises(UpstreamUnavailable):
        await world.pay(b"amount=1000&currency=usd")
    assert await world.service.resolve_unresolved() == {}  # not due yet (backoff)
    clock[0] += 10
    assert await world.service.resolve_unresolved() == {IN_DOUBT: 1}  # unreachable: kept, not released
    assert world.store.spent(AGENT.id, "daily_budget") == 1000
    clock[0] += 3600
    assert await world.service.resolve_unresolved() == {SETTLED: 1}
    row = world.only_row()
    assert (row.state, row.provider_ref) == (SETTLED, "pi_1") and provider.moved == [1000]
    assert world.store.spent(AGENT.id, "daily_budget") == 1000


async def test_a_call_cut_off_mid_flight_stays_counted(tmp_path: Path) -> None:
    started = asyncio.Event()

    async def slow(request: UpstreamRequest) -> UpstreamReply:
        started.set()
        await asyncio.Event().wait()  # never answers: the call is cut off while it waits
        raise AssertionError("never answered")

    world = World(tmp_path, slow)
    task = asyncio.create_task(world.pay(b"amount=1000&currency=usd"))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert world.only_row().state == IN_DOUBT and world.store.spent(AGENT.id, "daily_budget") == 1000


async def test_a_provider_refusal_releases_the_spend_and_is_replayed(tmp_path: Path) -> None:
    world = World(tmp_path, answering(402))
    first = await world.pay(b"amount=1000&currency=usd")
    assert first.status == 402 and world.store.spent(AGENT.id, "daily_budget") == 0
    again = await world.pay(b"amount=1000&currency=usd")
    assert again.status == 402 and again.headers["Idempotent-Replayed"] == "true"
    assert len(world.upstream.sent) == 1


async def test_the_provider_gets_a_key_of_this_agent_never_the_agents_own(tmp_path: Path) -> None:
    world = World(tmp_path, intent())
    await world.agent_call("/v1/payment_intents", b"amount=1000&currency=usd", {"Idempotency-Key": "shared"})
    relayed = await world.agent_call("/v1/customers", b"email=a@b.c", {"Idempotency-Key": "shared"})
    assert relayed.stream is not None  # moves no money: the listener relays it
    keys = [world.upstream.sent[0].headers["Idempotency-Key"], relayed.stream.headers["Idempotency-Key"]]
    assert keys == [provider_idempotency_key(AGENT.id, "shared")] * 2
    assert provider_idempotency_key("agt_2", "shared") != keys[0]


@pytest.mark.parametrize("target", ["/v1/payouts?method=instant", "/v1/payment_intents?destination=acct_x"])
async def test_query_parameters_on_a_money_call_are_refused(tmp_path: Path, target: str) -> None:
    world = World(tmp_path, intent())
    outcome = await world.agent_call(target, b"amount=1000&currency=usd")
    error = json.loads(outcome.body)["error"]
    assert outcome.status == 400 and error["param"] in ("method", "destination")
    assert world.upstream.sent == [] and world.store.rows == {}


@pytest.mark.parametrize("header", ["Stripe_Account", "stripe_context", "Stripe-Context"])
async def test_header_spellings_cannot_pass_the_guards(tmp_path: Path, header: str) -> None:
    world = World(tmp_path, intent())
    outcome = await world.agent_call("/v1/payment_intents", b"amount=1000&currency=usd", {header: "acct_x"})
    assert outcome.status == 400 and json.loads(outcome.body)["error"]["param"] == header
    assert world.upstream.sent == []


async def test_an_agent_cannot_act_on_another_agents_object(tmp_path: Path) -> None:
    world = World(tmp_path, intent())
    await world.pay(b"amount=1000&currency=usd")
    row = world.only_row()
    world.store.rows[row.id] = replace(row, agent_id="agt_other")  # the intent is another agent's
    for target in ("/v1/payment_intents/pi_1/cancel", "/v1/payment_intents/pi_1/capture"):
        outcome = await world.agent_call(target)
        assert outcome.status == 403, target
    assert len(world.upstream.sent) == 1 and world.store.spent(AGENT.id, "daily_budget") == 1000


async def test_a_settle_the_store_cannot_record_still_answers_and_stays_reserved(tmp_path: Path) -> None:
    world = World(tmp_path, intent())

    async def broken(*args: Any) -> None:
        raise StoreUnavailable("the store is down")

    world.store.settle = broken  # type: ignore[method-assign]
    outcome = await world.pay(b"amount=1000&currency=usd")
    assert outcome.status == 200 and json.loads(outcome.body)["id"] == "pi_1"
    assert world.only_row().state == FORWARDING and world.store.spent(AGENT.id, "daily_budget") == 1000


@pytest.mark.parametrize(("status", "released"), [("canceled", True), ("succeeded", False)])
async def test_a_cancel_releases_only_what_the_provider_shows_cancelled(
    tmp_path: Path, status: str, released: bool
) -> None:
    async def provider(request: UpstreamRequest) -> UpstreamReply:
        state = status if request.url.endswith("/cancel") else "requires_confirmation"
        body = json.dumps({"id": "pi_1", "object": "payment_intent", "status": state}).encode()
        return UpstreamReply(200, CIMultiDict({"Content-Type": "application/json"}), body)

    world = World(tmp_path, provider)
    await world.pay(b"amount=1000&currency=usd")
    assert (await world.agent_call("/v1/payment_intents/pi_1/cancel")).status == 200
    assert world.store.spent(AGENT.id, "daily_budget") == (0 if released else 1000)


async def test_a_retry_naming_another_account_is_another_request(tmp_path: Path) -> None:
    world = World(tmp_path, FakeProvider(["timeout"]))
    connection = replace(CONNECTION, allowed_accounts=frozenset({"acct_a", "acct_b"}))
    world.service.connections = FakeConnections(connection)  # type: ignore[assignment]
    body, headers = b"amount=1000&currency=usd", {"Idempotency-Key": "k"}
    first = await world.agent_call("/v1/payment_intents", body, {**headers, "Stripe-Account": "acct_a"})
    assert first.status == 502 and world.only_row().state == IN_DOUBT
    other = await world.agent_call("/v1/payment_intents", body, {**headers, "Stripe-Account": "acct_b"})
    assert other.status == 400 and json.loads(other.body)["error"]["type"] == "idempotency_error"
    assert len(world.upstream.sent) == 1  # never re-sent to another account under the same key


@pytest.mark.parametrize("status", [401, 403])
async def test_a_resent_call_refused_for_its_credentials_stays_in_doubt(tmp_path: Path, status: int) -> None:
    answers = iter([None, status])

    async def provider(request: UpstreamRequest) -> UpstreamReply:
        if next(answers) is None:
            raise UpstreamUnavailable("timed out")  # the first send may have moved the money
        return UpstreamReply(status, CIMultiDict(), b'{"error": {"type": "invalid_request_error"}}')

    world = World(tmp_path, provider)
    with pytest.raises(UpstreamUnavailable):
        await world.pay(b"amount=1000&currency=usd")
    await world.pay(b"amount=1000&currency=usd")  # the key was rolled meanwhile
    assert world.only_row().state == IN_DOUBT and world.store.spent(AGENT.id, "daily_budget") == 1000


async def test_the_forwarded_call_names_its_authorization_and_every_resend_is_the_same(
    tmp_path: Path,
) -> None:
    """Attribution: the provider's object carries metadata[paysentry_authorization]; the call re-sent to
    learn an unknown outcome (by the job, or the agent's same-key retry) is byte for byte the first send,
    and the agent's key is still tied to the body the agent sent."""
    body = b"amount=1000&currency=usd&metadata[order]=42"
    for resend in ("job", "agent"):
        sent: list[bytes] = []
        provider = FakeProvider(["timeout"])

        async def handler(
            request: UpstreamRequest, provider: FakeProvider = provider, sent: list[bytes] = sent
        ) -> UpstreamReply:
            sent.append(request.body)
            return await provider(request)

        clock = [NOW]
        world = World(tmp_path, handler, clock=clock)
        with pytest.raises(UpstreamUnavailable):
            await world.pay(body)
        row = world.only_row()
        assert sent[0] == body + b"&metadata%5Bpaysentry_authorization%5D=" + row.id.encode()
        assert parse_form(sent[0])["metadata"] == {"order": "42", "paysentry_authorization": row.id}
        if resend == "job":
            clock[0] += 3600
            assert await world.service.resolve_unresolved() == {SETTLED: 1}
        else:  # the agent's same-key retry: the same request, not a mismatch
            assert (await world.pay(body)).status == 200
        assert sent == [sent[0], sent[0]] and provider.moved == [1000]
        assert world.only_row().state == SETTLED


async def test_a_lifecycle_call_is_not_tagged(tmp_path: Path) -> None:
    payment = ADAPTER.classify(
        "POST", "/v1/payment_intents/pi_1/confirm", "application/x-www-form-urlencoded", b"a=1"
    ).payment
    assert payment is not None and ADAPTER.attribute(payment, b"a=1", "auth_1") == b"a=1"


async def test_an_object_of_another_agents_call_in_doubt_is_refused_by_its_tag(tmp_path: Path) -> None:
    """PaySentry has not recorded who made the intent (the create is still in doubt), but the provider's
    object carries the attribution tag of that call: another agent's cancel or confirm is refused."""
    tagged: dict[str, str] = {}

    async def provider(request: UpstreamRequest) -> UpstreamReply:
        headers = CIMultiDict({"Content-Type": "application/json"})
        if request.method == "GET":
            body = {"id": "pi_9", "object": "payment_intent", "amount": 1000, "currency": "usd"}
            body["metadata"] = {"paysentry_authorization": tagged["id"]}
            return UpstreamReply(200, headers, json.dumps(body).encode())
        raise UpstreamUnavailable("the provider did not answer in time")

    world = World(tmp_path, provider)
    with pytest.raises(UpstreamUnavailable):
        await world.pay(b"amount=1000&currency=usd")
    row = world.only_row()
    assert row.state == IN_DOUBT and row.provider_ref is None
    tagged["id"] = row.id
    world.store.rows[row.id] = replace(row, agent_id="agt_2")  # another agent's call
    sent = len(world.upstream.sent)
    for target in ("/v1/payment_intents/pi_9/cancel", "/v1/payment_intents/pi_9/confirm"):
        outcome = await world.agent_call(target)
        assert outcome.status == 403, (target, outcome.body)
    assert [r.method for r in world.upstream.sent[sent:]] == ["GET", "GET"]  # read, never acted on


async def test_an_object_whose_owner_cannot_be_read_is_not_acted_on(tmp_path: Path) -> None:
    """The provider does not answer the read that would tell whose object it is (429, 5xx): the call is
    refused to retry, never taken as an object made elsewhere."""

    async def provider(request: UpstreamRequest) -> UpstreamReply:
        if request.method == "GET":
            return UpstreamReply(429, CIMultiDict(), b'{"error": {"type": "rate_limit_error"}}')
        raise AssertionError(f"{request.method} {request.url} must not be sent")

    world = World(tmp_path, provider)
    outcome = await world.agent_call("/v1/payment_intents/pi_unknown/cancel")
    assert outcome.status == 502 and [r.method for r in world.upstream.sent] == ["GET"]


async def test_a_capture_after_the_confirm_that_counted_a_declined_create_counts_nothing_more(
    tmp_path: Path,
) -> None:
    """A declined create counts nothing; the confirm that then authorizes the intent counts it in full;
    its capture is decided against what that confirm counted and adds nothing (near the budget, counting
    it twice would refuse it)."""
    provider = FakeStripe(["refuse"])
    world = World(tmp_path, provider)
    declined = await world.pay(b"amount=3000&currency=usd&confirm=true&capture_method=manual")
    assert declined.status == 402 and world.store.spent(AGENT.id, "daily_budget") == 0
    assert (await world.pay(b"amount=4500&currency=usd&confirm=true", key="k2")).status == 200
    assert (await world.agent_call("/v1/payment_intents/pi_1/confirm")).status == 200
    assert provider.intents["pi_1"]["status"] == "requires_capture"
    assert world.store.spent(AGENT.id, "daily_budget") == 7500
    captured = await world.agent_call("/v1/payment_intents/pi_1/capture")
    assert captured.status == 200, captured.body
    assert provider.intents["pi_1"]["status"] == "succeeded"
    assert world.store.spent(AGENT.id, "daily_budget") == 7500


async def test_a_call_older_than_the_providers_key_is_never_re_sent(tmp_path: Path) -> None:
    """Past about a day the provider may have forgotten the idempotency key: a re-send could be taken for
    a new payment. The call stays in doubt and counted (reconciliation resolves it from the provider's
    records), and neither the resolution job nor the agent's same-key retry sends it again."""
    clock = [NOW]
    world = World(tmp_path, FakeProvider(["timeout"]), clock=clock)
    with pytest.raises(UpstreamUnavailable):
        await world.pay(b"amount=1000&currency=usd")
    clock[0] += 24 * 3600
    assert await world.service.resolve_unresolved() == {IN_DOUBT: 1}
    with pytest.raises(RequestInFlight):  # the agent's same-key retry: told it is being resolved
        await world.pay(b"amount=1000&currency=usd")
    assert len(world.upstream.sent) == 1
    assert world.only_row().state == IN_DOUBT and world.store.spent(AGENT.id, "daily_budget") == 1000


async def test_a_call_on_an_intent_whose_create_is_in_doubt_waits_for_that_create(tmp_path: Path) -> None:
    """The create (not confirmed) timed out after Stripe made the intent; the agent finds the intent and
    confirms it. Counted in full, the confirm would count the intent twice once the create settles (6000
    counted, 3000 moved); counted as counted, it would count nothing if the create were released. So it
    is refused to retry until resolution has learned the create's outcome; then it adds nothing."""
    clock = [NOW]
    provider = FakeStripe(["timeout"])
    world = World(tmp_path, provider, clock=clock)
    with pytest.raises(UpstreamUnavailable):
        await world.pay(b"amount=3000&currency=usd")
    assert world.only_row().state == IN_DOUBT
    early = await world.agent_call("/v1/payment_intents/pi_1/confirm")
    assert early.status == 409 and json.loads(early.body)["error"]["code"] == "lock_timeout", early.body
    assert provider.intents["pi_1"]["status"] == "requires_confirmation"  # read, never confirmed
    clock[0] += 3600
    assert await world.service.resolve_unresolved() == {SETTLED: 1}
    assert (await world.agent_call("/v1/payment_intents/pi_1/confirm")).status == 200
    assert provider.exposure("pi_1") == 3000 == world.store.spent(AGENT.id, "daily_budget")


def intent_with_charge(status: str, refunded: int = 0) -> Handler:
    """A provider whose create makes pi_1 (left in ``status``) and its charge ch_1, read (or updated) at
    /v1/charges/ch_1; a refund of it succeeds. Anything else must not be sent."""

    async def provider(request: UpstreamRequest) -> UpstreamReply:
        if request.url.endswith("/v1/payment_intents"):
            intent = {"id": "pi_1", "object": "payment_intent", "amount": 3000, "currency": "usd"}
            return _json(200, {**intent, "status": status})
        if request.url.endswith("/v1/charges/ch_1"):
            charge = {"id": "ch_1", "object": "charge", "payment_intent": "pi_1", "amount": 3000}
            return _json(200, {**charge, "amount_refunded": refunded, "currency": "usd"})
        if request.url.endswith("/v1/refunds"):
            refund = {"id": "re_1", "object": "refund", "charge": "ch_1", "amount": 2000, "currency": "usd"}
            return _json(200, refund)
        raise AssertionError(f"{request.method} {request.url} must not be sent")

    return provider


def _json(status: int, body: dict[str, Any]) -> UpstreamReply:
    return UpstreamReply(status, CIMultiDict({"Content-Type": "application/json"}), json.dumps(body).encode())


async def test_a_refund_of_an_intents_charge_belongs_to_whoever_made_the_intent(tmp_path: Path) -> None:
    """`POST /v1/refunds charge=ch_...` names the charge an intent made: whose it is, the intent tells
    (it used to be refused as unreadable, 502 for ever); the refund is bounded by what the charge has
    left, and another agent's refund of it is refused."""

    world = World(tmp_path, intent_with_charge("succeeded", refunded=1000))
    assert (await world.pay(b"amount=3000&currency=usd&confirm=true")).status == 200
    too_much = await world.agent_call("/v1/refunds", b"charge=ch_1&amount=2500", {"Idempotency-Key": "r1"})
    assert too_much.status == 400 and b"20.00" in too_much.body, too_much.body
    refunded = await world.agent_call("/v1/refunds", b"charge=ch_1", {"Idempotency-Key": "r2"})
    assert refunded.status == 200, refunded.body
    assert parse_form(world.upstream.sent[-1].body)["charge"] == "ch_1"
    created = next(r for r in world.store.rows.values() if r.provider_ref == "pi_1")
    world.store.rows[created.id] = replace(created, agent_id="agt_2")  # had another agent made the intent
    theirs = await world.agent_call("/v1/refunds", b"charge=ch_1&amount=100", {"Idempotency-Key": "r3"})
    assert theirs.status == 403, theirs.body


async def test_capturing_an_intents_charge_is_sent_to_the_intent(tmp_path: Path) -> None:
    """The charge an intent made is counted with the intent: capturing the charge itself would be counted
    again, so it is refused with a pointer to the intent (nothing sent but the read)."""

    world = World(tmp_path, intent_with_charge("requires_capture"))
    assert (await world.pay(b"amount=3000&currency=usd&confirm=true&capture_method=manual")).status == 200
    refused = await world.agent_call("/v1/charges/ch_1/capture", b"", {"Idempotency-Key": "c1"})
    assert refused.status == 400 and b"act on pi_1 instead" in refused.body, refused.body
    assert world.store.spent(AGENT.id, "daily_budget") == 3000


def test_what_paysentry_sets_or_drops_never_travels_under_another_spelling() -> None:
    incoming = {
        "Idempotency_Key": "the-agents-own",  # read as Idempotency-Key by a lenient server
        "X_Forwarded_For": "10.0.0.1",
        "Stripe-Version": "2024-06-20",
    }
    sent = provider_request(ADAPTER, {"secret_key": "sk_test_1"}, "POST", "http://p/v1/x", incoming, b"", "k")
    names = {k.lower(): v for k, v in sent.headers.items()}
    assert names["idempotency-key"] == "k" and names["authorization"] == "Bearer sk_test_1"
    assert names["stripe-version"] == "2024-06-20"
    assert not {"idempotency_key", "x_forwarded_for"} & set(names)


@pytest.mark.parametrize(
    ("first", "then"),
    [
        ("increment", "/v1/payment_intents/pi_1/capture"),  # counted 2000 against 1500 moved
        ("increment", "/v1/payment_intents/pi_1/cancel"),  # 500 left counted on a cancelled intent
        ("confirm", "/v1/payment_intents/pi_1/capture"),  # after a declined create: 6000 against 3000
    ],
)
async def test_a_call_on_an_intent_waits_for_an_earlier_call_on_it_still_in_doubt(
    tmp_path: Path, first: str, then: str
) -> None:
    """An increment or a confirm on the intent timed out (its outcome unknown, no record of the object
    on it): what a capture or a cancel would count depends on it, so they are refused to retry until
    resolution has learned it; then what moved is what was counted."""
    clock = [NOW]
    declined = first == "confirm"
    provider = FakeStripe(["refuse" if declined else "ok", "ok" if declined else "timeout", "timeout"])
    world = World(tmp_path, provider, clock=clock)
    made = await world.pay(b"amount=1000&currency=usd&confirm=true&capture_method=manual")
    assert made.status == (402 if declined else 200)
    if declined:  # the read of whose it is ("ok"), then the confirm itself times out
        call = await world.agent_call("/v1/payment_intents/pi_1/confirm", b"", {"Idempotency-Key": "f1"})
    else:
        provider.faults = ["timeout"]
        call = await world.agent_call(
            "/v1/payment_intents/pi_1/increment_authorization", b"amount=1500", {"Idempotency-Key": "f1"}
        )
    assert call.status == 502, call.body  # timed out: in doubt
    early = await world.agent_call(then, b"", {"Idempotency-Key": "t1"})
    assert early.status == 409 and json.loads(early.body)["error"]["code"] == "lock_timeout", early.body
    clock[0] += 3600
    assert await world.service.resolve_unresolved() == {SETTLED: 1}
    assert (await world.agent_call(then, b"", {"Idempotency-Key": "t1"})).status == 200
    for note in [r for r in provider.intents.values() if r["status"] == "canceled"]:
        await world.store.void(AGENT.owner_id, note["id"], "provider", {}, clock[0])
    assert provider.exposure("pi_1") == world.store.spent(AGENT.id, "daily_budget")


async def test_an_increment_is_decided_with_the_intents_payee(tmp_path: Path) -> None:
    """Raising a $10 intent to a risky account to $40 is what a $40 intent to it is: denied."""
    risky = "acct_risky"
    rule = f"      - {{name: risky, effect: deny, when: 'payment.destination == \"{risky}\" && payment.amount > 2000', message: risky}}\n"
    world = World(tmp_path, FakeStripe())
    (tmp_path / "p.yaml").write_text(textwrap.dedent(POLICY) + rule.removeprefix("    "))
    assert world.service.policies.holder.reload()
    body = f"amount=1000&currency=usd&confirm=true&capture_method=manual&transfer_data[destination]={risky}"
    assert (await world.pay(body.encode())).status == 200
    raised = await world.agent_call(
        "/v1/payment_intents/pi_1/increment_authorization", b"amount=4000", {"Idempotency-Key": "i1"}
    )
    assert raised.status == 402 and b"risky" in raised.body, raised.body
    assert world.store.spent(AGENT.id, "daily_budget") == 1000


async def test_a_write_paysentry_does_not_recognize_makes_nobody_the_maker(tmp_path: Path) -> None:
    """An owner's rule lets unrecognized writes through (metadata updates, say). Such a write on the charge
    of another agent's intent must not make its writer the charge's maker, and so able to refund it."""
    rules = textwrap.dedent(POLICY).replace(
        "'payment.currency != \"usd\"'",
        '\'payment.currency != "usd" && payment.operation != "unrecognized"\'',
    )
    rules += "  - {name: updates, effect: allow, when: 'payment.operation == \"unrecognized\"'}\n"

    world = World(tmp_path, intent_with_charge("succeeded"))
    (tmp_path / "p.yaml").write_text(rules)
    assert world.service.policies.holder.reload()
    assert (await world.pay(b"amount=3000&currency=usd&confirm=true")).status == 200
    created = next(r for r in world.store.rows.values() if r.provider_ref == "pi_1")
    world.store.rows[created.id] = replace(created, agent_id="agt_2")  # the intent is another agent's
    assert (
        await world.agent_call("/v1/charges/ch_1", b"metadata[x]=y", {"Idempotency-Key": "u1"})
    ).status == 200
    refund = await world.agent_call("/v1/refunds", b"charge=ch_1", {"Idempotency-Key": "r1"})
    assert refund.status == 403, refund.body


async def test_an_object_in_a_connected_account_is_read_there_to_tell_whose_it_is(tmp_path: Path) -> None:
    """The intent lives in the connected account the call names: read without Stripe-Account it is a 404
    (made elsewhere, as far as the platform can tell), so another agent's cancel of it would go through.
    Read in that account, its tag names the other agent's call: refused."""
    tagged: dict[str, str] = {}

    async def provider(request: UpstreamRequest) -> UpstreamReply:
        headers = CIMultiDict({"Content-Type": "application/json"})
        if request.method == "GET":
            if request.headers.get("Stripe-Account") != "acct_1":
                return UpstreamReply(404, headers, b'{"error": {"type": "invalid_request_error"}}')
            body = {"id": "pi_9", "object": "payment_intent", "amount": 1000, "currency": "usd"}
            body["metadata"] = {"paysentry_authorization": tagged["id"]}
            return UpstreamReply(200, headers, json.dumps(body).encode())
        raise UpstreamUnavailable("the provider did not answer in time")

    world = World(tmp_path, provider)
    world.service.connections = FakeConnections(replace(CONNECTION, allowed_accounts=frozenset({"acct_1"})))  # type: ignore[assignment]
    with pytest.raises(UpstreamUnavailable):
        await world.pay(b"amount=1000&currency=usd")
    row = world.only_row()
    tagged["id"] = row.id
    world.store.rows[row.id] = replace(row, agent_id="agt_2")  # another agent's call, still in doubt
    cancel = await world.agent_call("/v1/payment_intents/pi_9/cancel", b"", {"Stripe-Account": "acct_1"})
    assert cancel.status == 403, cancel.body
    assert [r.method for r in world.upstream.sent[-1:]] == ["GET"]  # read in acct_1, never cancelled
