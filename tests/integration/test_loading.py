"""Loading weights: prefetch on open, streamed files, the memory budget (README Semantics 36-39).

Real mounts against `mlregfs serve`, 1 MiB blocks so that files of a few MiB span many blocks.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import blob, clean_env, file_sha, sha
from safetensors import safe_open
from safetensors.numpy import load, save

from mlregfs.testing import ServerProcess

MiB = 1 << 20
SIZE = 24 * MiB + 321  # 25 blocks of 1 MiB
SHARD = 6 * MiB + 17
VERSION = "models/loader/1.0.0"
LAZY = 8 * MiB  # a small read: its blocks and `readahead` (4) more at most, not the file


@dataclass
class Loading:
    source: str
    token: str
    files: dict[str, bytes]


@pytest.fixture(scope="module")
def loading(server: ServerProcess) -> Loading:
    st = server.store
    project = "acme/loading"
    st.create_project(project, "private")
    token = st.create_token(project, "developer")
    st.create_model(project, "loader")
    vid = st.create_version(project, "loader", "1.0.0")
    files = {
        "model.safetensors": blob(501, SIZE),
        "notes.txt": blob(502, SIZE),
        **{f"model-{i:05d}-of-00004.safetensors": blob(510 + i, SHARD) for i in range(1, 5)},
    }
    files["real.safetensors"] = _real_safetensors()
    for name, data in files.items():
        st.add_file(project, vid, name, data)
    return Loading(f"{server.url}/{project}", token, files)


def _real_safetensors() -> bytes:
    """A checkpoint written by the safetensors library itself: 24 tensors, ~19 MiB."""
    rng = np.random.default_rng(36)
    tensors = {f"layer.{i}.weight": rng.standard_normal((256, 1024), np.float32) for i in range(19)}
    tensors.update({f"layer.{i}.bias": rng.standard_normal(1024, np.float32) for i in range(5)})
    return save(tensors)


@pytest.fixture
def mount(loading: Loading, mount_factory: Callable[..., Any]) -> Callable[..., Path]:
    def make(*options: str) -> Path:
        m = mount_factory(loading.source, token=loading.token, options=["block_size=1M", *options])
        return m.path

    return make


def status(mnt: Path) -> dict[str, object]:
    r = subprocess.run(
        [sys.executable, "-m", "mlregfs", "status", "--json", str(mnt)],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def cache_stats(mnt: Path) -> dict[str, int]:
    """The daemon's cache counters, once its status file caught up (rewritten every 2 s)."""
    time.sleep(2.5)
    return status(mnt)["cache"]  # type: ignore[return-value]


def reset(server: ServerProcess) -> None:
    """Zero the server's counters once it is quiet (answers to the mounts of an earlier test,
    cut at their unmount, may still be going out)."""
    served_until_still(server)
    server.reset_stats()


def served_until_still(server: ServerProcess, timeout: float = 30) -> int:
    """Bytes the server has sent, once it has stopped sending (background streams done)."""
    last, since = -1, time.monotonic()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = server.stats()["bytes_served"]
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > 1.0:
            return int(now)
        time.sleep(0.1)
    raise AssertionError("the server never stopped sending")


def test_36_a_weights_file_is_fetched_whole_when_opened(
    mount: Callable[..., Path], loading: Loading, server: ServerProcess
) -> None:
    """Prefetch on open. With `prefetch=weights` (the default), opening a weights file
    (`.safetensors`, `.gguf`, `.bin`, `.pt`, `.pth`, `.onnx`, `.ckpt`, `.h5`, ...) streams it
    whole into the cache in the background from its first read on (a loader reads the header
    first, an `mmap` faults a page in), if the disk cache can hold it; an open that reads
    nothing (rsync's look at the file it replaces) fetches nothing. Other files are fetched
    as they are read. `prefetch=all` streams every file, `prefetch=off` none. The stream
    stops when the file's last handle closes."""
    mnt = mount()
    data = loading.files["model.safetensors"]
    (mnt / VERSION / "model.safetensors").stat()  # the listings, fetched before counting
    reset(server)
    with open(mnt / VERSION / "model.safetensors", "rb"):
        time.sleep(0.5)  # opened, never read: nothing is fetched
        assert served_until_still(server) == 0
    with open(mnt / VERSION / "model.safetensors", "rb") as f:
        assert f.read(8) == data[:8]  # a loader reads the header first...
        assert served_until_still(server) >= SIZE  # ...and the whole file is on its way
        reset(server)
        assert hashlib.sha256(f.read()).hexdigest() == sha(data[8:])
    assert server.stats()["bytes_served"] == 0  # every block came from the prefetch
    assert cache_stats(mnt)["streams"] >= 1

    # not a weights file: lazy
    reset(server)
    with open(mnt / VERSION / "notes.txt", "rb") as f:
        f.seek(10 * MiB)
        assert f.read(4096) == loading.files["notes.txt"][10 * MiB : 10 * MiB + 4096]
        assert served_until_still(server) <= LAZY

    # prefetch=off: a weights file is lazy too; prefetch=all: any file is streamed
    off = mount("prefetch=off")
    reset(server)
    with open(off / VERSION / "model.safetensors", "rb") as f:
        assert f.read(8) == data[:8]
        assert served_until_still(server) <= LAZY
    every = mount("prefetch=all")
    reset(server)
    with open(every / VERSION / "notes.txt", "rb") as f:
        assert f.read(8) == loading.files["notes.txt"][:8]
        assert served_until_still(server) >= SIZE

    # a file the disk cache cannot hold is not prefetched (it would evict itself)
    small = mount("cache_size=8M")
    reset(server)
    with open(small / VERSION / "model.safetensors", "rb") as f:
        assert f.read(8) == data[:8]
        assert served_until_still(server) <= LAZY


def test_36_safetensors_loads_a_prefetched_checkpoint_once(
    mount: Callable[..., Path], loading: Loading, server: ServerProcess
) -> None:
    """Prefetch on open, with the real loader: `safe_open` of a checkpoint on a fresh mount,
    tensors read in random order, gets every tensor right, and the file crosses the network
    once (the prefetch, not the loader's scattered reads, fetched it)."""
    mnt = mount()
    want = load(loading.files["real.safetensors"])
    reset(server)
    with safe_open(str(mnt / VERSION / "real.safetensors"), framework="np") as f:
        names = sorted(f.keys())
        assert names == sorted(want)
        random.Random(36).shuffle(names)
        for name in names:
            assert np.array_equal(f.get_tensor(name), want[name]), name
    size = len(loading.files["real.safetensors"])
    time.sleep(2.5)  # the status file is rewritten every 2 s
    downloaded = status(mnt)["registry"]["bytes_downloaded"]  # type: ignore[index]
    assert size <= downloaded <= size + MiB, downloaded


def test_37_out_of_order_readers_get_the_file_streamed(
    mount: Callable[..., Path], loading: Loading, server: ServerProcess
) -> None:
    """Streamed files. A reader that reads a file in order from its start, or that reads
    three or more blocks out of order (page faults of an `mmap` loader arrive as scattered
    reads), gets the whole file streamed in file order, several blocks at a time, each block
    hashed as it arrives: the stream stays at most a window of blocks ahead of the running
    sha256, so the check never reads a block back from disk, and no block is fetched twice."""
    mnt = mount("prefetch=off")
    data = loading.files["notes.txt"]
    path = mnt / VERSION / "notes.txt"
    reset(server)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        pages = list(range(0, SIZE, 4096))
        random.Random(37).shuffle(pages)
        for p in pages:  # every page touched in random order, as numpy/safetensors loaders do
            assert m[p : p + 16] == data[p : p + 16]
        assert hashlib.sha256(m[:]).hexdigest() == sha(data)
    served = served_until_still(server)
    assert SIZE <= served <= SIZE + 2 * MiB, served  # streamed once, not block by block twice
    stats = cache_stats(mnt)
    assert stats["streams"] >= 1

    # a reader from the start: streamed, and the check needs no disk read-back
    mnt2 = mount("prefetch=off")
    reset(server)
    assert file_sha(mnt2 / VERSION / "notes.txt") == sha(data)
    assert served_until_still(server) <= SIZE + MiB
    stats = cache_stats(mnt2)
    assert stats["streams"] >= 1 and stats["integrity_failures"] == 0


def test_38_the_memory_budget_holds_with_32_readers(
    mount: Callable[..., Path], loading: Loading
) -> None:
    """Memory budget. Every block buffer of the daemon (memory cache, downloads, blocks
    waiting for the hash) comes out of `memory_limit`: with 32 readers at once, reads slow
    down (back-pressure) instead of the daemon growing past it."""
    mnt = mount("memory_limit=8M", "prefetch=all")
    names = sorted(loading.files)
    errors: list[str] = []

    def reader(n: int) -> None:
        name = names[n % len(names)]
        want = loading.files[name]
        rng = random.Random(n)
        try:
            with open(mnt / VERSION / name, "rb") as f:
                for _ in range(12):
                    off = rng.randrange(0, len(want))
                    f.seek(off)
                    if f.read(MiB) != want[off : off + MiB]:
                        errors.append(f"{name}@{off}")
        except OSError as e:
            errors.append(f"{name}: {e}")

    threads = [threading.Thread(target=reader, args=(n,)) for n in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    stats = cache_stats(mnt)
    buffers = {k: v for k, v in stats.items() if "buffer" in k}
    assert 0 < stats["block_buffers_peak"] <= 8, str(buffers)
    assert stats["block_buffers_over_budget"] == 0, buffers


def test_39_shards_opened_together_load_in_parallel(
    mount: Callable[..., Path], loading: Loading, server: ServerProcess
) -> None:
    """Sharded checkpoints. Several files opened together are streamed at the same time, one
    hash stream per file, within the memory budget; each is checked against its sha256."""
    mnt = mount("memory_limit=16M")
    shards = [n for n in sorted(loading.files) if "-of-" in n]
    reset(server)
    files = [open(mnt / VERSION / n, "rb") for n in shards]
    try:
        served_until_still(server)
        got: dict[str, str] = {}

        def load(name: str, f: object) -> None:
            got[name] = hashlib.sha256(f.read()).hexdigest()  # type: ignore[attr-defined]

        threads = [
            threading.Thread(target=load, args=(n, f)) for n, f in zip(shards, files, strict=True)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        for f in files:
            f.close()
    assert got == {n: sha(loading.files[n]) for n in shards}
    stats = cache_stats(mnt)
    assert stats["streams"] >= 4 and stats["block_buffers_over_budget"] == 0, stats
    assert stats["streams_peak"] >= 2, stats  # at the same time, not one after another
    assert server.stats()["bytes_served"] <= 4 * (SHARD + MiB)
