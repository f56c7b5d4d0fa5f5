"""The Helm chart, rendered by Helm's own engine (helm-python-sdk: Helm's Go SDK through ctypes, no
helm binary) and validated with the same schema checks as the kustomize output."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from proxy.config import Settings
from tests.deploy.test_manifests import K8S, assert_declared_state_loads, paysentry_pod, validate

CHART = Path(__file__).parents[2] / "deploy" / "helm" / "paysentry"
MONITORING = {
    "serviceMonitor": {"enabled": True},
    "prometheusRule": {"enabled": True},
    "dashboard": {"enabled": True},
}
# Settings the chart sets from its own structure (addresses, paths, the store) or from Secrets.
SET_ELSEWHERE = {
    "listen", "admin_listen", "store", "redis_url", "policies", "state_file", "encryption_key_file",
    "tls_cert_file", "tls_key_file", "admin_tls_cert_file", "admin_tls_key_file", "notify_secret",
    "metrics_token", "mock_provider_listen",
}  # fmt: skip


def chart(values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm.Chart.load(str(CHART)) as loaded:
        out = loaded.render(values, name="paysentry", namespace="payments")
    return [d for text in out.values() for d in yaml.safe_load_all(text) if d]


def test_the_chart_lints() -> None:
    report = helm.lint(str(CHART), strict=True)
    assert report["errors"] == [] and report["messages"] == []


@pytest.mark.parametrize("mode", ["gateway", "sidecar"])
def test_each_mode_renders_objects_that_validate(mode: str) -> None:
    objects = chart({"mode": mode, "monitoring": MONITORING})
    for obj in objects:
        validate(obj)
    kinds = {o["kind"] for o in objects}
    assert "Secret" not in kinds  # Secrets are referenced, never inlined
    assert {"Deployment", "ConfigMap", "PrometheusRule"} <= kinds
    pod, container = paysentry_pod(objects)
    if mode == "gateway":
        assert {"Service", "PodDisruptionBudget", "NetworkPolicy", "Certificate", "ServiceMonitor"} <= kinds
        assert container["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
        assert pod["initContainers"][0]["name"] == "migrate"
    else:
        assert "PersistentVolumeClaim" in kinds and "Service" not in kinds
        sidecar = next(c for c in pod["initContainers"] if c["name"] == "paysentry")
        assert sidecar["restartPolicy"] == "Always"
        env = {e["name"]: e.get("value") for e in sidecar["env"]}
        assert env["PAYSENTRY_LISTEN"] == "127.0.0.1:8080" and "PAYSENTRY_TLS_CERT_FILE" not in env
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    for e in container["env"]:
        if e["name"] in ("PAYSENTRY_ENCRYPTION_KEYS", "PAYSENTRY_STORE") and mode == "gateway":
            assert "secretKeyRef" in e["valueFrom"]


@pytest.mark.parametrize("mode", ["gateway", "sidecar"])
def test_the_example_declared_state_loads_from_what_the_pod_mounts(mode: str, tmp_path: Path) -> None:
    assert_declared_state_loads(chart({"mode": mode}), tmp_path)


def test_values_hold_every_setting_and_the_settings_configmap_names_real_ones() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    every = {f.name for f in fields(Settings)}
    assert set(values["settings"]) == every - SET_ELSEWHERE
    settings = next(o for o in chart({}) if o["metadata"]["name"] == "paysentry-settings")
    assert set(settings["data"]) == {f"PAYSENTRY_{n.upper()}" for n in values["settings"]}


def test_a_policy_or_state_edit_leaves_the_pod_template_alone_and_a_setting_rolls_it() -> None:
    def template(values: dict[str, Any]) -> Any:
        return next(o for o in chart(values) if o["kind"] == "Deployment")["spec"]["template"]

    base = template({})
    assert template({"policies": {"files": {"agents.yaml": "name: other\n"}}}) == base
    assert template({"state": {"content": "owners: []\n"}}) == base
    rolled = template({"settings": {"log_level": "DEBUG"}})
    assert (
        rolled["metadata"]["annotations"]["checksum/settings"]
        != base["metadata"]["annotations"]["checksum/settings"]
    )
    pod, container = paysentry_pod(chart({}))
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/etc/paysentry/policies"]["name"]]["configMap"]["name"] == "paysentry-policies"
    assert volumes[mounts["/etc/paysentry/state"]["name"]]["configMap"]["name"] == "paysentry-state"
    assert all("subPath" not in m for m in container["volumeMounts"])


def test_the_chart_ships_the_same_alerts_dashboard_and_example_policy_as_the_manifests() -> None:
    for chart_file, manifest in (
        ("files/prometheusrule.yaml", "monitoring/prometheusrule.yaml"),
        ("files/paysentry-dashboard.json", "monitoring/paysentry-dashboard.json"),
        ("files/policy-agents.yaml", "base/policies/agents.yaml"),
    ):
        assert (CHART / chart_file).read_text() == (K8S / manifest).read_text(), f"{chart_file} differs"
    objects = chart({"monitoring": MONITORING})
    rule = next(o for o in objects if o["kind"] == "PrometheusRule")
    shipped = yaml.safe_load((K8S / "monitoring" / "prometheusrule.yaml").read_text())
    assert rule["spec"] == shipped["spec"]  # the alerts' {{ $labels }} survive Helm untouched
    dashboard = next(o for o in objects if o["metadata"]["name"] == "paysentry-grafana-dashboard")
    assert json.loads(dashboard["data"]["paysentry-dashboard.json"])["uid"] == "paysentry"


def test_an_image_digest_pins_the_image() -> None:
    digest = "sha256:" + "a" * 64
    _, container = paysentry_pod(chart({"image": {"digest": digest}}))
    assert container["image"] == f"ghcr.io/paysentry/paysentry@{digest}"
