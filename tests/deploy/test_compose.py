"""deploy/compose.yaml without Docker: parsed, every reference checked (images built from files that
exist, mounted files, services depended on, settings that exist), and its PaySentry service's command
line run as compose would run it, against real PostgreSQL and Redis, paid through with the Stripe SDK."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from proxy.config import Settings
from tests.e2e.conftest import Deployment, free_port
from tests.servers import Redis

ROOT = Path(__file__).parents[2]
COMPOSE = ROOT / "deploy" / "compose.yaml"


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def expand(value: str) -> str:
    """``${NAME:-default}`` as compose expands it with NAME unset."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def test_every_reference_in_the_compose_file_resolves() -> None:
    services = compose()["services"]
    assert {"postgres", "redis", "migrate", "paysentry"} <= set(services)
    known = {f"PAYSENTRY_{f.name.upper()}" for f in fields(Settings)} | {
        "PAYSENTRY_ENCRYPTION_KEYS",
        "PAYSENTRY_AGENT_TOKEN",
    }
    for name, service in services.items():
        build = service.get("build")
        if build:
            context = (COMPOSE.parent / build["context"]).resolve()
            assert (context / build["dockerfile"]).exists(), f"{name}: no {build['dockerfile']}"
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on {dependency}, which is not a service"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), f"{name} mounts {source}, which is missing"
            else:
                assert source in compose()["volumes"]
        for variable in service.get("environment", {}):
            if variable.startswith("PAYSENTRY_"):
                assert variable in known, f"{name}: {variable} is not a PaySentry setting"
        image = service["image"]
        assert image == "paysentry:dev" or re.fullmatch(r"[a-z]+:\d+(\.\d+)+-alpine", image), image
    assert services["paysentry"]["image"] == services["migrate"]["image"]
    assert services["paysentry"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_the_paysentry_service_runs_against_postgres_and_redis_and_takes_a_payment(
    postgres_url: str, redis_server: Redis, tmp_path: Path
) -> None:
    import stripe

    services = compose()["services"]
    agent_port, admin_port = free_port(), free_port()
    hosts = {
        "postgres:5432": postgres_url.split("@")[1].split("/")[0],
        "redis:6379": f"127.0.0.1:{redis_server.port}",
    }
    database = postgres_url.rsplit("/", 1)[1]

    def environment(service: dict[str, Any]) -> dict[str, str]:
        env = {}
        for key, value in service["environment"].items():
            text = expand(str(value))
            for host, local in hosts.items():
                text = text.replace(host, local)
            env[key] = f"{text.rsplit('/', 1)[0]}/{database}" if key == "PAYSENTRY_STORE" else text
        return env

    mounts = dict(v.split(":")[1::-1] for v in services["paysentry"]["volumes"])  # container path -> source
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PAYSENTRY_CONFIG": "", **environment(services["migrate"])}
    migrate = subprocess.run(
        [sys.executable, "-m", "proxy", *services["migrate"]["command"]],
        env=env,
        capture_output=True,
        text=True,
    )
    assert migrate.returncode == 0, migrate.stderr
    serve_env = {**env, **environment(services["paysentry"])}
    state = serve_env["PAYSENTRY_STATE_FILE"]
    mock_port = free_port()  # the mock provider's fixed 12111 could be taken on a shared machine
    local_state = tmp_path / "state.yaml"
    local_state.write_text((COMPOSE.parent / mounts[state]).read_text().replace(":12111", f":{mock_port}"))
    serve_env |= {
        "PAYSENTRY_STATE_FILE": str(local_state),
        "PAYSENTRY_POLICIES": str(ROOT / "policies"),  # the image copies policies/*.yaml there
        "PAYSENTRY_LISTEN": f"127.0.0.1:{agent_port}",  # free ports in place of the published 8080/8081
        "PAYSENTRY_ADMIN_LISTEN": f"127.0.0.1:{admin_port}",
        "PAYSENTRY_MOCK_PROVIDER_LISTEN": serve_env["PAYSENTRY_MOCK_PROVIDER_LISTEN"].replace(
            "12111", str(mock_port)
        ),
    }
    assert serve_env["PAYSENTRY_REDIS_URL"].startswith("redis://127.0.0.1:")
    dep = Deployment(
        tmp_path, Path(""), serve_env, f"http://127.0.0.1:{agent_port}", f"http://127.0.0.1:{admin_port}", ""
    )
    dep.config = Path(os.devnull)
    dep.start()
    try:
        client = stripe.StripeClient(
            serve_env["PAYSENTRY_AGENT_TOKEN"], base_addresses={"api": dep.agent_url}, max_network_retries=0
        )
        intent = client.v1.payment_intents.create(params={"amount": 1500, "currency": "usd"})
        assert intent.id.startswith("pi_") and intent.amount == 1500
    finally:
        dep.stop()
    assert serve_env["PAYSENTRY_AGENT_TOKEN"] not in dep.logs()
