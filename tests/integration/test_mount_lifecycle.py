"""Mounting and unmounting as a user does it: daemon mode, errors at start, signals, tokens."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlregfs.testing import ServerProcess, free_port
from tests.integration.conftest import World
from tests.integration.helpers import Mount, clean_env, entries, file_sha, sha, unmount


def run_mount(
    source: str, mnt: Path, cache: Path, env: dict[str, str], *opts: str
) -> subprocess.CompletedProcess[str]:
    mnt.mkdir(exist_ok=True)
    args = [sys.executable, "-m", "mlregfs", "mount", source, str(mnt), "-o", f"cache_dir={cache}"]
    for o in opts:
        args += ["-o", o]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)


def test_daemon_mode_returns_when_ready(world: World, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    r = run_mount(
        world.private, mnt, tmp_path / "c", clean_env(GITLAB_TOKEN=world.tokens["reporter"])
    )
    try:
        assert r.returncode == 0, r.stderr
        assert os.path.ismount(mnt)  # ready on return, no polling needed
        assert "llama" in os.listdir(mnt / "models")
    finally:
        unmount(mnt)
    deadline = time.monotonic() + 10
    while (
        subprocess.run(["pgrep", "-f", f"mlregfs mount .* {mnt} "], capture_output=True).returncode
        == 0
    ):
        assert time.monotonic() < deadline, "daemon did not exit after fusermount3 -u"
        time.sleep(0.1)
    log = (tmp_path / "c" / "mlregfs.log").read_text()
    assert world.tokens["reporter"] not in log
    assert "mounted at" in log


def test_wrong_token_is_a_clear_mount_error(world: World, tmp_path: Path) -> None:
    r = run_mount(
        world.private,
        tmp_path / "mnt",
        tmp_path / "c",
        clean_env(GITLAB_TOKEN="glpat-wrong-token-123"),
    )
    assert r.returncode != 0
    assert "token refused" in r.stderr
    assert "glpat-wrong-token-123" not in r.stderr
    assert not os.path.ismount(tmp_path / "mnt")


def test_private_project_without_token(world: World, tmp_path: Path) -> None:
    r = run_mount(world.private, tmp_path / "mnt", tmp_path / "c", clean_env())
    assert r.returncode != 0
    assert "not found" in r.stderr and "no token" in r.stderr


def test_unreachable_registry(tmp_path: Path) -> None:
    port = free_port()
    t0 = time.monotonic()
    r = run_mount(
        f"http://127.0.0.1:{port}/a/b",
        tmp_path / "mnt",
        tmp_path / "c",
        clean_env(),
        "retry_deadline=2",
    )
    assert r.returncode != 0
    assert "unreachable" in r.stderr
    assert time.monotonic() - t0 < 30


def test_busy_mount_point(world: World, mount_factory, tmp_path: Path) -> None:
    m = mount_factory(world.public)
    r = run_mount(world.public, m.path, tmp_path / "c2", clean_env())
    assert r.returncode != 0 and "busy" in r.stderr
    assert os.listdir(m.path / "models") == ["pub-model"]  # the first mount is untouched


def test_public_project_without_token(world: World, mount_factory) -> None:
    m = mount_factory(world.public)
    assert (m.path / "models/pub-model/1.0.0/hello.txt").read_bytes() == b"hello, world\n"


def test_project_by_numeric_api_url(world: World, server: ServerProcess, mount_factory) -> None:
    import httpx

    pid = httpx.get(f"{server.url}/api/v4/projects/acme%2Fpublic").json()["id"]
    m = mount_factory(f"{server.url}/api/v4/projects/{pid}")
    assert os.listdir(m.path / "models") == ["pub-model"]


def test_sigterm_unmounts_cleanly(world: World, tmp_path: Path) -> None:
    m = Mount(world.public, tmp_path / "mnt", tmp_path / "c").start()
    assert m.proc is not None
    m.proc.send_signal(signal.SIGTERM)
    assert m.proc.wait(15) == 0
    assert not os.path.ismount(m.path)
    m.stop()


def test_ci_job_token_lists_through_packages_api(world: World, mount_factory) -> None:
    """GitLab refuses job tokens on MLflow routes: listing falls back to the packages API
    (paginated by 100, so 120+ models cross page boundaries)."""
    m = mount_factory(world.private, job_token=world.tokens["job"])
    models = os.listdir(m.path / "models")
    assert len([x for x in models if x.startswith("bulk-")]) == 120
    p = "models/llama/1.0.0/config.json"
    assert (m.path / p).read_bytes() == world.files[p]
    p = f"candidates/{world.candidate_iid}/metrics.json"
    assert (m.path / p).read_bytes() == world.files[p]


def test_token_file_option(world: World, mount_factory, tmp_path: Path) -> None:
    tok = tmp_path / "token"
    tok.write_text(world.tokens["guest"] + "\n")
    tok.chmod(0o600)
    m = mount_factory(world.private, options=[f"token_file={tok}"])
    p = "models/team/nlp/bert/0.1.0/README.md"
    assert file_sha(m.path / p) == sha(world.files[p])


def test_systemd_notify_ready_and_stopping(world: World, tmp_path: Path) -> None:
    """Type=notify: READY=1 once the mount answers, STOPPING=1 on SIGTERM."""
    import socket

    sock_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(str(sock_path))
        srv.settimeout(30)
        m = Mount(world.public, tmp_path / "mnt", tmp_path / "c")
        m.env["NOTIFY_SOCKET"] = str(sock_path)
        m.start()
        try:
            assert srv.recv(1000).startswith(b"READY=1")
            assert os.path.ismount(m.path)
            assert m.proc is not None
            m.proc.send_signal(signal.SIGTERM)
            assert srv.recv(1000).startswith(b"STOPPING=1")
            assert m.proc.wait(15) == 0
        finally:
            m.stop()


def test_token_rotation_via_token_file(tmp_path: Path, mount_factory) -> None:
    """The token file is re-read when it changes or on a 401; a loose mode is warned about."""
    with ServerProcess(tmp_path / "srv") as srv:
        st = srv.store
        st.create_project("x/y", "private")
        old = st.create_token("x/y", "reporter")
        st.create_model("x/y", "m")
        st.create_version("x/y", "m", "1.0.0")
        tok = tmp_path / "token"
        tok.write_text(old)
        tok.chmod(0o644)
        m = mount_factory(f"{srv.url}/x/y", options=[f"token_file={tok},listing_ttl=1"])
        assert "readable by others" in m.stderr()
        assert old not in m.stderr()
        assert entries(m.path / "models/m") == ["1.0.0"]
        new = st.create_token("x/y", "reporter")
        tok.write_text(new + "\n")
        st.revoke_token(old)
        st.create_version("x/y", "m", "2.0.0")
        time.sleep(1.5)
        assert entries(m.path / "models/m") == ["1.0.0", "2.0.0"]
        assert "token file" in m.stderr() and new not in m.stderr()


def test_stale_mount_of_a_killed_daemon_is_cleaned(world: World, tmp_path: Path) -> None:
    m = Mount(world.public, tmp_path / "mnt", tmp_path / "c").start()
    assert m.proc is not None
    m.proc.send_signal(signal.SIGKILL)
    m.proc.wait()
    m.proc = None
    try:
        os.statvfs(m.path)
        raise AssertionError("expected a dead mount")
    except OSError as e:
        assert e.errno == errno.ENOTCONN
    r = run_mount(world.public, m.path, tmp_path / "c", clean_env())
    try:
        assert r.returncode == 0, r.stderr
        assert os.listdir(m.path / "models") == ["pub-model"]
        assert "cleaned a stale mount" in r.stderr
    finally:
        unmount(m.path)
