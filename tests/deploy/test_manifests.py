"""The image and the Kubernetes manifests: every file the Dockerfile copies exists; every rendered manifest
validates against the Kubernetes schemas (offline, kubernetes-validate); the settings they set exist."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import fields
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from proxy.config import Settings
from proxy.metrics import HISTOGRAM, INSTRUMENTS
from tests.deploy.crds import SCHEMAS, validate_custom
from tests.deploy.kustomize import render

ROOT = Path(__file__).parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
KUBERNETES = "1.33.0"


def validate(obj: dict[str, Any]) -> None:
    """Kubernetes' own kinds against its schemas; the custom resources (cert-manager, Prometheus operator)
    against the structural schemas of tests/deploy/crds.py."""
    if obj["kind"] in SCHEMAS:
        validate_custom(obj)
    else:
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)


def test_every_file_the_dockerfile_copies_exists_and_it_runs_as_non_root() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    copies = re.findall(r"^COPY (?!--from)(.+)$", dockerfile, re.MULTILINE)
    assert copies
    for line in copies:
        *sources, _ = line.split()
        for source in sources:
            assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which is missing"
    assert re.search(r"^USER 10001", dockerfile, re.MULTILINE)
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.\d+\.\d+-slim-bookworm$", dockerfile, re.MULTILINE)
    assert re.findall(r"^FROM (\S+)", dockerfile, re.MULTILINE) == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]
    assert 'ENTRYPOINT ["paysentry", "serve"]' in dockerfile
    assert "org.opencontainers.image.version" in dockerfile


def test_overlays_exist() -> None:
    assert OVERLAYS == ["gateway", "sidecar"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_manifests_validate_against_the_kubernetes_schemas(overlay: str) -> None:
    objects = render(K8S / "overlays" / overlay)
    for obj in objects:
        validate(obj)
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "ConfigMap", "NetworkPolicy"} <= kinds
    if overlay == "gateway":
        assert {"Service", "PodDisruptionBudget", "Certificate"} <= kinds
    if shutil.which("kubectl"):  # where kubectl exists, the real kustomize renders the same objects
        out = subprocess.run(
            ["kubectl", "kustomize", str(K8S / "overlays" / overlay)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        real = [d for d in yaml.safe_load_all(out) if d]
        for obj in real:
            validate(obj)
        assert sorted((o["kind"], _base_name(o)) for o in real) == sorted(
            (o["kind"], _base_name(o)) for o in objects
        )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_paysentry_container_is_locked_down_and_probed(overlay: str) -> None:
    objects = render(K8S / "overlays" / overlay)
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = next(c for c in pod.get("initContainers", []) + pod["containers"] if c["name"] == "paysentry")
    assert container["image"].startswith("ghcr.io/paysentry/paysentry:")
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["terminationGracePeriodSeconds"] > 30  # longer than the default upstream_timeout
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/etc/paysentry/policies"]["readOnly"] is True
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env["PAYSENTRY_ENCRYPTION_KEYS"]["valueFrom"]


def test_every_setting_the_manifests_set_is_a_real_setting() -> None:
    known = {f"PAYSENTRY_{f.name.upper()}" for f in fields(Settings)} | {
        "PAYSENTRY_CONFIG",
        "PAYSENTRY_ENCRYPTION_KEYS",
    }
    for overlay in OVERLAYS:
        for obj in render(K8S / "overlays" / overlay):
            for name in _env_names(obj):
                if name.startswith("PAYSENTRY_"):
                    assert name in known, f"{overlay}: {name} is not a PaySentry setting"


def _env_names(obj: dict[str, Any]) -> set[str]:
    names = set(obj.get("data", {})) if obj["kind"] == "ConfigMap" else set()
    pod = obj.get("spec", {}).get("template", {}).get("spec", {})
    for container in pod.get("initContainers", []) + pod.get("containers", []):
        names |= {e["name"] for e in container.get("env", [])}
    return names


def _base_name(obj: dict[str, Any]) -> str:
    name = obj["metadata"]["name"]
    return re.sub(r"-[a-z0-9]{10}$", "", name) if obj["kind"] == "ConfigMap" else name


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """kubectl's kustomize where it exists (the real one), else this test's renderer."""
    if shutil.which("kubectl"):
        out = subprocess.run(
            ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, check=True
        ).stdout
        return [d for d in yaml.safe_load_all(out) if d]
    return render(directory)


def paysentry_pod(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = next(c for c in pod.get("initContainers", []) + pod["containers"] if c["name"] == "paysentry")
    return pod, container


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("renderer", [render, kustomize])
def test_policies_and_state_reach_running_pods_without_a_rollout(overlay: str, renderer: Any) -> None:
    """Unhashed ConfigMaps, mounted as whole directories (a subPath mount never receives an update), so
    an edit reaches the files PaySentry watches instead of rolling the pods; the settings stay hashed
    (environment variables are read at start: a change must roll)."""
    objects = renderer(K8S / "overlays" / overlay)
    names = {o["metadata"]["name"] for o in objects if o["kind"] == "ConfigMap"}
    assert {"paysentry-policies", "paysentry-state"} <= names
    assert any(re.fullmatch(r"paysentry-settings-[a-z0-9]{10}", n) for n in names)
    pod, container = paysentry_pod(objects)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    for path, config_map in (
        ("/etc/paysentry/policies", "paysentry-policies"),
        ("/etc/paysentry/state", "paysentry-state"),
    ):
        mount = mounts[path]
        assert "subPath" not in mount and mount["readOnly"] is True
        assert volumes[mount["name"]]["configMap"]["name"] == config_map
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PAYSENTRY_POLICIES"] == "/etc/paysentry/policies"
    assert env["PAYSENTRY_STATE_FILE"] == "/etc/paysentry/state/state.yaml"
    assert all("subPath" not in m for m in container["volumeMounts"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_declared_state_of_each_overlay_loads_from_what_the_pod_mounts(
    overlay: str, tmp_path: Path
) -> None:
    objects = render(K8S / "overlays" / overlay)
    assert_declared_state_loads(objects, tmp_path, approvers=overlay == "gateway")


def assert_declared_state_loads(
    objects: list[dict[str, Any]], tmp_path: Path, approvers: bool = True
) -> None:
    """The state file the manifests ship, read as the pod reads it: every file it names lies under a
    mount of the container, every variable it names is set from a Secret, and it loads."""
    from proxy.state import load_state
    from tests.integration.test_state import token

    _, container = paysentry_pod(objects)
    state_text = next(o for o in objects if o["metadata"]["name"] == "paysentry-state")["data"]["state.yaml"]
    mounts = [m["mountPath"] for m in container["volumeMounts"]]
    env = {e["name"]: e for e in container["env"]}
    files = re.findall(r"\{file: (/[^}]+)\}", state_text)
    variables = re.findall(r"\{env: ([A-Z_]+)\}", state_text)
    assert files
    for path in files:
        assert any(path.startswith(m + "/") for m in mounts), f"{path} is not in a mounted volume"
        local = tmp_path / path.lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        prefix, kind = (
            ("pso", "own") if "owner" in path else ("psa", "apv") if "approver" in path else ("psk", "agt")
        )
        local.write_text(token(f"{kind}_{os.urandom(8).hex()}").replace("psk", prefix, 1))
    for name in variables:
        assert "secretKeyRef" in env[name]["valueFrom"], f"{name} must come from a Secret"
    (tmp_path / "state.yaml").write_text(state_text.replace("{file: /", f"{{file: {tmp_path}/"))
    state, _ = load_state(str(tmp_path / "state.yaml"), {n: "sk_test_x" for n in variables})
    assert state.owners and state.owners[0].agents
    assert bool(state.owners[0].approvers) == approvers


def test_the_gateway_serves_tls_from_the_cert_manager_secret_and_probes_over_https() -> None:
    objects = render(K8S / "overlays" / "gateway")
    pod, container = paysentry_pod(objects)
    env = {e["name"]: e.get("value") for e in container["env"]}
    certificate = next(o for o in objects if o["kind"] == "Certificate")
    tls = next(v for v in pod["volumes"] if v["name"] == "tls")
    assert tls["secret"]["secretName"] == certificate["spec"]["secretName"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "tls")
    assert "subPath" not in mount  # cert-manager's renewals reach the directory
    for prefix in ("PAYSENTRY_", "PAYSENTRY_ADMIN_"):
        assert env[f"{prefix}TLS_CERT_FILE"] == f"{mount['mountPath']}/tls.crt"
        assert env[f"{prefix}TLS_KEY_FILE"] == f"{mount['mountPath']}/tls.key"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["scheme"] == "HTTPS"
    assert "PAYSENTRY_TLS_CERT_FILE" not in {
        e["name"] for e in paysentry_pod(render(K8S / "overlays" / "sidecar"))[1]["env"]
    }  # the sidecar's agent listener is on loopback only (README, Deploying)


def documented_metrics() -> set[str]:
    names = set(INSTRUMENTS)
    for name, (kind, _) in INSTRUMENTS.items():
        if kind == HISTOGRAM:
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


def metrics_in(expr: str) -> set[str]:
    return set(re.findall(r"\bpaysentry_[a-z_]+", expr))


def test_monitoring_validates_and_reads_only_documented_metrics() -> None:
    objects = render(K8S / "monitoring")
    for obj in objects:
        validate(obj)
    kinds = {o["kind"] for o in objects}
    assert {"ServiceMonitor", "PrometheusRule", "ConfigMap"} <= kinds
    known = documented_metrics()
    rules = [
        r for o in objects if o["kind"] == "PrometheusRule" for g in o["spec"]["groups"] for r in g["rules"]
    ]
    alerted = set()
    for rule in rules:
        used = metrics_in(rule["expr"])
        assert used and used <= known, f"{rule['alert']}: {used - known}"
        assert rule["expr"].count("(") == rule["expr"].count(")")
        alerted |= used
    # fail-closed refusals, store errors, reload failures, in-doubt payments, drift
    assert {
        "paysentry_store_errors_total",
        "paysentry_policy_reloads_total",
        "paysentry_state_applies_total",
        "paysentry_tls_reloads_total",
        "paysentry_authorizations_in_doubt",
        "paysentry_reconcile_drift",
    } <= alerted
    dashboard = json.loads((K8S / "monitoring" / "paysentry-dashboard.json").read_text())
    charted = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used = metrics_in(target["expr"])
            assert used and used <= known, f"{panel['title']}: {used - known}"
            charted |= used
    base = {re.sub(r"_(bucket|sum|count)$", "", m) for m in charted}
    assert base >= set(INSTRUMENTS), "a metric has no panel"
    readme = (ROOT / "README.md").read_text()
    for name in INSTRUMENTS:
        assert f"`{name}`" in readme, f"{name} is not in the README's metrics table"
    service = next(o for o in render(K8S / "overlays" / "gateway") if o["kind"] == "Service")
    monitor = next(o for o in objects if o["kind"] == "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}


def test_the_image_installs_exactly_the_locked_versions_ci_tested() -> None:
    """requirements.lock is the runtime closure of this virtualenv (make lock), the image installs it with
    --no-deps, and its base image is the Python version the tests run on."""
    import sys

    from tests.deploy.lock import lock_text

    assert (ROOT / "requirements.lock").read_text() == lock_text(), "requirements.lock is stale: make lock"
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "pip install --no-deps -r requirements.lock" in dockerfile and "pip check" in dockerfile
    python = ".".join(map(str, sys.version_info[:3]))
    assert f"ARG PYTHON_IMAGE=python:{python}-slim-bookworm" in dockerfile
