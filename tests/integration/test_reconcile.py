"""Reconciliation against every store (SQLite, PostgreSQL, PostgreSQL + Redis): two reconcilers on two
store connections racing over the same provider records fix each authorization exactly once, and the
spend ends where the provider's records say."""

from __future__ import annotations

import asyncio
import json
import os
import time
from urllib.parse import parse_qsl, urlsplit

from multidict import CIMultiDict

from adapters.mock import MockAdapter
from proxy.connections import Connection
from proxy.metrics import Metrics
from proxy.model import Charge
from proxy.payments.reconcile import UNTRACKED, Reconciler
from proxy.secrets import Sealer
from proxy.store import FAILED, SETTLED, VOIDED, Store
from proxy.upstream import FakeUpstream, UpstreamReply, UpstreamRequest
from tests.conftest import Backend
from tests.integration.test_store_conformance import new, seeded
from tests.unit.fakes import FakeConnections

OPEN = Charge("daily", "day:2026-11-22", "usd", 100, None, None)  # no maximum: only counting matters
CONNECTION = Connection("conn_1", "own_1", MockAdapter(), "http://provider.test", {"secret_key": "sk"})
PAGE = 7  # the fake provider pages 7 at a time: the cursor is followed


def provider(objects: list[dict[str, object]]) -> FakeUpstream:
    """Stripe's list of payment intents, newest first, paged with starting_after; other lists empty."""

    async def handle(request: UpstreamRequest) -> UpstreamReply:
        url = urlsplit(request.url)
        data = objects if url.path == "/v1/payment_intents" else []
        after = dict(parse_qsl(url.query)).get("starting_after")
        start = next(i + 1 for i, o in enumerate(data) if o["id"] == after) if after else 0
        page = {"object": "list", "data": data[start : start + PAGE], "has_more": start + PAGE < len(data)}
        return UpstreamReply(
            200, CIMultiDict({"Content-Type": "application/json"}), json.dumps(page).encode()
        )

    return FakeUpstream(handle)


def intent(ref: str, status: str, auth: str | None) -> dict[str, object]:
    metadata = {"paysentry_authorization": auth} if auth else {}
    return {
        "id": ref,
        "object": "payment_intent",
        "amount": 100,
        "currency": "usd",
        "status": status,
        "created": int(time.time()),
        "metadata": metadata,
    }


async def states(store: Store, ids: list[str]) -> list[str]:
    return [(await store.get_authorization("own_1", i)).state for i in ids]  # type: ignore[union-attr]


async def test_two_reconcilers_racing_fix_each_authorization_once(backend: Backend) -> None:
    store = await seeded(backend)
    now = time.time()
    groups: dict[str, list[str]] = {"doubt": [], "stale": [], "failed": [], "settled_void": [], "ok": []}
    for name, ids in groups.items():
        for i in range(10 if name != "ok" else 5):
            key = f"{name}{i}"
            lease = now - 1 if name == "stale" else now + 600  # a stale lease: its sidecar stopped
            await store.record_decision(new(key, charges=(OPEN,), amount=100, lease_expires_at=lease), now)
            ids.append(f"auth_{key}")
            if name == "doubt":
                await store.set_in_doubt(f"auth_{key}", "timeout", now + 600, now)
            elif name == "failed":
                await store.fail(f"auth_{key}", "lost", None, None, now)
            elif name in ("settled_void", "ok"):
                await store.settle(f"auth_{key}", f"pi_{key}", 200, None, now)
    live = await store.record_decision(
        new("live", charges=(OPEN,), amount=100, lease_expires_at=now + 600), now
    )
    assert (await store.spend_of("own_1", "agt_1"))[0]["amount"] == 100 * (10 + 10 + 10 + 5 + 1)

    records = [
        *(intent(f"pi_{i[5:]}", "succeeded", i) for i in groups["doubt"]),
        *(intent(f"pi_{i[5:]}", "canceled", i) for i in groups["stale"]),
        *(intent(f"pi_{i[5:]}", "succeeded", i) for i in groups["failed"]),
        *(intent(f"pi_{i[5:]}", "canceled", i) for i in groups["settled_void"]),
        *(intent(f"pi_{i[5:]}", "succeeded", i) for i in groups["ok"]),
        intent("pi_live", "succeeded", live.record.id),  # still in flight on its sidecar: left to it
        *(intent(f"pi_outside{i}", "succeeded", None) for i in range(3)),  # made at the dashboard
    ]
    second = backend.store()
    await second.open()
    sealer = Sealer([("k1", os.urandom(32))])
    reconcilers = [
        Reconciler(s, FakeConnections(CONNECTION), provider(records), sealer, Metrics(otlp=False))  # type: ignore[arg-type]
        for s in (store, second)
    ]
    reports = await asyncio.gather(
        *(r.run(now - 3600) for r in reconcilers for _ in range(2))  # two runs each, all at once
    )
    fixed = [f for batch in reports for report in batch for f in report.fixed]
    assert sorted(f.authorization for f in fixed) == sorted(
        groups["doubt"] + groups["stale"] + groups["failed"] + groups["settled_void"]
    )  # each exactly once, whoever won it
    assert {f.fix for f in fixed if f.authorization in groups["failed"]} == {"counted"}
    for batch in reports:
        [report] = batch
        assert report.seen == len(records) and report.complete and not report.errors
        assert sorted(u.ref for u in report.unexplained) == ["pi_outside0", "pi_outside1", "pi_outside2"]
        assert {u.kind for u in report.unexplained} == {UNTRACKED} and report.drift == {"usd": 300}

    assert await states(store, groups["doubt"]) == [SETTLED] * 10
    assert await states(store, groups["stale"]) == [FAILED] * 10
    assert await states(store, groups["failed"]) == [SETTLED] * 10
    assert await states(store, groups["settled_void"]) == [VOIDED] * 10
    assert await states(store, [live.record.id]) == ["forwarding"]
    # Kept: in doubt settled (10), counted again (10), matched (5), the live call (1).
    [spend] = await store.spend_of("own_1", "agt_1")
    assert (spend["amount"], spend["count"]) == (100 * 26, 26)
    events = [e for e in await store.list_events("own_1", 0, 1000) if e.type == "authorization.reconciled"]
    assert sorted(e.authorization_id for e in events) == sorted(f.authorization for f in fixed)
    [saved] = await store.reconciliations("own_1")
    assert saved["connection"] == "conn_1" and saved["drift"] == {"usd": 300}
    await second.close()
    await store.close()


async def test_counting_again_reaches_the_spend_the_next_decision_reads(backend: Backend) -> None:
    """A failed authorization the provider executed is counted again where limits are checked (the spend
    table, or Redis's counters), without a limit check: the money already moved."""
    store = await seeded(backend)
    now = time.time()
    cap = Charge("daily", "day:2026-11-22", "usd", 600, 1000, None)
    await store.record_decision(new("a", charges=(cap,)), now)
    await store.fail("auth_a", "lost", None, None, now)
    await store.record_decision(new("b", charges=(cap,)), now)  # fits: a was released
    assert await store.reconcile("auth_a", "counted", "reconciliation", {}, now)
    assert not await store.reconcile("auth_a", "counted", "reconciliation", {}, now)  # once
    _, totals = await store.lookup("agt_1", "nothing", [("daily", "day:2026-11-22")])
    assert (totals["daily"].amount, totals["daily"].count) == (1200, 2)  # past the cap: it moved
    refused = await store.record_decision(new("c", charges=(cap,)), now)
    assert refused.record.state == "denied"  # and the next payment sees it
    await store.close()


def objects_by_id(listed: list[dict[str, object]], now: dict[str, dict[str, object]]) -> FakeUpstream:
    """The list shows ``listed``; a read of one intent shows it as it is ``now`` (lists lag behind)."""
    pages = provider(listed)

    async def handle(request: UpstreamRequest) -> UpstreamReply:
        ref = urlsplit(request.url).path.removeprefix("/v1/payment_intents/")
        if ref in now:
            headers = CIMultiDict({"Content-Type": "application/json"})
            return UpstreamReply(200, headers, json.dumps(now[ref]).encode())
        return await pages.send(request)

    return FakeUpstream(handle)


def reconciler(store: Store, upstream: FakeUpstream) -> Reconciler:
    sealer = Sealer([("k1", os.urandom(32))])
    return Reconciler(store, FakeConnections(CONNECTION), upstream, sealer, Metrics(otlp=False))  # type: ignore[arg-type]


async def test_a_release_is_checked_on_the_object_as_it_is_now_and_a_later_run_counts_again(
    backend: Backend,
) -> None:
    """The list shows an intent declined (nothing moved); by the time it is read again it succeeded (the
    agent confirmed it with another card, counting nothing more: its create counts it). Nothing is
    voided. Had it been voided from the stale list, the next run counts the create again."""
    store = await seeded(backend)
    now = time.time()
    await store.record_decision(new("made", charges=(OPEN,), amount=100), now)
    await store.settle("auth_made", "pi_made", 200, None, now)
    await store.record_decision(new("confirm", operation="payment_intent.confirm", charges=()), now)
    await store.settle("auth_confirm", "pi_made", 200, None, now)
    declined = {
        **intent("pi_made", "requires_payment_method", "auth_made"),
        "last_payment_error": {"code": "x"},
    }
    succeeded = intent("pi_made", "succeeded", "auth_made")
    [report] = await reconciler(store, objects_by_id([declined], {"pi_made": succeeded})).run(now - 3600)
    assert report.fixed == [] and await states(store, ["auth_made"]) == [SETTLED]
    # A void that happened anyway (an older run, a cancellation event): the object moved, so counted again.
    await store.reconcile("auth_made", "voided", "reconciliation", {}, now)
    assert sum(r["amount"] for r in await store.spend_of("own_1", "agt_1")) == 0
    [report] = await reconciler(store, provider([succeeded])).run(now - 3600)
    assert [f.fix for f in report.fixed] == ["counted"]
    assert sum(r["amount"] for r in await store.spend_of("own_1", "agt_1")) == 100
    await store.close()


async def test_a_partial_capture_is_no_drift_and_a_second_object_of_one_call_is(backend: Backend) -> None:
    store = await seeded(backend)
    now = time.time()
    await store.record_decision(new("auth", charges=(OPEN,), amount=100), now)
    await store.settle("auth_auth", "pi_auth", 200, None, now)
    await store.record_decision(new("cap", operation="payment_intent.capture", amount=40, charges=()), now)
    await store.settle("auth_cap", "pi_auth", 200, None, now, holds=40)
    captured = {**intent("pi_auth", "succeeded", "auth_auth"), "amount_received": 40}
    again = intent("pi_again", "succeeded", "auth_auth")  # a re-send the provider took for a new call
    [report] = await reconciler(store, provider([captured, again])).run(now - 3600)
    assert [(u.kind, u.ref, u.amount) for u in report.unexplained] == [("second_object", "pi_again", 100)]
    assert report.fixed == [] and report.drift == {"usd": 100}
    await store.close()
