"""Structured logs: one JSON object per line, with the trace id when there is a current span."""

from __future__ import annotations

import json
import logging
import sys
import time

from opentelemetry import trace

from proxy.listeners.server import quiet_aiohttp_errors
from proxy.redact import mask_all


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": round(time.time(), 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        trace_id = line.pop("trace_id", None)  # hex: never a card number, never masked
        line = mask_all(line)  # the last guard: no card number in a log line
        context = trace.get_current_span().get_span_context()
        if trace_id is not None or context.is_valid:
            line["trace_id"] = trace_id or f"{context.trace_id:032x}"
        return json.dumps(line, default=str)


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    quiet_aiohttp_errors()
