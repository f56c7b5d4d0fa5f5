"""Load a directory of policy files into a compiled PolicySet, reporting every problem at once.

Stages: YAML parsing, structure (known fields, types, names), CEL compilation and type checking.
Each problem names the file, the line and the rule or limit it concerns. Files ending in
``_test.yaml`` are policy tests, not policies, and are skipped here.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from proxy.durations import parse_duration
from proxy.errors import PolicyError
from proxy.model import MONEY_OPERATIONS, OPERATIONS
from proxy.policy.engine import CompileError, Engine
from proxy.policy.model import EFFECTS, WINDOWS, Limit, Policy, PolicySet, Rule

NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
POLICY_FIELDS = {"name", "description", "default", "timezone", "applies_to", "hold_expiry", "limits", "rules"}
RULE_FIELDS = {"name", "description", "effect", "when", "message", "hold_expiry"}
LIMIT_FIELDS = {
    "name",
    "description",
    "window",
    "currency",
    "max_amount",
    "max_count",
    "operations",
    "when",
    "message",
}
DEFAULT_HOLD_EXPIRY = 24 * 3600.0


class _LineDict(dict):
    """A mapping that remembers the line of each key (1-based) and its own line."""

    line = 0
    lines: dict[str, int]


class _LineLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> _LineDict:
    mapping = _LineDict(loader.construct_mapping(node, deep=True))
    mapping.line = node.start_mark.line + 1
    mapping.lines = {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def policy_files(directory: Path) -> list[Path]:
    files = [*directory.glob("*.yaml"), *directory.glob("*.yml")]
    return sorted(p for p in files if not p.stem.endswith("_test"))


def load_policy_set(directory: str | Path, engine: Engine) -> PolicySet:
    """Compile every policy file of ``directory``; raise PolicyError listing every problem."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PolicyError([f"{directory}: not a directory of policy files"])
    files = policy_files(directory)
    if not files:
        raise PolicyError([f"{directory}: no policy files (*.yaml) found"])
    problems: list[str] = []
    policies = [p for f in files if (p := _load_file(f, engine, problems)) is not None]
    _check_unique(policies, problems)
    if problems:
        raise PolicyError(problems)
    return PolicySet(
        policies=tuple(policies),
        revision=revision_of(directory, files),
        engine=engine.name,
        uses_spend=any("spend" in r.source for p in policies for r in p.rules),
        limit_names=frozenset(lim.name for p in policies for lim in p.limits),
    )


def revision_of(directory: Path, files: Iterable[Path]) -> str:
    """The git commit when the directory is a clean checkout, else a hash of the files' content."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    content = "sha256:" + digest.hexdigest()[:16]
    try:
        head = subprocess.run(
            ["git", "-C", str(directory), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(directory), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return content
    return f"git:{head[:12]}" if head and not dirty else content


def _load_file(path: Path, engine: Engine, problems: list[str]) -> Policy | None:
    try:
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=_LineLoader)  # noqa: S506 (SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problems.append(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}")
        return None
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(f"{path}: cannot read: {exc}")
        return None
    if not isinstance(doc, _LineDict):
        problems.append(f"{path}:1: a policy file must be a mapping with rules and limits")
        return None
    return _PolicyReader(path, engine, problems).read(doc)


class _PolicyReader:
    def __init__(self, path: Path, engine: Engine, problems: list[str]) -> None:
        self.path, self.engine, self.problems = path, engine, problems

    def problem(self, node: _LineDict, key: str | None, what: str, text: str) -> None:
        line = node.lines.get(key, node.line) if key and hasattr(node, "lines") else getattr(node, "line", 1)
        self.problems.append(f"{self.path}:{line}: {what}: {text}")

    def read(self, doc: _LineDict) -> Policy | None:
        before = len(self.problems)
        self.unknown_fields(doc, POLICY_FIELDS, "policy")
        name = doc.get("name", self.path.stem)
        if not isinstance(name, str) or not NAME.match(name):
            self.problem(doc, "name", "policy", f"name {name!r} must be lowercase letters, digits and _")
        default = doc.get("default", "allow")
        if default not in ("allow", "deny"):
            self.problem(doc, "default", f"policy {name}", f"default must be allow or deny, not {default!r}")
        timezone = self.timezone(doc, name)
        hold_expiry = self.duration(doc, "hold_expiry", f"policy {name}", DEFAULT_HOLD_EXPIRY)
        labels = self.labels(doc, name)
        rules = tuple(r for r in self.items(doc, "rules", self.rule) if r)
        limits = tuple(lim for lim in self.items(doc, "limits", self.limit) if lim)
        if len(self.problems) > before:
            return None
        return Policy(
            name, str(self.path), default, timezone, labels, hold_expiry or DEFAULT_HOLD_EXPIRY, rules, limits
        )

    def unknown_fields(self, node: _LineDict, allowed: set[str], what: str) -> None:
        for key in node:
            if key not in allowed:
                self.problem(
                    node, key, what, f"unknown field {key!r} (allowed: {', '.join(sorted(allowed))})"
                )

    def timezone(self, doc: _LineDict, name: str) -> str:
        tz = doc.get("timezone", "UTC")
        try:
            ZoneInfo(str(tz))
        except (ZoneInfoNotFoundError, ValueError):
            self.problem(doc, "timezone", f"policy {name}", f"unknown time zone {tz!r}")
        return str(tz)

    def labels(self, doc: _LineDict, name: str) -> dict[str, str]:
        selector = doc.get("applies_to") or {}
        labels = selector.get("labels", {}) if isinstance(selector, dict) else None
        if not isinstance(labels, dict) or set(selector) - {"labels"}:
            self.problem(doc, "applies_to", f"policy {name}", "applies_to takes only labels: {key: value}")
            return {}
        return {str(k): str(v) for k, v in labels.items()}

    def duration(self, node: _LineDict, key: str, what: str, default: float | None) -> float | None:
        if key not in node:
            return default
        try:
            return parse_duration(node[key])
        except ValueError as exc:
            self.problem(node, key, what, str(exc))
            return default

    def items(self, doc: _LineDict, key: str, read: Any) -> list[Any]:
        entries = doc.get(key) or []
        if not isinstance(entries, list):
            self.problem(doc, key, "policy", f"{key} must be a list")
            return []
        out = []
        for index, entry in enumerate(entries):
            if not isinstance(entry, _LineDict):
                self.problem(doc, key, f"{key}[{index}]", "each entry must be a mapping")
                continue
            out.append(read(entry, index))
        return out

    def named(self, node: _LineDict, kind: str, index: int) -> str:
        name = node.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            self.problem(
                node, "name", f"{kind}[{index}]", f"name {name!r} must be lowercase letters, digits and _"
            )
            return f"{kind}[{index}]"
        return name

    def compile(self, node: _LineDict, key: str, what: str, result: str) -> Any:
        source = node.get(key)
        if not isinstance(source, str) or not source.strip():
            self.problem(node, key, what, f"{key} must be a CEL expression")
            return None
        try:
            return self.engine.compile(source, result)
        except CompileError as exc:
            self.problem(node, key, what, f"{key}: {exc}")
            return None

    def rule(self, node: _LineDict, index: int) -> Rule | None:
        name = self.named(node, "rule", index)
        what = f"rule {name}"
        self.unknown_fields(node, RULE_FIELDS, what)
        effect = node.get("effect")
        if effect not in EFFECTS:
            self.problem(node, "effect", what, f"effect must be one of {', '.join(EFFECTS)}, not {effect!r}")
        message = node.get("message", "")
        if not isinstance(message, str):
            self.problem(node, "message", what, "message must be a string")
        hold_expiry = self.duration(node, "hold_expiry", what, None)
        if hold_expiry is not None and effect != "hold":
            self.problem(node, "hold_expiry", what, "hold_expiry only applies to rules whose effect is hold")
        program = self.compile(node, "when", what, "bool")
        if program is None or effect not in EFFECTS:
            return None
        return Rule(name, effect, program, str(message), node["when"], hold_expiry)

    def limit(self, node: _LineDict, index: int) -> Limit | None:
        name = self.named(node, "limit", index)
        what = f"limit {name}"
        self.unknown_fields(node, LIMIT_FIELDS, what)
        before = len(self.problems)
        window = node.get("window")
        if window not in WINDOWS:
            self.problem(node, "window", what, f"window must be one of {', '.join(WINDOWS)}, not {window!r}")
        currency = node.get("currency")
        if not isinstance(currency, str) or not re.fullmatch(r"[a-zA-Z]{3}", currency):
            self.problem(node, "currency", what, "currency must be a three-letter ISO code such as usd")
        max_amount = self.whole(node, "max_amount", what)
        max_count = self.whole(node, "max_count", what)
        if "max_amount" not in node and "max_count" not in node:
            self.problem(node, None, what, "a limit needs max_amount (minor units), max_count, or both")
        if window == "payment" and max_count is not None:
            self.problem(node, "max_count", what, "a per-payment limit cannot count payments")
        operations = self.operations(node, what)
        when = self.compile(node, "when", what, "bool") if "when" in node else None
        if len(self.problems) > before:
            return None
        return Limit(
            name,
            str(window),
            str(currency).lower(),
            max_amount,
            max_count,
            operations,
            when,
            str(node.get("message", "")),
        )

    def whole(self, node: _LineDict, key: str, what: str) -> int | None:
        value = node.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            self.problem(
                node, key, what, f"{key} must be a whole number of minor units (cents), got {value!r}"
            )
            return None
        return value

    def operations(self, node: _LineDict, what: str) -> frozenset[str] | None:
        ops = node.get("operations")
        if ops is None:
            return None
        if not isinstance(ops, list) or not ops:
            self.problem(node, "operations", what, "operations must be a non-empty list")
            return None
        unknown = [op for op in ops if op not in OPERATIONS]
        if unknown:
            self.problem(
                node,
                "operations",
                what,
                f"unknown operation(s) {unknown}; known: {', '.join(MONEY_OPERATIONS)}",
            )
        return frozenset(ops)


def _check_unique(policies: list[Policy], problems: list[str]) -> None:
    seen: dict[str, str] = {}
    for policy in policies:
        names = [("policy", policy.name)] + [("rule", r.name) for r in policy.rules]
        names += [("limit", lim.name) for lim in policy.limits]
        for kind, name in names:
            key = f"{kind}:{name}" if kind == "policy" else f"item:{policy.name}:{name}"
            if kind == "limit":
                key = f"limit:{name}"  # limits share one spend namespace across files
            if key in seen:
                problems.append(f"{policy.file}: duplicate {kind} name {name!r} (also in {seen[key]})")
            seen[key] = policy.file
