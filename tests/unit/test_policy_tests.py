"""Policy tests: every example's *_test.yaml on both engines, and the runner's report and exit codes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from adapters import REGISTRY
from proxy.model import OperationExample
from proxy.policy.engine import make_engine
from proxy.policy.testing import run_directory

ROOT = Path(__file__).parents[2]
EXAMPLES = [ROOT / "policies", *sorted(p for p in (ROOT / "policies" / "examples").iterdir() if p.is_dir())]


@pytest.mark.parametrize("engine", ["cel-expr-python", "cel-python"])
@pytest.mark.parametrize("directory", EXAMPLES, ids=lambda p: p.name)
def test_examples_pass_on_both_engines(directory: Path, engine: str) -> None:
    report = run_directory(directory, make_engine(engine), REGISTRY.examples)
    assert report.results and not report.failed, [f"{r.name}: {r.detail}" for r in report.failed]
    assert report.unexercised() == []  # every rule fires and does not, every limit refuses, in some case


def paysentry(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "--config", "/nonexistent.yaml", "policy", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def write(directory: Path, name: str, text: str) -> None:
    directory.mkdir(exist_ok=True)
    (directory / name).write_text(textwrap.dedent(text))


def test_exit_codes_and_report(tmp_path: Path) -> None:
    good = tmp_path / "good"
    write(
        good,
        "p.yaml",
        """
        name: p
        rules:
          - {name: big, effect: hold, when: payment.amount > 100}
          - {name: never_tested, effect: deny, when: payment.currency == "xxx"}
    """,
    )
    write(
        good,
        "p_test.yaml",
        """
        tests:
          - {name: small, payment: {amount: 50, currency: usd}, expect: {decision: allow}}
          - {name: big, payment: {amount: 500, currency: usd}, expect: {decision: hold, rule: big}}
    """,
    )
    ok = paysentry("test", str(good), "--coverage", "--engine", "all")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "4 passed, 0 failed" in ok.stdout
    assert "not covered: p.never_tested (fires)" in ok.stdout
    assert "not covered: p.big" not in ok.stdout

    write(
        good,
        "p_test.yaml",
        """
        tests:
          - {name: wrong, payment: {amount: 500, currency: usd}, expect: {decision: allow}}
    """,
    )
    failed = paysentry("test", str(good))
    assert failed.returncode == 4
    assert (
        "FAIL" in failed.stdout
        and "wrong" in failed.stdout
        and "decision 'hold', expected 'allow'" in failed.stdout
    )

    bad = tmp_path / "bad"
    write(bad, "p.yaml", "rules:\n  - {name: x, effect: deny, when: 'paymnet.amount > 1'}\n")
    invalid = paysentry("test", str(bad))
    assert invalid.returncode == 3
    assert "undeclared reference to 'paymnet.amount'" in invalid.stdout
    checked = paysentry("check", str(bad))
    assert checked.returncode == 3 and "p.yaml:2: rule x: when:" in checked.stderr


def test_malformed_test_cases_fail_with_a_reason(tmp_path: Path) -> None:
    write(tmp_path, "p.yaml", "name: p\n")
    write(
        tmp_path,
        "p_test.yaml",
        """
        tests:
          - {name: no expectation, payment: {amount: 5}}
          - {name: float amount, payment: {amount: 5.5}, expect: {decision: allow}}
          - {name: naive time, now: "2026-01-01T00:00:00", payment: {amount: 5}, expect: {decision: allow}}
    """,
    )
    report = run_directory(tmp_path, make_engine("cel-expr-python"), REGISTRY.examples)
    assert [r.passed for r in report.results] == [False, False, False]
    assert "expect needs decision" in report.results[0].detail
    assert "integer of minor units" in report.results[1].detail
    assert "time zone" in report.results[2].detail


def test_a_case_gets_the_provider_and_path_the_adapters_declare_for_its_operation(tmp_path: Path) -> None:
    examples = (
        OperationExample("pay", "first", "/pay"),
        OperationExample("refund", "first", "/first/refunds"),
        OperationExample("refund", "second", "/second/refunds"),
    )
    write(
        tmp_path,
        "p.yaml",
        """
        name: p
        rules:
          - {name: seen, effect: deny, when: 'payment.provider + " " + request.path == "second /second/refunds"'}
          - {name: first, effect: hold, when: 'payment.provider + " " + request.path == "first /pay"'}
    """,
    )
    write(
        tmp_path,
        "p_test.yaml",
        """
        tests:
          - {name: the first operation of the first adapter, payment: {amount: 5}, expect: {decision: hold}}
          - {name: the named provider's path, payment: {operation: refund, provider: second}, expect: {decision: deny}}
          - {name: the first producer, payment: {operation: refund}, expect: {decision: allow}}
          - {name: a path given, payment: {operation: refund, provider: second, path: /x}, expect: {decision: allow}}
          - {name: unrecognized, payment: {operation: unrecognized}, expect: {decision: deny, rule: unrecognized_write}}
          - {name: unknown, payment: {operation: charge}, expect: {decision: allow}}
    """,
    )
    report = run_directory(tmp_path, make_engine("cel-expr-python"), examples)
    assert [r.passed for r in report.results] == [True, True, True, True, True, False], report.results
    assert "unknown operation 'charge'; known: pay, refund, unrecognized" in report.results[-1].detail


COVERED = """
    name: p
    limits:
      - {name: daily, window: day, currency: usd, max_amount: 1000}
    rules:
      - {name: big, effect: hold, when: payment.amount > 100}
"""


def test_coverage_needs_each_rule_firing_and_not_and_each_limit_refusing(tmp_path: Path) -> None:
    """A limit a payment is charged to is not covered until a case makes it refuse."""
    write(tmp_path, "p.yaml", COVERED)
    write(
        tmp_path,
        "p_test.yaml",
        """
        tests:
          - {name: small, payment: {amount: 50, currency: usd}, expect: {decision: allow}}
          - {name: big, payment: {amount: 500, currency: usd}, expect: {decision: hold, rule: big}}
    """,
    )
    below = paysentry("test", str(tmp_path), "--coverage", "--threshold", "80")
    assert below.returncode == 5, below.stdout + below.stderr
    assert "coverage 67%" in below.stdout and "not covered: p.daily (refuses)" in below.stdout
    assert paysentry("test", str(tmp_path), "--threshold", "60").returncode == 0
    write(
        tmp_path,
        "p_test.yaml",
        """
        tests:
          - {name: small, payment: {amount: 50, currency: usd}, expect: {decision: allow}}
          - name: the day is spent
            payment: {amount: 500, currency: usd}
            spend: {daily: {amount: 600, count: 1}}
            expect: {decision: deny, rule: daily}
    """,
    )
    full = paysentry("test", str(tmp_path), "--threshold", "100")
    assert full.returncode == 0 and "coverage 100%" in full.stdout, full.stdout


def test_junit_and_json_reports_are_read_by_their_parsers(tmp_path: Path) -> None:
    import json
    import xml.etree.ElementTree as ET

    write(tmp_path / "p", "p.yaml", COVERED)
    write(
        tmp_path / "p",
        "p_test.yaml",
        """
        tests:
          - {name: small, payment: {amount: 50, currency: usd}, expect: {decision: allow}}
          - {name: wrong, payment: {amount: 500, currency: usd}, expect: {decision: allow}}
    """,
    )
    write(tmp_path / "bad", "b.yaml", "rules:\n  - {name: x, effect: deny, when: 'spend.nope.count > 1'}\n")
    args = ("test", str(tmp_path / "p"), str(tmp_path / "bad"), "--threshold", "90")
    junit = paysentry(*args, "--format", "junit")
    assert junit.returncode == 3  # a set that does not load outranks a failing test
    root = ET.fromstring(junit.stdout)
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == [
        f"{tmp_path / 'p'} (cel-expr-python)",
        f"{tmp_path / 'bad'} (cel-expr-python)",
    ]
    good, bad = suites
    assert (good.get("tests"), good.get("failures"), good.get("skipped")) == ("6", "2", "1")
    [wrong] = [c for c in good.findall("testcase") if c.get("name") == "wrong"]
    assert "decision 'hold', expected 'allow'" in wrong.find("failure").get("message")
    [threshold] = [c for c in good.findall("testcase") if c.get("name") == "coverage of at least 90%"]
    assert "p.daily (refuses)" in threshold.find("failure").text
    error = bad.find("testcase/error")
    assert bad.get("errors") == "1" and "b.yaml:2: rule x: spend.nope names no declared limit" in error.text

    report = json.loads(paysentry(*args, "--format", "json").stdout)
    assert (report["passed"], report["failed"]) == (1, 1)
    first, second = report["suites"]
    assert first["coverage"]["missing"] == [{"item": "p.daily", "needs": "refuses"}]
    assert not second["valid"] and "spend.nope" in second["problems"][0]


def test_the_readme_example_reports_full_coverage_to_a_junit_parser() -> None:
    import xml.etree.ElementTree as ET

    run = paysentry(
        "test",
        str(ROOT / "policies/examples/new_owner"),
        "--engine",
        "all",
        "--threshold",
        "100",
        "--format",
        "junit",
    )
    assert run.returncode == 0, run.stdout + run.stderr
    suites = ET.fromstring(run.stdout).findall("testsuite")
    assert len(suites) == 2 and all(s.get("failures") == "0" and s.get("skipped") == "0" for s in suites)
    assert all(s.find("properties/property[@name='coverage']").get("value") == "100.00" for s in suites)


def test_check_refuses_what_would_fail_every_payment_with_file_line_and_rule(tmp_path: Path) -> None:
    write(
        tmp_path,
        "p.yaml",
        """
        name: p
        limits:
          - {name: daily, window: hour, currency: usd, max_count: 5}
        rules:
          - name: pacing
            effect: hold
            when: spend.hourly.count >= 4
          - {name: mars, effect: hold, when: 'now.getDayOfWeek("Mars/Phobos") == 6'}
          - {name: late, effect: deny, when: local.hour > 22}
          - {name: late, effect: deny, when: local.hour < 6}
    """,
    )
    checked = paysentry("check", str(tmp_path))
    assert checked.returncode == 3
    path = tmp_path / "p.yaml"
    assert f"{path}:8: rule pacing: spend.hourly names no declared limit (limits: daily)" in checked.stderr
    assert f"{path}:9: rule mars: unknown time zone 'Mars/Phobos'" in checked.stderr
    assert f"{path}:11: rule late: duplicate rule name 'late' (also at {path}:10)" in checked.stderr
    assert checked.stderr.count(f"\n  {path}:") == 3  # all at once, each once
