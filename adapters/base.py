"""The adapter port: what the sidecar asks of each payment provider's module, and the registry type that
holds the providers PaySentry knows."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxy.currency import format_minor
from proxy.errors import BadRequest
from proxy.model import OperationExample, Payment


def bounded_refund(payment: Payment, remaining: int, currency: str) -> tuple[int, str]:
    """(amount, currency) of a refund: the amount it names, else all that is left; refused when it asks
    for more than is left of what was captured (nothing forwarded, nothing counted)."""
    if remaining <= 0 or payment.amount > remaining:
        asked = format_minor(payment.amount, currency) if payment.amount else "more"
        raise BadRequest(
            f"{payment.refers_to} has {format_minor(max(remaining, 0), currency)} left to refund; "
            f"PaySentry does not forward a refund of {asked}",
            param="amount",
        )
    return payment.amount or remaining, currency


PAYMENT, PASSTHROUGH = "payment", "passthrough"
# The metadata key PaySentry sets on every object a call it forwards creates: the authorization's id.
ATTRIBUTION = "paysentry_authorization"


@dataclass(frozen=True, slots=True)
class Classified:
    """What a request is: a payment call to decide, or a call that moves no money (forwarded as is)."""

    kind: str
    payment: Payment | None = None
    # A passthrough that cancels an earlier object (an intent, a payment): once the provider accepts it,
    # the spend counted for that object is released.
    voids: str | None = None
    # A passthrough on an earlier object (a MercadoPago capture): only the agent that made it may.
    acts_on: str | None = None


@dataclass(frozen=True, slots=True)
class Reply:
    """An answer PaySentry makes itself in the provider's shape: a refusal the agent's SDK raises as its
    ordinary error, or a decision the provider asked for (a real-time card authorization)."""

    status: int
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)


VOID, CONFIRM = "void", "confirm"


@dataclass(frozen=True, slots=True)
class AuthorizationRequest:
    """A provider asking PaySentry to decide now (a card authorization at a merchant).

    ``payment.refers_to`` is the card, ``id`` the provider's id of the authorization (recorded as its
    idempotency key and provider reference); ``answer(approved, metadata)`` is the reply the provider
    expects, in its own shape."""

    id: str
    payment: Payment
    answer: Callable[[bool, Mapping[str, str]], Reply]


@dataclass(frozen=True, slots=True)
class CardUse:
    """A card an event shows was used, and the provider call that cancels it (for one-time cards)."""

    card: str
    method: str
    path: str
    body: bytes
    content_type: str = "application/x-www-form-urlencoded"


@dataclass(frozen=True, slots=True)
class WebhookEvent:
    """A verified provider event, reduced to what settles an authorization."""

    id: str
    type: str
    provider_ref: str | None
    outcome: str | None  # VOID: the money will not move, release its spend; CONFIRM: it moved
    request: AuthorizationRequest | None = None
    used_card: CardUse | None = None  # a captured authorization: one-time cards are then cancelled
    # A notification that says only which object changed: read it here (GET) to learn what it became.
    read: str | None = None


# What a provider's object says became of the money: it moved, it may still move, it will not.
MOVED, PENDING, NOT_MOVED = "moved", "pending", "not_moved"


@dataclass(frozen=True, slots=True)
class ProviderObject:
    """An object as the provider's own records show it (a list page, or one read), reduced to what
    reconciliation compares: what made it (``operation``), what it moved (``amount`` in minor units,
    ``currency``), whether it moved (``outcome``: MOVED, PENDING or NOT_MOVED; ``status`` the provider's
    own word), when, and the authorization PaySentry tagged it with (None: not made through PaySentry).
    ``body`` is the object's JSON, kept as the answer to replay when reconciliation settles its call."""

    ref: str
    operation: str
    amount: int
    currency: str
    outcome: str
    status: str
    created: float
    authorization: str | None
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class ProviderPage:
    """One page of a provider's list: its objects, and the request target of the next page (None: last)."""

    objects: tuple[ProviderObject, ...]
    next: str | None


@dataclass(frozen=True, slots=True)
class Setting:
    """A per-connection setting an adapter takes (``paysentry provider add --setting NAME=VALUE``)."""

    description: str
    required: bool = False


def check_setting_names(provider: str, described: Mapping[str, Setting], given: Mapping[str, str]) -> None:
    """Raise ValueError naming the settings ``provider`` takes when ``given`` has an unknown one or
    lacks a required one; each adapter's ``configured`` then checks the values."""
    allowed = ", ".join(f"{name} ({s.description})" for name, s in described.items()) or "none"
    unknown = sorted(set(given) - set(described))
    if unknown:
        raise ValueError(
            f"unknown setting {', '.join(unknown)} for a {provider} connection; its settings: {allowed}"
        )
    missing = [name for name, s in described.items() if s.required and not given.get(name)]
    if missing:
        raise ValueError(
            f"a {provider} connection needs the setting {', '.join(missing)}; its settings: {allowed}"
        )


class Adapter(Protocol):
    name: str
    # The operations ``classify`` and ``verify_webhook`` produce, each with a request path that produces
    # it (the default path of a policy test case).
    operations: Mapping[str, str]
    # The per-connection settings ``configured`` takes.
    settings: Mapping[str, Setting]
    default_upstream: str
    idempotency_header: str
    # The HTTP methods the provider's API uses; anything else is refused before it reaches the provider.
    methods: frozenset[str]
    # Request headers the agent may not send through (they would change whose money moves).
    guarded_headers: frozenset[str]
    # The header naming a connected account to act for: allowed only for accounts the owner lists.
    account_header: str | None

    def configured(self, settings: Mapping[str, str]) -> Adapter:
        """This adapter for one connection's ``settings`` (as described by ``settings``); raise ValueError
        naming a missing, unknown or invalid setting and the settings allowed."""
        ...

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
    ) -> Reply:
        """``kind`` is one of: invalid_request, authentication, policy, rate_limit, idempotency, api."""
        ...

    def prepare(self, payment: Payment, body: bytes) -> bytes:
        """The body to forward once ``payment`` is allowed: where the provider can enforce what was
        approved (a card's spending controls), the body says exactly that; otherwise it is unchanged."""
        ...

    def attribute(self, payment: Payment, body: bytes, authorization_id: str) -> bytes:
        """The body to forward, tagged with the authorization that allowed it (``ATTRIBUTION`` in the
        object's metadata) when the call creates an object, so the provider's own records name it;
        unchanged for calls on existing objects. The same inputs give the same bytes: a re-send with the
        same idempotency key must be the same request."""
        ...

    def declined_in(self, body: bytes) -> str | None:
        """Why a 2xx answer still moved no money (a payment created as rejected), or None."""
        ...

    def holds_in(self, operation: str, body: bytes) -> int | None:
        """What the object an accepted lifecycle call (``operation``) acted on now moves, when the answer
        shows it moves less than it was authorized for (a partial capture); None when unchanged."""
        ...

    def undecided_in(self, body: bytes) -> bool:
        """Whether an object read to learn an outcome shows the provider has not decided it yet (a card
        authorization still waiting for its answer): the outcome stays unknown."""
        ...

    def cancelled_in(self, body: bytes) -> bool:
        """Whether the answer to a cancellation shows the object cancelled (only then is its spend
        released: a 2xx alone is not trusted)."""
        ...

    def credential_headers(self, credentials: Mapping[str, str]) -> dict[str, str]: ...

    def provider_ref(self, body: bytes) -> str | None:
        """The provider's id of the object a successful call created or changed."""
        ...

    def lookup_path(self, payment: Payment) -> str | None:
        """A GET path that tells the amount of ``payment.refers_to`` when the call itself does not."""
        ...

    def amount_of(self, payment: Payment, body: bytes) -> tuple[int, str] | None:
        """(amount, currency) that ``payment`` moves, given the object ``lookup_path`` returned: the
        amount the call names (in that object's currency), else what is left of the object."""
        ...

    def listings(self, since: float, until: float) -> Sequence[str]:
        """The request targets (GET path and query) of the first page of each list of objects created
        between ``since`` and ``until`` (unix seconds) that calls PaySentry decides can make."""
        ...

    def page(self, target: str, body: bytes) -> ProviderPage:
        """One list page the provider answered to ``target``: its objects (those PaySentry counts) and the
        next page's target. Raises ValueError when the answer is not a list page."""
        ...

    def object_of(self, body: bytes) -> ProviderObject | None:
        """One object the provider answered to a read (``WebhookEvent.read``), or None if it is not one
        PaySentry counts."""
        ...

    def part_of(self, body: bytes) -> str | None:
        """For an object another one made and counts (a charge a payment intent made), that object's ref:
        whose the part is, the whole tells."""
        ...

    def verify_webhook(
        self, headers: Mapping[str, str], body: bytes, secret: str, now: float, tolerance: float
    ) -> WebhookEvent:
        """Check the provider's signature and freshness; raise WebhookRejected saying what is wrong."""
        ...

    def webhook_ack(self, result: str, extra: Mapping[str, str]) -> Reply:
        """The answer to a verified webhook PaySentry has handled (``result``: what it did), in the shape
        and status the provider takes as delivered."""
        ...

    def is_one_time_card(self, payment_summary: Mapping[str, Any]) -> bool:
        """Whether the card created by the recorded payment (its audit summary: operation, metadata, ...)
        is to be cancelled after its first captured authorization."""
        ...

    def card_cancel_should_retry(self, status: int) -> bool:
        """Whether cancelling a one-time card that got ``status`` (0: the provider could not be reached)
        may succeed when the event is delivered again; False means the provider refused the change."""
        ...


class Adapters(Mapping[str, Adapter]):
    """The providers PaySentry knows, by name, and what they declare taken together."""

    def __init__(self, *adapters: Adapter) -> None:
        self._adapters = {adapter.name: adapter for adapter in adapters}
        self.examples = tuple(
            OperationExample(operation, adapter.name, path)
            for adapter in adapters
            for operation, path in adapter.operations.items()
        )
        # Every operation some adapter produces, each once, in the order the adapters declare them.
        self.operations = tuple(dict.fromkeys(example.operation for example in self.examples))

    def __getitem__(self, name: str) -> Adapter:
        return self._adapters[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._adapters)

    def __len__(self) -> int:
        return len(self._adapters)

    def adapter(self, name: str) -> Adapter:
        """The adapter of provider ``name``; ValueError naming the known providers if there is none."""
        try:
            return self._adapters[name]
        except KeyError:
            raise ValueError(f"unknown provider {name!r}; known: {', '.join(sorted(self))}") from None
