"""The command line: `--config` anywhere, and the commands the Makefile and README use parse."""

from __future__ import annotations

import argparse
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


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(found[0].choices) if found else {}


def test_the_readme_command_list_is_the_parser() -> None:
    """Every command and flag the README's command list shows exists, and every command is in it."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Command line\n\n```\n", 1)[1].split("```", 1)[0]
    commands = _subcommands(_parser())
    documented = set()
    for line in block.splitlines():
        spec = re.split(r"\s{2,}", line.removeprefix("paysentry "))[0]
        command = spec.split()[0]
        assert command in commands, f"README: no command {command!r}"
        actions = _subcommands(commands[command])
        for segment in spec.split(" | "):
            words = segment.split()
            words = words[1:] if words[0] == command else words
            target = commands[command]
            if actions:
                assert words[0] in actions, f"README: no {command} {words[0]!r}"
                target = actions[words[0]]
                documented.add((command, words[0]))
            else:
                documented.add((command, ""))
            known = {o for a in target._actions for o in a.option_strings}
            for flag in re.findall(r"--[a-z0-9-]+", segment):
                assert flag in known, f"README: {command} {words[0]} has no {flag}"
    expected = {
        (name, action) for name, sub in commands.items() for action in (_subcommands(sub) or {"": None})
    }
    assert expected - documented == set(), "commands the README's list leaves out"
