"""Settings: one typed object, read from a YAML file and then from PAYSENTRY_* environment variables.

Every setting has an environment variable: the setting's name upper-cased with a PAYSENTRY_ prefix
(``listen`` -> ``PAYSENTRY_LISTEN``). Relative paths are resolved against the config file's folder. All
problems are reported at once, and the process refuses to start on any of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from proxy.durations import parse_duration
from proxy.errors import ConfigError
from proxy.policy.engine import ENGINES


@dataclass(frozen=True, slots=True)
class Settings:
    listen: str = "127.0.0.1:8080"  # the agents' listener
    admin_listen: str = "127.0.0.1:8081"  # the owner API and probes; never on the agents' listener
    store: str = "sqlite:///var/paysentry.db"
    sqlite_synchronous: str = "NORMAL"  # NORMAL or FULL (WAL mode)
    redis_url: str = (
        ""  # redis://host:6379/0: spend gate, shared rate limits, approval wake-ups (PostgreSQL only)
    )
    store_timeout: float = 5.0  # longest wait for a store connection or statement; then calls fail closed
    policies: str = "policies"
    engine: str = "cel-expr-python"
    encryption_key_file: str = "var/encryption.key"
    bcrypt_rounds: int = 12
    token_cache_ttl: float = 30.0
    upstream_timeout: float = 30.0
    shutdown_grace: float = 30.0  # on SIGTERM, how long calls in flight may take to finish
    reservation_lease: float = 120.0
    sweep_interval: float = 5.0
    reconcile_interval: float = 3600.0  # how often each replica reconciles with the providers (0: never)
    reconcile_window: float = 86400.0  # how far back each periodic reconciliation reads
    policy_poll_interval: float = 2.0  # how often the policy directory (and state, TLS files) is checked
    state_file: str = (
        ""  # declared owners, connections, agents (proxy/state.py); applied at start and on change
    )
    tls_cert_file: str = ""  # the agents' listener serves TLS with this certificate chain (PEM) ...
    tls_key_file: str = ""  # ... and this key; both reloaded when they change
    admin_tls_cert_file: str = ""  # the owner listener's, likewise
    admin_tls_key_file: str = ""
    max_body_bytes: int = 1024 * 1024
    max_header_bytes: int = 8190  # one header line
    max_headers: int = 64
    body_timeout: float = 10.0  # a client that sends its body slower than this is cut off
    header_timeout: float = 10.0  # a request head (line and headers) must arrive within this
    keepalive_timeout: float = 60.0  # an idle kept-alive connection is closed after this
    max_connections_per_client: int = 256  # per address; past it the oldest idle one is closed
    agent_rate_limit: int = 100  # requests per second per agent (0: off); each replica counts its own
    agent_rate_burst: int = 200
    webhook_tolerance: float = 300.0  # seconds an inbound webhook's signed timestamp may be off by
    card_authorization_deadline: float = 1.5  # a real-time card authorization declines after this
    notify_webhooks: str = ""  # comma-separated URLs that receive signed hold notifications
    notify_secret: str = ""  # HMAC key of PaySentry-Signature (a secret: set it from the environment)
    notify_give_up: float = 86400.0  # a notification not delivered by then (since the hold) is given up
    notify_retry_max: float = 600.0  # the longest wait between two attempts of one notification
    approval_retry_window: float = 3600.0  # an approved hold the agent has not retried by then expires
    public_url: str = ""  # base URL of the owner listener in approval links; default http://<admin_listen>
    metrics_token: str = ""  # bearer token /metrics requires when set (a secret: set it from the environment)
    metrics_agent_labels: bool = False  # spend gauges per agent (name and id); needs metrics_token
    mock_provider_listen: str = ""  # host:port to run the built-in mock provider in-process; "" = off
    log_level: str = "INFO"

    def summary(self) -> dict[str, Any]:
        """What the sidecar logs at start: every setting, secrets redacted (passwords in URLs too)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in SECRET_SETTINGS:
                value = "(set)" if value else ""
            elif f.name in URL_SETTINGS:
                value = redact_url(value)
            out[f.name] = value
        return out


def redact_url(url: str) -> str:
    """``scheme://user:password@host/...`` with the password replaced."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":(redacted)@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


SECRET_SETTINGS = frozenset({"notify_secret", "metrics_token"})
URL_SETTINGS = frozenset({"store", "redis_url"})
DEFAULTS = Settings()
_PATHS = {"policies", "encryption_key_file"}
_OPTIONAL_PATHS = {"state_file", "tls_cert_file", "tls_key_file", "admin_tls_cert_file", "admin_tls_key_file"}


def load_settings(path: str | None, environ: dict[str, str] | None = None) -> Settings:
    environ = dict(os.environ if environ is None else environ)
    raw: dict[str, Any] = {}
    problems: list[str] = []
    base = Path.cwd()
    if path:
        file = Path(path)
        base = file.resolve().parent
        try:
            loaded = yaml.safe_load(file.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError([f"{path}: {exc}"]) from None
        if not isinstance(loaded, dict):
            raise ConfigError([f"{path}: the config file must be a mapping of settings"])
        raw.update(loaded)
    known = {f.name: f for f in fields(Settings)}
    for name in raw:
        if name not in known:
            problems.append(f"{path}: unknown setting {name!r}")
    for name in known:
        env = environ.get(f"PAYSENTRY_{name.upper()}")
        if env is not None:
            raw[name] = env
    values: dict[str, Any] = {}
    for name, field in known.items():
        if name not in raw:
            continue
        try:
            values[name] = _convert(name, field.type, raw[name])
        except ValueError as exc:
            problems.append(f"{name}: {exc}")
    _validate(values, problems)
    if problems:
        raise ConfigError(problems)
    for name in _PATHS:
        if name in values:
            values[name] = str((base / values[name]).resolve())
        else:
            values[name] = str((base / getattr(DEFAULTS, name)).resolve())
    for name in _OPTIONAL_PATHS & {n for n, v in values.items() if v}:
        values[name] = str((base / values[name]).resolve())
    store = values.get("store", DEFAULTS.store)
    if store.startswith("sqlite:///") and not store.startswith("sqlite:////"):
        values["store"] = "sqlite:///" + str((base / store.removeprefix("sqlite:///")).resolve())
    return Settings(**values)


def _convert(name: str, kind: Any, value: Any) -> Any:
    if kind in (bool, "bool"):
        text = str(value).strip().lower()
        if text not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"expected true or false, got {value!r}")
        return text in ("true", "1", "yes")
    if kind in (float, "float"):  # every float setting is a duration: 30, "30s", "2m", "500ms"
        return parse_duration(value)
    if kind in (int, "int"):
        text = str(value).strip()
        if isinstance(value, bool) or not (text.isascii() and text.isdigit()) or len(text) > 18:
            raise ValueError(f"expected a whole number, got {value!r}")
        return int(text)
    if not isinstance(value, str | int | float):
        raise ValueError(f"expected a string, got {value!r}")
    return str(value)


def _validate(values: dict[str, Any], problems: list[str]) -> None:
    for name in ("listen", "admin_listen", "mock_provider_listen"):
        address = values.get(name)
        if address and not _is_address(address):
            problems.append(f"{name}: expected host:port, got {address!r}")
    if values.get("engine", DEFAULTS.engine) not in ENGINES:
        problems.append(f"engine: unknown CEL engine {values.get('engine')!r}; choose {', '.join(ENGINES)}")
    if values.get("sqlite_synchronous", "NORMAL") not in ("NORMAL", "FULL"):
        problems.append("sqlite_synchronous: NORMAL or FULL")
    if values.get("metrics_agent_labels") and not values.get("metrics_token"):
        problems.append(
            "metrics_agent_labels: needs metrics_token (agent names and ids are shown only to a scraper "
            "that authenticates)"
        )
    if values.get("max_connections_per_client", 1) < 1:
        problems.append("max_connections_per_client: at least 1")
    if values.get("header_timeout", 1.0) <= 0:
        problems.append("header_timeout: more than 0")
    rounds = values.get("bcrypt_rounds", DEFAULTS.bcrypt_rounds)
    if not 4 <= rounds <= 16:
        problems.append(f"bcrypt_rounds: between 4 and 16, got {rounds}")
    if not str(values.get("store", DEFAULTS.store)).startswith(
        ("sqlite:///", "postgresql://", "postgres://")
    ):
        problems.append(
            "store: expected sqlite:///path/to/file.db or postgresql://user:password@host:port/db"
        )
    if values.get("redis_url") and not str(values.get("store", DEFAULTS.store)).startswith("postgres"):
        problems.append("redis_url: Redis works beside a PostgreSQL store (store: postgresql://...)")
    if values.get("notify_webhooks") and not values.get("notify_secret"):
        problems.append(
            "notify_secret: required when notify_webhooks is set (receivers verify signatures with it)"
        )
    for url in filter(None, (u.strip() for u in str(values.get("notify_webhooks", "")).split(","))):
        if not url.startswith(("http://", "https://")):
            problems.append(f"notify_webhooks: {url!r} is not an http(s) URL")
    for prefix in ("", "admin_"):
        cert, key = values.get(f"{prefix}tls_cert_file"), values.get(f"{prefix}tls_key_file")
        if bool(cert) != bool(key):
            problems.append(f"{prefix}tls_cert_file and {prefix}tls_key_file: set both or neither")
    if values.get("listen", DEFAULTS.listen) == values.get("admin_listen", DEFAULTS.admin_listen):
        problems.append("admin_listen: the owner API must not share the agents' listener")


def _is_address(text: str) -> bool:
    host, _, port = text.rpartition(":")
    return bool(host) and port.isascii() and port.isdigit() and len(port) <= 5 and 0 < int(port) < 65536


def split_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)
