"""Settings: file, environment overrides, durations, and every problem reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import load_settings
from proxy.errors import ConfigError


def test_every_duration_setting_accepts_units_from_file_or_environment(tmp_path: Path) -> None:
    config = tmp_path / "paysentry.yaml"
    config.write_text("body_timeout: 1s\nupstream_timeout: 500ms\nwebhook_tolerance: 5m\n")
    settings = load_settings(
        str(config), {"PAYSENTRY_TOKEN_CACHE_TTL": "2m", "PAYSENTRY_SWEEP_INTERVAL": "3"}
    )
    assert (settings.body_timeout, settings.upstream_timeout, settings.webhook_tolerance) == (1.0, 0.5, 300.0)
    assert (settings.token_cache_ttl, settings.sweep_interval) == (120.0, 3.0)


def test_problems_are_listed_together(tmp_path: Path) -> None:
    config = tmp_path / "paysentry.yaml"
    config.write_text("body_timeout: soon\nmax_headers: many\nlisten: nowhere\nspeed: 11\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(str(config), {})
    message = caught.value.message
    for expected in ("body_timeout", "max_headers", "listen", "unknown setting 'speed'"):
        assert expected in message


def test_every_setting_is_in_the_readme_table_with_its_environment_variable() -> None:
    from dataclasses import fields

    from proxy.config import Settings

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    for f in fields(Settings):
        assert f"| `{f.name}` | `PAYSENTRY_{f.name.upper()}` |" in readme, f"{f.name} is not documented"


def test_passwords_in_store_urls_are_redacted_in_the_start_up_summary(tmp_path: Path) -> None:
    settings = load_settings(
        None,
        {
            "PAYSENTRY_STORE": "postgresql://paysentry:s3cret-pw@db:5432/paysentry",
            "PAYSENTRY_REDIS_URL": "redis://:r3dis-pw@cache:6379/0",
        },
    )
    summary = repr(settings.summary())
    assert "s3cret-pw" not in summary and "r3dis-pw" not in summary
    assert "postgresql://paysentry:(redacted)@db:5432/paysentry" in summary


def test_tls_files_come_in_pairs_and_are_resolved_against_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "paysentry.yaml"
    config.write_text("tls_cert_file: tls/a.crt\nadmin_tls_key_file: tls/a.key\nstate_file: state.yaml\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(str(config), {})
    assert "tls_cert_file and tls_key_file: set both or neither" in caught.value.message
    assert "admin_tls_cert_file and admin_tls_key_file: set both or neither" in caught.value.message
    config.write_text("tls_cert_file: tls/a.crt\ntls_key_file: tls/a.key\nstate_file: state.yaml\n")
    settings = load_settings(str(config), {})
    assert settings.tls_cert_file == str(tmp_path / "tls" / "a.crt")
    assert settings.state_file == str(tmp_path / "state.yaml") and settings.admin_tls_cert_file == ""
