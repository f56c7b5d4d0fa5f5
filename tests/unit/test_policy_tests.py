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
    assert report.unexercised() == []  # every example rule and limit has a test


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
    assert "not exercised by any test: p.never_tested" in ok.stdout

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
