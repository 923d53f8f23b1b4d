"""Damaged local state never stops a mount; other local users see nothing of a private
project; a bad start says why (daemon mode and -f)."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mlregfs.mount import public_source
from mlregfs.status import state_path
from tests.integration.conftest import World
from tests.integration.helpers import clean_env, unmount


def _catalog(cache: Path, source: str) -> Path:
    """The models part of the mount's catalog (one small file per part)."""
    name = hashlib.sha256(public_source(source).encode()).hexdigest()[:32]
    return cache / "catalog" / name / "models.json"


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _write_all(*files: tuple[Path, bytes]) -> None:
    for path, data in files:
        _write(path, data)


def _mkdir(path: Path) -> None:
    (path / "inner").mkdir(parents=True)


DAMAGE: dict[str, Callable[[Path, str], None]] = {
    "catalog-list": lambda c, s: _write(_catalog(c, s), b"[]"),
    "catalog-files-list": lambda c, s: _write(_catalog(c, s), b'{"files": []}'),
    "catalog-garbage": lambda c, s: _write(_catalog(c, s), b"\x00\x01garbage{"),
    "catalog-is-a-directory": lambda c, s: _mkdir(_catalog(c, s)),
    "catalog-dir-is-a-file": lambda c, s: _write(c / "catalog", b"stray"),
    "catalog-parts-dir-is-a-file": lambda c, s: _write(_catalog(c, s).parent, b"stray"),
    "catalog-of-an-older-version-garbage": lambda c, s: _write(
        _catalog(c, s).parent.with_suffix(".json"), b"\x00garbage{"
    ),
    "pins-number": lambda c, s: _write(c / "blocks" / "v2" / "pins.json", b"5"),
    "pins-object": lambda c, s: _write(c / "blocks" / "v2" / "pins.json", b"{}"),
    "pins-is-a-directory": lambda c, s: _mkdir(c / "blocks" / "v2" / "pins.json"),
    "stray-file-in-block-tree": lambda c, s: _write_all(
        (c / "blocks" / "v2" / "junk", b"x"), (c / "blocks" / "v2" / "ab" / "notes.txt", b"x")
    ),
    "stray-dir-in-block-tree": lambda c, s: _mkdir(c / "blocks" / "v2" / "ab" / "abkey" / "x"),
    "blocks-is-a-file": lambda c, s: _write(c / "blocks", b"stray"),
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_mount_starts_and_serves_with_damaged_state(
    world: World, mount_factory, tmp_path: Path, damage: Callable[[Path, str], None]
) -> None:
    """Semantics 32: "Anything under `cache_dir` that cannot be read or has the wrong shape is
    logged once with its path, set aside and rebuilt": the mount starts and serves."""
    cache = tmp_path / "cache"
    cache.mkdir()
    damage(cache, world.private)
    m = mount_factory(world.private, cache=cache, token=world.tokens["developer"])
    v1 = m.path / "models" / "llama" / "1.0.0"
    assert "config.json" in os.listdir(v1)
    assert (v1 / "config.json").read_bytes() == world.files["models/llama/1.0.0/config.json"]
    tok = "models/llama/1.0.0/tokenizer/tok en+1.json"
    assert (m.path / tok).read_bytes() == world.files[tok]
    assert "set aside" in m.stderr()  # logged, not silently dropped


def test_block_and_marker_that_became_directories(
    world: World, mount_factory, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    path = "models/llama/1.0.0/config.json"
    m = mount_factory(world.private, cache=cache, token=world.tokens["developer"])
    assert (m.path / path).read_bytes() == world.files[path]
    m.stop()
    blocks = list((cache / "blocks" / "v2").glob("*/*/0.blk"))
    assert len(blocks) == 1
    blocks[0].unlink()
    blocks[0].mkdir()  # a directory named like the block
    marker = blocks[0].with_name("verified")
    if marker.exists():
        marker.unlink()
    marker.mkdir()
    m2 = mount_factory(world.private, cache=cache, token=world.tokens["developer"])
    assert (m2.path / path).read_bytes() == world.files[path]
    assert (m2.path / path).read_bytes() == world.files[path]


# -- a second local user --------------------------------------------------------------------
@pytest.fixture
def other_user() -> Iterator[str]:
    """A throwaway account, removed afterwards (we run as root)."""
    if os.geteuid() != 0:
        pytest.fail("the second-user test needs root to create an account")
    useradd = shutil.which("useradd")
    assert useradd, "useradd missing: cannot test what another local user sees"
    name = f"mlrt{os.getpid() % 100000}"
    subprocess.run(
        [useradd, "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
    )
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


def _as(user: str, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", user, "--", *cmd], capture_output=True, text=True, timeout=30
    )


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_another_local_user_sees_nothing(world: World, other_user: str) -> None:
    """Semantics 33: "Everything the daemon writes is readable only by the mounting user,
    whatever the umask": a second local user can list and read none of it."""
    base = Path(tempfile.mkdtemp(prefix="mlregfs-users-", dir="/tmp"))
    os.chmod(base, 0o755)  # like a home directory: the user may traverse it
    cache, mnt = base / "cache", base / "mnt"
    cache.mkdir(mode=0o755)
    os.chmod(cache, 0o755)  # an existing, too open cache directory
    mnt.mkdir()
    old = os.umask(0o022)
    try:
        args = [sys.executable, "-m", "mlregfs", "mount", world.private, str(mnt)]
        r = subprocess.run(
            [*args, "-o", f"cache_dir={cache}"],
            env=clean_env(GITLAB_TOKEN=world.tokens["developer"]),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        cfg = mnt / "models" / "llama" / "1.0.0" / "config.json"
        assert cfg.read_bytes() == world.files["models/llama/1.0.0/config.json"]
        status_file = state_path(mnt)
        deadline = time.monotonic() + 30
        while not status_file.exists():
            assert time.monotonic() < deadline, f"no status file {status_file}"
            time.sleep(0.1)
        catalog = _catalog(cache, world.private)
        log = cache / "mlregfs.log"
        parts = catalog.parent
        for p in (cache, cache / "catalog", parts, parts / "files", cache / "blocks",
                  status_file.parent):  # fmt: skip
            assert _mode(p) == 0o700, p
        for p in (catalog, log, status_file):
            assert _mode(p) == 0o600, p
        # what the other user tries: list and read everything that names the project
        assert _as(other_user, "ls", str(base)).returncode == 0  # the test can reach base
        for target in (cache, cache / "catalog", cache / "blocks", cache / "spool"):
            r = _as(other_user, "ls", str(target))
            assert r.returncode != 0 and "Permission denied" in r.stderr, target
        for target in (catalog, log, status_file):
            r = _as(other_user, "cat", str(target))
            assert r.returncode != 0 and "Permission denied" in r.stderr, target
            assert "llama" not in r.stdout
    finally:
        os.umask(old)
        unmount(mnt)
        shutil.rmtree(base, ignore_errors=True)


# -- errors at start ------------------------------------------------------------------------
def _mount(
    source: str, tmp_path: Path, foreground: bool, *opts: str, token: str = ""
) -> tuple[int, str]:
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    args = [sys.executable, "-m", "mlregfs", "mount", source, str(mnt)]
    args += ["-f"] if foreground else []
    for o in (f"cache_dir={tmp_path / 'c'}", *opts):
        args += ["-o", o]
    try:
        env = clean_env(GITLAB_TOKEN=token) if token else clean_env()
        r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    finally:
        unmount(mnt)
    return r.returncode, r.stderr


BAD_SOURCES = {
    "ftp": ("ftp://example.com/a/b", "must start with https://"),
    "no-host": ("https:///a/b", "no host"),
    "credentials": ("https://user:s3cret-pw@example.com/a/b", "must not contain credentials"),
    "empty": ("  ", "SOURCE is empty"),
}


@pytest.mark.parametrize("foreground", [False, True], ids=["daemon", "foreground"])
@pytest.mark.parametrize("case", BAD_SOURCES.values(), ids=BAD_SOURCES.keys())
def test_bad_source_says_what_is_wrong(
    tmp_path: Path, case: tuple[str, str], foreground: bool
) -> None:
    """Semantics 34: "A bad SOURCE ... makes `mlregfs mount` exit non-zero with a one-line
    reason, in daemon and foreground mode." """
    source, reason = case
    code, err = _mount(source, tmp_path, foreground)
    assert code != 0
    assert reason in err, err
    assert "Traceback" not in err and "before it was ready" not in err
    assert "s3cret-pw" not in err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("foreground", [False, True], ids=["daemon", "foreground"])
def test_unusable_log_file_says_why(world: World, tmp_path: Path, foreground: bool) -> None:
    (tmp_path / "afile").write_text("x")
    log_file = tmp_path / "afile" / "m.log"
    token = world.tokens["developer"]
    code, err = _mount(world.private, tmp_path, foreground, f"log_file={log_file}", token=token)
    assert code != 0
    assert "log_file" in err and "Not a directory" in err, err
    assert "Traceback" not in err and "before it was ready" not in err


@pytest.mark.parametrize("foreground", [False, True], ids=["daemon", "foreground"])
def test_cache_dir_that_is_a_file_says_why(world: World, tmp_path: Path, foreground: bool) -> None:
    (tmp_path / "c").write_text("x")
    code, err = _mount(world.private, tmp_path, foreground, token=world.tokens["developer"])
    assert code != 0
    assert "cache_dir" in err and "Not a directory" in err, err
    assert "Traceback" not in err and "before it was ready" not in err


_INJECT = """
import mlregfs.assemble


class Broken:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("injected failure\\nsecond line")


mlregfs.assemble.BlockStore = Broken
"""


@pytest.mark.parametrize("foreground", [False, True], ids=["daemon", "foreground"])
def test_unexpected_start_failure_reaches_the_caller(
    world: World, tmp_path: Path, foreground: bool
) -> None:
    """Any exception at start is logged with its reason and passed through the ready pipe."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(_INJECT)  # loaded by every Python started below
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    args = [sys.executable, "-m", "mlregfs", "mount", world.private, str(mnt)]
    args += ["-f"] if foreground else []
    path = os.pathsep.join(p for p in (str(inject), os.environ.get("PYTHONPATH")) if p)
    env = clean_env(GITLAB_TOKEN=world.tokens["developer"], PYTHONPATH=path)
    try:
        r = subprocess.run(
            [*args, "-o", f"cache_dir={tmp_path / 'c'}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        unmount(mnt)
    assert r.returncode != 0
    assert "cannot start: RuntimeError: injected failure second line" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "before it was ready" not in r.stderr
    if not foreground:
        log = (tmp_path / "c" / "mlregfs.log").read_text()
        assert "cannot start: RuntimeError: injected failure" in log
