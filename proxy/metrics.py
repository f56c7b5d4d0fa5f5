"""Metrics through OpenTelemetry: scraped as Prometheus text at /metrics (owner listener) and, when
``OTEL_EXPORTER_OTLP_ENDPOINT`` is set, pushed over OTLP/HTTP like the traces.

Instruments are declared once in ``INSTRUMENTS`` (the documented names). Counters and histograms are
recorded as things happen; gauges are observed at collection time from values the sidecar keeps current
(the policy revision, and the spend and pending holds that the sweep reads from the store).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    MetricReader,
    NumberDataPoint,
    PeriodicExportingMetricReader,
    Sum,
)
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource

from proxy import __version__

COUNTER, HISTOGRAM, GAUGE = "counter", "histogram", "gauge"
# name (as scraped) -> (kind, help). Counters are scraped with the _total suffix they carry here.
INSTRUMENTS = {
    "paysentry_decisions_total": (COUNTER, "Payment decisions by outcome and rule."),
    "paysentry_stage_duration_seconds": (
        HISTOGRAM,
        "Time per stage of a call: authenticate, lookup, policy, reserve, upstream, settle, total.",
    ),
    "paysentry_store_errors_total": (COUNTER, "Store failures by where they happened (calls refused)."),
    "paysentry_policy_reloads_total": (COUNTER, "Policy reload attempts by result (ok, error)."),
    "paysentry_policy_revision_info": (GAUGE, "The policy revision in force (value 1)."),
    "paysentry_webhooks_total": (COUNTER, "Inbound provider webhooks by result (voided, recorded, ...)."),
    "paysentry_card_authorizations_total": (
        COUNTER,
        "Real-time card authorizations answered, by decision (approved, declined) and rule.",
    ),
    "paysentry_holds_pending": (GAUGE, "Held payments waiting for approval."),
    "paysentry_spend_amount": (
        GAUGE,
        "Spend counted in the current window, minor units, per agent and limit.",
    ),
    "paysentry_spend_limit_ratio": (
        GAUGE,
        "Spend in the current window over the limit's maximum (1 = at limit).",
    ),
}
STAGE_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
)
Labels = tuple[tuple[str, str], ...]


class Metrics:
    def __init__(self, otlp: bool | None = None) -> None:
        self._scrape = InMemoryMetricReader()
        readers: list[MetricReader] = [self._scrape]
        if otlp if otlp is not None else bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        self.provider = MeterProvider(
            metric_readers=readers,
            resource=Resource.create(
                {
                    "service.name": os.environ.get("OTEL_SERVICE_NAME", "paysentry"),
                    "service.version": __version__,
                }
            ),
            views=[
                View(instrument_type=Histogram, aggregation=ExplicitBucketHistogramAggregation(STAGE_BUCKETS))
            ],
        )
        meter = self.provider.get_meter("paysentry", __version__)
        self._gauges: dict[str, dict[Labels, float]] = {}
        self._instruments: dict[str, Any] = {}
        for name, (kind, text) in INSTRUMENTS.items():
            if kind == COUNTER:
                self._instruments[name] = meter.create_counter(name.removesuffix("_total"), description=text)
            elif kind == HISTOGRAM:
                self._instruments[name] = meter.create_histogram(name, unit="s", description=text)
            else:
                self._gauges[name] = {}
                meter.create_observable_gauge(name, [self._observer(name)], description=text)

    def _observer(self, name: str) -> Any:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(value, dict(labels)) for labels, value in self._gauges[name].items()]

        return observe

    # -- recording ------------------------------------------------------------------------------------------
    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        self._instruments[name].add(amount, labels)

    def observe(self, name: str, value: float, **labels: str) -> None:
        self._instruments[name].record(value, labels)

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.observe("paysentry_stage_duration_seconds", time.perf_counter() - started, stage=stage)

    def set(self, name: str, value: float, replace: bool = False, **labels: str) -> None:
        if replace:
            self._gauges[name] = {}
        self._gauges[name][tuple(sorted(labels.items()))] = value

    def set_all(self, name: str, series: Iterable[tuple[dict[str, str], float]]) -> None:
        """Replace every series of a gauge at once (spend and holds, refreshed by the sweep)."""
        self._gauges[name] = {tuple(sorted(labels.items())): value for labels, value in series}

    # -- reading --------------------------------------------------------------------------------------------
    def value(self, name: str, **labels: str) -> float:
        """The current value of one series (counters and gauges), for tests and the CLI."""
        wanted = tuple(sorted(labels.items()))
        for metric_name, point in self._points():
            if (
                metric_name == name
                and isinstance(point, NumberDataPoint)
                and tuple(sorted((k, str(v)) for k, v in point.attributes.items())) == wanted
            ):
                return float(point.value)
        return 0.0

    def _points(self) -> Iterator[tuple[str, Any]]:
        data = self._scrape.get_metrics_data()
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    suffix = "_total" if isinstance(metric.data, Sum) and metric.data.is_monotonic else ""
                    for point in metric.data.data_points:
                        yield metric.name + suffix, point

    def render(self) -> str:
        """Prometheus text exposition format 0.0.4."""
        by_name: dict[str, list[Any]] = {}
        for name, point in self._points():
            by_name.setdefault(name, []).append(point)
        lines: list[str] = []
        for name in sorted(by_name):
            kind, text = INSTRUMENTS.get(name, ("untyped", name))
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            for point in sorted(by_name[name], key=lambda p: sorted(p.attributes.items())):
                labels = {k: str(v) for k, v in point.attributes.items()}
                if isinstance(point, HistogramDataPoint):
                    lines += _histogram_lines(name, labels, point)
                else:
                    lines.append(f"{name}{_labels(labels)} {_number(point.value)}")
        return "\n".join(lines) + "\n"

    def shutdown(self) -> None:
        self.provider.shutdown()


def _histogram_lines(name: str, labels: dict[str, str], point: HistogramDataPoint) -> list[str]:
    lines, cumulative = [], 0
    for bound, count in zip([*point.explicit_bounds, math.inf], point.bucket_counts, strict=True):
        cumulative += count
        le = "+Inf" if bound == math.inf else _number(bound)
        lines.append(f"{name}_bucket{_labels({**labels, 'le': le})} {cumulative}")
    lines.append(f"{name}_sum{_labels(labels)} {_number(point.sum)}")
    lines.append(f"{name}_count{_labels(labels)} {point.count}")
    return lines


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items())) + "}"


def _number(value: float) -> str:
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)
    return str(value)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
