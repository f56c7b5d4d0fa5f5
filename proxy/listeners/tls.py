"""TLS for a listener, from a certificate chain and a key file, reloaded when they change.

cert-manager (or anyone) rotates the files in place, or by swapping the symlinks of a mounted Secret; the
files are checked every ``interval`` seconds (path, modification time and size, links resolved) and, on a
change, loaded into the live ``SSLContext``: connections already open keep the certificate they were
made with, every new handshake gets the new one. A pair that fails to load (a half-written rotation, a
key that does not match) keeps the old certificate serving and is tried again on the next change; at
start it stops the sidecar. TLS 1.2 is the floor. A plain-HTTP request to a TLS listener fails its
handshake: no HTTP answer is ever sent to it.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path

from proxy.errors import ConfigError
from proxy.metrics import Metrics

log = logging.getLogger("paysentry.tls")


class ReloadingTLS:
    def __init__(self, listener: str, cert_file: str, key_file: str, metrics: Metrics | None = None) -> None:
        self.listener, self.cert_file, self.key_file = listener, cert_file, key_file
        self.metrics = metrics or Metrics()
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._seen = self._stat()
        try:
            self.context.load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                [f"{listener} listener TLS: cannot load {cert_file} and {key_file}: {exc}"]
            ) from None

    def _stat(self) -> tuple[tuple[str, int, int], ...]:
        seen = []
        for name in (self.cert_file, self.key_file):
            path = Path(name)
            try:
                st = path.stat()
                seen.append((str(path.resolve()), st.st_mtime_ns, st.st_size))
            except OSError:
                seen.append((name, -1, -1))
        return tuple(seen)

    def reload_if_changed(self) -> bool:
        """Load the files into the live context if they changed; True when a new certificate is in force."""
        seen = self._stat()
        if seen == self._seen:
            return False
        self._seen = seen
        try:  # a scratch context first: a failed load must not leave the live one half-changed
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(self.cert_file, self.key_file)
            self.context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            self.metrics.inc("paysentry_tls_reloads_total", listener=self.listener, result="error")
            log.error(
                "TLS certificate reload failed; keeping the one in force",
                extra={"fields": {"listener": self.listener, "error": str(exc)}},
            )
            return False
        self.metrics.inc("paysentry_tls_reloads_total", listener=self.listener, result="ok")
        log.info("TLS certificate reloaded", extra={"fields": {"listener": self.listener}})
        return True

    async def watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.reload_if_changed()
