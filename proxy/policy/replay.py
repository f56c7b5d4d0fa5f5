"""Replay: re-decide recorded history under a candidate policy set, before the owner merges it.

Each recorded authorization is decided again, in order, with the candidate's rules and limits: the
normalized payment as recorded, the agent's labels, the time it happened, and spend simulated from the
replayed history itself (what the candidate would have let through, less what the provider refused).
Raw provider parameters are not recorded (they can carry card data), so rules reading ``payment.params``
see an empty map.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from proxy.decide import decide, simulate_reservation
from proxy.model import DENY, Agent, Decision, Payment, SpendTotal
from proxy.policy.engine import Engine
from proxy.policy.model import PolicySet
from proxy.store import FAILED, REJECTED, AgentRecord, AuthorizationRecord


@dataclass(frozen=True, slots=True)
class Change:
    record: AuthorizationRecord
    agent: str
    was: tuple[str, str]
    now: Decision

    def describe(self) -> str:
        at = datetime.fromtimestamp(self.record.created_at, UTC).strftime("%Y-%m-%d %H:%M:%S")
        amount = f"{self.record.amount} {self.record.currency.upper()}".strip()
        return (
            f"{at}  {self.record.id}  {self.agent}  {self.record.operation} {amount}: "
            f"{self.was[0]} ({self.was[1]}) -> {self.now.outcome} ({self.now.rule}): {self.now.message}"
        )


def replay(
    history: Iterable[AuthorizationRecord],
    agents: Mapping[str, AgentRecord],
    policy_set: PolicySet,
    engine: Engine,
) -> tuple[int, list[Change]]:
    spend: dict[tuple[str, str, str], SpendTotal] = defaultdict(SpendTotal)
    count, changes = 0, []
    for record in history:
        count += 1
        agent_row = agents.get(record.agent_id)
        agent = Agent(
            record.agent_id,
            record.owner_id,
            agent_row.name if agent_row else record.agent_id,
            agent_row.connection_id if agent_row else "",
            dict(agent_row.labels) if agent_row else {},
        )
        p = record.payment
        payment = Payment(
            provider=record.provider,
            operation=record.operation,
            amount=record.amount,
            currency=record.currency,
            method=str(p.get("method", "POST")),
            path=str(p.get("path", "")),
            destination=record.destination,
            payee=str(p.get("payee", "")),
            payee_kind=str(p.get("payee_kind", "")),
            customer=str(p.get("customer", "")),
            description=str(p.get("description", "")),
            metadata=dict(p.get("metadata") or {}),
            refers_to=str(p.get("refers_to", "")),
        )
        when = datetime.fromtimestamp(record.created_at, UTC)
        totals: dict[str, SpendTotal] = {}
        for (agent_id, limit, period), total in spend.items():  # a rolling window sums its buckets
            if agent_id == record.agent_id and _current(policy_set, limit, period, when):
                old = totals.get(limit, SpendTotal())
                totals[limit] = SpendTotal(old.amount + total.amount, old.count + total.count)
        decision = simulate_reservation(decide(policy_set, engine, payment, agent, totals, when), totals)
        if decision.outcome != DENY and record.state not in (FAILED, REJECTED):
            for charge in decision.charges:
                old = spend[(record.agent_id, charge.limit, charge.period)]
                spend[(record.agent_id, charge.limit, charge.period)] = SpendTotal(
                    old.amount + charge.amount, old.count + 1
                )
        if (decision.outcome, decision.rule) != (record.decision, record.rule):
            changes.append(Change(record, agent.name, (record.decision, record.rule), decision))
    return count, changes


def _current(policy_set: PolicySet, limit: str, period: str, when: datetime) -> bool:
    from proxy.decide import period_of
    from proxy.windows import in_window

    for policy in policy_set.policies:
        for lim in policy.limits:
            if lim.name == limit and lim.window != "payment":
                return in_window(period_of(lim.window, when, policy.timezone), period)
    return False
