"""Real PostgreSQL and Redis servers for the tests: started on loopback ports in temporary folders from the
Debian packages (`make test` installs them), stopped at the end. Never skipped: a missing binary fails."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


def _listening_ports() -> range:
    """Ports outside the kernel's ephemeral range (Linux: 32768-60999), which no outgoing connection takes."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    if low - 10000 >= 4096:
        return range(10000, low)
    return range(high + 1, 65536) if 65535 - high >= 4096 else range(10000, 65536)


_PORTS = _listening_ports()
_next_port = [_PORTS.start + os.getpid() * 37 % len(_PORTS)]


def free_port() -> int:
    """A loopback port nothing listens on, from below the ephemeral range. A port the kernel handed out by
    binding port 0 can be taken as the source port of any outgoing connection (a sidecar's to its store,
    a client's 1,500 sockets) before the process that was meant to listen on it binds it."""
    for _ in range(len(_PORTS)):
        port = _next_port[0]
        _next_port[0] = _PORTS.start + (port + 1 - _PORTS.start) % len(_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port below the ephemeral range")


def wait_for_port(port: int, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not start listening on 127.0.0.1:{port}")


def _postgres_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name) or ""]
    if not found[-1]:
        raise RuntimeError(f"PostgreSQL's {name} is not installed: run `make test` (installs postgresql)")
    return found[-1]


@dataclass
class Postgres:
    root: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"postgresql://paysentry@127.0.0.1:{self.port}/paysentry"

    def _as_postgres(self, *command: str) -> list[str]:
        # PostgreSQL refuses to run as root: use the package's postgres user then.
        return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else list(command)

    def start(self) -> Postgres:
        data = self.root / "data"
        if not data.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:
                shutil.chown(self.root, "postgres", "postgres")
            subprocess.run(
                self._as_postgres(
                    _postgres_bin("initdb"), "-D", str(data), "-U", "paysentry", "--auth=trust", "-E", "UTF8"
                ),
                check=True,
                capture_output=True,
            )
        self.process = subprocess.Popen(
            self._as_postgres(
                _postgres_bin("postgres"),
                "-D",
                str(data),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-k",
                str(self.root),
                "-c",
                "fsync=off",
                "-c",
                "max_connections=200",
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, "PostgreSQL")
        for _ in range(100):  # the port opens slightly before connections are accepted
            if self.psql("SELECT 1").returncode == 0:
                break
            time.sleep(0.1)
        return self

    def psql(self, sql: str) -> subprocess.CompletedProcess[bytes]:
        command = [shutil.which("psql") or "psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "paysentry"]
        return subprocess.run([*command, "-d", "postgres", "-c", sql], capture_output=True)

    def create_database(self, name: str) -> str:
        self.psql(f'CREATE DATABASE "{name}"').check_returncode()
        return f"postgresql://paysentry@127.0.0.1:{self.port}/{name}"

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: disconnect clients; ``immediate``: like a crash)."""
        if self.process is None:
            return
        subprocess.run(
            self._as_postgres(
                _postgres_bin("pg_ctl"), "stop", "-D", str(self.root / "data"), "-m", mode, "-w"
            ),
            capture_output=True,
            timeout=60,
        )
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


@dataclass
class Redis:
    root: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Redis:
        binary = shutil.which("redis-server")
        if not binary:
            raise RuntimeError("redis-server is not installed: run `make test` (installs redis-server)")
        self.root.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--dir",
                str(self.root),
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, "Redis")
        return self

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        self.process.wait(timeout=10)
        self.process = None
