"""One conformance suite for every store (a real SQLite file, a real PostgreSQL server): atomic
reservations (also across processes), holds, release, audit, schema checks."""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
import time
from dataclasses import replace

import pytest

from proxy.bootstrap import open_store
from proxy.errors import StoreUnavailable
from proxy.model import Charge, SpendTotal
from proxy.store import (
    AgentNameTaken,
    AgentRecord,
    ApprovalClosed,
    ApprovalExpired,
    ApprovalNotFound,
    ApproverNameTaken,
    ApproverRecord,
    ConnectionRecord,
    DuplicateKey,
    LinkUnusable,
    NewAuthorization,
    NotAnApprover,
    OwnerRecord,
    Store,
)
from tests.conftest import Backend

LIMIT = Charge("daily", "day:2026-11-22", "usd", 1000, 10000, None)


async def seeded(backend: Backend) -> Store:
    store = backend.store()
    await store.open(migrate=True)
    if await store.get_owner("own_1") is None:
        await store.create_owner(OwnerRecord("own_1", "acme", "hash", 1.0))
        await store.add_connection(
            ConnectionRecord("conn_1", "own_1", "mock", "default", "http://x", b"sealed", 1.0)
        )
        await store.create_agent(AgentRecord("agt_1", "own_1", "conn_1", "bot", {}, "hash", 1.0))
    return store


def new(key: str, decision: str = "allow", charges: tuple[Charge, ...] = (LIMIT,), **kw) -> NewAuthorization:
    fields = dict(
        id=f"auth_{key}",
        owner_id="own_1",
        agent_id="agt_1",
        idempotency_key=key,
        request_hash="h",
        provider="mock",
        operation="payment_intent",
        amount=1000,
        currency="usd",
        destination="",
        payment={},
        decision=decision,
        rule="default",
        policy="p",
        message="m",
        revision="r",
        charges=charges,
        lease_expires_at=time.time() + 60,
    )
    fields.update(kw)
    return NewAuthorization(**fields)


async def spent(store: Store) -> tuple[int, int]:
    rows = await store.spend_of("own_1", "agt_1")
    return (rows[0]["amount"], rows[0]["count"]) if rows else (0, 0)


async def test_concurrent_reservations_stop_exactly_at_the_limit(backend: Backend) -> None:
    store = await seeded(backend)
    results = await asyncio.gather(*(store.record_decision(new(f"k{i}"), time.time()) for i in range(50)))
    states = [r.record.state for r in results]
    assert states.count("forwarding") == 10 and states.count("denied") == 40
    denied = next(r for r in results if r.exceeded)
    assert denied.record.rule == "daily" and "100.00 USD" in denied.record.message
    assert await spent(store) == (10000, 10)
    await store.close()


async def test_a_refusal_found_while_reserving_is_worded_by_the_core(backend: Backend) -> None:
    store = await seeded(backend)
    for i in range(10):
        await store.record_decision(new(f"e{i}"), time.time())

    def explain(charge: Charge, total: SpendTotal) -> str:
        return f"{charge.limit} is full: {total.amount} of {charge.max_amount}"

    refused = await store.record_decision(new("e10", explain=explain), time.time())
    assert refused.record.message == "daily is full: 10000 of 10000"
    assert (await store.get_authorization("own_1", refused.record.id)).message == refused.record.message
    await store.close()


async def test_a_refusal_by_a_later_limit_counts_nothing_against_the_earlier_ones(backend: Backend) -> None:
    store = await seeded(backend)
    monthly = Charge("monthly", "month:2026-11", "usd", 1000, 2500, None)
    both = (LIMIT, monthly)
    first = await store.record_decision(new("m1", charges=both), time.time())
    second = await store.record_decision(new("m2", charges=both), time.time())
    third = await store.record_decision(new("m3", charges=both), time.time())  # the month's 2500 is full
    assert [r.record.state for r in (first, second, third)] == ["forwarding", "forwarding", "denied"]
    assert third.record.rule == "monthly" and third.exceeded.total.amount == 2000
    totals = {row["limit"]: (row["amount"], row["count"]) for row in await store.spend_of("own_1", "agt_1")}
    assert totals == {"daily": (2000, 2), "monthly": (2000, 2)}
    await store.close()


def _race_worker(backend: Backend, worker: int, n: int, out: multiprocessing.Queue) -> None:
    async def run() -> int:
        store = backend.store()
        await store.open()
        results = await asyncio.gather(
            *(store.record_decision(new(f"w{worker}-{i}"), time.time()) for i in range(n))
        )
        await store.close()
        return sum(r.record.state == "forwarding" for r in results)

    out.put(asyncio.run(run()))


async def test_reservations_from_several_processes_stop_exactly_at_the_limit(backend: Backend) -> None:
    await (await seeded(backend)).close()
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue = ctx.Queue()
    workers = [ctx.Process(target=_race_worker, args=(backend, w, 20, out)) for w in range(3)]
    for w in workers:
        w.start()
    allowed = sum(out.get(timeout=60) for _ in workers)
    for w in workers:
        w.join(timeout=30)
    assert allowed == 10
    store = await seeded(backend)
    assert await spent(store) == (10000, 10)
    events = await store.list_events("own_1", 0, 1000)
    assert sum(e.type.startswith("authorization.") for e in events) == 60  # one record per decision
    await store.close()


async def test_settle_keeps_and_fail_releases(backend: Backend) -> None:
    store = await seeded(backend)
    a = (
        await store.record_decision(new("a", payment={"amount": 1000, "categories": ["x"]}), time.time())
    ).record
    b = (await store.record_decision(new("b"), time.time())).record
    assert a == await store.get_authorization("own_1", a.id)  # what record_decision returns is what is stored
    await store.settle(a.id, "pi_1", 200, b"{}", time.time())
    await store.fail(b.id, "declined", 402, b"{}", time.time())
    await store.fail(b.id, "declined again", 402, b"{}", time.time())  # releasing twice changes nothing
    assert await spent(store) == (1000, 1)
    assert (await store.find_by_provider_ref("own_1", "pi_1")).id == a.id
    types = [e.type for e in await store.list_events("own_1", 0, 100)]
    assert types[-4:] == [
        "authorization.forwarding",
        "authorization.forwarding",
        "authorization.settled",
        "authorization.failed",
    ]
    hold = new("h", decision="hold", charges=(), approval_id="apr_h", hold_expires_at=time.time() + 60)
    held = (await store.record_decision(hold, time.time())).record
    assert held == await store.get_authorization("own_1", held.id)
    await store.close()


async def test_an_active_agent_name_is_taken_once(backend: Backend) -> None:
    store = await seeded(backend)
    with pytest.raises(AgentNameTaken) as taken:
        await store.create_agent(AgentRecord("agt_2", "own_1", "conn_1", "bot", {}, "hash", 2.0))
    assert taken.value.name == "bot"
    assert [a.id for a in await store.list_agents("own_1")] == ["agt_1"]  # nothing written
    await store.close()


async def test_same_key_twice_is_a_duplicate(backend: Backend) -> None:
    store = await seeded(backend)
    await store.record_decision(new("same"), time.time())
    with pytest.raises(DuplicateKey):
        await store.record_decision(new("same", id="auth_other"), time.time())
    assert await spent(store) == (1000, 1)
    await store.close()


async def test_holds_reserve_and_release_on_deny_or_expiry(backend: Backend) -> None:
    store = await seeded(backend)
    now = time.time()
    await store.record_decision(new("h1", "hold", approval_id="apr_1", hold_expires_at=now + 60), now)
    await store.record_decision(new("h2", "hold", approval_id="apr_2", hold_expires_at=now + 1), now)
    await store.record_decision(new("h3", "hold", approval_id="apr_3", hold_expires_at=now + 60), now)
    assert await spent(store) == (3000, 3)
    await store.vote("own_1", "apr_1", "owner:acme", False, "no", "cli", now)
    assert await store.expire_holds(now + 2) == 1
    assert await spent(store) == (1000, 1)
    approved = (await store.vote("own_1", "apr_3", "owner:acme", True, "fine", "cli", now)).approval
    assert approved.state == "approved" and approved.authorization.state == "approved"
    with pytest.raises(ApprovalClosed) as closed:
        await store.vote("own_1", "apr_3", "owner:acme", True, "again", "cli", now)
    assert (closed.value.approval_id, closed.value.state) == ("apr_3", "approved")
    with pytest.raises(ApprovalClosed) as closed:
        await store.vote("own_1", "apr_2", "owner:acme", True, "too late", "cli", now + 2)
    assert closed.value.state == "expired"
    with pytest.raises(ApprovalNotFound):
        await store.vote("own_2", "apr_3", "owner:acme", True, "not mine", "cli", now)
    assert await store.start_forwarding("auth_h3", now + 60, now)
    assert not await store.start_forwarding("auth_h3", now + 60, now)  # forwarded exactly once
    assert await store.get_approval("own_2", "apr_3") is None  # another owner does not see it
    await store.close()


async def test_a_call_in_doubt_keeps_its_spend_until_the_provider_says(backend: Backend) -> None:
    """A forwarded call whose outcome is unknown is never released for lack of an answer: stale leases
    and calls in doubt are claimed for resolution (spend still counted), then settled or failed."""
    store = await seeded(backend)
    now = time.time()
    await store.record_decision(new("stale", lease_expires_at=now - 1, request=b"sealed"), now)
    await store.record_decision(new("live", lease_expires_at=now + 60), now)
    await store.record_decision(new("doubt", lease_expires_at=now + 60), now)
    assert await store.set_in_doubt("auth_doubt", "timed out", now + 30, now)
    assert not await store.set_in_doubt("auth_doubt", "again", now + 30, now)  # no longer forwarding
    assert await spent(store) == (3000, 3) and await store.count_unresolved(now) == 2  # stale, doubt
    claimed = await store.claim_unresolved(now + 60, now, 10)  # the in-doubt one is not due before +30
    assert [(c.record.id, c.request, c.attempts) for c in claimed] == [("auth_stale", b"sealed", 0)]
    assert await store.claim_unresolved(now + 60, now, 10) == []  # claimed: leased again
    due = await store.claim_unresolved(now + 200, now + 100, 10)
    assert sorted(c.record.id for c in due) == ["auth_doubt", "auth_live", "auth_stale"]
    assert await store.claim("auth_doubt", now + 300, now + 100) is None  # forwarding, leased
    assert await store.set_in_doubt("auth_doubt", "5xx", now + 500, now + 100)
    # an agent's retry claims it at once; it was sent twice before (the first send, one re-send)
    assert await store.claim("auth_doubt", now + 300, now + 100) == 2
    assert await spent(store) == (3000, 3)
    await store.settle("auth_stale", "pi_1", 200, b"{}", now)
    await store.fail("auth_doubt", "the provider refused", 402, b"{}", now)
    assert await spent(store) == (2000, 2)
    await store.close()


async def test_two_replicas_resolving_at_once_claim_each_call_once(backend: Backend) -> None:
    """Two resolution jobs (two replicas, one database) on the same unresolved calls: each call is
    claimed by exactly one of them, so it is re-sent and concluded once."""
    small = Charge("daily", "day:2026-11-22", "usd", 100, 10000, None)
    first, second = await seeded(backend), backend.store()
    await second.open()
    now = time.time()
    for i in range(40):
        await first.record_decision(new(f"lease{i:02d}", charges=(small,), lease_expires_at=now - 1), now)
    for i in range(0, 40, 2):
        assert await first.set_in_doubt(f"auth_lease{i:02d}", "timed out", now - 1, now - 2)
    claims = await asyncio.gather(
        *(store.claim_unresolved(now + 60, now, 7) for store in (first, second) for _ in range(4)),
        *(store.claim(f"auth_lease{i:02d}", now + 60, now) for store in (first, second) for i in range(40)),
    )
    ids = [c.record.id for batch in claims[:8] for c in batch] + [
        f"auth_lease{i % 40:02d}" for i, won in enumerate(claims[8:]) if won is not None
    ]
    assert sorted(ids) == [f"auth_lease{i:02d}" for i in range(40)]  # each exactly once
    _, after = await second.lookup("agt_1", "-", [("daily", small.period)])
    assert after["daily"] == SpendTotal(4000, 40)  # nothing released by claiming
    for i in range(40):
        await (first if i % 2 else second).fail(f"auth_lease{i:02d}", "refused", 402, b"{}", now)
        await (second if i % 2 else first).fail(f"auth_lease{i:02d}", "refused", 402, b"{}", now)
    _, after = await second.lookup("agt_1", "-", [("daily", small.period)])
    assert after["daily"] == SpendTotal(0, 0)  # released once each, never below
    await first.close()
    await second.close()


async def test_two_replicas_expiring_holds_at_once_release_each_once(backend: Backend) -> None:
    small = Charge("daily", "day:2026-11-22", "usd", 100, 10000, None)
    first, second = await seeded(backend), backend.store()
    await second.open()
    now = time.time()
    for i in range(20):
        hold = new(f"held{i:02d}", "hold", (small,), approval_id=f"apr_{i:02d}", hold_expires_at=now + 1)
        await first.record_decision(hold, now)
    counts = await asyncio.gather(first.expire_holds(now + 2), second.expire_holds(now + 2))
    assert sum(counts) == 20
    _, after = await second.lookup("agt_1", "-", [("daily", small.period)])
    assert after["daily"] == SpendTotal(0, 0)
    events = await first.list_events("own_1", 0, 1000)
    assert sum(e.type == "approval.expired" for e in events) == 20
    await first.close()
    await second.close()


async def raw_sql(url: str, sql: str) -> None:
    """Run SQL straight on the database, as an intruder or an older/newer PaySentry would."""
    if url.startswith("sqlite:///"):
        db = sqlite3.connect(url.removeprefix("sqlite:///"))
        try:
            db.execute(sql)
            db.commit()
        finally:
            db.close()
    else:
        import asyncpg

        conn = await asyncpg.connect(url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()


async def test_events_are_append_only(backend: Backend) -> None:
    await (await seeded(backend)).close()
    for sql in ("UPDATE events SET type='x'", "DELETE FROM events"):
        with pytest.raises(Exception, match="append-only"):
            await raw_sql(backend.url, sql)


async def test_a_newer_schema_is_refused(backend: Backend) -> None:
    await (await seeded(backend)).close()
    await raw_sql(backend.url, "INSERT INTO schema_version VALUES (999, 0)")
    with pytest.raises(StoreUnavailable, match="newer than this"):
        await backend.store().open()


async def test_a_database_not_yet_migrated_is_refused_until_db_migrate(postgres_url: str) -> None:
    store = open_store(postgres_url)
    with pytest.raises(StoreUnavailable, match="paysentry db migrate"):
        await store.open()
    await store.close()
    await store.open(migrate=True)
    from proxy.store.postgres import schema_migrations

    assert await store.migrate() == max(v for v, _ in schema_migrations())  # idempotent
    await store.close()


async def test_quorum_votes(backend: Backend) -> None:
    from proxy.model import ApprovalSpec

    store = await seeded(backend)
    now = time.time()
    spec = ApprovalSpec(("alice", "bob", "reviewer:risk"), quorum=2, veto=True)
    for key in ("q1", "q2"):
        await store.record_decision(
            new(key, "hold", approval_id=f"apr_{key}", hold_expires_at=now + 60, approval=spec), now
        )
    first = await store.vote("own_1", "apr_q1", "alice", True, "ok", "cli", now)
    assert first.counted and first.approval.state == "pending"
    again = await store.vote("own_1", "apr_q1", "alice", True, "ok again", "cli", now)
    assert not again.counted and again.approval.state == "pending"  # the same approver counts once
    with pytest.raises(NotAnApprover) as refused:
        await store.vote("own_1", "apr_q1", "mallory", True, "me too", "cli", now)
    assert (refused.value.voter, refused.value.approvers) == ("mallory", ("alice", "bob", "reviewer:risk"))
    with pytest.raises(ApprovalExpired):
        await store.vote("own_1", "apr_q1", "bob", True, "late", "cli", now + 61)
    done = await store.vote("own_1", "apr_q1", "reviewer:risk", True, "low risk", "reviewer", now)
    assert done.approval.state == "approved"
    assert [(v.voter, v.vote, v.via) for v in done.approval.votes] == [
        ("alice", "approve", "cli"),
        ("reviewer:risk", "approve", "reviewer"),
    ]

    await store.vote("own_1", "apr_q2", "alice", True, "ok", "cli", now)
    vetoed = await store.vote("own_1", "apr_q2", "bob", False, "not this vendor", "cli", now)
    assert vetoed.approval.state == "denied"
    assert await spent(store) == (1000, 1)  # the vetoed hold released; the approved one still reserves

    from proxy.approvals import new_link_token

    await store.record_decision(
        new("q3", "hold", approval_id="apr_q3", hold_expires_at=now + 60, approval=spec), now
    )
    token, digest = new_link_token()
    await store.add_links("apr_q3", [(digest, "bob", now + 60)])
    approval, approver, used, _ = await store.find_link(digest)
    assert (approval.id, approver, used) == ("apr_q3", "bob", None)
    result = await store.use_link(digest, True, "via link", now)
    assert result.approval.votes[0].voter == "bob" and result.approval.votes[0].via == "link"
    with pytest.raises(LinkUnusable):
        await store.use_link(digest, True, "replayed", now)  # one time only
    await store.close()


async def test_a_partial_capture_gives_back_the_rest_once_and_a_captured_object_is_never_voided(
    backend: Backend,
) -> None:
    """An intent authorized for 1000 and captured for 600: the 400 the provider gives back is released
    (the payment stays counted) in the transaction that settles the capture, on every store (Redis
    included); a cancellation said of it afterwards releases nothing, since its money moved."""
    store = await seeded(backend)
    now = time.time()
    await store.record_decision(new("create"), now)
    await store.settle("auth_create", "pi_1", 200, b"{}", now)
    await store.record_decision(new("capture", operation="payment_intent.capture", charges=()), now)
    await store.settle("auth_capture", "pi_1", 200, b"{}", now, holds=600)
    await store.settle("auth_capture", "pi_1", 200, b"{}", now, holds=0)  # settled already: nothing more
    assert await spent(store) == (600, 1)
    assert await store.void("own_1", "pi_1", "provider", {}, now) == "recorded"
    assert await spent(store) == (600, 1)
    create = await store.get_authorization("own_1", "auth_create")
    assert create is not None and [c.amount for c in create.charges] == [600]
    kinds = [e.type for e in await store.list_events("own_1", 0, 100)]
    assert kinds.count("authorization.reduced") == 1
    if backend.redis_url:  # the counter a fresh replica reads is rebuilt from the same charges
        reopened = backend.store()
        await reopened.open()
        _, totals = await reopened.lookup("agt_1", "-", [("daily", LIMIT.period)])
        assert totals["daily"] == SpendTotal(600, 1)
        await reopened.close()
    await store.close()


async def test_every_signed_x402_authorization_is_recorded_once_by_nonce(backend: Backend) -> None:
    from proxy.store import X402Signature

    store = await seeded(backend)
    await store.record_decision(new("x402-1"), time.time())
    assert await store.x402_signature("auth_x402-1") is None

    def signature(nonce: str, at: float) -> X402Signature:
        return X402Signature(
            nonce,
            "auth_x402-1",
            "own_1",
            "agt_1",
            "eip155:84532",
            "0xasset",
            "0xpayer",
            "0xpayee",
            10_000,
            0,
            2_000_000_000,
            at,
        )

    await store.record_x402_signature(signature("0x01", 1.0))
    with pytest.raises(DuplicateKey):
        await store.record_x402_signature(signature("0x01", 2.0))
    await store.record_x402_signature(signature("0x02", 3.0))
    latest = await store.x402_signature("auth_x402-1")
    assert latest is not None and latest.nonce == "0x02" and latest.valid_before == 2_000_000_000
    events = [e.type for e in await store.list_events("own_1", 0, 100)]
    assert events.count("x402.signed") == 2


async def test_an_active_approver_name_is_taken_once_and_revocation_is_recorded(backend: Backend) -> None:
    store = await seeded(backend)
    await store.create_approver(ApproverRecord("apv_1", "own_1", "alice", "hash", 1.0), "cli")
    with pytest.raises(ApproverNameTaken):
        await store.create_approver(ApproverRecord("apv_2", "own_1", "alice", "hash", 2.0), "cli")
    assert not await store.revoke_approver("own_2", "apv_1", "owner:other", 3.0)  # not theirs
    assert await store.revoke_approver("own_1", "apv_1", "owner:acme", 3.0)
    assert not await store.revoke_approver("own_1", "apv_1", "owner:acme", 4.0)
    await store.create_approver(ApproverRecord("apv_3", "own_1", "alice", "hash2", 5.0), "cli")  # reissued
    assert [(a.id, a.revoked_at) for a in await store.list_approvers("own_1")] == [
        ("apv_1", 3.0),
        ("apv_3", None),
    ]
    assert await store.list_approvers("own_2") == []
    events = [(e.type, e.actor) for e in await store.list_events("own_1", 0, 100)]
    assert ("approver.created", "cli") in events and ("approver.revoked", "owner:acme") in events
    await store.close()


async def test_a_vote_records_who_authenticated(backend: Backend) -> None:
    from proxy.model import ApprovalSpec

    store = await seeded(backend)
    now = time.time()
    spec = ApprovalSpec(("alice", "bob"), quorum=2)
    await store.record_decision(
        new("v1", "hold", approval_id="apr_v1", hold_expires_at=now + 60, approval=spec), now
    )
    with pytest.raises(NotAnApprover):  # the owner is not among the approvers this hold names
        await store.vote("own_1", "apr_v1", "owner:acme", True, "", "owner_api", now)
    who = {"kind": "approver", "id": "apv_1", "name": "alice", "via": "console"}
    await store.vote("own_1", "apr_v1", "alice", True, "ok", "console", now, who)
    votes = [e for e in await store.list_events("own_1", 0, 100) if e.type == "approval.vote"]
    assert votes[-1].actor == "alice" and votes[-1].data["authenticated"] == who
    await store.close()


async def test_a_hold_queues_its_notifications_in_its_transaction_and_they_are_claimed_once(
    backend: Backend,
) -> None:
    store = await seeded(backend)
    now = time.time()
    hooks = ("https://a.example/hook", "https://b.example/secret-path")
    await store.record_decision(
        new("n1", "hold", approval_id="apr_n1", hold_expires_at=now + 60, notify=hooks), now
    )
    await store.record_decision(new("n2", notify=hooks), now)  # allowed: nothing to announce
    first, second = await asyncio.gather(
        store.claim_notifications(now, 30, 10), store.claim_notifications(now, 30, 10)
    )
    claimed = first + second
    assert sorted(n.url for n in claimed) == sorted(hooks)  # each once, however many race
    assert await store.claim_notifications(now + 1, 30, 10) == []  # leased
    a, b = sorted(claimed, key=lambda n: n.url)
    await store.notification_sent(a.id, True, "", None, now + 1)
    await store.notification_sent(b.id, False, "HTTP 503", now + 5, now + 1)
    assert await store.claim_notifications(now + 4, 30, 10) == []
    again = await store.claim_notifications(now + 5, 30, 10)
    assert [(n.id, n.attempts, n.last_error) for n in again] == [(b.id, 1, "HTTP 503")]
    await store.notification_sent(b.id, False, "ConnectionRefused", None, now + 6)  # given up
    shown = {n.url: (n.state, n.attempts) for n in await store.list_notifications("own_1", "apr_n1")}
    assert shown == {hooks[0]: ("delivered", 1), hooks[1]: ("failed", 2)}
    assert await store.list_notifications("own_2", None) == []
    failed = [e for e in await store.list_events("own_1", 0, 100) if e.type == "notification.failed"]
    assert len(failed) == 1 and failed[0].data["host"] == "b.example"  # never the URL's secret path
    assert "secret-path" not in str(failed[0].data)
    await store.close()


async def test_an_approved_hold_never_retried_expires_and_releases_once(backend: Backend) -> None:
    store = await seeded(backend)
    now = time.time()
    for key in ("r1", "r2"):
        await store.record_decision(new(key, "hold", approval_id=f"apr_{key}", hold_expires_at=now + 60), now)
        await store.vote("own_1", f"apr_{key}", "owner:acme", True, "ok", "cli", now)
    assert await spent(store) == (2000, 2)
    assert await store.start_forwarding("auth_r2", now + 60, now)  # r2's agent retried
    assert await store.expire_approved(now - 1, now) == 0  # not yet past the window
    ended = await asyncio.gather(store.expire_approved(now, now + 1), store.expire_approved(now, now + 1))
    assert sum(ended) == 1 and await spent(store) == (1000, 1)
    assert (await store.get_authorization("own_1", "auth_r1")).state == "expired"
    assert not await store.start_forwarding("auth_r1", now + 60, now + 2)  # a late retry does not pay
    await store.close()


async def test_an_objects_record_is_its_largest_settled_call_and_pending_calls_on_it_are_found(
    backend: Backend,
) -> None:
    """What a lifecycle call on an object is decided against: the object's maker (never a write PaySentry
    did not recognize), its largest settled call (an increment raises it), and any call on it whose
    outcome is still unknown."""
    store = await seeded(backend)
    now = time.time()
    await store.create_agent(AgentRecord("agt_2", "own_1", "conn_1", "other", {}, "hash", 1.0))
    made = (await store.record_decision(new("mk", charges=()), now)).record
    await store.settle(made.id, "pi_9", 200, b"{}", now)
    raised = new("inc", charges=(), amount=4000, operation="payment_intent.increment_authorization")
    raised = replace(raised, payment={"refers_to": "pi_9"})
    await store.settle((await store.record_decision(raised, now + 1)).record.id, "pi_9", 200, b"{}", now + 1)
    write = new("upd", charges=(), agent_id="agt_2", operation="unrecognized", amount=0)
    await store.settle((await store.record_decision(write, now + 2)).record.id, "ch_9", 200, b"{}", now + 2)
    assert await store.maker_of("own_1", "pi_9") == "agt_1"
    assert await store.maker_of("own_1", "ch_9") is None  # an unrecognized write makes nobody its maker
    largest = await store.find_by_provider_ref("own_1", "pi_9")
    assert largest is not None and largest.amount == 4000
    assert await store.unresolved_on("own_1", "pi_9") is None
    capture = replace(
        new("cap", charges=(), operation="payment_intent.capture"), payment={"refers_to": "pi_9"}
    )
    pending = (await store.record_decision(capture, now + 3)).record  # forwarding: its answer not in yet
    found = await store.unresolved_on("own_1", "pi_9")
    assert found is not None and found.id == pending.id
    assert await store.unresolved_on("own_2", "pi_9") is None
    await store.close()
