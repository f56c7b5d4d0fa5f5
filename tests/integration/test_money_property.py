"""The money invariant under faults, as a property on every store: random sequences of payments by
several agents (new keys and same-key retries) meet a provider that refuses, is unreachable, times out
after moving the money, fails with a 5xx, or outlives a sidecar killed mid-call. Whatever the sequence,
once the resolution job has asked the provider about every call left unknown:

* no agent's provider-side spend exceeds its daily budget, and
* what the provider moved for each agent equals what PaySentry counted for it, and
* nothing is left in doubt.

The payment service runs for real over the real store (SQLite, PostgreSQL, PostgreSQL + Redis); the
provider is the fake of tests/unit/fakes.py (Stripe's idempotent replay, one fault per call)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import tempfile
import textwrap
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry import trace

from adapters.stripe import StripeAdapter
from proxy.connections import Connection
from proxy.errors import PaySentryError
from proxy.metrics import Metrics
from proxy.model import Agent
from proxy.payments.calls import PaymentCall, provider_idempotency_key
from proxy.payments.service import PaymentService, Policies
from proxy.policy.engine import make_engine
from proxy.policy.reload import PolicyHolder
from proxy.secrets import Sealer
from proxy.store import AgentRecord, ConnectionRecord, OwnerRecord, Store
from proxy.upstream import FakeUpstream, provider_request
from tests.conftest import Backend
from tests.unit.fakes import AllowAll, FakeConnections, FakeHolds, FakeProvider, Killed

ADAPTER = StripeAdapter()
BUDGET = 10000
NOW = 1_790_000_000.0
POLICY = f"""
    name: fleet
    limits:
      - {{name: daily_budget, window: day, currency: usd, max_amount: {BUDGET}}}
"""
FAULTS = ["ok", "ok", "ok", "refuse", "unreachable", "timeout", "error", "kill"]
_examples = itertools.count()
step = st.tuples(
    st.integers(0, 2),  # which agent
    st.sampled_from([500, 1500, 2500, 4000]),  # amount
    st.booleans(),  # a same-key retry of this agent's last call (else a new key)
    st.sampled_from(FAULTS),  # what the provider does with the call
)


async def run(backend: Backend, steps: list[tuple[int, int, bool, str]]) -> None:
    example = next(_examples)
    store = backend.store()
    await store.open(migrate=True)
    owner = f"own_p{example}"
    agents = [Agent(f"agt_p{example}_{i}", owner, f"bot{i}", f"conn_p{example}") for i in range(3)]
    connection = Connection(f"conn_p{example}", owner, ADAPTER, "http://provider.test", {"secret_key": "sk"})
    await seed(store, owner, connection, agents)
    provider = FakeProvider([fault for *_, fault in steps])
    clock = [NOW]
    service = make_service(store, provider, connection, clock)
    last: dict[int, tuple[str, int]] = {}
    for n, (who, amount, retry, _) in enumerate(steps):
        key, amount = last[who] if retry and who in last else (f"k{n}", amount)
        last[who] = (key, amount)
        clock[0] += 1
        with contextlib.suppress(PaySentryError, Killed):  # told, or never heard: the invariant holds
            await service.authorize(call(agents[who], connection, key, amount), trace.INVALID_SPAN)
    provider.faults.clear()  # faults left for calls a limit refused before sending: none from here on
    for _ in range(20):  # resolution: the provider now answers every call
        clock[0] += 4000
        await service.resolve_unresolved()
        if await store.count_unresolved(clock[0]) == 0 and not await forwarding(store, owner):
            break
    assert await store.count_unresolved(clock[0]) == 0 and not await forwarding(store, owner)
    for agent in agents:
        moved = sum(a for k, a in provider.made.items() if k.startswith(keys_of(agent, len(steps))))
        counted = sum(
            r["amount"] for r in await store.spend_of(owner, agent.id) if r["limit"] == "daily_budget"
        )
        assert moved <= BUDGET, (agent.id, moved)
        assert moved == counted, (agent.id, moved, counted, steps)
    await store.close()


def keys_of(agent: Agent, n: int) -> tuple[str, ...]:
    return tuple(provider_idempotency_key(agent.id, f"k{i}") for i in range(n))


async def forwarding(store: Store, owner: str) -> bool:
    return any(a.state == "forwarding" for a in await store.list_authorizations(owner, None, 1000))


async def seed(store: Store, owner: str, connection: Connection, agents: list[Agent]) -> None:
    await store.create_owner(OwnerRecord(owner, owner, "hash", 1.0))
    await store.add_connection(ConnectionRecord(connection.id, owner, "stripe", "default", "x", b"s", 1.0))
    for a in agents:
        await store.create_agent(AgentRecord(a.id, owner, connection.id, a.name, {}, "hash", 1.0))


def make_service(
    store: Store, provider: FakeProvider, connection: Connection, clock: list[float]
) -> PaymentService:
    folder = Path(tempfile.mkdtemp(prefix="paysentry-policy-"))
    (folder / "p.yaml").write_text(textwrap.dedent(POLICY))
    engine = make_engine("cel-expr-python")
    return PaymentService(
        store=store,
        policies=Policies(PolicyHolder(str(folder), engine), engine),
        agents=None,  # type: ignore[arg-type]  # authorize() is given the agent
        connections=FakeConnections(connection),  # type: ignore[arg-type]
        upstream=FakeUpstream(provider),
        sealer=Sealer([("k1", os.urandom(32))]),
        holds=FakeHolds(),  # type: ignore[arg-type]
        limiter=AllowAll(),
        metrics=Metrics(otlp=False),
        tracer=trace.get_tracer("test"),
        default_adapter=ADAPTER,
        reservation_lease=30.0,
        clock=lambda: clock[0],
    )


def call(agent: Agent, connection: Connection, key: str, amount: int) -> PaymentCall:
    body = f"amount={amount}&currency=usd".encode()
    classified = ADAPTER.classify("POST", "/v1/payment_intents", "application/x-www-form-urlencoded", body)
    assert classified.payment is not None
    url = connection.upstream + "/v1/payment_intents"
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    forward = provider_request(
        ADAPTER, connection.credentials, "POST", url, headers, body, provider_idempotency_key(agent.id, key)
    )
    return PaymentCall(agent, connection, classified.payment, key, f"{amount}", forward)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(step, min_size=1, max_size=30))
def test_what_the_provider_moved_is_what_paysentry_counted(
    backend: Backend, steps: list[tuple[int, int, bool, str]]
) -> None:
    asyncio.run(run(backend, steps))
