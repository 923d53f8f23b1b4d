"""The command line: `mlregfs --help` lists every command, each has its own --help."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mlregfs.cli import COMMANDS


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mlregfs", *args], capture_output=True, text=True, timeout=60
    )


def test_help_lists_every_command() -> None:
    r = _run("--help")
    assert r.returncode == 0
    listed = {line.split()[0] for line in r.stdout.splitlines() if line.startswith("    ")}
    assert listed >= set(COMMANDS)
    assert {"mount", "unmount", "serve", "admin", "status", "info", "warm", "recover"} <= listed


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_has_its_own_help(command: str) -> None:
    r = _run(command, "--help")
    assert r.returncode == 0, r.stderr
    assert f"usage: mlregfs {command}" in r.stdout


def test_unknown_command_and_none_fail_with_usage() -> None:
    for args in (("bogus",), ()):
        r = _run(*args)
        assert r.returncode == 2 and "usage: mlregfs" in r.stderr
    assert _run("--version").stdout.startswith("mlregfs ")
