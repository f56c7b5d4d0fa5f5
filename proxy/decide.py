"""The decision core: a pure function of (policy set, payment, agent, spend so far, time) to a Decision.

No I/O here. Combining: any deny wins, then any hold, else allow. A policy with ``default: deny`` denies
what none of its allow rules allows. A write the adapter does not recognise is denied unless some allow
rule matches it. An expression that fails to evaluate denies (fail closed), naming the rule.
Declared limits become Charges; the store reserves them atomically, so this module never reads a counter
to enforce a limit (``spend`` is given to rules for messages and holds only).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from proxy.currency import format_minor
from proxy.model import (
    ALLOW,
    DENY,
    HOLD,
    UNRECOGNIZED,
    Agent,
    ApprovalSpec,
    Charge,
    Decision,
    Payment,
    ShadowHit,
    SpendTotal,
)
from proxy.policy.engine import MERCHANT_FIELDS, X402_FIELDS, Engine, EvaluationError
from proxy.policy.model import MASK_BITS, Limit, Policy, PolicySet, Rule
from proxy.refusals import limit_exceeded_message
from proxy.windows import period_of

__all__ = ["decide", "period_of", "simulate_reservation", "spend_keys"]


@dataclass(frozen=True, slots=True)
class _Verdict:
    outcome: str
    rule: str
    policy: str
    message: str
    hold_expires_in: float | None = None
    approval: ApprovalSpec | None = None


def spend_keys(policy_set: PolicySet, agent: Agent, now: datetime) -> list[tuple[str, str]]:
    """(limit, period) of every windowed limit that may apply to this agent now: what rules may read."""
    return [
        (lim.name, period_of(lim.window, now, policy.timezone))
        for policy in policy_set.policies
        if policy.applies_to(agent.labels)
        for lim in policy.limits
        if lim.window != "payment"
    ]


def local_variables(now: datetime, timezone: str) -> dict[str, Any]:
    """``local.*``: the time in the policy's zone, as ``now.getHours(zone)`` and friends would give it
    (``day_of_week``: 0 is Sunday, as CEL's ``getDayOfWeek``)."""
    local = now.astimezone(ZoneInfo(timezone))
    day_of_week = local.isoweekday() % 7
    return {
        "local.year": local.year,
        "local.month": local.month,
        "local.day": local.day,
        "local.hour": local.hour,
        "local.minute": local.minute,
        "local.day_of_week": day_of_week,
        "local.weekend": day_of_week in (0, 6),
        "local.date": local.date().isoformat(),
        "local.time": f"{local:%H:%M}",
        "local.timezone": timezone,
    }


def activation_variables(
    payment: Payment,
    agent: Agent,
    spend: Mapping[str, SpendTotal],
    now: datetime,
    limit_names: Iterable[str],
    timezone: str = "UTC",
) -> dict[str, Any]:
    zero = SpendTotal()
    return {
        "payment.provider": payment.provider,
        "payment.operation": payment.operation,
        "payment.amount": payment.amount,
        "payment.currency": payment.currency,
        "payment.destination": payment.destination,
        "payment.payee": payment.payee,
        "payment.payee_kind": payment.payee_kind,
        "payment.customer": payment.customer,
        "payment.description": payment.description,
        "payment.metadata": dict(payment.metadata),
        "payment.params": dict(payment.params),
        "payment.categories": list(payment.categories),
        **{f"merchant.{name}": payment.merchant.get(name, "") for name in MERCHANT_FIELDS},
        **{f"x402.{name}": payment.x402.get(name, "") for name in X402_FIELDS},
        "request.method": payment.method,
        "request.path": payment.path,
        "agent.id": agent.id,
        "agent.name": agent.name,
        "agent.labels": dict(agent.labels),
        "spend": {n: {"amount": (t := spend.get(n, zero)).amount, "count": t.count} for n in limit_names},
        "now": now,
        **local_variables(now, timezone),
    }


def decide(
    policy_set: PolicySet,
    engine: Engine,
    payment: Payment,
    agent: Agent,
    spend: Mapping[str, SpendTotal],
    now: datetime,
) -> Decision:
    policies = [p for p in policy_set.policies if p.applies_to(agent.labels)]
    enforcing = [p for p in policies if not p.shadow]
    if not enforcing:
        return Decision(
            DENY,
            "no_policy",
            "",
            f"no policy applies to agent {agent.name!r}; PaySentry refuses payments that no policy covers",
            revision=policy_set.revision,
        )
    variables = activation_variables(payment, agent, spend, now, policy_set.limit_names)
    activations: dict[str, Any] = {}  # one per time zone of the policies (``local`` differs)

    def activation(policy: Policy) -> Any:
        if policy.timezone not in activations:
            activations[policy.timezone] = engine.activation(
                variables | local_variables(now, policy.timezone)
            )
        return activations[policy.timezone]

    outcome = _Evaluation(payment)
    for policy in policies:
        outcome.run(policy, activation(policy))
    verdict = _combine(outcome.verdicts, payment)
    extra: dict[str, Any] = {
        "revision": policy_set.revision,
        "shadow": tuple(outcome.shadow),
        "fired": tuple(outcome.fired),
    }
    if verdict.outcome == DENY:
        return _decision(verdict, (), **extra)
    charges: list[Charge] = []
    for policy in enforcing:
        for lim in policy.limits:
            if not _limit_applies(lim, payment, activation(policy)):
                continue
            if lim.window == "payment":
                if lim.max_amount is not None and payment.amount > lim.max_amount:
                    return Decision(
                        DENY, lim.name, policy.name, per_payment_message(lim, payment.amount), **extra
                    )
            elif payment.amount > payment.counted or not payment.counted:
                charges.append(
                    Charge(
                        lim.name,
                        period_of(lim.window, now, policy.timezone),
                        lim.currency,
                        payment.amount - payment.counted,
                        lim.max_amount,
                        lim.max_count,
                        lim.message,
                    )
                )
    return _decision(verdict, tuple(charges), **extra)


def _decision(verdict: _Verdict, charges: tuple[Charge, ...], **extra: Any) -> Decision:
    return Decision(
        verdict.outcome,
        verdict.rule,
        verdict.policy,
        verdict.message,
        charges,
        verdict.hold_expires_in,
        approval=verdict.approval,
        **extra,
    )


class _Evaluation:
    """Evaluates policies against one activation, collecting verdicts, shadow hits and fired rules."""

    def __init__(self, payment: Payment) -> None:
        self.payment = payment
        self.activation: Any = None  # the activation of the policy being run
        self.verdicts: list[_Verdict] = []
        self.shadow: list[ShadowHit] = []
        self.fired: list[str] = []

    def matches(self, policy: Policy) -> list[bool] | None:
        """Which rules match, from the policy's masks (one evaluation per chunk of rules); None when a
        mask is missing or fails, so that the rules are evaluated one by one and the failing one named."""
        if len(policy.masks) * MASK_BITS < len(policy.rules):
            return None
        found: list[bool] = []
        for i, mask in enumerate(policy.masks):
            try:
                bits = int(mask.evaluate(self.activation))
            except (EvaluationError, TypeError, ValueError):
                return None
            chunk = policy.rules[i * MASK_BITS : (i + 1) * MASK_BITS]
            found.extend(bool(bits >> j & 1) for j in range(len(chunk)))
        return found

    def run(self, policy: Policy, activation: Any) -> None:
        self.activation = activation
        fired: dict[str, _Verdict] = {}
        shadow: dict[str, _Verdict] = {}
        matches = self.matches(policy)
        for index, rule in enumerate(policy.rules):
            try:
                if matches is not None:
                    matched = matches[index]
                else:
                    matched = rule.when.evaluate(self.activation) is True
            except EvaluationError as exc:
                if policy.failure_mode == "ignore":
                    continue
                failed = _Verdict(
                    DENY,
                    rule.name,
                    policy.name,
                    f"rule could not be evaluated ({exc}); the policy fails closed",
                )
                if rule.shadow:
                    self.shadow.append(ShadowHit(policy.name, rule.name, DENY, failed.message))
                    continue
                self.verdicts.append(failed)
                return
            if not matched:
                continue
            self.fired.append(f"{policy.name}.{rule.name}")
            rule_verdict = _Verdict(
                rule.effect,
                rule.name,
                policy.name,
                self.message(rule),
                (rule.hold_expiry or policy.hold_expiry) if rule.effect == HOLD else None,
                (rule.approval or ApprovalSpec()) if rule.effect == HOLD else None,
            )
            target = shadow if rule.shadow else fired
            target.setdefault(rule.effect, rule_verdict)
        self.shadow.extend(ShadowHit(v.policy, v.rule, v.outcome, v.message) for v in shadow.values())
        verdict = self.policy_verdict(policy, fired)
        if verdict is not None and policy.shadow:
            self.shadow.append(ShadowHit(policy.name, verdict.rule, verdict.outcome, verdict.message))
        elif verdict is not None:
            self.verdicts.append(verdict)

    def policy_verdict(self, policy: Policy, fired: dict[str, _Verdict]) -> _Verdict | None:
        if self.payment.operation == UNRECOGNIZED and ALLOW not in fired:
            return None  # abstains: an unrecognized write needs an explicit allow somewhere
        for effect in (DENY, HOLD, ALLOW):
            if effect in fired:
                return fired[effect]
        if policy.default == DENY:
            return _Verdict(DENY, "default", policy.name, "no allow rule of this policy matches the payment")
        return _Verdict(ALLOW, "default", policy.name, "no rule matched; the policy allows by default")

    def message(self, rule: Rule) -> str:
        if rule.message_expr is not None:
            try:
                return str(rule.message_expr.evaluate(self.activation))
            except EvaluationError as exc:
                return f"{rule.message or rule.name} (its message could not be rendered: {exc})"
        return rule.message or f"matched {rule.source!r}"


def _combine(verdicts: list[_Verdict], payment: Payment) -> _Verdict:
    for outcome in (DENY, HOLD, ALLOW):
        for verdict in verdicts:
            if verdict.outcome == outcome:
                return verdict
    return _Verdict(
        DENY,
        "unrecognized_write",
        "",
        f"{payment.method} {payment.path} is not a call the "
        f"{payment.provider} adapter recognises, and no allow rule of the policy matches it",
    )


def simulate_reservation(decision: Decision, spend: Mapping[str, SpendTotal]) -> Decision:
    """What the store's atomic reservation would make of ``decision`` given ``spend`` (tests and replay)."""
    if decision.outcome == DENY:
        return decision
    for charge in decision.charges:
        total = spend.get(charge.limit, SpendTotal())
        over_amount = charge.max_amount is not None and total.amount + charge.amount > charge.max_amount
        over_count = charge.max_count is not None and total.count + 1 > charge.max_count
        if over_amount or over_count:
            return replace(
                decision,
                outcome=DENY,
                rule=charge.limit,
                charges=(),
                message=limit_exceeded_message(charge, total),
            )
    return decision


def _limit_applies(lim: Limit, payment: Payment, activation: Any) -> bool:
    if payment.operation == UNRECOGNIZED or payment.currency != lim.currency:
        return False
    if lim.operations is not None and not (
        payment.operation in lim.operations or payment.operation.split(".")[0] in lim.operations
    ):  # a limit on payment_intent also counts its confirm and capture: the money of that object
        return False
    if lim.when is None:
        return True
    try:
        return lim.when.evaluate(activation) is True
    except EvaluationError:
        return True  # when in doubt, the limit applies


def per_payment_message(lim: Limit, amount: int) -> str:
    cap = format_minor(lim.max_amount or 0, lim.currency)
    return (
        lim.message
        or f"a single payment may be at most {cap}; this one is {format_minor(amount, lim.currency)}"
    )
