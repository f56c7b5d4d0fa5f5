"""Structural checks for the custom resources PaySentry ships (cert-manager's Certificate, the Prometheus
operator's ServiceMonitor and PrometheusRule), whose schemas kubernetes-validate does not carry: the
fields these manifests use, their types, and nothing unknown at the levels written here. Not the CRDs'
whole OpenAPI schemas (those are not available offline); kubectl apply --dry-run=server checks the rest."""

from __future__ import annotations

from typing import Any

import jsonschema

_STR = {"type": "string"}
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_META = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": _STR, "namespace": _STR, "labels": _LABELS, "annotations": _LABELS},
    "additionalProperties": False,
}


def _resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": _META,
            "spec": spec,
        },
        "additionalProperties": False,
    }


_SECRET_KEY = {
    "type": "object",
    "required": ["name", "key"],
    "properties": {"name": _STR, "key": _STR, "optional": {"type": "boolean"}},
    "additionalProperties": False,
}
_ENDPOINT = {
    "type": "object",
    "required": ["port"],
    "properties": {
        "port": _STR,
        "path": _STR,
        "scheme": {"enum": ["http", "https"]},
        "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
        "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
        "tlsConfig": {
            "type": "object",
            "properties": {
                "serverName": _STR,
                "insecureSkipVerify": {"type": "boolean"},
                "ca": {
                    "type": "object",
                    "properties": {"secret": _SECRET_KEY},
                    "additionalProperties": False,
                },
            },
            "additionalProperties": False,
        },
        "authorization": {
            "type": "object",
            "properties": {"type": _STR, "credentials": _SECRET_KEY},
            "additionalProperties": False,
        },
    },
    "additionalProperties": False,
}
_RULE = {
    "type": "object",
    "required": ["alert", "expr", "labels", "annotations"],
    "properties": {
        "alert": {"type": "string", "pattern": "^[A-Za-z][A-Za-z0-9]*$"},
        "expr": {"type": "string", "minLength": 1},
        "for": {"type": "string", "pattern": "^[0-9]+(s|m|h)$"},
        "labels": {"type": "object", "required": ["severity"], "additionalProperties": {"type": "string"}},
        "annotations": {
            "type": "object",
            "required": ["summary", "description"],
            "additionalProperties": _STR,
        },
    },
    "additionalProperties": False,
}
SCHEMAS = {
    "Certificate": _resource(
        "cert-manager.io/v1",
        "Certificate",
        {
            "type": "object",
            "required": ["secretName", "issuerRef", "dnsNames"],
            "properties": {
                "secretName": _STR,
                "duration": {"type": "string", "pattern": "^[0-9]+h$"},
                "renewBefore": {"type": "string", "pattern": "^[0-9]+h$"},
                "dnsNames": {"type": "array", "items": _STR, "minItems": 1},
                "privateKey": {
                    "type": "object",
                    "properties": {
                        "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                        "size": {"type": "integer"},
                        "rotationPolicy": {"enum": ["Never", "Always"]},
                    },
                    "additionalProperties": False,
                },
                "usages": {"type": "array", "items": _STR},
                "issuerRef": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": _STR,
                        "kind": {"enum": ["Issuer", "ClusterIssuer"]},
                        "group": _STR,
                    },
                    "additionalProperties": False,
                },
            },
            "additionalProperties": False,
        },
    ),
    "ServiceMonitor": _resource(
        "monitoring.coreos.com/v1",
        "ServiceMonitor",
        {
            "type": "object",
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {
                    "type": "object",
                    "properties": {"matchLabels": _LABELS},
                    "additionalProperties": False,
                },
                "endpoints": {"type": "array", "items": _ENDPOINT, "minItems": 1},
            },
            "additionalProperties": False,
        },
    ),
    "PrometheusRule": _resource(
        "monitoring.coreos.com/v1",
        "PrometheusRule",
        {
            "type": "object",
            "required": ["groups"],
            "properties": {
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "properties": {
                            "name": _STR,
                            "rules": {"type": "array", "items": _RULE, "minItems": 1},
                        },
                        "additionalProperties": False,
                    },
                }
            },
            "additionalProperties": False,
        },
    ),
}


def validate_custom(obj: dict[str, Any]) -> None:
    jsonschema.validate(obj, SCHEMAS[obj["kind"]])
