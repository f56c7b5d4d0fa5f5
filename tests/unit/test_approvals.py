"""How votes become a decision, and the notification signature receivers verify."""

from __future__ import annotations

import pytest

from proxy.approvals import sign, tally, verify

A3 = ("alice", "bob", "reviewer:risk")


@pytest.mark.parametrize(
    ("approvers", "quorum", "veto", "votes", "state"),
    [
        (A3, 2, True, [("alice", "approve")], "pending"),
        (A3, 2, True, [("alice", "approve"), ("reviewer:risk", "approve")], "approved"),
        (A3, 2, True, [("alice", "approve"), ("bob", "deny")], "denied"),  # veto
        (
            A3,
            2,
            False,
            [("alice", "approve"), ("bob", "deny")],
            "pending",
        ),  # no veto: the reviewer may still carry it
        (A3, 2, False, [("bob", "deny"), ("alice", "deny")], "denied"),  # the quorum can no longer be reached
        (A3, 2, False, [("bob", "deny"), ("alice", "approve"), ("reviewer:risk", "approve")], "approved"),
        ((), 1, True, [("owner:acme", "approve")], "approved"),  # no approvers named: any owner decides
        ((), 1, False, [("owner:acme", "deny")], "denied"),
    ],
)
def test_tally(approvers, quorum, veto, votes, state) -> None:
    assert tally(approvers, quorum, veto, votes) == state


def test_signatures_verify_and_expire() -> None:
    header = sign(b"secret", b'{"a":1}', timestamp=1000)
    assert verify(b"secret", b'{"a":1}', header, now=1100)
    assert not verify(b"secret", b'{"a":2}', header, now=1100)  # tampered body
    assert not verify(b"other", b'{"a":1}', header, now=1100)  # wrong secret
    assert not verify(b"secret", b'{"a":1}', header, now=2000)  # stale
    assert not verify(b"secret", b'{"a":1}', "garbage", now=1100)
