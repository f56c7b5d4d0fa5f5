"""How votes become a decision, and the notification signature receivers verify."""

from __future__ import annotations

import time

import pytest

from proxy.approvals import sign, tally
from tests.readme import readme_function

verify = readme_function("verify")  # the receiver's check as the README shows it

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
    now = int(time.time())
    header = sign(b"secret", b'{"a":1}', timestamp=now - 100)
    assert verify(b"secret", b'{"a":1}', header)
    assert not verify(b"secret", b'{"a":2}', header)  # tampered body
    assert not verify(b"other", b'{"a":1}', header)  # wrong secret
    assert not verify(b"secret", b'{"a":1}', sign(b"secret", b'{"a":1}', timestamp=now - 1000))  # stale
    for garbage in ("garbage", "t=x,v1=y", "v1=abc", "", "t=１２,v1=0"):
        assert not verify(b"secret", b'{"a":1}', garbage)
