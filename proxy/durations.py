"""Human durations in settings and policies: "90s", "15m", "24h", "7d" (or a number of seconds)."""

from __future__ import annotations

import re

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_PATTERN = re.compile(r"^\s*([0-9]{1,12}(?:\.[0-9]{1,9})?)\s*(ms|s|m|h|d)?\s*$")


def parse_duration(value: object) -> float:
    """Seconds in ``value``; raises ValueError with a readable message."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as 30s, 15m or 24h, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    match = _PATTERN.match(str(value))
    if not match:
        raise ValueError(f"expected a duration such as 30s, 15m or 24h, got {value!r}")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]
