"""The values the payment service takes and returns: no HTTP framework, only what a call is."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from multidict import CIMultiDict, CIMultiDictProxy

from adapters.base import Reply
from proxy.connections import Connection
from proxy.model import Agent, Payment
from proxy.upstream import UpstreamRequest

Headers = CIMultiDict[str] | CIMultiDictProxy[str]


@dataclass(frozen=True, slots=True)
class AgentCall:
    """An agent's HTTP call as the agent listener hands it over.

    ``target`` is the path and query exactly as sent (what is forwarded), ``raw_path`` its path part as
    sent, ``path`` the decoded path; ``read_body`` reads the body (bounded in size and time by the
    listener, raising a PaySentryError when it cannot)."""

    method: str
    path: str
    raw_path: str
    target: str
    query: Mapping[str, str]
    headers: Headers
    content_type: str
    remote: str | None
    read_body: Callable[[], Awaitable[bytes]]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the agent gets back: a reply made whole, or (``stream``) a call that moves no money, whose
    answer the listener relays from the upstream as it arrives; the reply is then what to answer when
    the provider cannot be reached."""

    status: int = 200
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    stream: UpstreamRequest | None = None

    @classmethod
    def of(cls, reply: Reply) -> Outcome:
        return cls(reply.status, reply.body, dict(reply.headers))


@dataclass(frozen=True, slots=True)
class PaymentCall:
    """One decision to make: who pays, through which connection, what, under which idempotency key.

    ``forward`` is what is sent to the provider once allowed (None when the provider itself asked for the
    decision: a card authorization); the request hash ties the key to one request. ``learn`` reads the
    outcome of a call PaySentry does not send itself (the card authorization the provider asked about),
    should its answer not be recorded: kept with the decision, as ``forward`` is, for resolution."""

    agent: Agent
    connection: Connection
    payment: Payment
    idempotency_key: str
    request_hash: str
    forward: UpstreamRequest | None = None
    learn: UpstreamRequest | None = None


def provider_idempotency_key(agent_id: str, key: str) -> str:
    """The key PaySentry sends the provider for an agent's key: namespaced by the agent, so that no agent
    can reach another's stored answer at the provider (where every agent of an owner shares one key
    space), and the same for every retry of the same call."""
    return "psk-" + hashlib.sha256(f"{agent_id}\0{key}".encode()).hexdigest()[:48]
