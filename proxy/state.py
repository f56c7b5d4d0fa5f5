"""Declared state: owners, their provider connections, agents and approvers in one YAML file that the
sidecar applies at start and again whenever the file, or a file it references, changes.

    owners:
      - name: acme
        token: {file: /etc/paysentry/owner/token}          # optional: pso_<id>_<secret>
        connections:
          - name: default
            provider: stripe
            credentials:                                    # references only: never the secret itself
              secret_key: {env: STRIPE_SECRET_KEY}
              webhook_secret: {file: /etc/paysentry/provider/webhook_secret}
            allowed_accounts: [acct_1]                      # optional
            settings: {}                                    # optional, as the provider describes them
        agents:
          - name: payments-agent
            connection: default
            labels: {team: payments}
            token: {file: /etc/paysentry/agents/payments-agent}   # psk_<id>_<secret>, from a Secret
          - name: reports
            token: {generate: /var/run/paysentry/tokens/reports}  # made once, written there (0600)
        approvers:                                          # the people policies name (approvers: [alice])
          - name: alice
            token: {file: /etc/paysentry/approvers/alice}   # psa_<id>_<secret>, from a Secret

Applying is idempotent: a second run changes nothing and records nothing. What a run creates or changes
is recorded in the audit log like any other change (actor ``state:<file>``). An entry removed from the
file is revoked (an owner's removal revokes its connections and agents and voids its token); objects made
with the CLI or the owner API are never touched unless the file names them (then it adopts them). A
supplied token is stored as its id and the bcrypt hash of its secret; a rotated Secret takes effect on the
next check. A new token must keep the agent's id (``paysentry state token --id agt_...`` makes one): a
new id would be a new agent with no spend counted. Approvers are applied the same way (``apv_`` ids,
``psa_`` tokens). Groups of approvers and automated reviewers are part of a rule's approval: they are
declared in the policy files (``groups:``, ``reviewers:``), which are kept in git and hot-reloaded too.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import yaml

from adapters import REGISTRY
from adapters.base import Adapters
from proxy.errors import ConfigError
from proxy.metrics import Metrics
from proxy.owners import APPROVER_NAME
from proxy.secrets import (
    AGENT_PREFIX,
    APPROVER_PREFIX,
    OWNER_PREFIX,
    Sealer,
    check_secret,
    hash_secret,
    issue_token,
    new_id,
    sealed_context,
    split_token,
)
from proxy.store import AgentRecord, ApproverRecord, ConnectionRecord, OwnerRecord, Store

log = logging.getLogger("paysentry.state")
NAME_MAX = 100


@dataclass(frozen=True, slots=True)
class DeclaredToken:
    """A token from a Secret (``token``), or to be made and written to ``output`` (``generate:``)."""

    token: str = field(default="", repr=False)
    output: str = ""


@dataclass(frozen=True, slots=True)
class DeclaredConnection:
    name: str
    provider: str
    upstream: str
    credentials: Mapping[str, str] = field(repr=False)
    allowed_accounts: tuple[str, ...] = ()
    settings: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DeclaredAgent:
    name: str
    connection: str
    labels: Mapping[str, str]
    token: DeclaredToken


class _Named(Protocol):
    @property
    def name(self) -> str: ...


@dataclass(frozen=True, slots=True)
class DeclaredApprover:
    name: str
    token: DeclaredToken


@dataclass(frozen=True, slots=True)
class DeclaredOwner:
    name: str
    token: DeclaredToken | None
    connections: tuple[DeclaredConnection, ...]
    agents: tuple[DeclaredAgent, ...]
    approvers: tuple[DeclaredApprover, ...] = ()


@dataclass(frozen=True, slots=True)
class DeclaredState:
    source: str
    owners: tuple[DeclaredOwner, ...]


# -- loading --------------------------------------------------------------------------------------------
class _Reader:
    """Reads one state file, collecting every problem (with where it is) before refusing it."""

    def __init__(self, path: str, environ: Mapping[str, str], adapters: Adapters) -> None:
        self.path, self.environ, self.adapters = path, environ, adapters
        self.base = Path(path).resolve().parent
        self.problems: list[str] = []
        self.inputs: list[str] = []  # what the fingerprint covers: every file read, env values' digests

    def problem(self, where: str, text: str) -> None:
        self.problems.append(f"{self.path}: {where}: {text}")

    def mapping(self, node: Any, where: str, allowed: set[str]) -> dict[str, Any]:
        if not isinstance(node, dict):
            self.problem(where, "expected a mapping")
            return {}
        for key in set(node) - allowed:
            self.problem(where, f"unknown field {key!r} (known: {', '.join(sorted(allowed))})")
        return node

    def strings(self, node: Any, where: str) -> dict[str, str]:
        if node is None:
            return {}
        if not isinstance(node, dict) or not all(isinstance(v, str | int | float) for v in node.values()):
            self.problem(where, "expected a mapping of names to strings")
            return {}
        return {str(k): str(v) for k, v in node.items()}

    def name(self, node: Mapping[str, Any], where: str) -> str:
        name = node.get("name")
        if not isinstance(name, str) or not 1 <= len(name) <= NAME_MAX:
            self.problem(where, f"needs a name of 1 to {NAME_MAX} characters")
            return ""
        return name

    def read_file(self, path: str, where: str) -> str | None:
        file = self.base / path
        try:
            text = file.read_text().strip()
        except OSError as exc:
            self.problem(where, f"cannot read {file}: {exc.strerror}")
            return None
        self.inputs.append(f"{file}:{hashlib.sha256(text.encode()).hexdigest()}")
        return text

    def secret(self, node: Any, where: str) -> str | None:
        """A value given as ``{env: NAME}`` or ``{file: PATH}``: never written in the state file itself."""
        if not isinstance(node, dict) or len(node) != 1 or not ({"env", "file"} & set(node)):
            self.problem(where, "give a secret as {env: NAME} or {file: PATH} (a Secret), never inline")
            return None
        if "env" in node:
            value = self.environ.get(str(node["env"]))
            if value is None:
                self.problem(where, f"the environment variable {node['env']} is not set")
                return None
            self.inputs.append(f"env:{node['env']}:{hashlib.sha256(value.encode()).hexdigest()}")
            return value.strip()
        return self.read_file(str(node["file"]), where)

    def token(self, node: Any, prefix: str, where: str) -> DeclaredToken | None:
        if isinstance(node, dict) and set(node) == {"generate"}:
            output = str(self.base / str(node["generate"]))
            existing = Path(output)
            self.inputs.append(f"generate:{output}:{existing.exists()}")
            if existing.exists():  # made by an earlier run: it is the agent's token now
                text = self.read_file(output, where)
                if text is not None and split_token(text, prefix) is None:
                    self.problem(where, f"{output} does not hold a {prefix}_<id>_<secret> token")
                return DeclaredToken(text or "", output)
            return DeclaredToken("", output)
        text = self.secret(node, where)
        if text is None:
            return None
        if split_token(text, prefix) is None:
            self.problem(where, f"not a PaySentry token: expected {prefix}_<16 hex>_<[A-Za-z0-9_-]{{1,64}}>")
            return None
        return DeclaredToken(text)

    def connection(self, node: Any, where: str) -> DeclaredConnection | None:
        fields = {"name", "provider", "upstream", "credentials", "allowed_accounts", "settings"}
        node = self.mapping(node, where, fields)
        name, provider = self.name(node, where), str(node.get("provider", ""))
        where = f"{where} ({name})"
        try:
            adapter = self.adapters.adapter(provider)
            settings = self.strings(node.get("settings"), f"{where}: settings")
            adapter.configured(settings)
        except ValueError as exc:
            self.problem(where, str(exc))
            return None
        credentials = self.credentials(node.get("credentials"), f"{where}: credentials")
        upstream = str(node.get("upstream") or adapter.default_upstream)
        if not upstream.startswith(("http://", "https://")):
            self.problem(where, f"upstream {upstream!r} is not an http(s) URL")
        accounts = node.get("allowed_accounts") or []
        if not isinstance(accounts, list) or not all(isinstance(a, str) for a in accounts):
            self.problem(where, "allowed_accounts: expected a list of account ids")
            accounts = []
        if credentials is None or not name:
            return None
        return DeclaredConnection(name, provider, upstream, credentials, tuple(accounts), settings)

    def credentials(self, node: Any, where: str) -> dict[str, str] | None:
        if isinstance(node, dict) and set(node) == {"file"}:  # a JSON file, as `provider add` takes
            text = self.read_file(str(node["file"]), where)
            if text is None:
                return None
            try:
                loaded = json.loads(text) if text.startswith("{") else {"secret_key": text}
            except ValueError:
                self.problem(where, "the credentials file is neither JSON nor a key alone")
                return None
            values: dict[str, str] | None = {str(k): str(v) for k, v in loaded.items()}
        elif isinstance(node, dict):
            values = {}
            for key, ref in node.items():
                value = self.secret(ref, f"{where}: {key}")
                if value is None:
                    values = None
                elif values is not None:
                    values[str(key)] = value
        else:
            self.problem(where, "expected {secret_key: {env: NAME}, ...} or {file: PATH}")
            return None
        if values is not None and not values.get("secret_key"):
            self.problem(where, "needs a secret_key (the provider's secret key or access token)")
            return None
        return values

    def agent(self, node: Any, where: str) -> DeclaredAgent | None:
        node = self.mapping(node, where, {"name", "connection", "labels", "token"})
        name = self.name(node, where)
        where = f"{where} ({name})"
        labels = self.strings(node.get("labels"), f"{where}: labels")
        if "token" not in node:
            self.problem(where, "needs a token: {file: PATH}, {env: NAME} or {generate: PATH}")
            return None
        token = self.token(node["token"], AGENT_PREFIX, f"{where}: token")
        if token is None or not name:
            return None
        return DeclaredAgent(name, str(node.get("connection", "default")), labels, token)

    def approver(self, node: Any, where: str) -> DeclaredApprover | None:
        node = self.mapping(node, where, {"name", "token"})
        name = self.name(node, where)
        if name and not APPROVER_NAME.fullmatch(name):
            self.problem(
                where, f"{name!r}: an approver's name is letters, digits or . _ @ + - (as policies name them)"
            )
            name = ""
        where = f"{where} ({name})"
        if "token" not in node:
            self.problem(where, "needs a token: {file: PATH}, {env: NAME} or {generate: PATH}")
            return None
        token = self.token(node["token"], APPROVER_PREFIX, f"{where}: token")
        if token is None or not name:
            return None
        return DeclaredApprover(name, token)

    def approvers(self, node: Mapping[str, Any], where: str) -> list[DeclaredApprover | None]:
        if "reviewers" in node:
            self.problem(
                f"{where}: reviewers",
                "automated reviewers are part of a rule's approval: declare them under reviewers: in the "
                "policy file whose rules name them",
            )
        listed = node.get("approvers") or []
        if not isinstance(listed, list):
            self.problem(
                f"{where}: approvers",
                "expected a list of approvers, each {name, token}; groups of approvers go under groups: in "
                "the policy files",
            )
            return []
        return [self.approver(a, f"{where}: approvers[{i}]") for i, a in enumerate(listed)]

    def owner(self, node: Any, where: str) -> DeclaredOwner | None:
        fields = {"name", "token", "connections", "agents", "approvers", "reviewers"}
        node = self.mapping(node, where, fields)
        name = self.name(node, where)
        where = f"owners ({name})"
        token = self.token(node["token"], OWNER_PREFIX, f"{where}: token") if "token" in node else None
        connections = [
            self.connection(c, f"{where}: connections[{i}]")
            for i, c in enumerate(node.get("connections") or [])
        ]
        agents = [self.agent(a, f"{where}: agents[{i}]") for i, a in enumerate(node.get("agents") or [])]
        approvers = self.approvers(node, where)
        known = {c.name for c in connections if c is not None}
        self.unique([c.name for c in connections if c], f"{where}: connections")
        self.unique([a.name for a in agents if a], f"{where}: agents")
        self.unique([a.name for a in approvers if a], f"{where}: approvers")
        for node_agent in node.get("agents") or []:  # every reference, even of an agent refused above
            wanted = str(node_agent.get("connection", "default")) if isinstance(node_agent, dict) else ""
            if isinstance(node_agent, dict) and wanted not in known:
                agent_name = node_agent.get("name")
                self.problem(f"{where}: agent {agent_name}", f"no connection {wanted!r} declared")
        if not name or None in connections or None in agents or None in approvers:
            return None
        return DeclaredOwner(
            name,
            token,
            tuple(c for c in connections if c),
            tuple(a for a in agents if a),
            tuple(a for a in approvers if a),
        )

    def unique(self, names: list[str], where: str) -> None:
        for duplicate in sorted({n for n in names if names.count(n) > 1}):
            self.problem(where, f"{duplicate!r} is declared twice")


def load_state(
    path: str, environ: Mapping[str, str] | None = None, adapters: Adapters = REGISTRY
) -> tuple[DeclaredState, str]:
    """The state ``path`` declares, and a fingerprint of everything it was read from (the file, each
    file it references, each variable's value digest). Raises ``ConfigError`` with every problem."""
    reader = _Reader(path, os.environ if environ is None else environ, adapters)
    try:
        text = Path(path).read_text()
        doc = yaml.safe_load(text) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError([f"{path}: {exc}"]) from None
    reader.inputs.append(hashlib.sha256(text.encode()).hexdigest())
    doc = reader.mapping(doc, "state", {"owners"})
    owners = [reader.owner(o, f"owners[{i}]") for i, o in enumerate(doc.get("owners") or [])]
    reader.unique([o.name for o in owners if o], "owners")
    tokens = [t.token.split("_")[1] for o in owners if o for t in _tokens(o) if t.token]
    reader.unique(tokens, "tokens (the same id is declared twice)")
    if reader.problems:
        raise ConfigError(reader.problems)
    state = DeclaredState(str(Path(path).resolve()), tuple(o for o in owners if o))
    return state, hashlib.sha256("\n".join(reader.inputs).encode()).hexdigest()


def _tokens(owner: DeclaredOwner) -> list[DeclaredToken]:
    tokens = [owner.token, *(a.token for a in owner.agents), *(a.token for a in owner.approvers)]
    return [t for t in tokens if t is not None]


def fingerprint(path: str, environ: Mapping[str, str] | None = None) -> str:
    """Changes when the state or anything it references changes; a file that fails to load has its own."""
    try:
        return load_state(path, environ)[1]
    except ConfigError as exc:
        return "invalid:" + hashlib.sha256(exc.message.encode()).hexdigest()


# -- applying ---------------------------------------------------------------------------------------------
class StateConflict(Exception):
    """The declared state cannot be applied as it stands (an owner's or agent's token names another id).
    ``changes``: what the rest of the file changed (the other owners are applied all the same)."""

    def __init__(self, message: str, changes: Sequence[Change] = ()) -> None:
        super().__init__(message)
        self.changes = list(changes)


class _RevokedOutside(Exception):  # noqa: N818 - a signal within the applier, never raised out of it
    """A declared agent or approver was revoked through the owner API or the CLI: it stays revoked."""

    def __init__(self, record: AgentRecord | ApproverRecord) -> None:
        self.record = record


@dataclass(frozen=True, slots=True)
class Change:
    owner: str
    kind: str  # owner, connection, agent, approver
    name: str
    change: str  # created, updated, token_rotated, revoked, adopted

    def __str__(self) -> str:
        return f"{self.kind} {self.owner}/{self.name}: {self.change}"


class StateApplier:
    """Makes the store match a ``DeclaredState``; the caches of this process are told what changed."""

    def __init__(
        self,
        store: Store,
        sealer: Sealer,
        rounds: int,
        *,
        forget_agent: Callable[[str], None] = lambda agent_id: None,
        forget_owner: Callable[[str], None] = lambda owner_id: None,
        forget_connection: Callable[[str], None] = lambda connection_id: None,
        forget_approver: Callable[[str], None] = lambda approver_id: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store, self.sealer, self.rounds, self.clock = store, sealer, rounds, clock
        self.forget_agent, self.forget_owner = forget_agent, forget_owner
        self.forget_connection, self.forget_approver = forget_connection, forget_approver

    async def apply(self, state: DeclaredState) -> list[Change]:
        self.actor = f"state:{Path(state.source).name}"
        self.source = state.source
        changes: list[Change] = []
        kept: set[str] = set()
        conflicts: list[str] = []
        for declared in state.owners:  # one owner's conflict leaves the others applied
            try:
                owner = await self._owner(declared, changes)
                kept.add(owner.id)
                connections = await self._connections(owner, declared, changes)
                await self._agents(owner, declared, connections, changes)
                await self._approvers(owner, declared, changes)
            except StateConflict as exc:
                conflicts.append(str(exc))
                existing = await self.store.find_owner(declared.name)
                if existing is not None:
                    kept.add(existing.id)  # still declared: never revoked for a conflict in its entry
        for owner_id, _, _ in await self.store.declared("owner"):
            if owner_id not in kept:
                await self._revoke_owner(owner_id, changes)
        if conflicts:
            raise StateConflict("; ".join(conflicts), changes)
        return changes

    # owners
    async def _owner(self, declared: DeclaredOwner, changes: list[Change]) -> OwnerRecord:
        owner = await self.store.find_owner(declared.name)
        wanted = declared.token
        if owner is None:
            owner_id = _id_of(wanted.token, "own") if wanted and wanted.token else new_id("own")
            token, digest = await self._token(OWNER_PREFIX, owner_id, wanted)
            owner = OwnerRecord(owner_id, declared.name, digest, self.clock())
            await self.store.create_owner(owner, self.actor)
            changes.append(Change(declared.name, "owner", declared.name, "created"))
        elif wanted is not None:
            if wanted.token and _id_of(wanted.token, "own") != owner.id:
                raise StateConflict(
                    f"owner {declared.name} is {owner.id}: its token must be pso_{owner.id[4:]}_<secret> "
                    "(paysentry state token --id " + owner.id + ")"
                )
            if not await self._matches(wanted, owner.token_hash):
                _, digest = await self._token(OWNER_PREFIX, owner.id, wanted)
                await self.store.update_owner_token(owner.id, digest, self.clock(), self.actor)
                self.forget_owner(owner.id)
                changes.append(Change(declared.name, "owner", declared.name, "token_rotated"))
        await self._declare("owner", owner.id, owner.id, declared.name)
        return owner

    async def _revoke_owner(self, owner_id: str, changes: list[Change]) -> None:
        owner = await self.store.get_owner(owner_id)
        now = self.clock()
        if owner is not None:
            void = await asyncio.to_thread(issue_token, OWNER_PREFIX, owner_id, self.rounds)
            await self.store.update_owner_token(owner_id, void.hash, now, self.actor, "owner.revoked")
            self.forget_owner(owner_id)
            for agent in await self.store.list_agents(owner_id):
                if agent.revoked_at is None and await self.store.revoke_agent(
                    owner_id, agent.id, self.actor, now
                ):
                    self.forget_agent(agent.id)
            for connection in await self.store.list_connections(owner_id):
                await self.store.revoke_connection(owner_id, connection.id, self.actor, now)
                self.forget_connection(connection.id)
            for approver in await self.store.list_approvers(owner_id):
                if approver.revoked_at is None and await self.store.revoke_approver(
                    owner_id, approver.id, self.actor, now
                ):
                    self.forget_approver(approver.id)
            changes.append(Change(owner.name, "owner", owner.name, "revoked"))
        for kind in ("owner", "connection", "agent", "approver"):
            for row_id, of, _ in await self.store.declared(kind):
                if of == owner_id:
                    await self.store.forget_declared(kind, row_id)

    # connections
    async def _connections(
        self, owner: OwnerRecord, declared: DeclaredOwner, changes: list[Change]
    ) -> dict[str, ConnectionRecord]:
        found: dict[str, ConnectionRecord] = {}
        for wanted in declared.connections:
            record = await self._connection(owner, wanted, changes)
            found[wanted.name] = record
            await self._declare("connection", record.id, owner.id, wanted.name)
        await self._revoke_undeclared(
            "connection", owner, {c.id for c in found.values()}, declared.name, changes
        )
        return found

    async def _connection(
        self, owner: OwnerRecord, wanted: DeclaredConnection, changes: list[Change]
    ) -> ConnectionRecord:
        existing = await self.store.find_connection(owner.id, wanted.name, include_revoked=True)
        if existing is None:
            connection_id = new_id("conn")
            record = self._sealed(owner.id, connection_id, wanted)
            await self.store.add_connection(record, self.actor)
            changes.append(Change(owner.name, "connection", wanted.name, "created"))
            return record
        if existing.provider != wanted.provider:
            raise StateConflict(
                f"connection {owner.name}/{wanted.name} is a {existing.provider} connection: a new provider "
                "needs a new connection name"
            )
        changed = self._connection_changes(existing, wanted)
        if not changed:
            return existing
        record = self._sealed(owner.id, existing.id, wanted)
        if await self.store.update_connection(existing, record, changed, self.actor, self.clock()):
            self.forget_connection(existing.id)
            changes.append(Change(owner.name, "connection", wanted.name, "updated"))
        return record

    def _connection_changes(self, existing: ConnectionRecord, wanted: DeclaredConnection) -> list[str]:
        opened = json.loads(self.sealer.open(existing.credentials, sealed_context("connection", existing.id)))
        differences = {
            "upstream": existing.upstream != wanted.upstream,
            "credentials": opened != dict(wanted.credentials),
            "allowed_accounts": tuple(existing.allowed_accounts) != wanted.allowed_accounts,
            "settings": dict(existing.settings) != dict(wanted.settings),
            "restored": existing.revoked_at is not None,
        }
        return [name for name, differs in differences.items() if differs]

    def _sealed(self, owner_id: str, connection_id: str, wanted: DeclaredConnection) -> ConnectionRecord:
        sealed = self.sealer.seal(
            json.dumps(dict(wanted.credentials)).encode(), sealed_context("connection", connection_id)
        )
        return ConnectionRecord(
            connection_id,
            owner_id,
            wanted.provider,
            wanted.name,
            wanted.upstream,
            sealed,
            self.clock(),
            allowed_accounts=wanted.allowed_accounts,
            settings=dict(wanted.settings),
        )

    # agents
    async def _agents(
        self,
        owner: OwnerRecord,
        declared: DeclaredOwner,
        connections: Mapping[str, ConnectionRecord],
        changes: list[Change],
    ) -> None:
        active = {a.name: a for a in await self.store.list_agents(owner.id) if a.revoked_at is None}

        async def one(wanted: DeclaredAgent) -> AgentRecord:
            return await self._agent(owner, wanted, active.get(wanted.name), connections, changes)

        await self._each("agent", owner, declared.agents, one, changes)

    async def _agent(
        self,
        owner: OwnerRecord,
        wanted: DeclaredAgent,
        existing: AgentRecord | None,
        connections: Mapping[str, ConnectionRecord],
        changes: list[Change],
    ) -> AgentRecord:
        connection_id = connections[wanted.connection].id
        why = "; a new id would start its spend from zero"
        agent_id = await self._principal_id("agt", "agent", owner, wanted.name, wanted.token, existing, why)
        if existing is None:
            _, digest = await self._token(AGENT_PREFIX, agent_id, wanted.token)
            agent = AgentRecord(
                agent_id, owner.id, connection_id, wanted.name, dict(wanted.labels), digest, self.clock()
            )
            await self.store.create_agent(agent, self.actor)
            changes.append(Change(owner.name, "agent", wanted.name, "created"))
            return agent
        return await self._update_agent(owner, wanted, existing, connection_id, changes)

    async def _update_agent(
        self,
        owner: OwnerRecord,
        wanted: DeclaredAgent,
        existing: AgentRecord,
        connection_id: str,
        changes: list[Change],
    ) -> AgentRecord:
        changed = [
            name
            for name, differs in {
                "connection": existing.connection_id != connection_id,
                "labels": dict(existing.labels) != dict(wanted.labels),
            }.items()
            if differs
        ]
        digest = existing.token_hash
        if not await self._matches(wanted.token, existing.token_hash):
            _, digest = await self._token(AGENT_PREFIX, existing.id, wanted.token)
            changed.append("token")
        if not changed:
            return existing
        agent = replace(existing, connection_id=connection_id, labels=dict(wanted.labels), token_hash=digest)
        updated = await self.store.update_agent(existing, agent, changed, self.actor, self.clock())
        self.forget_agent(existing.id)  # also when another replica updated it first
        if updated:
            what = "token_rotated" if changed == ["token"] else "updated"
            changes.append(Change(owner.name, "agent", wanted.name, what))
        return agent

    # approvers
    async def _approvers(self, owner: OwnerRecord, declared: DeclaredOwner, changes: list[Change]) -> None:
        active = {a.name: a for a in await self.store.list_approvers(owner.id) if a.revoked_at is None}

        async def one(wanted: DeclaredApprover) -> ApproverRecord:
            return await self._approver(owner, wanted, active.get(wanted.name), changes)

        await self._each("approver", owner, declared.approvers, one, changes)

    async def _approver(
        self,
        owner: OwnerRecord,
        wanted: DeclaredApprover,
        existing: ApproverRecord | None,
        changes: list[Change],
    ) -> ApproverRecord:
        approver_id = await self._principal_id("apv", "approver", owner, wanted.name, wanted.token, existing)
        if existing is None:
            _, digest = await self._token(APPROVER_PREFIX, approver_id, wanted.token)
            approver = ApproverRecord(approver_id, owner.id, wanted.name, digest, self.clock())
            await self.store.create_approver(approver, self.actor)
            changes.append(Change(owner.name, "approver", wanted.name, "created"))
            return approver
        if await self._matches(wanted.token, existing.token_hash):
            return existing
        _, digest = await self._token(APPROVER_PREFIX, existing.id, wanted.token)
        rotated = await self.store.update_approver_token(existing, digest, self.actor, self.clock())
        self.forget_approver(existing.id)  # also when another replica rotated it first
        if rotated:
            changes.append(Change(owner.name, "approver", wanted.name, "token_rotated"))
        return replace(existing, token_hash=digest)

    # shared steps
    async def _each(
        self,
        kind: str,
        owner: OwnerRecord,
        declared: Sequence[_Named],
        apply_one: Callable[[Any], Awaitable[AgentRecord | ApproverRecord]],
        changes: list[Change],
    ) -> None:
        """Apply each declared agent or approver, mark it as the file's, revoke the file's that are gone."""
        kept = set()
        for wanted in declared:
            try:
                record = await apply_one(wanted)
            except _RevokedOutside as gone:
                record = gone.record
                fields = {"owner": owner.name, "kind": kind, "name": wanted.name, "id": record.id}
                log.warning(
                    "a declared %s was revoked through the owner API or the CLI: it stays revoked; a token "
                    "with a new id in its Secret makes it anew",
                    kind,
                    extra={"fields": fields},
                )
            kept.add(record.id)
            await self._declare(kind, record.id, owner.id, wanted.name)
        await self._revoke_undeclared(kind, owner, kept, owner.name, changes)

    async def _principal_id(
        self,
        kind: str,
        what: str,
        owner: OwnerRecord,
        name: str,
        token: DeclaredToken,
        existing: AgentRecord | ApproverRecord | None,
        why: str = "",
    ) -> str:
        """The id of a declared agent or approver: its existing one (which a supplied token must name), else
        the supplied token's or a new one; an id another record holds is refused."""
        supplied = _id_of(token.token, kind) if token.token else None
        if existing is not None:
            if supplied is not None and supplied != existing.id:
                raise StateConflict(
                    f"{what} {owner.name}/{name} is {existing.id}: a new token must keep that id "
                    f"(paysentry state token --id {existing.id}){why}"
                )
            return existing.id
        chosen = supplied or new_id(kind)
        get = self.store.get_agent if kind == "agt" else self.store.get_approver
        taken = await get(chosen)
        if taken is not None and taken.revoked_at and (taken.owner_id, taken.name) == (owner.id, name):
            raise _RevokedOutside(taken)
        if taken is not None:
            holder = (
                f"another owner's {what}"
                if taken.owner_id != owner.id
                else f"a revoked {what}"
                if taken.revoked_at
                else f"{what} {taken.name}"
            )
            raise StateConflict(
                f"{what} {owner.name}/{name}: the token's id {chosen} belongs to {holder}; make a new token"
            )
        return chosen

    async def _revoke_undeclared(
        self, kind: str, owner: OwnerRecord, kept: set[str], owner_name: str, changes: list[Change]
    ) -> None:
        now = self.clock()
        for row_id, of, name in await self.store.declared(kind):
            if of != owner.id or row_id in kept:
                continue
            if kind == "agent" and await self.store.revoke_agent(owner.id, row_id, self.actor, now):
                self.forget_agent(row_id)
                changes.append(Change(owner_name, kind, name, "revoked"))
            if kind == "connection" and await self.store.revoke_connection(owner.id, row_id, self.actor, now):
                self.forget_connection(row_id)
                changes.append(Change(owner_name, kind, name, "revoked"))
            if kind == "approver" and await self.store.revoke_approver(owner.id, row_id, self.actor, now):
                self.forget_approver(row_id)
                changes.append(Change(owner_name, kind, name, "revoked"))
            await self.store.forget_declared(kind, row_id)

    async def _declare(self, kind: str, row_id: str, owner_id: str, name: str) -> None:
        if (row_id, owner_id, name) not in await self.store.declared(kind):
            await self.store.set_declared(kind, row_id, owner_id, self.source, name, self.clock())

    async def _matches(self, wanted: DeclaredToken, stored_hash: str) -> bool:
        """Whether the declared token is the stored one (a token to generate never is)."""
        if not wanted.token:
            return False
        secret = wanted.token.split("_", 2)[2]
        return await asyncio.to_thread(check_secret, secret, stored_hash)

    async def _token(self, prefix: str, public_id: str, wanted: DeclaredToken | None) -> tuple[str, str]:
        """(token, bcrypt hash of its secret): the declared token's, or a new one (written to the
        ``generate`` path first, so a crash before the store write leaves a file the next run adopts)."""
        if wanted is not None and wanted.token:
            secret = wanted.token.split("_", 2)[2]
            return wanted.token, await asyncio.to_thread(hash_secret, secret, self.rounds)
        issued = await asyncio.to_thread(issue_token, prefix, public_id, self.rounds)
        if wanted is not None and wanted.output:
            write_private(Path(wanted.output), issued.token)
        return issued.token, issued.hash


def _id_of(token: str, id_prefix: str) -> str:
    return f"{id_prefix}_{token.split('_')[1]}"


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only, replacing it in one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text + "\n")
    os.replace(partial, path)


# -- watching ---------------------------------------------------------------------------------------------
class StateWatcher:
    """Applies the state file at start (refusing to start on an invalid one) and on every change after;
    a file that fails to load or apply later keeps what was applied, and shows in the logs and metrics."""

    def __init__(self, path: str, applier: StateApplier, metrics: Metrics) -> None:
        self.path, self.applier, self.metrics = path, applier, metrics
        self.applied = ""
        self.last_error: str | None = None

    async def start(self, attempts: int = 3) -> list[Change]:
        for attempt in range(attempts):  # replicas applying one file at once may collide: the next run adopts
            try:
                return await self.check(raise_errors=True)
            except (StateConflict, ConfigError):
                raise
            except Exception:
                if attempt == attempts - 1:
                    raise
                await asyncio.sleep(0.2 * (attempt + 1))
        return []

    async def check(self, raise_errors: bool = False) -> list[Change]:
        try:
            state, fingerprint = await asyncio.to_thread(load_state, self.path)
            if fingerprint == self.applied:
                return []
            changes = await self.applier.apply(state)
        except Exception as exc:
            if str(exc) == self.last_error and not raise_errors:
                return []  # the same failure as last check: counted and logged once, tried again
            self.last_error = str(exc)
            self.metrics.inc("paysentry_state_applies_total", result="error")
            fields: dict[str, Any] = {"file": self.path, "error": str(exc)}
            if isinstance(exc, StateConflict):  # the other owners' entries were applied all the same
                fields["changes"] = [str(c) for c in exc.changes]
                for change in exc.changes:
                    self.metrics.inc("paysentry_state_changes_total", kind=change.kind, change=change.change)
            log.error("declared state not applied", extra={"fields": fields})
            if raise_errors:
                raise
            return []
        self.applied, self.last_error = fingerprint, None
        self.metrics.inc("paysentry_state_applies_total", result="ok")
        for change in changes:
            self.metrics.inc("paysentry_state_changes_total", kind=change.kind, change=change.change)
        fields = {"file": self.path, "changes": [str(c) for c in changes]}
        log.info("declared state applied", extra={"fields": fields})
        return changes

    async def watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.check()
