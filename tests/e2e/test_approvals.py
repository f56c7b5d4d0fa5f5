"""Approvals end to end: quorum with people and an automated reviewer, veto, links, waiting, notifications."""

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
import stripe

from proxy.approvals import verify
from tests.e2e.conftest import Deployment, free_port, make_deployment
from tests.e2e.test_policy_ops import wait_until

pytestmark = pytest.mark.e2e
SECRET = "whsec_test_notifications"


class Receiver:
    """A webhook receiver and automated reviewer on loopback, in this test process."""

    def __init__(self) -> None:
        self.port = free_port()
        self.notifications: list[dict[str, Any]] = []
        self.reviews: list[dict[str, Any]] = []
        self.answer: dict[str, Any] | None = {"vote": "approve", "reason": "vendor known, amount usual"}
        self.notified = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                signed = verify(SECRET.encode(), body, self.headers.get("PaySentry-Signature", ""))
                doc = {**json.loads(body), "_signed": signed}
                if self.path == "/hook":
                    receiver.notifications.append(doc)
                    receiver.notified.set()
                    self._send(200, b"{}")
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
        extra_config=(f"notify_webhooks: http://127.0.0.1:{receiver.port}/hook\nnotify_secret: {SECRET}\n"),
    )
    dep.start()
    stripe.api_base, stripe.api_key, stripe.max_network_retries = dep.agent_url, dep.agent_token, 0
    yield dep
    dep.stop()


def hold(amount: int, key: str) -> str:
    with pytest.raises(stripe.error.CardError) as caught:
        stripe.PaymentIntent.create(amount=amount, currency="usd", idempotency_key=key)
    assert caught.value.code == "approval_required"
    return caught.value.json_body["error"]["paysentry"]["approval_id"]


def link_for(receiver: Receiver, approval_id: str, person: str) -> str:
    wait_until(lambda: any(n["approval_id"] == approval_id for n in receiver.notifications))
    note = next(n for n in receiver.notifications if n["approval_id"] == approval_id)
    return note["links"][person]["page"]


def post_form(url: str, decision: str) -> tuple[int, str]:
    data = urllib.parse.urlencode({"decision": decision, "reason": "checked"}).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_two_of_three_with_a_reviewer_forwards_exactly_once(held: Deployment, receiver: Receiver) -> None:
    approval_id = hold(6000, "order-1")
    page = link_for(receiver, approval_id, "alice")
    note = receiver.notifications[0]
    assert note["_signed"] and note["rule"] == "large" and note["payment"]["amount"] == 6000
    assert note["approvers"] == ["alice", "bob", "reviewer:risk"] and note["quorum"] == 2  # two of three
    assert set(note["links"]) == {"alice", "bob"}  # the group expanded; the reviewer gets no link
    wait_until(
        lambda: (
            [v["voter"] for v in held.owner_api("GET", f"/v1/approvals/{approval_id}")[1]["votes"]]
            == ["reviewer:risk"]
        )
    )
    assert receiver.reviews[0]["_signed"] and receiver.reviews[0]["approval_id"] == approval_id

    status, text = get(page + "?decision=approve")
    assert (
        status == 200
        and "60.00 USD" in text
        and "approvals.large" in text
        and "reviewer:risk: approve" in text
    )
    with pytest.raises(stripe.error.CardError):  # one vote of two: still held
        stripe.PaymentIntent.create(amount=6000, currency="usd", idempotency_key="order-1")
    status, text = post_form(page, "approve")
    assert status == 200 and "approved" in text
    assert post_form(page, "approve")[0] == 410  # a used link does nothing
    assert post_form(page.rsplit("/", 1)[0] + "/forged-token", "approve")[0] == 410

    first = stripe.PaymentIntent.create(amount=6000, currency="usd", idempotency_key="order-1")
    again = stripe.PaymentIntent.create(amount=6000, currency="usd", idempotency_key="order-1")
    assert first.id == again.id and len(held.mock_payments()) == 1
    votes = held.owner_api("GET", f"/v1/approvals/{approval_id}")[1]["votes"]
    assert [(v["voter"], v["vote"], v["via"]) for v in votes] == [
        ("reviewer:risk", "approve", "reviewer"),
        ("alice", "approve", "link"),
    ]
    events = held.owner_api("GET", "/v1/events?limit=1000")[1]["data"]
    assert [e["actor"] for e in events if e["type"] == "approval.vote"] == ["reviewer:risk", "alice"]


def test_a_deny_vetoes_and_votes_count_once(held: Deployment, receiver: Receiver) -> None:
    receiver.answer = None  # the reviewer errors: it casts no vote
    approval_id = hold(7000, "order-2")
    wait_until(lambda: "reviewer cast no vote" in held.logs())
    vote = ("approvals", "approve", approval_id, "--as", "alice", "--reason")
    first = json.loads(held.cli(*vote, "ok").stdout)
    second = json.loads(held.cli(*vote, "again").stdout)
    assert (first["vote_counted"], second["vote_counted"]) == (True, False)
    assert second["state"] == "pending" and len(second["votes"]) == 1
    # Over the owner API the vote is the token's owner's, who is not named on this hold; a body naming
    # someone else is refused, never recorded as theirs.
    status, body = held.owner_api("POST", f"/v1/approvals/{approval_id}/approve", {})
    assert status == 403 and "not an approver" in body["error"]["message"]
    status, body = held.owner_api("POST", f"/v1/approvals/{approval_id}/approve", {"as": "carol"})
    assert status == 403 and "never as the voter the request names" in body["error"]["message"]
    assert len(held.owner_api("GET", f"/v1/approvals/{approval_id}")[1]["votes"]) == 1
    held.cli("approvals", "deny", approval_id, "--as", "bob", "--reason", "unknown vendor")
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
        held.cli("approvals", "approve", pending["id"], "--as", "alice")
        answer = waiting.result(timeout=10)
    assert getattr(answer, "amount", None) == 9500  # the provider's answer, inside the same call
    late = pay("urgent-2")  # nobody approves: the hold answer once the wait is over
    assert isinstance(late, stripe.error.CardError) and late.code == "approval_required"
    assert re.search(r"apr_[0-9a-f]+", str(late))
    assert len(held.mock_payments()) == 1


def test_holds_survive_a_restart(held: Deployment, receiver: Receiver) -> None:
    approval_id = hold(8000, "order-3")
    page = link_for(receiver, approval_id, "bob")
    held.stop()
    held.start()
    assert held.owner_api("GET", f"/v1/approvals/{approval_id}")[1]["state"] == "pending"
    assert post_form(page, "approve")[0] == 200  # bob's link still works after the restart
    wait_until(lambda: held.owner_api("GET", f"/v1/approvals/{approval_id}")[1]["state"] == "approved")
    assert stripe.PaymentIntent.create(amount=8000, currency="usd", idempotency_key="order-3").amount == 8000
