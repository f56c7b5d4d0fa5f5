"""The store port: what PaySentry keeps, and the atomic operations on it.

Every method that changes state does it in one transaction together with the audit event that records
it. Reserving spend is check-and-count in one atomic step. The port is split by role (``IdentityStore``,
``AuthorizationStore``, ``HoldStore``, ``AuditStore``, ``Housekeeping``); ``Store`` is all of them. Implementations: the embedded SQLite store
(``proxy.store.sqlite``) and PostgreSQL (``proxy.store.postgres``), both running the transaction bodies
of ``proxy.store.sql``; the composition root (``proxy.bootstrap.open_store``) picks one from a URL.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxy.model import ApprovalSpec, Charge, Reviewer, SpendTotal
from proxy.refusals import limit_exceeded_message

# Authorization states.
DENIED, HELD, APPROVED, REJECTED, EXPIRED = "denied", "held", "approved", "rejected", "expired"
FORWARDING, SETTLED, FAILED = "forwarding", "settled", "failed"
VOIDED = "voided"  # settled, then the provider reported the money will not move (spend released)
# Forwarded, and whether the provider moved the money is unknown (a timeout, a 5xx, a lost connection, a
# sidecar stopped mid-call): the spend stays counted until the provider's answer is learned.
IN_DOUBT = "in_doubt"
RESERVING_STATES = (HELD, APPROVED, FORWARDING, IN_DOUBT)  # states whose charges count against limits
UNRESOLVED_STATES = (FORWARDING, IN_DOUBT)  # forwarded, no answer recorded yet
# What reconciliation may do to an authorization, from the provider's own record of its object (each a
# conditional transition, so of replicas racing exactly one applies it):
SETTLE_FIX = "settled"  # unresolved (in doubt, or forwarding past its lease), the money moved: settled
RELEASE_FIX = "released"  # unresolved, the provider shows it did not move: failed, spend released
COUNT_FIX = "counted"  # failed or voided (released) but the provider moved it: settled, counted again
VOID_FIX = "voided"  # settled but the provider shows it did not move: voided, spend released
FIXES = (SETTLE_FIX, RELEASE_FIX, COUNT_FIX, VOID_FIX)


@dataclass(frozen=True, slots=True)
class OwnerRecord:
    id: str
    name: str
    token_hash: str
    created_at: float


@dataclass(frozen=True, slots=True)
class ConnectionRecord:
    id: str
    owner_id: str
    provider: str
    name: str
    upstream: str
    credentials: bytes  # sealed
    created_at: float
    revoked_at: float | None = None
    allowed_accounts: tuple[str, ...] = ()  # connected accounts agents may act for (Stripe-Account)
    settings: Mapping[str, str] = field(default_factory=dict)  # the adapter's, e.g. {"currency": "ars"}


@dataclass(frozen=True, slots=True)
class AgentRecord:
    id: str
    owner_id: str
    connection_id: str
    name: str
    labels: Mapping[str, str]
    token_hash: str
    created_at: float
    revoked_at: float | None = None


@dataclass(frozen=True, slots=True)
class ApproverRecord:
    """A person who may vote on holds: named as policies name approvers, with a token of their own."""

    id: str
    owner_id: str
    name: str
    token_hash: str
    created_at: float
    revoked_at: float | None = None


@dataclass(frozen=True, slots=True)
class Notification:
    """One hold notification in the outbox, to one URL; ``id`` is its webhook-id on every attempt."""

    id: str
    owner_id: str
    approval_id: str
    url: str
    state: str  # pending | delivered | failed
    attempts: int
    next_attempt_at: float
    last_error: str
    created_at: float
    done_at: float | None = None


@dataclass(frozen=True, slots=True)
class NewAuthorization:
    """A decided call, as the pipeline hands it to ``record_decision``. ``explain`` is the core's wording of
    a refusal the store finds while reserving (this charge would pass its limit, this much is already
    counted); the store records the words in the same transaction and never composes them."""

    id: str
    owner_id: str
    agent_id: str
    idempotency_key: str
    request_hash: str
    provider: str
    operation: str
    amount: int
    currency: str
    destination: str
    payment: Mapping[str, Any]
    decision: str
    rule: str
    policy: str
    message: str
    revision: str
    charges: Sequence[Charge] = ()
    hold_expires_at: float | None = None
    approval_id: str | None = None
    lease_expires_at: float | None = None
    shadow: Sequence[Mapping[str, str]] = ()  # what shadow rules would have decided
    approval: ApprovalSpec | None = None  # holds: who decides
    explain: Callable[[Charge, SpendTotal], str] = limit_exceeded_message
    request: bytes | None = None  # the call as forwarded, sealed: re-sent to resolve an unknown outcome
    notify: Sequence[str] = ()  # holds: webhook URLs, queued in the outbox in the same transaction


@dataclass(frozen=True, slots=True)
class AuthorizationRecord:
    id: str
    owner_id: str
    agent_id: str
    idempotency_key: str
    request_hash: str
    provider: str
    operation: str
    amount: int
    currency: str
    destination: str
    payment: Mapping[str, Any]
    decision: str
    rule: str
    policy: str
    message: str
    revision: str
    state: str
    charges: Sequence[Charge]
    approval_id: str | None
    provider_ref: str | None
    response_status: int | None
    response_body: bytes | None
    lease_expires_at: float | None
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class Vote:
    voter: str
    vote: str  # approve | deny
    reason: str
    via: str  # cli, owner_api, link, reviewer
    at: float


@dataclass(frozen=True, slots=True)
class ApprovalRecord:
    id: str
    owner_id: str
    authorization_id: str
    state: str  # pending | approved | denied | expired
    expires_at: float
    decided_by: str | None
    reason: str | None
    created_at: float
    decided_at: float | None
    approvers: tuple[str, ...] = ()
    quorum: int = 1
    veto: bool = True
    reviewers: tuple[Reviewer, ...] = ()
    votes: tuple[Vote, ...] = ()
    authorization: AuthorizationRecord | None = None


@dataclass(frozen=True, slots=True)
class VoteResult:
    approval: ApprovalRecord
    counted: bool  # False when this voter had already voted: the first vote stands


@dataclass(frozen=True, slots=True)
class LimitExceeded:
    """record_decision could not reserve: this charge would pass its limit."""

    charge: Charge
    total: SpendTotal


@dataclass(frozen=True, slots=True)
class Recorded:
    record: AuthorizationRecord
    exceeded: LimitExceeded | None = None


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    owner_id: str
    agent_id: str | None
    authorization_id: str | None
    type: str
    actor: str
    data: Mapping[str, Any] = field(default_factory=dict)
    at: float = 0.0


@dataclass(frozen=True, slots=True)
class Page:
    """Which slice of a list to read, newest first (Stripe's conventions): filters, then a cursor
    (``starting_after``: older than that object; ``ending_before``: newer than it) and a size."""

    agent_id: str | None = None
    state: str | None = None
    decision: str | None = None
    rule: str | None = None
    kind: str | None = None  # events: the type, or a prefix ending in "." (approval.)
    created_gte: float | None = None
    created_lt: float | None = None
    starting_after: str | None = None
    ending_before: str | None = None
    limit: int = 50


class Refused(Exception):
    """The store did not apply a write, and why, as data: which object, in which state. The store never
    words it; a caller that faces a person does (``proxy.owners.refusal``).

        Refused
        ├── DuplicateKey        another call with the same agent and Idempotency-Key was recorded first
        ├── AgentNameTaken      the owner already has an active agent of that name
        ├── ApproverNameTaken   the owner already has an active approver of that name
        ├── UnknownCursor       a list's starting_after / ending_before names none of the owner's objects
        └── VoteRefused         a vote the hold cannot take
            ├── ApprovalNotFound    no such approval for this owner
            ├── ApprovalClosed      already approved, denied or expired
            ├── ApprovalExpired     pending, but past its deadline
            ├── NotAnApprover       the voter is not named among the approvers
            └── LinkUnusable        the approval link is unknown, used or expired
    """

    def __str__(self) -> str:
        return repr(self)


@dataclass(eq=False)
class DuplicateKey(Refused):
    idempotency_key: str


@dataclass(eq=False)
class AgentNameTaken(Refused):
    name: str


@dataclass(eq=False)
class ApproverNameTaken(Refused):
    name: str


@dataclass(eq=False)
class UnknownCursor(Refused):
    cursor: str
    param: str  # starting_after or ending_before


class VoteRefused(Refused):
    """A vote the hold cannot take; nothing was counted."""


@dataclass(eq=False)
class ApprovalNotFound(VoteRefused):
    approval_id: str


@dataclass(eq=False)
class ApprovalClosed(VoteRefused):
    approval_id: str
    state: str  # approved, denied or expired


@dataclass(eq=False)
class ApprovalExpired(VoteRefused):
    approval_id: str


@dataclass(eq=False)
class NotAnApprover(VoteRefused):
    approval_id: str
    voter: str
    approvers: tuple[str, ...]


@dataclass(eq=False)
class LinkUnusable(VoteRefused):
    """No unused, unexpired link has this token."""


class IdentityStore(Protocol):
    """Who may act: owners, their provider connections and their agents. Written by owners (the CLI and
    the owner API), read on every agent call to authenticate it and find its connection."""

    async def create_owner(self, owner: OwnerRecord, actor: str = "cli") -> None: ...
    async def get_owner(self, owner_id: str) -> OwnerRecord | None: ...
    async def find_owner(self, name: str) -> OwnerRecord | None: ...
    async def update_owner_token(
        self,
        owner_id: str,
        token_hash: str,
        now: float,
        actor: str = "cli",
        kind: str = "owner.token_rotated",
    ) -> None: ...
    async def list_owners(self) -> list[OwnerRecord]: ...
    async def add_connection(self, connection: ConnectionRecord, actor: str = "cli") -> None: ...
    async def get_connection(self, connection_id: str) -> ConnectionRecord | None: ...
    async def find_connection(
        self, owner_id: str, name: str, include_revoked: bool = False
    ) -> ConnectionRecord | None: ...
    async def update_connection(
        self, old: ConnectionRecord, new: ConnectionRecord, changed: Sequence[str], actor: str, now: float
    ) -> bool:
        """Give connection ``old`` the upstream, credentials, accounts and settings of ``new`` (and undo a
        revocation), if its sealed credentials are still ``old``'s; False when another writer came first."""
        ...

    async def revoke_connection(self, owner_id: str, connection_id: str, actor: str, now: float) -> bool: ...
    async def create_agent(self, agent: AgentRecord, actor: str = "owner") -> None:
        """Raises ``AgentNameTaken`` when the owner has an active agent of that name (or the id is taken)."""
        ...

    async def update_agent(
        self, old: AgentRecord, new: AgentRecord, changed: Sequence[str], actor: str, now: float
    ) -> bool: ...

    async def get_agent(self, agent_id: str) -> AgentRecord | None: ...
    async def list_agents(self, owner_id: str) -> list[AgentRecord]: ...
    async def page_agents(self, owner_id: str, page: Page) -> tuple[list[AgentRecord], bool]:
        """One page of the owner's agents, newest first (``state``: active or revoked), and whether there
        are more beyond it."""
        ...

    async def revoke_agent(self, owner_id: str, agent_id: str, actor: str, now: float) -> bool: ...
    async def create_approver(self, approver: ApproverRecord, actor: str) -> None:
        """Raises ``ApproverNameTaken`` when the owner has an active approver of that name."""
        ...

    async def get_approver(self, approver_id: str) -> ApproverRecord | None: ...
    async def list_approvers(self, owner_id: str) -> list[ApproverRecord]: ...
    async def page_approvers(self, owner_id: str, page: Page) -> tuple[list[ApproverRecord], bool]:
        """As ``page_agents``, for approvers."""
        ...

    async def update_approver_token(
        self, old: ApproverRecord, token_hash: str, actor: str, now: float
    ) -> bool:
        """Give an active approver a new token hash, if it still has ``old``'s (a compare-and-swap, as
        ``update_agent``)."""
        ...

    async def revoke_approver(self, owner_id: str, approver_id: str, actor: str, now: float) -> bool: ...


class DeclaredStore(Protocol):
    """Which owners, connections, agents and approvers a declared state file manages (``proxy.state``):
    what leaves the file is revoked; what the CLI or the owner API made is left alone."""

    async def declared(self, kind: str) -> list[tuple[str, str, str]]: ...
    async def set_declared(
        self, kind: str, row_id: str, owner_id: str, source: str, digest: str, now: float
    ) -> None: ...
    async def forget_declared(self, kind: str, row_id: str) -> None: ...


class AuthorizationStore(Protocol):
    """The payment path: one authorization from its idempotency lookup to its end. The core has decided;
    the store records the decision and reserves its spend atomically, then moves the authorization through
    its states (forwarding, settled, failed, voided), releasing the spend exactly once when it ends."""

    async def lookup(
        self, agent_id: str, idempotency_key: str, spend_keys: Sequence[tuple[str, str]]
    ) -> tuple[AuthorizationRecord | None, dict[str, SpendTotal]]: ...
    async def record_decision(
        self, new: NewAuthorization, now: float, retry_of: str | None = None
    ) -> Recorded:
        """Record ``new`` and reserve its charges in one transaction. A charge that would pass its limit
        turns the decision into a denial worded by ``new.explain``; ``Recorded.exceeded`` says which.
        Raises ``DuplicateKey`` when the agent's Idempotency-Key was recorded first by another call."""
        ...

    async def start_forwarding(self, authorization_id: str, lease_expires_at: float, now: float) -> bool: ...
    async def settle(
        self,
        authorization_id: str,
        provider_ref: str | None,
        status: int,
        body: bytes | None,
        now: float,
        holds: int | None = None,
    ) -> None:
        """The provider accepted the call: commit its spend. ``holds``: the object ``provider_ref`` now
        moves only this much (a partial capture), so what was counted for it beyond is given back."""
        ...

    async def fail(
        self,
        authorization_id: str,
        reason: str,
        status: int | None,
        body: bytes | None,
        now: float,
        provider_ref: str | None = None,
    ) -> None:
        """The provider refused (or was never reached): release the spend; ``provider_ref`` names an
        object the refusal still made (a declined create leaves its intent)."""
        ...

    async def apply_webhook(
        self,
        owner_id: str,
        connection_id: str,
        event_id: str,
        event_type: str,
        provider_ref: str | None,
        outcome: str | None,
        now: float,
    ) -> str:
        """Record a verified provider event once and settle what it names; returns what happened:
        duplicate, voided, recorded, unmatched or ignored."""
        ...

    async def void(
        self, owner_id: str, provider_ref: str, actor: str, data: dict[str, Any], now: float
    ) -> str:
        """The provider's object ``provider_ref`` was cancelled: release the spend its settled
        authorizations counted. Returns voided, recorded (nothing left to release) or unmatched."""
        ...

    async def webhook_seen(self, connection_id: str, event_id: str) -> bool:
        """Whether this provider event was already recorded (applied) for the connection."""
        ...

    async def find_by_provider_ref(self, owner_id: str, provider_ref: str) -> AuthorizationRecord | None:
        """The settled call on the provider object ``provider_ref`` whose amount is the largest: what the
        object holds as counted (its create, or a later call that raised it: an increment, an
        over-capture); None when no call on it settled."""
        ...

    async def maker_of(self, owner_id: str, provider_ref: str) -> str | None:
        """The agent whose call made the provider object ``provider_ref`` (whatever became of it: a
        declined create still made the object), or None when PaySentry never saw it made. A write PaySentry
        does not recognize (let through by an owner's allow rule) makes nobody the maker."""
        ...

    async def unresolved_on(self, owner_id: str, provider_ref: str) -> AuthorizationRecord | None:
        """A call on the provider object ``provider_ref`` (or that made it) whose outcome is not known
        yet: forwarding, or in doubt; None when there is none."""
        ...

    async def set_in_doubt(self, authorization_id: str, reason: str, retry_at: float, now: float) -> bool:
        """A forwarded call whose outcome is unknown: it keeps its spend, and may be claimed again for
        resolution from ``retry_at``. False when it was not forwarding (another answer came first)."""
        ...

    async def claim(self, authorization_id: str, lease_expires_at: float, now: float) -> int | None:
        """Take an unresolved call (in doubt, at once; or forwarding past its lease: its sidecar stopped)
        to re-send it; exactly one claimant wins however many race. Returns how many times the call was
        sent before this claim (None: not claimed)."""
        ...

    async def claim_unresolved(self, lease_expires_at: float, now: float, limit: int) -> list[Unresolved]:
        """Claim up to ``limit`` unresolved calls due for resolution (as ``claim``, each exactly once)."""
        ...


@dataclass(frozen=True, slots=True)
class Unresolved:
    """A forwarded call claimed for resolution: its record, the call as forwarded (sealed) and how many
    times it was re-sent before."""

    record: AuthorizationRecord
    request: bytes | None
    attempts: int


class HoldStore(Protocol):
    """Holds waiting for approvers: their votes (counted by ``proxy.approvals.tally``), one-time approval
    links, and the approvals themselves. A vote the hold cannot take raises a ``VoteRefused``."""

    async def vote(
        self,
        owner_id: str,
        approval_id: str,
        voter: str,
        approve: bool,
        reason: str,
        via: str,
        now: float,
        authenticated: Mapping[str, str] | None = None,
    ) -> VoteResult:
        """Count ``voter``'s vote; ``authenticated`` (who proved it and how) goes into its audit event."""
        ...

    async def add_links(self, approval_id: str, links: Sequence[tuple[str, str, float]]) -> None: ...
    async def find_link(self, token_hash: str) -> tuple[ApprovalRecord, str, float | None, float] | None: ...
    async def use_link(
        self,
        token_hash: str,
        approve: bool,
        reason: str,
        now: float,
        voter: str | None = None,
        authenticated: Mapping[str, str] | None = None,
    ) -> VoteResult:
        """Use a one-time link once; the vote counts for ``voter`` (the identity that authenticated on the
        link's page; by default the approver the link was issued to)."""
        ...

    async def get_approval(self, owner_id: str, approval_id: str) -> ApprovalRecord | None: ...
    async def list_approvals(self, owner_id: str, state: str | None) -> list[ApprovalRecord]: ...
    async def page_approvals(self, owner_id: str, page: Page) -> tuple[list[ApprovalRecord], bool]:
        """One page of the owner's holds, newest first (``state``; ``agent_id``: the held payment's
        agent), and whether there are more beyond it."""
        ...


class AuditStore(Protocol):
    """The record: the audit log and what was authorized and spent, read by the owner API, the CLI,
    policy replay and reports."""

    async def record_event(
        self,
        owner_id: str,
        agent_id: str | None,
        auth_id: str | None,
        kind: str,
        actor: str,
        data: dict[str, Any],
        now: float,
    ) -> None:
        """Append one audit event that is not part of another operation's transaction."""
        ...

    async def list_events(self, owner_id: str, after: int, limit: int) -> list[Event]: ...
    async def get_authorization(self, owner_id: str, authorization_id: str) -> AuthorizationRecord | None: ...
    async def list_authorizations(
        self, owner_id: str, agent_id: str | None, limit: int
    ) -> list[AuthorizationRecord]: ...
    async def history(self, since: float, owner_id: str | None) -> list[AuthorizationRecord]: ...
    async def page_authorizations(self, owner_id: str, page: Page) -> tuple[list[AuthorizationRecord], bool]:
        """One page of the owner's authorizations, newest first, and whether there are more beyond it (in
        the direction read)."""
        ...

    async def page_events(self, owner_id: str, page: Page) -> tuple[list[Event], bool]:
        """As ``page_authorizations``, for audit events (cursors are their ``seq``)."""
        ...

    async def spend_of(self, owner_id: str, agent_id: str) -> list[dict[str, Any]]: ...


class Housekeeping(Protocol):
    """Running the store: connecting and the schema; the sweep (expired holds, expired forwarding leases,
    each released once even with every replica sweeping); gauges of what is held and spent now; key
    rotation (sealed values a page at a time, and a compare-and-swap to reseal one)."""

    async def open(self, migrate: bool = False) -> None:
        """Connect and check the schema (refusing one older or newer than this PaySentry knows), applying
        the migrations first when ``migrate``. The embedded SQLite store always migrates itself."""
        ...

    async def close(self) -> None: ...
    async def ping(self) -> None: ...
    async def migrate(self) -> int:
        """Bring the schema to the version this PaySentry knows; returns it."""
        ...

    async def expire_holds(self, now: float) -> int: ...
    async def expire_approved(self, decided_before: float, now: float) -> int:
        """End approved holds the agent never retried (approved before ``decided_before``): their
        authorizations expire and release their spend, each once however many replicas sweep."""
        ...

    async def claim_notifications(self, now: float, lease: float, limit: int) -> list[Notification]:
        """Take up to ``limit`` pending notifications due at ``now``; each is not due again for ``lease``
        seconds (so of replicas racing one sends it, and a sender that dies is replaced)."""
        ...

    async def notification_sent(
        self, notification_id: str, delivered: bool, error: str, next_attempt_at: float | None, now: float
    ) -> None:
        """Record an attempt: delivered; or failed and retried at ``next_attempt_at``; or (None) given up,
        with a ``notification.failed`` audit event."""
        ...

    async def list_notifications(self, owner_id: str, approval_id: str | None) -> list[Notification]: ...
    async def release_unrecorded(self, now: float) -> int:
        """Release what a spend gate outside the database reserved for decisions never recorded (a sidecar
        stopped in between); 0 for a store that reserves in the same transaction as it records."""
        ...

    async def count_unresolved(self, now: float) -> int:
        """Calls whose outcome is unknown: in doubt, or forwarding past the lease of a sidecar that
        stopped (what the resolution job has yet to learn from the provider)."""
        ...

    async def count_pending_holds(self) -> int: ...
    async def current_spend(
        self, keys: Sequence[tuple[str, str]], limit: int
    ) -> list[tuple[str, str, str, str, int, int]]:
        """(agent id, agent name, limit, currency, amount, count) for the given (limit, period) keys,
        largest amounts first."""
        ...

    async def prune_spend(self, keys: Sequence[tuple[str, str]]) -> int:
        """Delete the rows of rolling windows' buckets no check sums any more, given each rolling limit's
        (name, current period); the number deleted. Calendar periods are kept: they are the history."""
        ...

    async def sealed_values(self, kind: str, after: str, limit: int) -> list[tuple[str, bytes]]: ...
    async def reseal(self, kind: str, row_id: str, old: bytes, new: bytes) -> bool: ...


@dataclass(frozen=True, slots=True)
class X402Signature:
    """An x402 authorization PaySentry signed: what it authorizes, never the signature itself."""

    nonce: str
    authorization_id: str
    owner_id: str
    agent_id: str
    network: str
    asset: str
    payer: str
    pay_to: str
    amount: int
    valid_after: int
    valid_before: int
    signed_at: float


class X402Store(Protocol):
    """Every x402 authorization signed, recorded before it is sent (its nonce unique)."""

    async def record_x402_signature(self, signature: X402Signature) -> None:
        """Record it with an ``x402.signed`` audit event; ``DuplicateKey`` when the nonce is known."""
        ...

    async def x402_signature(self, authorization_id: str) -> X402Signature | None:
        """The latest authorization signed for the PaySentry authorization, or None (never signed)."""
        ...


class ReconciliationStore(Protocol):
    """Comparing what PaySentry counted with the provider's own records: the authorizations a
    connection's objects may belong to, the fixes the provider's records prove (each a conditional
    transition with its audit event and spend change, in one transaction), and the latest report of each
    connection, shared by every replica and the owner API."""

    async def list_connections(self, owner_id: str | None) -> list[ConnectionRecord]:
        """Active connections of one owner, or of every owner (None)."""
        ...

    async def reconciliation_candidates(
        self, connection_id: str, since: float | None, refs: Sequence[str], ids: Sequence[str]
    ) -> list[AuthorizationRecord]:
        """The authorizations of the connection's agents made since ``since`` (None: none by time), or naming one of the
        provider objects ``refs``, or among ``ids`` (the authorizations the objects are tagged with)."""
        ...

    async def reconcile(
        self,
        authorization_id: str,
        fix: str,
        actor: str,
        data: Mapping[str, Any],
        now: float,
        provider_ref: str | None = None,
        status: int | None = None,
        body: bytes | None = None,
    ) -> bool:
        """Apply ``fix`` (one of ``FIXES``) if the authorization is still in a state it applies to: the
        transition, its spend (kept, released, or counted again without a limit check: the money moved),
        an ``authorization.reconciled`` event, and (``status``, ``body``) the answer a same-key retry
        replays. False when another writer changed it first."""
        ...

    async def save_reconciliation(
        self, owner_id: str, connection_id: str, ran_at: float, report: Mapping[str, Any]
    ) -> None:
        """Keep ``report`` as the connection's latest (an older run finishing later does not replace it)."""
        ...

    async def reconciliations(self, owner_id: str | None) -> list[dict[str, Any]]:
        """The latest report of each connection of one owner (or of every owner)."""
        ...


class Store(
    IdentityStore,
    DeclaredStore,
    AuthorizationStore,
    HoldStore,
    AuditStore,
    Housekeeping,
    ReconciliationStore,
    X402Store,
    Protocol,
):
    """Every role at once: what a backend implements and what the composition root opens. A component
    that plays one role takes that role's protocol."""


# credentials of connections; stored provider answers; forwarded calls kept for resolution
SEALED_KINDS = ("connection", "response", "request")
