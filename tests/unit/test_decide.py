"""The decision core, with a fixed clock and policies compiled from text."""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from proxy.decide import decide, period_of
from proxy.model import Agent, Charge, Payment, SpendTotal
from proxy.policy.engine import CelExprEngine
from proxy.policy.loader import load_policy_set

NOW = datetime(2026, 11, 22, 15, 30, tzinfo=UTC)
AGENT = Agent("agt_1", "own_1", "bot", "conn_1", {"team": "ads"})
ENGINE = CelExprEngine()
OPERATIONS = ("payment_intent", "charge", "refund")  # the core knows operations only as names it is given


def policies(tmp_path: Path, *texts: str):
    for i, text in enumerate(texts):
        (tmp_path / f"p{i}.yaml").write_text(textwrap.dedent(text))
    return load_policy_set(tmp_path, ENGINE, operations=OPERATIONS)


def pay(amount: int = 1000, currency: str = "usd", operation: str = "payment_intent", **kw) -> Payment:
    return Payment(
        provider="stripe",
        operation=operation,
        amount=amount,
        currency=currency,
        method="POST",
        path="/v1/payment_intents",
        **kw,
    )


BASIC = """
    name: basic
    limits:
      - {name: cap, window: payment, currency: usd, max_amount: 5000}
      - {name: daily, window: day, currency: usd, max_amount: 10000, max_count: 3}
      - {name: refunds, window: month, currency: usd, max_amount: 2000, operations: [refund]}
    rules:
      - {name: euro, effect: deny, when: 'payment.currency == "eur"', message: no euros}
      - {name: big, effect: hold, when: payment.amount > 3000, message: big one}
      - {name: vip, effect: allow, when: 'agent.labels["team"] == "ads"'}
"""


def test_allow_charges_the_applicable_windows(tmp_path: Path) -> None:
    decision = decide(policies(tmp_path, BASIC), ENGINE, pay(1000), AGENT, {}, NOW)
    assert (decision.outcome, decision.rule) == ("allow", "vip")
    assert decision.charges == (Charge("daily", "day:2026-11-22", "usd", 1000, 10000, 3, ""),)


def test_deny_wins_over_hold_and_allow(tmp_path: Path) -> None:
    decision = decide(policies(tmp_path, BASIC), ENGINE, pay(4000, "eur"), AGENT, {}, NOW)
    assert (decision.outcome, decision.rule, decision.message) == ("deny", "euro", "no euros")
    assert decision.charges == ()


def test_hold_wins_over_allow_and_reserves(tmp_path: Path) -> None:
    decision = decide(policies(tmp_path, BASIC), ENGINE, pay(4000), AGENT, {}, NOW)
    assert (decision.outcome, decision.rule) == ("hold", "big")
    assert decision.hold_expires_in == 24 * 3600
    assert [c.limit for c in decision.charges] == ["daily"]


def test_per_payment_limit_denies(tmp_path: Path) -> None:
    decision = decide(policies(tmp_path, BASIC), ENGINE, pay(6000), AGENT, {}, NOW)
    assert (decision.outcome, decision.rule) == ("deny", "cap")
    assert "at most 50.00 USD" in decision.message


def test_operation_filter_and_currency_select_limits(tmp_path: Path) -> None:
    refund = decide(policies(tmp_path, BASIC), ENGINE, pay(500, operation="refund"), AGENT, {}, NOW)
    # "daily" names no operations, so it counts every money-moving call; "refunds" only refunds.
    assert [c.limit for c in refund.charges] == ["daily", "refunds"]
    assert refund.charges[1].period == "month:2026-11"
    intent = decide(policies(tmp_path, BASIC), ENGINE, pay(500), AGENT, {}, NOW)
    assert [c.limit for c in intent.charges] == ["daily"]
    other = decide(policies(tmp_path, BASIC), ENGINE, pay(500, "gbp"), AGENT, {}, NOW)
    assert other.charges == ()


def test_policy_default_deny(tmp_path: Path) -> None:
    ps = policies(
        tmp_path,
        """
        name: strict
        default: deny
        rules:
          - {name: small, effect: allow, when: payment.amount <= 100}
    """,
    )
    assert decide(ps, ENGINE, pay(100), AGENT, {}, NOW).outcome == "allow"
    denied = decide(ps, ENGINE, pay(101), AGENT, {}, NOW)
    assert (denied.outcome, denied.rule, denied.policy) == ("deny", "default", "strict")


def test_unrecognized_write_needs_an_explicit_allow(tmp_path: Path) -> None:
    odd = Payment(
        provider="stripe",
        operation="unrecognized",
        amount=0,
        currency="",
        method="POST",
        path="/v1/subscriptions",
    )
    ps = policies(tmp_path, "name: plain\nrules: []\n")
    denied = decide(ps, ENGINE, odd, AGENT, {}, NOW)
    assert (denied.outcome, denied.rule) == ("deny", "unrecognized_write")
    assert "/v1/subscriptions" in denied.message
    (tmp_path / "p1.yaml").write_text(
        "name: subs\nrules:\n  - {name: subs_ok, effect: allow, when: 'request.path == \"/v1/subscriptions\"'}\n"
    )
    allowed = decide(load_policy_set(tmp_path, ENGINE, operations=OPERATIONS), ENGINE, odd, AGENT, {}, NOW)
    assert (allowed.outcome, allowed.rule) == ("allow", "subs_ok")


def test_evaluation_error_fails_closed(tmp_path: Path) -> None:
    ps = policies(
        tmp_path,
        """
        name: meta
        rules:
          - {name: purpose, effect: hold, when: 'payment.metadata["purpose"] == "ads"'}
    """,
    )
    decision = decide(ps, ENGINE, pay(100), AGENT, {}, NOW)
    assert (decision.outcome, decision.rule) == ("deny", "purpose")
    assert "could not be evaluated" in decision.message


def test_rules_read_spend_so_far(tmp_path: Path) -> None:
    ps = policies(
        tmp_path,
        """
        name: pace
        limits:
          - {name: daily, window: day, currency: usd, max_amount: 10000}
        rules:
          - {name: pace, effect: hold, when: spend.daily.amount + payment.amount > 8000}
    """,
    )
    assert ps.uses_spend
    assert decide(ps, ENGINE, pay(1000), AGENT, {"daily": SpendTotal(7500, 3)}, NOW).outcome == "hold"
    assert decide(ps, ENGINE, pay(1000), AGENT, {"daily": SpendTotal(1000, 1)}, NOW).outcome == "allow"


def test_policies_apply_by_agent_label(tmp_path: Path) -> None:
    ps = policies(
        tmp_path,
        """
        name: finance_only
        applies_to: {labels: {team: finance}}
        rules: []
    """,
    )
    decision = decide(ps, ENGINE, pay(100), AGENT, {}, NOW)
    assert (decision.outcome, decision.rule) == ("deny", "no_policy")


def test_a_call_on_a_counted_object_charges_only_what_it_adds(tmp_path: Path) -> None:
    confirm = pay(1000, operation="payment_intent.confirm", counted=1000)
    assert decide(policies(tmp_path, BASIC), ENGINE, confirm, AGENT, {}, NOW).charges == ()
    over = pay(1150, operation="payment_intent.capture", counted=1000)  # an over-capture of 15%
    charges = decide(policies(tmp_path, BASIC), ENGINE, over, AGENT, {}, NOW).charges
    assert charges and {c.amount for c in charges} == {150}


@pytest.mark.parametrize(
    ("window", "tz", "expected"),
    [
        ("day", "UTC", "day:2026-11-22"),
        ("day", "Pacific/Kiritimati", "day:2026-11-23"),
        ("week", "UTC", "week:2026-W47"),
        ("month", "America/New_York", "month:2026-11"),
        ("hour", "America/New_York", f"hour:{NOW.astimezone(ZoneInfo('America/New_York')):%Y-%m-%dT%H}-0500"),
        ("all_time", "UTC", "all_time"),
        ("rolling:3600", "UTC", f"rolling:3600:{int(NOW.timestamp()) // 60:012d}"),
        ("rolling:2592000", "UTC", f"rolling:2592000:{int(NOW.timestamp()) // 43200:012d}"),
    ],
)
def test_periods_follow_the_policy_time_zone(window: str, tz: str, expected: str) -> None:
    assert period_of(window, NOW, tz) == expected


def test_shadow_rules_and_policies_are_recorded_not_enforced(tmp_path: Path) -> None:
    ps = policies(
        tmp_path,
        """
        name: live
        rules:
          - {name: trial, mode: shadow, effect: deny, when: payment.amount > 500, message: would refuse}
    """,
        """
        name: candidate
        mode: shadow
        default: deny
        rules: []
    """,
    )
    decision = decide(ps, ENGINE, pay(1000), AGENT, {}, NOW)
    assert (decision.outcome, decision.rule) == ("allow", "default")
    assert {(h.policy, h.rule, h.effect) for h in decision.shadow} == {
        ("live", "trial", "deny"),
        ("candidate", "default", "deny"),
    }


def test_failure_mode_ignore_skips_a_broken_rule(tmp_path: Path) -> None:
    ps = policies(
        tmp_path,
        """
        name: lenient
        failure_mode: ignore
        rules:
          - {name: purpose, effect: deny, when: 'payment.metadata["purpose"] == "gambling"'}
    """,
    )
    assert decide(ps, ENGINE, pay(100), AGENT, {}, NOW).outcome == "allow"


def test_messages_can_be_rendered_by_cel(tmp_path: Path) -> None:
    ps = policies(
        tmp_path,
        """
        name: budget
        limits:
          - {name: daily, window: day, currency: usd, max_amount: 10000}
        rules:
          - name: pace
            effect: hold
            when: spend.daily.amount + payment.amount > 8000
            message_expr: '"over 80% of the daily budget by " + string(spend.daily.amount + payment.amount - 8000)'
    """,
    )
    decision = decide(ps, ENGINE, pay(1000), AGENT, {"daily": SpendTotal(7500, 3)}, NOW)
    assert decision.message == "over 80% of the daily budget by 500"


def test_costly_or_misplaced_constructs_are_rejected_at_load(tmp_path: Path) -> None:
    from proxy.errors import PolicyError

    nested = "payment.params.exists(a, payment.params.exists(b, payment.params.exists(c, a == b && b == c)))"
    (tmp_path / "p.yaml").write_text(
        f"name: p\nrules:\n  - name: slow\n    effect: deny\n    when: '{nested}'\n"
        "  - {name: huge, effect: deny, when: '" + " || ".join(["payment.amount > 1"] * 200) + "'}\n"
    )
    (tmp_path / "s.yaml").write_text(
        "name: s\nmode: shadow\nlimits:\n  - {name: d, window: day, currency: usd, max_amount: 1}\n"
    )
    with pytest.raises(PolicyError) as caught:
        load_policy_set(tmp_path, ENGINE, operations=OPERATIONS)
    text = "\n".join(caught.value.problems)
    assert "comprehensions nested 3 deep are too costly" in text
    assert "is too long" in text
    assert "limits are enforced by the store and cannot be shadowed" in text


def test_rules_evaluated_together_match_as_one_by_one(tmp_path: Path) -> None:
    """Rules are evaluated as bit masks of 62; the outcome is the same as one rule at a time, past the
    first mask, with a comment ending a rule, and when one rule fails (then they run one by one)."""
    rules = [
        f"  - {{name: r{i}, effect: deny, when: 'payment.amount == {10_000 + i} // amount {i}'}}"
        for i in range(130)
    ]
    text = "name: many\nrules:\n" + "\n".join(rules) + "\n"
    policy_set = policies(tmp_path, text)
    assert len(policy_set.policies[0].masks) == 3
    for i in (0, 61, 62, 100, 129):
        decision = decide(policy_set, ENGINE, pay(10_000 + i), AGENT, {}, NOW)
        assert (decision.outcome, decision.rule) == ("deny", f"r{i}")
    assert decide(policy_set, ENGINE, pay(5), AGENT, {}, NOW).outcome == "allow"
    folder = tmp_path / "failing"
    folder.mkdir()
    failing = policies(
        folder,
        """
        name: failing
        rules:
          - {name: fine, effect: deny, when: 'payment.amount == 1'}
          - {name: broken, effect: deny, when: 'payment.metadata["missing"] == "x"'}
        """,
    )
    for amount in (1, 2):  # a rule that fails denies naming itself, whatever the others matched
        decision = decide(failing, ENGINE, pay(amount), AGENT, {}, NOW)
        assert (decision.outcome, decision.rule) == ("deny", "broken")
        assert "could not be evaluated" in decision.message


def test_a_rolling_limit_charges_the_bucket_of_now_and_rules_read_its_window(tmp_path: Path) -> None:
    ps = policies(
        tmp_path,
        """
        limits:
          - {name: hourly, rolling: 1h, currency: usd, max_count: 5}
        rules:
          - {name: busy, effect: hold, when: 'spend.hourly.count >= 4'}
        """,
    )
    [charge] = decide(ps, ENGINE, pay(), AGENT, {}, NOW).charges
    assert charge.period == f"rolling:3600:{int(NOW.timestamp()) // 60:012d}" and charge.max_count == 5
    assert decide(ps, ENGINE, pay(), AGENT, {"hourly": SpendTotal(4000, 4)}, NOW).outcome == "hold"


def test_local_is_now_in_each_policys_time_zone(tmp_path: Path) -> None:
    """15:30 UTC on Sunday 22 Nov 2026 is 10:30 in New York and 00:30 on Monday in Tokyo."""
    ps = policies(
        tmp_path,
        """
        name: ny
        timezone: America/New_York
        rules:
          - {name: ny_weekend_morning, effect: hold, when: 'local.weekend && local.hour == 10 && local.day_of_week == 0'}
        """,
        """
        name: tokyo
        timezone: Asia/Tokyo
        rules:
          - {name: tokyo_monday, effect: hold, when: 'local.day_of_week == 1 && local.date == "2026-11-23" && local.time == "00:30"'}
        """,
    )
    decision = decide(ps, ENGINE, pay(), AGENT, {}, NOW)
    assert set(decision.fired) == {"ny.ny_weekend_morning", "tokyo.tokyo_monday"}
