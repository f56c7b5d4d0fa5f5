"""Real processes over HTTP: the `paysentry` command (with the built-in mock provider) on loopback ports.

The fixture sets the deployment up with the CLI exactly as an owner would (owner, provider connection with
credentials on stdin, agent), starts `paysentry serve`, and waits for its "ready" line.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.servers import free_port

MOCK_SECRET = "sk_test_paysentry_mock"
WEBHOOK_SECRET = "whsec_paysentry_test_signing_secret"
POLICY = """
    name: test
    limits:
      - {name: per_payment_cap, window: payment, currency: usd, max_amount: 20000}
      - {name: daily_budget, window: day, currency: usd, max_amount: 10000, operations: [payment_intent, charge, transfer, payout, issuing_card]}
    rules:
      - {name: usd_only, effect: deny, when: 'payment.currency != "usd"', message: this agent pays in USD only}
      - {name: large_payment, effect: hold, when: payment.amount > 5000, message: above $50 needs a human, hold_expiry: 2s}
"""


@dataclass
class Deployment:
    root: Path
    config: Path
    env: dict[str, str]
    agent_url: str
    admin_url: str
    mock_url: str
    agent_token: str = ""
    agent_id: str = ""
    owner_token: str = ""
    connection_id: str = ""
    approvers: dict[str, str] = field(default_factory=dict)  # name -> the approver's own token
    process: subprocess.Popen[str] | None = None
    output: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None

    def cli(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "proxy", "--config", str(self.config), "-o", "json", *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=60,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"paysentry {' '.join(args)} failed: {result.stderr}")
        return result

    def owner_api(
        self, method: str, path: str, body: dict[str, Any] | None = None, token: str | None = None
    ) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.admin_url + path,
            data=data,
            method=method,
            headers={
                "Authorization": f"Bearer {token or self.owner_token}",
                "Content-Type": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def spend(self, limit: str = "daily_budget") -> tuple[int, int]:
        """(amount, count) the agent has counted against ``limit`` in its current period."""
        rows = self.owner_api("GET", f"/v1/agents/{self.agent_id}/spend")[1]["data"]
        current = [(r["amount"], r["count"]) for r in rows if r["limit"] == limit]
        return current[-1] if current else (0, 0)

    def mock(self, what: str = "requests") -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.mock_url}/_mock/{what}", timeout=10) as resp:
            return json.loads(resp.read())["data"]

    def mock_payments(self) -> list[dict[str, Any]]:
        """Payment calls the provider executed (replays of an idempotent key not counted)."""
        return [
            r for r in self.mock() if r["method"] == "POST" and r["status"] == 200 and not r.get("replayed")
        ]

    def replica(self, index: int) -> Deployment:
        """Another sidecar process of the same deployment (same store, keys, policies, tokens), on its own
        ports."""
        agent_port, admin_port = free_port(), free_port()
        config = self.root / f"paysentry-{index}.yaml"
        text = self.config.read_text()
        text = text.replace(self.agent_url.removeprefix("http://"), f"127.0.0.1:{agent_port}")
        text = text.replace(self.admin_url.removeprefix("http://"), f"127.0.0.1:{admin_port}")
        config.write_text(text)
        return Deployment(
            self.root,
            config,
            self.env,
            f"http://127.0.0.1:{agent_port}",
            f"http://127.0.0.1:{admin_port}",
            self.mock_url,
            self.agent_token,
            self.agent_id,
            self.owner_token,
            self.connection_id,
        )

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "--config", str(self.config), "serve"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
        )
        ready = threading.Event()
        stdout = self.process.stdout
        assert stdout is not None

        def pump() -> None:  # keeps reading so the process never blocks on a full pipe
            for line in stdout:
                self.output.append(line)
                if '"paysentry ready"' in line:
                    ready.set()

        self._reader = threading.Thread(target=pump, daemon=True)
        self._reader.start()
        if not ready.wait(timeout=30):
            self.stop()
            raise AssertionError("paysentry did not start:\n" + "".join(self.output))

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
        self.process = None

    def logs(self) -> str:
        return "".join(self.output)


def make_deployment(
    root: Path,
    policy: str = POLICY,
    provider: str = "mock",
    upstream: str | None = None,
    extra_config: str = "",
    provider_args: tuple[str, ...] = (),
    store: str | None = None,
    secret_key: str = MOCK_SECRET,
) -> Deployment:
    """A configured deployment (owner, connection, agent made with the CLI), not yet started. With
    ``upstream`` the provider is that URL; otherwise the sidecar runs the built-in mock provider itself."""
    agent_port, admin_port, mock_port = free_port(), free_port(), free_port()
    mock_line = "" if upstream else f"mock_provider_listen: 127.0.0.1:{mock_port}"
    (root / "policies").mkdir()
    (root / "policies" / "test.yaml").write_text(textwrap.dedent(policy))
    config = root / "paysentry.yaml"
    config.write_text(
        textwrap.dedent(f"""
        listen: 127.0.0.1:{agent_port}
        admin_listen: 127.0.0.1:{admin_port}
        store: {store or f"sqlite:///{root / 'paysentry.db'}"}
        policies: {root / "policies"}
        {mock_line}
        bcrypt_rounds: 4
        sweep_interval: 0.2
        policy_poll_interval: 0.2
        upstream_timeout: 3s
    """)
        + extra_config
    )
    env = {
        **os.environ,
        "PAYSENTRY_ENCRYPTION_KEYS": "k1:" + base64.b64encode(os.urandom(32)).decode(),
        "PYTHONPATH": str(Path(__file__).parents[2]),
    }
    env.pop("PAYSENTRY_CONFIG", None)
    dep = Deployment(
        root,
        config,
        env,
        f"http://127.0.0.1:{agent_port}",
        f"http://127.0.0.1:{admin_port}",
        upstream or f"http://127.0.0.1:{mock_port}",
    )
    if store:
        dep.cli("db", "migrate")
    dep.owner_token = json.loads(dep.cli("owner", "create", "acme").stdout)["token"]
    connection = dep.cli(
        "provider",
        "add",
        "--provider",
        provider,
        "--name",
        "default",
        "--upstream",
        upstream or dep.mock_url,
        *provider_args,
        "--credentials-file",
        "-",
        stdin=json.dumps({"secret_key": secret_key, "webhook_secret": WEBHOOK_SECRET}),
    )
    dep.connection_id = json.loads(connection.stdout)["id"]
    agent = json.loads(dep.cli("agent", "create", "bot", "--label", "team=ads").stdout)
    dep.agent_token, dep.agent_id = agent["token"], agent["id"]
    return dep


def fresh_redis(request: pytest.FixtureRequest, wanted: bool) -> str:
    """The session's Redis emptied, for a test parametrized with and without it; "" without."""
    if not wanted:
        return ""
    server = request.getfixturevalue("redis_server")
    client = redis.Redis(host="127.0.0.1", port=server.port)
    client.flushall()
    client.close()
    return str(server.url)


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> float:
    """Poll a result another process makes visible on its own schedule (a sweep, a reload, a restart);
    returns the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(interval)
    raise AssertionError("condition not reached in time")


@contextlib.contextmanager
def mock_provider_process() -> Iterator[str]:
    """The built-in mock provider as its own process (a provider every sidecar replica shares)."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "proxy", "mock-provider", "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    try:
        assert server.stdout is not None and "listening" in server.stdout.readline()
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    dep = make_deployment(tmp_path)
    dep.start()
    yield dep
    dep.stop()


@pytest.fixture
def stripe_sdk(deployment: Deployment) -> Any:
    import stripe

    stripe.api_base = deployment.agent_url
    stripe.api_key = deployment.agent_token
    stripe.max_network_retries = 0
    return stripe
