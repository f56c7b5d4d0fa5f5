"""Stripe-style pages from every store (SQLite, PostgreSQL, PostgreSQL+Redis): newest first, filters,
``starting_after`` / ``ending_before`` cursors and ``has_more``, for authorizations, holds, agents,
approvers and events alike."""

from __future__ import annotations

import pytest

from proxy.store import AgentRecord, ApproverRecord, Page, Store, UnknownCursor
from tests.conftest import Backend
from tests.integration.test_store_conformance import new, seeded


async def walk(read, page: Page) -> list[str]:  # type: ignore[no-untyped-def]
    """Every id, page after page, following ``starting_after`` until ``has_more`` is false."""
    seen: list[str] = []
    while True:
        rows, more = await read("own_1", page)
        seen += [r.id for r in rows]
        if not more:
            return seen
        page = Page(state=page.state, limit=page.limit, starting_after=rows[-1].id)


async def test_authorizations_page_newest_first_both_ways_with_filters(backend: Backend) -> None:
    store: Store = await seeded(backend)
    for i in range(7):
        await store.record_decision(new(f"p{i}", "deny" if i % 3 == 0 else "allow", charges=()), 100.0 + i)
    newest_first = [f"auth_p{i}" for i in range(6, -1, -1)]
    assert await walk(store.page_authorizations, Page(limit=3)) == newest_first
    first, more = await store.page_authorizations("own_1", Page(limit=3))
    assert [a.id for a in first] == newest_first[:3] and more
    back, more = await store.page_authorizations("own_1", Page(limit=2, ending_before="auth_p2"))
    assert [a.id for a in back] == ["auth_p4", "auth_p3"] and more  # the two just newer, newest first
    denied, more = await store.page_authorizations("own_1", Page(decision="deny"))
    assert [a.id for a in denied] == ["auth_p6", "auth_p3", "auth_p0"] and not more
    ranged, _ = await store.page_authorizations("own_1", Page(created_gte=102.0, created_lt=104.0))
    assert [a.id for a in ranged] == ["auth_p3", "auth_p2"]
    with pytest.raises(UnknownCursor) as unknown:
        await store.page_authorizations("own_1", Page(starting_after="auth_nope"))
    assert unknown.value.param == "starting_after"
    with pytest.raises(UnknownCursor):  # another owner's object is no cursor either
        await store.page_authorizations("own_2", Page(ending_before="auth_p2"))
    assert await store.page_authorizations("own_2", Page()) == ([], False)  # another owner sees nothing
    await store.close()


async def test_holds_page_by_state_and_agent(backend: Backend) -> None:
    store: Store = await seeded(backend)
    for i in range(3):
        hold = new(f"h{i}", "hold", charges=(), approval_id=f"apr_{i}", hold_expires_at=1e12)
        await store.record_decision(hold, 200.0 + i)
    rows, more = await store.page_approvals("own_1", Page(state="pending", limit=2))
    assert [a.id for a in rows] == ["apr_2", "apr_1"] and more
    assert await walk(store.page_approvals, Page(state="pending", limit=2)) == ["apr_2", "apr_1", "apr_0"]
    assert (await store.page_approvals("own_1", Page(state="approved")))[0] == []
    assert len((await store.page_approvals("own_1", Page(agent_id="agt_1")))[0]) == 3
    assert (await store.page_approvals("own_1", Page(agent_id="agt_other")))[0] == []
    await store.close()


async def test_agents_and_approvers_page_with_their_state(backend: Backend) -> None:
    store: Store = await seeded(backend)
    for i in range(2, 5):
        await store.create_agent(AgentRecord(f"agt_{i}", "own_1", "conn_1", f"bot{i}", {}, "hash", float(i)))
        await store.create_approver(ApproverRecord(f"apv_{i}", "own_1", f"alice{i}", "hash", float(i)), "t")
    assert await store.revoke_agent("own_1", "agt_3", "test", 9.0)
    assert await store.revoke_approver("own_1", "apv_3", "test", 9.0)
    assert await walk(store.page_agents, Page(limit=2)) == ["agt_4", "agt_3", "agt_2", "agt_1"]
    assert await walk(store.page_agents, Page(state="active", limit=1)) == ["agt_4", "agt_2", "agt_1"]
    assert [a.id for a in (await store.page_agents("own_1", Page(state="revoked")))[0]] == ["agt_3"]
    assert await walk(store.page_approvers, Page(limit=1)) == ["apv_4", "apv_3", "apv_2"]
    assert [a.id for a in (await store.page_approvers("own_1", Page(state="active")))[0]] == [
        "apv_4",
        "apv_2",
    ]
    await store.close()


async def test_events_page_by_sequence_and_type(backend: Backend) -> None:
    store: Store = await seeded(backend)
    for i in range(4):
        await store.record_event("own_1", None, None, f"test.e{i}", "test", {"i": i}, 300.0 + i)
    rows, more = await store.page_events("own_1", Page(kind="test.", limit=3))
    assert [e.type for e in rows] == ["test.e3", "test.e2", "test.e1"] and more
    rest, more = await store.page_events("own_1", Page(kind="test.", starting_after=str(rows[-1].seq)))
    assert [e.type for e in rest] == ["test.e0"] and not more
    newer, _ = await store.page_events("own_1", Page(kind="test.", ending_before=str(rest[0].seq), limit=2))
    assert [e.type for e in newer] == ["test.e2", "test.e1"]
    await store.close()


async def test_an_event_cursor_must_be_one_of_the_owners_events(backend: Backend) -> None:
    store: Store = await seeded(backend)
    await store.record_event("own_1", None, None, "test.one", "t", {}, 1.0)
    (mine,), _ = await store.page_events("own_1", Page(kind="test.", limit=1))
    with pytest.raises(UnknownCursor):
        await store.page_events("own_1", Page(starting_after=str(mine.seq + 10_000)))
    with pytest.raises(UnknownCursor):  # another owner's event is no cursor either
        await store.page_events("own_2", Page(ending_before=str(mine.seq)))
    await store.close()
