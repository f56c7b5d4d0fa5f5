"""The metrics kept in process: what /metrics renders from them (Prometheus text format 0.0.4)."""

from __future__ import annotations

from proxy.metrics import STAGE_BUCKETS, Metrics


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    metrics = Metrics(otlp=False)
    series = metrics.series("paysentry_stage_duration_seconds", stage="policy")
    for value in (0.0001, 0.0003, 0.0003, 0.002, 99.0):  # 0.0001 is on a bound: le is inclusive
        series.observe(value)
    text = metrics.render()
    line = 'paysentry_stage_duration_seconds_bucket{{le="{}",stage="policy"}} {}'
    assert line.format("0.0001", 1) in text
    assert line.format("0.00025", 1) in text
    assert line.format("0.0005", 3) in text
    assert line.format("0.0025", 4) in text
    assert line.format("10", 4) in text
    assert line.format("+Inf", 5) in text
    assert 'paysentry_stage_duration_seconds_count{stage="policy"} 5' in text
    assert 'paysentry_stage_duration_seconds_sum{stage="policy"} 99.0027' in text
    assert text.count("paysentry_stage_duration_seconds_bucket") == len(STAGE_BUCKETS) + 1
    assert "# TYPE paysentry_stage_duration_seconds histogram" in text


def test_counters_and_gauges_by_labels() -> None:
    metrics = Metrics(otlp=False)
    metrics.inc("paysentry_decisions_total", decision="allow", rule="default")
    metrics.inc("paysentry_decisions_total", rule="default", decision="allow")  # label order is irrelevant
    metrics.inc("paysentry_decisions_total", decision="deny", rule='say "no"')
    metrics.set("paysentry_policy_revision_info", 1, replace=True, revision="sha256:a")
    metrics.set("paysentry_policy_revision_info", 1, replace=True, revision="sha256:b")
    assert metrics.value("paysentry_decisions_total", decision="allow", rule="default") == 2
    assert metrics.value("paysentry_decisions_total", decision="hold", rule="x") == 0
    text = metrics.render()
    assert 'paysentry_decisions_total{decision="allow",rule="default"} 2' in text
    assert 'paysentry_decisions_total{decision="deny",rule="say \\"no\\""} 1' in text
    assert 'paysentry_policy_revision_info{revision="sha256:b"} 1' in text
    assert "sha256:a" not in text
    assert "paysentry_webhooks_total" not in text  # nothing recorded, nothing rendered
