"""The image and the Kubernetes manifests: every file the Dockerfile copies exists; every rendered manifest
validates against the Kubernetes schemas (offline, kubernetes-validate); the settings they set exist."""

from __future__ import annotations

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
from tests.deploy.kustomize import render

ROOT = Path(__file__).parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
KUBERNETES = "1.33.0"


def test_every_file_the_dockerfile_copies_exists_and_it_runs_as_non_root() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    copies = re.findall(r"^COPY (?!--from)(.+)$", dockerfile, re.MULTILINE)
    assert copies
    for line in copies:
        *sources, _ = line.split()
        for source in sources:
            assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which is missing"
    assert re.search(r"^USER 10001", dockerfile, re.MULTILINE)
    assert re.search(r"^FROM python:\$\{PYTHON_VERSION\}-slim$", dockerfile, re.MULTILINE)
    assert 'ENTRYPOINT ["paysentry", "serve"]' in dockerfile
    assert "org.opencontainers.image.version" in dockerfile


def test_overlays_exist() -> None:
    assert OVERLAYS == ["gateway", "sidecar"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_manifests_validate_against_the_kubernetes_schemas(overlay: str) -> None:
    objects = render(K8S / "overlays" / overlay)
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "ConfigMap", "NetworkPolicy"} <= kinds
    if overlay == "gateway":
        assert {"Service", "PodDisruptionBudget"} <= kinds
    if shutil.which("kubectl"):  # where kubectl exists, the real kustomize renders the same objects
        out = subprocess.run(
            ["kubectl", "kustomize", str(K8S / "overlays" / overlay)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        real = [d for d in yaml.safe_load_all(out) if d]
        for obj in real:
            kubernetes_validate.validate(obj, KUBERNETES, strict=True)
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
