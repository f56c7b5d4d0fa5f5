"""Card numbers in free text: what an agent writes in a description, metadata or an idempotency key, and
what error messages would echo, is masked before it is stored, logged or sent back.

A card number is a Luhn-valid run of 13 to 19 digits, the digits possibly grouped by single spaces or
dashes (``4242 4242 4242 4242``). A longer run of digits is masked when any 13 to 19 digits in it are
Luhn-valid (a card hidden among other digits), and a run of more than 64 digits always. All digits but the last four become ``*``.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

_RUN = re.compile(r"[0-9](?:[ -]?[0-9]){12,}")
MIN_DIGITS, MAX_DIGITS = 13, 19


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, char in enumerate(reversed(digits)):
        d = ord(char) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _looks_like_card(digits: str) -> bool:
    if len(digits) <= MAX_DIGITS:
        return luhn_valid(digits)
    if len(digits) > 64:  # too long to search window by window: masked whatever it is
        return True
    return any(
        luhn_valid(digits[start : start + size])
        for size in range(MIN_DIGITS, MAX_DIGITS + 1)
        for start in range(len(digits) - size + 1)
    )


def _mask_run(match: re.Match[str]) -> str:
    run = match.group(0)
    digits = [c for c in run if c.isdigit()]
    if not _looks_like_card("".join(digits)):
        return run
    keep = len(digits) - 4
    out, seen = [], 0
    for char in run:
        if char.isdigit():
            out.append("*" if seen < keep else char)
            seen += 1
        else:
            out.append(char)
    return "".join(out)


def mask_cards(text: str) -> str:
    """``text`` with every card number in it masked (``************4242``)."""
    if len(text) < MIN_DIGITS:
        return text
    return _RUN.sub(_mask_run, text)


def has_card(text: str) -> bool:
    return mask_cards(text) != text


def mask_all(value: Any) -> Any:
    """Every string in ``value`` (dict keys too, lists and dicts walked) with card numbers masked."""
    if isinstance(value, str):
        return mask_cards(value)
    if isinstance(value, dict):
        return {mask_all(k): mask_all(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [mask_all(v) for v in value]
    return value


def storable_key(key: str) -> str:
    """An idempotency key as it is kept: itself, or, when it holds a card number, the masked key with a
    digest of the original (so two keys that mask alike stay two keys, and no card number is kept)."""
    masked = mask_cards(key)
    if masked == key:
        return key
    return f"{masked}~{hashlib.sha256(key.encode('utf-8', 'surrogatepass')).hexdigest()[:20]}"
