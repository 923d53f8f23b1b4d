"""Never a wrong byte on the read path, and the kernel's lookup counts, on real mounts.

Files whose listed sha256 is wrong are made by rewriting the server's database row: the
server then serves the true bytes under a checksum they do not have.
"""

from __future__ import annotations

import errno
import itertools
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import xxhash

from mlregfs.testing import ServerProcess
from tests.integration.conftest import World
from tests.integration.helpers import blob, file_sha, sha

PRIV = "acme/registry"
MiB = 1 << 20
_names = itertools.count()


def add_file(server: ServerProcess, data: bytes, *, wrong_sha: bool) -> str:
    """A new model version holding `data` as w.bin; returns its path under the mount."""
    st = server.store
    model = f"integrity-{os.getpid()}-{next(_names)}"
    st.create_model(PRIV, model)
    v = st.create_version(PRIV, model, "1.0.0")
    fid = st.add_file(PRIV, v, "w.bin", data)
    if wrong_sha:
        with st.tx() as db:
            db.execute(
                "UPDATE package_files SET file_sha256=? WHERE id=?", (sha(b"other" + data), fid)
            )
    return f"models/{model}/1.0.0/w.bin"


def read_errno(path: Path) -> int | None:
    """Read the whole file in 1 MiB steps: None on success, else the errno."""
    try:
        with open(path, "rb") as f:
            while f.read(MiB):
                pass
    except OSError as e:
        return e.errno
    return None


def mmap_read(path: Path) -> subprocess.CompletedProcess[bytes]:
    """Hash the file through a shared mapping, in a child (a failed page is SIGBUS)."""
    code = (
        "import hashlib, mmap, sys\n"
        "with open(sys.argv[1], 'rb') as f:\n"
        "    m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\n"
        "    print(hashlib.sha256(m[:]).hexdigest())\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, timeout=120, check=False
    )


def test_wrong_sha256_fails_every_read_never_from_the_page_cache(
    server: ServerProcess, world: World, mount_factory
) -> None:
    """Semantics 9 and 15: "every read of the file fails with `EIO` until a download
    matches"; "no page of a mismatching download is served again, by `read` or by `mmap`"."""
    data = blob(901, 5 * MiB + 123)
    rel = add_file(server, data, wrong_sha=True)
    m = mount_factory(world.private, token=world.tokens["developer"], options=["block_size=1M"])
    p = m.path / rel
    assert read_errno(p) == errno.EIO  # the first full read ends in EIO
    # reopened: the kernel must not serve the pages it kept from the first attempt
    assert read_errno(p) == errno.EIO
    cat = subprocess.run(["cat", str(p)], capture_output=True, timeout=120, check=False)
    assert cat.returncode != 0 and b"Input/output error" in cat.stderr
    assert sha(cat.stdout) != sha(data) and len(cat.stdout) < len(data)
    mm = mmap_read(p)
    assert mm.returncode != 0 and sha(data).encode() not in mm.stdout
    assert read_errno(p) == errno.EIO  # and still, after the mapping


def test_mismatch_drops_pages_cached_for_handles_still_open(
    server: ServerProcess, world: World, mount_factory
) -> None:
    """Semantics 15: "also for handles already open".

    A reader that opened the file before the mismatch was found must not get the pages
    cached meanwhile from the kernel either: they are invalidated when the check fails."""
    data = blob(905, 5 * MiB + 77)
    rel = add_file(server, data, wrong_sha=True)
    m = mount_factory(world.private, token=world.tokens["developer"], options=["block_size=1M"])
    early = os.open(m.path / rel, os.O_RDONLY)
    try:
        assert read_errno(m.path / rel) == errno.EIO  # another open reads it all: mismatch
        deadline = time.monotonic() + 30
        while True:  # the invalidation runs in the background: poll
            try:
                os.pread(early, 4096, 0)
            except OSError as e:
                assert e.errno == errno.EIO
                break
            assert time.monotonic() < deadline, "pages of a mismatching file still served"
            time.sleep(0.1)
    finally:
        os.close(early)


def _damage_block(cache: Path, key: str, index: int) -> None:
    """Flip a payload byte of a cached block and rewrite its header checksum to match."""
    path = cache / "blocks" / "v2" / key[:2] / key / f"{index}.blk"
    raw = bytearray(path.read_bytes())
    raw[4096 + 1000] ^= 0xFF
    struct.pack_into("<Q", raw, 24, xxhash.xxh3_64_intdigest(bytes(raw[4096:])))
    path.write_bytes(bytes(raw))


def test_damaged_block_with_rewritten_checksum_is_not_served(
    server: ServerProcess, world: World, mount_factory, tmp_path: Path
) -> None:
    """Semantics 9: "a block damaged on disk ... is dropped and refetched (or fails with
    `EIO`), never served" - even when its own header checksum was rewritten to match."""
    data = blob(902, 3 * MiB + 5)
    rel = add_file(server, data, wrong_sha=False)
    cache = tmp_path / "damaged-cache"
    opts = ["block_size=1M"]
    m = mount_factory(world.private, token=world.tokens["developer"], cache=cache, options=opts)
    assert file_sha(m.path / rel) == sha(data)  # read whole: verified and cached
    m.stop()
    _damage_block(cache, sha(data), 1)
    m2 = mount_factory(world.private, token=world.tokens["developer"], cache=cache, options=opts)
    try:
        got = (m2.path / rel).read_bytes()
    except OSError as e:  # acceptable: an error, never the damaged bytes
        assert e.errno == errno.EIO
    else:
        assert got == data  # refetched from the registry
    assert file_sha(m2.path / rel) == sha(data)


@pytest.mark.parametrize("memory", [None, "4M"], ids=["memory_default", "memory_4M"])
def test_file_larger_than_the_cache_is_checked(
    server: ServerProcess, world: World, mount_factory, memory: str | None
) -> None:
    """Semantics 9: "whatever the cache size ... whoever reads a file to its end gets `EIO`,
    not success, when the download does not match"."""
    data = blob(903, 24 * MiB)
    rel = add_file(server, data, wrong_sha=True)
    opts = ["cache_size=16M", "block_size=4M"] + ([f"memory_cache={memory}"] if memory else [])
    m = mount_factory(world.private, token=world.tokens["developer"], options=opts)
    assert read_errno(m.path / rel) == errno.EIO
    cat = subprocess.run(["cat", str(m.path / rel)], capture_output=True, timeout=120, check=False)
    assert cat.returncode != 0 and sha(cat.stdout) != sha(data)


def test_file_larger_than_the_cache_with_right_sha256_reads(
    server: ServerProcess, world: World, mount_factory
) -> None:
    data = blob(904, 24 * MiB + 7)
    rel = add_file(server, data, wrong_sha=False)
    opts = ["cache_size=16M", "block_size=4M", "memory_cache=4M"]
    m = mount_factory(world.private, token=world.tokens["developer"], options=opts)
    assert file_sha(m.path / rel) == sha(data)
    assert file_sha(m.path / rel) == sha(data)  # again, partly from the cache


def test_forget_shrinks_the_inode_table(world: World, mount_factory) -> None:
    """Semantics 35: "an inode the kernel no longer references (and no open file uses) is
    dropped from the daemon's tables ... Inode numbers are never reused."."""
    m = mount_factory(world.private, token=world.tokens["developer"])
    inos = {p: os.stat(p).st_ino for p in (m.path / "models").rglob("*")}
    before = os.statvfs(m.path).f_files
    assert before > 400, before  # every listed directory and file has an inode now
    deadline = time.monotonic() + 60
    while os.statvfs(m.path).f_files > before // 2:
        assert time.monotonic() < deadline, f"f_files stayed at {os.statvfs(m.path).f_files}"
        Path("/proc/sys/vm/drop_caches").write_text("2\n")  # unused dentries and inodes go
        time.sleep(0.2)  # the kernel's FORGETs arrive asynchronously: poll
    # a forgotten path looked up again gets a new inode number, never one given out before
    seen = set(inos.values())
    again = {p: os.stat(p).st_ino for p in inos}
    assert any(again[p] != inos[p] for p in inos)
    assert all(again[p] == inos[p] or again[p] not in seen for p in inos)
    probe = m.path / "models" / "bulk-007" / "1.0.0" / "w.bin"
    assert probe.read_bytes() == world.files["models/bulk-007/1.0.0/w.bin"]


def test_random_small_reads_covering_a_wrong_file_end_in_eio(
    server: ServerProcess, world: World, mount_factory
) -> None:
    """4 KiB-style random preads are served by short range requests, but they count: a
    reader that has read every byte of a mismatching file that way gets EIO by the end."""
    import random

    data = blob(905, 3 * MiB)
    rel = add_file(server, data, wrong_sha=True)
    m = mount_factory(world.private, token=world.tokens["developer"], options=["block_size=1M"])
    step = 16 << 10
    offs = list(range(0, len(data), step))
    random.Random(5).shuffle(offs)
    fd = os.open(m.path / rel, os.O_RDONLY)
    failed = None
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no kernel read-ahead
        for o in offs:
            try:
                got = os.pread(fd, step, o)
            except OSError as e:
                failed = e.errno
                break
            assert got == data[o : o + step]
    finally:
        os.close(fd)
    assert failed == errno.EIO


def test_pages_of_unchecked_bytes_stay_unserved_after_another_path_verifies(
    server: ServerProcess, world: World, mount_factory, tmp_path: Path
) -> None:
    """Semantics 15: only pages of checked bytes are kept across opens. Two paths with the
    same bytes share their cache entry: the first reads part of a bad block (unchecked, in
    its page cache) and closes; the other is then read whole and verified. The first path's
    next open must not serve its old pages."""
    data = blob(906, 8 * MiB + 11)
    v1 = add_file(server, data, wrong_sha=False)
    v2 = add_file(server, data, wrong_sha=False)
    cache = tmp_path / "shared-cache"
    # blocks only on disk, no read-ahead: a 4 KiB read fetches block 0 alone
    opts = ["block_size=1M", "memory_cache=512K", "readahead=0"]
    m = mount_factory(world.private, token=world.tokens["developer"], cache=cache, options=opts)
    fd = os.open(m.path / v2, os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, 0) == data[:4096]  # block 0 reaches the disk (unchecked)
    finally:
        os.close(fd)
    block0 = cache / "blocks" / "v2" / sha(data)[:2] / sha(data) / "0.blk"
    deadline = time.monotonic() + 30
    while not block0.exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    _damage_block(cache, sha(data), 0)
    fd = os.open(m.path / v1, os.O_RDONLY)
    try:
        bad = os.pread(fd, 4096, 0)  # the damaged block: now in v1's page cache
    finally:
        os.close(fd)
    assert bad != data[:4096]
    assert read_errno(m.path / v2) == errno.EIO  # the damaged block fails the check
    deadline = time.monotonic() + 30
    while read_errno(m.path / v2) is not None:  # EIO until that download's requests end
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert file_sha(m.path / v2) == sha(data)  # fetched again: verified
    fd = os.open(m.path / v1, os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, 0) == data[:4096]
    finally:
        os.close(fd)
    assert file_sha(m.path / v1) == sha(data)
