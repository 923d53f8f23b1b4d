"""One test per bullet of the README's Semantics section; each docstring quotes its bullet."""

from __future__ import annotations

import errno
import mmap
import os
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from mlregfs.testing import ServerProcess
from tests.integration.conftest import BIG, World
from tests.integration.helpers import entries, file_sha, sha


def test_1_layout(mnt: Path) -> None:
    """Layout. The root holds `models/` and `candidates/`."""
    assert sorted(os.listdir(mnt)) == ["candidates", "models"]


def test_2_nested_model_names(mnt: Path, world: World) -> None:
    """Nested model names. A model name containing `/` (e.g. `team/nlp/bert`) is a chain of
    directories under `models/`."""
    assert os.listdir(mnt / "models/team") == ["nlp"]
    assert os.listdir(mnt / "models/team/nlp") == ["bert"]
    assert entries(mnt / "models/team/nlp/bert") == ["0.1.0"]
    assert (mnt / "models/team/nlp/bert/0.1.0/README.md").read_bytes() == b"# bert\n"
    models = sorted(os.listdir(mnt / "models"))
    assert len([m for m in models if m.startswith("bulk-")]) == 120  # >100 models


def test_3_version_directories_and_collision(mnt: Path) -> None:
    """Version directories. A model's directory lists its versions by semver string, next to the
    first segment of longer model names. When a version and a nested model segment share a name
    (model `a` with version `1.0.0` and a model `a/1.0.0`), the version wins."""
    assert entries(mnt / "models/llama") == ["1.0.0", "2.0.0"]
    assert entries(mnt / "models/clash") == ["1.0.0"]
    # and the semver alias links of bullet 47 beside them
    assert sorted(os.listdir(mnt / "models/llama")) == ["1", "1.0", "1.0.0", "2", "2.0", "2.0.0",
                                                        "latest"]  # fmt: skip
    assert os.listdir(mnt / "models/clash/1.0.0") == ["from-version.txt"]


def test_4_files_and_subdirectories(mnt: Path, world: World) -> None:
    """Files and subdirectories. Stored names are percent-decoded, so `%2F` makes subdirectories
    and `%20`/`%2B` come back as space and `+`."""
    v = mnt / "models/llama/1.0.0"
    assert sorted(os.listdir(v)) == ["config.json", "dup.txt", "tokenizer", "weights"]
    assert os.listdir(v / "tokenizer") == ["tok en+1.json"]
    assert (v / "tokenizer/tok en+1.json").read_bytes() == world.files[
        "models/llama/1.0.0/tokenizer/tok en+1.json"
    ]
    shards = sorted(os.listdir(mnt / "models/llama/2.0.0/shards"))
    assert shards == [f"part-{i:03d}.bin" for i in range(150)]  # >100 files: several pages
    for name in ("part-000.bin", "part-099.bin", "part-100.bin", "part-149.bin"):
        p = f"models/llama/2.0.0/shards/{name}"
        assert (mnt / p).read_bytes() == world.files[p]


def test_5_duplicates_newest_wins(mnt: Path) -> None:
    """Duplicates. A file uploaded several times under one name appears once, with the size and
    bytes of the newest copy (the one GitLab serves)."""
    v = mnt / "models/llama/1.0.0"
    assert os.listdir(v).count("dup.txt") == 1
    assert (v / "dup.txt").stat().st_size == len(b"second, newest upload\n")
    assert (v / "dup.txt").read_bytes() == b"second, newest upload\n"


def test_6_attributes(mnt: Path, world: World, mount_factory) -> None:
    """Attributes. Size is the registry's size; a file's mtime is its upload time. On a
    writable mount directories are `rwxr-xr-x` and files `rw-r--r--` (less `umask=`), with
    `-o ro` `r-xr-xr-x` and `r--r--r--`; owned by the mounting user, or `uid=`/`gid=`."""
    f = (mnt / "models/llama/1.0.0/weights/model.safetensors").stat()
    assert f.st_size == BIG
    assert stat.S_ISREG(f.st_mode) and stat.S_IMODE(f.st_mode) == 0o644
    assert f.st_uid == os.getuid()
    assert abs(f.st_mtime - time.time()) < 3600  # uploaded by this session's seed
    d = (mnt / "models/llama/1.0.0").stat()
    assert stat.S_ISDIR(d.st_mode) and stat.S_IMODE(d.st_mode) == 0o755
    ro = mount_factory(
        world.private, token=world.tokens["reporter"], options=["ro,uid=1234,gid=4321"]
    ).path
    f = (ro / "models/llama/1.0.0/config.json").stat()
    assert stat.S_IMODE(f.st_mode) == 0o444 and (f.st_uid, f.st_gid) == (1234, 4321)
    assert stat.S_IMODE((ro / "models").stat().st_mode) == 0o555
    w = mount_factory(world.private, token=world.tokens["reporter"], options=["umask=027"]).path
    assert stat.S_IMODE((w / "models/llama/1.0.0/config.json").stat().st_mode) == 0o640


def test_7_candidates(mnt: Path, world: World) -> None:
    """Candidates. `candidates/<iid>/` shows the artifacts of each candidate (run) that has not
    been promoted to a model version."""
    iid = str(world.candidate_iid)
    assert iid in os.listdir(mnt / "candidates")
    c = mnt / "candidates" / iid
    assert sorted(os.listdir(c)) == ["metrics.json", "model"]
    p = f"candidates/{iid}/model/checkpoint.bin"
    assert file_sha(mnt / p) == sha(world.files[p])


def test_8_lazy_reads(world: World, server: ServerProcess, mount_factory) -> None:
    """Lazy reads. Reading a range of a file that is not prefetched (bullet 36) downloads only
    the blocks that hold it. Reading 4 KiB of a large file downloads one 64 KiB range."""
    mnt = mount_factory(world.private, token=world.tokens["developer"], options=["prefetch=off"])
    p = "models/llama/1.0.0/weights/model.safetensors"
    fd = os.open(mnt.path / p, os.O_RDONLY)
    try:
        server.reset_stats()
        off = 40 << 20
        assert os.pread(fd, 4096, off) == world.files[p][off : off + 4096]
        served = server.stats()["bytes_served"]
        assert 4096 <= served <= 64 << 10, served  # one short range, not a block or 64 MiB
    finally:
        os.close(fd)


def test_9_exact_bytes_of_a_large_file(mnt: Path, world: World) -> None:
    """Verified bytes: a complete large file reads back with exactly the registry's sha256."""
    p = "models/llama/1.0.0/weights/model.safetensors"
    assert file_sha(mnt / p) == sha(world.files[p])
    # and random ranges agree too
    with open(mnt / p, "rb") as f:
        for off in (0, 1, (8 << 20) - 3, 33_333_333, BIG - 10):
            f.seek(off)
            assert f.read(1000) == world.files[p][off : off + 1000]


def _blob_files(server: ServerProcess, content: bytes) -> list[Path]:
    return [
        p
        for p in Path(server.data_dir).rglob("*")
        if p.is_file() and p.stat().st_size == len(content) and p.read_bytes() == content
    ]


def test_9_corrupt_download_is_never_served(tmp_path: Path, mount_factory) -> None:
    """Verified bytes. A file of one block is checked before any byte of it is returned; on a
    mismatch the read fails with `EIO`."""
    with ServerProcess(tmp_path / "srv") as srv:
        srv.store.create_project("x/y", "public")
        srv.store.create_model("x/y", "m")
        v = srv.store.create_version("x/y", "m", "1.0.0")
        srv.store.add_file("x/y", v, "a.txt", b"the real bytes\n")
        (blob_path,) = _blob_files(srv, b"the real bytes\n")
        blob_path.write_bytes(b"the FAKE bytes\n")  # same size, different sha256
        m = mount_factory(f"{srv.url}/x/y")
        with pytest.raises(OSError) as ei:
            (m.path / "models/m/1.0.0/a.txt").read_bytes()
        assert ei.value.errno == errno.EIO
        blob_path.write_bytes(b"the real bytes\n")  # repaired: the next read fetches again
        assert (m.path / "models/m/1.0.0/a.txt").read_bytes() == b"the real bytes\n"


def test_9_corrupt_large_file_fails_the_reader(tmp_path: Path, mount_factory) -> None:
    """Verified bytes. Once every block of a file is cached, the file is checked against the
    registry's `file_sha256`; on a mismatch the read fails with `EIO` (also the kernel's
    page-by-page retries), so `cp` and `cat` of a corrupt file fail."""
    data = os.urandom(20 << 20)
    with ServerProcess(tmp_path / "srv") as srv:
        srv.store.create_project("x/y", "public")
        srv.store.create_model("x/y", "m")
        v = srv.store.create_version("x/y", "m", "1.0.0")
        srv.store.add_file("x/y", v, "w.bin", data)
        (blob_path,) = _blob_files(srv, data)
        bad = bytearray(data)
        bad[12_345_678] ^= 0x01  # one bit, in the middle
        blob_path.write_bytes(bytes(bad))
        m = mount_factory(f"{srv.url}/x/y")
        r = subprocess.run(["cat", str(m.path / "models/m/1.0.0/w.bin")], capture_output=True)
        assert r.returncode != 0 and b"Input/output error" in r.stderr
        blob_path.write_bytes(data)
        assert file_sha(m.path / "models/m/1.0.0/w.bin") == sha(data)  # reopened: refetched


def test_9_damaged_cache_block_is_refetched(
    world: World, mount_factory, server: ServerProcess, tmp_path: Path
) -> None:
    """Verified bytes. Cached blocks carry a checksum; a damaged block is dropped and refetched."""
    p = "models/llama/1.0.0/config.json"
    cache = tmp_path / "shared-cache"
    m = mount_factory(world.private, token=world.tokens["developer"], cache=cache)
    assert (m.path / p).read_bytes() == world.files[p]
    m.stop()
    (blk,) = [b for b in cache.rglob("*.blk") if world.files[p] in b.read_bytes()]
    raw = bytearray(blk.read_bytes())
    raw[-2] ^= 0xFF
    blk.write_bytes(bytes(raw))
    m2 = mount_factory(world.private, token=world.tokens["developer"], cache=cache)
    server.reset_stats()
    assert (m2.path / p).read_bytes() == world.files[p]
    assert server.stats()["bytes_served"] >= len(world.files[p])  # fetched again


def test_10_read_only(world: World, mount_factory) -> None:
    """Read-only mounts. With `-o ro`, creating, writing, deleting, renaming, `mkdir` and
    `chmod` fail with `EROFS`."""
    m = mount_factory(world.private, token=world.tokens["maintainer"], options=["ro"])
    v = m.path / "models/llama/1.0.0"
    attempts = [
        lambda: open(v / "new.bin", "wb"),
        lambda: open(v / "config.json", "r+b"),
        lambda: os.mkdir(v / "sub"),
        lambda: os.unlink(v / "config.json"),
        lambda: os.rename(v / "config.json", v / "c2.json"),
        lambda: os.chmod(v / "config.json", 0o666),
        lambda: os.rmdir(v / "weights"),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as ei:
            attempt()
        assert ei.value.errno == errno.EROFS


def test_11_errors_enoent(mnt: Path) -> None:
    """Errors. A missing name is `ENOENT`."""
    for p in (
        "nope",
        "models/nope",
        "models/llama/9.9.9",
        "models/llama/1.0.0/nope.bin",
        "candidates/999999",
    ):
        with pytest.raises(FileNotFoundError):
            os.stat(mnt / p)


def test_11_errors_outage_eio_and_mount_survives(tmp_path: Path, mount_factory) -> None:
    """Errors. An unreachable registry is `EIO` after bounded retries. The mount never dies
    from a failed operation. Freshness: the last known listing is served during an outage, and
    cached bytes keep reading."""
    srv = ServerProcess(tmp_path / "srv").start()
    try:
        srv.store.create_project("x/y", "public")
        srv.store.create_model("x/y", "m")
        v = srv.store.create_version("x/y", "m", "1.0.0")
        srv.store.add_file("x/y", v, "small.txt", b"cached\n")
        srv.store.add_file("x/y", v, "big.bin", b"z" * (3 << 20))
        m = mount_factory(
            f"{srv.url}/x/y", options=["listing_ttl=1,file_ttl=1,timeout=2,retry_deadline=3"]
        )
        v_dir = m.path / "models/m/1.0.0"
        assert (v_dir / "small.txt").read_bytes() == b"cached\n"
        srv.stop()
        time.sleep(1.5)  # listings are stale now: the daemon must ask again and fail
        assert sorted(os.listdir(v_dir)) == ["big.bin", "small.txt"]
        assert (v_dir / "small.txt").read_bytes() == b"cached\n"
        t0 = time.monotonic()
        with pytest.raises(OSError) as ei:
            (v_dir / "big.bin").read_bytes()
        assert ei.value.errno in (errno.EIO, errno.ETIMEDOUT)
        assert time.monotonic() - t0 < 30
        srv.restart()
        assert (v_dir / "big.bin").read_bytes() == b"z" * (3 << 20)  # same mount, still alive
    finally:
        srv.stop()


def test_12_freshness_new_version_appears(tmp_path: Path, mount_factory) -> None:
    """Freshness. Listings are trusted for `listing_ttl`; after that they are fetched again."""
    with ServerProcess(tmp_path / "srv") as srv:
        srv.store.create_project("x/y", "public")
        srv.store.create_model("x/y", "m")
        srv.store.create_version("x/y", "m", "1.0.0")
        m = mount_factory(f"{srv.url}/x/y", options=["listing_ttl=1"])
        assert entries(m.path / "models/m") == ["1.0.0"]
        srv.store.create_version("x/y", "m", "1.1.0")
        time.sleep(1.5)
        assert entries(m.path / "models/m") == ["1.0.0", "1.1.0"]
        assert os.readlink(m.path / "models/m/latest") == "1.1.0"


def test_13_persistence_across_remount(
    world: World, mount_factory, server: ServerProcess, tmp_path: Path
) -> None:
    """Persistence. Downloaded blocks live under `cache_dir` and survive unmount and daemon
    restarts."""
    p = f"candidates/{world.candidate_iid}/model/checkpoint.bin"
    cache = tmp_path / "persist-cache"
    m = mount_factory(world.private, token=world.tokens["developer"], cache=cache)
    assert file_sha(m.path / p) == sha(world.files[p])
    m.stop()
    m2 = mount_factory(world.private, token=world.tokens["developer"], cache=cache)
    os.listdir(m2.path / "candidates" / str(world.candidate_iid) / "model")  # listings first
    server.reset_stats()
    assert file_sha(m2.path / p) == sha(world.files[p])
    assert server.stats()["bytes_served"] == 0


def test_13_cache_size_bounds_disk(world: World, mount_factory, tmp_path: Path) -> None:
    """Persistence. Cached blocks are bounded by `cache_size` (LRU)."""
    cache = tmp_path / "small-cache"
    m = mount_factory(
        world.private,
        token=world.tokens["developer"],
        cache=cache,
        options=["cache_size=16M,block_size=4M"],
    )
    p = "models/llama/1.0.0/weights/model.safetensors"
    assert file_sha(m.path / p) == sha(world.files[p])
    used = sum(b.stat().st_size for b in cache.rglob("*.blk"))
    assert used <= (16 << 20) + 4096 * 8, used


def _direct_io_works(d: Path) -> bool:
    probe = d / "odirect-probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    try:
        buf = mmap.mmap(-1, 4096)
        os.write(fd, buf)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink()


def _resident_bytes(f: Path) -> int:
    """Bytes of `f` in the page cache (mincore over a mapping of it)."""
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES", str(f)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out.split()[0])


def test_13_cache_blocks_bypass_the_page_cache(world: World, mount_factory, tmp_path: Path) -> None:
    """Persistence. Blocks are written with `O_DIRECT` where the filesystem allows it (buffered
    elsewhere) and dropped from the page cache after each read, so the cache does not fill the
    page cache a second time."""
    cache = tmp_path / "direct-cache"
    cache.mkdir()
    direct = _direct_io_works(cache)
    p = "models/llama/1.0.0/weights/model.safetensors"
    m = mount_factory(
        world.private, token=world.tokens["developer"], cache=cache, options=["block_size=1M"]
    )
    assert file_sha(m.path / p) == sha(world.files[p])
    m.stop()
    blocks = list(cache.rglob("*.blk"))
    assert len(blocks) == -(-len(world.files[p]) // (1 << 20))
    resident = sum(_resident_bytes(b) for b in blocks)
    if direct:
        assert resident == 0, f"{resident} bytes of cache blocks in the page cache"
    else:  # the fallback is buffered I/O, said once in the log
        assert "no O_DIRECT" in m.stderr()
    m2 = mount_factory(
        world.private, token=world.tokens["developer"], cache=cache, options=["block_size=1M"]
    )
    assert file_sha(m2.path / p) == sha(world.files[p])  # and they read back whole
    left = {b.name: _resident_bytes(b) for b in blocks}
    # ext4 may keep the one partial page at the end of the file's last, short block
    last = f"{len(blocks) - 1}.blk"
    assert left.pop(last) <= 4096
    assert sum(left.values()) == 0, {k: v for k, v in left.items() if v}


def test_14_object_storage_redirects(tmp_path: Path, mount_factory) -> None:
    """Object storage. When GitLab answers a download with a 302 redirect, the bytes are fetched
    from the signed URL without sending the GitLab token there."""
    with ServerProcess(tmp_path / "srv", download_mode="redirect") as srv:
        srv.store.create_project("x/y", "private")
        token = srv.store.create_token("x/y", "reporter")
        srv.store.create_model("x/y", "m")
        v = srv.store.create_version("x/y", "m", "1.0.0")
        data = os.urandom(20 << 20)
        srv.store.add_file("x/y", v, "weights.bin", data)
        m = mount_factory(f"{srv.url}/x/y", token=token)
        # the storage listener refuses requests carrying Authorization, so success proves it
        assert file_sha(m.path / "models/m/1.0.0/weights.bin") == sha(data)


def test_15_page_cache_kept_across_opens(mnt: Path, world: World) -> None:
    """Page cache. Files with a known sha256 keep their kernel page cache across opens, so
    re-reads do not reach the daemon."""
    p = "models/llama/2.0.0/shards/part-042.bin"
    assert (mnt / p).read_bytes() == world.files[p]
    pid = _daemon_pid(mnt)
    fd = os.open(mnt / p, os.O_RDONLY)  # a new open: the kernel must keep the pages
    result: list[bytes] = []
    os.kill(pid, signal.SIGSTOP)  # from here on, anything reaching the daemon would hang
    try:
        t = threading.Thread(target=lambda: result.append(os.pread(fd, 1 << 20, 0)), daemon=True)
        t.start()
        t.join(5)
    finally:
        os.kill(pid, signal.SIGCONT)
        t.join(10)
        os.close(fd)
    assert result == [world.files[p]]


def _daemon_pid(mnt: Path) -> int:
    out = subprocess.run(
        ["pgrep", "-f", f"mlregfs mount .* {mnt} "], capture_output=True, text=True
    )
    pids = [int(x) for x in out.stdout.split()]
    assert len(pids) == 1, out.stdout
    return pids[0]


def test_12_offline_start_from_catalog(tmp_path: Path, mount_factory) -> None:
    """Freshness. When the registry cannot be reached, the last known listing is served, also
    by a new mount started during the outage (the catalog persists in `cache_dir`); cached
    bytes keep reading, uncached ones fail with `EIO` within bounded time."""
    cache = tmp_path / "cache"
    srv = ServerProcess(tmp_path / "srv").start()
    try:
        srv.store.create_project("x/y", "private")
        token = srv.store.create_token("x/y", "reporter")
        srv.store.create_model("x/y", "m")
        v = srv.store.create_version("x/y", "m", "1.0.0")
        srv.store.add_file("x/y", v, "cached.bin", b"c" * 100_000)
        srv.store.add_file("x/y", v, "uncached.bin", b"u" * 100_000)
        m = mount_factory(f"{srv.url}/x/y", token=token, cache=cache)
        assert (m.path / "models/m/1.0.0/cached.bin").read_bytes() == b"c" * 100_000
        m.stop()
        srv.stop()
        m2 = mount_factory(
            f"{srv.url}/x/y", token=token, cache=cache, options=["timeout=2,retry_deadline=3"]
        )
        assert "starting OFFLINE" in m2.stderr()
        v_dir = m2.path / "models/m/1.0.0"
        assert sorted(os.listdir(v_dir)) == ["cached.bin", "uncached.bin"]
        assert (v_dir / "cached.bin").read_bytes() == b"c" * 100_000
        t0 = time.monotonic()
        with pytest.raises(OSError) as ei:
            (v_dir / "uncached.bin").read_bytes()
        assert ei.value.errno in (errno.EIO, errno.ETIMEDOUT)
        assert time.monotonic() - t0 < 20
        srv.restart()
        assert (v_dir / "uncached.bin").read_bytes() == b"u" * 100_000
    finally:
        srv.stop()
