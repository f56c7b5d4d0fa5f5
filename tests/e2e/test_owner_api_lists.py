"""The owner API's lists against a real sidecar: Stripe's conventions (newest first, has_more,
starting_after / ending_before, filters, created ranges), a 400 naming a bad parameter, RFC 3339 times,
spend with the limit's maximum and what remains; every answer checked against the OpenAPI document."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from tests.e2e.conftest import Deployment, make_deployment

DOCUMENT = yaml.safe_load((Path(__file__).parents[2] / "proxy" / "openapi.yaml").read_text())
REGISTRY = Registry().with_resource("urn:owner-api", DRAFT202012.create_resource(DOCUMENT))
LISTS = [
    "/v1/authorizations",
    "/v1/approvals",
    "/v1/agents",
    "/v1/approvers",
    "/v1/events",
    "/v1/reconciliation",
]


def conforms(route: str, status: int, body: Any, method: str = "get") -> None:
    """``body`` is what the document says ``route`` answers with ``status``."""
    pointer = "#/paths/" + route.replace("~", "~0").replace("/", "~1") + f"/{method}/responses/{status}"
    response = DOCUMENT["paths"][route][method]["responses"][str(status)]
    if "$ref" in response:  # a shared response
        pointer = response["$ref"]
    schema = {"$ref": f"urn:owner-api{pointer}/content/application~1json/schema"}
    Draft202012Validator(schema, registry=REGISTRY).validate(body)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    import stripe

    dep = make_deployment(tmp_path_factory.mktemp("lists"), extra_config="token_cache_ttl: 5m\n")
    dep.start()
    stripe.api_base, stripe.api_key, stripe.max_network_retries = dep.agent_url, dep.agent_token, 0
    for i in range(5):
        stripe.PaymentIntent.create(amount=1000, currency="usd", idempotency_key=f"list-{i}")
    with pytest.raises(stripe.StripeError):
        stripe.PaymentIntent.create(amount=1000, currency="eur", idempotency_key="list-eur")  # denied
    dep.owner_api("POST", "/v1/approvers", {"name": "alice"})
    yield dep
    dep.stop()


def get(dep: Deployment, path: str) -> tuple[int, Any]:
    status, body = dep.owner_api("GET", path)
    conforms(path.split("?")[0], status, body)
    return status, body


@pytest.mark.e2e
@pytest.mark.parametrize("route", LISTS)
def test_every_list_is_a_stripe_list_the_document_describes(api: Deployment, route: str) -> None:
    status, body = get(api, route)
    assert status == 200 and body["object"] == "list" and body["url"] == route
    assert isinstance(body["has_more"], bool)
    status, refused = get(api, route + "?colour=blue")
    assert status == 400 and refused["error"]["param"] == "colour" and "colour" in refused["error"]["message"]


@pytest.mark.e2e
def test_authorizations_page_newest_first_both_ways(api: Deployment) -> None:
    everything = get(api, "/v1/authorizations")[1]["data"]
    assert len(everything) == 6
    created = [datetime.fromisoformat(a["created_at"]) for a in everything]
    assert created == sorted(created, reverse=True) and all(c.tzinfo is not None for c in created)
    first = get(api, "/v1/authorizations?limit=4")[1]
    assert [a["id"] for a in first["data"]] == [a["id"] for a in everything[:4]] and first["has_more"]
    rest = get(api, f"/v1/authorizations?limit=4&starting_after={first['data'][-1]['id']}")[1]
    assert [a["id"] for a in rest["data"]] == [a["id"] for a in everything[4:]] and not rest["has_more"]
    back = get(api, f"/v1/authorizations?limit=2&ending_before={everything[4]['id']}")[1]
    assert [a["id"] for a in back["data"]] == [a["id"] for a in everything[2:4]] and back["has_more"]


@pytest.mark.e2e
def test_authorization_filters_and_created_ranges(api: Deployment) -> None:
    denied = get(api, "/v1/authorizations?decision=deny")[1]["data"]
    assert [a["currency"] for a in denied] == ["eur"] and denied[0]["rule"] == "usd_only"
    assert len(get(api, "/v1/authorizations?rule=usd_only&state=denied")[1]["data"]) == 1
    assert len(get(api, f"/v1/authorizations?agent={api.agent_id}")[1]["data"]) == 6
    assert get(api, "/v1/authorizations?agent=agt_nobody")[1]["data"] == []
    newest = get(api, "/v1/authorizations?limit=1")[1]["data"][0]["created_at"]
    since = get(api, "/v1/authorizations?created[gte]=" + newest.replace("+", "%2B"))[1]["data"]
    assert len(since) == 1
    assert get(api, "/v1/authorizations?created[lt]=2000-01-01T00:00:00Z")[1]["data"] == []
    assert len(get(api, "/v1/authorizations?created[gte]=946684800")[1]["data"]) == 6  # Unix seconds too


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("decision=maybe", "decision"),
        ("state=lost", "state"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("created[gte]=yesterday", "created[gte]"),
        ("created[lt]=2026-01-01", "created[lt]"),
        ("starting_after=a&ending_before=b", "ending_before"),
        ("starting_after=auth_nope", "starting_after"),  # Stripe's resource_missing, not an empty page
        ("ending_before=auth_nope", "ending_before"),
        ("agent=a&agent=b", "agent"),
        ("after=0", "after"),
    ],
)
def test_a_bad_parameter_is_a_400_naming_it(api: Deployment, query: str, param: str) -> None:
    status, body = get(api, "/v1/authorizations?" + query)
    assert status == 400 and body["error"]["param"] == param, body


@pytest.mark.e2e
def test_agents_approvers_and_holds_filter_by_state(api: Deployment) -> None:
    assert [a["name"] for a in get(api, "/v1/agents?state=active")[1]["data"]] == ["bot"]
    assert get(api, "/v1/agents?state=revoked")[1]["data"] == []
    assert get(api, "/v1/agents?state=gone")[0] == 400
    approvers = get(api, "/v1/approvers?state=active")[1]["data"]
    assert [a["name"] for a in approvers] == ["alice"] and approvers[0]["revoked_at"] is None
    datetime.fromisoformat(approvers[0]["created_at"])
    assert get(api, "/v1/approvals?state=pending")[1]["data"] == []
    assert get(api, f"/v1/approvals?state=all&agent={api.agent_id}")[0] == 200
    assert get(api, "/v1/approvals?state=open")[1]["error"]["param"] == "state"


@pytest.mark.e2e
def test_events_newest_first_or_followed_after_a_seq(api: Deployment) -> None:
    newest = get(api, "/v1/events?limit=3")[1]
    seqs = [e["seq"] for e in newest["data"]]
    assert seqs == sorted(seqs, reverse=True) and newest["has_more"]
    older = get(api, f"/v1/events?limit=3&starting_after={seqs[-1]}")[1]["data"]
    assert all(e["seq"] < seqs[-1] for e in older)
    followed = get(api, "/v1/events?after=0&limit=1000")[1]
    assert [e["seq"] for e in followed["data"]] == sorted(e["seq"] for e in followed["data"])
    assert followed["data"][0]["type"] == "owner.created" and not followed["has_more"]
    assert get(api, "/v1/events?type=authorization.")[1]["data"][0]["type"].startswith("authorization.")
    assert get(api, "/v1/events?starting_after=abc")[0] == 400
    datetime.fromisoformat(followed["data"][0]["at"])


@pytest.mark.e2e
def test_spend_shows_the_limits_maximum_and_what_remains(api: Deployment) -> None:
    status, spend = api.owner_api("GET", f"/v1/agents/{api.agent_id}/spend")
    conforms("/v1/agents/{id}/spend", status, spend)
    daily = next(s for s in spend["data"] if s["limit"] == "daily_budget")
    assert (daily["amount"], daily["count"], daily["max_amount"]) == (5000, 5, 10000)
    assert daily["remaining"] == 5000 and daily["max_count"] is None and daily["window"] == "day"
