"""What a platform team sees: the span tree of each decision through a real OTLP/HTTP receiver, the W3C
trace continued from the agent and passed to the provider, and the Prometheus scrape endpoint."""

from __future__ import annotations

import secrets
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Deployment, make_deployment, wait_until
from tests.e2e.otlp import OtlpReceiver


def pay(dep: Deployment, body: bytes, key: str, traceparent: str | None = None) -> int:
    headers = {
        "Authorization": f"Bearer {dep.agent_token}",
        "Content-Type": "application/x-www-form-urlencoded",
        "Idempotency-Key": key,
    }
    if traceparent:
        headers["traceparent"] = traceparent
    request = urllib.request.Request(f"{dep.agent_url}/v1/payment_intents", body, headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def tree(spans: list[dict[str, Any]], root: dict[str, Any]) -> list[str]:
    """Names of the spans under ``root`` (transitively), in start order of discovery."""
    names, frontier = [], [root["span_id"]]
    while frontier:
        parent = frontier.pop(0)
        for span in spans:
            if span["parent_span_id"] == parent:
                names.append(span["name"])
                frontier.append(span["span_id"])
    return names


@pytest.mark.e2e
def test_span_trees_of_allowed_denied_and_held_calls(tmp_path: Path) -> None:
    agent_trace, agent_span = secrets.token_hex(16), secrets.token_hex(8)
    with OtlpReceiver() as collector:
        dep = make_deployment(tmp_path)
        dep.env.update(collector.env())
        dep.start()
        try:
            assert pay(dep, b"amount=1000&currency=usd", "o-1", f"00-{agent_trace}-{agent_span}-01") == 200
            assert pay(dep, b"amount=1000&currency=eur", "o-2") == 402
            assert pay(dep, b"amount=6000&currency=usd", "o-3") == 402
            upstream = [r for r in dep.mock() if r["method"] == "POST"]
        finally:
            dep.stop()
        spans = collector.spans()

    calls = {s["attributes"].get("paysentry.decision"): s for s in spans if s["name"] == "paysentry.call"}
    assert set(calls) == {"allow", "deny", "hold"}
    for call in calls.values():
        a = call["attributes"]
        assert call["kind"] == 2  # SERVER
        assert a["paysentry.agent"] == "bot" and a["paysentry.agent_id"] == dep.agent_id
        assert a["paysentry.provider"] == "mock" and a["paysentry.operation"] == "payment_intent"
        assert a["paysentry.currency"] in ("usd", "eur") and a["paysentry.amount"] in (1000, 6000)
        assert a["paysentry.policy_revision"].startswith("sha256:")
        assert call["resource"]["service.name"] == "paysentry"

    allowed = calls["allow"]
    assert sorted(tree(spans, allowed)) == [
        "paysentry.authenticate",
        "paysentry.lookup",
        "paysentry.policy",
        "paysentry.reserve",
        "paysentry.settle",
        "paysentry.upstream",
    ]
    # The agent's trace is continued, and the provider sees PaySentry's upstream span as its parent.
    assert allowed["trace_id"] == agent_trace and allowed["parent_span_id"] == agent_span
    upstream_span = next(s for s in spans if s["name"] == "paysentry.upstream")
    assert upstream[0]["traceparent"] == f"00-{agent_trace}-{upstream_span['span_id']}-01"

    denied = calls["deny"]
    assert denied["attributes"]["paysentry.rule"] == "usd_only"
    assert "paysentry.upstream" not in tree(spans, denied) and "paysentry.policy" in tree(spans, denied)
    held = calls["hold"]
    assert held["attributes"]["paysentry.rule"] == "large_payment"
    assert held["attributes"]["paysentry.hold_id"].startswith("apr_")
    assert "paysentry.upstream" not in tree(spans, held) and "paysentry.reserve" in tree(spans, held)
    assert len(upstream) == 1


def scrape(dep: Deployment, token: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"{dep.admin_url}/metrics", headers=headers)
    with urllib.request.urlopen(request, timeout=5) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        return resp.read().decode()


@pytest.mark.e2e
def test_metrics_are_scraped_with_the_documented_names_and_pushed_over_otlp(tmp_path: Path) -> None:
    with OtlpReceiver() as collector:
        dep = make_deployment(tmp_path)
        dep.env.update({**collector.env(), "OTEL_METRIC_EXPORT_INTERVAL": "200"})
        dep.start()
        try:
            assert pay(dep, b"amount=1000&currency=usd", "m-1") == 200
            assert pay(dep, b"amount=1000&currency=eur", "m-2") == 402
            assert pay(dep, b"amount=6000&currency=usd", "m-3") == 402
            # The sweep refreshes the gauges every sweep_interval (0.2 s here).
            wait_until(lambda: "paysentry_holds_pending 1" in scrape(dep), timeout=5)
            text = scrape(dep)
        finally:
            dep.stop()
        pushed = collector.metric_names()

    assert 'paysentry_decisions_total{decision="allow",rule="default"} 1' in text
    assert 'paysentry_decisions_total{decision="deny",rule="usd_only"} 1' in text
    assert 'paysentry_decisions_total{decision="hold",rule="large_payment"} 1' in text
    for stage in ("authenticate", "lookup", "policy", "reserve", "upstream", "settle", "total"):
        assert f'paysentry_stage_duration_seconds_count{{stage="{stage}"}}' in text, stage
        assert f'paysentry_stage_duration_seconds_bucket{{le="+Inf",stage="{stage}"}}' in text, stage
    assert "paysentry_holds_pending 1" in text
    # The held $60 is reserved while it waits: 1000 + 6000 of the $100 daily budget. Without the
    # operator's opt-in, no agent's name or id is shown (the scrape needs no token).
    assert 'paysentry_spend_amount{currency="usd",limit="daily_budget",window="day"} 7000' in text
    assert 'paysentry_spend_limit_ratio{limit="daily_budget",window="day"} 0.7' in text
    assert dep.agent_id not in text and 'agent="' not in text
    assert 'paysentry_policy_revision_info{revision="sha256:' in text
    for line in text.splitlines():
        if line.startswith("# TYPE"):
            assert line.split()[3] in ("counter", "gauge", "histogram"), line
    assert {"paysentry_decisions", "paysentry_stage_duration_seconds", "paysentry_holds_pending"} <= pushed


@pytest.mark.e2e
def test_metrics_per_agent_need_the_scrape_token(tmp_path: Path) -> None:
    extra = "metrics_agent_labels: true\nmetrics_token: scrape-token-for-tests\n"
    dep = make_deployment(tmp_path, extra_config=extra)
    dep.start()
    try:
        assert pay(dep, b"amount=1000&currency=usd", "m-1") == 200
        for token in (None, "wrong", dep.owner_token, dep.agent_token):
            with pytest.raises(urllib.error.HTTPError) as refused:
                scrape(dep, token)
            assert refused.value.code == 401
        agent = f'agent="bot",agent_id="{dep.agent_id}"'
        wait_until(lambda: agent in scrape(dep, "scrape-token-for-tests"), timeout=5)
        text = scrape(dep, "scrape-token-for-tests")
        assert (
            f'paysentry_spend_amount{{{agent},currency="usd",limit="daily_budget",window="day"}} 1000' in text
        )
    finally:
        dep.stop()
    assert "scrape-token-for-tests" not in dep.logs()
