"""A sidecar on an empty volume with a declared state file serves at once, with the agent token from its
"Secret" (a file), through the official Stripe SDK; a rotated Secret and a policy change made the way a
Kubernetes volume update makes them (the ``..data`` symlink swapped) reach it without a restart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import MOCK_SECRET, POLICY, Deployment, free_port, wait_until

ROOT = Path(__file__).parents[2]


def kubernetes_volume(directory: Path, files: dict[str, str], generation: int) -> None:
    """Write ``files`` as the kubelet updates a ConfigMap or Secret volume: a new timestamped folder, the
    ``..data`` link swapped to it in one rename, each file a link through ``..data``."""
    directory.mkdir(exist_ok=True)
    fresh = directory / f"..2026_{generation}"
    fresh.mkdir()
    for name, text in files.items():
        (fresh / name).write_text(text)
    link = directory / f"..data_tmp{generation}"
    link.symlink_to(fresh.name)
    os.replace(link, directory / "..data")
    for name in files:
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(f"..data/{name}")


def new_token(agent_id: str = "", *flags: str) -> str:
    args = ["state", "token", *(["--id", agent_id] if agent_id else []), *flags]
    out = subprocess.run(
        [sys.executable, "-m", "proxy", *args], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return out.stdout.strip()


# the test policy, its hold decided by alice, a person the state file declares
ALICE_DECIDES = POLICY.replace("hold_expiry: 2s}", "hold_expiry: 10m, approval: {approvers: [alice]}}")


def state_file(mock_port: int, approvers: list[str]) -> str:
    listed = "".join(f"\n      - {{name: {a}, token: {{file: secret/{a}}}}}" for a in approvers)
    return textwrap.dedent(f"""
        owners:
          - name: acme
            connections:
              - name: default
                provider: mock
                upstream: http://127.0.0.1:{mock_port}
                credentials: {{secret_key: {{env: MOCK_SECRET_KEY}}}}
            agents:
              - name: bot
                labels: {{team: ads}}
                token: {{file: secret/token}}
        """) + (f"    approvers:{listed}\n" if approvers else "")


@pytest.fixture
def declared(tmp_path: Path) -> Any:
    agent_port, admin_port, mock_port = free_port(), free_port(), free_port()
    token = new_token()
    kubernetes_volume(tmp_path / "secret", {"token": token, "alice": new_token("", "--approver")}, 1)
    kubernetes_volume(tmp_path / "policies", {"test.yaml": textwrap.dedent(ALICE_DECIDES)}, 1)
    (tmp_path / "state.yaml").write_text(state_file(mock_port, approvers=["alice"]))
    volume = tmp_path / "empty-volume"
    volume.mkdir()
    config = tmp_path / "paysentry.yaml"
    config.write_text(
        textwrap.dedent(f"""
        listen: 127.0.0.1:{agent_port}
        admin_listen: 127.0.0.1:{admin_port}
        store: sqlite:///{volume / "paysentry.db"}
        policies: {tmp_path / "policies"}
        state_file: {tmp_path / "state.yaml"}
        mock_provider_listen: 127.0.0.1:{mock_port}
        bcrypt_rounds: 4
        policy_poll_interval: 0.2
        token_cache_ttl: 0.5
        """)
    )
    env = {
        **os.environ,
        "PAYSENTRY_ENCRYPTION_KEYS": "k1:" + __import__("base64").b64encode(os.urandom(32)).decode(),
        "PYTHONPATH": str(ROOT),
        "MOCK_SECRET_KEY": MOCK_SECRET,
    }
    env.pop("PAYSENTRY_CONFIG", None)
    dep = Deployment(
        tmp_path,
        config,
        env,
        f"http://127.0.0.1:{agent_port}",
        f"http://127.0.0.1:{admin_port}",
        f"http://127.0.0.1:{mock_port}",
        agent_token=token,
    )
    dep.start()
    yield dep
    dep.stop()


def pay(dep: Deployment, token: str, amount: int = 1500, key: str | None = None) -> Any:
    import stripe

    client = stripe.StripeClient(
        token, base_addresses={"api": dep.agent_url}, max_network_retries=0, http_client=None
    )
    options: Any = {"idempotency_key": key} if key else {}
    return client.v1.payment_intents.create(params={"amount": amount, "currency": "usd"}, options=options)


def test_an_empty_volume_serves_the_declared_agent_at_once(declared: Deployment) -> None:
    intent = pay(declared, declared.agent_token)  # the first call after "ready": nothing done by hand
    assert intent.id.startswith("pi_") and intent.amount == 1500
    assert len(declared.mock_payments()) == 1
    applied = [json.loads(line) for line in declared.output if "declared state applied" in line]
    assert applied and applied[0]["changes"] == [
        "owner acme/acme: created",
        "connection acme/default: created",
        "agent acme/bot: created",
        "approver acme/alice: created",
    ]
    assert declared.agent_token not in declared.logs() and MOCK_SECRET not in declared.logs()


def test_a_rotated_secret_takes_effect_without_a_restart(declared: Deployment) -> None:
    import stripe

    pay(declared, declared.agent_token)
    agent_id = "agt_" + declared.agent_token.split("_")[1]
    rotated = new_token(agent_id)
    alice = (declared.root / "secret" / "alice").read_text()
    kubernetes_volume(declared.root / "secret", {"token": rotated, "alice": alice}, 2)
    wait_until(lambda: "agent acme/bot: token_rotated" in declared.logs())
    assert pay(declared, rotated).id.startswith("pi_")

    def old_refused() -> bool:
        try:
            pay(declared, declared.agent_token)
        except stripe.AuthenticationError:
            return True
        return False

    wait_until(old_refused, timeout=5)


def test_a_policy_change_to_the_mounted_directory_reaches_the_running_sidecar(declared: Deployment) -> None:
    import stripe

    assert pay(declared, declared.agent_token, 4000).status
    stricter = POLICY.replace("max_amount: 20000", "max_amount: 3000")
    kubernetes_volume(declared.root / "policies", {"test.yaml": textwrap.dedent(stricter)}, 2)
    wait_until(lambda: "policy set reloaded" in declared.logs())
    with pytest.raises(stripe.CardError) as refused:
        pay(declared, declared.agent_token, 4000)
    assert refused.value.http_status == 402 and "per_payment_cap" in str(refused.value.json_body)
    assert declared.process is not None and declared.process.poll() is None  # the same process


def test_a_declared_approver_votes_with_the_token_from_its_secret_and_is_revoked_by_removal(
    declared: Deployment,
) -> None:
    """Alice exists only in the state file and her Secret: she signs in with that token, approves the hold
    that names her, the agent's retry goes through; taken out of the file, her token stops working."""
    import stripe

    alice = (declared.root / "secret" / "alice").read_text().strip()
    with pytest.raises(stripe.CardError) as held:
        pay(declared, declared.agent_token, 6000, key="order-1")
    assert held.value.code == "approval_required"
    status, pending = declared.owner_api("GET", "/v1/approvals", token=alice)
    assert status == 200 and len(pending["data"]) == 1 and pending["data"][0]["approvers"] == ["alice"]
    hold = pending["data"][0]["id"]
    status, voted = declared.owner_api("POST", f"/v1/approvals/{hold}/approve", {"reason": "ok"}, token=alice)
    assert status == 200, voted
    assert pay(declared, declared.agent_token, 6000, key="order-1").amount == 6000
    port = int(declared.mock_url.rsplit(":", 1)[1])
    (declared.root / "state.yaml").write_text(state_file(port, approvers=[]))
    wait_until(lambda: "approver acme/alice: revoked" in declared.logs())
    wait_until(lambda: declared.owner_api("GET", "/v1/approvals", token=alice)[0] == 401, timeout=5)
    assert alice not in declared.logs()
