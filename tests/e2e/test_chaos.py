"""The money invariant under faults, across a fleet: three `paysentry` processes on one PostgreSQL (with and
without Redis), agents paying against their limits at once, replicas killed with SIGKILL every second or
two and the database crashed and restarted mid-run (``bench.chaos``, at a scale CI can afford). After
resolution, per agent: the provider never moved more than the limit, and moved exactly what PaySentry
counted; nothing is left unresolved."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.chaos import run
from tests.e2e.conftest import fresh_redis
from tests.servers import Postgres

pytestmark = pytest.mark.e2e
LIMIT = 12


@pytest.mark.parametrize("with_redis", [False, True], ids=["postgres", "postgres+redis"])
def test_a_fleet_killed_and_its_database_crashed_moves_only_what_it_counted(
    tmp_path: Path, postgres_server: Postgres, with_redis: bool, request: pytest.FixtureRequest
) -> None:
    redis_url = fresh_redis(request, with_redis)
    url = postgres_server.create_database(f"chaos_{int(with_redis)}")
    report = run(
        tmp_path,
        postgres_server,
        url,
        redis_url,
        agents=4,
        limit=LIMIT,
        payments=20,
        replicas=3,
        kill_every=(1.0, 2.0),
        duration=15.0,
        seed=7,
    )
    assert report.kills >= 3 and report.restarts == 1, report  # the faults happened
    assert report.unresolved == 0, report
    assert report.over_limit(LIMIT) == [], report.moved  # never past a limit at the provider
    assert report.drift() == [], (report.moved, report.counted)  # moved is what was counted
    assert sum(c for _, c in report.moved.values()) >= 2 * LIMIT  # and payments did go through
