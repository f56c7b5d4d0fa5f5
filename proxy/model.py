"""Value types shared by the decision core, the adapters and the stores.

Everything here is immutable and free of I/O: a payment as the adapters normalize it, the agent making
it, the decision the policies reach, and the spend charges a decision asks the store to reserve.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# The operations a payment can have are declared by the adapters (each adapter's ``operations``).
# "unrecognized" is a write no adapter knows: it is refused unless an allow rule of the owner's policy
# matches it.
UNRECOGNIZED = "unrecognized"

ALLOW, DENY, HOLD = "allow", "deny", "hold"


@dataclass(frozen=True, slots=True)
class Payment:
    """One payment call, normalized by its provider's adapter."""

    provider: str
    operation: str
    amount: int  # minor units of ``currency``; 0 for an unrecognized write
    currency: str  # lowercase ISO 4217, "" when unknown
    method: str
    path: str
    destination: str = ""
    customer: str = ""
    # Who receives the money, as the adapter reads it from the call (a connected account, a customer, a
    # card's merchant, a MercadoPago collector, ...), and what kind of party that is (PAYEE_KINDS).
    payee: str = ""
    payee_kind: str = ""
    description: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)
    # Set for calls on an object created earlier (confirm, capture, refund of a charge): its provider id.
    refers_to: str = ""
    # What an earlier call already counted for the object this call acts on (confirming or capturing an
    # intent created through PaySentry): limits are checked, and only what the call adds beyond it is
    # charged (a capture above the authorized amount, where the card scheme allows over-capture).
    counted: int = 0
    # Merchant or item categories: a card's allowed categories, the items' category ids of a MercadoPago
    # payment, the merchant category of a card authorization.
    categories: tuple[str, ...] = ()
    # The merchant of a card authorization: name, category, category_code, country, city.
    merchant: Mapping[str, str] = field(default_factory=dict)
    # An x402 payment: payee, asset, network, scheme, resource (URL) and origin (see X402_FIELDS).
    x402: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class OperationExample:
    """A provider's request that its adapter normalizes into ``operation``: what a policy test case's
    payment is given unless it names its own provider and path."""

    operation: str
    provider: str
    path: str


@dataclass(frozen=True, slots=True)
class Agent:
    id: str
    owner_id: str
    name: str
    connection_id: str
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Charge:
    """Spend a decision reserves against one limit for one window period."""

    limit: str
    period: str  # e.g. "day:2026-11-22", "month:2026-11"
    currency: str
    amount: int
    max_amount: int | None
    max_count: int | None
    message: str = ""  # the limit's own message, for the refusal when it is exceeded


@dataclass(frozen=True, slots=True)
class SpendTotal:
    amount: int = 0
    count: int = 0


@dataclass(frozen=True, slots=True)
class Reviewer:
    """An automated reviewer: an HTTP endpoint that answers a held payment with a vote and its reasoning."""

    name: str
    url: str
    timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class ApprovalSpec:
    """Who decides a hold. No approvers: any owner decides alone."""

    approvers: tuple[str, ...] = ()  # people, and "reviewer:<name>" for automated reviewers
    quorum: int = 1
    veto: bool = True  # one deny vote refuses at once
    wait: float = 0.0  # seconds the agent's call may be kept open waiting for the quorum
    reviewers: tuple[Reviewer, ...] = ()


@dataclass(frozen=True, slots=True)
class ShadowHit:
    """What a shadow rule or policy would have decided; recorded, never enforced."""

    policy: str
    rule: str
    effect: str
    message: str


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: str  # allow | deny | hold
    rule: str  # the rule (or limit) that decided; "default" when no rule fired
    policy: str
    message: str
    charges: tuple[Charge, ...] = ()
    hold_expires_in: float | None = None  # seconds, for holds
    revision: str = ""
    shadow: tuple[ShadowHit, ...] = ()
    approval: ApprovalSpec | None = None  # for holds
    # Rules whose expression was evaluated and matched (for policy-test coverage).
    fired: tuple[str, ...] = ()
