"""What a decision leaves behind: the authorization record the store keeps, its audit summary of the
payment, the span attributes and the optional decision log line."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace

from proxy.model import HOLD, Agent, Decision, Payment
from proxy.redact import mask_all, mask_cards
from proxy.secrets import new_id
from proxy.store import AuthorizationRecord, NewAuthorization

log = logging.getLogger("paysentry.decisions")


def authorization_for(
    agent: Agent,
    payment: Payment,
    decision: Decision,
    key: str,
    request_hash: str,
    now: float,
    lease: float,
    auth_id: str | None = None,
    request: bytes | None = None,
) -> NewAuthorization:
    """The record of one decision, as the store reserves and keeps it (``request``: the call to forward,
    sealed to the record ``auth_id``)."""
    hold = decision.outcome == HOLD
    return NewAuthorization(
        id=auth_id or new_id("auth"),
        owner_id=agent.owner_id,
        agent_id=agent.id,
        idempotency_key=key,
        request_hash=request_hash,
        provider=payment.provider,
        operation=payment.operation,
        amount=payment.amount,
        currency=payment.currency,
        destination=mask_cards(payment.destination),
        payment=payment_summary(payment),
        decision=decision.outcome,
        rule=decision.rule,
        policy=decision.policy,
        message=mask_cards(decision.message),  # a rendered message may quote the payment's free text
        revision=decision.revision,
        charges=decision.charges,
        approval_id=new_id("apr") if hold else None,
        hold_expires_at=now + (decision.hold_expires_in or 0) if hold else None,
        lease_expires_at=now + lease,
        request=request,
        approval=decision.approval,
        shadow=[
            {"policy": h.policy, "rule": h.rule, "effect": h.effect, "message": mask_cards(h.message)}
            for h in decision.shadow
        ],
    )


def payment_summary(payment: Payment) -> dict[str, Any]:
    """What the audit record keeps of a payment: the normalized fields, never the raw parameters, and
    card numbers in their free text (description, metadata, ...) masked."""
    summary = {
        "provider": payment.provider,
        "operation": payment.operation,
        "amount": payment.amount,
        "currency": payment.currency,
        "destination": payment.destination,
        "payee": payment.payee,
        "payee_kind": payment.payee_kind,
        "customer": payment.customer,
        "description": payment.description,
        "metadata": dict(payment.metadata),
        "method": payment.method,
        "path": payment.path,
        "refers_to": payment.refers_to,
        "categories": list(payment.categories),
        "merchant": dict(payment.merchant),
        "x402": dict(payment.x402),
    }
    return dict(mask_all(summary))


def annotate(span: trace.Span, payment: Payment, decision: Decision) -> None:
    span.set_attribute("paysentry.operation", payment.operation)
    span.set_attribute("paysentry.amount", payment.amount)
    span.set_attribute("paysentry.currency", payment.currency)
    span.set_attribute("paysentry.decision", decision.outcome)
    span.set_attribute("paysentry.rule", decision.rule)
    span.set_attribute("paysentry.policy_revision", decision.revision)
    if decision.shadow:
        span.set_attribute("paysentry.shadow", [f"{h.policy}.{h.rule}:{h.effect}" for h in decision.shadow])


def log_decision(agent: Agent, auth: AuthorizationRecord) -> None:
    if not log.isEnabledFor(logging.INFO):  # the audit log keeps every decision; this line is optional
        return
    context = trace.get_current_span().get_span_context()
    log.info(
        "decision",
        extra={
            "fields": {
                "trace_id": f"{context.trace_id:032x}",
                "authorization": auth.id,
                "agent": agent.name,
                "agent_id": agent.id,
                "operation": auth.operation,
                "amount": auth.amount,
                "currency": auth.currency,
                "decision": auth.decision,
                "rule": auth.rule,
                "policy": auth.policy,
                "revision": auth.revision,
                "state": auth.state,
                "approval_id": auth.approval_id,
            }
        },
    )


# Headers never kept with a forwarded call: the credentials (injected again when it is re-sent) and the
# trace context of the call that sent it.
_NOT_KEPT = frozenset({"authorization", "traceparent", "tracestate", "accept-encoding"})


def pack_request(method: str, target: str, headers: Mapping[str, str], body: bytes) -> bytes:
    """A forwarded call as kept (sealed) to re-send it when its outcome is unknown: the method, the path
    and query, the headers that shape it (the account acted for, the API version, the content type;
    never the credentials) and the body."""
    kept = [[k, v] for k, v in headers.items() if k.lower() not in _NOT_KEPT]
    data = {"method": method, "target": target, "headers": kept, "body": base64.b64encode(body).decode()}
    return json.dumps(data).encode()


def unpack_request(packed: bytes) -> tuple[str, str, list[tuple[str, str]], bytes]:
    data = json.loads(packed)
    headers = [(k, v) for k, v in data["headers"]]
    return data["method"], data["target"], headers, base64.b64decode(data["body"])
