"""Render the kustomize subset deploy/k8s uses (resources, configMapGenerator, labels, images), so the
manifests are validated on machines without kubectl; where kubectl exists its rendering is compared."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "configMapGenerator", "labels", "images"}


def render(directory: Path) -> list[dict[str, Any]]:
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(spec) - SUPPORTED
    if unknown:
        raise ValueError(f"{directory}: kustomization fields this renderer does not know: {sorted(unknown)}")
    objects: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        path = directory / entry
        objects += render(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    renamed: dict[str, str] = {}
    for generator in spec.get("configMapGenerator", []):
        data = dict(line.split("=", 1) for line in generator.get("literals", []))
        for name in generator.get("files", []):
            data[Path(name).name] = (directory / name).read_text()
        suffix = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]
        renamed[generator["name"]] = f"{generator['name']}-{suffix}"
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": renamed[generator["name"]]},
                "data": data,
            }
        )
    objects = [_rename_config_maps(o, renamed) for o in objects]
    for label in spec.get("labels", []):
        for o in objects:
            o.setdefault("metadata", {}).setdefault("labels", {}).update(label["pairs"])
    images = {i["name"]: f"{i.get('newName', i['name'])}:{i['newTag']}" for i in spec.get("images", [])}
    for o in objects:
        for container in _containers(o):
            container["image"] = images.get(container["image"], container["image"])
    return objects


def _rename_config_maps(obj: dict[str, Any], renamed: dict[str, str]) -> dict[str, Any]:
    obj = copy.deepcopy(obj)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key in ("configMap", "configMapRef", "configMapKeyRef"):
                ref = node.get(key)
                if isinstance(ref, dict) and ref.get("name") in renamed:
                    ref["name"] = renamed[ref["name"]]
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(obj)
    return obj


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    pod = obj.get("spec", {}).get("template", {}).get("spec", {})
    return [*pod.get("initContainers", []), *pod.get("containers", [])]
