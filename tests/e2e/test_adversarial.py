"""The compromised agent: every way around the gateway is attempted, and refused without a trace upstream."""

from __future__ import annotations

import json
import os
import resource
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import stripe

from tests.e2e.conftest import Deployment, make_deployment, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Deployment]:
    dep = make_deployment(
        tmp_path,
        provider_args=("--allow-account", "acct_allowed"),
        extra_config="agent_rate_limit: 20\nagent_rate_burst: 40\nbody_timeout: 1s\n",
    )
    dep.start()
    yield dep
    dep.stop()


def raw_http(dep: Deployment, request: bytes, base: str | None = None) -> tuple[int, bytes]:
    """Send bytes as they are (no client library tidying them up) to the agents' listener (or ``base``)
    and read the answer."""
    host, port = urlsplit(base or dep.agent_url).hostname, urlsplit(base or dep.agent_url).port
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data:
                head, _, body = data.partition(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    None,
                )
                if length is not None and len(body) >= length:
                    break
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    return status, data.partition(b"\r\n\r\n")[2]


def request(
    dep: Deployment, method: str, target: str, headers: dict[str, str] | None = None, body: bytes = b""
) -> tuple[int, bytes]:
    return raw_http(dep, request_bytes(dep, method, target, headers, len(body)) + body)


def request_bytes(
    dep: Deployment, method: str, target: str, headers: dict[str, str] | None = None, length: int = 0
) -> bytes:
    """The request line and headers (with the agent's token) as raw bytes."""
    merged = {
        "Host": "127.0.0.1",
        "Authorization": f"Bearer {dep.agent_token}",
        "Content-Type": "application/x-www-form-urlencoded",
        "Content-Length": str(length),
        "Connection": "close",
        **(headers or {}),
    }
    lines = [f"{method} {target} HTTP/1.1", *(f"{k}: {v}" for k, v in merged.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def upstream_calls(dep: Deployment) -> list[dict[str, Any]]:
    return dep.mock()


PAY = b"amount=1000&currency=usd"


@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        ("POST", "http://evil.example/v1/payment_intents", {}, 400),  # absolute-form: not a forward proxy
        ("CONNECT", "evil.example:443", {}, 404),  # authority-form matches no route at all
        ("TRACE", "/v1/payment_intents", {}, 405),
        ("PUT", "/v1/payment_intents", {}, 405),
        ("POST", "/v1/payment_intents/../../admin", {}, 400),
        ("POST", "/v1/customers/%2e%2e%2fpayouts", {}, 400),
        ("POST", "/v1//payment_intents", {}, 400),
        ("POST", "/v1/payment_intents", {"Stripe-Account": "acct_someone_else"}, 403),
        ("POST", "/v1/payment_intents", {"Stripe-Context": "ctx_1"}, 400),
        ("POST", "/v2/core/accounts", {}, 404),
    ],
)
def test_bypasses_are_refused_before_anything_moves(
    target: Deployment, method: str, path: str, headers: dict[str, str], status: int
) -> None:
    got, body = request(target, method, path, headers, PAY)
    assert got == status, body
    if body.startswith(b"{"):
        assert json.loads(body)["error"]["message"]
    assert upstream_calls(target) == []
    assert target.owner_api("GET", "/v1/authorizations")[1]["data"] == []


def test_header_injection_is_refused(target: Deployment) -> None:
    status, _ = raw_http(
        target,
        b"POST /v1/payment_intents HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + target.agent_token.encode()
        + b"\r\nX-Evil: a\rStripe-Account: acct_x\r\n"
        b"Content-Length: 0\r\nConnection: close\r\n\r\n",
    )
    assert status == 400
    assert upstream_calls(target) == []


def test_forged_host_and_hop_by_hop_headers_do_not_steer_or_leak(target: Deployment) -> None:
    status, body = request(
        target,
        "POST",
        "/v1/payment_intents",
        {
            "Host": "api.evil.example",
            "X-Forwarded-Host": "evil.example",
            "Connection": "X-Agent-Secret",
            "X-Agent-Secret": "s3cr3t",
            "Proxy-Authorization": "x",
        },
        PAY,
    )
    assert status == 200, body
    [seen] = upstream_calls(target)  # it still went to the configured upstream, with the owner's key
    assert seen["authorized"] is True


def test_allowed_connected_account_passes_and_others_do_not(target: Deployment) -> None:
    stripe.api_base, stripe.api_key, stripe.max_network_retries = target.agent_url, target.agent_token, 0
    intent = stripe.PaymentIntent.create(amount=1000, currency="usd", stripe_account="acct_allowed")
    assert intent.amount == 1000
    assert upstream_calls(target)[0]["stripe_account"] == "acct_allowed"
    with pytest.raises(stripe.error.PermissionError):
        stripe.PaymentIntent.create(amount=1000, currency="usd", stripe_account="acct_stranger")
    assert len(upstream_calls(target)) == 1


def test_rate_limited_agents_get_a_stripe_shaped_429(target: Deployment) -> None:
    answers = [request(target, "GET", "/v1/customers")[0] for _ in range(60)]
    assert 429 in answers
    status, body = request(target, "GET", "/v1/customers")
    if status == 429:
        assert json.loads(body)["error"]["type"] == "invalid_request_error"


def test_oversized_bodies_and_headers_are_refused(target: Deployment) -> None:
    status, _ = request(target, "POST", "/v1/payment_intents", body=b"a=" + b"x" * (2 * 1024 * 1024))
    assert status == 413
    status, _ = request(target, "GET", "/v1/customers", {"X-Big": "y" * 20000})
    assert status in (400, 431)
    status, _ = request(target, "GET", "/v1/customers", {f"X-Many-{i}": "1" for i in range(70)})
    assert status in (400, 431)  # max_headers: 64 (aiohttp's own default would let 128 through)
    assert request(target, "GET", "/v1/customers", {f"X-Many-{i}": "1" for i in range(50)})[0] == 200
    assert [c for c in upstream_calls(target) if c["method"] == "POST"] == []


def test_a_slow_body_is_cut_off_with_a_clear_error_and_nothing_moves(target: Deployment) -> None:
    body = b"amount=1000&currency=usd"
    head = request_bytes(target, "POST", "/v1/payment_intents", {"Content-Length": str(len(body) + 50)})
    started = time.monotonic()
    status, answer = raw_http(target, head + body)  # 50 bytes never arrive
    assert status == 408 and time.monotonic() - started < 5
    assert json.loads(answer)["error"]["code"] == "request_timeout"
    assert upstream_calls(target) == [] and target.spend("per_payment_cap") == (0, 0)


def test_owners_are_isolated(target: Deployment) -> None:
    other = json.loads(target.cli("owner", "create", "rival").stdout)["token"]
    stripe.api_base, stripe.api_key, stripe.max_network_retries = target.agent_url, target.agent_token, 0
    with pytest.raises(stripe.error.CardError) as caught:
        stripe.PaymentIntent.create(amount=9000, currency="usd")  # held
    approval_id = caught.value.json_body["error"]["paysentry"]["approval_id"]
    agent_id = target.owner_api("GET", "/v1/agents")[1]["data"][0]["id"]
    assert target.owner_api("GET", "/v1/agents", token=other)[1]["data"] == []
    assert target.owner_api("GET", "/v1/authorizations", token=other)[1]["data"] == []
    assert target.owner_api("GET", "/v1/events", token=other)[1]["data"][-1]["type"] == "owner.created"
    assert target.owner_api("GET", f"/v1/approvals/{approval_id}", token=other)[0] == 404
    assert target.owner_api("POST", f"/v1/approvals/{approval_id}/approve", {}, token=other)[0] == 404
    assert target.owner_api("POST", f"/v1/agents/{agent_id}/revoke", {}, token=other)[0] == 404
    assert target.owner_api("GET", f"/v1/agents/{agent_id}/spend", token=other)[0] == 404
    assert target.owner_api("GET", f"/v1/approvals/{approval_id}")[1]["state"] == "pending"


# -- hostile input: a 4xx in the listener's own shape, never a 500 or a traceback --------------------------
def _head(method: str, target: str, headers: dict[str, bytes], body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1".encode(), b"Host: 127.0.0.1", b"Connection: close"]
    lines += [name.encode() + b": " + value for name, value in headers.items()]
    lines.append(f"Content-Length: {len(body)}".encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _signed(body: bytes) -> bytes:
    from tests.e2e.test_webhooks import signature

    return signature(body).encode()


FORM = b"application/x-www-form-urlencoded"
JSON = b"application/json"
DEEP = b"[" * 100_000 + b"]" * 100_000
GZIPPED = __import__("gzip").compress(PAY)
# (listener, method, target, headers, body); "{agent}" and "{owner}" are the tokens, "{id}" the agent's id
# and "{conn}" the connection's
HOSTILE: dict[str, tuple[str, str, str, dict[str, bytes], bytes]] = {
    "unicode digit amount": (
        "agent",
        "POST",
        "/v1/payment_intents",
        {"Content-Type": FORM},
        "amount=²&currency=usd".encode(),
    ),
    "arabic digit amount": (
        "agent",
        "POST",
        "/v1/payment_intents",
        {"Content-Type": FORM},
        "amount=٣&currency=usd".encode(),
    ),
    "huge amount": (
        "agent",
        "POST",
        "/v1/payment_intents",
        {"Content-Type": FORM},
        b"amount=" + b"9" * 5000 + b"&currency=usd",
    ),
    "0xff in the token": ("agent", "GET", "/v1/customers", {"Authorization": b"Bearer {agent}\xff"}, b""),
    "0xff in the Idempotency-Key": (
        "agent",
        "POST",
        "/v1/payment_intents",
        {"Content-Type": FORM, "Idempotency-Key": b"k\xffk"},
        PAY,
    ),
    "control character in the Idempotency-Key": (
        "agent",
        "POST",
        "/v1/payment_intents",
        {"Content-Type": FORM, "Idempotency-Key": b"k\x7fk"},
        PAY,
    ),
    "secret over 72 bytes": (
        "agent",
        "GET",
        "/v1/customers",
        {"Authorization": b"Bearer psk_{id}_" + "é".encode() * 40},
        b"",
    ),
    "long secret": (
        "agent",
        "GET",
        "/v1/customers",
        {"Authorization": b"Bearer psk_{id}_" + b"x" * 200},
        b"",
    ),
    "basic auth with 0xff": ("agent", "GET", "/v1/customers", {"Authorization": b"Basic /w=="}, b""),
    "gzip body": (
        "agent",
        "POST",
        "/v1/payment_intents",
        {"Content-Type": FORM, "Content-Encoding": b"gzip"},
        GZIPPED,
    ),
    "broken deflate body": (
        "agent",
        "POST",
        "/v1/payment_intents",
        {"Content-Type": FORM, "Content-Encoding": b"deflate"},
        b"not deflate",
    ),
    "gzip on a passthrough": (
        "agent",
        "POST",
        "/v1/customers",
        {"Content-Type": FORM, "Content-Encoding": b"gzip"},
        GZIPPED,
    ),
    "deep form key": (
        "agent",
        "POST",
        "/v1/payment_intents",
        {"Content-Type": FORM},
        b"metadata" + b"[a]" * 500 + b"=1",
    ),
    "signature t=unicode digit": (
        "owner",
        "POST",
        "/v1/webhooks/{conn}",
        {"Content-Type": JSON, "Stripe-Signature": "t=²,v1=ab".encode()},
        b"{}",
    ),
    "signature with a 5000-digit t": (
        "owner",
        "POST",
        "/v1/webhooks/{conn}",
        {"Content-Type": JSON, "Stripe-Signature": b"t=" + b"1" * 5000 + b",v1=ab"},
        b"{}",
    ),
    "signed deeply nested event": (
        "owner",
        "POST",
        "/v1/webhooks/{conn}",
        {"Content-Type": JSON, "Stripe-Signature": b"{signed}"},
        DEEP,
    ),
    "gzip webhook": (
        "owner",
        "POST",
        "/v1/webhooks/{conn}",
        {"Content-Type": JSON, "Content-Encoding": b"gzip", "Stripe-Signature": b"t=1,v1=ab"},
        __import__("gzip").compress(b"{}"),
    ),
    "deeply nested owner body": (
        "owner",
        "POST",
        "/v1/agents",
        {"Authorization": b"Bearer {owner}", "Content-Type": JSON},
        b"[" * 30_000,
    ),
    "nested owner vote": (
        "owner",
        "POST",
        "/v1/approvals/apr_x/approve",
        {"Authorization": b"Bearer {owner}", "Content-Type": JSON},
        b'{"reason":' + b"[" * 5000 + b"]" * 5000 + b"}",
    ),
    "limit=unicode digit": (
        "owner",
        "GET",
        "/v1/authorizations?limit=%C2%B2",
        {"Authorization": b"Bearer {owner}"},
        b"",
    ),
    "after with 5000 digits": (
        "owner",
        "GET",
        "/v1/events?after=" + "7" * 5000,
        {"Authorization": b"Bearer {owner}"},
        b"",
    ),
    "0xff in the owner token": ("owner", "GET", "/v1/agents", {"Authorization": b"Bearer {owner}\xff"}, b""),
    "owner secret over 72 bytes": (
        "owner",
        "GET",
        "/v1/agents",
        {"Authorization": b"Bearer pso_0123456789abcdef_" + "ü".encode() * 50},
        b"",
    ),
    "gzip owner body": (
        "owner",
        "POST",
        "/v1/agents",
        {"Authorization": b"Bearer {owner}", "Content-Type": JSON, "Content-Encoding": b"gzip"},
        __import__("gzip").compress(b'{"name":"x"}'),
    ),
    "link token with 0xff": ("owner", "GET", "/approvals/link/%FF%FE", {}, b""),
    "link post of junk": (
        "owner",
        "POST",
        "/approvals/link/x",
        {"Content-Type": FORM},
        b"decision=%FF&reason=" + b"[" * 1000,
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_hostile_input_gets_a_4xx_in_the_listeners_shape_and_no_traceback(
    target: Deployment, case: str
) -> None:
    listener, method, path, headers, body = HOSTILE[case]
    fill = {
        b"{agent}": target.agent_token.encode(),
        b"{owner}": target.owner_token.encode(),
        b"{id}": target.agent_id.removeprefix("agt_").encode(),
        b"{signed}": _signed(body),
    }
    for name, value in list(headers.items()):
        for marker, real in fill.items():
            value = value.replace(marker, real)
        headers[name] = value
    headers.setdefault("Authorization", b"Bearer " + target.agent_token.encode())
    path = path.replace("{conn}", target.connection_id)
    base = target.agent_url if listener == "agent" else target.admin_url
    before = len(target.output)
    status, answer = raw_http(target, _head(method, path, headers, body), base)
    assert 400 <= status < 500, (status, answer[:300])
    if answer.startswith(b"{"):
        error = json.loads(answer)
        message = error["error"]["message"] if "error" in error else error["message"]
        assert message and "4242424242424242" not in message
    logs = "".join(target.output[before:])
    assert "Traceback" not in logs and "Error handling request" not in logs, logs
    assert target.agent_token not in logs and target.owner_token not in logs
    assert [c for c in upstream_calls(target) if c["method"] == "POST"] == []


# -- slow heads and connection floods ----------------------------------------------------------------------
def _open_fds(dep: Deployment) -> int:
    assert dep.process is not None
    return len(os.listdir(f"/proc/{dep.process.pid}/fd"))


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[Deployment]:
    dep = make_deployment(tmp_path, extra_config="header_timeout: 2s\nmax_connections_per_client: 200\n")
    dep.start()
    yield dep
    dep.stop()


def test_probes_answer_under_a_slowloris_and_slow_heads_are_dropped(guarded: Deployment) -> None:
    """1,500 connections from the agents' own address that never finish their heads: the probes and the
    agent still get answers, the sidecar holds no more of them than the cap, and none outlives the
    header timeout."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096 and hard >= 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, hard))
    elif soft < 4096:
        pytest.skip(f"1,500 connections need more file descriptors than ulimit -n {hard} allows")
    baseline = _open_fds(guarded)
    attackers = []
    for i in range(1500):
        base = guarded.admin_url if i % 2 else guarded.agent_url
        sock = socket.create_connection((urlsplit(base).hostname, urlsplit(base).port), timeout=10)
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # and never the rest
        attackers.append(sock)
    started = time.monotonic()
    with urllib.request.urlopen(f"{guarded.admin_url}/readyz", timeout=5) as resp:
        assert resp.status == 200
    assert request(guarded, "GET", "/v1/customers")[0] == 200
    assert time.monotonic() - started < 3
    held = _open_fds(guarded) - baseline
    assert held <= 2 * 200 + 20, f"the sidecar holds {held} attacker connections"
    deadline = time.monotonic() + 5  # the header timeout is 2 s: each is closed by then, 408 or EOF
    still_open = 0
    for sock in attackers:  # wait on each socket's own close rather than sleeping past the timeout
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            data = sock.recv(4096)
            still_open += 0 if data == b"" or data.startswith(b"HTTP/1.1 408") else 1
        except TimeoutError:
            still_open += 1
        except OSError:
            pass
        sock.close()
    assert still_open == 0
    # a 408 reaches the client before the sidecar's transport has flushed and closed its side
    wait_until(lambda: _open_fds(guarded) - baseline < 20, timeout=5)
    assert "Traceback" not in guarded.logs()


def test_a_slow_head_after_a_kept_alive_request_is_dropped_too(guarded: Deployment) -> None:
    sock = socket.create_connection((urlsplit(guarded.admin_url).hostname, urlsplit(guarded.admin_url).port))
    sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    sock.sendall(b"GET /livez HTTP/1.1\r\n")  # the next head starts and stalls
    sock.settimeout(5)
    started = time.monotonic()
    assert sock.recv(4096).startswith(b"HTTP/1.1 408")
    assert 1.5 < time.monotonic() - started < 8  # the header timeout is 2 s
    sock.close()


# -- lockout cannot be aimed at someone else ---------------------------------------------------------------
def test_wrong_secrets_for_a_known_id_do_not_lock_its_agent_out(tmp_path: Path) -> None:
    dep = make_deployment(tmp_path, extra_config="token_cache_ttl: 1s\n")
    second = json.loads(dep.cli("agent", "create", "other").stdout)
    dep.start()
    try:
        assert request(dep, "GET", "/v1/customers")[0] == 200  # the agent, before the attack
        public = dep.agent_id.removeprefix("agt_")
        for i in range(15):  # from the same address, with the id /metrics used to show
            forged = f"psk_{public}_wrongsecret{i}"
            assert request(dep, "GET", "/v1/customers", {"Authorization": f"Bearer {forged}"})[0] == 401
        for i in range(40):  # and junk tokens: the old per-address lockout locked out everyone after 30
            assert request(dep, "GET", "/v1/customers", {"Authorization": f"Bearer psk_{i:016x}_x"})[0] == 401
        time.sleep(1.2)  # the agent's cache entry has expired
        assert request(dep, "GET", "/v1/customers")[0] == 200
        # an agent this process has never verified (a restart, a new replica), its id under attack from the
        # very address it calls from: the quick check refuses each guess without bcrypt, none locks it out
        other_id = second["id"].removeprefix("agt_")
        for i in range(30):
            guess = f"psk_{other_id}_{os.urandom(32).hex()[:43]}{i}"[:64]
            assert request(dep, "GET", "/v1/customers", {"Authorization": f"Bearer {guess}"})[0] == 401
        other = {"Authorization": f"Bearer {second['token']}"}
        assert request(dep, "GET", "/v1/customers", other)[0] == 200
    finally:
        dep.stop()
