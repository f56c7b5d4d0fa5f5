"""What owners do, shared by the command line and the owner API: owners, connections, agents, holds."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from adapters import REGISTRY
from adapters.base import Adapters
from proxy.decide import period_of
from proxy.errors import BadRequest, Conflict, Forbidden, NotFound, PaySentryError
from proxy.policy.model import PolicySet
from proxy.secrets import (
    AGENT_PREFIX,
    APPROVER_PREFIX,
    OWNER_PREFIX,
    Sealer,
    issue_token,
    new_id,
    sealed_context,
)
from proxy.store import (
    SEALED_KINDS,
    AgentNameTaken,
    AgentRecord,
    ApprovalClosed,
    ApprovalExpired,
    ApprovalNotFound,
    ApprovalRecord,
    ApproverNameTaken,
    ApproverRecord,
    AuthorizationRecord,
    ConnectionRecord,
    Event,
    LinkUnusable,
    NotAnApprover,
    OwnerRecord,
    Refused,
    Store,
    UnknownCursor,
    VoteRefused,
    VoteResult,
)
from proxy.windows import in_window

# As policies name approvers; no ':' so no approver can pose as owner:<name> or reviewer:<name>.
APPROVER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,99}")


class OwnerService:
    def __init__(
        self,
        store: Store,
        sealer: Sealer,
        bcrypt_rounds: int,
        clock: Callable[[], float] = time.time,
        *,
        adapters: Adapters = REGISTRY,
    ) -> None:
        self.store, self.sealer, self.rounds, self.clock = store, sealer, bcrypt_rounds, clock
        self.adapters = adapters

    async def _issue(self, prefix: str, public_id: str) -> tuple[str, str]:
        issued = await asyncio.to_thread(issue_token, prefix, public_id, self.rounds)
        return issued.token, issued.hash

    async def create_owner(self, name: str) -> tuple[OwnerRecord, str]:
        owner_id = new_id("own")
        token, digest = await self._issue(OWNER_PREFIX, owner_id)
        owner = OwnerRecord(owner_id, name, digest, self.clock())
        await self.store.create_owner(owner)
        return owner, token

    async def rotate_owner_token(self, owner: OwnerRecord) -> str:
        token, digest = await self._issue(OWNER_PREFIX, owner.id)
        await self.store.update_owner_token(owner.id, digest, self.clock())
        return token

    async def owner_named(self, name: str | None) -> OwnerRecord:
        if name:
            owner = await self.store.find_owner(name)
            if owner is None:
                raise NotFound(f"no owner named {name!r}; create one with: paysentry owner create {name}")
            return owner
        owners = await self.store.list_owners()
        if len(owners) != 1:
            raise BadRequest(
                "name the owner with --owner"
                if owners
                else "no owner yet; create one with: paysentry owner create NAME"
            )
        return owners[0]

    async def add_connection(
        self,
        owner_id: str,
        provider: str,
        name: str,
        upstream: str | None,
        credentials: Mapping[str, str],
        allowed_accounts: Sequence[str] = (),
        settings: Mapping[str, str] | None = None,
    ) -> ConnectionRecord:
        try:
            adapter = self.adapters.adapter(provider)
            adapter.configured(settings or {})
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        if not credentials.get("secret_key"):
            raise BadRequest("the credentials need a secret_key (the provider's secret key or access token)")
        connection_id = new_id("conn")
        sealed = self.sealer.seal(
            json.dumps(dict(credentials)).encode(), sealed_context("connection", connection_id)
        )
        record = ConnectionRecord(
            connection_id,
            owner_id,
            provider,
            name,
            upstream or adapter.default_upstream,
            sealed,
            self.clock(),
            allowed_accounts=tuple(allowed_accounts),
            settings=dict(settings or {}),
        )
        await self.store.add_connection(record)
        return record

    async def create_agent(
        self, owner_id: str, name: str, labels: Mapping[str, str], connection_name: str
    ) -> tuple[AgentRecord, str]:
        if not name or len(name) > 100:
            raise BadRequest("an agent needs a name of 1 to 100 characters", param="name")
        connection = await self.store.find_connection(owner_id, connection_name)
        if connection is None:
            raise NotFound(
                f"no provider connection named {connection_name!r}; add one with: paysentry provider add"
            )
        agent_id = new_id("agt")
        token, digest = await self._issue(AGENT_PREFIX, agent_id)
        agent = AgentRecord(agent_id, owner_id, connection.id, name, dict(labels), digest, self.clock())
        try:
            await self.store.create_agent(agent)
        except AgentNameTaken as fact:
            raise refusal(fact) from fact
        return agent, token

    async def create_approver(self, owner_id: str, name: object, actor: str) -> tuple[ApproverRecord, str]:
        """A person who may vote on holds naming them (``approvers: [name]`` or through a group); the token
        is returned once and only its bcrypt hash is kept."""
        if not isinstance(name, str) or not APPROVER_NAME.fullmatch(name):
            raise BadRequest(
                "an approver's name is 1 to 100 letters, digits or . _ @ + - (as the policies name them), "
                "starting with a letter or digit",
                param="name",
            )
        approver_id = new_id("apv")
        token, digest = await self._issue(APPROVER_PREFIX, approver_id)
        approver = ApproverRecord(approver_id, owner_id, name, digest, self.clock())
        try:
            await self.store.create_approver(approver, actor)
        except ApproverNameTaken as fact:
            raise refusal(fact) from fact
        return approver, token

    async def revoke_approver(self, owner_id: str, approver_id: str, actor: str) -> None:
        if not await self.store.revoke_approver(owner_id, approver_id, actor, self.clock()):
            raise NotFound(f"no active approver {approver_id!r}")

    async def vote(
        self,
        owner_id: str,
        approval_id: str,
        voter: str,
        approve: bool,
        reason: str,
        via: str,
        authenticated: Mapping[str, str] | None = None,
    ) -> VoteResult:
        """Count a vote under ``voter``: the name of the identity that authenticated (the caller never
        chooses it); ``authenticated`` is recorded with it in the audit log."""
        try:
            return await self.store.vote(
                owner_id, approval_id, voter, approve, reason, via, self.clock(), authenticated
            )
        except VoteRefused as fact:
            raise refusal(fact) from fact

    async def rotate_keys(self, batch: int = 500) -> dict[str, dict[str, int]]:
        """Re-seal every value not sealed under the newest key; safe to run while sidecars serve.

        Each value is opened with whichever loaded key sealed it and written back only if it is still the
        same bytes (a compare-and-swap), so a concurrent writer is never overwritten; running it again
        finds nothing left to do. A value no loaded key opens stops the rotation with an error.
        """
        report: dict[str, dict[str, int]] = {}
        for kind in SEALED_KINDS:
            counts = report.setdefault(kind, {"resealed": 0, "current": 0, "changed_meanwhile": 0})
            after = ""
            while page := await self.store.sealed_values(kind, after, batch):
                for row_id, sealed in page:
                    if not self.sealer.needs_rotation(sealed):
                        counts["current"] += 1
                        continue
                    context = sealed_context(kind, row_id)
                    fresh = self.sealer.seal(self.sealer.open(sealed, context), context)
                    changed = await self.store.reseal(kind, row_id, sealed, fresh)
                    counts["resealed" if changed else "changed_meanwhile"] += 1
                after = page[-1][0]
        return report


def refusal(fact: Refused) -> PaySentryError:
    """What an owner (or an approver on a link page) is told when the store refused their write: the
    error's status and its wording, for the owner API, the CLI and the link pages alike."""
    match fact:
        case AgentNameTaken(name=name):
            return Conflict(f"an active agent named {name!r} already exists")
        case ApproverNameTaken(name=name):
            return Conflict(
                f"an active approver named {name!r} already exists; revoke it first to replace it"
            )
        case ApprovalNotFound(approval_id=approval_id):
            return NotFound(f"no approval {approval_id!r}")
        case ApprovalClosed(approval_id=approval_id, state=state):
            return Conflict(f"approval {approval_id} is already {state}")
        case ApprovalExpired(approval_id=approval_id):
            return Conflict(f"approval {approval_id} has expired")
        case NotAnApprover(approval_id=approval_id, voter=voter, approvers=()):
            return Forbidden(
                f"{voter!r} may not vote on {approval_id}: it names no approvers, so its owner decides"
            )
        case NotAnApprover(approval_id=approval_id, voter=voter, approvers=approvers):
            return Forbidden(
                f"{voter!r} is not an approver of {approval_id} (approvers: {', '.join(approvers)}); "
                "each approver votes with their own token"
            )
        case LinkUnusable():
            return NotFound("this approval link is unknown, used or expired")
        case UnknownCursor(cursor=cursor, param=param):
            return BadRequest(f"no such object: {cursor!r}", code="resource_missing", param=param)
    raise TypeError(f"no owner-facing wording for {fact!r}")


def spend_against_limits(
    policy_set: PolicySet, agent: AgentRecord, rows: Sequence[Mapping[str, Any]], now: float
) -> list[dict[str, Any]]:
    """Every windowed limit that applies to the agent, in its current period: used, the maximum, what
    remains (None where the limit has no such maximum)."""
    when = datetime.fromtimestamp(now, UTC)
    out = []
    for policy in policy_set.policies:
        if not policy.applies_to(agent.labels):
            continue
        for lim in policy.limits:
            if lim.window == "payment":
                continue
            period = period_of(lim.window, when, policy.timezone)
            # A calendar window is one period; a rolling one the buckets its window sums.
            held = [r for r in rows if r["limit"] == lim.name and in_window(period, r["period"])]
            used = sum(int(r["amount"]) for r in held)
            count = sum(int(r["count"]) for r in held)
            out.append(
                {
                    "limit": lim.name,
                    "window": lim.window,
                    "period": period,
                    "currency": lim.currency,
                    "amount": used,
                    "count": count,
                    "max_amount": lim.max_amount,
                    "max_count": lim.max_count,
                    "remaining": None if lim.max_amount is None else max(0, lim.max_amount - used),
                    "remaining_count": None if lim.max_count is None else max(0, lim.max_count - count),
                }
            )
    return out


def rfc3339(at: float | None) -> str | None:
    """A stored time (Unix seconds) as the owner API and the CLI show it: RFC 3339 in UTC, milliseconds."""
    if at is None:
        return None
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def approver_json(approver: ApproverRecord) -> dict[str, Any]:
    return {
        "id": approver.id,
        "name": approver.name,
        "created_at": rfc3339(approver.created_at),
        "revoked_at": rfc3339(approver.revoked_at),
    }


def agent_json(agent: AgentRecord) -> dict[str, Any]:
    return {
        "id": agent.id,
        "name": agent.name,
        "labels": dict(agent.labels),
        "connection": agent.connection_id,
        "created_at": rfc3339(agent.created_at),
        "revoked_at": rfc3339(agent.revoked_at),
    }


def authorization_json(auth: AuthorizationRecord) -> dict[str, Any]:
    return {
        "id": auth.id,
        "agent_id": auth.agent_id,
        "state": auth.state,
        "decision": auth.decision,
        "rule": auth.rule,
        "policy": auth.policy,
        "message": auth.message,
        "revision": auth.revision,
        "operation": auth.operation,
        "amount": auth.amount,
        "currency": auth.currency,
        "destination": auth.destination,
        "payment": dict(auth.payment),
        "approval_id": auth.approval_id,
        "provider_ref": auth.provider_ref,
        "response_status": auth.response_status,
        "created_at": rfc3339(auth.created_at),
        "updated_at": rfc3339(auth.updated_at),
    }


def approval_json(approval: ApprovalRecord, now: float, counted: bool | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": approval.id,
        "state": approval.state,
        "authorization_id": approval.authorization_id,
        "expires_at": rfc3339(approval.expires_at),
        "seconds_left": max(0.0, round(approval.expires_at - now, 1)) if approval.state == "pending" else 0,
        "decided_by": approval.decided_by,
        "reason": approval.reason,
        "created_at": rfc3339(approval.created_at),
        "decided_at": rfc3339(approval.decided_at),
        "approvers": list(approval.approvers) or ["(any owner)"],
        "quorum": approval.quorum,
        "veto": approval.veto,
        "votes": [
            {"voter": v.voter, "vote": v.vote, "reason": v.reason, "via": v.via, "at": rfc3339(v.at)}
            for v in approval.votes
        ],
    }
    if counted is not None:
        out["vote_counted"] = counted
    if approval.authorization is not None:
        out["authorization"] = authorization_json(approval.authorization)
    return out


def event_json(event: Event) -> dict[str, Any]:
    return {
        "seq": event.seq,
        "type": event.type,
        "actor": event.actor,
        "agent_id": event.agent_id,
        "authorization_id": event.authorization_id,
        "data": dict(event.data),
        "at": rfc3339(event.at),
    }


def reconciliation_json(report: Mapping[str, Any]) -> dict[str, Any]:
    """A reconciliation report (as kept, times in Unix seconds) with its times in RFC 3339."""
    times = ("since", "until", "ran_at")
    return {k: rfc3339(v) if k in times and isinstance(v, int | float) else v for k, v in report.items()}
