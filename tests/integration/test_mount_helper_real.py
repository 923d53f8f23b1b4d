"""mount(8) -> /sbin/mount.mlregfs -> `mlregfs mount`: real mounts as fstab and systemd do them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import World
from tests.integration.helpers import clean_env, unmount

HELPER = Path("/sbin/mount.mlregfs")


@pytest.fixture(scope="module")
def helper() -> Iterator[Path]:
    """/sbin/mount.mlregfs; a wrapper around this venv's python is installed if absent."""
    assert os.geteuid() == 0, "mount(8) helper tests run as root (mount -t needs it)"
    created = False
    if not os.path.lexists(HELPER):
        # a wrapper, not a symlink to the console script: that may not be installed in CI
        HELPER.write_text(f'#!/bin/sh\nexec {sys.executable} -P -m mlregfs.mount_helper "$@"\n')
        HELPER.chmod(0o755)
        created = True
    try:
        yield HELPER
    finally:
        if created:
            HELPER.unlink()


def daemon_pids(mnt: Path) -> list[int]:
    """Processes running `mlregfs mount ... MNT`."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"mlregfs" in argv and b"mount" in argv and str(mnt).encode() in argv:
            pids.append(int(entry))
    return pids


def wait_gone(mnt: Path, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while daemon_pids(mnt):
        assert time.monotonic() < deadline, f"daemon still running after umount {mnt}"
        time.sleep(0.1)


def mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["mount", *args], env=clean_env(), capture_output=True, text=True, timeout=90
    )


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    unmount(path)  # never leave a mount behind, whatever the test did


def test_mount_t_mlregfs(helper: Path, world: World, mnt: Path, tmp_path: Path) -> None:
    """`mount -t mlregfs SOURCE MNT -o ...` returns once mounted; `umount` ends the daemon."""
    cache = tmp_path / "cache"
    r = mount("-t", "mlregfs", world.public, str(mnt), "-o", f"_netdev,nofail,ro,cache_dir={cache}")
    assert r.returncode == 0, r.stderr + r.stdout
    assert os.path.ismount(mnt)  # no polling: the helper returns when the mount answers
    assert (mnt / "models/pub-model/1.0.0/hello.txt").read_bytes() == b"hello, world\n"
    pids = daemon_pids(mnt)
    assert len(pids) == 1
    # the daemon runs from "/" (it must not keep the caller's directory busy)
    assert os.readlink(f"/proc/{pids[0]}/cwd") == "/"
    fstype = next(line.split()[2] for line in open("/proc/mounts") if line.split()[1] == str(mnt))
    assert fstype.startswith("fuse")
    with pytest.raises(OSError):  # ro was passed through
        (mnt / "models/pub-model/1.0.0/new.txt").write_bytes(b"x")
    r = subprocess.run(["umount", str(mnt)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert not os.path.ismount(mnt)
    wait_gone(mnt)


def test_fstab_line_with_token_file(helper: Path, world: World, mnt: Path, tmp_path: Path) -> None:
    """An fstab line (`mount -T FSTAB MNT`) with token_file: the token never reaches argv."""
    token = world.tokens["reporter"]
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    fstab = tmp_path / "fstab"
    opts = f"_netdev,nofail,x-systemd.automount,token_file={token_file},cache_dir={tmp_path / 'c'}"
    fstab.write_text(f"# test fstab\n{world.private} {mnt} mlregfs {opts} 0 0\n")
    r = mount("-T", str(fstab), str(mnt))
    assert r.returncode == 0, r.stderr + r.stdout
    try:
        assert (mnt / "models/llama/1.0.0/config.json").read_bytes() == world.files[
            "models/llama/1.0.0/config.json"
        ]
        (pid,) = daemon_pids(mnt)
        assert token.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30)
    assert not os.path.ismount(mnt)
    wait_gone(mnt)
    # libmount records x-* options in utab; umount must have removed the entry again
    utab = Path("/run/mount/utab")
    assert not utab.exists() or f"TARGET={mnt} " not in utab.read_text()


def test_mount_failure_is_reported(helper: Path, world: World, mnt: Path, tmp_path: Path) -> None:
    """A project that does not exist: mount(8) fails with mlregfs's message, nothing mounted."""
    missing = f"{world.url}/acme/no-such-project"
    r = mount("-t", "mlregfs", missing, str(mnt), "-o", f"cache_dir={tmp_path / 'c'}")
    assert r.returncode != 0
    assert "mlregfs mount:" in r.stderr
    assert not os.path.ismount(mnt)
    wait_gone(mnt)


def test_token_option_is_refused(helper: Path, world: World, mnt: Path) -> None:
    r = mount("-t", "mlregfs", world.public, str(mnt), "-o", "token=glpat-not-in-argv")
    assert r.returncode != 0
    assert "token_file" in r.stderr
    assert not os.path.ismount(mnt)


def test_fake_mount_runs_nothing(helper: Path, world: World, mnt: Path) -> None:
    r = mount("-f", "-v", "-t", "mlregfs", world.public, str(mnt), "-o", "ro")
    assert r.returncode == 0, r.stderr
    assert "mlregfs mount" in r.stdout
    assert not os.path.ismount(mnt)
    assert not daemon_pids(mnt)


def test_mount_into_another_namespace(
    helper: Path, world: World, mnt: Path, tmp_path: Path
) -> None:
    """`mount -N NS`: libmount passes `-N /proc/<its pid>/fd/<n>`; the mount lands in NS only."""
    holder = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sleep", "300"])
    ns = f"/proc/{holder.pid}/ns/mnt"
    in_ns = ["nsenter", f"--mount={ns}", "--"]
    try:
        deadline = time.monotonic() + 10
        while os.readlink(ns) == os.readlink("/proc/self/ns/mnt"):
            assert time.monotonic() < deadline, "unshare did not create a mount namespace"
            time.sleep(0.05)
        r = mount(
            "-N", ns, "-t", "mlregfs", world.public, str(mnt), "-o", f"cache_dir={tmp_path}/c"
        )
        assert r.returncode == 0, r.stderr + r.stdout
        assert not os.path.ismount(mnt)  # not in our namespace
        hello = str(mnt / "models/pub-model/1.0.0/hello.txt")
        r2 = subprocess.run([*in_ns, "cat", hello], capture_output=True, timeout=30)
        assert r2.stdout == b"hello, world\n", r2.stderr
        r3 = subprocess.run(
            [*in_ns, "umount", str(mnt)], capture_output=True, text=True, timeout=30
        )
        assert r3.returncode == 0, r3.stderr
        wait_gone(mnt)
    finally:
        subprocess.run([*in_ns, "umount", "-l", str(mnt)], capture_output=True, timeout=30)
        for pid in daemon_pids(mnt):
            os.kill(pid, 9)
        holder.kill()
        holder.wait()
