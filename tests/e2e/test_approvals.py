"""Approvals end to end: approvers as principals (each vote counts for the token that proved it), quorum
with people and an automated reviewer, veto, waiting, and notifications through the durable outbox
(retried until the receiver answers 2xx, signed with Standard Webhooks and PaySentry-Signature)."""

from __future__ import annotations

import json
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import standardwebhooks
import stripe

from tests.e2e.conftest import Deployment, free_port, make_deployment
from tests.e2e.test_policy_ops import wait_until
from tests.readme import readme_function

verify = readme_function("verify")  # each delivery checked as the README tells receivers to
pytestmark = pytest.mark.e2e
SECRET = "whsec_dGVzdCBub3RpZmljYXRpb25zIHNlY3JldA"  # a Standard Webhooks secret (base64 after whsec_)


class Receiver:
    """A webhook receiver and automated reviewer on loopback, in this test process. While ``down`` the
    hook answers 503 (a receiver being deployed, say); every attempt is kept."""

    def __init__(self) -> None:
        self.port = free_port()
        self.notifications: list[dict[str, Any]] = []
        self.attempts: list[dict[str, str]] = []
        self.reviews: list[dict[str, Any]] = []
        self.answer: dict[str, Any] | None = {"vote": "approve", "reason": "vendor known, amount usual"}
        self.down = False
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                signed = verify(SECRET.encode(), body, self.headers.get("PaySentry-Signature", ""))
                doc = {**json.loads(body), "_signed": signed}
                if self.path == "/hook":
                    receiver.attempts.append(dict(self.headers))
                    if receiver.down:
                        self._send(503, b"deploying")
                        return
                    # The Standard Webhooks library verifies the same delivery (it raises if it fails).
                    standardwebhooks.Webhook(SECRET).verify(body, dict(self.headers))
                    receiver.notifications.append({**doc, "_id": self.headers["webhook-id"]})
                    self._send(202, b"queued, thanks")  # any 2xx, any body
                elif receiver.answer is None:
                    receiver.reviews.append(doc)
                    self._send(500, b"reviewer broke")
                else:
                    receiver.reviews.append(doc)
                    self._send(200, json.dumps(receiver.answer).encode())

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


POLICY = """
    name: approvals
    groups: {{finance: [bob]}}
    reviewers:
      risk: {{url: "http://127.0.0.1:{port}/review", timeout: 2s}}
    rules:
      - name: large
        effect: hold
        when: payment.amount > 5000 && payment.amount < 9000
        message: large payments need two approvals
        hold_expiry: 60s
        approval: {{approvers: [alice, "group:finance", "reviewer:risk"], quorum: 2, veto: true}}
      - name: urgent
        effect: hold
        when: payment.amount >= 9000
        message: urgent payments wait for alice
        approval: {{approvers: [alice], wait: 4s}}
"""


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


@pytest.fixture
def held(tmp_path: Path, receiver: Receiver) -> Iterator[Deployment]:
    dep = make_deployment(
        tmp_path,
        POLICY.format(port=receiver.port),
        extra_config=(
            f"notify_webhooks: http://127.0.0.1:{receiver.port}/hook\nnotify_secret: {SECRET}\n"
            "notify_retry_max: 0.5s\n"
        ),
    )
    for name in ("alice", "bob"):
        dep.approvers[name] = json.loads(dep.cli("approver", "create", name).stdout)["token"]
    dep.start()
    stripe.api_base, stripe.api_key, stripe.max_network_retries = dep.agent_url, dep.agent_token, 0
    yield dep
    dep.stop()


def hold(amount: int, key: str) -> str:
    with pytest.raises(stripe.error.CardError) as caught:
        stripe.PaymentIntent.create(amount=amount, currency="usd", idempotency_key=key)
    assert caught.value.code == "approval_required"
    return caught.value.json_body["error"]["paysentry"]["approval_id"]


def vote(
    dep: Deployment, who: str, approval_id: str, decision: str = "approve", **body: Any
) -> tuple[int, Any]:
    """A vote over the owner API with ``who``'s own token (an approver's name, or "owner")."""
    token = dep.owner_token if who == "owner" else dep.approvers[who]
    return dep.owner_api("POST", f"/v1/approvals/{approval_id}/{decision}", body, token=token)


def notification_for(receiver: Receiver, approval_id: str) -> dict[str, Any]:
    wait_until(lambda: any(n["approval_id"] == approval_id for n in receiver.notifications))
    return next(n for n in receiver.notifications if n["approval_id"] == approval_id)


def test_two_of_three_with_a_reviewer_forwards_exactly_once(held: Deployment, receiver: Receiver) -> None:
    approval_id = hold(6000, "order-1")
    note = notification_for(receiver, approval_id)
    assert note["_signed"] and note["rule"] == "large" and note["payment"]["amount"] == 6000
    assert note["approvers"] == ["alice", "bob", "reviewer:risk"] and note["quorum"] == 2  # two of three
    assert set(note["links"]) == {"alice", "bob"}  # the group expanded; the reviewer gets no link
    assert note["console"] == f"{held.admin_url}/console/approvals/{approval_id}"
    wait_until(
        lambda: (
            [v["voter"] for v in held.owner_api("GET", f"/v1/approvals/{approval_id}")[1]["votes"]]
            == ["reviewer:risk"]
        )
    )
    assert receiver.reviews[0]["_signed"] and receiver.reviews[0]["approval_id"] == approval_id
    with pytest.raises(stripe.error.CardError):  # one vote of two: still held
        stripe.PaymentIntent.create(amount=6000, currency="usd", idempotency_key="order-1")
    status, shown = held.owner_api("GET", f"/v1/approvals/{approval_id}", token=held.approvers["alice"])
    assert status == 200 and shown["state"] == "pending"  # an approver sees the hold ...
    assert held.owner_api("GET", "/v1/agents", token=held.approvers["alice"])[0] == 403  # ... not the rest
    status, body = vote(held, "alice", approval_id, reason="checked")
    assert status == 200 and body["state"] == "approved" and body["vote_counted"]

    first = stripe.PaymentIntent.create(amount=6000, currency="usd", idempotency_key="order-1")
    again = stripe.PaymentIntent.create(amount=6000, currency="usd", idempotency_key="order-1")
    assert first.id == again.id and len(held.mock_payments()) == 1
    votes = held.owner_api("GET", f"/v1/approvals/{approval_id}")[1]["votes"]
    assert [(v["voter"], v["vote"], v["via"]) for v in votes] == [
        ("reviewer:risk", "approve", "reviewer"),
        ("alice", "approve", "owner_api"),
    ]
    events = held.owner_api("GET", "/v1/events?after=0&limit=1000")[1]["data"]
    cast = [e for e in events if e["type"] == "approval.vote"]
    assert [e["actor"] for e in cast] == ["reviewer:risk", "alice"]
    alice = cast[1]["data"]["authenticated"]
    assert alice["kind"] == "approver" and alice["name"] == "alice" and alice["id"].startswith("apv_")
    assert alice["via"] == "owner_api"


def test_one_person_never_fills_a_quorum_of_two(held: Deployment, receiver: Receiver) -> None:
    receiver.answer = None  # the reviewer errors: it casts no vote
    approval_id = hold(7000, "order-2")
    wait_until(lambda: "reviewer cast no vote" in held.logs())
    first, second = vote(held, "alice", approval_id, reason="ok"), vote(held, "alice", approval_id)
    assert (first[1]["vote_counted"], second[1]["vote_counted"]) == (True, False)
    assert second[1]["state"] == "pending" and len(second[1]["votes"]) == 1
    # The owner's token votes as the owner, who is not named on this hold; a body naming someone else
    # is refused, never recorded as theirs; so is the local command posing as an approver.
    status, body = vote(held, "owner", approval_id)
    assert status == 403 and "not an approver" in body["error"]["message"]
    status, body = vote(held, "owner", approval_id, **{"as": "bob"})
    assert status == 403 and "never as the voter the request names" in body["error"]["message"]
    status, body = vote(held, "alice", approval_id, **{"as": "bob"})
    assert status == 403
    posing = held.cli("approvals", "approve", approval_id, "--as", "bob", check=False)
    assert posing.returncode == 2 and "--as is gone" in posing.stderr
    local = held.cli("approvals", "approve", approval_id, check=False)  # the operator votes as the owner
    assert local.returncode == 1 and "not an approver" in local.stderr
    assert held.owner_api("GET", f"/v1/approvals/{approval_id}")[1]["state"] == "pending"
    assert len(held.owner_api("GET", f"/v1/approvals/{approval_id}")[1]["votes"]) == 1

    revoked = json.loads(held.cli("approver", "list").stdout)
    bob = next(a for a in revoked if a["name"] == "bob")
    assert held.owner_api("DELETE", f"/v1/approvers/{bob['id']}")[0] == 200
    assert vote(held, "bob", approval_id)[0] == 401  # a revoked approver's token stops working
    replacement = held.owner_api("POST", "/v1/approvers", {"name": "bob"})[1]
    held.approvers["bob"] = replacement["token"]
    status, body = vote(held, "bob", approval_id, "deny", reason="unknown vendor")
    assert status == 200 and body["state"] == "denied"
    with pytest.raises(stripe.error.CardError) as caught:
        stripe.PaymentIntent.create(amount=7000, currency="usd", idempotency_key="order-2")
    assert caught.value.code == "approval_denied"
    assert held.mock_payments() == []
    shown = json.loads(held.cli("approvals", "show", approval_id).stdout)
    assert shown["state"] == "denied" and [v["voter"] for v in shown["votes"]] == ["alice", "bob"]


def test_waiting_mode_answers_within_the_wait(held: Deployment, receiver: Receiver) -> None:
    def pay(key: str) -> Any:
        try:
            return stripe.PaymentIntent.create(amount=9500, currency="usd", idempotency_key=key)
        except stripe.error.CardError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=1) as pool:
        waiting = pool.submit(pay, "urgent-1")
        wait_until(lambda: held.owner_api("GET", "/v1/approvals?state=pending")[1]["data"])
        pending = held.owner_api("GET", "/v1/approvals?state=pending")[1]["data"][0]
        assert pending["seconds_left"] > 0 and pending["authorization"]["rule"] == "urgent"
        assert vote(held, "alice", pending["id"])[0] == 200
        answer = waiting.result(timeout=10)
    assert getattr(answer, "amount", None) == 9500  # the provider's answer, inside the same call
    late = pay("urgent-2")  # nobody approves: the hold answer once the wait is over
    assert isinstance(late, stripe.error.CardError) and late.code == "approval_required"
    assert re.search(r"apr_[0-9a-f]+", str(late))
    assert len(held.mock_payments()) == 1


def test_holds_survive_a_restart(held: Deployment, receiver: Receiver) -> None:
    approval_id = hold(8000, "order-3")
    notification_for(receiver, approval_id)
    held.stop()
    held.start()
    assert held.owner_api("GET", f"/v1/approvals/{approval_id}")[1]["state"] == "pending"
    assert vote(held, "bob", approval_id)[0] == 200  # bob's token still works after the restart
    wait_until(lambda: held.owner_api("GET", f"/v1/approvals/{approval_id}")[1]["state"] == "approved")
    assert stripe.PaymentIntent.create(amount=8000, currency="usd", idempotency_key="order-3").amount == 8000


def test_a_notification_is_retried_until_the_receiver_is_back(held: Deployment, receiver: Receiver) -> None:
    receiver.down = True
    approval_id = hold(8100, "order-4")
    wait_until(lambda: len(receiver.attempts) >= 3)  # refused, retried with backoff
    assert receiver.notifications == []
    receiver.down = False
    note = notification_for(receiver, approval_id)
    ids = {a["webhook-id"] for a in receiver.attempts}
    assert ids == {note["_id"]} and note["id"] == note["_id"]  # one id on every attempt
    wait_until(lambda: 'paysentry_notifications_total{outcome="delivered"} 1' in metrics(held))
    assert 'paysentry_notifications_total{outcome="retried"}' in metrics(held)


def metrics(dep: Deployment) -> str:
    with urllib.request.urlopen(dep.admin_url + "/metrics", timeout=10) as resp:
        return resp.read().decode()


def test_a_notification_nobody_takes_is_given_up_with_an_audit_event(
    tmp_path: Path, receiver: Receiver
) -> None:
    receiver.down = True
    dep = make_deployment(
        tmp_path,
        POLICY.format(port=receiver.port),
        extra_config=(
            f"notify_webhooks: http://127.0.0.1:{receiver.port}/hook\nnotify_secret: {SECRET}\n"
            "notify_retry_max: 0.3s\nnotify_give_up: 1.5s\n"
        ),
    )
    dep.start()
    try:
        assert "public_url points at loopback" in dep.logs()  # notifications on, links to 127.0.0.1
        stripe.api_base, stripe.api_key, stripe.max_network_retries = dep.agent_url, dep.agent_token, 0
        approval_id = hold(8200, "order-5")
        wait_until(
            lambda: any(
                e["type"] == "notification.failed"
                for e in dep.owner_api("GET", "/v1/events?after=0&limit=1000")[1]["data"]
            )
        )
        failed = next(
            e
            for e in dep.owner_api("GET", "/v1/events?after=0&limit=1000")[1]["data"]
            if e["type"] == "notification.failed"
        )
        assert failed["data"]["approval_id"] == approval_id and failed["data"]["host"] == "127.0.0.1"
        assert failed["data"]["attempts"] >= 2 and failed["data"]["last_error"] == "HTTP 503"
        assert 'paysentry_notifications_total{outcome="failed"} 1' in metrics(dep)
        tried = len(receiver.attempts)
        receiver.down = False
        assert dep.owner_api("GET", "/v1/approvals/" + approval_id)[1]["state"] == "pending"  # the hold stays
        assert len(receiver.attempts) == tried  # given up: no more attempts
    finally:
        dep.stop()
