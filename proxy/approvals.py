"""Holds: who may vote, how votes become a decision (pure), and the one-time approval links.

A hold names its approvers (people, and ``reviewer:<name>`` for automated reviewers), a quorum N of those
M, and whether one deny vetoes. Each approver's first vote counts; a later one is ignored. The hold is
approved when N approve, denied when a vetoing deny arrives or when the approvals still possible cannot
reach N. A hold with no approvers named is decided by the first vote of its owner (``owner:<name>``: the
owner's token, or the operator's command on the host); a hold naming approvers is decided by them alone.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Sequence

PENDING, APPROVED, DENIED, EXPIRED = "pending", "approved", "denied", "expired"


def tally(approvers: Sequence[str], quorum: int, veto: bool, votes: Sequence[tuple[str, str]]) -> str:
    """The state of a hold given its votes ``(voter, "approve" | "deny")``."""
    approvals = sum(1 for _, vote in votes if vote == "approve")
    denials = sum(1 for _, vote in votes if vote == "deny")
    if denials and (veto or not approvers):
        return DENIED
    if approvals >= quorum:
        return APPROVED
    if approvers and len(approvers) - denials < quorum:
        return DENIED  # the quorum can no longer be reached
    return PENDING


def may_vote(approvers: Sequence[str], voter: str) -> bool:
    return voter in approvers if approvers else voter.startswith("owner:")


def new_link_token() -> tuple[str, str]:
    """(token for the link, SHA-256 hash to store)."""
    token = secrets.token_urlsafe(32)
    return token, link_hash(token)


def link_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def sign(secret: bytes, body: bytes, timestamp: int | None = None) -> str:
    """The ``PaySentry-Signature`` header: ``t=<unix seconds>,v1=<hex HMAC-SHA256 of "t.body">``."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret, f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"
