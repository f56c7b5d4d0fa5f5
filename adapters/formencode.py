"""Stripe's bracketed form encoding: ``metadata[k]=v``, ``items[0][price]=p``, ``expand[]=x``.

``parse_form`` turns a urlencoded body into nested dicts and lists (``encode_form`` turns them back),
refusing ambiguous or conflicting keys with the parameter's name, so a malformed body gets a precise error
and changes nothing.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlencode

from proxy.errors import BadRequest

_KEY = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")
_PART = re.compile(r"\[([^\[\]]*)\]")
MAX_DEPTH = 8


def parse_form(body: bytes) -> dict[str, Any]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the request body is not valid UTF-8") from None
    try:
        pairs = parse_qsl(
            text, keep_blank_values=True, strict_parsing=bool(text), errors="strict", max_num_fields=1000
        )
    except ValueError as exc:
        raise BadRequest(f"the request body is not valid form encoding: {exc}") from None
    root: dict[str, Any] = {}
    for key, value in pairs:
        _assign(root, key, value)
    return {key: _listify(value) for key, value in root.items()}  # the top level stays named (0=x too)


def _assign(root: dict[str, Any], key: str, value: str) -> None:
    match = _KEY.match(key)
    if not match:
        raise BadRequest(f"malformed parameter name {key!r}", param=key)
    parts = [match.group(1), *_PART.findall(match.group(2))]
    if len(parts) > MAX_DEPTH:
        raise BadRequest(f"parameter {key!r} is nested too deeply", param=key)
    node = root
    for i, part in enumerate(parts[:-1]):
        if part == "":
            raise BadRequest(f"parameter {key!r}: [] may only close a name", param=key)
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise BadRequest(
                f"parameter {'['.join(parts[: i + 1])} is given both as a value and as an object", param=key
            )
        node = child
    last = parts[-1]
    if last == "":
        last = str(sum(1 for k in node if _is_index(k)))
    if last in node:
        raise BadRequest(f"parameter {key!r} is given more than once", param=key)
    node[last] = value


def _is_index(key: str) -> bool:
    return key.isascii() and key.isdigit()  # not "²" or "٣", which str.isdigit also accepts


def _listify(node: Any) -> Any:
    """Dicts whose keys are exactly 0..n-1 become lists, recursively."""
    if not isinstance(node, dict):
        return node
    converted = {k: _listify(v) for k, v in node.items()}
    if converted and all(_is_index(k) for k in converted):
        indexes = sorted(int(k) for k in converted)
        if indexes == list(range(len(indexes))):
            return [converted[str(i)] for i in indexes]
    return converted


def encode_form(params: dict[str, Any]) -> bytes:
    """The inverse of ``parse_form``: nested dicts as ``a[b]``, lists as ``a[0]``, in the given order."""
    pairs: list[tuple[str, str]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}[{key}]" if prefix else str(key), item)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(f"{prefix}[{i}]", item)
        else:
            pairs.append((prefix, str(value)))

    walk("", params)
    return urlencode(pairs).encode()
