"""`make bench` keeps working: each benchmark runs end to end at a tiny size and prints its table. No
figure is asserted (timing belongs to the benchmarks' own output, not to tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("module", "args", "rows"),
    [
        ("bench.decision", ["--iterations", "20"], 4),
        ("bench.growth", ["--samples", "5", "--sizes", "100:10,200:50"], 4),  # calendar and rolling
        ("bench.store", ["--payments", "20", "--agents", "5"], 6),
        ("bench.cards", ["--requests", "5"], 1),
        # upstream, bare forwarder, bare + decide, bare + decide + commits, sidecar (wrk: make test installs it)
        ("bench.load", ["--stores", "sqlite", "--concurrency", "1", "--duration", "1"], 5),
    ],
)
def test_a_benchmark_prints_its_table(module: str, args: list[str], rows: int) -> None:
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    assert "not measured" not in done.stdout, done.stdout  # bench.load goes on past such a row: not here
    figures = [line for line in done.stdout.splitlines() if _numbers(line.split()[-3:])]
    assert len(figures) == rows, done.stdout
    if module == "bench.load":  # every server under load answered every request with a 2xx
        assert all(_figures(line)[5] == 0 for line in figures), done.stdout


def _figures(line: str) -> list[float]:
    return [float(w.replace(",", "")) for w in line.split() if _number(w)]


def _numbers(words: list[str]) -> bool:
    """A table row ends in (at least) three figures; a title line does not."""
    return len(words) == 3 and all(_number(w) for w in words)


def _number(word: str) -> bool:
    return word.removeprefix("-").replace(",", "").replace(".", "", 1).isdigit()
