"""The filesystem core driven without a kernel, over InMemoryRegistry."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest
import trio
import trio.testing

from mlregfs.cache.blocks import BlockStore
from mlregfs.cache.reader import DataCache
from mlregfs.errors import IntegrityError, NotFound, ReadOnly, RegistryUnavailable, to_errno
from mlregfs.fs.core import ROOT_INO, Filesystem
from mlregfs.registry.catalog import CatalogRegistry
from mlregfs.registry.fake import InMemoryRegistry

BS = 64 << 10


@pytest.fixture
def reg() -> InMemoryRegistry:
    r = InMemoryRegistry()
    v1 = r.add_version("llama", "1.0.0")
    r.add_version("llama", "2.0.0-rc.1")
    r.add_file(v1, "config.json", b'{"a": 1}')
    r.add_file(v1, "weights/model.bin", os.urandom(5 * BS + 123))
    t = r.add_version("team/bert", "0.1.0")
    r.add_file(t, "README.md", b"hello")
    r.add_version("team", "1.0.0")
    r.add_version("team/1.0.0", "9.9.9")  # collides with version 1.0.0 of model "team"
    c = r.add_candidate(7)
    r.add_file(c, "metrics.json", b"{}")
    return r


@pytest.fixture
def fs(reg: InMemoryRegistry, tmp_path) -> Filesystem:
    data = DataCache(BlockStore(tmp_path / "blocks", 64 * BS), block_size=BS, readahead=0)
    return Filesystem(reg, data, source_id="test")


async def walk(fs: Filesystem, path: str) -> int:
    ino = ROOT_INO
    for part in [p for p in path.split("/") if p]:
        ino = (await fs.lookup(ino, part)).ino
    return ino


async def names(fs: Filesystem, path: str) -> list[str]:
    return [n for n, _ in await fs.readdir(await walk(fs, path))]


async def read_all(fs: Filesystem, path: str, chunk: int = 128 << 10) -> bytes:
    opened = await fs.open(await walk(fs, path), os.O_RDONLY)
    out = bytearray()
    try:
        while True:
            b = await fs.read(opened.fh, len(out), chunk)
            if not b:
                return bytes(out)
            out += b
    finally:
        await fs.release(opened.fh)


async def test_layout(fs: Filesystem) -> None:
    assert await names(fs, "") == ["candidates", "models"]
    assert await names(fs, "models") == ["llama", "team"]
    # semver alias links (README Semantics 47): no link for the prerelease-only major 2
    assert await names(fs, "models/llama") == ["1", "1.0", "1.0.0", "2.0.0-rc.1", "latest"]
    assert await names(fs, "models/llama/1.0.0") == ["config.json", "weights"]
    assert await names(fs, "models/llama/1.0.0/weights") == ["model.bin"]
    assert await names(fs, "candidates") == ["7"]
    assert await names(fs, "candidates/7") == ["metrics.json"]


async def test_nested_model_names_and_collision(fs: Filesystem) -> None:
    # model "team" has version 1.0.0 and model "team/bert" nests; "team/1.0.0" is hidden
    assert await names(fs, "models/team") == ["1", "1.0", "1.0.0", "bert", "latest"]
    assert await names(fs, "models/team/bert/0.1.0") == ["README.md"]
    assert await names(fs, "models/team/1.0.0") == []


async def test_dotdot(fs: Filesystem) -> None:
    ino = await walk(fs, "models/team/bert/0.1.0")
    up = await fs.lookup(ino, "..")
    assert up.ino == await walk(fs, "models/team/bert")


async def test_attrs(fs: Filesystem, reg: InMemoryRegistry) -> None:
    a = await fs.getattr(await walk(fs, "models/llama/1.0.0/weights/model.bin"))
    assert not a.is_dir and a.size == 5 * BS + 123
    assert a.mode(False) & 0o777 == 0o444 and a.mode(True) & 0o777 == 0o644
    d = await fs.getattr(await walk(fs, "models/llama/1.0.0"))
    assert d.is_dir and d.mode(False) & 0o777 == 0o555 and d.mode(True, 0o027) & 0o777 == 0o750


async def test_missing_is_enoent(fs: Filesystem) -> None:
    with pytest.raises(NotFound) as ei:
        await walk(fs, "models/llama/3.0.0")
    assert to_errno(ei.value) == errno.ENOENT


async def test_read_exact_bytes(fs: Filesystem, reg: InMemoryRegistry) -> None:
    want = reg._files[("v", "llama", "1.0.0")]["weights/model.bin"][1]
    got = await read_all(fs, "models/llama/1.0.0/weights/model.bin", 100_000)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(want).hexdigest()


async def test_lazy_read(fs: Filesystem, reg: InMemoryRegistry) -> None:
    opened = await fs.open(await walk(fs, "models/llama/1.0.0/weights/model.bin"), os.O_RDONLY)
    before = reg.stats.bytes_downloaded
    assert len(await fs.read(opened.fh, 3 * BS + 10, 4096)) == 4096
    assert reg.stats.bytes_downloaded - before == BS  # one block, not the file
    await fs.release(opened.fh)


async def test_write_open_refused(fs: Filesystem) -> None:
    with pytest.raises(ReadOnly):
        await fs.open(await walk(fs, "models/llama/1.0.0/config.json"), os.O_WRONLY)


async def test_corrupt_small_file_never_served(fs: Filesystem, reg: InMemoryRegistry) -> None:
    reg.corrupt.add("config.json")
    with pytest.raises(IntegrityError):
        await read_all(fs, "models/llama/1.0.0/config.json")
    reg.corrupt.clear()
    assert await read_all(fs, "models/llama/1.0.0/config.json") == b'{"a": 1}'


async def test_corrupt_large_file_fails_and_is_discarded(
    fs: Filesystem, reg: InMemoryRegistry
) -> None:
    reg.corrupt.add("weights/model.bin")
    with pytest.raises(IntegrityError):
        await read_all(fs, "models/llama/1.0.0/weights/model.bin")
    assert fs.data.store.stats.stored_bytes == 0
    reg.corrupt.clear()
    got = await read_all(fs, "models/llama/1.0.0/weights/model.bin")
    assert len(got) == 5 * BS + 123


async def test_outage_serves_known_listing(reg: InMemoryRegistry, tmp_path: Path) -> None:
    # as mounted: the catalog is the one layer that answers during an outage
    data = DataCache(BlockStore(tmp_path / "blocks", 64 * BS), block_size=BS, readahead=0)
    fs = Filesystem(CatalogRegistry(reg, tmp_path / "catalog"), data, source_id="test")
    assert await names(fs, "models/llama/1.0.0") == ["config.json", "weights"]
    await read_all(fs, "models/llama/1.0.0/config.json")
    fs.meta.invalidate()
    reg.down = True
    # listings come from the last known answer; cached bytes still read
    assert await names(fs, "models/llama/1.0.0") == ["config.json", "weights"]
    assert await read_all(fs, "models/llama/1.0.0/config.json") == b'{"a": 1}'
    with pytest.raises(RegistryUnavailable):
        await read_all(fs, "models/llama/1.0.0/weights/model.bin")


async def test_listing_is_cached(fs: Filesystem, reg: InMemoryRegistry) -> None:
    await names(fs, "models/llama/1.0.0")
    n = reg.stats.requests
    for _ in range(3):
        await names(fs, "models/llama/1.0.0/weights")
        await names(fs, "models")
    assert reg.stats.requests == n


async def test_reads_after_a_mismatch_keep_failing_until_reopen(
    fs: Filesystem, reg: InMemoryRegistry
) -> None:
    """The kernel retries a failed read page by page: no retry may return unverified bytes."""
    reg.corrupt.add("weights/model.bin")
    opened = await fs.open(await walk(fs, "models/llama/1.0.0/weights/model.bin"), os.O_RDONLY)
    with pytest.raises(IntegrityError):
        off = 0
        while True:
            b = await fs.read(opened.fh, off, 100_000)
            if not b:
                break
            off += len(b)
    for retry_off in (0, 5 * BS, 3 * BS + 7):
        with pytest.raises(IntegrityError):
            await fs.read(opened.fh, retry_off, 4096)
    await fs.release(opened.fh)
    reg.corrupt.clear()
    assert len(await read_all(fs, "models/llama/1.0.0/weights/model.bin")) == 5 * BS + 123


async def test_kernel_keeps_pages_only_of_verified_files(fs: Filesystem) -> None:
    path = "models/llama/1.0.0/weights/model.bin"
    ino = await walk(fs, path)
    first = await fs.open(ino, os.O_RDONLY)
    assert not first.keep_cache  # unchecked bytes: the kernel drops its pages at open
    await fs.read(first.fh, 0, 4096)
    await fs.release(first.fh)
    assert not (await fs.open(ino, os.O_RDONLY)).keep_cache  # partly read: still unchecked
    await read_all(fs, path)  # read to the end: checked against its sha256
    again = await fs.open(ino, os.O_RDONLY)
    assert again.keep_cache
    await fs.release(again.fh)


async def test_mismatch_names_the_open_inodes_to_invalidate(
    fs: Filesystem, reg: InMemoryRegistry
) -> None:
    reg.corrupt.add("weights/model.bin")
    dropped: list[set[int]] = []
    fs.data.on_corrupt = lambda key: dropped.append(fs.inodes_of(key))
    ino = await walk(fs, "models/llama/1.0.0/weights/model.bin")
    with pytest.raises(IntegrityError):
        await read_all(fs, "models/llama/1.0.0/weights/model.bin")
    assert dropped == [{ino}]


async def test_forget_drops_unused_inodes_and_never_reuses_numbers(fs: Filesystem) -> None:
    ino = await walk(fs, "models/llama/1.0.0/config.json")
    known = set(fs.inodes._node_of)
    for i in known - {ROOT_INO}:
        fs.remember(i, 2)
    for i in known:
        fs.forget(i, 1)
    assert set(fs.inodes._node_of) == known  # one reference left each
    opened = await fs.open(ino, os.O_RDONLY)
    for i in known:
        fs.forget(i, 1)
    assert set(fs.inodes._node_of) == {ROOT_INO, ino}  # the root stays; so does an open file
    assert len(fs.inodes._ino_of) == 2
    assert ino in fs._page_source  # which file state its pages came from
    await fs.release(opened.fh)
    assert set(fs.inodes._node_of) == {ROOT_INO}
    assert not fs._page_source  # a forgotten inode has no pages: nothing kept for it
    again = await walk(fs, "models/llama/1.0.0/config.json")
    assert again not in known  # a new number, never one given out before
    assert await read_all(fs, "models/llama/1.0.0/config.json") == b'{"a": 1}'


async def test_listing_being_read_keeps_its_inodes(fs: Filesystem) -> None:
    entries = await fs.readdir(await walk(fs, "models/llama"))
    inos = [a.ino for _, a in entries]
    fs.hold(inos)
    for i in inos:
        fs.remember(i)
        fs.forget(i, 1)
    assert all(i in fs.inodes._node_of for i in inos)
    fs.unhold(inos)
    assert not any(i in fs.inodes._node_of for i in inos)


async def test_forget_during_a_lookup_never_answers_a_forgotten_inode(fs: Filesystem) -> None:
    """A FORGET that arrives while a lookup of the same name awaits the registry: the lookup
    still answers an inode the daemon knows (a fresh number if the old one was dropped)."""
    parent = await walk(fs, "models/llama/1.0.0")
    old = (await fs.lookup(parent, "config.json")).ino
    fs.remember(old)  # the kernel holds it
    gate = trio.Event()
    real = fs._remote_file

    async def slow(node):
        await gate.wait()
        return await real(node)

    fs._remote_file = slow  # type: ignore[method-assign]
    got = []
    async with trio.open_nursery() as n:

        async def lookup() -> None:
            a = await fs.lookup(parent, "config.json")
            fs.remember(a.ino)  # as the adapter does, in the same step
            got.append(a.ino)

        n.start_soon(lookup)
        await trio.testing.wait_all_tasks_blocked()
        fs.forget(old, 1)  # the kernel dropped its entry meanwhile
        gate.set()
    fs._remote_file = real  # type: ignore[method-assign]
    assert (await fs.getattr(got[0])).size == len(b'{"a": 1}')


async def test_forget_during_a_listing_never_holds_a_forgotten_inode(fs: Filesystem) -> None:
    parent = await walk(fs, "models/llama/1.0.0")
    old = (await fs.lookup(parent, "config.json")).ino
    fs.remember(old)
    gate = trio.Event()
    real, real_tree = fs._remote_file, fs.file_tree
    listed = False

    async def remote(node):
        nonlocal listed
        f = await real(node)
        listed = True  # config.json has its attributes: the next entry waits
        return f

    async def tree(owner):
        if listed:
            await gate.wait()
        return await real_tree(owner)

    fs._remote_file = remote  # type: ignore[method-assign]
    fs.file_tree = tree  # type: ignore[method-assign]
    got = []
    async with trio.open_nursery() as n:

        async def opendir() -> None:
            entries = await fs.readdir(parent)
            fs.hold([a.ino for _, a in entries])  # as the adapter does, in the same step
            got.extend(entries)

        n.start_soon(opendir)
        await trio.testing.wait_all_tasks_blocked()
        assert listed
        fs.forget(old, 1)
        gate.set()
    fs._remote_file, fs.file_tree = real, real_tree  # type: ignore[method-assign]
    assert [n for n, _ in got] == ["config.json", "weights"]
    for _, a in got:
        await fs.getattr(a.ino)


async def test_failed_lookup_takes_no_inode_number(fs: Filesystem, reg: InMemoryRegistry) -> None:
    parent = await walk(fs, "models/llama/1.0.0")
    before = len(fs.inodes._node_of)
    real = fs._remote_file

    async def gone(node):
        raise NotFound("deleted meanwhile")

    fs._remote_file = gone  # type: ignore[method-assign]
    with pytest.raises(NotFound):
        await fs.lookup(parent, "config.json")
    fs._remote_file = real  # type: ignore[method-assign]
    assert len(fs.inodes._node_of) == before


async def test_no_page_invalidation_after_the_session_closes(
    fs: Filesystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An invalidation spawned on a mismatch may run after the FUSE loop ended: it must
    never reach a closed session."""
    import pyfuse3

    from mlregfs.fuse_ops import Operations

    calls: list[int] = []
    monkeypatch.setattr(pyfuse3, "invalidate_inode", lambda ino, attr_only=False: calls.append(ino))
    ops = Operations(fs)
    monkeypatch.setattr(pyfuse3, "trio_token", trio.lowlevel.current_trio_token(), raising=False)
    await ops._invalidate(5)
    assert calls == [5]  # while the loop runs
    ops.close_session()
    await ops._invalidate(6)
    monkeypatch.setattr(pyfuse3, "trio_token", None, raising=False)
    ops._closing = False
    await ops._invalidate(7)  # pyfuse3.main has returned
    assert calls == [5]


async def test_pages_of_another_path_with_the_same_bytes_are_not_kept(
    fs: Filesystem, reg: InMemoryRegistry
) -> None:
    """Bullet 15 only for checked pages: v1/f read in part (a corrupt download) and closed
    unchecked; the same bytes under another path are then verified. v1/f's next open is
    verified too (same cache key), but its kernel pages are the unchecked ones: dropped."""
    blob = os.urandom(5 * BS + 7)
    v1 = reg.add_version("same", "1.0.0")
    v2 = reg.add_version("same", "2.0.0")
    reg.add_file(v1, "a/f.bin", blob)
    reg.add_file(v2, "b/f.bin", blob)
    ino = await walk(fs, "models/same/1.0.0/a/f.bin")
    reg.corrupt.add("a/f.bin")
    first = await fs.open(ino, os.O_RDONLY)
    assert not first.keep_cache
    await fs.read(first.fh, 0, 4096)  # the kernel caches these (wrong) bytes
    await fs.release(first.fh)
    reg.corrupt.clear()
    with pytest.raises(IntegrityError):  # the corrupt block was stored: EIO, discarded
        await read_all(fs, "models/same/2.0.0/b/f.bin")
    assert await read_all(fs, "models/same/2.0.0/b/f.bin") == blob  # fetched again: verified
    again = await fs.open(ino, os.O_RDONLY)
    assert not again.keep_cache  # the pages of the first open were never checked
    await fs.release(again.fh)
    third = await fs.open(ino, os.O_RDONLY)
    assert third.keep_cache  # dropped at the last open, which was verified
    await fs.release(third.fh)


def test_no_page_invalidation_starts_once_the_session_is_closing(
    fs: Filesystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close_session waits for an invalidation in progress; one that is queued behind it
    never starts (pyfuse3.close() frees the session it would use)."""
    import threading

    import pyfuse3

    from mlregfs.fuse_ops import Operations

    inside, release = threading.Event(), threading.Event()
    calls: list[int] = []

    def invalidate(ino: int, attr_only: bool = False) -> None:
        calls.append(ino)
        inside.set()
        release.wait(10)

    monkeypatch.setattr(pyfuse3, "invalidate_inode", invalidate)
    monkeypatch.setattr(pyfuse3, "trio_token", object(), raising=False)
    ops = Operations(fs)

    def run(ino: int) -> None:
        trio.run(ops._invalidate, ino)

    a = threading.Thread(target=run, args=(1,))
    a.start()
    assert inside.wait(5)
    closer = threading.Thread(target=ops.close_session)
    closer.start()
    b = threading.Thread(target=run, args=(2,))
    for _ in range(100):  # closing is announced at once, before the wait
        if ops._closing:
            break
        threading.Event().wait(0.01)
    assert ops._closing
    b.start()
    release.set()
    for t in (a, closer, b):
        t.join(10)
    assert calls == [1]


def test_cache_key_is_the_lowercase_sha256_or_the_file_identity(fs: Filesystem) -> None:
    """A valid sha256 (any case) names the cache entry, lowercased; a missing or malformed
    one gives the registry's file identity."""
    from mlregfs.registry.types import RemoteFile

    sha = hashlib.sha256(b"x").hexdigest()

    def key(sha256: str | None, file_id: int = 1) -> str:
        return fs.cache_key(RemoteFile("m.bin", 1, sha256, 0.0, file_id, 1))

    assert key(sha) == key(sha.upper()) == sha
    for bad in (None, "", sha[:-1], sha + "0", sha[:-1] + "g", sha + "\n", " " + sha):
        assert key(bad).startswith("f") and key(bad) != key(bad, file_id=2)


async def test_listing_a_model_fetches_its_versions_file_lists_ahead(
    fs: Filesystem, reg: InMemoryRegistry
) -> None:
    """README Semantics 12: a walk that lists a model directory finds its versions' file
    lists fetched (or in flight), a few at once, without a lookup of each."""
    for v in ("1.1.0", "1.2.0", "1.3.0"):
        reg.add_file(reg.add_version("llama", v), "x.bin", b"x")
    async with trio.open_nursery() as nursery:
        fs.start(nursery)
        await names(fs, "models/llama")
        await trio.testing.wait_all_tasks_blocked()
        assert reg.stats.by_kind["list_files"] == 5  # 1.0.0, 1.1.0-1.3.0, the rc
        await names(fs, "models/llama/1.2.0")  # the walk's own listing: already there
        assert reg.stats.by_kind["list_files"] == 5
        nursery.cancel_scope.cancel()


async def test_an_open_reads_the_verified_marker_off_the_event_loop(
    reg: InMemoryRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file verified by an earlier mount: its marker is read from disk in a worker thread
    (blocking disk calls never run on the FUSE loop)."""
    import threading

    def mount() -> Filesystem:
        data = DataCache(BlockStore(tmp_path / "blocks", 64 * BS), block_size=BS, readahead=0)
        return Filesystem(reg, data, source_id="test")

    path = "models/llama/1.0.0/weights/model.bin"
    await read_all(mount(), path)  # read whole: verified, its marker written
    readers: list[bool] = []
    real = BlockStore.verified_digests

    def spy(self: BlockStore, *args: object, **kw: object) -> object:
        readers.append(threading.current_thread() is threading.main_thread())
        return real(self, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(BlockStore, "verified_digests", spy)
    fs = mount()  # a new mount over the same cache
    opened = await fs.open(await walk(fs, path), os.O_RDONLY)
    await fs.release(opened.fh)
    assert readers == [False]  # read once, and not on the event loop's thread


async def test_a_failing_prefetch_does_not_end_the_mount(
    fs: Filesystem, reg: InMemoryRegistry
) -> None:
    """The read-ahead of version listings runs in the mount's nursery: whatever it raises is
    logged, and the walk's own lookup reports the error."""
    reg.fail_next["list_files"] = RuntimeError("a bug, not a registry answer")
    async with trio.open_nursery() as nursery:
        fs.start(nursery)
        await names(fs, "models/llama")
        await trio.testing.wait_all_tasks_blocked()
        assert await names(fs, "models/llama/1.0.0") == ["config.json", "weights"]
        nursery.cancel_scope.cancel()
