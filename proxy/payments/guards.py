"""What an agent's call may not carry: checks on the call's values before anything is decided."""

from __future__ import annotations

import base64
import binascii

from proxy.connections import Connection
from proxy.errors import BadRequest, Forbidden, MethodNotAllowed
from proxy.payments.calls import AgentCall, Headers
from proxy.redact import storable_key


def check_call(call: AgentCall, connection: Connection) -> None:
    """Refuse what could steer the call elsewhere or onto someone else's money."""
    adapter = connection.adapter
    if call.method not in adapter.methods:
        raise MethodNotAllowed(f"PaySentry does not forward {call.method} requests to {adapter.name}")
    if not call.raw_path.startswith("/"):  # the request target as sent: absolute-form or authority-form
        raise BadRequest("PaySentry is not a forward proxy: send the path only (origin-form), not a full URL")
    names = {name: _normalized(name) for name in call.headers}
    guarded = [name for name, norm in names.items() if norm in adapter.guarded_headers]
    if guarded:
        raise BadRequest(
            f"PaySentry does not forward the {guarded[0]} header: it would change whose money moves",
            param=guarded[0],
        )
    if adapter.account_header:
        account = _normalized(adapter.account_header)
        spelled = [name for name, norm in names.items() if norm == account and name.lower() != account]
        if spelled:  # Stripe_Account: some servers read it as Stripe-Account, the guard would not
            raise BadRequest(
                f"send the {adapter.account_header} header spelled so, not {spelled[0]}", param=spelled[0]
            )
        accounts = call.headers.getall(adapter.account_header, [])
        if len(accounts) > 1 or (accounts and accounts[0] not in connection.allowed_accounts):
            raise Forbidden(
                f"{adapter.account_header} names an account this agent's owner has not allowed",
                param=adapter.account_header,
            )
    raw = call.raw_path
    lowered = raw.lower()
    if "%2f" in lowered or "%5c" in lowered or "%2e" in lowered or "/../" in raw + "/" or "//" in raw:
        raise BadRequest("the request path contains an encoded or relative segment")


def _normalized(name: str) -> str:
    """A header name as a lenient server may read it: case-folded, underscores as dashes."""
    return name.strip().lower().replace("_", "-")


def bearer_token(headers: Headers) -> str | None:
    """The agent's token: ``Authorization: Bearer <token>``, or the user name of Basic auth (how some SDKs
    send an API key)."""
    header = headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip() or None
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value).decode().split(":", 1)[0] or None
        except (binascii.Error, UnicodeDecodeError):
            return None
    return None


def idempotency_key(headers: Headers, name: str, longest: int) -> str:
    """The agent's idempotency key as it is kept: printable text of at most ``longest`` characters (no
    control characters, no bytes that are not UTF-8), a card number in it masked (``storable_key``)."""
    key = headers.get(name) or ""
    if len(key) > longest:
        raise BadRequest(f"{name} is longer than {longest} characters", param=name)
    if not key.isprintable():
        raise BadRequest(f"{name} must be printable UTF-8 text (no control characters)", param=name)
    return storable_key(key)
