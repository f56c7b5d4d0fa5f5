"""What owners are told when the store refuses their write: one wording and status for each fact."""

from __future__ import annotations

import pytest

from proxy.errors import Conflict, Forbidden, NotFound, PaySentryError
from proxy.owners import refusal
from proxy.store import (
    AgentNameTaken,
    ApprovalClosed,
    ApprovalExpired,
    ApprovalNotFound,
    ApproverNameTaken,
    DuplicateKey,
    LinkUnusable,
    NotAnApprover,
    Refused,
)


@pytest.mark.parametrize(
    ("fact", "error", "status", "message"),
    [
        (AgentNameTaken("bot"), Conflict, 409, "an active agent named 'bot' already exists"),
        (ApprovalNotFound("apr_1"), NotFound, 404, "no approval 'apr_1'"),
        (ApprovalClosed("apr_1", "denied"), Conflict, 409, "approval apr_1 is already denied"),
        (ApprovalExpired("apr_1"), Conflict, 409, "approval apr_1 has expired"),
        (
            NotAnApprover("apr_1", "mallory", ("alice", "bob")),
            Forbidden,
            403,
            "'mallory' is not an approver of apr_1 (approvers: alice, bob); each approver votes with "
            "their own token",
        ),
        (
            NotAnApprover("apr_1", "alice", ()),
            Forbidden,
            403,
            "'alice' may not vote on apr_1: it names no approvers, so its owner decides",
        ),
        (
            ApproverNameTaken("alice"),
            Conflict,
            409,
            "an active approver named 'alice' already exists; revoke it first to replace it",
        ),
        (LinkUnusable(), NotFound, 404, "this approval link is unknown, used or expired"),
    ],
)
def test_each_refusal_has_its_status_and_wording(
    fact: Refused, error: type[PaySentryError], status: int, message: str
) -> None:
    shown = refusal(fact)
    assert type(shown) is error and shown.status == status and shown.message == message


def test_a_refusal_no_owner_can_cause_has_no_wording() -> None:
    with pytest.raises(TypeError):
        refusal(DuplicateKey("key-1"))  # the payment path's, answered by the pipeline


def test_facts_are_data() -> None:
    fact = ApprovalClosed("apr_1", "approved")
    assert str(fact) == "ApprovalClosed(approval_id='apr_1', state='approved')"
