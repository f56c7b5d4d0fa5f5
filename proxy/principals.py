"""Who is acting on the owner listener: an owner (``pso_`` token) or one of the owner's approvers
(``psa_`` token), each proven by a credential of their own, never by a name the request carries.

A ``Principal`` is what the owner API, the console and the approval links act for: its ``voter`` is the
name a vote is counted under (``owner:<name>`` for the owner, the approver's own name for an approver,
as policies name approvers), and ``authenticated(via)`` is what the audit log records of who proved what.
The operator on the host (the CLI with the store's keys) is an owner-level principal of kind
``operator``: it votes as ``owner:<name>`` and never as an approver.
"""

from __future__ import annotations

import getpass
import socket
from dataclasses import dataclass

from proxy.auth import TokenAuthenticator
from proxy.errors import AuthenticationFailed
from proxy.secrets import APPROVER_PREFIX
from proxy.store import ApproverRecord, IdentityStore, OwnerRecord

OWNER, APPROVER, OPERATOR = "owner", "approver", "operator"


@dataclass(frozen=True, slots=True)
class Principal:
    owner: OwnerRecord
    kind: str  # owner | approver | operator
    id: str  # own_... or apv_...
    name: str
    token_hash: str = ""  # what a console session is bound to: a new token ends the old sessions

    @property
    def voter(self) -> str:
        return self.name if self.kind == APPROVER else f"owner:{self.owner.name}"

    @property
    def is_owner(self) -> bool:
        return self.kind != APPROVER

    def authenticated(self, via: str) -> dict[str, str]:
        """For the audit log: which identity proved itself, and how (owner_api, console, link, cli)."""
        out = {"kind": self.kind, "id": self.id, "name": self.name, "via": via}
        if self.kind == OPERATOR:
            out["os_user"], out["host"] = _os_user(), socket.gethostname()
        return out


def owner_principal(owner: OwnerRecord) -> Principal:
    return Principal(owner, OWNER, owner.id, owner.name, owner.token_hash)


def operator_principal(owner: OwnerRecord) -> Principal:
    """The operator's command on the host: it holds the store and the keys, and acts as the owner."""
    return Principal(owner, OPERATOR, owner.id, owner.name)


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


class Principals:
    """Authenticates an owner-listener token of either kind."""

    def __init__(
        self,
        store: IdentityStore,
        owners: TokenAuthenticator[OwnerRecord],
        approvers: TokenAuthenticator[ApproverRecord],
    ) -> None:
        self.store, self.owners, self.approvers = store, owners, approvers

    async def authenticate(self, token: str | None, client: str | None) -> Principal:
        if token and token.startswith(APPROVER_PREFIX + "_"):
            approver = await self.approvers.authenticate(token, client)
            return await self.of_approver(approver)
        return owner_principal(await self.owners.authenticate(token, client))

    async def of_approver(self, approver: ApproverRecord) -> Principal:
        owner = await self.store.get_owner(approver.owner_id)
        if owner is None:
            raise AuthenticationFailed("unknown or revoked PaySentry token")
        return Principal(owner, APPROVER, approver.id, approver.name, approver.token_hash)

    async def find(self, kind: str, principal_id: str) -> Principal | None:
        """The principal a console session names, as it is now (None: gone or revoked)."""
        if kind == APPROVER:
            approver = await self.store.get_approver(principal_id)
            if approver is None or approver.revoked_at is not None:
                return None
            return await self.of_approver(approver)
        owner = await self.store.get_owner(principal_id)
        return owner_principal(owner) if owner else None
