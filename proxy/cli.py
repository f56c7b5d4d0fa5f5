"""The ``paysentry`` command.

    paysentry serve [--demo]                       run the sidecar (--demo: mock provider, demo owner/agent)
    paysentry keygen FILE                          write a new encryption key file (or add one for rotation)
    paysentry owner create NAME                    prints the owner's API token once
    paysentry provider add --name N --provider P [--upstream URL] [--setting NAME=VALUE]... --credentials-file F|-
    paysentry provider list | provider remove NAME   (agents on a removed connection stop being served)
    paysentry agent create NAME [--label k=v] [--connection N]   prints the agent's token once
    paysentry agent list | agent revoke ID
    paysentry policy check DIR...                  load and type-check (exit 3 when invalid)
    paysentry policy test DIR... [--coverage] [--threshold N] [--format text|json|junit]
                                                 run *_test.yaml beside the policies (exit 4 on
                                                 failure, 5 below the coverage threshold)
    paysentry policy replay DIR --since 7d         which recorded decisions a candidate set would change
    paysentry policy schema                        the JSON schema of a policy file, with the adapters' operations
    paysentry approvals list [--state S] | show ID | approve ID | deny ID [--reason R]
    paysentry approver create NAME | approver list | approver revoke ID
    paysentry reconcile [--since 24h|ISO8601] [--owner N] [--connection N] [-o json]
                                                   compare what PaySentry counted with the providers' records
    paysentry state check FILE                     load a declared state file, resolving its references (exit 2 when invalid)
    paysentry state token [--id ID] [--owner|--approver]  a new agent (owner, approver) token for a Secret
    paysentry mock-provider [--listen HOST:PORT]
    paysentry x402-demo [both|facilitator|resource] [--listen HOST:PORT] [--facilitator HOST:PORT]

Commands that touch the store take ``--config FILE`` (default: $PAYSENTRY_CONFIG, else deploy/dev.yaml).
With ``--api URL`` (or $PAYSENTRY_API) the owner's day-to-day commands (agent list|create|revoke, approvals
list|show|approve|deny, approver list|create|revoke) go through the owner API instead, with the token in
$PAYSENTRY_OWNER_TOKEN (an approver's psa_ token works for approvals). ``-o table`` (the default) or
``-o json``, ``--config``, ``--api`` and ``-o`` are accepted anywhere on the line. Times are ISO 8601 (UTC).

Exit codes (every error is one line on stderr, never a traceback):
    0  done (also when the reader of the output stopped early: ``| head``)
    1  refused: not found, conflict, forbidden, a file that cannot be read; for reconcile: a provider list
       could not be read whole
    2  usage or configuration error
    3  invalid policy
    4  a policy test failed
    5  reconcile left unexplained drift; policy test: coverage below --threshold
    6  the owner API (--api) could not be reached
    70 an internal error (a bug: set PAYSENTRY_DEBUG=1 for the traceback)
    130 interrupted
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn

from adapters import REGISTRY
from proxy import __version__
from proxy.config import Settings, load_settings
from proxy.errors import ConfigError, PaySentryError, PolicyError

DEFAULT_CONFIG = "deploy/dev.yaml"


class UsageError(PaySentryError):
    """A command used wrongly (exit 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and a pointer to --help (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see: {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="paysentry", description="Authorization gateway for AI-agent payments")
    p.add_argument(
        "--config", default=os.environ.get("PAYSENTRY_CONFIG", DEFAULT_CONFIG), help="settings file"
    )
    p.add_argument("--version", action="version", version=f"paysentry {__version__}")
    p.add_argument(
        "-o", "--output", choices=("table", "json"), default="table", help="table (default) or json"
    )
    p.add_argument(
        "--api",
        default=os.environ.get("PAYSENTRY_API") or None,
        metavar="URL",
        help="use the owner API at URL (token: $PAYSENTRY_OWNER_TOKEN) instead of the local store",
    )
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the sidecar")
    serve.add_argument("--demo", action="store_true", help="set up a demo owner, mock connection and agent")

    keygen = sub.add_parser(
        "keygen", help="write an encryption key file (prepends a new key to an existing one)"
    )
    keygen.add_argument("file")
    db = sub.add_parser("db", help="the store's schema").add_subparsers(dest="action", required=True)
    db.add_parser("migrate", help="create or upgrade the store's schema (PostgreSQL; SQLite does it itself)")
    keys = sub.add_parser("keys", help="encryption keys").add_subparsers(dest="action", required=True)
    keys.add_parser(
        "rotate",
        help="re-encrypt every sealed credential and stored answer under the newest key (run after keygen)",
    )

    owner = sub.add_parser(
        "owner", help="owners: each has its own token, agents and policies' view"
    ).add_subparsers(dest="action", required=True)
    owner.add_parser("create", help="prints the owner's API token once").add_argument("name")
    owner.add_parser("list", help="every owner")

    provider = sub.add_parser(
        "provider", help="provider connections (accounts and their credentials)"
    ).add_subparsers(dest="action", required=True)
    provider.add_parser("list", help="the owner's active connections (never their credentials)").add_argument(
        "--owner"
    )
    removed = provider.add_parser("remove", help="remove a connection; agents on it are refused from then on")
    removed.add_argument("name", help="the connection's name (or id)")
    removed.add_argument("--owner")
    add = provider.add_parser(
        "add",
        help="connect a provider account; credentials come from a file or stdin",
        epilog=_settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add.add_argument("--owner")
    add.add_argument("--name", default="default")
    add.add_argument("--provider", required=True, choices=list(REGISTRY))
    add.add_argument("--upstream")
    add.add_argument(
        "--allow-account",
        action="append",
        default=[],
        metavar="ACCT",
        help="a connected account agents may act for (the provider's account header); repeat for several",
    )
    add.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting of the connection, as its provider describes it (below); repeat for several",
    )
    add.add_argument(
        "--credentials-file", required=True, help='JSON {"secret_key": ...} or the key alone; - for stdin'
    )

    agent = sub.add_parser("agent", help="agents: each with its own token").add_subparsers(
        dest="action", required=True
    )
    create = agent.add_parser("create", help="prints the agent's token once")
    create.add_argument("name")
    create.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    create.add_argument("--connection", default="default")
    create.add_argument("--owner")
    agent.add_parser("list", help="the owner's agents").add_argument("--owner")
    revoke = agent.add_parser("revoke", help="the agent's token stops working")
    revoke.add_argument("id")
    revoke.add_argument("--owner")

    policy = sub.add_parser("policy", help="check, test, replay policies").add_subparsers(
        dest="action", required=True
    )
    check = policy.add_parser("check", help="load and type-check policy directories")
    check.add_argument("dirs", nargs="+", metavar="DIR")
    check.add_argument("--engine", default=None, help="cel-expr-python, cel-python or all")
    test = policy.add_parser("test", help="run the *_test.yaml files beside the policies")
    test.add_argument("dirs", nargs="+", metavar="DIR")
    test.add_argument("--engine", default=None, help="cel-expr-python, cel-python or all")
    test.add_argument(
        "--coverage",
        action="store_true",
        help="report coverage: each rule fires in a case and does not in another, each limit refuses in one",
    )
    test.add_argument(
        "--threshold", type=float, default=None, metavar="N", help="exit 5 when coverage is below N percent"
    )
    test.add_argument(
        "--format", choices=("text", "json", "junit"), default="text", help="the report's format"
    )
    rerun = policy.add_parser("replay", help="re-decide recorded history under a candidate policy set")
    rerun.add_argument("dir")
    rerun.add_argument("--since", default="7d", help="a duration back from now (24h, 7d) or ISO 8601")
    rerun.add_argument("--owner")
    rerun.add_argument("--engine", default=None)
    policy.add_parser("schema", help="print the JSON schema of a policy file, with the adapters' operations")

    approvals = sub.add_parser("approvals", help="held payments: list, show, vote").add_subparsers(
        dest="action", required=True
    )
    listing = approvals.add_parser("list", help="held payments (pending by default)")
    listing.add_argument(
        "--state", default="pending", choices=("pending", "approved", "denied", "expired", "all")
    )
    listing.add_argument("--owner")
    for name, what in (
        ("show", "one hold, its approvers and votes"),
        ("approve", "vote to approve"),
        ("deny", "vote to deny"),
    ):
        cmd = approvals.add_parser(name, help=what)
        cmd.add_argument("id")
        cmd.add_argument("--owner")
        if name != "show":
            cmd.add_argument("--reason", default="")
            cmd.add_argument("--as", dest="voter", default=None, help=argparse.SUPPRESS)  # refused: see below

    approver = sub.add_parser(
        "approver", help="people who may vote on holds, each with a token of their own"
    ).add_subparsers(dest="action", required=True)
    made = approver.add_parser("create", help="prints the approver's token once")
    made.add_argument("name", help="as the policies name the approver (approvers: [alice])")
    made.add_argument("--owner")
    approver.add_parser("list", help="the owner's approvers").add_argument("--owner")
    gone = approver.add_parser("revoke", help="the approver's token stops working; their votes stay")
    gone.add_argument("id")
    gone.add_argument("--owner")

    reconcile = sub.add_parser(
        "reconcile",
        help="compare what PaySentry counted with each connection's provider records; fix what they prove",
    )
    reconcile.add_argument("--since", default="24h", help="a duration back from now (24h, 7d) or ISO 8601")
    reconcile.add_argument("--owner")
    reconcile.add_argument("--connection", help="one connection of the owner, by name")

    state = sub.add_parser("state", help="declared state files (GitOps)").add_subparsers(
        dest="action", required=True
    )
    state.add_parser("check", help="load a declared state file and everything it references").add_argument(
        "file"
    )
    token = state.add_parser("token", help="print a new token to put in a Secret the state file references")
    token.add_argument("--id", help="keep this agent's, owner's or approver's id: a rotation of its token")
    whose = token.add_mutually_exclusive_group()
    whose.add_argument("--owner", action="store_true", help="an owner token (pso_...), not an agent's")
    whose.add_argument("--approver", action="store_true", help="an approver token (psa_...), not an agent's")

    mock = sub.add_parser("mock-provider", help="run the built-in mock payment provider on its own")
    mock.add_argument("--listen", default="127.0.0.1:12111")

    demo = sub.add_parser(
        "x402-demo", help="run a paid x402 resource and an offline facilitator (demo, tests)"
    )
    demo.add_argument("part", nargs="?", choices=["both", "facilitator", "resource"], default="both")
    demo.add_argument("--listen", default="127.0.0.1:4021", help="the paid resource's address")
    demo.add_argument("--facilitator", default="127.0.0.1:4022", help="the facilitator's address")
    return p


def _x402_demo(args: argparse.Namespace) -> int:
    from adapters import mock_x402
    from proxy.config import split_address

    host, port = split_address(args.listen)
    fhost, fport = split_address(args.facilitator)
    if args.part == "facilitator":
        mock_x402.serve_facilitator(fhost, fport)
    elif args.part == "resource":
        mock_x402.serve_resource(host, port, f"http://{fhost}:{fport}")
    else:
        mock_x402.serve_demo(host, fport, port)
    return 0


def _settings_help() -> str:
    lines = ["connection settings (--setting NAME=VALUE), by provider:"]
    for name, adapter in REGISTRY.items():
        described = [
            f"{setting} ({'required' if s.required else 'optional'}): {s.description}"
            for setting, s in adapter.settings.items()
        ]
        lines.append(f"  {name}: " + ("; ".join(described) or "none"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(hoist_config(sys.argv[1:] if argv is None else argv))
    try:
        return _dispatch(args)
    except BrokenPipeError:  # the reader stopped (| head): nothing more to say
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("paysentry: interrupted", file=sys.stderr)
        return 130
    except PolicyError as exc:
        print(exc.message, file=sys.stderr)
        return 3
    except ConfigError as exc:
        print(exc.message, file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"paysentry: {exc.message}", file=sys.stderr)
        return 2
    except PaySentryError as exc:
        from proxy.client import ApiUnreachable

        print(f"paysentry: {exc.message}", file=sys.stderr)
        return 6 if isinstance(exc, ApiUnreachable) else 1
    except OSError as exc:  # a file named on the line: missing, unreadable
        where = f": {exc.filename}" if exc.filename else ""
        print(f"paysentry: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except Exception as exc:
        if os.environ.get("PAYSENTRY_DEBUG"):
            raise
        print(
            f"paysentry: internal error ({type(exc).__name__}: {exc}); PAYSENTRY_DEBUG=1 shows where",
            file=sys.stderr,
        )
        return 70


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "policy" and args.action in _POLICY_COMMANDS:
        return _POLICY_COMMANDS[args.action](args)
    if args.command == "state":
        return _state(args)
    if args.command == "keygen":
        return _keygen(Path(args.file))
    if args.command == "mock-provider":
        from adapters.mock import serve_mock
        from proxy.config import split_address

        host, port = split_address(args.listen)
        serve_mock(host, port)
        return 0
    if args.command == "x402-demo":
        return _x402_demo(args)
    key = (args.command, getattr(args, "action", "") or "")
    if args.api:
        if key not in _REMOTE:
            remote = ", ".join(" ".join(k) for k in _REMOTE)
            raise UsageError(
                f"--api serves {remote}; {' '.join(key)} runs where the store is (without --api)"
            )
        from proxy.client import OwnerApiClient

        token = os.environ.get("PAYSENTRY_OWNER_TOKEN", "")
        if not token:
            raise UsageError("--api needs the owner's token in PAYSENTRY_OWNER_TOKEN (or an approver's psa_)")
        if getattr(args, "owner", None):
            raise UsageError("--owner does not go with --api: the token says whose objects these are")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,100}", getattr(args, "id", None) or "x"):
            raise UsageError(f"{args.id!r} is not an id (such as agt_0123456789abcdef)")
        client = OwnerApiClient(args.api, token)
        return _REMOTE[key](client, args)
    settings = load_settings(args.config)
    if args.command == "serve":
        return _serve(settings, args.demo)
    command = _COMMANDS[key]
    return asyncio.run(_with_store(settings, lambda ctx: command(ctx, args), migrate=args.command == "db"))


def hoist_config(argv: list[str]) -> list[str]:
    """``--config FILE``, ``--api URL`` and ``-o FORMAT`` are accepted anywhere (``paysentry serve --config
    x``, ``paysentry agent list -o json``): move them before the command."""
    rest, hoisted = list(argv), list[str]()
    names = ("--config", "--api", "--output", "-o")
    while True:
        i = next(
            (k for k, a in enumerate(rest) if a in names or a.startswith(tuple(f"{n}=" for n in names))), None
        )
        if i is None:
            return hoisted + rest
        take = 1 if "=" in rest[i] else 2
        hoisted += rest[i : i + take]
        del rest[i : i + take]


# -- serve ------------------------------------------------------------------------------------------------
def _serve(settings: Settings, demo: bool) -> int:
    from proxy.logs import setup_logging
    from proxy.telemetry import setup_tracing

    setup_logging(settings.log_level)
    if demo:
        _ensure_key_file(Path(settings.encryption_key_file))
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is optional off Linux
        pass
    return asyncio.run(_run(settings, setup_tracing(), demo))


async def _run(settings: Settings, provider: Any, demo: bool) -> int:
    from proxy.app import Sidecar

    sidecar = Sidecar(settings, provider)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await sidecar.start()
    if demo:
        await _demo(sidecar, settings)
    print(
        json.dumps({"msg": "paysentry ready", "listen": settings.listen, "admin": settings.admin_listen}),
        flush=True,
    )
    await stop.wait()
    await sidecar.stop()
    provider.shutdown()
    return 0


async def _demo(sidecar: Any, settings: Settings) -> None:
    """A demo owner, a connection to the built-in mock provider, and a fresh demo agent."""
    from adapters.mock import DEFAULT_SECRET_KEY

    service = sidecar.gateway.owner_service
    owner = await sidecar.store.find_owner("demo")
    if owner is None:
        owner, owner_token = await service.create_owner("demo")
    else:
        owner_token = await service.rotate_owner_token(owner)
    if await sidecar.store.find_connection(owner.id, "default") is None:
        upstream = f"http://{settings.mock_provider_listen}" if settings.mock_provider_listen else None
        await service.add_connection(
            owner.id, "mock", "default", upstream, {"secret_key": DEFAULT_SECRET_KEY}
        )
    for agent in await sidecar.store.list_agents(owner.id):
        if agent.name == "demo" and agent.revoked_at is None:
            await sidecar.store.revoke_agent(owner.id, agent.id, "demo", time.time())
    _, agent_token = await service.create_agent(owner.id, "demo", {"team": "demo"}, "default")
    x402_token = await _demo_x402(sidecar, owner)
    host = settings.listen
    print(
        "\n".join(
            [
                "",
                "PaySentry demo is running.",
                f"  agent listener : http://{host}     (point your Stripe SDK's api_base here)",
                f"  owner API      : http://{settings.admin_listen}",
                f"  demo agent token (shown once): {agent_token}",
                f"  demo owner token (shown once): {owner_token}",
                "",
                "  python -c \"import stripe; stripe.api_base='http://"
                + host
                + "'; stripe.api_key='"
                + agent_token
                + "'; print(stripe.PaymentIntent.create(amount=1500, currency='usd').id)\"",
                "",
                f"  demo x402 agent token (shown once): {x402_token}",
                "  curl -H 'Authorization: Bearer " + x402_token + "' "
                f"http://{host}/x402/http%3A%2F%2F127.0.0.1%3A4021%2Freport"
                "   (the paid resource and facilitator: paysentry x402-demo, started by make run)",
                "",
            ]
        ),
        flush=True,
    )


async def _demo_x402(sidecar: Any, owner: Any) -> str:
    """An x402 connection with a fresh demo wallet (its key sealed, never shown) allowed to pay the demo
    resource of ``paysentry x402-demo``, and a fresh demo agent on it."""
    from eth_account import Account

    service = sidecar.gateway.owner_service
    if await sidecar.store.find_connection(owner.id, "x402-demo") is None:
        wallet = Account.create()
        settings = {"allowed_origins": "http://127.0.0.1:4021", "rpc_url": "http://127.0.0.1:4022/rpc"}
        credentials = {"secret_key": wallet.key.hex()}
        await service.add_connection(owner.id, "x402", "x402-demo", None, credentials, settings=settings)
    for agent in await sidecar.store.list_agents(owner.id):
        if agent.name == "demo-x402" and agent.revoked_at is None:
            await sidecar.store.revoke_agent(owner.id, agent.id, "demo", time.time())
    _, token = await service.create_agent(owner.id, "demo-x402", {"team": "demo"}, "x402-demo")
    return str(token)


def _state(args: argparse.Namespace) -> int:
    from proxy.secrets import AGENT_PREFIX, APPROVER_PREFIX, OWNER_PREFIX, issue_token, new_id

    if args.action == "token":
        prefixes = {"own": OWNER_PREFIX, "agt": AGENT_PREFIX, "apv": APPROVER_PREFIX}
        kind = "own" if args.owner else "apv" if args.approver else (args.id or "agt").split("_")[0]
        kind = kind if kind in prefixes else "agt"
        prefix = prefixes[kind]
        public_id = args.id or new_id(kind)
        if not public_id.startswith(f"{kind}_") or len(public_id) != len(kind) + 17:
            raise PaySentryError(f"--id takes an id like {kind}_0123456789abcdef, got {public_id!r}")
        print(issue_token(prefix, public_id, 4).token)  # the hash is made when the state is applied
        return 0
    from proxy.state import load_state

    state, _ = load_state(args.file)
    for owner in state.owners:
        print(
            f"ok: owner {owner.name}: {len(owner.connections)} connections, {len(owner.agents)} agents, "
            f"{len(owner.approvers)} approvers"
        )
    return 0


def _ensure_key_file(path: Path) -> None:
    if not path.exists() and not os.environ.get("PAYSENTRY_ENCRYPTION_KEYS"):
        _keygen(path)


def _keygen(path: Path) -> int:
    from proxy.secrets import new_key_line

    existing = path.read_text() if path.exists() else ""
    kid = f"k{time.strftime('%Y%m%d%H%M%S')}{secrets.token_hex(2)}"  # unique even within one second
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new_key_line(kid) + "\n" + existing)
    path.chmod(0o600)
    print(f"wrote encryption key {kid} to {path}")
    return 0


def _engines(args: argparse.Namespace) -> list[Any]:
    from proxy.policy.engine import ENGINES, make_engine

    name = args.engine
    if name is None:
        try:
            name = load_settings(args.config).engine if Path(args.config).exists() else "cel-expr-python"
        except ConfigError:
            name = "cel-expr-python"
    return [make_engine(n) for n in (ENGINES if name == "all" else [name])]


def _policy_check(args: argparse.Namespace) -> int:
    from proxy.policy.loader import load_policy_set

    for engine in _engines(args):
        for directory in args.dirs:
            ps = load_policy_set(directory, engine, operations=REGISTRY.operations)
            rules = sum(len(p.rules) for p in ps.policies)
            limits = sum(len(p.limits) for p in ps.policies)
            print(
                f"ok: {directory}: {len(ps.policies)} policies, {rules} rules, {limits} limits "
                f"(revision {ps.revision}, engine {ps.engine})"
            )
    return 0


def _policy_test(args: argparse.Namespace) -> int:
    from proxy.policy import reports
    from proxy.policy.testing import run_directory

    suites: list[reports.Suite] = []
    for engine in _engines(args):
        for directory in args.dirs:
            suite = reports.Suite(directory, engine.name)
            try:
                suite.report = run_directory(directory, engine, REGISTRY.examples)
            except PolicyError as exc:
                suite.problems = list(exc.problems)
            suites.append(suite)
    coverage = args.coverage or args.threshold is not None
    if args.format == "json":
        print(reports.as_json(suites, args.threshold))
    elif args.format == "junit":
        print(reports.junit(suites, coverage, args.threshold))
    else:
        print(reports.text(suites, coverage, args.threshold))
    return reports.exit_code(suites, args.threshold)


def _policy_schema(args: argparse.Namespace) -> int:
    from proxy.policy.loader import policy_schema

    print(json.dumps(policy_schema(REGISTRY.operations), indent=2))
    return 0


_POLICY_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "check": _policy_check,
    "test": _policy_test,
    "schema": _policy_schema,
}


# -- commands on the store ----------------------------------------------------------------------------------
class _Context:
    """What the store commands use of the graph the composition root builds (nothing else is built)."""

    def __init__(self, settings: Settings) -> None:
        from proxy.bootstrap import bootstrap

        self.gateway = gateway = bootstrap(settings)
        self.store, self.sealer, self.service = gateway.store, gateway.sealer, gateway.owner_service


async def _with_store(
    settings: Settings, fn: Callable[[_Context], Awaitable[int]], migrate: bool = False
) -> int:
    ctx = _Context(settings)
    await ctx.store.open(migrate=migrate)
    try:
        return await fn(ctx)
    finally:
        await ctx.store.close()


AGENT_COLUMNS = ("id", "name", "connection", "labels", "created_at", "revoked_at")
APPROVAL_COLUMNS = ("id", "state", "authorization_id", "approvers", "quorum", "expires_at", "decided_by")
APPROVER_COLUMNS = ("id", "name", "created_at", "revoked_at")
CONNECTION_COLUMNS = ("id", "name", "provider", "upstream", "settings", "created_at")


def _show(args: argparse.Namespace, data: Any, columns: tuple[str, ...] = ()) -> None:
    """``data`` as ``-o`` asks: JSON, or a table (a list, in ``columns``) or ``key  value`` lines."""
    if getattr(args, "output", "json") == "json":
        print(json.dumps(data, indent=2, default=str))
    elif isinstance(data, list):
        print(_table(data, columns or tuple(data[0]) if data else columns))
    else:
        width = max((len(k) for k in data), default=0)
        print("\n".join(f"{k:<{width}}  {_cell(v)}" for k, v in data.items()))


def _table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    cells = [[c.upper() for c in columns]] + [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return (
            ",".join(f"{k}={v}" for k, v in value.items())
            if all(not isinstance(v, dict | list) for v in value.values())
            else json.dumps(value)
        )
    if isinstance(value, list):
        return (
            ",".join(_cell(v) for v in value)
            if all(not isinstance(v, dict) for v in value)
            else f"{len(value)} item(s)"
        )
    return str(value)


async def _db_migrate(ctx: _Context, args: argparse.Namespace) -> int:
    _show(args, {"store": ctx.store.__class__.__name__, "schema_version": await ctx.store.migrate()})
    return 0


async def _keys_rotate(ctx: _Context, args: argparse.Namespace) -> int:
    report = await ctx.service.rotate_keys()
    _show(args, {"newest_key": ctx.sealer.key_ids[0], "loaded_keys": ctx.sealer.key_ids, **report})
    return 0


async def _owner_create(ctx: _Context, args: argparse.Namespace) -> int:
    if await ctx.store.find_owner(args.name) is not None:
        raise PaySentryError(f"an owner named {args.name!r} already exists; see: paysentry owner list")
    owner, token = await ctx.service.create_owner(args.name)
    _show(args, {"id": owner.id, "name": owner.name, "token": token, "note": "the token is shown once"})
    return 0


async def _owner_list(ctx: _Context, args: argparse.Namespace) -> int:
    _show(args, [{"id": o.id, "name": o.name} for o in await ctx.store.list_owners()])
    return 0


def _credentials(source: str) -> dict[str, str]:
    text = (sys.stdin.read() if source == "-" else Path(source).read_text()).strip()
    if not text.startswith("{"):
        return {"secret_key": text}
    try:
        credentials = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"--credentials-file {source}: not valid JSON ({exc})") from None
    if not isinstance(credentials, dict) or not all(isinstance(v, str) for v in credentials.values()):
        raise UsageError(f'--credentials-file {source}: a JSON object of strings, {{"secret_key": "..."}}')
    return credentials


async def _provider_add(ctx: _Context, args: argparse.Namespace) -> int:
    credentials = _credentials(args.credentials_file)
    owner = await ctx.service.owner_named(args.owner)
    if await ctx.store.find_connection(owner.id, args.name, include_revoked=True) is not None:
        raise PaySentryError(
            f"a provider connection named {args.name!r} already exists (removed ones keep their name); "
            "choose another --name"
        )
    record = await ctx.service.add_connection(
        owner.id,
        args.provider,
        args.name,
        args.upstream,
        credentials,
        args.allow_account,
        _pairs("--setting", args.setting),
    )
    _show(
        args,
        {
            "id": record.id,
            "name": record.name,
            "provider": record.provider,
            "upstream": record.upstream,
            "settings": dict(record.settings),
        },
    )
    return 0


async def _provider_list(ctx: _Context, args: argparse.Namespace) -> int:
    from proxy.owners import rfc3339

    owner = await ctx.service.owner_named(args.owner)
    rows = [
        {
            "id": c.id,
            "name": c.name,
            "provider": c.provider,
            "upstream": c.upstream,
            "settings": dict(c.settings),
            "allowed_accounts": list(c.allowed_accounts),
            "created_at": rfc3339(c.created_at),
        }
        for c in await ctx.store.list_connections(owner.id)
    ]
    _show(args, rows, CONNECTION_COLUMNS)
    return 0


async def _provider_remove(ctx: _Context, args: argparse.Namespace) -> int:
    owner = await ctx.service.owner_named(args.owner)
    found = await ctx.store.find_connection(owner.id, args.name)
    if found is None:
        found = next((c for c in await ctx.store.list_connections(owner.id) if c.id == args.name), None)
    if found is None or not await ctx.store.revoke_connection(owner.id, found.id, "cli", time.time()):
        raise PaySentryError(f"no active provider connection {args.name!r}; see: paysentry provider list")
    print(f"removed {found.name} ({found.id})")
    return 0


def _pairs(option: str, items: list[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{option} takes KEY=VALUE, got {item!r}")
        pairs[key] = value
    return pairs


async def _agent_create(ctx: _Context, args: argparse.Namespace) -> int:
    labels = _pairs("--label", args.label)
    owner = await ctx.service.owner_named(args.owner)
    agent, token = await ctx.service.create_agent(owner.id, args.name, labels, args.connection)
    from proxy.owners import agent_json

    _show(args, {**agent_json(agent), "token": token, "note": "the token is shown once"})
    return 0


async def _agent_list(ctx: _Context, args: argparse.Namespace) -> int:
    from proxy.owners import agent_json

    owner = await ctx.service.owner_named(args.owner)
    _show(args, [agent_json(a) for a in await ctx.store.list_agents(owner.id)], AGENT_COLUMNS)
    return 0


async def _agent_revoke(ctx: _Context, args: argparse.Namespace) -> int:
    owner = await ctx.service.owner_named(args.owner)
    if not await ctx.store.revoke_agent(owner.id, args.id, "cli", time.time()):
        print(f"paysentry: no active agent {args.id!r}", file=sys.stderr)
        return 1
    print(f"revoked {args.id}")
    return 0


async def _approvals_list(ctx: _Context, args: argparse.Namespace) -> int:
    from proxy.owners import approval_json

    owner = await ctx.service.owner_named(args.owner)
    state = None if args.state == "all" else args.state
    now = time.time()
    _show(
        args,
        [approval_json(a, now) for a in await ctx.store.list_approvals(owner.id, state)],
        APPROVAL_COLUMNS,
    )
    return 0


async def _approvals_show(ctx: _Context, args: argparse.Namespace) -> int:
    from proxy.owners import approval_json

    owner = await ctx.service.owner_named(args.owner)
    approval = await ctx.store.get_approval(owner.id, args.id)
    if approval is None:
        print(f"paysentry: no approval {args.id!r}", file=sys.stderr)
        return 1
    _show(args, approval_json(approval, time.time()))
    return 0


async def _approvals_decide(ctx: _Context, args: argparse.Namespace) -> int:
    """The operator's vote on the host: counted as the owner's (``owner:<name>``, via ``cli``, the OS user
    and host in the audit log), so it decides holds that name no approvers and never stands in for an
    approver. An approver votes as themself: the console, or the owner API with their own token."""
    from proxy.owners import approval_json
    from proxy.principals import operator_principal

    if args.voter is not None:
        raise UsageError(
            "--as is gone: a vote counts for whoever authenticates. Approvers vote as themselves in the "
            "console or with their own token (POST /v1/approvals/ID/approve); this command votes as the owner"
        )
    owner = await ctx.service.owner_named(args.owner)
    principal = operator_principal(owner)
    result = await ctx.service.vote(
        owner.id,
        args.id,
        principal.voter,
        args.action == "approve",
        args.reason,
        "cli",
        principal.authenticated("cli"),
    )
    _show(args, approval_json(result.approval, time.time(), result.counted))
    return 0


async def _approver_create(ctx: _Context, args: argparse.Namespace) -> int:
    from proxy.owners import approver_json

    owner = await ctx.service.owner_named(args.owner)
    approver, token = await ctx.service.create_approver(owner.id, args.name, "cli")
    _show(args, {**approver_json(approver), "token": token, "note": "the token is shown once"})
    return 0


async def _approver_list(ctx: _Context, args: argparse.Namespace) -> int:
    from proxy.owners import approver_json

    owner = await ctx.service.owner_named(args.owner)
    _show(args, [approver_json(a) for a in await ctx.store.list_approvers(owner.id)], APPROVER_COLUMNS)
    return 0


async def _approver_revoke(ctx: _Context, args: argparse.Namespace) -> int:
    owner = await ctx.service.owner_named(args.owner)
    await ctx.service.revoke_approver(owner.id, args.id, "cli")
    print(f"revoked {args.id}")
    return 0


async def _policy_replay(ctx: _Context, args: argparse.Namespace) -> int:
    from proxy.policy.loader import load_policy_set
    from proxy.policy.replay import replay

    engine = _engines(args)[0]
    candidate = load_policy_set(args.dir, engine, operations=REGISTRY.operations)
    owner_id = (await ctx.service.owner_named(args.owner)).id if args.owner else None
    history = await ctx.store.history(parse_since(args.since, time.time()), owner_id)
    agents = {a.id: a for o in await ctx.store.list_owners() for a in await ctx.store.list_agents(o.id)}
    count, changes = replay(history, agents, candidate, engine)
    print(
        f"replayed {count} decisions since {args.since} under {candidate.revision} ({engine.name}): "
        f"{len(changes)} would change"
    )
    for change in changes:
        print("  " + change.describe())
    return 0


def parse_since(text: str, now: float) -> float:
    """``24h`` / ``7d`` back from ``now``, or an ISO 8601 time (``2026-11-22T00:00:00Z``)."""
    from datetime import UTC, datetime

    from proxy.durations import parse_duration

    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--since takes a duration (24h, 7d) or an ISO 8601 time, got {text!r}") from None
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()


async def _reconcile(ctx: _Context, args: argparse.Namespace) -> int:
    from proxy.upstream import AiohttpUpstream

    since = parse_since(args.since, time.time())
    owner_id = (await ctx.service.owner_named(args.owner)).id if args.owner or args.connection else None
    connection_id = None
    if args.connection:
        assert owner_id is not None
        found = await ctx.store.find_connection(owner_id, args.connection)
        if found is None:
            raise PaySentryError(f"no connection named {args.connection!r} for this owner")
        connection_id = found.id
    upstream = ctx.gateway.upstream
    if isinstance(upstream, AiohttpUpstream):
        await upstream.start()
    try:
        reports = await ctx.gateway.reconciler.run(since, owner_id, connection_id)
    finally:
        if isinstance(upstream, AiohttpUpstream):
            await upstream.close()
    if args.output == "json":
        _show(args, [r.to_json() for r in reports])
    else:
        for report in reports:
            print(_report_text(report))
    if not reports:
        print("paysentry: no connection to reconcile", file=sys.stderr)
    if any(r.drift for r in reports):
        return 5
    return 1 if any(r.errors for r in reports) else 0


def _report_text(report: Any) -> str:
    from datetime import UTC, datetime

    from proxy.currency import format_minor

    def when(at: float) -> str:
        return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    lines = [
        f"{report.name} ({report.provider}, {report.connection})  {when(report.since)} .. {when(report.until)}"
        f"  seen {report.seen}, matched {report.matched}, fixed {len(report.fixed)}, "
        f"unexplained {len(report.unexplained)}"
    ]
    for f in report.fixed:
        amount = format_minor(f.amount, f.currency) if f.currency else str(f.amount)
        lines.append(
            f"  fixed        {f.fix:<22} {f.ref:<28} {amount:>14}  {f.authorization} ({f.provider_status})"
        )
    for u in report.unexplained:
        amount = format_minor(u.amount, u.currency) if u.currency else str(u.amount)
        lines.append(f"  unexplained  {u.kind:<22} {u.ref:<28} {amount:>14}  {u.detail}")
    for error in report.errors:
        lines.append(f"  error: {error}")
    drift = ", ".join(format_minor(a, c) for c, a in sorted(report.drift.items()))
    lines.append(f"  drift: {drift or 'none'}")
    return "\n".join(lines)


_COMMANDS: dict[tuple[str, str], Callable[[_Context, argparse.Namespace], Awaitable[int]]] = {
    ("reconcile", ""): _reconcile,
    ("policy", "replay"): _policy_replay,
    ("keys", "rotate"): _keys_rotate,
    ("db", "migrate"): _db_migrate,
    ("owner", "create"): _owner_create,
    ("owner", "list"): _owner_list,
    ("provider", "add"): _provider_add,
    ("provider", "list"): _provider_list,
    ("provider", "remove"): _provider_remove,
    ("agent", "create"): _agent_create,
    ("agent", "list"): _agent_list,
    ("agent", "revoke"): _agent_revoke,
    ("approvals", "list"): _approvals_list,
    ("approvals", "show"): _approvals_show,
    ("approvals", "approve"): _approvals_decide,
    ("approvals", "deny"): _approvals_decide,
    ("approver", "create"): _approver_create,
    ("approver", "list"): _approver_list,
    ("approver", "revoke"): _approver_revoke,
}


# -- the same commands through the owner API (--api) -------------------------------------------------------
def _remote_agent_list(api: Any, args: argparse.Namespace) -> int:
    _show(args, api.list("/v1/agents"), AGENT_COLUMNS)
    return 0


def _remote_agent_create(api: Any, args: argparse.Namespace) -> int:
    body = {"name": args.name, "connection": args.connection, "labels": _pairs("--label", args.label)}
    _show(args, {**api.call("POST", "/v1/agents", body), "note": "the token is shown once"})
    return 0


def _remote_agent_revoke(api: Any, args: argparse.Namespace) -> int:
    api.call("POST", f"/v1/agents/{args.id}/revoke")
    print(f"revoked {args.id}")
    return 0


def _remote_approvals_list(api: Any, args: argparse.Namespace) -> int:
    _show(args, api.list("/v1/approvals", state=args.state), APPROVAL_COLUMNS)
    return 0


def _remote_approvals_show(api: Any, args: argparse.Namespace) -> int:
    _show(args, api.call("GET", f"/v1/approvals/{args.id}"))
    return 0


def _remote_approvals_decide(api: Any, args: argparse.Namespace) -> int:
    """Counted for whoever the token proves: the owner, or the approver whose psa_ token it is."""
    if args.voter is not None:
        raise UsageError("--as is gone: a vote counts for whoever authenticates (the token's identity)")
    _show(args, api.call("POST", f"/v1/approvals/{args.id}/{args.action}", {"reason": args.reason}))
    return 0


def _remote_approver_list(api: Any, args: argparse.Namespace) -> int:
    _show(args, api.list("/v1/approvers"), APPROVER_COLUMNS)
    return 0


def _remote_approver_create(api: Any, args: argparse.Namespace) -> int:
    made = api.call("POST", "/v1/approvers", {"name": args.name})
    _show(args, {**made, "note": "the token is shown once"})
    return 0


def _remote_approver_revoke(api: Any, args: argparse.Namespace) -> int:
    api.call("DELETE", f"/v1/approvers/{args.id}")
    print(f"revoked {args.id}")
    return 0


_REMOTE: dict[tuple[str, str], Callable[[Any, argparse.Namespace], int]] = {
    ("agent", "list"): _remote_agent_list,
    ("agent", "create"): _remote_agent_create,
    ("agent", "revoke"): _remote_agent_revoke,
    ("approvals", "list"): _remote_approvals_list,
    ("approvals", "show"): _remote_approvals_show,
    ("approvals", "approve"): _remote_approvals_decide,
    ("approvals", "deny"): _remote_approvals_decide,
    ("approver", "list"): _remote_approver_list,
    ("approver", "create"): _remote_approver_create,
    ("approver", "revoke"): _remote_approver_revoke,
}
