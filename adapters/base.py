"""The adapter port: what the sidecar asks of each payment provider's module."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxy.model import Payment

PAYMENT, PASSTHROUGH = "payment", "passthrough"


@dataclass(frozen=True, slots=True)
class Classified:
    """What a request is: a payment call to decide, or a call that moves no money (forwarded as is)."""

    kind: str
    payment: Payment | None = None


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """A refusal in the provider's own error shape, so the agent's SDK raises its ordinary error."""

    status: int
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)


VOID, CONFIRM = "void", "confirm"


@dataclass(frozen=True, slots=True)
class WebhookEvent:
    """A verified provider event, reduced to what settles an authorization."""

    id: str
    type: str
    provider_ref: str | None
    outcome: str | None  # VOID: the money will not move, release its spend; CONFIRM: it moved


class Adapter(Protocol):
    name: str
    default_upstream: str
    idempotency_header: str
    # Request headers the agent may not send through (they would change whose money moves).
    guarded_headers: frozenset[str]
    # The header naming a connected account to act for: allowed only for accounts the owner lists.
    account_header: str | None

    def classify(self, method: str, path: str, content_type: str, body: bytes) -> Classified:
        """Recognise and normalize a call; raise BadRequest / RouteNotFound with a clear message."""
        ...

    def error(
        self,
        status: int,
        kind: str,
        code: str,
        message: str,
        param: str | None = None,
        extra: Mapping[str, Any] | None = None,
        retry: bool = False,
    ) -> ErrorReply:
        """``kind`` is one of: invalid_request, authentication, policy, rate_limit, idempotency, api."""
        ...

    def credential_headers(self, credentials: Mapping[str, str]) -> dict[str, str]: ...

    def provider_ref(self, body: bytes) -> str | None:
        """The provider's id of the object a successful call created or changed."""
        ...

    def lookup_path(self, payment: Payment) -> str | None:
        """A GET path that tells the amount of ``payment.refers_to`` when the call itself does not."""
        ...

    def amount_of(self, body: bytes) -> tuple[int, str] | None:
        """(amount, currency) from the object that ``lookup_path`` returns."""
        ...

    def verify_webhook(
        self, headers: Mapping[str, str], body: bytes, secret: str, now: float, tolerance: float
    ) -> WebhookEvent:
        """Check the provider's signature and freshness; raise WebhookRejected saying what is wrong."""
        ...
