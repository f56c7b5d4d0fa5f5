"""Load a directory of policy files into a compiled PolicySet, reporting every problem at once.

Stages, each problem naming the file, the line and the rule or limit it concerns:

1. YAML: the file parses;
2. schema: it matches ``policy.schema.json`` (known fields, types, names, enums), with the operations
   the adapters produce (given by the caller: the registry's) as the enum of a limit's operations;
3. semantics: time zones, durations, limit shapes, cost bounds, unique names across the set;
4. CEL: every expression compiles and type-checks against the declared variables.

Entries that fail an earlier stage are not carried into later ones, so each mistake is reported once.
Files ending in ``_test.yaml`` are policy tests, not policies, and are skipped here.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from copy import deepcopy
from functools import cache
from pathlib import Path
from typing import Any, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import jsonschema
import yaml

from proxy.durations import parse_duration
from proxy.errors import PolicyError
from proxy.model import ApprovalSpec, Reviewer
from proxy.policy.engine import CompileError, Engine
from proxy.policy.model import MASK_BITS, Limit, Policy, PolicySet, Rule
from proxy.windows import rolling_window

SCHEMA_FILE = Path(__file__).with_name("policy.schema.json")
DEFAULT_HOLD_EXPIRY = 24 * 3600.0
MAX_COMPREHENSION_DEPTH = 2  # exists/all/map/filter nested deeper than this is rejected as too costly
MAX_RULES = 1000
_MACRO = re.compile(r"\.(exists_one|exists|all|map|filter)\s*\($")


class _LineDict(dict[Any, Any]):
    """A mapping that remembers its own line and the line of each key (1-based)."""

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


@cache
def _source_schema() -> dict[str, Any]:
    return cast(dict[str, Any], json.loads(SCHEMA_FILE.read_text()))


def policy_schema(operations: Sequence[str]) -> dict[str, Any]:
    """The JSON schema of a policy file, naming ``operations`` as the ones a limit may count."""
    schema = deepcopy(_source_schema())
    schema["$defs"]["operation"] = {
        "enum": list(operations),
        "description": "An operation some adapter produces.",
    }
    return schema


@cache
def _validator(operations: tuple[str, ...]) -> jsonschema.protocols.Validator:
    schema = policy_schema(operations)
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema)


def policy_files(directory: Path) -> list[Path]:
    files = [*directory.glob("*.yaml"), *directory.glob("*.yml")]
    return sorted(p for p in files if not p.stem.endswith("_test"))


def load_policy_set(directory: str | Path, engine: Engine, *, operations: Sequence[str]) -> PolicySet:
    """Compile every policy file of ``directory``, whose limits may count ``operations`` (those the
    adapters produce); raise PolicyError listing every problem."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PolicyError([f"{directory}: not a directory of policy files"])
    files = policy_files(directory)
    if not files:
        raise PolicyError([f"{directory}: no policy files (*.yaml) found"])
    problems: list[str] = []
    validator = _validator(tuple(operations))
    partial: list[Policy] = []
    policies = [p for f in files if (p := _load_file(f, engine, validator, problems, partial)) is not None]
    checked = sorted([*policies, *partial], key=lambda p: p.file)  # every file's sound entries, in order
    _check_unique(checked, problems)
    _check_expressions(checked, problems)
    if sum(len(p.rules) for p in policies) > MAX_RULES:
        problems.append(f"{directory}: more than {MAX_RULES} rules in one policy set")
    if problems:
        raise PolicyError(problems)
    return PolicySet(
        policies=tuple(policies),
        revision=revision_of(directory, files),
        engine=engine.name,
        uses_spend=any(_reads_spend(r) for p in policies for r in p.rules),
        limit_names=frozenset(lim.name for p in policies for lim in p.limits),
        directory=str(directory),
    )


def _reads_spend(rule: Rule) -> bool:
    return "spend" in rule.source or bool(rule.message_expr and "spend" in (rule.message_source or ""))


def revision_of(directory: Path, files: Iterable[Path]) -> str:
    """The git commit when the directory is a clean checkout, else a hash of the files' content."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    content = "sha256:" + digest.hexdigest()[:16]
    try:
        git = ["git", "-C", str(directory)]
        head = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "."], capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return content
    return f"git:{head.stdout.strip()[:12]}" if head.stdout.strip() and not dirty.stdout.strip() else content


def _load_file(
    path: Path,
    engine: Engine,
    validator: jsonschema.protocols.Validator,
    problems: list[str],
    partial: list[Policy],
) -> Policy | None:
    try:
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=_LineLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problems.append(f"{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}")
        return None
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(f"{path}: cannot read: {exc}")
        return None
    if not isinstance(doc, _LineDict):
        problems.append(f"{path}:1: a policy file must be a mapping with rules and limits")
        return None
    return _PolicyReader(path, engine, validator, problems, partial).read(doc)


def _line_of(doc: Any, path: Sequence[Any]) -> int:
    node, line = doc, getattr(doc, "line", 1)
    for part in path:
        if isinstance(node, _LineDict) and part in node:
            line = node.lines.get(part, line)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
            line = getattr(node, "line", line)
        else:
            break
    return line


def _balanced_sum(terms: list[str]) -> str:
    """``a + b + c + d`` as ``((a + b) + (c + d))``: CEL parsers limit nesting depth (32 in cel-cpp)."""
    if len(terms) == 1:
        return terms[0]
    middle = len(terms) // 2
    return f"({_balanced_sum(terms[:middle])} + {_balanced_sum(terms[middle:])})"


def _comprehension_depth(source: str) -> int:
    """How deeply exists/all/map/filter macros nest in ``source`` (string literals skipped)."""
    stack: list[bool] = []
    depth, quote, i = 0, "", 0
    while i < len(source):
        ch = source[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch == "(":
            stack.append(bool(_MACRO.search(source[: i + 1])))
            depth = max(depth, sum(stack))
        elif ch == ")" and stack:
            stack.pop()
        i += 1
    return depth


class _PolicyReader:
    def __init__(
        self,
        path: Path,
        engine: Engine,
        validator: jsonschema.protocols.Validator,
        problems: list[str],
        partial: list[Policy],
    ) -> None:
        self.path, self.engine, self.validator, self.problems = path, engine, validator, problems
        self.partial = partial  # what was sound of files that have problems, for the set's checks

    def report(self, line: int, what: str, text: str) -> None:
        self.problems.append(f"{self.path}:{line}: {what}: {text}")

    def read(self, doc: _LineDict) -> Policy | None:
        before = len(self.problems)
        invalid = self.schema_stage(doc)
        name = doc.get("name", self.path.stem)
        if () not in invalid and not isinstance(doc.get("name", ""), str):
            return None
        if ("name",) not in invalid and "name" not in doc and not re.fullmatch(r"[a-z][a-z0-9_]{0,62}", name):
            self.report(
                1, "policy", f"the file name {self.path.stem!r} is not a valid policy name; add a name"
            )
        timezone = str(doc.get("timezone", "UTC"))
        if ("timezone",) not in invalid:
            try:
                ZoneInfo(timezone)
            except (ZoneInfoNotFoundError, ValueError):
                self.report(doc.lines.get("timezone", 1), f"policy {name}", f"unknown time zone {timezone!r}")
        shadow = doc.get("mode") == "shadow"
        self.groups = doc.get("groups", {}) if ("groups",) not in invalid else {}
        self.reviewers = doc.get("reviewers", {}) if ("reviewers",) not in invalid else {}
        rules = tuple(
            rule
            for i, node in enumerate(doc.get("rules") or [])
            if ("rules", i) not in invalid and (rule := self.rule(node, shadow)) is not None
        )
        limits = tuple(
            limit
            for i, node in enumerate(doc.get("limits") or [])
            if ("limits", i) not in invalid and (limit := self.limit(node, shadow)) is not None
        )
        if len(self.problems) > before:  # its sound rules and limits still take part in the set's checks
            self.partial.append(
                Policy(
                    str(name),
                    str(self.path),
                    "allow",
                    "UTC",
                    {},
                    0.0,
                    rules,
                    limits,
                    line=doc.lines.get("name", 1),
                )
            )
            return None
        hold_expiry = parse_duration(doc.get("hold_expiry", DEFAULT_HOLD_EXPIRY))
        labels = {str(k): str(v) for k, v in (doc.get("applies_to") or {}).get("labels", {}).items()}
        return Policy(
            name,
            str(self.path),
            doc.get("default", "allow"),
            timezone,
            labels,
            hold_expiry,
            rules,
            limits,
            shadow,
            doc.get("failure_mode", "deny"),
            self.masks(rules),
            doc.lines.get("name", 1),
        )

    def masks(self, rules: Sequence[Rule]) -> tuple[Any, ...]:
        """The rules' conditions as one expression per MASK_BITS rules (one call into CEL instead of one
        per rule). Only a speed-up: if one does not compile, the rules are evaluated one by one."""
        masks = []
        for start in range(0, len(rules), MASK_BITS):
            chunk = rules[start : start + MASK_BITS]
            source = _balanced_sum(
                [f"(((\n{r.source}\n) == true) ? {1 << i} : 0)" for i, r in enumerate(chunk)]
            )
            try:
                masks.append(self.engine.compile(source, "int"))
            except CompileError:
                return ()
        return tuple(masks)

    def schema_stage(self, doc: _LineDict) -> set[tuple[Any, ...]]:
        """Report schema errors; return the paths (entry level) that later stages must skip."""
        invalid: set[tuple[Any, ...]] = set()
        errors = sorted(
            self.validator.iter_errors(doc), key=lambda e: (_line_of(doc, e.absolute_path), e.message)
        )
        for error in errors:
            path = tuple(error.absolute_path)
            entry = path[:2] if path and path[0] in ("rules", "limits") else path[:1]
            invalid.add(entry)
            self.report(_line_of(doc, path), self.describe(doc, path), _schema_message(error))
        return invalid

    @staticmethod
    def describe(doc: _LineDict, path: Sequence[Any]) -> str:
        if len(path) >= 2 and path[0] in ("rules", "limits"):
            kind = path[0][:-1]
            entry = doc[path[0]][path[1]]
            name = entry.get("name") if isinstance(entry, dict) else None
            where = f"{kind} {name}" if isinstance(name, str) else f"{path[0]}[{path[1]}]"
            return where + (f" ({'.'.join(map(str, path[2:]))})" if len(path) > 2 else "")
        return "policy" + (f" ({'.'.join(map(str, path))})" if path else "")

    def compile(self, node: _LineDict, key: str, what: str, result: str) -> Any:
        source = node[key]
        depth = _comprehension_depth(source)
        if depth > MAX_COMPREHENSION_DEPTH:
            self.report(
                node.lines.get(key, node.line),
                what,
                f"{key}: comprehensions nested {depth} deep are too "
                f"costly to evaluate per payment (at most {MAX_COMPREHENSION_DEPTH})",
            )
            return None
        try:
            program = self.engine.compile(source, result)
        except CompileError as exc:
            self.report(node.lines.get(key, node.line), what, f"{key}: {exc}")
            return None
        zones = zone_problems(source)
        for text in zones:
            self.report(node.lines.get(key, node.line), what, text)
        return None if zones else program

    def rule(self, node: _LineDict, policy_shadow: bool) -> Rule | None:
        what = f"rule {node['name']}"
        effect = node["effect"]
        if "hold_expiry" in node and effect != "hold":
            self.report(
                node.lines["hold_expiry"], what, "hold_expiry only applies to rules whose effect is hold"
            )
        when = self.compile(node, "when", what, "bool")
        message_expr = self.compile(node, "message_expr", what, "string") if "message_expr" in node else None
        if when is None or ("message_expr" in node and message_expr is None):
            return None
        hold_expiry = parse_duration(node["hold_expiry"]) if "hold_expiry" in node else None
        approval = self.approval(node, what) if "approval" in node else None
        if "approval" in node and approval is None:
            return None
        return Rule(
            node["name"],
            effect,
            when,
            node.get("message", ""),
            node["when"],
            hold_expiry,
            message_expr,
            policy_shadow or node.get("mode") == "shadow",
            node.line,
            node.get("message_expr"),
            approval,
            (node.lines.get("when", node.line), node.lines.get("message_expr", node.line)),
        )

    def approval(self, node: _LineDict, what: str) -> ApprovalSpec | None:
        spec, line = node["approval"], node.lines["approval"]
        if node["effect"] != "hold":
            self.report(line, what, "approval only applies to rules whose effect is hold")
            return None
        approvers: list[str] = []
        reviewers: list[Reviewer] = []
        for entry in spec.get("approvers", []):
            kind, _, name = entry.partition(":")
            if kind == "group" and name:
                if name not in self.groups:
                    self.report(line, what, f"unknown group {name!r} (define it under groups:)")
                    return None
                approvers += [m for m in self.groups[name] if m not in approvers]
            elif kind == "reviewer" and name:
                if name not in self.reviewers:
                    self.report(line, what, f"unknown reviewer {name!r} (define it under reviewers:)")
                    return None
                config = self.reviewers[name]
                reviewers.append(Reviewer(name, config["url"], parse_duration(config.get("timeout", 5))))
                approvers.append(entry)
            elif entry not in approvers:
                approvers.append(entry)
        quorum = spec.get("quorum", 1)
        if approvers and quorum > len(approvers):
            self.report(line, what, f"quorum {quorum} is more than the {len(approvers)} approvers named")
            return None
        wait = parse_duration(spec.get("wait", 0))
        if wait > 60:
            self.report(
                line, what, "wait is at most 60s, so the agent's SDK (80 s timeout) hears back in time"
            )
            return None
        return ApprovalSpec(tuple(approvers), quorum, spec.get("veto", True), wait, tuple(reviewers))

    def limit(self, node: _LineDict, policy_shadow: bool) -> Limit | None:
        what = f"limit {node['name']}"
        if policy_shadow:
            self.report(
                node.line,
                what,
                "limits are enforced by the store and cannot be shadowed; remove them "
                "from the shadow policy or make the policy enforce",
            )
            return None
        window = self.window(node, what)
        if window is None:
            return None
        if window == "payment" and "max_count" in node:
            self.report(node.lines["max_count"], what, "a per-payment limit cannot count payments")
            return None
        when = self.compile(node, "when", what, "bool") if "when" in node else None
        if "when" in node and when is None:
            return None
        operations = frozenset(node["operations"]) if "operations" in node else None
        return Limit(
            node["name"],
            window,
            node["currency"].lower(),
            node.get("max_amount"),
            node.get("max_count"),
            operations,
            when,
            node.get("message", ""),
            node.line,
            node.get("when", ""),
        )

    def window(self, node: _LineDict, what: str) -> str | None:
        """A limit's window: a calendar ``window`` or a ``rolling`` duration, exactly one of them."""
        if ("window" in node) == ("rolling" in node):
            self.report(
                node.line,
                what,
                "give either window (payment, hour, day, week, month, all_time) or rolling (such as 1h, "
                "24h, 30d), not both or neither",
            )
            return None
        if "window" in node:
            return str(node["window"])
        try:
            return rolling_window(parse_duration(node["rolling"]))
        except ValueError as exc:
            self.report(node.lines["rolling"], what, f"rolling: {exc}")
            return None


def _schema_message(error: jsonschema.ValidationError) -> str:
    if error.validator == "anyOf" and error.schema_path and "limit" in str(list(error.schema_path)):
        return "a limit needs max_amount (minor units), max_count, or both"
    if error.validator == "anyOf":
        return "needs max_amount (minor units), max_count, or both"
    if error.validator == "additionalProperties":
        allowed = sorted(cast(Mapping[str, Any], error.schema).get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed)) if isinstance(error.instance, dict) else []
        return f"unknown field {', '.join(map(repr, unknown))} (allowed: {', '.join(allowed)})"
    if error.validator == "enum":
        path = list(error.absolute_path) or ["value"]
        field = f"{path[-2]}[{path[-1]}]" if isinstance(path[-1], int) else path[-1]
        values = cast(list[Any], error.validator_value)  # an enum's validator value is its list of values
        return f"{field} must be one of {', '.join(map(str, values))}, not {error.instance!r}"
    if error.validator == "type" and error.validator_value == "integer":
        return f"{error.instance!r} is not a whole number: amounts are integer minor units (cents)"
    if (
        error.validator == "pattern"
        and isinstance(error.instance, str)
        and error.absolute_path
        and error.absolute_path[-1] == "name"
    ):
        return f"name {error.instance!r} must be lowercase letters, digits and _ (starting with a letter)"
    if (
        error.validator == "oneOf"
        and "duration" in str(list(error.schema_path))
        or error.validator == "oneOf"
    ):
        return f"{error.instance!r} is not a duration such as 30s, 15m or 24h"
    return error.message


def _check_unique(policies: list[Policy], problems: list[str]) -> None:
    seen: dict[str, str] = {}
    for policy in policies:
        names = [(f"policy:{policy.name}", "policy", policy.name, policy.line)]
        names += [(f"rule:{policy.name}:{r.name}", "rule", r.name, r.line) for r in policy.rules]
        names += [
            (f"limit:{lim.name}", "limit", lim.name, lim.line) for lim in policy.limits
        ]  # one namespace
        for key, kind, name, line in names:
            if key in seen:
                problems.append(
                    f"{policy.file}:{line}: {kind} {name}: duplicate {kind} name {name!r} (also at {seen[key]})"
                )
            else:
                seen[key] = f"{policy.file}:{line}"


# In a CEL source whose string literals are blanked to numbered markers (\x00N\x00):
# spend.name or spend["name"], then optionally .field; a timestamp accessor's time zone argument.
_SPEND_REF = re.compile(
    r"\bspend\s*(?:\.\s*([A-Za-z_]\w*)|\[\s*(\x00\d+\x00)\s*\])(?:\s*\.\s*([A-Za-z_]\w*))?"
)
_TIME_ZONE_ARG = re.compile(
    r"\.get(?:FullYear|Month|DayOfYear|DayOfMonth|Date|DayOfWeek|Hours|Minutes|Seconds|Milliseconds)"
    r"\s*\(\s*(\x00\d+\x00)\s*\)"
)
_STRING = re.compile(r"""[rR]?(?:'''[\s\S]*?'''|\"\"\"[\s\S]*?\"\"\"|"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*')""")
_OFFSET = re.compile(r"^[+-]?\d{1,2}:\d{2}$")  # CEL also takes a fixed offset such as "+05:30"


def _blank_strings(source: str) -> tuple[str, list[str]]:
    """``source`` with each string literal replaced by a numbered marker, and the literals' values."""
    literals: list[str] = []

    def mark(match: re.Match[str]) -> str:
        text = match.group(0).lstrip("rR")
        quote = 3 if text[:3] in ('"""', "'''") else 1
        literals.append(text[quote:-quote])
        return f"\x00{len(literals) - 1}\x00"

    return _STRING.sub(mark, source), literals


def _literal(marker: str, literals: list[str]) -> str:
    return literals[int(marker.strip("\x00"))]


def spend_problems(source: str, limits: frozenset[str]) -> list[str]:
    """What the type checker cannot see in an expression (``spend`` is a map): ``spend.<name>`` naming no
    declared limit, or reading a field other than amount and count. Either fails every payment."""
    blanked, literals = _blank_strings(source)
    found: list[str] = []
    for match in _SPEND_REF.finditer(blanked):
        name = match.group(1) or _literal(match.group(2), literals)
        if name not in limits:
            known = ", ".join(sorted(limits)) or "none is declared"
            found.append(f"spend.{name} names no declared limit (limits: {known})")
        elif match.group(3) and match.group(3) not in ("amount", "count"):
            found.append(f"spend.{name}.{match.group(3)}: a limit's spend has only amount and count")
    return found


def zone_problems(source: str) -> list[str]:
    """Literal time zones of timestamp accessors (``now.getHours("...")``) not in the tz database."""
    blanked, literals = _blank_strings(source)
    found: list[str] = []
    for match in _TIME_ZONE_ARG.finditer(blanked):
        zone = _literal(match.group(1), literals)
        if not _OFFSET.match(zone) and not _known_zone(zone):
            found.append(f"unknown time zone {zone!r} (an IANA name such as America/New_York, or +05:30)")
    return found


def _known_zone(zone: str) -> bool:
    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def _check_expressions(policies: list[Policy], problems: list[str]) -> None:
    """Every rule's and limit's expressions against the whole set's limits (spend is one namespace)."""
    limits = frozenset(lim.name for p in policies for lim in p.limits)
    for policy in policies:
        for rule in policy.rules:
            for source, line in zip((rule.source, rule.message_source or ""), rule.lines, strict=True):
                for text in spend_problems(source, limits):
                    problems.append(f"{policy.file}:{line}: rule {rule.name}: {text}")
        for lim in policy.limits:
            for text in spend_problems(lim.source, limits):
                problems.append(f"{policy.file}:{lim.line}: limit {lim.name}: {text}")
