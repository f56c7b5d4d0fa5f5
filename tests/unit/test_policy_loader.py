"""Loading policies: every problem reported at once, with file, line and the rule it concerns."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from adapters import REGISTRY
from proxy.errors import PolicyError
from proxy.policy.engine import CelExprEngine
from proxy.policy.loader import SCHEMA_FILE, load_policy_set, policy_schema

ENGINE = CelExprEngine()


def problems_of(tmp_path: Path, text: str) -> list[str]:
    (tmp_path / "broken.yaml").write_text(textwrap.dedent(text))
    with pytest.raises(PolicyError) as caught:
        load_policy_set(tmp_path, ENGINE, operations=REGISTRY.operations)
    return caught.value.problems


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rules: [\n", "not valid YAML"),
        ("rulez: []\n", "unknown field 'rulez'"),
        (
            "rules:\n  - {name: a, effect: deny, when: 'paymnet.amount > 1'}\n",
            "undeclared reference to 'paymnet",
        ),
        ("rules:\n  - {name: a, effect: deny, when: 'payment.amount > \"10\"'}\n", "no matching overload"),
        ("rules:\n  - {name: a, effect: deny, when: 'payment.amount'}\n", "must give a bool"),
        (
            "rules:\n  - {name: a, effect: deny, when: 'lowercase(payment.currency) == \"usd\"'}\n",
            "undeclared reference",
        ),
        ("rules:\n  - {name: a, effect: block, when: 'true'}\n", "effect must be one of"),
        ("rules:\n  - {name: Bad-Name, effect: deny, when: 'true'}\n", "must be lowercase"),
        ("limits:\n  - {name: d, window: year, currency: usd, max_amount: 1}\n", "window must be one of"),
        (
            "limits:\n  - {name: d, window: day, currency: usd, max_amount: 10.5}\n",
            "not a whole number",
        ),
        ("limits:\n  - {name: d, window: day, currency: usd}\n", "needs max_amount"),
        ("timezone: Mars/Olympus\n", "unknown time zone"),
        ("limits:\n  - {name: d, currency: usd, max_count: 1}\n", "give either window"),
        ("limits:\n  - {name: d, window: day, rolling: 1h, currency: usd, max_count: 1}\n", "not both"),
        ("limits:\n  - {name: d, rolling: 90s, currency: usd, max_count: 1}\n", "whole number of minutes"),
        ("limits:\n  - {name: d, rolling: soon, currency: usd, max_count: 1}\n", "not a duration"),
    ],
)
def test_each_broken_policy_gets_one_precise_message(tmp_path: Path, text: str, expected: str) -> None:
    problems = problems_of(tmp_path, text)
    assert len(problems) == 1, problems
    assert expected in problems[0]
    assert problems[0].startswith(f"{tmp_path / 'broken.yaml'}")


def test_every_problem_is_reported_with_its_line(tmp_path: Path) -> None:
    problems = problems_of(
        tmp_path,
        """
        name: many
        rules:
          - name: first
            effect: deny
            when: paymnet.amount > 1
          - name: second
            effect: hold
            when: payment.amount > "1"
    """,
    )
    assert len(problems) == 2
    assert ":6: rule first:" in problems[0]
    assert ":9: rule second:" in problems[1]


def test_duplicate_names_across_files(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "name: same\nlimits:\n  - {name: d, window: day, currency: usd, max_amount: 1}\n"
    )
    (tmp_path / "b.yaml").write_text(
        "name: same\nlimits:\n  - {name: d, window: day, currency: usd, max_amount: 1}\n"
    )
    with pytest.raises(PolicyError) as caught:
        load_policy_set(tmp_path, ENGINE, operations=REGISTRY.operations)
    text = "\n".join(caught.value.problems)
    assert "duplicate policy name 'same'" in text
    assert "duplicate limit name 'd'" in text


def test_the_example_policies_load() -> None:
    policy_set = load_policy_set(
        Path(__file__).parents[2] / "policies", ENGINE, operations=REGISTRY.operations
    )
    assert policy_set.policies and policy_set.revision


def test_revision_is_the_git_commit_of_a_clean_checkout(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("name: p\n")
    git = ["git", "-C", str(tmp_path), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "policies"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout
    assert (
        load_policy_set(tmp_path, ENGINE, operations=REGISTRY.operations).revision
        == f"git:{head.strip()[:12]}"
    )
    (tmp_path / "p.yaml").write_text("name: p\ndefault: deny\n")  # uncommitted: the content decides
    assert load_policy_set(tmp_path, ENGINE, operations=REGISTRY.operations).revision.startswith("sha256:")


def test_the_schema_lists_exactly_the_operations_the_adapters_declare() -> None:
    schema = policy_schema(REGISTRY.operations)
    items = schema["$defs"]["limit"]["properties"]["operations"]["items"]
    assert items == {"$ref": "#/$defs/operation"}
    assert schema["$defs"]["operation"]["enum"] == list(REGISTRY.operations)
    # The source names none itself: the registry is the one list.
    assert "enum" not in json.loads(SCHEMA_FILE.read_text())["$defs"]["operation"]


def test_the_printed_schema_is_the_one_the_loader_uses() -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "proxy", "--config", "/nonexistent.yaml", "policy", "schema"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(printed.stdout) == policy_schema(REGISTRY.operations)


def test_a_limit_counts_only_operations_it_is_given(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(
        "limits:\n  - {name: d, window: day, currency: usd, max_amount: 1, operations: [charge, refund]}\n"
    )
    assert load_policy_set(tmp_path, ENGINE, operations=("charge", "refund")).limit_names == {"d"}
    with pytest.raises(PolicyError, match=r"operations\[1\] must be one of charge, not 'refund'"):
        load_policy_set(tmp_path, ENGINE, operations=("charge",))


@pytest.mark.parametrize(
    ("text", "line", "expected"),
    [
        (
            "limits:\n  - {name: daily, window: day, currency: usd, max_amount: 1}\nrules:\n"
            "  - name: busy\n    effect: hold\n    when: 'spend.hourly.count >= 5'\n",
            6,
            "rule busy: spend.hourly names no declared limit (limits: daily)",
        ),
        (
            "limits:\n  - {name: daily, window: day, currency: usd, max_amount: 1}\nrules:\n"
            "  - {name: busy, effect: hold, when: 'spend[\"daily\"].amout > 5'}\n",
            4,
            "rule busy: spend.daily.amout: a limit's spend has only amount and count",
        ),
        (
            "rules:\n  - {name: late, effect: hold, when: 'now.getDayOfWeek(\"Mars/Phobos\") == 0'}\n",
            2,
            "rule late: unknown time zone 'Mars/Phobos'",
        ),
        (
            "rules:\n  - {name: a, effect: hold, when: 'true'}\n  - {name: a, effect: deny, when: 'true'}\n",
            3,
            "rule a: duplicate rule name 'a' (also at ",
        ),
    ],
)
def test_what_would_fail_every_payment_is_refused_with_its_line(
    tmp_path: Path, text: str, line: int, expected: str
) -> None:
    [problem] = problems_of(tmp_path, text)
    assert problem.startswith(f"{tmp_path / 'broken.yaml'}:{line}: {expected}"), problem


def test_strings_and_offsets_are_not_mistaken_for_problems(tmp_path: Path) -> None:
    (tmp_path / "ok.yaml").write_text(
        "rules:\n  - {name: a, effect: hold, when: "
        '\'payment.description == "spend.nothing" && now.getHours("+05:30") > 1 '
        '&& now.getHours("Europe/Berlin") > 1\'}\n'
    )
    load_policy_set(tmp_path, ENGINE, operations=REGISTRY.operations)


def test_every_problem_of_a_set_is_reported_at_once(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("rules:\n  - {name: x, effect: hold, when: 'spend.nope.count > 1'}\n")
    (tmp_path / "b.yaml").write_text(
        "timezone: Mars/Olympus\nrules:\n  - {name: y, effect: hold, when: 'now.getHours(\"Nowhere\") > 1'}\n"
    )
    with pytest.raises(PolicyError) as caught:
        load_policy_set(tmp_path, ENGINE, operations=REGISTRY.operations)
    lines = [p.split(": ", 1)[0].rsplit("/", 1)[-1] for p in caught.value.problems]
    assert sorted(lines) == ["a.yaml:2", "b.yaml:1", "b.yaml:3"], caught.value.problems
