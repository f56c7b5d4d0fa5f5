"""A compiled policy set: the rules and limits of every policy file, ready to evaluate."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from proxy.model import ApprovalSpec
from proxy.policy.engine import Program

WINDOWS = ("payment", "hour", "day", "week", "month", "all_time")  # and "rolling:<seconds>"
MASK_BITS = 62  # rules per mask: CEL ints are 64-bit signed
EFFECTS = ("deny", "hold", "allow")


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    effect: str  # deny | hold | allow
    when: Program
    message: str
    source: str  # the CEL text, for reports
    hold_expiry: float | None = None
    message_expr: Program | None = None  # renders the message when the rule fires
    shadow: bool = False  # evaluated and recorded, never changes the outcome
    line: int = 0
    message_source: str | None = None
    approval: ApprovalSpec | None = None  # holds: who decides, quorum, veto, waiting
    lines: tuple[int, int] = (0, 0)  # of ``when`` and of ``message_expr``, for the checks across the set


@dataclass(frozen=True, slots=True)
class Limit:
    name: str
    window: str  # payment | hour | day | week | month | all_time | rolling:<seconds>
    currency: str
    max_amount: int | None
    max_count: int | None
    operations: frozenset[str] | None  # None: every operation that moves money
    when: Program | None = None
    message: str = ""
    line: int = 0
    source: str = ""  # the CEL text of ``when``, for checks across the set


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    file: str
    default: str  # allow | deny
    timezone: str
    labels: Mapping[str, str]  # the agent labels this policy applies to; empty: every agent
    hold_expiry: float
    rules: tuple[Rule, ...]
    limits: tuple[Limit, ...]
    shadow: bool = False
    failure_mode: str = "deny"  # deny | ignore: what a rule that fails to evaluate does
    # Every rule's ``when`` in one evaluation per chunk of MASK_BITS rules: an int whose bit i is set when
    # rule i matches. Any error in a chunk falls back to evaluating its rules one by one (to name it).
    masks: tuple[Program, ...] = ()
    line: int = 1  # of its name (or of the file's first line)

    def applies_to(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.labels.items())


@dataclass(frozen=True, slots=True)
class PolicySet:
    policies: tuple[Policy, ...]
    revision: str
    engine: str
    uses_spend: bool = False  # some rule reads ``spend``: the pipeline fetches totals only then
    limit_names: frozenset[str] = field(default_factory=frozenset)
    directory: str = ""

    def rules(self) -> list[tuple[Policy, Rule]]:
        return [(p, r) for p in self.policies for r in p.rules]
