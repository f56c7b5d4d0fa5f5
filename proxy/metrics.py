"""Metrics: scraped as Prometheus text at /metrics (owner listener) and, when
``OTEL_EXPORTER_OTLP_ENDPOINT`` is set, pushed over OTLP/HTTP like the traces.

Instruments are declared once in ``INSTRUMENTS`` (the documented names). The values live here, in plain
counters and fixed-bucket histograms: a payment records eight of them, and an OpenTelemetry SDK
``record`` costs tens of microseconds each under load where these cost one. The OpenTelemetry meter is
built only when OTLP export is on: it observes the counters and gauges from here at collection time and
receives each histogram observation as well. Gauges are observed at collection time from values the
sidecar keeps current (the policy revision, and the spend and pending holds that the sweep reads from the
store).
"""

from __future__ import annotations

import math
import os
from bisect import bisect_left
from collections.abc import Iterable
from typing import Any

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
    "paysentry_state_applies_total": (
        COUNTER,
        "Applications of the declared state file by result (ok, error: the last applied state stays).",
    ),
    "paysentry_state_changes_total": (
        COUNTER,
        "Changes the declared state made, by kind (owner, connection, agent, approvers) and change.",
    ),
    "paysentry_tls_reloads_total": (
        COUNTER,
        "Certificate reloads of a TLS listener by listener and result (ok, error: the old one stays).",
    ),
    "paysentry_webhooks_total": (COUNTER, "Inbound provider webhooks by result (voided, recorded, ...)."),
    "paysentry_card_authorizations_total": (
        COUNTER,
        "Real-time card authorizations answered, by decision (approved, declined) and rule.",
    ),
    "paysentry_holds_pending": (GAUGE, "Held payments waiting for approval."),
    "paysentry_notifications_total": (
        COUNTER,
        "Hold notification attempts by outcome (delivered, retried, failed: given up after notify_give_up).",
    ),
    "paysentry_authorizations_in_doubt": (
        GAUGE,
        "Forwarded calls whose outcome is not known yet (spend kept counted until the provider says).",
    ),
    "paysentry_resolutions_total": (
        COUNTER,
        "Unresolved calls re-sent to the provider, by what its answer said (settled, failed, in_doubt).",
    ),
    "paysentry_reconcile_drift": (
        GAUGE,
        "Minor units the provider's records show that reconciliation could not explain, per connection "
        "and currency (the latest run of each connection).",
    ),
    "paysentry_reconcile_fixes_total": (
        COUNTER,
        "Authorizations reconciliation fixed from the provider's records (settled, released, counted, voided).",
    ),
    "paysentry_reconcile_runs_total": (COUNTER, "Reconciliations of a connection, by result (ok, error)."),
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


class Series:
    """One histogram series (a name and its labels): bucket counts, sum and count, cumulative since start.
    ``observe`` is what the hot path calls; keep a ``Series`` rather than looking it up per call."""

    __slots__ = ("counts", "sum", "count", "_also")

    def __init__(self, also: Any = None, labels: dict[str, str] | None = None) -> None:
        self.counts = [0] * (len(STAGE_BUCKETS) + 1)  # the last bucket is +Inf
        self.sum = 0.0
        self.count = 0
        # the OpenTelemetry histogram and its attributes, when OTLP export is on
        self._also = (also, labels) if also is not None else None

    def observe(self, value: float) -> None:
        self.counts[bisect_left(STAGE_BUCKETS, value)] += 1  # le is inclusive: value <= bound
        self.sum += value
        self.count += 1
        if self._also is not None:
            self._also[0].record(value, self._also[1])


class Metrics:
    def __init__(self, otlp: bool | None = None) -> None:
        self._values: dict[str, dict[Labels, float]] = {}  # counters and gauges
        self._histograms: dict[str, dict[Labels, Series]] = {}
        for name, (kind, _) in INSTRUMENTS.items():
            (self._histograms if kind == HISTOGRAM else self._values)[name] = {}
        self._otel_histograms: dict[str, Any] = {}
        self._provider: Any = None
        if otlp if otlp is not None else bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
            self._provider = self._push()

    def _push(self) -> Any:
        """The OpenTelemetry meter that pushes these metrics over OTLP/HTTP (periodically and at shutdown)."""
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.metrics import CallbackOptions, Observation
        from opentelemetry.sdk.metrics import Histogram, MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
        from opentelemetry.sdk.resources import Resource

        provider = MeterProvider(
            metric_readers=[PeriodicExportingMetricReader(OTLPMetricExporter())],
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
        meter = provider.get_meter("paysentry", __version__)

        def observer(name: str) -> Any:
            def observe(options: CallbackOptions) -> Iterable[Observation]:
                return [Observation(value, dict(labels)) for labels, value in self._values[name].items()]

            return observe

        for name, (kind, text) in INSTRUMENTS.items():
            if kind == COUNTER:
                meter.create_observable_counter(
                    name.removesuffix("_total"), [observer(name)], description=text
                )
            elif kind == HISTOGRAM:
                self._otel_histograms[name] = meter.create_histogram(name, unit="s", description=text)
            else:
                meter.create_observable_gauge(name, [observer(name)], description=text)
        return provider

    # -- recording ------------------------------------------------------------------------------------------
    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        series = self._values[name]
        key = tuple(sorted(labels.items()))
        series[key] = series.get(key, 0.0) + amount

    def series(self, name: str, **labels: str) -> Series:
        """The histogram series of ``name`` with these labels (created on first use)."""
        key = tuple(sorted(labels.items()))
        found = self._histograms[name].get(key)
        if found is None:
            found = self._histograms[name][key] = Series(self._otel_histograms.get(name), labels)
        return found

    def set(self, name: str, value: float, replace: bool = False, **labels: str) -> None:
        if replace:
            self._values[name] = {}
        self._values[name][tuple(sorted(labels.items()))] = value

    def set_all(self, name: str, series: Iterable[tuple[dict[str, str], float]]) -> None:
        """Replace every series of a gauge at once (spend and holds, refreshed by the sweep)."""
        self._values[name] = {tuple(sorted(labels.items())): value for labels, value in series}

    # -- reading --------------------------------------------------------------------------------------------
    def value(self, name: str, **labels: str) -> float:
        """The current value of one series (counters and gauges), for tests and the CLI."""
        return self._values[name].get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> str:
        """Prometheus text exposition format 0.0.4."""
        lines: list[str] = []
        for name in sorted(INSTRUMENTS):
            kind, text = INSTRUMENTS[name]
            values = self._values.get(name, {})
            histograms = self._histograms.get(name, {})
            if not values and not histograms:
                continue
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            for labels, value in sorted(values.items()):
                lines.append(f"{name}{_labels(dict(labels))} {_number(value)}")
            for labels, series in sorted(histograms.items()):
                lines += _histogram_lines(name, dict(labels), series)
        return "\n".join(lines) + "\n"

    def shutdown(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()


def _histogram_lines(name: str, labels: dict[str, str], series: Series) -> list[str]:
    lines, cumulative = [], 0
    for bound, count in zip([*STAGE_BUCKETS, math.inf], series.counts, strict=True):
        cumulative += count
        le = "+Inf" if bound == math.inf else _number(bound)
        lines.append(f"{name}_bucket{_labels({**labels, 'le': le})} {cumulative}")
    lines.append(f"{name}_sum{_labels(labels)} {_number(series.sum)}")
    lines.append(f"{name}_count{_labels(labels)} {series.count}")
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
