"""The policy set in force, swapped atomically; a broken set never replaces a working one.

The directory is checked every ``interval`` seconds. A change (including the symlink swap a Kubernetes
ConfigMap update makes: ``..data`` pointing at a new timestamped folder) triggers a full load off the
event loop; only a set that passes every stage replaces the one in force, in one reference assignment,
so no request ever sees a half-loaded set. A failed load keeps the last good set serving and shows in the
logs, the ``paysentry_policy_reloads_total{result="error"}`` metric and the readiness details.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

from adapters import REGISTRY
from proxy.errors import PolicyError
from proxy.metrics import Metrics
from proxy.policy.engine import Engine
from proxy.policy.loader import load_policy_set, policy_files
from proxy.policy.model import PolicySet

log = logging.getLogger("paysentry.policy")


class PolicyHolder:
    def __init__(
        self,
        directory: str,
        engine: Engine,
        metrics: Metrics | None = None,
        *,
        operations: Sequence[str] = REGISTRY.operations,
    ) -> None:
        self.directory = Path(directory)
        self.engine = engine
        self.metrics = metrics or Metrics()
        self.operations = tuple(operations)
        self.current: PolicySet = load_policy_set(self.directory, engine, operations=self.operations)
        self.last_error: str | None = None
        self._fingerprint = self._stat()
        self._publish()

    def _stat(self) -> str:
        """Changes when any policy or test file changes, including a swap of the symlinks they go through."""
        parts = []
        try:
            for path in sorted(self.directory.glob("*.y*ml")):
                st = path.stat()
                parts.append(f"{path.resolve()}:{st.st_mtime_ns}:{st.st_size}")
        except OSError as exc:
            parts.append(f"error:{exc}")
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def changed(self) -> bool:
        fingerprint = self._stat()
        if fingerprint == self._fingerprint:
            return False
        self._fingerprint = fingerprint
        return True

    def swap(self, fresh: PolicySet | PolicyError) -> bool:
        """Put a freshly loaded set in force, or record why it could not be. True when the set changed."""
        if isinstance(fresh, PolicyError):
            self.last_error = fresh.message
            self.metrics.inc("paysentry_policy_reloads_total", result="error")
            log.error(
                "policy reload failed; keeping revision %s",
                self.current.revision,
                extra={"fields": {"problems": fresh.problems}},
            )
            return False
        self.last_error = None
        self.metrics.inc("paysentry_policy_reloads_total", result="ok")
        changed = fresh.revision != self.current.revision
        self.current = fresh  # one reference assignment
        self._publish()
        if changed:
            log.info("policy set reloaded", extra={"fields": {"revision": fresh.revision}})
        return changed

    def load(self) -> PolicySet | PolicyError:
        try:
            return load_policy_set(self.directory, self.engine, operations=self.operations)
        except PolicyError as exc:
            return exc

    def reload(self) -> bool:
        return self.swap(self.load())

    async def watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            if self.changed():
                self.swap(await asyncio.to_thread(self.load))

    def _publish(self) -> None:
        self.metrics.set("paysentry_policy_revision_info", 1, replace=True, revision=self.current.revision)


__all__ = ["PolicyHolder", "policy_files"]
