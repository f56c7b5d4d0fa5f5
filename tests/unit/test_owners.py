"""What owners are told when the store refuses their write: one wording and status for each fact."""

from __future__ import annotations

from typing import Any

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


def test_spend_against_a_rolling_limit_sums_the_buckets_of_its_window(tmp_path: Any) -> None:
    """What an owner sees used of a rolling window is every bucket the window sums now, not one bucket;
    buckets older than the window are not counted."""
    from datetime import UTC, datetime

    from adapters import REGISTRY
    from proxy.owners import spend_against_limits
    from proxy.policy.engine import make_engine
    from proxy.policy.loader import load_policy_set
    from proxy.store import AgentRecord
    from proxy.windows import period_of

    (tmp_path / "p.yaml").write_text(
        "name: p\nlimits:\n  - {name: hourly, rolling: 1h, currency: usd, max_amount: 5000, max_count: 5}\n"
    )
    policy_set = load_policy_set(tmp_path, make_engine("cel-expr-python"), operations=REGISTRY.operations)
    now = 1_790_000_000.0

    def bucket(seconds_ago: float) -> str:
        return period_of("rolling:3600", datetime.fromtimestamp(now - seconds_ago, UTC), "UTC")

    rows = [
        {"limit": "hourly", "period": bucket(0), "amount": 1000, "count": 1},
        {"limit": "hourly", "period": bucket(1800), "amount": 1500, "count": 2},
        {"limit": "hourly", "period": bucket(7200), "amount": 9000, "count": 9},  # out of the window
    ]
    agent = AgentRecord("agt_1", "own_1", "conn_1", "bot", {}, "hash", 1.0)
    [hourly] = spend_against_limits(policy_set, agent, rows, now)
    assert (hourly["amount"], hourly["count"], hourly["remaining"], hourly["remaining_count"]) == (
        2500,
        3,
        2500,
        2,
    )
