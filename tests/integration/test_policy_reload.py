"""Safe reload on real files: a ConfigMap-style symlink swap, a broken update, a good one."""

from __future__ import annotations

import os
from pathlib import Path

from proxy.metrics import Metrics
from proxy.policy.engine import CelExprEngine
from proxy.policy.reload import PolicyHolder

V1 = "name: p\nrules:\n  - {name: v1_rule, effect: deny, when: payment.amount > 100}\n"
V2 = "name: p\nrules:\n  - {name: v2_rule, effect: deny, when: payment.amount > 200}\n"
BROKEN = "name: p\nrules:\n  - {name: v3_rule, effect: deny, when: paymnet.amount > 1}\n"


def configmap(root: Path, version: str, text: str) -> None:
    """Write the files the way the kubelet updates a mounted ConfigMap: new folder, swap ..data."""
    folder = root / f"..{version}"
    folder.mkdir()
    (folder / "policy.yaml").write_text(text)
    tmp = root / "..data_tmp"
    tmp.symlink_to(folder.name)
    os.replace(tmp, root / "..data")
    if not (root / "policy.yaml").is_symlink():
        (root / "policy.yaml").symlink_to("..data/policy.yaml")


def rule_names(holder: PolicyHolder) -> list[str]:
    return [r.name for p in holder.current.policies for r in p.rules]


def test_configmap_swaps_are_seen_and_broken_sets_never_replace_good_ones(tmp_path: Path) -> None:
    configmap(tmp_path, "2026_11_22_1", V1)
    metrics = Metrics()
    holder = PolicyHolder(str(tmp_path), CelExprEngine(), metrics)
    first = holder.current
    assert rule_names(holder) == ["v1_rule"]
    assert not holder.changed()

    configmap(tmp_path, "2026_11_22_2", BROKEN)
    assert holder.changed()
    assert not holder.reload()
    assert holder.current is first  # the last good set keeps serving
    assert "undeclared reference to 'paymnet.amount'" in (holder.last_error or "")
    assert metrics.value("paysentry_policy_reloads_total", result="error") == 1
    assert f'revision="{first.revision}"' in metrics.render()

    configmap(tmp_path, "2026_11_22_3", V2)
    assert holder.changed()
    assert holder.reload()
    assert rule_names(holder) == ["v2_rule"]
    assert holder.last_error is None
    assert holder.current.revision != first.revision
    assert metrics.value("paysentry_policy_reloads_total", result="ok") == 1


def test_reloads_check_limits_against_the_operations_the_holder_was_given(tmp_path: Path) -> None:
    limit = "limits:\n  - {name: d, window: day, currency: usd, max_amount: 1, operations: [%s]}\n"
    (tmp_path / "policy.yaml").write_text(limit % "pay")
    holder = PolicyHolder(str(tmp_path), CelExprEngine(), Metrics(), operations=("pay", "refund"))
    (tmp_path / "policy.yaml").write_text(limit % "charge")
    assert not holder.reload() and "must be one of pay, refund, not 'charge'" in (holder.last_error or "")
    (tmp_path / "policy.yaml").write_text(limit % "refund")
    assert holder.reload() and holder.last_error is None
