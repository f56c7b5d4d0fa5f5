"""A small metrics registry with Prometheus text exposition (served at /metrics on the owner listener)."""

from __future__ import annotations

from collections import defaultdict

HELP = {
    "paysentry_decisions_total": ("counter", "Payment decisions by outcome and rule."),
    "paysentry_policy_reloads_total": ("counter", "Policy reload attempts by result (ok, error)."),
    "paysentry_policy_revision_info": ("gauge", "The policy revision in force (value 1)."),
    "paysentry_webhooks_total": ("counter", "Inbound provider webhooks by result (voided, recorded, ...)."),
}


class Metrics:
    def __init__(self) -> None:
        self._values: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        series = self._values[name]
        series[key] = series.get(key, 0.0) + amount

    def set(self, name: str, value: float, replace: bool = False, **labels: str) -> None:
        if replace:
            self._values[name] = {}
        self._values[name][tuple(sorted(labels.items()))] = value

    def value(self, name: str, **labels: str) -> float:
        return self._values.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> str:
        lines = []
        for name in sorted(self._values):
            kind, text = HELP.get(name, ("untyped", name))
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            for labels, value in sorted(self._values[name].items()):
                rendered = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
                lines.append(f"{name}{{{rendered}}} {value:g}" if rendered else f"{name} {value:g}")
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
