"""Secrets stay secret: a full session leaves no token, key, credential or card number in any log line,
span or database row; and the encryption key can be rotated under a running deployment's data."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import stripe

from proxy.payments.calls import provider_idempotency_key
from tests.e2e.conftest import MOCK_SECRET, WEBHOOK_SECRET, Deployment, make_deployment
from tests.e2e.otlp import OtlpReceiver
from tests.e2e.test_adversarial import raw_http, request
from tests.e2e.test_webhooks import deliver, event, signature

CARD = "4242424242424242"
GROUPED = "4242 4242 4242 4242"


def sdk(dep: Deployment, key: str | None = None) -> Any:
    stripe.api_base, stripe.api_key, stripe.max_network_retries = dep.agent_url, key or dep.agent_token, 0
    return stripe


def database_text(path: Path) -> str:
    """Every row of every table, every column, as text (blobs decoded byte for byte)."""
    db = sqlite3.connect(path)
    lines = []
    for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'"):
        for row in db.execute(f"SELECT * FROM {table}"):  # noqa: S608 - names from sqlite_master
            cells = [c.decode("latin-1") if isinstance(c, bytes) else str(c) for c in row]
            lines.append(f"{table}: " + " | ".join(cells))
    db.close()
    return "\n".join(lines)


def session(dep: Deployment) -> list[str]:
    """What an agent, an attacker and an owner do in a day; returns the error messages agents saw."""
    seen: list[str] = []
    s = sdk(dep)
    card = {"type": "card", "card": {"number": CARD, "exp_month": 12, "exp_year": 2030, "cvc": "314"}}
    pay = {"amount": 1000, "currency": "usd", "payment_method_data": card, "confirm": True}
    paid = s.PaymentIntent.create(**pay, idempotency_key="s-1")
    s.PaymentIntent.create(**pay, idempotency_key="s-1")
    s.Refund.create(payment_intent=paid.id, amount=500)
    s.Customer.list(limit=3)
    s.PaymentIntent.create(  # a card number in the agent's free text: masked wherever it is kept
        amount=500,
        currency="usd",
        description=f"card {CARD} for the order",
        metadata={"note": GROUPED, CARD: "as a key"},
        idempotency_key=f"order-{CARD}",
    )
    for attempt in (
        lambda: s.PaymentIntent.create(amount=int(CARD), currency="usd"),  # echoed in the error
        lambda: s.PaymentIntent.create(amount=1000, currency="eur", idempotency_key="s-2"),
        lambda: s.PaymentIntent.create(amount=6000, currency="usd", idempotency_key="s-3"),
        lambda: sdk(dep, dep.agent_token[:-6] + "guess!").PaymentIntent.create(amount=1, currency="usd"),
        lambda: sdk(dep, dep.owner_token).PaymentIntent.create(amount=1, currency="usd"),
        lambda: sdk(dep, MOCK_SECRET).PaymentIntent.create(amount=1, currency="usd"),
    ):
        try:
            attempt()
        except stripe.StripeError as exc:
            seen.append(str(exc))
    s = sdk(dep)
    held = dep.owner_api("GET", "/v1/approvals")[1]["data"][0]["id"]
    assert dep.owner_api("POST", f"/v1/approvals/{held}/approve", {"reason": "ok"})[0] == 200
    s.PaymentIntent.create(amount=6000, currency="usd", idempotency_key="s-3")
    seen.append(
        request(dep, "POST", "/v1/payment_intents", {"Stripe-Account": "acct_x"}, b"amount=1")[1].decode()
    )
    body = event("payment_intent.canceled", paid.id, "evt_s1")
    assert deliver(dep, body, signature(body))[0] == 200
    seen.append(json.dumps(deliver(dep, body, signature(body, secret="whsec_wrong"))[1]))
    seen.append(dep.cli("approvals", "list", "--state", "all").stdout)
    return seen


@pytest.mark.e2e
def test_a_full_session_leaves_no_secret_in_logs_spans_or_database(tmp_path: Path) -> None:
    with OtlpReceiver() as collector:
        dep = make_deployment(tmp_path, extra_config="log_level: DEBUG\n")
        dep.env.update(collector.env())
        dep.start()
        try:
            agent_errors = session(dep)
        finally:
            dep.stop()
        spans = collector.spans()
        span_text = json.dumps(spans) + collector.raw().decode("latin-1")

    logs, rows = dep.logs(), database_text(tmp_path / "paysentry.db")
    encryption_key = dep.env["PAYSENTRY_ENCRYPTION_KEYS"].split(":", 1)[1]
    secrets = {
        "agent token": dep.agent_token,
        "agent token secret": dep.agent_token.split("_", 2)[2],
        "guessed agent token": dep.agent_token[:-6] + "guess!",
        "owner token secret": dep.owner_token.split("_", 2)[2],
        "provider secret key": MOCK_SECRET,
        "webhook signing secret": WEBHOOK_SECRET,
        "encryption key": encryption_key,
        "encryption key bytes": base64.b64decode(encryption_key).decode("latin-1"),
        "card number": CARD,
        "grouped card number": GROUPED,
    }
    # The places searched are full of what the session did (so a leak would be there to find) ...
    assert dep.agent_id in logs and dep.agent_id in rows and dep.agent_id in span_text
    assert len(spans) > 20 and len(logs.splitlines()) > 10 and rows.count("authorizations:") == 5
    assert "************4242" in rows  # the masked card is what was kept
    assert len(agent_errors) == 9 and any("above $50 needs a human" in e for e in agent_errors)
    # ... and hold none of the secrets.
    for place, text in {
        "logs": logs,
        "spans": span_text,
        "database": rows,
        "agent errors": "\n".join(agent_errors),
    }.items():
        for name, value in secrets.items():
            assert value not in text, f"the {name} appears in the {place}"


@pytest.mark.e2e
def test_rotating_the_encryption_key_reseals_everything_and_the_old_key_can_go(tmp_path: Path) -> None:
    dep = make_deployment(tmp_path)
    old = dep.env["PAYSENTRY_ENCRYPTION_KEYS"]
    dep.start()
    try:
        first = sdk(dep).PaymentIntent.create(amount=1200, currency="usd", idempotency_key="rot-1")
    finally:
        dep.stop()

    new = "k2:" + base64.b64encode(os.urandom(32)).decode()
    dep.env["PAYSENTRY_ENCRYPTION_KEYS"] = f"{new},{old}"  # newest first
    report = json.loads(dep.cli("keys", "rotate").stdout)
    assert report["newest_key"] == "k2"
    assert report["connection"] == {"resealed": 1, "current": 0, "changed_meanwhile": 0}
    assert report["response"]["resealed"] == 1
    assert report["request"]["resealed"] == 1  # the forwarded call, kept to resolve an unknown outcome
    again = json.loads(dep.cli("keys", "rotate").stdout)
    assert again["connection"]["resealed"] == 0 and again["response"] == {
        "resealed": 0,
        "current": 1,
        "changed_meanwhile": 0,
    }
    rows = database_text(tmp_path / "paysentry.db")
    assert "ps1.k1." not in rows and rows.count("ps1.k2.") == 3

    dep.env["PAYSENTRY_ENCRYPTION_KEYS"] = new  # the old key is gone
    dep.start()
    try:
        replay = sdk(dep).PaymentIntent.create(amount=1200, currency="usd", idempotency_key="rot-1")
        assert replay.id == first.id  # the stored answer opened under the new key
        fresh = sdk(dep).PaymentIntent.create(amount=1300, currency="usd", idempotency_key="rot-2")
        assert fresh.amount == 1300  # the provider credentials opened under the new key
        # The built-in mock provider restarted with the sidecar: only the fresh call reached it; the
        # same-key retry was answered from the stored (resealed) answer.
        sent = [p["idempotency_key"] for p in dep.mock_payments()]
        assert sent == [provider_idempotency_key(dep.agent_id, "rot-2")]
    finally:
        dep.stop()

    dep.env["PAYSENTRY_ENCRYPTION_KEYS"] = old  # only the retired key: payments fail closed, clearly
    dep.start()
    try:
        with pytest.raises(stripe.StripeError) as refused:
            sdk(dep).PaymentIntent.create(amount=1000, currency="usd", idempotency_key="rot-3")
        assert refused.value.http_status >= 500 and "key" in str(refused.value)
        assert dep.mock_payments() == []
    finally:
        dep.stop()


@pytest.mark.e2e
def test_malformed_headers_carrying_real_tokens_leave_them_in_no_log_or_answer(tmp_path: Path) -> None:
    """aiohttp refuses these before any handler runs; its own error path used to log (and answer with)
    the offending bytes, the token among them."""
    dep = make_deployment(tmp_path, extra_config="log_level: DEBUG\n")
    dep.start()
    answers: list[bytes] = []
    try:
        for token, base in ((dep.agent_token, dep.agent_url), (dep.owner_token, dep.admin_url)):
            bearer = b"Authorization: Bearer " + token.encode()
            for malformed in (
                bearer + b"\x01",  # a control character after the token
                bearer + b"\x00tail",
                bearer + b"\x7f",
                bearer + b"\xff",
                bearer + b"A" * 9000,  # longer than max_header_bytes
                b"X-Copy: " + token.encode() + b"\x0b",
                b"X-" + token.encode() + b"\x01: v",  # in a header name
                b"Authorization Bearer " + token.encode(),  # no colon
                b"X-Big: " + b"a" * 9000 + token.encode(),
                b" folded " + token.encode(),  # an obsolete line folding
            ):
                head = (
                    b"GET /v1/customers HTTP/1.1\r\nHost: x\r\n"
                    + malformed
                    + b"\r\nConnection: close\r\n\r\n"
                )
                status, answer = raw_http(dep, head, base)
                assert status in (400, 401, 431), (malformed[:40], status)
                answers.append(answer)
            line = b"GET /v1/customers?key=" + token.encode() + b"\x01 HTTP/1.1\r\nHost: x\r\n\r\n"
            answers.append(raw_http(dep, line, base)[1])  # in the request line
    finally:
        dep.stop()
    logs = dep.logs()
    everything = logs + b"".join(answers).decode("latin-1")
    for name, value in {
        "agent token": dep.agent_token,
        "agent secret": dep.agent_token.split("_", 2)[2],
        "owner token": dep.owner_token,
        "owner secret": dep.owner_token.split("_", 2)[2],
    }.items():
        assert value not in everything, f"the {name} appears in the logs or an answer"
    assert "Traceback" not in logs
    assert "malformed request" in logs  # the refusals were logged, by kind
