"""The owner API against its own OpenAPI document (schemathesis): generated requests, valid and not,
never get a 5xx, and a refused request (4xx) changes nothing in the database."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.e2e.conftest import POLICY, Deployment, make_deployment

SCHEMA = schemathesis.openapi.from_path(Path(__file__).parents[2] / "proxy" / "openapi.yaml")
STATE_TABLES = (
    "owners",
    "connections",
    "agents",
    "authorizations",
    "approvals",
    "votes",
    "approval_links",
    "spend",
    "events",
    "webhook_events",
)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    import stripe

    policy = POLICY.replace("hold_expiry: 2s", "hold_expiry: 1h")  # nothing changes on its own meanwhile
    dep = make_deployment(tmp_path_factory.mktemp("fuzz"), policy, extra_config="token_cache_ttl: 5m\n")
    dep.start()
    stripe.api_base, stripe.api_key, stripe.max_network_retries = dep.agent_url, dep.agent_token, 0
    stripe.PaymentIntent.create(amount=1000, currency="usd", idempotency_key="fuzz-1")
    with pytest.raises(stripe.StripeError):  # a hold, so approvals and votes have something to act on
        stripe.PaymentIntent.create(amount=6000, currency="usd", idempotency_key="fuzz-2")
    yield dep
    dep.stop()


def state(dep: Deployment) -> str:
    db = sqlite3.connect(f"file:{dep.root / 'paysentry.db'}?mode=ro", uri=True)
    try:
        digest = hashlib.sha256()
        for table in STATE_TABLES:
            for row in db.execute(f"SELECT * FROM {table} ORDER BY 1"):  # noqa: S608 - fixed names
                digest.update(repr(row).encode())
        return digest.hexdigest()
    finally:
        db.close()


@pytest.mark.e2e
@SCHEMA.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_owner_api_has_no_5xx_and_refusals_change_nothing(case: schemathesis.Case, api: Deployment) -> None:
    before = state(api)
    response = case.call(  # noqa
        base_url=api.admin_url, headers={"Authorization": f"Bearer {api.owner_token}"}
    )
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.text[:300]}"
    if response.status_code >= 400:
        assert state(api) == before, (
            f"a refused {case.method} {case.formatted_path} ({response.status_code}) changed the database"
        )
        if response.status_code == 417:  # an Expect header the HTTP layer refuses before any route runs
            assert "Expect" in response.text
        else:
            assert response.json()["error"]["message"]
