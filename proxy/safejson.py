"""JSON from outside (agents, owners, providers' webhooks) parsed with bounds: nesting deeper than
``MAX_DEPTH`` is refused before the parser runs (Python's decoder recurses and raises RecursionError, and
whatever walks the result afterwards would too), and every failure is a ``ValueError``."""

from __future__ import annotations

import json
import re
from typing import Any

MAX_DEPTH = 64
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = bytes(range(256)).translate(None, b"[]{}")  # every byte but the brackets: deleted


def too_deep(data: bytes) -> bool:
    """Whether arrays and objects nest deeper than ``MAX_DEPTH`` in ``data`` (brackets inside strings not
    counted; a body that opens fewer brackets than that is not scanned)."""
    if data.count(b"[") + data.count(b"{") <= MAX_DEPTH:
        return False
    depth = 0
    for byte in _STRING.sub(b'""', data).translate(None, _BRACKETS):
        depth += 1 if byte in b"[{" else -1
        if depth > MAX_DEPTH:
            return True
    return False


def loads(data: bytes | str, **kwargs: Any) -> Any:
    """``json.loads`` that refuses nesting deeper than ``MAX_DEPTH``; any failure is a ValueError."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if too_deep(raw):
        raise ValueError(f"JSON nested deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(raw, **kwargs)
    except (RecursionError, UnicodeDecodeError, ArithmeticError) as exc:
        raise ValueError(f"invalid JSON: {type(exc).__name__}") from None
