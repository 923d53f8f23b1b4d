"""Writable mount: uploads on close, permissions, names, namespace operations, nothing lost."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mlregfs.testing import ServerProcess
from tests.integration.helpers import Mount, entries, file_sha, recover, unmount


@dataclass
class WWorld:
    server: ServerProcess
    source: str
    tokens: dict[str, str]
    iid: int


@pytest.fixture(scope="module")
def ww(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WWorld]:
    with ServerProcess(tmp_path_factory.mktemp("wserver")) as srv:
        st = srv.store
        st.create_project("team/writes", "private")
        tokens = {
            r: st.create_token("team/writes", r)
            for r in ("guest", "reporter", "developer", "maintainer")
        }
        tokens["job"] = st.create_token("team/writes", "developer", kind="job")
        st.create_model("team/writes", "m")
        st.create_version("team/writes", "m", "1.0.0")
        iid = st.create_candidate("team/writes", model="m")
        # with a job token candidates are listed through their packages: give it one
        st.add_file("team/writes", f"candidate:{iid}", "params.json", b"{}")
        yield WWorld(srv, f"{srv.url}/team/writes", tokens, iid)


def files_of(ww: WWorld, semver: str, model: str = "m") -> dict[str, tuple[int, str]]:
    """Registry view (not the mount's): path -> (size, sha256) of the newest copies."""
    st = ww.server.store
    pid = st.project("team/writes")["id"]  # type: ignore[index]
    mrow = st.model(pid, model)
    assert mrow is not None
    v = st.version_by_semver(int(mrow["id"]), semver)
    assert v is not None and v["package_id"] is not None
    out: dict[str, tuple[int, str]] = {}
    from urllib.parse import unquote

    for f in st.files(int(v["package_id"])):
        out[unquote(f["file_name"])] = (int(f["size"]), f["file_sha256"])
    return out


def rows_named(ww: WWorld, semver: str, name: str) -> int:
    st = ww.server.store
    project = st.project("team/writes")
    assert project is not None
    mrow = st.model(int(project["id"]), "m")
    assert mrow is not None
    v = st.version_by_semver(int(mrow["id"]), semver)
    assert v is not None
    return len([f for f in st.files(int(v["package_id"])) if f["file_name"] == name])


def mount(ww: WWorld, tmp: Path, role: str, *opts: str, cache: Path | None = None) -> Mount:
    return Mount(
        ww.source,
        tmp / f"mnt-{role}",
        cache or tmp / f"cache-{role}",
        token=ww.tokens[role],
        options=list(opts),
    ).start()


def test_cp_copytree_roundtrip(ww: WWorld, tmp_path: Path) -> None:
    """Semantics 16 and 25. Creating a file inside a version spools it and close() uploads it;
    while written it is listed with its current size, afterwards reading it returns the uploaded
    bytes. Directories inside versions (mkdir by cp -r / copytree) exist through their files."""
    src = tmp_path / "src"
    (src / "nested/deeper").mkdir(parents=True)
    (src / "config.json").write_bytes(b'{"a": 1}\n')
    (src / "nested/deeper/w.bin").write_bytes(os.urandom(3 << 20))
    (src / "nested/empty file.txt").write_bytes(b"")
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        for _ in range(256):
            f.write(os.urandom(1 << 20))
    m = mount(ww, tmp_path, "developer")
    try:
        v = m.path / "models/m/1.0.0"
        shutil.copytree(src, v / "tree")
        assert subprocess.run(["cp", str(big), str(v / "big.bin")]).returncode == 0
        subprocess.run(["sh", "-c", f"echo hello > '{v}/shell.txt'"], check=True)
        with open(v / "py.bin", "wb") as f:
            f.write(b"p" * 100_000)
        reg = files_of(ww, "1.0.0")
        assert reg["big.bin"] == (256 << 20, file_sha(big))
        assert reg["tree/nested/deeper/w.bin"][1] == file_sha(src / "nested/deeper/w.bin")
        assert reg["tree/nested/empty file.txt"][0] == 0
        assert reg["shell.txt"][0] == 6 and reg["py.bin"][0] == 100_000
        # visible with the final size, and reads back exactly (verified against file_sha256)
        assert (v / "big.bin").stat().st_size == 256 << 20
        assert file_sha(v / "big.bin") == file_sha(big)
        assert (v / "tree/config.json").read_bytes() == b'{"a": 1}\n'
        assert sorted(os.listdir(v / "tree/nested")) == ["deeper", "empty file.txt"]
        # memory stays bounded while 256 MiB went through the daemon
        rss = _peak_rss_mib(m)
        assert rss < 300, rss
    finally:
        m.stop()


def _peak_rss_mib(m: Mount) -> float:
    assert m.proc is not None
    for line in Path(f"/proc/{m.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize("role", ["guest", "reporter"])
def test_no_upload_permission_is_eacces_at_open(ww: WWorld, tmp_path: Path, role: str) -> None:
    """Semantics 17. A token that may not upload gets EACCES at open(), before any byte."""
    m = mount(ww, tmp_path, role)
    try:
        with pytest.raises(PermissionError) as ei:
            open(m.path / "models/m/1.0.0/x.bin", "wb")
        assert ei.value.errno == errno.EACCES
        r = subprocess.run(
            ["cp", "/etc/hostname", str(m.path / "models/m/1.0.0/x.bin")], capture_output=True
        )
        assert r.returncode != 0
    finally:
        m.stop()


def test_delete_needs_maintainer(ww: WWorld, tmp_path: Path) -> None:
    """Semantics 24. `rm` deletes every copy of a file (Maintainer; EACCES otherwise)."""
    dev = mount(ww, tmp_path, "developer")
    try:
        p = dev.path / "models/m/1.0.0/to-delete.txt"
        p.write_bytes(b"bye")
        with pytest.raises(PermissionError):
            p.unlink()
    finally:
        dev.stop()
    mnt = mount(ww, tmp_path, "maintainer")
    try:
        (mnt.path / "models/m/1.0.0/to-delete.txt").unlink()
        assert "to-delete.txt" not in files_of(ww, "1.0.0")
        assert not (mnt.path / "models/m/1.0.0/to-delete.txt").exists()
    finally:
        mnt.stop()


def test_invalid_names_refused_at_create(ww: WWorld, tmp_path: Path) -> None:
    """Semantics 18. A name GitLab refuses fails at create() with EINVAL, over 255 bytes with
    ENAMETOOLONG; files can only be created inside a version or candidate (EPERM elsewhere)."""
    m = mount(ww, tmp_path, "developer")
    try:
        v = m.path / "models/m/1.0.0"
        for bad in ("café.bin", "a(1).bin", "x,y.txt", "a=b", "100%.txt"):
            with pytest.raises(OSError) as ei:
                open(v / bad, "wb")
            assert ei.value.errno == errno.EINVAL, bad
        with pytest.raises(OSError) as ei:
            open(v / ("a" * 255 + "x"), "wb")
        assert ei.value.errno == errno.ENAMETOOLONG
        with pytest.raises(OSError) as ei:
            open(m.path / "models/m/top-level.bin", "wb")
        assert ei.value.errno == errno.EPERM
    finally:
        m.stop()


def test_mkdir_models_versions_and_rmdir(ww: WWorld, tmp_path: Path) -> None:
    """Semantics 23 and 24. mkdir creates models, versions (strict semver, else EINVAL) and nested
    models; mkdir under candidates/ is EPERM; rmdir deletes empty versions and models and
    fails with ENOTEMPTY otherwise."""
    m = mount(ww, tmp_path, "maintainer")
    try:
        models = m.path / "models"
        os.mkdir(models / "new-model")
        os.mkdir(models / "new-model" / "0.1.0")
        os.mkdir(models / "new-model" / "nested")  # a model named new-model/nested
        assert entries(models / "new-model") == ["0.1.0", "nested"]
        st = ww.server.store
        pid = st.project("team/writes")["id"]  # type: ignore[index]
        assert st.model(pid, "new-model/nested") is not None
        for bad in ("1.0", "v1.0.0", "1.0.0.0", "01.2.3"):
            with pytest.raises(OSError) as ei:
                os.mkdir(models / "new-model" / bad)
            assert ei.value.errno == errno.EINVAL, bad
        with pytest.raises(OSError) as ei:
            os.mkdir(m.path / "candidates" / "123")
        assert ei.value.errno == errno.EPERM
        (models / "new-model/0.1.0/f.txt").write_bytes(b"x")
        with pytest.raises(OSError) as ei:
            os.rmdir(models / "new-model/0.1.0")
        assert ei.value.errno == errno.ENOTEMPTY
        (models / "new-model/0.1.0/f.txt").unlink()
        os.rmdir(models / "new-model/0.1.0")  # GraphQL mlModelVersionDelete
        os.rmdir(models / "new-model/nested")  # MLflow registered-models/delete
        os.rmdir(models / "new-model")
        assert "new-model" not in os.listdir(models)
        assert st.model(pid, "new-model") is None
    finally:
        m.stop()


def test_overwrite_semantics(ww: WWorld, tmp_path: Path) -> None:
    """Semantics 21, 22 and 45. O_TRUNC uploads a new copy; a Maintainer's overwrite deletes
    the older copies, a Developer's keeps them (logged). link, symlink and renaming a directory
    are EPERM; a Developer cannot rename an uploaded file (EACCES)."""
    dev = mount(ww, tmp_path, "developer")
    try:
        p = dev.path / "models/m/1.0.0/over.txt"
        p.write_bytes(b"one")
        p.write_bytes(b"two, longer")  # O_TRUNC: a new copy; a developer cannot delete the old
        assert p.read_bytes() == b"two, longer"
        assert rows_named(ww, "1.0.0", "over.txt") == 2
        assert "kept older copies" in dev.stderr()
        with pytest.raises(PermissionError) as ei:
            os.rename(p, p.with_name("renamed.txt"))  # copy + delete needs the Maintainer role
        assert ei.value.errno == errno.EACCES
        assert p.read_bytes() == b"two, longer" and not p.with_name("renamed.txt").exists()
        for op in (os.link, os.symlink):
            with pytest.raises(PermissionError) as ei:
                op(p, p.with_name("linked.txt"))
            assert ei.value.errno == errno.EPERM
        (dev.path / "models/m/1.0.0/d").mkdir()
        (dev.path / "models/m/1.0.0/d/f.txt").write_bytes(b"f")
        with pytest.raises(PermissionError) as ei:
            os.rename(dev.path / "models/m/1.0.0/d", dev.path / "models/m/1.0.0/e")
        assert ei.value.errno == errno.EPERM
    finally:
        dev.stop()
    mnt = mount(ww, tmp_path, "maintainer")
    try:
        p = mnt.path / "models/m/1.0.0/over.txt"
        p.write_bytes(b"three")
        assert p.read_bytes() == b"three"
        assert rows_named(ww, "1.0.0", "over.txt") == 1  # maintainer: older copies deleted
    finally:
        mnt.stop()


def test_candidate_upload_with_job_token(ww: WWorld, tmp_path: Path) -> None:
    """Semantics 26. With CI_JOB_TOKEN, uploads into candidates work; into versions: EACCES."""
    m = Mount(ww.source, tmp_path / "mnt", tmp_path / "c", job_token=ww.tokens["job"]).start()
    try:
        p = m.path / "candidates" / str(ww.iid) / "metrics.json"
        p.write_bytes(b'{"acc": 0.9}')
        assert p.read_bytes() == b'{"acc": 0.9}'
        with pytest.raises(PermissionError):  # versions need their id: MLflow refuses job tokens
            open(m.path / "models/m/1.0.0/nope.bin", "wb")
    finally:
        m.stop()


def test_outage_during_upload_keeps_bytes_and_recover_uploads(ww: WWorld, tmp_path: Path) -> None:
    """Semantics 19 and 20. close() reports a failed upload (EIO); the bytes are kept and
    `mlregfs recover retry` uploads them once the registry is back."""
    m = mount(ww, tmp_path, "developer", "timeout=2,retry_deadline=2")
    data = os.urandom(5 << 20)
    src = tmp_path / "payload.bin"
    src.write_bytes(data)
    try:
        f = open(m.path / "models/m/1.0.0/payload.bin", "wb")  # preflight passes
        f.write(data)
        ww.server.stop()  # the registry goes away before close()
        with pytest.raises(OSError) as ei:
            f.close()  # the upload fails: close() reports it
        assert ei.value.errno == errno.EIO
        # and with the registry down, cp fails loudly at open
        cp = subprocess.run(
            ["cp", str(src), str(m.path / "models/m/1.0.0/other.bin")], capture_output=True
        )
        assert cp.returncode != 0
    finally:
        ww.server.restart()
        m.stop()
    listing = recover(m.cache_dir, ww.tokens["developer"], "list")
    assert "models/m/1.0.0/payload.bin" in listing.stdout and "failed" in listing.stdout
    r = recover(m.cache_dir, ww.tokens["developer"], "retry")
    assert r.returncode == 0, r.stderr
    assert files_of(ww, "1.0.0")["payload.bin"][0] == len(data)
    assert "nothing to recover" in recover(m.cache_dir, ww.tokens["developer"], "list").stdout


_HOLDER = """
import os, sys
f = open(sys.argv[1], "wb")
f.write(os.urandom(1 << 20))
f.flush()
print("written", flush=True)
sys.stdin.readline()
try:
    os.fsync(f.fileno())
    print("fsync ok", flush=True)
except OSError as e:
    print("fsync failed", e.errno, flush=True)
sys.stdin.readline()
f.close()
print("closed", flush=True)
"""


def test_recover_leaves_a_file_the_mount_still_holds_alone(ww: WWorld, tmp_path: Path) -> None:
    """fsync fails and the log says "run recover": while the writer still has the file open,
    recover does not take it (the mount would upload it again at close); close uploads it.
    (The writer is another process: a forked child's copy of the fd, closed, is a close.)"""
    m = mount(ww, tmp_path, "developer", "timeout=2,retry_deadline=2")
    target = m.path / "models/m/1.0.0/held.bin"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(target)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdin is not None and holder.stdout is not None
    try:
        assert holder.stdout.readline() == "written\n"
        ww.server.stop()
        try:
            holder.stdin.write("fsync\n")
            holder.stdin.flush()
            assert holder.stdout.readline().startswith("fsync failed")
        finally:
            ww.server.restart()
        r = recover(m.cache_dir, ww.tokens["developer"], "list")
        assert "in use by the running mount" in r.stdout, r
        r = recover(m.cache_dir, ww.tokens["developer"], "retry")
        assert r.returncode == 0 and "uploaded" not in r.stdout, r
        assert "held.bin" not in files_of(ww, "1.0.0")
        holder.stdin.write("close\n")  # the mount uploads it now
        holder.stdin.flush()
        assert holder.stdout.readline() == "closed\n"
        assert holder.wait(30) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
        m.stop()
    assert files_of(ww, "1.0.0")["held.bin"][0] == 1 << 20
    assert rows_named(ww, "1.0.0", "held.bin") == 1
    assert "nothing to recover" in recover(m.cache_dir, ww.tokens["developer"], "list").stdout


def _start_upload(m: Mount, tmp: Path, name: str, mib: int) -> subprocess.Popen[bytes]:
    """`cp` a fresh `mib` MiB file into models/m/1.0.0/<name>; return once it is uploading."""
    src = tmp / name
    with open(src, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
    cp = subprocess.Popen(["cp", str(src), str(m.path / "models/m/1.0.0" / name)])
    spool = m.cache_dir / "spool"
    deadline = time.monotonic() + 30
    while not any('"uploading"' in p.read_text() for p in spool.glob("*.json")):
        assert time.monotonic() < deadline, "the upload never started"
        time.sleep(0.01)
    return cp


def test_kill_during_upload_leaves_journal(ww: WWorld, tmp_path: Path) -> None:
    """Semantics 20. A daemon killed mid-upload leaves its journal; the next mount logs it."""
    m = mount(ww, tmp_path, "developer")
    cp = _start_upload(m, tmp_path, "k.bin", 128)
    assert m.proc is not None
    m.proc.send_signal(signal.SIGKILL)
    m.proc.wait()
    cp.wait(30)
    unmount(m.path)
    m.proc = None
    m2 = mount(ww, tmp_path, "developer", cache=m.cache_dir)
    try:
        assert "were not uploaded" in m2.stderr()
    finally:
        m2.stop()
    r = recover(m.cache_dir, ww.tokens["developer"], "list")
    assert "models/m/1.0.0/k.bin" in r.stdout


def test_unmount_waits_for_upload_in_flight(ww: WWorld, tmp_path: Path) -> None:
    """Semantics 20. SIGTERM waits for uploads in flight before unmounting."""
    m = mount(ww, tmp_path, "developer")
    src = tmp_path / "u.bin"
    cp = _start_upload(m, tmp_path, "u.bin", 96)
    assert m.proc is not None
    m.proc.send_signal(signal.SIGTERM)
    assert cp.wait(60) == 0  # the upload finished and close() succeeded
    assert m.proc.wait(60) == 0
    assert files_of(ww, "1.0.0")["u.bin"] == (96 << 20, file_sha(src))
    m.stop()


def test_too_large_is_efbig_at_close(tmp_path: Path) -> None:
    """Semantics 19. An upload over the registry's size limit fails close() with EFBIG; the
    bytes are kept for `mlregfs recover`."""
    with ServerProcess(tmp_path / "srv", extra_args=["--max-file-size", "1M"]) as srv:
        st = srv.store
        st.create_project("x/y", "private")
        token = st.create_token("x/y", "developer")
        st.create_model("x/y", "m")
        st.create_version("x/y", "m", "1.0.0")
        m = Mount(f"{srv.url}/x/y", tmp_path / "mnt", tmp_path / "c", token=token).start()
        try:
            f = open(m.path / "models/m/1.0.0/big.bin", "wb")
            f.write(b"x" * (2 << 20))
            with pytest.raises(OSError) as ei:
                f.close()
            assert ei.value.errno == errno.EFBIG
            r = subprocess.run(["cp", "/etc/hostname", str(m.path / "models/m/1.0.0/ok.txt")])
            assert r.returncode == 0  # small files still go through
        finally:
            m.stop()
        listing = recover(m.cache_dir, token, "list")
        assert "models/m/1.0.0/big.bin" in listing.stdout and "too large" in listing.stdout


def test_full_spool_disk_fails_cp_and_uploads_nothing(ww: WWorld, tmp_path: Path) -> None:
    """Writes are queued and stored in the background: a spool that cannot take the bytes
    (a full disk) still makes `cp` fail with ENOSPC, and nothing partial reaches the registry.
    The failed file's partial bytes are not kept (its writer was told), so the next upload
    finds room."""
    small = tmp_path / "small-disk"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(small)], check=True)
    try:
        src = tmp_path / "big.bin"
        src.write_bytes(os.urandom(12 << 20))
        m = mount(ww, tmp_path, "developer", cache=small / "cache")
        try:
            r = subprocess.run(
                ["cp", str(src), str(m.path / "models/m/1.0.0/too-big.bin")],
                capture_output=True,
                text=True,
            )
            assert r.returncode != 0 and "No space left on device" in r.stderr, r.stderr
            assert "too-big.bin" not in files_of(ww, "1.0.0")
            spool = small / "cache/spool"
            # release (after close() returned) deletes them
            _wait_for(lambda: not list(spool.iterdir()), f"{list(spool.iterdir())} kept", 15)
            small_src = tmp_path / "after.bin"
            small_src.write_bytes(os.urandom(2 << 20))
            r = subprocess.run(
                ["cp", str(small_src), str(m.path / "models/m/1.0.0/after-full.bin")],
                capture_output=True,
                text=True,
            )
            assert r.returncode == 0, r.stderr
            assert files_of(ww, "1.0.0")["after-full.bin"] == (2 << 20, file_sha(small_src))
        finally:
            m.stop()
    finally:
        subprocess.run(["umount", str(small)], check=True)


class ThrottlingProxy:
    """A loopback TCP proxy in front of the registry whose upstream direction (request bodies)
    can be slowed to `rate` bytes/s: a PUT that stalls while everything else answers."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.rate: float | None = None
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, throttled: bool) -> None:
        try:
            while data := src.recv(16384):
                dst.sendall(data)
                if throttled and self.rate:
                    time.sleep(len(data) / self.rate)  # the throttle itself, not a wait
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()


def _wait_for(cond: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _spool_states(cache: Path) -> list[str]:
    out = []
    for p in (cache / "spool").glob("*.json"):
        with contextlib.suppress(OSError, ValueError):
            out.append(json.loads(p.read_text())["state"])
    return out


def test_sigterm_drain_timeout_is_a_bound_and_recover_uploads_exactly_once(
    ww: WWorld, tmp_path: Path
) -> None:
    """Semantics 20. SIGTERM waits at most `drain_timeout` for an upload that stalls, then
    unmounts and exits; the cut-off upload is kept (journal: uploading) and `mlregfs recover
    retry` stores it exactly once."""
    assert ww.server.port is not None
    proxy = ThrottlingProxy(ww.server.port)
    src = tmp_path / "stalled.bin"
    src.write_bytes(os.urandom(8 << 20))
    source = f"http://127.0.0.1:{proxy.port}/team/writes"
    m = Mount(
        source,
        tmp_path / "mnt",
        tmp_path / "cache",
        token=ww.tokens["developer"],
        options=["drain_timeout=2s"],
    ).start()
    try:
        proxy.rate = 128 << 10  # the 8 MiB PUT would take ~64 s
        cp = subprocess.Popen(
            ["cp", str(src), str(m.path / "models/m/1.0.0/stalled.bin")], stderr=subprocess.PIPE
        )
        _wait_for(lambda: "uploading" in _spool_states(m.cache_dir), "the upload never started")
        assert m.proc is not None
        started = time.monotonic()
        m.proc.send_signal(signal.SIGTERM)
        code = m.proc.wait(120)
        elapsed = time.monotonic() - started
        # drain_timeout 2 s + close grace 3 s + unmount and exit, with room for a loaded
        # 2-CPU machine; still far below the ~64 s the stalled PUT would take to finish
        assert elapsed < 25, f"exited {elapsed:.1f} s after SIGTERM with drain_timeout=2s"
        assert code == 0, m.stderr()
        assert cp.wait(30) != 0  # close() did not claim success
        assert "abandoned" in m.stderr()
    finally:
        m.stop()
        proxy.rate = None
    assert _spool_states(m.cache_dir) == ["uploading"]
    assert "stalled.bin" not in files_of(ww, "1.0.0")
    listing = recover(m.cache_dir, ww.tokens["developer"], "list")
    assert "interrupted" in listing.stdout and "models/m/1.0.0/stalled.bin" in listing.stdout
    r = recover(m.cache_dir, ww.tokens["developer"], "retry")
    assert r.returncode == 0, r.stderr
    r = recover(m.cache_dir, ww.tokens["developer"], "retry")  # nothing left to send twice
    assert r.returncode == 0 and "uploaded" not in r.stdout, r
    proxy.close()
    assert files_of(ww, "1.0.0")["stalled.bin"] == (8 << 20, file_sha(src))
    assert rows_named(ww, "1.0.0", "stalled.bin") == 1


def _fake_interrupted(cache: Path, name: str, data: bytes, source: str, created: float) -> str:
    """A journal entry as a daemon killed mid-PUT leaves it (state uploading, daemon gone)."""
    spool = cache / "spool"
    spool.mkdir(parents=True, exist_ok=True)
    entry_id = hashlib.sha256(name.encode()).hexdigest()[:32]
    (spool / f"{entry_id}.data").write_bytes(data)
    entry = {
        "id": entry_id,
        "source": source,
        "owner": ["v", "m", "1.0.0"],
        "path": name,
        "state": "uploading",
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "error": None,
        "pid": 2**22 + 17,  # above pid_max: gone
        "created": created,
        "updated": created,
    }
    (spool / f"{entry_id}.json").write_text(json.dumps(entry))
    return entry_id


def test_recover_asks_the_registry_before_uploading_an_interrupted_entry(
    ww: WWorld, tmp_path: Path
) -> None:
    """Semantics 20. An upload cut off after the registry stored it is not stored again; old
    bytes never go over a newer, different copy unless `retry --force`."""
    m = mount(ww, tmp_path, "developer")
    try:
        (m.path / "models/m/1.0.0/stored.bin").write_bytes(b"stored before the kill")
    finally:
        m.stop()
    cache = tmp_path / "cache-recover"
    _fake_interrupted(cache, "stored.bin", b"stored before the kill", ww.source, time.time())
    r = recover(cache, ww.tokens["developer"], "retry")
    assert r.returncode == 0 and "already in the registry" in r.stdout, r
    assert rows_named(ww, "1.0.0", "stored.bin") == 1
    old = _fake_interrupted(cache, "newer.bin", b"old bytes", ww.source, time.time() - 3600)
    m = mount(ww, tmp_path, "developer")
    try:
        (m.path / "models/m/1.0.0/newer.bin").write_bytes(b"newer bytes, written since")
    finally:
        m.stop()
    r = recover(cache, ww.tokens["developer"], "retry")
    assert r.returncode == 1 and "newer" in r.stderr, r
    assert files_of(ww, "1.0.0")["newer.bin"][0] == len(b"newer bytes, written since")
    r = recover(cache, ww.tokens["developer"], "retry", "--force", old)
    assert r.returncode == 0, r.stderr
    assert files_of(ww, "1.0.0")["newer.bin"][0] == len(b"old bytes")
    assert "nothing to recover" in recover(cache, ww.tokens["developer"], "list").stdout
