"""The gateway side by side with its floor: an upstream stub alone, a bare aiohttp forwarder built like the
sidecar's forwarding, and the sidecar (10 rules, two limits, allowed payments) on each store, driven by
wrk from its own process at concurrency 1, 16 and 64 on loopback.

    python -m bench.load [--duration 5] [--stores sqlite,postgres,postgres+redis] [--concurrency 1,16,64]

Printed per row: requests/s, p50 and p99 latency, server CPU per request (the process under test, from
/proc), non-2xx answers, and for the sidecar its throughput ratio to the bare forwarder and the p50 it adds.
The bare forwarder is measured again right before each sidecar row, at the same concurrency, and the ratio
is taken against that: on a shared machine the speed drifts by tens of percent within minutes.

Two rows between the floor and the sidecar show the least any gateway in this stack must add to the bare
forwarder: ``bare + decide`` parses the form and decides it with the same 10-rule policy;
``bare + decide + commits`` also checks and counts the spend with an audit row in one SQLite transaction
before forwarding and settles it in a second one after (on the event loop: no hand-off, no idempotency, no
authentication, no metrics).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from adapters import REGISTRY
from bench.decision import policy_text
from proxy.decide import decide
from proxy.model import Agent, Payment, SpendTotal
from proxy.policy.engine import make_engine
from proxy.policy.loader import load_policy_set
from tests.servers import Postgres, Redis, free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[1]
BODY = "amount=1000&currency=usd"


# -- the processes under test -------------------------------------------------------------------------------
def serve_upstream(port: int) -> None:
    """A provider that answers every payment at once (the floor)."""
    import itertools

    from aiohttp import web

    ids = itertools.count()

    async def pay(request: web.Request) -> web.Response:
        await request.read()
        body = {"id": f"pi_{next(ids)}", "object": "payment_intent", "amount": 1000, "currency": "usd"}
        return web.json_response(body)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", pay)
    _run(app, port)


class RequiredWork:
    """The least a gateway must do around forwarding a payment: decide it (form parsed, the sidecar's
    10-rule policy on its CEL engine) and, with ``commit``, check and count the spend with an audit row in
    one SQLite transaction before forwarding, and settle that row in another after."""

    def __init__(self, commit_to: str) -> None:
        self.engine = make_engine("cel-expr-python")
        with tempfile.TemporaryDirectory() as folder:
            Path(folder, "bench.yaml").write_text(policy_text(10, budget=10**15))
            self.policy_set = load_policy_set(folder, self.engine, operations=REGISTRY.operations)
        self.agent = Agent("agt_bench", "own_bench", "bench", "conn_bench", {"team": "ads"})
        self.nothing_spent = {"daily_budget": SpendTotal(0, 0), "monthly_budget": SpendTotal(0, 0)}
        self.db = None
        if commit_to:
            self.db = sqlite3.connect(commit_to, isolation_level=None)
            self.db.executescript(
                "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"
                "CREATE TABLE spend (name TEXT PRIMARY KEY, amount INTEGER, count INTEGER);"
                "CREATE TABLE audit (id INTEGER PRIMARY KEY, idempotency_key TEXT, amount INTEGER,"
                " outcome TEXT, at REAL);"
                "INSERT INTO spend VALUES ('daily_budget', 0, 0), ('monthly_budget', 0, 0);"
            )

    def before(self, request: Any, body: bytes) -> int:
        form = dict(parse_qsl(body.decode()))
        payment = Payment(
            provider="stripe",
            operation="payment_intent",
            amount=int(form["amount"]),
            currency=form["currency"],
            method=request.method,
            path=request.path,
        )
        now = datetime.now(UTC)
        if self.db is None:
            decide(self.policy_set, self.engine, payment, self.agent, self.nothing_spent, now)
            return 0
        self.db.execute("BEGIN IMMEDIATE")
        spend = {name: SpendTotal(a, c) for name, a, c in self.db.execute("SELECT * FROM spend")}
        decision = decide(self.policy_set, self.engine, payment, self.agent, spend, now)
        self.db.execute("UPDATE spend SET amount = amount + ?, count = count + 1", (payment.amount,))
        row = self.db.execute(
            "INSERT INTO audit (idempotency_key, amount, outcome, at) VALUES (?, ?, ?, ?)",
            (request.headers.get("Idempotency-Key"), payment.amount, decision.outcome, time.time()),
        ).lastrowid
        self.db.execute("COMMIT")
        return row or 0

    def after(self, row: int) -> None:
        if self.db is not None:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("UPDATE audit SET outcome = 'settled' WHERE id = ?", (row,))
            self.db.execute("COMMIT")


def serve_forwarder(port: int, upstream: str, work: RequiredWork | None = None) -> None:
    """The bare forwarder: the sidecar's Forwarder (one shared ClientSession, keep-alive), nothing else;
    with ``work``, that work around each call."""
    from aiohttp import web

    from proxy.forwarder import Forwarder

    forwarder = Forwarder(30.0)

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        row = work.before(request, body) if work else 0
        headers = forwarder.request_headers(request.headers, {"Authorization": "Bearer sk_test_bench"})
        reply = await forwarder.send(request.method, upstream + request.rel_url.raw_path_qs, headers, body)
        if work:
            work.after(row)
        return web.Response(status=reply.status, body=reply.body, headers=reply.headers)

    async def start(_: web.Application) -> None:
        await forwarder.start()

    app = web.Application()
    app.on_startup.append(start)
    app.router.add_route("*", "/{tail:.*}", forward)
    _run(app, port)


def _run(app: object, port: int) -> None:
    from aiohttp import web

    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)  # type: ignore[arg-type]


# -- orchestration ------------------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _start(args: list[str], port: int, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, *args], env=env or _env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for_port(port, " ".join(args))
    return process


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Sidecar:
    def __init__(
        self,
        root: Path,
        store: str,
        upstream: str,
        redis_url: str = "",
        extra: str = "",
        credentials: dict[str, str] | None = None,
    ) -> None:
        self.root, self.port, self.admin = root, free_port(), free_port()
        (root / "policies").mkdir(parents=True)
        (root / "policies" / "bench.yaml").write_text(policy_text(10, budget=10**15))
        self.config = root / "paysentry.yaml"
        self.config.write_text(
            f"listen: 127.0.0.1:{self.port}\nadmin_listen: 127.0.0.1:{self.admin}\nstore: {store}\n"
            f"policies: {root / 'policies'}\nbcrypt_rounds: 4\nagent_rate_limit: 0\nlog_level: WARNING\n"
            + (f"redis_url: {redis_url}\n" if redis_url else "")
            + extra
        )
        self.env = {**_env(), "PAYSENTRY_ENCRYPTION_KEYS": "k1:" + base64.b64encode(os.urandom(32)).decode()}
        if not store.startswith("sqlite"):
            self._cli("db", "migrate")
        self._cli("owner", "create", "bench")
        added = self._cli(
            "provider",
            "add",
            "--provider",
            "mock",
            "--upstream",
            upstream,
            "--credentials-file",
            "-",
            stdin=json.dumps(credentials or {"secret_key": "sk_test_bench"}),
        )
        self.connection = json.loads(added)["id"]
        self.token = json.loads(self._cli("agent", "create", "bench", "--label", "team=ads"))["token"]
        self.process = _start(["-m", "proxy", "--config", str(self.config), "serve"], self.port, self.env)

    def _cli(self, *args: str, stdin: str | None = None) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "proxy", "--config", str(self.config), *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=self.env,
            check=True,
        )
        return done.stdout

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def wrk(url: str, concurrency: int, duration: float, token: str, run_id: str) -> dict[str, float]:
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    script.write_text(
        "local counter, thread_id = 0, 0\n"
        'function setup(thread) thread:set("tid", thread_id); thread_id = thread_id + 1 end\n'
        "request = function()\n"
        "  counter = counter + 1\n"
        f'  wrk.headers["Idempotency-Key"] = "{run_id}-" .. tid .. "-" .. counter\n'
        f'  return wrk.format("POST", "/v1/payment_intents", nil, "{BODY}")\n'
        "end\n"
    )
    threads = min(concurrency, 2)
    out = subprocess.run(
        [
            shutil.which("wrk") or "wrk",
            f"-t{threads}",
            f"-c{concurrency}",
            f"-d{duration:g}s",
            "--latency",
            "-H",
            f"Authorization: Bearer {token}",
            "-H",
            "Content-Type: application/x-www-form-urlencoded",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    script.unlink()
    latency = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)$", out, re.MULTILINE))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "requests": float(re.search(r"(\d+) requests in", out).group(1)),  # type: ignore[union-attr]
        "p50": _ms(latency["50"]),
        "p99": _ms(latency["99"]),
        "errors": float(errors.group(1)) if errors else 0.0,
    }


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(\w+)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def run(
    process: subprocess.Popen[bytes], url: str, c: int, args: argparse.Namespace, token: str
) -> dict[str, float]:
    wrk(url, c, 1, token, f"warm{time.time_ns()}")
    before = _cpu_seconds(process.pid)
    result = wrk(url, c, args.duration, token, f"run{time.time_ns()}")
    result["cpu_us"] = (_cpu_seconds(process.pid) - before) / max(result["requests"], 1) * 1e6
    return result


def measure(
    name: str,
    process: subprocess.Popen[bytes],
    url: str,
    c: int,
    args: argparse.Namespace,
    token: str,
    bare: dict[str, float] | None,
) -> dict[str, float]:
    result = run(process, url, c, args, token)
    line = (
        f"{name:<24}{c:>4}{result['rps']:>10.0f}{result['p50']:>9.2f}{result['p99']:>9.2f}"
        f"{result['cpu_us']:>10.0f}{result['errors']:>8.0f}"
    )
    if bare is not None:
        line += f"{result['rps'] / bare['rps']:>8.2f}{result['p50'] - bare['p50']:>10.2f}"
    print(line, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--stores", default="sqlite,postgres,postgres+redis")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--role", choices=["upstream", "forwarder", "required"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    parser.add_argument("--commit-to", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "upstream":
        return serve_upstream(args.port)
    if args.role == "forwarder":
        return serve_forwarder(args.port, args.upstream)
    if args.role == "required":
        return serve_forwarder(args.port, args.upstream, RequiredWork(args.commit_to))

    levels = [int(c) for c in args.concurrency.split(",")]
    root = Path(tempfile.mkdtemp(prefix="paysentry-load-"))
    root.chmod(0o755)
    up_port, fw_port = free_port(), free_port()
    upstream = _start(["-m", "bench.load", "--role", "upstream", "--port", str(up_port)], up_port)
    upstream_url = f"http://127.0.0.1:{up_port}"
    forwarder = _start(
        ["-m", "bench.load", "--role", "forwarder", "--port", str(fw_port), "--upstream", upstream_url],
        fw_port,
    )
    servers: list[Postgres | Redis] = []
    print(
        f"POST /v1/payment_intents, allowed, {args.duration:g} s per row, wrk on loopback; "
        "cpu = server process CPU per request;\nratio, +p50: against the bare forwarder measured again "
        "just before the row, at the same concurrency"
    )
    print(
        f"{'target':<24}{'c':>4}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'cpu us':>10}{'non2xx':>8}"
        f"{'ratio':>8}{'+p50 ms':>10}"
    )
    try:
        for c in levels:
            measure("upstream alone", upstream, upstream_url + "/v1/payment_intents", c, args, "x", None)
        bare_url = f"http://127.0.0.1:{fw_port}/v1/payment_intents"
        for c in levels:
            measure("bare forwarder", forwarder, bare_url, c, args, "x", None)
        for name, commit_to in (
            ("bare + decide", ""),
            ("bare + decide + commits", str(root / "required.db")),
        ):
            port = free_port()
            required = _start(
                ["-m", "bench.load", "--role", "required", "--port", str(port), "--upstream", upstream_url]
                + ["--commit-to", commit_to],
                port,
            )
            try:
                for c in levels:
                    bare = run(forwarder, bare_url, c, args, "x")
                    measure(name, required, f"http://127.0.0.1:{port}/v1/payment_intents", c, args, "x", bare)
            finally:
                required.terminate()
                required.wait(timeout=10)
        for store in args.stores.split(","):
            redis_url = ""
            if store == "sqlite":
                url = f"sqlite:///{root / 'sidecar.db'}"
            else:
                if not servers:
                    servers = [
                        Postgres(root / "pg", free_port()).start(),
                        Redis(root / "redis", free_port()).start(),
                    ]
                url = servers[0].create_database(f"load_{store.replace('+', '_')}")  # type: ignore[union-attr]
                redis_url = servers[1].url if store == "postgres+redis" else ""
            sidecar = Sidecar(root / store, url, upstream_url, redis_url)
            try:
                for c in levels:
                    measure(
                        f"sidecar ({store})",
                        sidecar.process,
                        f"http://127.0.0.1:{sidecar.port}/v1/payment_intents",
                        c,
                        args,
                        sidecar.token,
                        run(forwarder, bare_url, c, args, "x"),  # the floor, back to back
                    )
            finally:
                sidecar.stop()
    finally:
        for process in (upstream, forwarder):
            process.terminate()
            process.wait(timeout=10)
        for server in servers:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
