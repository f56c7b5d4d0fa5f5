"""The declared state applied to every real store: created once, idempotent, rotated, revoked when removed,
each change in the audit log, and nothing made by hand touched."""

from __future__ import annotations

import base64
import json
import os
import textwrap
from pathlib import Path

import pytest

from proxy.errors import ConfigError
from proxy.secrets import Sealer, check_secret, issue_token, sealed_context
from proxy.state import StateApplier, StateConflict, load_state
from proxy.store import AgentRecord, ApproverRecord, Store
from tests.conftest import Backend

ENV = {"STRIPE_KEY": "sk_test_declared_1"}


def token(public_id: str) -> str:
    return issue_token("psk", public_id, 4).token


def write_state(root: Path, agents: str = "", connections: str = "", owners: str = "") -> Path:
    (root / "state.yaml").write_text(
        textwrap.dedent("""
        owners:
          - name: acme
            connections:
              - name: default
                provider: stripe
                upstream: http://127.0.0.1:9
                credentials: {secret_key: {env: STRIPE_KEY}}
        """)
        + textwrap.indent(textwrap.dedent(connections), "      ")
        + "    agents:\n"
        + textwrap.indent(textwrap.dedent(agents), "      ")
        + owners
    )
    return root / "state.yaml"


BOT = """
- name: bot
  labels: {team: ads}
  token: {file: bot.token}
"""


@pytest.fixture
async def store(backend: Backend) -> Store:
    s = backend.store()
    await s.open(migrate=True)
    yield s  # type: ignore[misc]
    await s.close()


def applier(store: Store, forgotten: list[str] | None = None) -> StateApplier:
    sealer = Sealer([("k1", base64.b64decode(KEY))])
    return StateApplier(store, sealer, 4, forget_agent=(forgotten if forgotten is not None else []).append)


KEY = base64.b64encode(os.urandom(32)).decode()


async def events(store: Store, owner_id: str) -> list[tuple[str, str]]:
    return [(e.type, e.actor) for e in await store.list_events(owner_id, 0, 1000)]


async def test_a_declared_state_is_created_once_with_the_supplied_token(store: Store, tmp_path: Path) -> None:
    supplied = token("agt_00112233445566aa")
    (tmp_path / "bot.token").write_text(supplied + "\n")
    state, _ = load_state(str(write_state(tmp_path, BOT)), ENV)
    changes = await applier(store).apply(state)
    assert [str(c) for c in changes] == [
        "owner acme/acme: created",
        "connection acme/default: created",
        "agent acme/bot: created",
    ]
    owner = await store.find_owner("acme")
    assert owner is not None
    agent = await store.get_agent("agt_00112233445566aa")
    assert agent is not None and agent.name == "bot" and dict(agent.labels) == {"team": "ads"}
    assert check_secret(supplied.split("_", 2)[2], agent.token_hash)
    assert supplied not in json.dumps([e.data for e in await store.list_events(owner.id, 0, 100)])
    recorded = await events(store, owner.id)
    assert recorded == [
        ("owner.created", "state:state.yaml"),
        ("connection.added", "state:state.yaml"),
        ("agent.created", "state:state.yaml"),
    ]
    # applying again (a fresh applier: another replica, or a restart) changes and records nothing
    assert await applier(store).apply(state) == []
    assert await events(store, owner.id) == recorded


async def test_a_rotated_secret_takes_effect_and_a_new_id_is_refused(store: Store, tmp_path: Path) -> None:
    first = token("agt_00112233445566bb")
    (tmp_path / "bot.token").write_text(first)
    path = str(write_state(tmp_path, BOT))
    forgotten: list[str] = []
    await applier(store).apply(load_state(path, ENV)[0])
    rotated = token("agt_00112233445566bb")
    (tmp_path / "bot.token").write_text(rotated)
    changes = await applier(store, forgotten).apply(load_state(path, ENV)[0])
    assert [str(c) for c in changes] == ["agent acme/bot: token_rotated"]
    assert forgotten == ["agt_00112233445566bb"]  # this process's token cache drops the old one at once
    agent = await store.get_agent("agt_00112233445566bb")
    assert agent is not None and agent.revoked_at is None
    assert check_secret(rotated.split("_", 2)[2], agent.token_hash)
    assert not check_secret(first.split("_", 2)[2], agent.token_hash)
    (tmp_path / "bot.token").write_text(token("agt_99112233445566bb"))
    with pytest.raises(StateConflict, match="must keep that id"):
        await applier(store).apply(load_state(path, ENV)[0])
    assert (await store.get_agent("agt_00112233445566bb")).token_hash == agent.token_hash  # type: ignore[union-attr]


async def test_removing_entries_revokes_them_and_leaves_what_the_cli_made(
    store: Store, tmp_path: Path
) -> None:
    (tmp_path / "bot.token").write_text(token("agt_00112233445566cc"))
    (tmp_path / "ops.token").write_text(token("agt_00112233445566cd"))
    extra = "- name: spare\n  provider: mock\n  credentials: {secret_key: {env: STRIPE_KEY}}\n"
    ops = BOT + "- name: ops\n  connection: spare\n  token: {file: ops.token}\n"
    path = write_state(tmp_path, ops, extra)
    await applier(store).apply(load_state(str(path), ENV)[0])
    owner = await store.find_owner("acme")
    assert owner is not None
    connection = await store.find_connection(owner.id, "default")
    assert connection is not None
    handmade = AgentRecord("agt_hand", owner.id, connection.id, "handmade", {}, "x", 1.0)
    await store.create_agent(handmade)
    changes = await applier(store).apply(load_state(str(write_state(tmp_path, BOT)), ENV)[0])
    assert sorted(str(c) for c in changes) == ["agent acme/ops: revoked", "connection acme/spare: revoked"]
    assert (await store.get_agent("agt_00112233445566cd")).revoked_at is not None  # type: ignore[union-attr]
    assert (await store.get_agent("agt_hand")).revoked_at is None  # type: ignore[union-attr]
    assert await store.find_connection(owner.id, "spare") is None
    # the owner removed: its token voided, every agent and connection revoked
    (tmp_path / "state.yaml").write_text("owners: []\n")
    changes = await applier(store).apply(load_state(str(tmp_path / "state.yaml"), ENV)[0])
    assert [str(c) for c in changes] == ["owner acme/acme: revoked"]
    assert all(a.revoked_at is not None for a in await store.list_agents(owner.id))
    assert await store.list_connections(owner.id) == []
    types = [t for t, _ in await events(store, owner.id)]
    assert types.count("agent.revoked") == 3 and "owner.revoked" in types and "connection.revoked" in types


async def test_changed_credentials_are_resealed_and_a_restored_connection_comes_back(
    store: Store, tmp_path: Path
) -> None:
    (tmp_path / "bot.token").write_text(token("agt_00112233445566dd"))
    path = str(write_state(tmp_path, BOT))
    sealer_applier = applier(store)
    await sealer_applier.apply(load_state(path, ENV)[0])
    changes = await sealer_applier.apply(load_state(path, {"STRIPE_KEY": "sk_test_rotated"})[0])
    assert [str(c) for c in changes] == ["connection acme/default: updated"]
    owner = await store.find_owner("acme")
    connection = await store.find_connection(owner.id, "default")  # type: ignore[union-attr]
    assert connection is not None
    opened = sealer_applier.sealer.open(connection.credentials, sealed_context("connection", connection.id))
    assert json.loads(opened) == {"secret_key": "sk_test_rotated"}
    assert await sealer_applier.apply(load_state(path, {"STRIPE_KEY": "sk_test_rotated"})[0]) == []


async def test_a_generated_token_is_written_once_and_kept(store: Store, tmp_path: Path) -> None:
    path = str(write_state(tmp_path, "- name: bot\n  token: {generate: out/bot.token}\n"))
    assert [c.change for c in await applier(store).apply(load_state(path, ENV)[0])][-1] == "created"
    written = (tmp_path / "out" / "bot.token").read_text().strip()
    assert (tmp_path / "out" / "bot.token").stat().st_mode & 0o777 == 0o600
    agent_id = "agt_" + written.split("_")[1]
    agent = await store.get_agent(agent_id)
    assert agent is not None and check_secret(written.split("_", 2)[2], agent.token_hash)
    assert await applier(store).apply(load_state(path, ENV)[0]) == []
    assert (tmp_path / "out" / "bot.token").read_text().strip() == written


def approver_token(approver_id: str) -> str:
    return issue_token("psa", approver_id, 4).token


APPROVERS = "    approvers:\n      - {name: alice, token: {file: alice.token}}\n      - {name: bob, token: {env: BOB}}\n"


async def test_declared_approvers_get_their_tokens_rotate_and_are_revoked_when_removed(
    store: Store, tmp_path: Path
) -> None:
    """Approvers are principals like agents: made once with the token from their Secret (stored as id
    and hash), rotated in place, revoked when they leave the file; one made by hand is left alone."""
    (tmp_path / "bot.token").write_text(token("agt_00112233445566ee"))
    alice, bob = approver_token("apv_00112233445566a1"), approver_token("apv_00112233445566b0")
    (tmp_path / "alice.token").write_text(alice)
    env = {**ENV, "BOB": bob}
    path = str(write_state(tmp_path, BOT, owners=APPROVERS))
    changes = await applier(store).apply(load_state(path, env)[0])
    assert [str(c) for c in changes][-2:] == ["approver acme/alice: created", "approver acme/bob: created"]
    owner = await store.find_owner("acme")
    assert owner is not None
    made = await store.get_approver("apv_00112233445566a1")
    assert made is not None and made.name == "alice" and check_secret(alice.split("_", 2)[2], made.token_hash)
    await store.create_approver(ApproverRecord("apv_hand", owner.id, "carol", "x", 1.0), "owner")
    assert await applier(store).apply(load_state(path, env)[0]) == []  # idempotent, another replica too
    recorded = await events(store, owner.id)
    # a rotated Secret: the new hash stored, this process's cache told, the old token dead
    rotated = approver_token("apv_00112233445566a1")
    (tmp_path / "alice.token").write_text(rotated)
    forgotten: list[str] = []
    rotating = applier(store)
    rotating.forget_approver = forgotten.append
    assert [str(c) for c in await rotating.apply(load_state(path, env)[0])] == [
        "approver acme/alice: token_rotated"
    ]
    assert forgotten == ["apv_00112233445566a1"]
    now = await store.get_approver("apv_00112233445566a1")
    assert now is not None and check_secret(rotated.split("_", 2)[2], now.token_hash)
    assert not check_secret(alice.split("_", 2)[2], now.token_hash)
    assert (await events(store, owner.id))[len(recorded) :] == [
        ("approver.token_rotated", "state:state.yaml")
    ]
    (tmp_path / "alice.token").write_text(approver_token("apv_99112233445566a1"))
    with pytest.raises(StateConflict, match="must keep that id"):
        await applier(store).apply(load_state(path, env)[0])
    # bob leaves the file: revoked; carol (made by hand) stays
    (tmp_path / "alice.token").write_text(rotated)
    only_alice = "    approvers:\n      - {name: alice, token: {file: alice.token}}\n"
    changes = await applier(store).apply(
        load_state(str(write_state(tmp_path, BOT, owners=only_alice)), env)[0]
    )
    assert [str(c) for c in changes] == ["approver acme/bob: revoked"]
    assert (await store.get_approver("apv_00112233445566b0")).revoked_at is not None  # type: ignore[union-attr]
    assert (await store.get_approver("apv_hand")).revoked_at is None  # type: ignore[union-attr]
    # the owner removed: its approvers go with it
    (tmp_path / "state.yaml").write_text("owners: []\n")
    await applier(store).apply(load_state(str(tmp_path / "state.yaml"), env)[0])
    assert all(a.revoked_at is not None for a in await store.list_approvers(owner.id))


def test_groups_and_reviewers_are_sent_to_the_policy_files(tmp_path: Path) -> None:
    groups = "    approvers: {finance: [alice, bob]}\n    reviewers: {risk: {url: 'http://risk:8000/r'}}\n"
    with pytest.raises(ConfigError) as err:
        load_state(str(write_state(tmp_path, "", owners=groups)), ENV)
    text = "\n".join(err.value.problems)
    assert "groups of approvers go under groups: in the policy files" in text
    assert "declare them under reviewers: in the policy file" in text
    bad = "    approvers:\n      - {name: 'owner:acme', token: {env: STRIPE_KEY}}\n      - {name: dan}\n"
    with pytest.raises(ConfigError) as err:
        load_state(str(write_state(tmp_path, "", owners=bad)), ENV)
    text = "\n".join(err.value.problems)
    assert "an approver's name is letters" in text and "needs a token" in text


def test_every_problem_is_reported_at_once_and_secrets_are_never_inline(tmp_path: Path) -> None:
    (tmp_path / "state.yaml").write_text(
        textwrap.dedent("""
        owners:
          - name: acme
            connections:
              - {name: default, provider: stripe, credentials: {secret_key: sk_live_inline}}
              - {name: other, provider: nope, credentials: {secret_key: {env: STRIPE_KEY}}}
            agents:
              - {name: bot, connection: missing, token: {file: absent.token}}
              - {name: bot2, token: {env: NOT_SET}}
              - {name: bot3, token: {env: STRIPE_KEY}}
        """)
    )
    with pytest.raises(ConfigError) as err:
        load_state(str(tmp_path / "state.yaml"), ENV)
    text = "\n".join(err.value.problems)
    assert "never inline" in text and "unknown provider 'nope'" in text
    assert "cannot read" in text and "NOT_SET is not set" in text and "not a PaySentry token" in text
    assert "no connection 'missing' declared" in text
    assert "sk_live_inline" not in text and ENV["STRIPE_KEY"] not in text


async def test_a_principal_revoked_by_its_owner_stays_revoked_and_the_file_still_applies(
    store: Store, tmp_path: Path
) -> None:
    """An owner revokes a compromised agent and an approver with the owner API, not in git: the next
    apply (a restart, another replica) keeps both revoked and applies the rest instead of refusing."""
    (tmp_path / "bot.token").write_text(token("agt_00112233445566f1"))
    (tmp_path / "alice.token").write_text(approver_token("apv_00112233445566e1"))
    env = {**ENV, "BOB": approver_token("apv_00112233445566e2")}
    path = str(write_state(tmp_path, BOT, owners=APPROVERS))
    await applier(store).apply(load_state(path, env)[0])
    owner = await store.find_owner("acme")
    assert owner is not None
    assert await store.revoke_agent(owner.id, "agt_00112233445566f1", "owner", 5.0)
    assert await store.revoke_approver(owner.id, "apv_00112233445566e1", "owner", 5.0)
    (tmp_path / "ops.token").write_text(token("agt_00112233445566f3"))
    more = BOT + "- name: ops\n  token: {file: ops.token}\n"
    changes = await applier(store).apply(
        load_state(str(write_state(tmp_path, more, owners=APPROVERS)), env)[0]
    )
    assert [str(c) for c in changes] == ["agent acme/ops: created"]
    assert (await store.get_agent("agt_00112233445566f1")).revoked_at == 5.0  # type: ignore[union-attr]
    assert (await store.get_approver("apv_00112233445566e1")).revoked_at == 5.0  # type: ignore[union-attr]
    assert await applier(store).apply(load_state(str(tmp_path / "state.yaml"), env)[0]) == []


async def test_one_owners_conflict_leaves_the_other_owners_applied(store: Store, tmp_path: Path) -> None:
    (tmp_path / "bot.token").write_text(token("agt_00112233445566f4"))
    path = str(write_state(tmp_path, BOT))
    await applier(store).apply(load_state(path, ENV)[0])
    (tmp_path / "bot.token").write_text(token("agt_99112233445566f4"))  # a new id: refused
    (tmp_path / "beta.token").write_text(token("agt_00112233445566f5"))
    beta = textwrap.indent(
        textwrap.dedent("""
        - name: beta
          connections:
            - {name: default, provider: mock, credentials: {secret_key: {env: STRIPE_KEY}}}
          agents:
            - {name: b, token: {file: beta.token}}
        """),
        "  ",
    )
    with pytest.raises(StateConflict, match="must keep that id") as refused:
        await applier(store).apply(load_state(str(write_state(tmp_path, BOT, owners=beta)), ENV)[0])
    assert "agent beta/b: created" in [str(c) for c in refused.value.changes]
    assert (await store.get_agent("agt_00112233445566f5")) is not None
    acme = await store.find_owner("acme")
    assert acme is not None and (await store.get_agent("agt_00112233445566f4")).revoked_at is None  # type: ignore[union-attr]
    assert "owner.revoked" not in [t for t, _ in await events(store, acme.id)]
