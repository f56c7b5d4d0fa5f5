"""The gateway side by side with its floor: an upstream stub alone, a bare aiohttp forwarder built like the
sidecar's forwarding, and the sidecar (10 rules, two limits, allowed payments) on each store, driven by
wrk from its own process at concurrency 1, 16 and 64 on loopback.

    python -m bench.load [--duration 5] [--stores sqlite,postgres,postgres+redis] [--concurrency 1,16,64]

Printed per row: requests/s, p50 and p99 latency, server CPU per request (the process under test, from
/proc), non-2xx answers, and for the sidecar its throughput ratio to the bare forwarder and the p50 it adds.
The bare forwarder is measured again right before each sidecar row, at the same concurrency, and the ratio
is taken against that: on a shared machine the speed drifts by tens of percent within minutes. A row that
cannot be measured (a server did not start, wrk failed, printed socket errors or no figures, or completed no
request) says ``not measured`` and why, and the table goes on.

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
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
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
MS_PER = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}  # wrk's time units


class Unmeasured(Exception):
    """Why a row of the table could not be measured."""


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
    """The bare forwarder: the sidecar's upstream seam (one shared ClientSession, keep-alive, the provider's
    headers built the same way), nothing else; with ``work``, that work around each call."""
    from aiohttp import web

    from adapters.mock import MockAdapter
    from proxy.upstream import AiohttpUpstream, provider_request

    forwarder, adapter, credentials = AiohttpUpstream(30.0), MockAdapter(), {"secret_key": "sk_test_bench"}

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        row = work.before(request, body) if work else 0
        url = upstream + request.rel_url.raw_path_qs
        reply = await forwarder.send(
            provider_request(adapter, credentials, request.method, url, request.headers, body)
        )
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
    try:
        wait_for_port(port, " ".join(args))
    except BaseException:
        process.kill()
        process.wait()
        raise
    return process


class Role:
    """This module serving one of its roles (upstream, forwarder, required) in a process of its own."""

    token = "x"

    def __init__(self, port: int, role: str, *options: str) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.process = _start(["-m", "bench.load", "--role", role, "--port", str(port), *options], port)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


class Databases:
    """PostgreSQL and Redis for the sidecar's postgres stores, one of each shared by them."""

    def __init__(self, root: Path) -> None:
        self.postgres, self.redis = Postgres(root / "pg", free_port()), Redis(root / "redis", free_port())
        try:
            self.postgres.start()
            self.redis.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self.postgres.stop()
        self.redis.stop()


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
        self.url = f"http://127.0.0.1:{self.port}"
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
            [sys.executable, "-m", "proxy", "--config", str(self.config), "-o", "json", *args],
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
    """wrk's figures for a run of ``duration`` seconds at ``concurrency``, each request a new payment; raises
    Unmeasured if wrk fails or its figures are missing or cannot be trusted."""
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
    try:
        done = subprocess.run(
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
        )
    finally:
        script.unlink()
    if done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip() or "nothing").splitlines()[-1]
        raise Unmeasured(f"wrk exited with {done.returncode}: {said}")
    return parse_wrk(done.stdout)


def parse_wrk(out: str) -> dict[str, float]:
    """wrk --latency's figures: requests/s, requests, p50 and p99 in ms, non-2xx answers. Raises Unmeasured
    if one is missing, if wrk saw socket errors (connect, read, write, timeout) or no request completed."""
    # wrk pads a value whose unit is one letter ("99%    1.31s "): spaces may follow it
    latency = {
        p: float(value) * MS_PER[unit]
        for p, value, unit in re.findall(
            r"^\s*(50|99)%\s+(\d+(?:\.\d+)?)(us|ms|s|m|h)\s*$", out, re.MULTILINE
        )
    }
    rps = re.search(r"^\s*Requests/sec:\s+(\d+(?:\.\d+)?)\s*$", out, re.MULTILINE)
    requests = re.search(r"^\s*(\d+) requests in ", out, re.MULTILINE)
    found = {"p50": "50" in latency, "p99": "99" in latency, "requests/s": rps, "request count": requests}
    if missing := [name for name, there in found.items() if not there]:
        raise Unmeasured(f"wrk printed no {', '.join(missing)}")
    if socket := re.search(r"^\s*Socket errors: (.*\S)", out, re.MULTILINE):
        raise Unmeasured(f"wrk socket errors: {socket.group(1)}")
    if int(requests.group(1)) == 0:  # type: ignore[union-attr]
        raise Unmeasured("no request completed")
    errors = re.search(r"^\s*Non-2xx or 3xx responses: (\d+)", out, re.MULTILINE)
    return {
        "rps": float(rps.group(1)),  # type: ignore[union-attr]
        "requests": float(requests.group(1)),  # type: ignore[union-attr]
        "p50": latency["50"],
        "p99": latency["99"],
        "errors": float(errors.group(1)) if errors else 0.0,
    }


def run(server: Role | Sidecar | Exception, c: int, args: argparse.Namespace) -> dict[str, float]:
    """``server`` under wrk at concurrency ``c`` after a 1 s warm-up, with its CPU per request; ``server``
    an exception: it did not start, and that is raised."""
    if isinstance(server, Exception):
        raise server
    url = server.url + "/v1/payment_intents"
    wrk(url, c, 1, server.token, f"warm{time.time_ns()}")
    before = _cpu_seconds(server.process.pid)
    result = wrk(url, c, args.duration, server.token, f"run{time.time_ns()}")
    result["cpu_us"] = (_cpu_seconds(server.process.pid) - before) / result["requests"] * 1e6
    return result


def _reason(error: Exception) -> str:
    text = " ".join(str(error).split())
    return text if isinstance(error, Unmeasured) else f"{type(error).__name__}: {text}"


def row(
    name: str,
    c: int,
    args: argparse.Namespace,
    server: Role | Sidecar | Exception,
    floor: Role | Exception | None = None,
) -> None:
    """Print ``server``'s row at concurrency ``c`` (with ``floor``, the bare forwarder measured just before:
    the ratio to it and the p50 added to it), or, if it cannot be measured, a row saying why."""
    try:
        try:
            bare = run(floor, c, args) if floor is not None else None
        except Exception as error:
            raise Unmeasured(f"the bare forwarder before it: {_reason(error)}") from error
        result = run(server, c, args)
    except Exception as error:  # this row's failure, not the table's: the next rows go on
        print(f"{name:<24}{c:>4}  not measured: {_reason(error)}", flush=True)
        return
    line = (
        f"{name:<24}{c:>4}{result['rps']:>10.0f}{result['p50']:>9.2f}{result['p99']:>9.2f}"
        f"{result['cpu_us']:>10.0f}{result['errors']:>8.0f}"
    )
    if bare is not None:
        line += f"{result['rps'] / bare['rps']:>8.2f}{result['p50'] - bare['p50']:>10.2f}"
    print(line, flush=True)


S = TypeVar("S", Role, Sidecar, Databases)


def start(stack: ExitStack, make: Callable[..., S], *args: Any) -> S | Exception:
    """``make(*args)``, a server stopped when ``stack`` closes; or, if it does not start, why, for each of
    its rows to say."""
    try:
        server = make(*args)
    except Exception as error:
        return error
    stack.callback(server.stop)
    return server


def _sidecar(root: Path, store: str, upstream: str, databases: Databases | Exception | None) -> Sidecar:
    """The sidecar on ``store``; on a postgres store, in a database of its own on the shared server."""
    if store == "sqlite":
        return Sidecar(root / store, f"sqlite:///{root / 'sidecar.db'}", upstream)
    if isinstance(databases, Exception):
        raise databases
    url = databases.postgres.create_database(f"load_{store.replace('+', '_')}")  # type: ignore[union-attr]
    redis_url = databases.redis.url if store == "postgres+redis" else ""  # type: ignore[union-attr]
    return Sidecar(root / store, url, upstream, redis_url)


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
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, root, ignore_errors=True)
        up_port = free_port()
        upstream_url = f"http://127.0.0.1:{up_port}"
        upstream = start(stack, Role, up_port, "upstream")
        forwarder = start(stack, Role, free_port(), "forwarder", "--upstream", upstream_url)
        print(
            f"POST /v1/payment_intents, allowed, {args.duration:g} s per row, wrk on loopback; "
            "cpu = server process CPU per request;\nratio, +p50: against the bare forwarder measured again "
            "just before the row, at the same concurrency"
        )
        print(
            f"{'target':<24}{'c':>4}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'cpu us':>10}{'non2xx':>8}"
            f"{'ratio':>8}{'+p50 ms':>10}"
        )
        for c in levels:
            row("upstream alone", c, args, upstream)
        for c in levels:
            row("bare forwarder", c, args, forwarder)
        for name, commit_to in (
            ("bare + decide", ""),
            ("bare + decide + commits", str(root / "required.db")),
        ):
            with ExitStack() as rows:
                options = ["--upstream", upstream_url, "--commit-to", commit_to]
                required = start(rows, Role, free_port(), "required", *options)
                for c in levels:
                    row(name, c, args, required, forwarder)
        databases: Databases | Exception | None = None
        for store in args.stores.split(","):
            if store != "sqlite" and databases is None:
                databases = start(stack, Databases, root)
            with ExitStack() as rows:
                sidecar = start(rows, _sidecar, root, store, upstream_url, databases)
                for c in levels:
                    row(f"sidecar ({store})", c, args, sidecar, forwarder)  # the floor, back to back


if __name__ == "__main__":
    main()
