"""What a decision leaves behind: the authorization record the store keeps, its audit summary of the
payment, the span attributes and the optional decision log line."""

from __future__ import annotations

import logging
from typing import Any

from opentelemetry import trace

from proxy.model import HOLD, Agent, Decision, Payment
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
) -> NewAuthorization:
    """The record of one decision, as the store reserves and keeps it."""
    hold = decision.outcome == HOLD
    return NewAuthorization(
        id=new_id("auth"),
        owner_id=agent.owner_id,
        agent_id=agent.id,
        idempotency_key=key,
        request_hash=request_hash,
        provider=payment.provider,
        operation=payment.operation,
        amount=payment.amount,
        currency=payment.currency,
        destination=payment.destination,
        payment=payment_summary(payment),
        decision=decision.outcome,
        rule=decision.rule,
        policy=decision.policy,
        message=decision.message,
        revision=decision.revision,
        charges=decision.charges,
        approval_id=new_id("apr") if hold else None,
        hold_expires_at=now + (decision.hold_expires_in or 0) if hold else None,
        lease_expires_at=now + lease,
        approval=decision.approval,
        shadow=[
            {"policy": h.policy, "rule": h.rule, "effect": h.effect, "message": h.message}
            for h in decision.shadow
        ],
    )


def payment_summary(payment: Payment) -> dict[str, Any]:
    """What the audit record keeps of a payment: the normalized fields, never the raw parameters."""
    return {
        "provider": payment.provider,
        "operation": payment.operation,
        "amount": payment.amount,
        "currency": payment.currency,
        "destination": payment.destination,
        "customer": payment.customer,
        "description": payment.description,
        "metadata": dict(payment.metadata),
        "method": payment.method,
        "path": payment.path,
        "refers_to": payment.refers_to,
        "categories": list(payment.categories),
        "merchant": dict(payment.merchant),
    }


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
