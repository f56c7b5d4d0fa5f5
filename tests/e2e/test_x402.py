"""x402 end to end, offline: a real sidecar, a resource behind the x402 SDK's own Flask middleware, a local
facilitator that verifies signatures with eth-account and records settlements, and the agent a plain
HTTP client (no x402 library, no key)."""

from __future__ import annotations

import base64
import http.client
import http.server
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from adapters.mock_x402 import OTHER_PAY_TO, PAY_TO
from tests.e2e.conftest import Deployment, free_port, make_deployment, wait_until

pytestmark = pytest.mark.e2e
WALLET_KEY = "0x4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"
WALLET = "0x2c7536E3605D9C16a7a3D7b1898e529396a65c23"
POLICY = f"""
    name: x402
    limits:
      - {{name: per_request_cap, window: payment, currency: usdc, max_amount: 5000000}}
      - {{name: daily_budget, window: day, currency: usdc, max_amount: {{budget}}, operations: [x402]}}
    rules:
      - name: payee_allow_list
        effect: deny
        when: 'payment.operation == "x402" && !(x402.payee in ["{PAY_TO}"])'
        message: this agent pays approved payees only
      - {{name: large_x402, effect: hold, when: payment.amount > 1000000, message: above 1 USDC needs a human}}
"""


class Servers:
    def __init__(self, resource: str, facilitator: str) -> None:
        self.resource, self.facilitator = resource, facilitator

    def settlements(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(self.facilitator + "/_settlements", timeout=5) as resp:
            return list(json.loads(resp.read())["data"])

    def faults(self, **faults: str) -> None:
        request = urllib.request.Request(
            self.facilitator + "/_faults", json.dumps(faults).encode(), {"Content-Type": "application/json"}
        )
        urllib.request.urlopen(request, timeout=5).close()

    def received(self) -> list[str]:
        with urllib.request.urlopen(self.resource + "/_received", timeout=5) as resp:
            return list(json.loads(resp.read())["data"])


class Recorder:
    """A plain HTTP server that records every request it gets; ``/hop`` redirects to ``hop_to``."""

    def __init__(self, hop_to: str = "") -> None:
        self.hits: list[str] = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                recorder.hits.append(self.path)
                if self.path == "/hop":
                    self.send_response(302)
                    self.send_header("Location", hop_to)
                else:
                    self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _start(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "x402-demo", *args], stdout=subprocess.PIPE, text=True, env=env
    )
    assert process.stdout is not None and "listening" in process.stdout.readline()
    return process


@pytest.fixture
def servers() -> Iterator[Servers]:
    resource, facilitator = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    processes = [
        _start("facilitator", "--facilitator", facilitator),
        _start("resource", "--listen", resource, "--facilitator", facilitator),
    ]
    try:
        yield Servers(f"http://{resource}", f"http://{facilitator}")
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=10)


def deploy(tmp_path: Path, servers: Servers, budget: int = 3_000_000, store: str | None = None) -> Deployment:
    dep = make_deployment(
        tmp_path,
        POLICY.replace("{budget}", str(budget)),
        provider="x402",
        upstream=servers.resource,
        provider_args=(
            "--setting",
            f"allowed_origins={servers.resource}",
            "--setting",
            f"rpc_url={servers.facilitator}/rpc",
        ),
        secret_key=WALLET_KEY,
        store=store,
    )
    dep.start()
    return dep


@pytest.fixture
def x402(tmp_path: Path, servers: Servers) -> Iterator[tuple[Deployment, Servers]]:
    dep = deploy(tmp_path, servers)
    yield dep, servers
    dep.stop()


def pay(
    dep: Deployment, url: str, key: str | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    sent = {"Authorization": f"Bearer {dep.agent_token}", **(headers or {})}
    if key:
        sent["Idempotency-Key"] = key
    request = urllib.request.Request(f"{dep.agent_url}/x402/{quote(url, safe='')}", headers=sent)
    try:
        with urllib.request.urlopen(request, timeout=20) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read() or b"{}")


def test_an_allowed_payment_is_signed_settled_counted_once_and_replayed(
    x402: tuple[Deployment, Servers],
) -> None:
    dep, servers = x402
    status, headers, body = pay(
        dep, servers.resource + "/report", "order-1", {"PAYMENT-SIGNATURE": "agent-made"}
    )
    assert status == 200 and body["data"] == "the paid content"
    assert headers["PaySentry-X402-Outcome"] == "settled"
    receipt = json.loads(base64.b64decode(headers["PAYMENT-RESPONSE"]))
    assert receipt["success"] and receipt["payer"] == WALLET and receipt["amount"] == "10000"
    assert [s["value"] for s in servers.settlements()] == [10_000]
    assert "agent-made" not in servers.received()  # the agent's own payment header never went through
    assert dep.spend() == (10_000, 1)
    again = pay(dep, servers.resource + "/report", "order-1")
    assert again[0] == 200 and again[1]["Idempotent-Replayed"] == "true" and again[2] == body
    assert len(servers.settlements()) == 1 and dep.spend() == (10_000, 1)
    auth = dep.owner_api("GET", f"/v1/authorizations/{headers['PaySentry-Authorization']}")[1]
    assert auth["state"] == "settled" and auth["operation"] == "x402" and auth["currency"] == "usdc"
    events = dep.owner_api("GET", "/v1/events?limit=100")[1]["data"]
    signed = [e for e in events if e["type"] == "x402.signed"]
    assert len(signed) == 1 and signed[0]["data"]["payer"] == WALLET and signed[0]["data"]["nonce"]
    # no signed header (a bearer credential) in the logs or the database
    header = servers.received()[0]
    assert header not in dep.logs() and header.encode() not in (dep.root / "paysentry.db").read_bytes()
    free = pay(dep, servers.resource + "/free")
    assert free[0] == 200 and free[2]["data"] == "free content" and dep.spend() == (10_000, 1)


def test_a_denied_payee_is_refused_by_paysentry_naming_the_rule(x402: tuple[Deployment, Servers]) -> None:
    dep, servers = x402
    status, _, body = pay(dep, servers.resource + "/other-payee")
    assert status == 402 and body["error"]["code"] == "payee_allow_list"
    assert body["error"]["paysentry"]["decision"] == "deny"
    assert OTHER_PAY_TO not in [s["to"] for s in servers.settlements()] and dep.spend() == (0, 0)


def test_a_held_payment_is_paid_once_after_approval(x402: tuple[Deployment, Servers]) -> None:
    dep, servers = x402
    status, _, body = pay(dep, servers.resource + "/premium", "premium-1")
    assert status == 402 and body["error"]["code"] == "approval_required"
    approval = body["error"]["paysentry"]["approval_id"]
    assert pay(dep, servers.resource + "/premium", "premium-1")[2]["error"]["code"] == "approval_required"
    assert servers.settlements() == []
    assert dep.owner_api("POST", f"/v1/approvals/{approval}/approve", {"reason": "ok"})[0] == 200
    status, headers, body = pay(dep, servers.resource + "/premium", "premium-1")
    assert status == 200 and headers["PaySentry-X402-Outcome"] == "settled"
    assert pay(dep, servers.resource + "/premium", "premium-1")[1]["Idempotent-Replayed"] == "true"
    assert [s["value"] for s in servers.settlements()] == [2_000_000] and dep.spend() == (2_000_000, 1)


def test_unknown_assets_and_origins_are_refused_before_anything_is_signed(
    x402: tuple[Deployment, Servers],
) -> None:
    dep, servers = x402
    status, _, body = pay(dep, servers.resource + "/other-asset")
    assert status == 400 and body["error"]["code"] == "x402_unsupported"
    assert "not in PaySentry's registry" in body["error"]["message"]
    elsewhere = Recorder()  # listening, so a fetch PaySentry should not make would show
    try:
        status, _, body = pay(dep, elsewhere.url + "/report")
        assert status == 403 and body["error"]["code"] == "x402_origin_not_allowed"
        assert elsewhere.hits == []
    finally:
        elsewhere.close()
    assert servers.settlements() == [] and servers.received() == [] and dep.spend() == (0, 0)


def test_a_redirect_to_another_origin_is_handed_back_never_followed(tmp_path: Path, servers: Servers) -> None:
    target = Recorder()
    hop = Recorder(hop_to=target.url + "/report")
    dep = make_deployment(
        tmp_path,
        POLICY.replace("{budget}", "3000000"),
        provider="x402",
        upstream=servers.resource,
        provider_args=("--setting", f"allowed_origins={servers.resource},{hop.url}"),
        secret_key=WALLET_KEY,
    )
    dep.start()
    try:
        agent = http.client.HTTPConnection(dep.agent_url.removeprefix("http://"), timeout=20)
        agent.request(
            "GET",
            f"/x402/{quote(hop.url + '/hop', safe='')}",
            headers={"Authorization": f"Bearer {dep.agent_token}"},
        )
        answer = agent.getresponse()
        assert answer.status == 302 and answer.headers["Location"] == target.url + "/report"
        assert hop.hits == ["/hop"] and target.hits == []  # the agent's to follow, through PaySentry again
    finally:
        dep.stop()
        hop.close()
        target.close()


def test_a_replayed_authorization_is_refused_by_the_facilitator(x402: tuple[Deployment, Servers]) -> None:
    dep, servers = x402
    assert pay(dep, servers.resource + "/report")[0] == 200
    header = servers.received()[0]
    request = urllib.request.Request(servers.resource + "/report", headers={"PAYMENT-SIGNATURE": header})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    required = json.loads(base64.b64decode(refused.value.headers["PAYMENT-REQUIRED"]))
    assert refused.value.code == 402 and required["error"] == "nonce_already_used"
    assert len(servers.settlements()) == 1


def test_verification_refused_before_settlement_releases_the_spend(x402: tuple[Deployment, Servers]) -> None:
    dep, servers = x402
    servers.faults(verify="refuse")
    status, headers, _ = pay(dep, servers.resource + "/report", "refused-1")
    assert status == 402 and headers["PaySentry-X402-Outcome"] == "released"
    assert dep.spend() == (0, 0) and servers.settlements() == []
    auth = dep.owner_api("GET", f"/v1/authorizations/{headers['PaySentry-Authorization']}")[1]
    assert auth["state"] == "failed"


def test_an_unknown_outcome_keeps_the_spend_until_the_chain_says(
    x402: tuple[Deployment, Servers],
) -> None:
    dep, servers = x402
    servers.faults(settle="error_after")  # the transfer is made, then the facilitator answers 500
    status, headers, _ = pay(dep, servers.resource + "/report", "lost-1")
    # the SDK's middleware answers 402 with a failed settlement response: not a refusal, the money may have moved
    receipt = json.loads(base64.b64decode(headers["PAYMENT-RESPONSE"]))
    assert status == 402 and not receipt["success"] and headers["PaySentry-X402-Outcome"] == "in_doubt"
    assert len(servers.settlements()) == 1 and dep.spend() == (10_000, 1)  # counted: it may have moved
    again = pay(dep, servers.resource + "/report", "lost-1")
    assert again[0] == 409 and again[2]["error"]["code"] == "x402_in_doubt"  # never paid twice
    assert len(servers.settlements()) == 1

    # Pending at the answer; once the 2-second authorization has expired, the chain says what happened.
    servers.faults(settle="pending")  # the transfer does happen
    status, headers, _ = pay(dep, servers.resource + "/quick", "pending-1")
    assert headers["PaySentry-X402-Outcome"] == "in_doubt" and dep.spend() == (20_000, 2)
    used = headers["PaySentry-Authorization"]
    servers.faults(settle="dropped")  # the transfer never happens
    status, headers, _ = pay(dep, servers.resource + "/quick", "dropped-1")
    assert headers["PaySentry-X402-Outcome"] == "in_doubt" and dep.spend() == (30_000, 3)
    unused = headers["PaySentry-Authorization"]

    def state(auth_id: str) -> str:
        return str(dep.owner_api("GET", f"/v1/authorizations/{auth_id}")[1]["state"])

    wait_until(lambda: state(used) == "settled" and state(unused) == "failed", timeout=20)
    assert dep.spend() == (20_000, 2)  # the used one counted, the unused one released
    replayed = pay(dep, servers.resource + "/quick", "pending-1")
    assert replayed[0] == 502 and replayed[2]["error"]["code"] == "x402_answer_lost"
    replayed = pay(dep, servers.resource + "/quick", "dropped-1")
    assert replayed[0] == 402 and replayed[2]["error"]["code"] == "x402_expired_unsettled"


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_concurrent_payments_stop_at_exactly_the_budget(
    store: str, tmp_path: Path, servers: Servers, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("postgres_url") if store == "postgres" else None
    dep = deploy(tmp_path, servers, budget=50_000, store=url)  # five payments of 0.01 USDC
    try:
        with ThreadPoolExecutor(max_workers=12) as pool:
            results = list(pool.map(lambda i: pay(dep, servers.resource + "/report", f"race-{i}"), range(12)))
        paid = [r for r in results if r[0] == 200]
        refused = [r for r in results if r[0] == 402]
        assert len(paid) == 5 and len(refused) == 7
        assert {r[2]["error"]["code"] for r in refused} == {"daily_budget"}
        assert len(servers.settlements()) == 5 and dep.spend() == (50_000, 5)
    finally:
        dep.stop()
