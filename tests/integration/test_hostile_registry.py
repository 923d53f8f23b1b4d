"""Real mounts against a hostile registry (tests/hostile.py in front of a real `mlregfs serve`).

Issue 9 items 3-7: listings that lie, names with control characters, bodies that drip or end
early, answers that poison a keep-alive connection, and pagination that never ends.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mlregfs.testing import ServerProcess
from tests.hostile import HostileProxy
from tests.integration.conftest import World
from tests.integration.helpers import Mount, file_sha, sha

CONTROL = [chr(c) for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))]


@pytest.fixture
def proxy(server: ServerProcess, world: World) -> Iterator[HostileProxy]:
    with HostileProxy(server.url) as p:
        yield p


def _source(proxy: HostileProxy) -> str:
    return f"{proxy.url}/acme/registry"


def _mount(
    mount_factory: Callable[..., Mount],
    proxy: HostileProxy,
    world: World,
    *options: str,
    cache: Path | None = None,
) -> Mount:
    return mount_factory(
        _source(proxy), token=world.tokens["developer"], options=list(options), cache=cache
    )


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _rows_of(data: Any) -> list[dict[str, Any]]:
    return [r for r in data if isinstance(r, dict)] if isinstance(data, list) else []


def _is_llama_v1_files(path: str, data: Any) -> bool:
    names = {r.get("file_name") for r in _rows_of(data)}
    return path.endswith("/package_files") and "config.json" in names


# ------------------------------------------------------------------------------------ item 3


def test_3_listed_sha256_never_becomes_a_path(
    world: World, proxy: HostileProxy, mount_factory: Callable[..., Mount], tmp_path: Path
) -> None:
    """Semantics 27: "An entry that fails is not shown; no local path is ever built from a
    registry value, and nothing outside `cache_dir` is ever touched."

    A listing whose file_sha256 is an absolute path or `../..` never makes the daemon touch
    anything outside cache_dir: the entry is dropped at the registry entry (not shown)."""
    # absolute victim: lowercase, because cache keys were lowercased before use
    victim = Path(tempfile.mkdtemp(prefix="mlregfs-victim-", dir="/tmp"))
    (victim / "keep.txt").write_text("precious")
    cache = tmp_path / "a" / "b" / "c" / "cache"
    relative_victims = []
    d = cache.parent
    while d != tmp_path.parent:  # `../..` resolves to one of these, whatever the block layout
        (d / "victim-rel").mkdir(parents=True)
        (d / "victim-rel" / "keep.txt").write_text("precious")
        relative_victims.append(d / "victim-rel")
        d = d.parent
    lies = {"config.json": str(victim), "dup.txt": "../../victim-rel"}

    def rewrite(path: str, query: dict[str, str], data: Any) -> Any:
        if _is_llama_v1_files(path, data):
            for row in _rows_of(data):
                if row.get("file_name") in lies:
                    row["file_sha256"] = lies[row["file_name"]]
        return data

    proxy.rewrite_json = rewrite
    try:
        m = _mount(mount_factory, proxy, world, cache=cache)
        v = m.path / "models/llama/1.0.0"
        shown = os.listdir(v)
        assert "tokenizer" in shown  # the rest of the listing is still there
        for name in lies:
            try:
                data = (v / name).read_bytes()
            except OSError as e:
                assert e.errno in (errno.ENOENT, errno.EIO), e
            else:
                raise AssertionError(f"{name} read {len(data)} bytes despite a bogus sha256")
        m.stop()
        for kept in (victim, *relative_victims):
            assert (kept / "keep.txt").read_text() == "precious", f"{kept} was touched"
        assert not set(lies) & set(shown), f"entries with a bogus sha256 are shown: {shown}"
    finally:
        import shutil

        shutil.rmtree(victim, ignore_errors=True)


# ------------------------------------------------------------------------------------ item 4


def test_4_names_with_control_characters_are_not_shown(
    world: World, proxy: HostileProxy, mount_factory: Callable[..., Mount]
) -> None:
    """Semantics 28: "Names containing control characters (U+0000-U+001F, U+007F,
    U+0080-U+009F: newline, ESC, ...) are not shown at all." File and model names with C0/C1
    controls or DEL are never shown by the mount."""
    bad_files = [
        "nl%0Aname.txt",
        "raw\nname.txt",
        "esc\x1b[31mred.txt",
        "del\x7f.txt",
        "c1\u009bx.txt",
        "c1enc%C2%85.txt",
        "tab\tname.txt",
        "dir%0A/inner.txt",
    ]
    bad_models = ["evil\x1b]0;pwned\x07", "nl\nmodel", "c1\u0085model", "team/x\x1b/y"]

    def rewrite(path: str, query: dict[str, str], data: Any) -> Any:
        if _is_llama_v1_files(path, data):
            pkg = _rows_of(data)[0].get("package_id")
            for i, name in enumerate(["ok-injected.txt", *bad_files]):
                row = {"id": 9_000_000 + i, "package_id": pkg, "file_name": name, "size": 5}
                data.append({**row, "file_sha256": None, "created_at": "2024-01-02T03:04:05Z"})
        if path.endswith("registered-models/search") and isinstance(data, dict):
            for i, name in enumerate(["ok-injected-model", *bad_models]):
                version = {"version": str(8_000_000 + i), "aliases": ["1.0.0"], "name": name}
                data["registered_models"].append({"name": name, "latest_versions": [version]})
        return data

    proxy.rewrite_json = rewrite
    m = _mount(mount_factory, proxy, world)
    files = os.listdir(m.path / "models/llama/1.0.0")
    models = os.listdir(m.path / "models")
    assert "ok-injected.txt" in files and "ok-injected-model" in models  # injection works
    for name in files + models + os.listdir(m.path / "models/team"):
        assert not any(c in name for c in CONTROL), f"control character shown: {name!r}"


# ------------------------------------------------------------------------------------ item 5


def _drip_shards(proxy: HostileProxy, n: int) -> list[str]:
    names = [f"part-{i:03d}.bin" for i in range(n)]
    proxy.drip = lambda path: any(path.endswith("/" + name) for name in names)
    return names


@pytest.mark.slow
def test_5_dripping_body_fails_in_bounded_time_and_does_not_block_others(
    world: World, proxy: HostileProxy, mount_factory: Callable[..., Mount]
) -> None:
    """Semantics 29: "A server that stalls or drips a body ends that attempt after `timeout`
    and the read after `retry_deadline` in all; a stalled download of one file never holds back
    reads of other files."

    timeout is a total deadline per request: with timeout=3s,retry_deadline=6s a `cat` of a
    body sent one byte per second fails within ~15 s, another file reads meanwhile, and
    unmount after the readers ended is prompt."""
    names = _drip_shards(proxy, 4)
    m = _mount(mount_factory, proxy, world, "timeout=3s", "retry_deadline=6s")
    shards = m.path / "models/llama/2.0.0/shards"
    assert len(os.listdir(shards)) == 150
    started = time.monotonic()
    cats = _cats(shards, names)
    try:
        _wait(lambda: proxy.faults["drip"] >= 4, 20, "four dripping downloads")
        healthy = "models/llama/2.0.0/shards/part-010.bin"
        got = (m.path / healthy).read_bytes()
        healthy_done = [c.poll() is None for c in cats]
        assert got == world.files[healthy]
        for c in cats:
            c.wait(timeout=30)
        ended = time.monotonic() - started
    finally:
        for c in cats:
            if c.poll() is None:
                c.kill()
                c.wait()
    assert all(c.returncode != 0 for c in cats), [c.stderr.read() for c in cats if c.stderr]
    assert ended < 20, f"dripping reads took {ended:.1f} s"
    assert m.proc is not None
    t0 = time.monotonic()
    done = subprocess.run(["fusermount3", "-u", str(m.path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    m.proc.wait(timeout=15)
    assert time.monotonic() - t0 < 10
    assert all(healthy_done), "the healthy read waited for the stalled downloads"


@pytest.mark.slow
def test_5_sigterm_ends_daemon_promptly_during_drips(
    world: World, proxy: HostileProxy, mount_factory: Callable[..., Mount]
) -> None:
    """Semantics 29: "neither unmount nor SIGTERM waits for a stalled download." SIGTERM while
    downloads are stalled: the daemon exits promptly (no thread keeps it)."""
    names = _drip_shards(proxy, 2)
    m = _mount(mount_factory, proxy, world, "timeout=30s", "retry_deadline=60s")
    shards = m.path / "models/llama/2.0.0/shards"
    os.listdir(shards)
    cats = _cats(shards, names)
    try:
        _wait(lambda: proxy.faults["drip"] >= 2, 20, "two dripping downloads")
        assert m.proc is not None
        t0 = time.monotonic()
        m.proc.send_signal(signal.SIGTERM)
        m.proc.wait(timeout=30)
        took = time.monotonic() - t0
    finally:
        for c in cats:
            c.wait(timeout=30)
    assert took < 10, f"daemon took {took:.1f} s to exit after SIGTERM"


# ------------------------------------------------------------------------------------ item 6


def _endless_package_files(
    method: str, path: str, query: dict[str, str]
) -> tuple[int, dict[str, str], Any] | None:
    """Every page of every package's files: 100 new rows and "there is a next page"."""
    if not path.endswith("/package_files"):
        return None
    page = int(query.get("page", "1"))
    rows = [
        {
            "id": 50_000_000 + page * 1000 + i,
            "package_id": 1,
            "file_name": f"gen-{page}-{i}.bin",
            "size": 1,
            "file_sha256": None,
            "created_at": "2024-01-02T03:04:05Z",
        }
        for i in range(100)
    ]
    return 200, {"X-Page": str(page), "X-Next-Page": str(page + 1), "X-Per-Page": "100"}, rows


def _endless_models(
    method: str, path: str, query: dict[str, str]
) -> tuple[int, dict[str, str], Any] | None:
    """MLflow model search: 10 new models and a new next_page_token, for ever."""
    if not path.endswith("registered-models/search"):
        return None
    n = int(query.get("page_token", "t0")[1:]) + 1
    models = [
        {"name": f"m{n}-{i}", "latest_versions": [{"version": str(n * 1000 + i + 1)}]}
        for i in range(10)
    ]
    return 200, {}, {"registered_models": models, "next_page_token": f"t{n}"}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("rewrite", "listing", "counted"),
    [
        (_endless_package_files, "models/llama/1.0.0", "/package_files"),
        (_endless_models, "models", "registered-models/search"),
    ],
    ids=["offset-pages", "mlflow-tokens"],
)
def test_6_endless_pagination_is_bounded(
    world: World,
    proxy: HostileProxy,
    mount_factory: Callable[..., Mount],
    rewrite: Any,
    listing: str,
    counted: str,
) -> None:
    """Semantics 30: "past any bound `ls` fails with `EIO` and the daemon stops asking."

    A server that always announces another page: `ls` fails (EIO) in bounded time after a
    bounded number of requests, and the daemon stops asking once it failed."""
    proxy.answer = rewrite
    m = _mount(mount_factory, proxy, world, "timeout=5s", "retry_deadline=10s")
    t0 = time.monotonic()
    ls = subprocess.Popen(
        ["ls", str(m.path / listing)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        _, err = ls.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        sent = proxy.requests(counted)
        assert m.proc is not None
        m.proc.kill()  # `ls` waits in the kernel (state D) until the daemon answers or dies
        ls.communicate()
        raise AssertionError(f"ls still running after 120 s and {sent} requests") from None
    took = time.monotonic() - t0
    assert ls.returncode != 0, "an endless listing was listed as if complete"
    assert b"Input/output error" in err, err
    sent = proxy.requests(counted)
    assert sent <= 1_100, f"{sent} requests for one listing"
    assert took < 90, f"ls took {took:.1f} s"
    time.sleep(0.5)  # then prove the daemon stopped: no request in the next second
    before = proxy.requests(counted)
    time.sleep(1.0)
    assert proxy.requests(counted) == before, "the daemon kept paging after the listing failed"


# ------------------------------------------------------------------------------------ item 7


@pytest.mark.slow
def test_7_truncated_bodies_and_poisoned_connections_are_retried(
    world: World, proxy: HostileProxy, mount_factory: Callable[..., Mount], tmp_path: Path
) -> None:
    """Semantics 31: "A body cut off mid-transfer is retried like a dropped connection, and a
    connection that delivered any broken answer is closed, never reused."

    At a 20 % truncation rate (plus wrong Content-Range and gzip answers on keep-alive
    connections), multi-block files read back with the right bytes and no EIO."""
    proxy.truncate_rate = 0.2
    big = "models/llama/1.0.0/weights/model.safetensors"
    ckpt = f"candidates/{world.candidate_iid}/model/checkpoint.bin"
    for run in range(2):  # a fresh cache each time: every block crosses the proxy
        proxy.bad_content_range = 3
        proxy.gzip = 3
        m = _mount(mount_factory, proxy, world, "block_size=1M", cache=tmp_path / f"c{run}")
        assert file_sha(m.path / big) == sha(world.files[big])
        assert (m.path / ckpt).read_bytes() == world.files[ckpt]
        m.stop()
    assert proxy.faults["truncate"] >= 10  # the faults really happened
    assert proxy.faults["bad_content_range"] >= 1 and proxy.faults["gzip"] >= 1


def test_hostile_proxy_passes_through(
    world: World, proxy: HostileProxy, mount_factory: Callable[..., Mount]
) -> None:
    """Sanity: with no fault switched on the proxy is transparent."""
    m = _mount(mount_factory, proxy, world)
    p = "models/llama/1.0.0/config.json"
    assert (m.path / p).read_bytes() == world.files[p]
    assert proxy.requests() > 0


def _cats(d: Path, names: list[str]) -> list[subprocess.Popen[bytes]]:
    """One `cat` per file, running in the background."""
    return [
        subprocess.Popen(["cat", str(d / n)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for n in names
    ]
