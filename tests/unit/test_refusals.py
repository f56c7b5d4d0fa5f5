"""The wording of limit refusals."""

from __future__ import annotations

from proxy.model import Charge, SpendTotal
from proxy.refusals import limit_exceeded_message


def test_limit_messages_say_what_was_spent() -> None:
    charge = Charge("daily", "day:2026-11-22", "usd", 1000, 10000, None)
    text = limit_exceeded_message(charge, SpendTotal(9500, 9))
    assert text == (
        "budget of 100.00 USD per day; 95.00 USD already spent or reserved, this payment is 10.00 USD"
    )
    counted = Charge("daily", "day:2026-11-22", "usd", 1, None, 3)
    assert "at most 3 payments per day" in limit_exceeded_message(counted, SpendTotal(3, 3))


def test_the_limits_own_message_comes_first() -> None:
    charge = Charge("daily", "day:2026-11-22", "usd", 1, None, 3, message="ask finance")
    assert limit_exceeded_message(charge, SpendTotal(3, 3)) == (
        "ask finance (at most 3 payments per day; 3 already made or reserved)"
    )
