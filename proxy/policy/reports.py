"""How ``paysentry policy test`` reports: text for people, JSON and JUnit XML for CI systems.

Each (directory, engine) run is one suite: its cases, or the problems that kept its policies from loading,
and its coverage (each rule fired and not fired, each limit refusing, by some case).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field

from proxy.policy.testing import TestReport

FORMATS = ("text", "json", "junit")


@dataclass
class Suite:
    directory: str
    engine: str
    report: TestReport | None = None  # None: the policies did not load
    problems: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.directory} ({self.engine})"


def text(suites: Sequence[Suite], coverage: bool, threshold: float | None) -> str:
    lines: list[str] = []
    for suite in suites:
        if suite.report is None:
            lines.append(f"INVALID {suite.name}:\n  " + "\n  ".join(suite.problems))
            continue
        report = suite.report
        for result in report.failed:
            lines.append(f"FAIL {result.file} :: {result.name} ({report.engine})\n     {result.detail}")
        ok = len(report.results) - len(report.failed)
        lines.append(f"{suite.name}: {ok} passed, {len(report.failed)} failed")
        if coverage:
            missing = report.unexercised()
            lines.append(
                f"  coverage {report.coverage():.0f}%"
                + (": every rule fires and does not, every limit refuses" if not missing else "")
            )
            lines += [f"  not covered: {item}" for item in missing]
            if threshold is not None and report.coverage() < threshold:
                lines.append(f"  COVERAGE {report.coverage():.0f}% is below the threshold of {threshold:g}%")
    passed, failed = totals(suites)
    lines.append(f"{passed} passed, {failed} failed")
    return "\n".join(lines)


def as_json(suites: Sequence[Suite], threshold: float | None) -> str:
    passed, failed = totals(suites)
    doc = {
        "passed": passed,
        "failed": failed,
        "threshold": threshold,
        "suites": [_suite_json(s, threshold) for s in suites],
    }
    return json.dumps(doc, indent=2)


def _suite_json(suite: Suite, threshold: float | None) -> dict[str, object]:
    if suite.report is None:
        return {
            "directory": suite.directory,
            "engine": suite.engine,
            "valid": False,
            "problems": suite.problems,
        }
    report = suite.report
    return {
        "directory": suite.directory,
        "engine": suite.engine,
        "valid": True,
        "cases": [
            {"file": r.file, "name": r.name, "passed": r.passed, "detail": r.detail} for r in report.results
        ],
        "coverage": {
            "percent": round(report.coverage(), 2),
            "below_threshold": threshold is not None and report.coverage() < threshold,
            "covered": [
                {"item": item, "needs": need}
                for item, need in report.requirements()
                if (item, need) in report.seen
            ],
            "missing": [
                {"item": item, "needs": need}
                for item, need in report.requirements()
                if (item, need) not in report.seen
            ],
        },
    }


def junit(suites: Sequence[Suite], coverage: bool, threshold: float | None) -> str:
    """JUnit XML: one testsuite per run; a policy set that does not load is one test in error; coverage,
    when asked for, is one test per requirement (skipped when no case meets it, failed below the
    threshold)."""
    root = ET.Element("testsuites", name="paysentry policy test")
    for suite in suites:
        element = ET.SubElement(root, "testsuite", name=suite.name)
        tests = failures = errors = skipped = 0
        if suite.report is None:
            case = ET.SubElement(element, "testcase", classname=suite.directory, name="policies load")
            ET.SubElement(case, "error", message="the policies do not load").text = "\n".join(suite.problems)
            tests, errors = 1, 1
        else:
            report = suite.report
            for result in report.results:
                case = ET.SubElement(element, "testcase", classname=result.file, name=result.name)
                tests += 1
                if not result.passed:
                    failures += 1
                    ET.SubElement(
                        case, "failure", message=result.detail.split(" (got ")[0]
                    ).text = result.detail
            if coverage or threshold is not None:
                for item, need in report.requirements():
                    case = ET.SubElement(element, "testcase", classname="coverage", name=f"{item} {need}")
                    tests += 1
                    if (item, need) not in report.seen:
                        skipped += 1
                        ET.SubElement(case, "skipped", message=f"no case shows {item} {need}")
            if threshold is not None:
                name = f"coverage of at least {threshold:g}%"
                case = ET.SubElement(element, "testcase", classname="coverage", name=name)
                tests += 1
                if report.coverage() < threshold:
                    failures += 1
                    message = f"coverage {report.coverage():.1f}% is below {threshold:g}%"
                    ET.SubElement(case, "failure", message=message).text = "\n".join(report.unexercised())
            properties = ET.Element("properties")  # first, as the JUnit schema has it
            ET.SubElement(properties, "property", name="coverage", value=f"{report.coverage():.2f}")
            element.insert(0, properties)
        element.set("tests", str(tests))
        element.set("failures", str(failures))
        element.set("errors", str(errors))
        element.set("skipped", str(skipped))
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True)


def totals(suites: Sequence[Suite]) -> tuple[int, int]:
    reports = [s.report for s in suites if s.report is not None]
    failed = sum(len(r.failed) for r in reports)
    return sum(len(r.results) for r in reports) - failed, failed


def exit_code(suites: Sequence[Suite], threshold: float | None) -> int:
    """3 a policy set is invalid, 4 a test fails, 5 coverage is below the threshold, else 0."""
    if any(s.report is None for s in suites):
        return 3
    if totals(suites)[1]:
        return 4
    if threshold is not None and any(s.report and s.report.coverage() < threshold for s in suites):
        return 5
    return 0
