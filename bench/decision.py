"""Decision time alone: the pure core deciding one payment, for 10 and 100 rules, on both CEL engines.

    python -m bench.decision [--iterations N]

Rules are realistic and mostly do not fire (the allow path evaluates every rule): amount thresholds,
currency and payee lists, metadata checks, agent labels, business hours in a time zone, and spend pacing,
with two declared limits.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

from adapters import REGISTRY
from proxy.decide import decide
from proxy.model import Agent, Payment, SpendTotal
from proxy.policy.engine import ENGINES, make_engine
from proxy.policy.loader import load_policy_set

TEMPLATES = [
    ("deny", "payment.amount > {big}"),
    ("deny", '!(payment.currency in ["usd", "eur", "gbp"])'),
    ("hold", '"purpose" in payment.metadata && payment.metadata["purpose"] == "purpose_{i}"'),
    ("deny", 'payment.operation == "transfer" && !(payment.destination in ["acct_{i}", "acct_x{i}"])'),
    ("deny", 'now.getHours("America/New_York") < 5 && payment.amount > {small}'),
    ("hold", 'agent.labels["team"] == "team_{i}" && payment.amount > {small}'),
    ("hold", "spend.daily_budget.amount + payment.amount > {big}"),
    ("deny", 'payment.customer.startsWith("cus_blocked_{i}")'),
    ("deny", 'payment.description.contains("forbidden_{i}")'),
    ("hold", "spend.daily_budget.count > {count}"),
]


def policy_text(rules: int, budget: int = 10_000_000) -> str:
    entries = []
    for i in range(rules):
        effect, when = TEMPLATES[i % len(TEMPLATES)]
        entries.append(
            {
                "name": f"rule_{i}",
                "effect": effect,
                "when": when.format(i=i, big=budget // 10 + i, small=500000 + i, count=budget // 1000 + i),
            }
        )
    return yaml.safe_dump(
        {
            "name": "bench",
            "limits": [
                {"name": "daily_budget", "window": "day", "currency": "usd", "max_amount": budget},
                {"name": "monthly_budget", "window": "month", "currency": "usd", "max_amount": budget * 10},
            ],
            "rules": entries,
        }
    )


def measure(engine_name: str, rules: int, iterations: int) -> tuple[float, float, float]:
    engine = make_engine(engine_name)
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "bench.yaml").write_text(policy_text(rules))
        started = time.perf_counter()
        policy_set = load_policy_set(folder, engine, operations=REGISTRY.operations)
        compile_ms = (time.perf_counter() - started) * 1000
    payment = Payment(
        provider="stripe",
        operation="payment_intent",
        amount=1500,
        currency="usd",
        method="POST",
        path="/v1/payment_intents",
        customer="cus_1",
        description="ads",
        metadata={"purpose": "ads"},
    )
    agent = Agent("agt_1", "own_1", "bot", "conn_1", {"team": "ads"})
    spend = {"daily_budget": SpendTotal(5000, 3), "monthly_budget": SpendTotal(50000, 30)}
    now = datetime(2026, 11, 23, 15, tzinfo=UTC)
    samples = []
    for _ in range(iterations):
        started = time.perf_counter_ns()
        decision = decide(policy_set, engine, payment, agent, spend, now)
        samples.append((time.perf_counter_ns() - started) / 1000)
    assert decision.outcome == "allow", decision
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1], compile_ms


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2000)
    args = parser.parse_args(argv)
    print("decision time (pure core, allow path: every rule evaluated)")
    print(f"{'engine':<16} {'rules':>5} {'p50 us':>9} {'p99 us':>9} {'compile ms':>11}")
    for name in ENGINES:
        for rules in (10, 100):
            iterations = args.iterations if name == "cel-expr-python" else max(200, args.iterations // 10)
            p50, p99, compile_ms = measure(name, rules, iterations)
            print(f"{name:<16} {rules:>5} {p50:>9.1f} {p99:>9.1f} {compile_ms:>11.1f}")


if __name__ == "__main__":
    main()
