"""Policy tests: ``*_test.yaml`` files beside the policies, run by ``paysentry policy test DIR``.

A test file::

    defaults:                              # optional; merged into every case
      agent: {name: bot, labels: {team: ads}}
      now: "2026-11-23T15:00:00Z"
    tests:
      - name: small payments pass
        payment: {amount: 1000, currency: usd, metadata: {purpose: ads}}
        spend: {daily_budget: {amount: 9500, count: 3}}     # so far in the limit's current window
        expect: {decision: allow, rule: default}           # also: policy, message_contains, shadow

A case's payment may name its ``operation`` (else the first the adapters declare), ``provider`` (else the
first adapter producing the operation) and ``path`` (else that adapter's example path for it): the
caller passes the adapters' examples (``adapters.REGISTRY.examples``).

Each case is decided by the same core as the sidecar, and the declared limits are applied to ``spend``
the way the store's atomic reservation applies them. Exit codes: 0 all pass, 3 a policy is invalid,
4 a test fails (or a test file is malformed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from proxy.decide import decide, simulate_reservation
from proxy.model import DENY, UNRECOGNIZED, Agent, Decision, OperationExample, Payment, SpendTotal
from proxy.policy.engine import Engine
from proxy.policy.loader import load_policy_set
from proxy.policy.model import PolicySet

DEFAULT_NOW = "2026-01-05T12:00:00Z"
CASE_FIELDS = {"name", "payment", "agent", "spend", "now", "expect"}
EXPECT_FIELDS = {"decision", "rule", "policy", "message_contains", "shadow"}


class CaseError(ValueError):
    """A malformed test case."""


@dataclass
class CaseResult:
    file: str
    name: str
    passed: bool
    detail: str = ""


FIRES, DOES_NOT_FIRE, REFUSES = "fires", "does not fire", "refuses"


@dataclass
class TestReport:
    """The cases' results, and coverage: each rule needs a case where it fires and one where it is
    evaluated and does not; each limit a case it refuses."""

    engine: str
    results: list[CaseResult] = field(default_factory=list)
    rules: set[str] = field(default_factory=set)  # "policy.rule"
    limits: set[str] = field(default_factory=set)  # "policy.limit"
    seen: set[tuple[str, str]] = field(default_factory=set)  # (item, FIRES | DOES_NOT_FIRE | REFUSES)

    @property
    def failed(self) -> list[CaseResult]:
        return [r for r in self.results if not r.passed]

    def requirements(self) -> list[tuple[str, str]]:
        wanted = [(r, need) for r in sorted(self.rules) for need in (FIRES, DOES_NOT_FIRE)]
        return wanted + [(lim, REFUSES) for lim in sorted(self.limits)]

    def unexercised(self) -> list[str]:
        """What no case shows: ``p.big (does not fire)``, ``p.daily (refuses)``."""
        return [f"{item} ({need})" for item, need in self.requirements() if (item, need) not in self.seen]

    def coverage(self) -> float:
        """The share of requirements some case meets, in percent (100 with none)."""
        wanted = self.requirements()
        return 100.0 * sum((w in self.seen) for w in wanted) / len(wanted) if wanted else 100.0


@dataclass(frozen=True)
class _Run:
    """What the cases of one directory are decided with, and the report they go to."""

    policy_set: PolicySet
    engine: Engine
    examples: Sequence[OperationExample]
    report: TestReport


def run_directory(directory: str | Path, engine: Engine, examples: Sequence[OperationExample]) -> TestReport:
    """Load the policies of ``directory`` (PolicyError if invalid) and run its ``*_test.yaml`` files;
    ``examples`` are the operations the adapters produce, with a provider and path for each."""
    directory = Path(directory)
    operations = tuple(dict.fromkeys(e.operation for e in examples))
    policy_set = load_policy_set(directory, engine, operations=operations)
    report = TestReport(engine.name)
    report.rules = {f"{p.name}.{r.name}" for p in policy_set.policies for r in p.rules}
    report.limits = {f"{p.name}.{lim.name}" for p in policy_set.policies for lim in p.limits}
    files = sorted([*directory.glob("*_test.yaml"), *directory.glob("*_test.yml")])
    if not files:
        report.results.append(
            CaseResult(str(directory), "(no tests)", False, "no *_test.yaml file beside the policies")
        )
    run = _Run(policy_set, engine, examples, report)
    for path in files:
        _run_file(path, run)
    return report


def _run_file(path: Path, run: _Run) -> None:
    report = run.report
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        report.results.append(CaseResult(str(path), "(file)", False, f"cannot read the test file: {exc}"))
        return
    cases = doc.get("tests") if isinstance(doc, dict) else None
    if not isinstance(cases, list) or not cases:
        report.results.append(
            CaseResult(str(path), "(file)", False, "a test file needs a non-empty list: tests")
        )
        return
    defaults = doc.get("defaults") or {}
    for index, case in enumerate(cases):
        name = case.get("name", f"tests[{index}]") if isinstance(case, dict) else f"tests[{index}]"
        try:
            result = _run_case({**defaults, **case} if isinstance(case, dict) else case, run)
        except CaseError as exc:
            result = f"malformed case: {exc}"
        report.results.append(CaseResult(str(path), str(name), result is None, result or ""))


def _run_case(case: Any, run: _Run) -> str | None:
    if not isinstance(case, dict):
        raise CaseError("each test is a mapping")
    unknown = set(case) - CASE_FIELDS - {"defaults"}
    if unknown:
        raise CaseError(f"unknown field(s) {sorted(unknown)}; allowed: {sorted(CASE_FIELDS)}")
    expect = case.get("expect")
    if not isinstance(expect, dict) or "decision" not in expect or set(expect) - EXPECT_FIELDS:
        raise CaseError(f"expect needs decision, and may have {sorted(EXPECT_FIELDS - {'decision'})}")
    payment, agent = _payment(case.get("payment"), run.examples), _agent(case.get("agent") or {})
    spend = _spend(case.get("spend") or {})
    policy_set, report = run.policy_set, run.report
    decision = simulate_reservation(decide(policy_set, run.engine, payment, agent, spend, _time(case)), spend)
    _cover(report, policy_set, agent, decision)
    return _compare(expect, decision)


def _cover(report: TestReport, policy_set: PolicySet, agent: Agent, decision: Decision) -> None:
    fired = set(decision.fired)
    if decision.rule != "no_policy":
        for policy in policy_set.policies:
            if not policy.applies_to(agent.labels):
                continue
            for rule in policy.rules:
                key = f"{policy.name}.{rule.name}"
                if key in fired:
                    report.seen.add((key, FIRES))
                elif (decision.policy, decision.rule) != (policy.name, rule.name):  # not failed to evaluate
                    report.seen.add((key, DOES_NOT_FIRE))
    if decision.outcome == DENY and decision.rule in policy_set.limit_names:
        report.seen.add((f"{_policy_of(policy_set, decision.rule)}.{decision.rule}", REFUSES))


def _compare(expect: Mapping[str, Any], got: Decision) -> str | None:
    mismatches = []
    if expect["decision"] != got.outcome:
        mismatches.append(f"decision {got.outcome!r}, expected {expect['decision']!r}")
    if "rule" in expect and expect["rule"] != got.rule:
        mismatches.append(f"rule {got.rule!r}, expected {expect['rule']!r}")
    if "policy" in expect and expect["policy"] != got.policy:
        mismatches.append(f"policy {got.policy!r}, expected {expect['policy']!r}")
    if "message_contains" in expect and str(expect["message_contains"]) not in got.message:
        mismatches.append(f"message {got.message!r} does not contain {expect['message_contains']!r}")
    if "shadow" in expect and sorted(expect["shadow"] or []) != sorted(h.rule for h in got.shadow):
        mismatches.append(
            f"shadow rules {sorted(h.rule for h in got.shadow)}, expected {sorted(expect['shadow'])}"
        )
    if not mismatches:
        return None
    return "; ".join(mismatches) + f" (got {got.outcome} by {got.policy}.{got.rule}: {got.message})"


def _policy_of(policy_set: PolicySet, limit: str) -> str:
    return next((p.name for p in policy_set.policies for lim in p.limits if lim.name == limit), "?")


def _payment(raw: Any, examples: Sequence[OperationExample]) -> Payment:
    if not isinstance(raw, dict):
        raise CaseError("payment must be a mapping")
    operation = raw.get("operation", examples[0].operation)
    example = _example(examples, operation, raw.get("provider"))
    provider = str(raw.get("provider", (example or examples[0]).provider))
    amount = raw.get("amount", 0)
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise CaseError(f"payment amount must be an integer of minor units, got {amount!r}")
    return Payment(
        provider=provider,
        operation=operation,
        amount=amount,
        currency=str(raw.get("currency", "")).lower(),
        method=str(raw.get("method", "POST")),
        path=str(raw.get("path", example.path if example else "")),
        metadata={str(k): str(v) for k, v in (raw.get("metadata") or {}).items()},
        params=dict(raw.get("params") or {}),
        categories=tuple(str(c) for c in raw.get("categories") or ()),
        merchant={str(k): str(v) for k, v in (raw.get("merchant") or {}).items()},
        x402={str(k): str(v) for k, v in (raw.get("x402") or {}).items()},
        destination=str(raw.get("destination", "")),
        payee=str(raw.get("payee", "")),
        payee_kind=str(raw.get("payee_kind", "")),
        customer=str(raw.get("customer", "")),
        description=str(raw.get("description", "")),
    )


def _example(examples: Sequence[OperationExample], operation: Any, provider: Any) -> OperationExample | None:
    """The example request of ``operation``, from ``provider`` if it produces it (None: unrecognized)."""
    producing = [e for e in examples if e.operation == operation]
    if not producing and operation != UNRECOGNIZED:
        known = ", ".join(dict.fromkeys(e.operation for e in examples))
        raise CaseError(f"unknown operation {operation!r}; known: {known}, {UNRECOGNIZED}")
    return next((e for e in producing if e.provider == provider), producing[0] if producing else None)


def _agent(raw: Any) -> Agent:
    if not isinstance(raw, dict):
        raise CaseError("agent must be a mapping")
    labels = {str(k): str(v) for k, v in (raw.get("labels") or {}).items()}
    return Agent(
        str(raw.get("id", "agt_test")), "own_test", str(raw.get("name", "agent")), "conn_test", labels
    )


def _spend(raw: Any) -> dict[str, SpendTotal]:
    if not isinstance(raw, dict):
        raise CaseError("spend must map limit names to {amount, count}")
    return {
        str(k): SpendTotal(int((v or {}).get("amount", 0)), int((v or {}).get("count", 0)))
        for k, v in raw.items()
    }


def _time(case: Mapping[str, Any]) -> datetime:
    raw = case.get("now", DEFAULT_NOW)
    if isinstance(raw, datetime):
        return raw if raw.tzinfo else raw.replace(tzinfo=UTC)
    try:
        parsed = datetime.fromisoformat(str(raw).replace("Z", "+00:00"))
    except ValueError:
        raise CaseError(f"now must be an ISO 8601 time such as 2026-11-23T15:00:00Z, got {raw!r}") from None
    if parsed.tzinfo is None:
        raise CaseError("now needs a time zone offset (Z or +hh:mm)")
    return parsed
