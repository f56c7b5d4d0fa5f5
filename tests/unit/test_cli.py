"""The command line: `--config` anywhere, and the commands the Makefile and README use parse."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from proxy.cli import _parser, hoist_config

ROOT = Path(__file__).parents[2]


def test_config_is_accepted_before_or_after_the_command() -> None:
    for argv in (
        ["--config", "a.yaml", "serve", "--demo"],
        ["serve", "--config", "a.yaml", "--demo"],
        ["serve", "--demo", "--config=a.yaml"],
    ):
        args = _parser().parse_args(hoist_config(argv))
        assert (args.command, args.demo, args.config) == ("serve", True, "a.yaml")
    args = _parser().parse_args(
        hoist_config(["agent", "create", "bot", "--config", "b.yaml", "--label", "t=1"])
    )
    assert (args.action, args.name, args.label, args.config) == ("create", "bot", ["t=1"], "b.yaml")


def test_the_makefile_run_command_parses() -> None:
    line = next(li for li in (ROOT / "Makefile").read_text().splitlines() if "/paysentry " in li)
    argv = shlex.split(re.sub(r"^.*?/paysentry ", "", line.strip()))
    args = _parser().parse_args(hoist_config(argv))
    assert args.command == "serve" and args.demo


def test_provider_add_takes_the_settings_its_adapters_describe() -> None:
    argv = [
        "provider",
        "add",
        "--provider",
        "mercadopago",
        "--setting",
        "currency=ARS",
        "--credentials-file",
        "-",
    ]
    args = _parser().parse_args(argv)
    assert (args.provider, args.setting) == ("mercadopago", ["currency=ARS"])
    shown = subprocess.run(
        [sys.executable, "-m", "proxy", "provider", "add", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "mercadopago: currency (required): the account's currency" in shown and "stripe: none" in shown
