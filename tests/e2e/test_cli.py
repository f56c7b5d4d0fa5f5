"""The real `paysentry` command against a real store and a real sidecar: the ordinary mistakes end in one
line and a documented exit code (never a traceback), tables by default and -o json, provider list and
remove, and --api mode through the owner API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.e2e.conftest import Deployment, make_deployment


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    d = make_deployment(tmp_path_factory.mktemp("cli"))
    d.start()
    yield d
    d.stop()


def paysentry(
    d: Deployment, *args: str, env: dict[str, str] | None = None, stdin: str = ""
) -> tuple[int, str, str]:
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "--config", str(d.config), *args],
        input=stdin, capture_output=True, text=True, env={**d.env, **(env or {})}, timeout=60,
    )  # fmt: skip
    return done.returncode, done.stdout, done.stderr


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (("owner", "create", "acme"), 1, "already exists"),
        (("provider", "add", "--provider", "mock", "--credentials-file", "-"), 1, "already exists"),
        (("provider", "add", "--provider", "nope", "--credentials-file", "-"), 2, "invalid choice"),
        (("provider", "add", "--provider", "mock", "--name", "b", "--credentials-file", "/nonexistent"), 1, "No such file"),
        (("policy", "replay", "policies", "--since", "1week"), 2, "--since takes a duration"),
        (("provider", "remove", "nope"), 1, "no active provider connection"),
        (("approvals", "show", "apr_nope"), 1, "no approval"),
        (("approvals", "list", "--state", "weird"), 2, "invalid choice"),
        (("agent", "create", "bot"), 1, "already exists"),
        (("agent", "create", "x", "--label", "novalue"), 2, "KEY=VALUE"),
    ],
)  # fmt: skip
def test_ordinary_mistakes_are_one_line_and_an_exit_code(
    dep: Deployment, args: tuple[str, ...], code: int, says: str
) -> None:
    status, _, err = paysentry(dep, *args, stdin="sk_test_x")
    assert status == code and says in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.e2e
def test_bad_credentials_json_is_a_usage_error(dep: Deployment) -> None:
    status, _, err = paysentry(
        dep, "provider", "add", "--provider", "mock", "--name", "c", "--credentials-file", "-", stdin="{bad"
    )
    assert status == 2 and "not valid JSON" in err and "Traceback" not in err


@pytest.mark.e2e
def test_tables_by_default_json_on_request_iso_times_and_version(dep: Deployment) -> None:
    status, table, _ = paysentry(dep, "agent", "list")
    assert status == 0 and table.splitlines()[0].split()[:3] == ["ID", "NAME", "CONNECTION"]
    assert "bot" in table and "T" in table.splitlines()[1].split()[-2]  # created_at in ISO 8601
    status, out, _ = paysentry(dep, "agent", "list", "-o", "json")
    assert status == 0 and json.loads(out)[0]["created_at"].endswith("Z")
    status, out, _ = paysentry(dep, "--version")
    assert status == 0 and out.startswith("paysentry ")
    for sub in ("provider", "agent", "approvals", "approver", "policy", "owner"):
        status, out, _ = paysentry(dep, sub, "--help")
        assert status == 0 and "usage:" in out


@pytest.mark.e2e
def test_provider_list_and_remove(dep: Deployment) -> None:
    assert (
        paysentry(
            dep,
            "provider",
            "add",
            "--provider",
            "mock",
            "--name",
            "spare",
            "--credentials-file",
            "-",
            stdin="sk",
        )[0]
        == 0
    )
    listed = json.loads(paysentry(dep, "provider", "list", "-o", "json")[1])
    assert {c["name"] for c in listed} == {"default", "spare"} and "sk" not in json.dumps(listed)
    status, out, _ = paysentry(dep, "provider", "remove", "spare")
    assert status == 0 and "removed spare" in out
    assert [c["name"] for c in json.loads(paysentry(dep, "provider", "list", "-o", "json")[1])] == ["default"]


@pytest.mark.e2e
def test_a_closed_pipe_ends_quietly(dep: Deployment) -> None:
    shell = f"{sys.executable} -m proxy --config {dep.config} policy schema | head -c 1"
    done = subprocess.run(["sh", "-c", shell], capture_output=True, text=True, env=dep.env, timeout=60)
    assert done.returncode == 0 and "Traceback" not in done.stderr and "Broken" not in done.stderr


@pytest.mark.e2e
def test_api_mode_reads_and_votes_through_the_owner_api(dep: Deployment, tmp_path: os.PathLike[str]) -> None:
    env = {
        "PAYSENTRY_API": dep.admin_url,
        "PAYSENTRY_OWNER_TOKEN": dep.owner_token,
        "PAYSENTRY_CONFIG": "/nonexistent",
    }
    remote = subprocess.run(
        [sys.executable, "-m", "proxy", "-o", "json", "agent", "list"],
        capture_output=True, text=True, env={**dep.env, **env}, timeout=60,
    )  # fmt: skip
    assert remote.returncode == 0, remote.stderr  # no config file needed: the API answered
    assert [a["id"] for a in json.loads(remote.stdout)] == [dep.agent_id]
    status, out, err = paysentry(dep, "approver", "create", "carol", "-o", "json", env=env)
    assert status == 0 and json.loads(out)["token"].startswith("psa_"), err
    assert "carol" in paysentry(dep, "approver", "list", env=env)[1]
    status, out, err = paysentry(
        dep, "agent", "create", "remote-bot", "--label", "team=ops", "-o", "json", env=env
    )
    made = json.loads(out)
    assert status == 0 and made["token"].startswith("psk_") and made["labels"] == {"team": "ops"}, err
    assert paysentry(dep, "agent", "revoke", made["id"], env=env)[:2] == (0, f"revoked {made['id']}\n")
    status, _, err = paysentry(dep, "agent", "revoke", made["id"], env=env)
    assert status == 1 and "Traceback" not in err
    status, _, err = paysentry(dep, "agent", "revoke", "x/../../approvers/apv_1", env=env)
    assert status == 2 and "is not an id" in err
    status, _, err = paysentry(dep, "agent", "create", "third", "--owner", "beta", env=env)
    assert status == 2 and "--owner does not go with --api" in err
    revoked = [
        a
        for a in json.loads(paysentry(dep, "agent", "list", "-o", "json", env=env)[1])
        if a["id"] == made["id"]
    ]
    assert revoked and revoked[0]["revoked_at"]
    status, _, err = paysentry(dep, "approvals", "approve", "apr_nope", env=env)
    assert status == 1 and "no approval" in err
    status, _, err = paysentry(dep, "approvals", "list", env={**env, "PAYSENTRY_OWNER_TOKEN": "pso_x_y"})
    assert status == 1 and "Traceback" not in err
    status, _, err = paysentry(dep, "provider", "list", env=env)
    assert status == 2 and "--api serves" in err
    status, _, err = paysentry(dep, "agent", "list", env={**env, "PAYSENTRY_API": "http://127.0.0.1:9"})
    assert status == 6 and "cannot reach" in err
