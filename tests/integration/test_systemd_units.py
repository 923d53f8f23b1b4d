"""The shipped systemd units load cleanly (`systemd-analyze verify`, offline: no running systemd).

systemd 252's verify checks only the first command of each Exec*= list, so the executables of
every Exec line are checked here as well.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "systemd"
INSTANCE = "mlregfs@mnt-models.service"  # = mlregfs@$(systemd-escape --path /mnt/models)


def systemd_tool(name: str) -> str:
    exe = shutil.which(name)
    assert exe, f"{name} missing: apt-get install systemd (.ci/setup should install it)"
    return exe


def analyze() -> str:
    return systemd_tool("systemd-analyze")


def verify(tmp_path: Path, *names: str) -> None:
    # verify reads units from the directory of the files it is given; a copy keeps the
    # template's instance name (which sets %i/%f) without touching the source tree
    args = [analyze(), "verify", "--man=no"]
    for name in names:
        src = UNITS / ("mlregfs@.service" if name == INSTANCE else name)
        shutil.copy(src, tmp_path / name)
        args.append(f"./{name}")
    r = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    ours = [
        line
        for line in (r.stdout + r.stderr).splitlines()
        if any(n in line for n in names) or str(tmp_path) in line
    ]
    # warnings ("Unknown key ...", "Failed to parse ...") keep exit status 0: fail on them too
    assert r.returncode == 0 and not ours, f"systemd-analyze verify:\n{r.stdout}{r.stderr}"


def exec_lines(unit: Path) -> list[str]:
    return [
        line.split("=", 1)[1]
        for line in unit.read_text().splitlines()
        if line.startswith(("ExecStart", "ExecStop", "ExecReload", "ExecCondition"))
    ]


def test_escaped_instance_name() -> None:
    r = subprocess.run(
        [systemd_tool("systemd-escape"), "--path", "--template=mlregfs@.service", "/mnt/models"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.stdout.strip() == INSTANCE, r.stderr


def test_service_template_instance_verifies(tmp_path: Path) -> None:
    verify(tmp_path, INSTANCE)


def test_mount_and_automount_verify(tmp_path: Path) -> None:
    verify(tmp_path, "mnt-models.mount", "mnt-models.automount")


def test_template_instance_as_systemd_sees_it(tmp_path: Path) -> None:
    """%i/%f of mlregfs@mnt-models.service expand to mnt-models and /mnt/models."""
    shutil.copy(UNITS / "mlregfs@.service", tmp_path / INSTANCE)
    r = subprocess.run(
        [analyze(), "verify", "--man=no", f"./{INSTANCE}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        # at debug level the manager dumps the loaded unit, with specifiers expanded
        env={"SYSTEMD_LOG_LEVEL": "debug", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )
    dump = r.stdout + r.stderr
    for expected in (
        "Command Line: /bin/fusermount3 -uz /mnt/models",
        'Command Line: /usr/bin/env mlregfs mount "\\${MLREGFS_SOURCE}" /mnt/models -f -o',
        "EnvironmentFile: /etc/mlregfs/mnt-models.env",
        "Type: notify",
        "NotifyAccess: main",
        "KillMode: mixed",
        "TimeoutStopSec: 6min",  # covers drain_timeout (5 min by default)
        "Restart: on-failure",
    ):
        assert expected in dump, f"{expected!r} not in the unit systemd loaded:\n{dump[-3000:]}"


@pytest.mark.parametrize("name", ["mlregfs@.service", "mnt-models.mount"])
def test_every_exec_line_names_an_executable(name: str) -> None:
    for cmd in exec_lines(UNITS / name):
        exe = cmd.lstrip("-@:+!").split()[0]
        assert Path(exe).is_absolute() and shutil.which(exe), f"{name}: {exe} is not executable"


def test_service_has_no_private_mount_namespace() -> None:
    """A private mount namespace would hide the FUSE mount from every other process."""
    text = (UNITS / "mlregfs@.service").read_text()
    settings = {line.split("=", 1)[0] for line in text.splitlines() if "=" in line[:40]}
    forbidden = {
        "PrivateTmp", "PrivateDevices", "PrivateMounts", "ProtectSystem", "ProtectHome",
        "ReadOnlyPaths", "ReadWritePaths", "InaccessiblePaths", "TemporaryFileSystem",
        "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
        "ProtectControlGroups", "ProtectProc", "RootDirectory", "BindPaths", "MountAPIVFS",
    }  # fmt: skip
    assert not settings & forbidden
    assert "DeviceAllow=/dev/fuse rw" in text
