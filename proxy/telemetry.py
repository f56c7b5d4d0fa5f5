"""OpenTelemetry: one tracer provider for the process, exporting over OTLP when OTEL_* says where."""

from __future__ import annotations

import os

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from proxy import __version__

TRACER_NAME = "paysentry"


def setup_tracing(extra_processor: SpanProcessor | None = None) -> TracerProvider:
    """Install the global tracer provider; add the OTLP exporter when an endpoint is configured."""
    resource = Resource.create(
        {"service.name": os.environ.get("OTEL_SERVICE_NAME", "paysentry"), "service.version": __version__}
    )
    exporting = bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )
    # Spans nobody will receive are not recorded (their context still propagates, so the provider's trace
    # continues the agent's). When exporting, the standard OTEL_TRACES_SAMPLER(_ARG) choose the sampler.
    recording = exporting or extra_processor is not None
    provider = TracerProvider(resource=resource, sampler=None if recording else ALWAYS_OFF)
    if exporting:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    if extra_processor is not None:
        provider.add_span_processor(extra_processor)
    trace.set_tracer_provider(provider)
    return provider


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME, __version__)
