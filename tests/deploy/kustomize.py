"""Render the kustomize subset deploy/k8s uses (resources, configMapGenerator with its disableNameSuffixHash
and labels options, labels, images), so the
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
    return _render(directory)[0]


def _render(directory: Path) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The objects of one kustomization, and the generated ConfigMaps' names (a base's too: an overlay's
    references to them are renamed as kustomize renames them)."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(spec) - SUPPORTED
    if unknown:
        raise ValueError(f"{directory}: kustomization fields this renderer does not know: {sorted(unknown)}")
    objects: list[dict[str, Any]] = []
    renamed: dict[str, str] = {}
    for entry in spec.get("resources", []):
        path = directory / entry
        if path.is_dir():
            children, names = _render(path)
            objects += children
            renamed |= names
        else:
            objects += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for generator in spec.get("configMapGenerator", []):
        data = dict(line.split("=", 1) for line in generator.get("literals", []))
        for name in generator.get("files", []):
            data[Path(name).name] = (directory / name).read_text()
        unknown = set(generator.get("options", {})) - {"disableNameSuffixHash", "labels"}
        if unknown:
            raise ValueError(f"{directory}: generator options this renderer does not know: {sorted(unknown)}")
        options = generator.get("options", {})
        suffix = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]
        name = generator["name"]
        renamed[name] = name if options.get("disableNameSuffixHash") else f"{name}-{suffix}"
        metadata: dict[str, Any] = {"name": renamed[name]}
        if options.get("labels"):
            metadata["labels"] = dict(options["labels"])
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})
    objects = [_rename_config_maps(o, renamed) for o in objects]
    for label in spec.get("labels", []):
        for o in objects:
            o.setdefault("metadata", {}).setdefault("labels", {}).update(label["pairs"])
    images = {i["name"]: f"{i.get('newName', i['name'])}:{i['newTag']}" for i in spec.get("images", [])}
    for o in objects:
        for container in _containers(o):
            container["image"] = images.get(container["image"], container["image"])
    return objects, renamed


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
