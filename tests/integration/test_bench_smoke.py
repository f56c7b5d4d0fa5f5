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
        ("bench.growth", ["--samples", "5", "--sizes", "100:10,200:50"], 2),
        ("bench.store", ["--payments", "20", "--agents", "5"], 6),
        ("bench.cards", ["--requests", "5"], 1),
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
    figures = [line for line in done.stdout.splitlines() if _numbers(line.split()[-3:])]
    assert len(figures) == rows, done.stdout


def _numbers(words: list[str]) -> bool:
    """A table row ends in (at least) three figures; a title line does not."""
    return len(words) == 3 and all(w.replace(",", "").replace(".", "", 1).isdigit() for w in words)
