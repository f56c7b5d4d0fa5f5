"""The policy set in force, swapped atomically; a broken set never replaces a working one."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from pathlib import Path

from proxy.errors import PolicyError
from proxy.policy.engine import Engine
from proxy.policy.loader import load_policy_set, policy_files
from proxy.policy.model import PolicySet

log = logging.getLogger("paysentry.policy")


class PolicyHolder:
    def __init__(self, directory: str, engine: Engine) -> None:
        self.directory = Path(directory)
        self.engine = engine
        self.current: PolicySet = load_policy_set(self.directory, engine)
        self.last_error: str | None = None
        self._fingerprint = self._stat()

    def _stat(self) -> str:
        """Changes when any policy file changes, including the symlink swap of a ConfigMap update."""
        parts = []
        try:
            for path in policy_files(self.directory):
                st = path.stat()
                parts.append(f"{path.resolve()}:{st.st_mtime_ns}:{st.st_size}")
        except OSError as exc:
            parts.append(f"error:{exc}")
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def reload(self) -> bool:
        """Load the directory again; swap it in when valid. True when the set in force changed."""
        try:
            fresh = load_policy_set(self.directory, self.engine)
        except PolicyError as exc:
            self.last_error = exc.message
            log.error(
                "policy reload failed; keeping revision %s",
                self.current.revision,
                extra={"fields": {"problems": exc.problems}},
            )
            return False
        self.last_error = None
        changed = fresh.revision != self.current.revision
        self.current = fresh  # one reference assignment: no request ever sees a half-loaded set
        if changed:
            log.info("policy set reloaded", extra={"fields": {"revision": fresh.revision}})
        return changed

    async def watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            fingerprint = self._stat()
            if fingerprint != self._fingerprint:
                self._fingerprint = fingerprint
                self.reload()
