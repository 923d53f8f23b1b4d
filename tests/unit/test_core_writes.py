"""The write path of the core (spool, upload on flush, overwrite, namespace) without a kernel."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import threading
from pathlib import Path

import pytest
import trio
import trio.lowlevel
import trio.testing

from mlregfs.cache.blocks import BlockStore
from mlregfs.cache.reader import DataCache
from mlregfs.errors import (
    Busy,
    Forbidden,
    InvalidPath,
    MlregfsError,
    NameTooLong,
    NotEmpty,
    NotFound,
    NotPermitted,
    RegistryUnavailable,
    to_errno,
)
from mlregfs.fs.core import Filesystem, WriteHandle
from mlregfs.registry.base import Registry
from mlregfs.registry.fake import InMemoryRegistry
from mlregfs.spool import Spool
from tests.unit.test_core import names, read_all, walk


@pytest.fixture
def reg() -> InMemoryRegistry:
    r = InMemoryRegistry()
    v = r.add_version("llama", "1.0.0")
    r.add_file(v, "config.json", b"old")
    r.add_candidate(3)
    return r


@pytest.fixture
def fs(reg: InMemoryRegistry, tmp_path: Path) -> Filesystem:
    data = DataCache(BlockStore(tmp_path / "blocks", 1 << 30), block_size=1 << 16)
    return Filesystem(reg, data, source_id="test", spool=Spool(tmp_path / "spool"))


async def write_file(fs: Filesystem, path: str, data: bytes, flags: int = 0) -> None:
    parent, _, name = path.rpartition("/")
    opened, _ = await fs.create(await walk(fs, parent), name, os.O_WRONLY | os.O_CREAT | flags)
    for off in range(0, len(data), 4096):
        await fs.write(opened.fh, off, data[off : off + 4096])
    try:
        await fs.flush(opened.fh)
    finally:
        await fs.release(opened.fh)


async def test_create_write_close_uploads(fs: Filesystem, reg: InMemoryRegistry) -> None:
    data = os.urandom(100_000)
    await fs.mkdir(await walk(fs, "models/llama/1.0.0"), "sub")  # as cp -r does
    await write_file(fs, "models/llama/1.0.0/sub/new.bin", data)
    assert await names(fs, "models/llama/1.0.0") == ["config.json", "sub"]
    assert await read_all(fs, "models/llama/1.0.0/sub/new.bin") == data
    assert reg.stats.by_kind["authorize"] == 1 and reg.stats.by_kind["upload"] == 1
    assert list(fs.spool.root.iterdir()) == []  # type: ignore[union-attr]


async def test_visible_while_written(fs: Filesystem) -> None:
    v = await walk(fs, "models/llama/1.0.0")
    opened, _ = await fs.create(v, "w.bin", os.O_WRONLY | os.O_CREAT)
    await fs.write(opened.fh, 0, b"x" * 1234)
    a = await fs.lookup(v, "w.bin")
    assert a.size == 1234
    await fs.flush(opened.fh)
    await fs.release(opened.fh)


async def test_invalid_names_refused_at_create(fs: Filesystem) -> None:
    v = await walk(fs, "models/llama/1.0.0")
    for bad in ("a(b).bin", "café.bin", "x,y", "..", "a=b"):
        with pytest.raises(InvalidPath):
            await fs.create(v, bad, os.O_WRONLY | os.O_CREAT)
    with pytest.raises(NameTooLong) as ei:
        await fs.create(v, "a" * 256, os.O_WRONLY | os.O_CREAT)
    assert to_errno(ei.value) == errno.ENAMETOOLONG
    with pytest.raises(NotPermitted):
        await fs.create(await walk(fs, "models/llama"), "f.bin", os.O_WRONLY | os.O_CREAT)


async def test_permission_checked_at_open(fs: Filesystem, reg: InMemoryRegistry) -> None:
    reg.role = 20  # reporter
    with pytest.raises(Forbidden) as ei:
        await fs.create(await walk(fs, "models/llama/1.0.0"), "f.bin", os.O_WRONLY | os.O_CREAT)
    assert to_errno(ei.value) == errno.EACCES


async def test_failed_upload_is_reported_and_kept(fs: Filesystem, reg: InMemoryRegistry) -> None:
    v = await walk(fs, "models/llama/1.0.0")
    opened, _ = await fs.create(v, "f.bin", os.O_WRONLY | os.O_CREAT)
    await fs.write(opened.fh, 0, b"precious")
    reg.down = True
    with pytest.raises(RegistryUnavailable):
        await fs.flush(opened.fh)
    await fs.release(opened.fh)
    (entry,) = fs.spool.leftovers()  # type: ignore[union-attr]
    assert entry.state == "failed" and entry.target == "models/llama/1.0.0/f.bin"
    assert fs.spool.data_path(entry.id).read_bytes() == b"precious"  # type: ignore[union-attr]
    assert entry.sha256 == hashlib.sha256(b"precious").hexdigest()


async def test_overwrite_replaces_and_deletes_old_copy(
    fs: Filesystem, reg: InMemoryRegistry
) -> None:
    ino = await walk(fs, "models/llama/1.0.0/config.json")
    opened = await fs.open(ino, os.O_WRONLY | os.O_TRUNC)
    await fs.write(opened.fh, 0, b"new!")
    await fs.flush(opened.fh)
    await fs.release(opened.fh)
    (f,) = await reg.list_files((await reg.list_models())[0].versions[0])
    assert f.older_ids == ()  # maintainer: the old copy was deleted
    assert await read_all(fs, "models/llama/1.0.0/config.json") == b"new!"


async def uploads(reg: InMemoryRegistry) -> int:
    return reg.stats.by_kind.get("upload", 0)


async def test_in_place_edit_and_append_copy_then_upload_only_changes(
    fs: Filesystem, reg: InMemoryRegistry
) -> None:
    """Semantics 43 and 44: without O_TRUNC the current bytes are copied into the spool; a
    close uploads only what changed."""
    path = "models/llama/1.0.0/config.json"
    ino = await walk(fs, path)
    opened = await fs.open(ino, os.O_RDWR)  # opened and closed without a write: nothing
    assert await fs.read(opened.fh, 0, 10) == b"old"
    await fs.flush(opened.fh)
    await fs.release(opened.fh)
    assert await uploads(reg) == 0
    opened = await fs.open(ino, os.O_WRONLY)  # an edit at an offset
    await fs.write(opened.fh, 1, b"L")
    await fs.flush(opened.fh)
    await fs.release(opened.fh)
    assert await read_all(fs, path) == b"oLd" and await uploads(reg) == 1
    opened = await fs.open(ino, os.O_WRONLY | os.O_APPEND)  # the kernel sends the offset
    await fs.write(opened.fh, 3, b"+more")
    await fs.flush(opened.fh)
    await fs.release(opened.fh)
    assert await read_all(fs, path) == b"oLd+more" and await uploads(reg) == 2
    opened = await fs.open(ino, os.O_WRONLY | os.O_TRUNC)  # the same bytes again: no copy
    await fs.write(opened.fh, 0, b"oLd+more")
    await fs.flush(opened.fh)
    await fs.release(opened.fh)
    assert await uploads(reg) == 2 and fs.uploader.stats["unchanged"] == 1
    assert list(fs.spool.root.iterdir()) == []  # type: ignore[union-attr]


async def test_temp_name_held_until_renamed(fs: Filesystem, reg: InMemoryRegistry) -> None:
    """Semantics 40 and 41: a temporary name (created with O_EXCL, as mkstemp does) is not
    uploaded at close; renaming it uploads it under the new name; removing a held file
    uploads nothing; a name that only looks temporary, written as `cp` does, uploads."""
    v = await walk(fs, "models/llama/1.0.0")
    await write_file(fs, "models/llama/1.0.0/.w.bin.Ab12Cd", b"weights", os.O_EXCL)
    assert await uploads(reg) == 0
    assert ".w.bin.Ab12Cd" in await names(fs, "models/llama/1.0.0")
    assert await read_all(fs, "models/llama/1.0.0/.w.bin.Ab12Cd") == b"weights"
    await fs.rename(v, ".w.bin.Ab12Cd", v, "w.bin")
    assert await uploads(reg) == 1
    assert await names(fs, "models/llama/1.0.0") == ["config.json", "w.bin"]
    remote = {f.path for f in await reg.list_files((await reg.list_models())[0].versions[0])}
    assert remote == {"config.json", "w.bin"}
    await write_file(fs, "models/llama/1.0.0/tmpab_cd123.json", b"junk", os.O_EXCL)
    await fs.unlink(v, "tmpab_cd123.json")
    assert await names(fs, "models/llama/1.0.0") == ["config.json", "w.bin"]
    assert await uploads(reg) == 1
    assert list(fs.spool.root.iterdir()) == []  # type: ignore[union-attr]
    await write_file(fs, "models/llama/1.0.0/tmp_results.json", b"{}")  # cp, open("w")
    assert await uploads(reg) == 2


async def test_rename_while_open_commits_and_reports(fs: Filesystem, reg: InMemoryRegistry) -> None:
    """Semantics 40: safetensors renames its temp file while it is still open: the rename
    uploads and its failure is the rename's; the close then has nothing left to upload."""
    v = await walk(fs, "models/llama/1.0.0")
    opened, _ = await fs.create(v, ".tmpQzNd3L", os.O_RDWR | os.O_CREAT | os.O_EXCL)
    await fs.write(opened.fh, 0, b"tensors")
    reg.fail_next["upload"] = Forbidden("403 Forbidden")
    with pytest.raises(Forbidden):
        await fs.rename(v, ".tmpQzNd3L", v, "model.safetensors")
    assert ".tmpQzNd3L" in await names(fs, "models/llama/1.0.0")  # kept its old name
    await fs.rename(v, ".tmpQzNd3L", v, "model.safetensors")
    await fs.flush(opened.fh)
    await fs.release(opened.fh)
    assert await uploads(reg) == 2  # the refused one and the stored one; none at close
    files = await reg.list_files((await reg.list_models())[0].versions[0])
    assert [(f.path, f.older_ids) for f in files] == [
        ("config.json", ()),
        ("model.safetensors", ()),
    ]
    assert await read_all(fs, "models/llama/1.0.0/model.safetensors") == b"tensors"
    assert await names(fs, "models/llama/1.0.0") == ["config.json", "model.safetensors"]


async def test_rename_uploaded_file_needs_maintainer(fs: Filesystem, reg: InMemoryRegistry) -> None:
    """Semantics 45: a Maintainer's rename copies and deletes; others get EACCES."""
    v = await walk(fs, "models/llama/1.0.0")
    reg.role = 30
    with pytest.raises(MlregfsError) as ei:
        await fs.rename(v, "config.json", v, "cfg.json")
    assert to_errno(ei.value) == errno.EACCES
    assert await names(fs, "models/llama/1.0.0") == ["config.json"]
    reg.role = 40
    await fs.rename(v, "config.json", v, "cfg.json")
    assert await names(fs, "models/llama/1.0.0") == ["cfg.json"]
    assert await read_all(fs, "models/llama/1.0.0/cfg.json") == b"old"
    with pytest.raises(MlregfsError) as ei:
        await fs.rename(v, "cfg.json", v, "x.json", 2)  # RENAME_EXCHANGE
    assert to_errno(ei.value) == errno.EINVAL


async def test_mkdir_model_version_and_rmdir(fs: Filesystem, reg: InMemoryRegistry) -> None:
    models = await walk(fs, "models")
    await fs.mkdir(models, "team")
    team = await walk(fs, "models/team")
    await fs.mkdir(team, "bert")  # nested model team/bert
    await fs.mkdir(await walk(fs, "models/team/bert"), "0.1.0")
    assert await names(fs, "models/team/bert") == ["0", "0.1", "0.1.0", "latest"]
    for bad in ("1.5", "v1.0.0", "01.0.0"):
        with pytest.raises(InvalidPath):
            await fs.mkdir(await walk(fs, "models/llama"), bad)
    with pytest.raises(NotPermitted):
        await fs.mkdir(await walk(fs, "candidates"), "9")
    with pytest.raises(NotEmpty):
        await fs.rmdir(await walk(fs, "models"), "llama")
    await fs.rmdir(await walk(fs, "models/team/bert"), "0.1.0")
    await fs.rmdir(team, "bert")
    assert "team/bert" not in {m.name for m in await reg.list_models()}


async def test_local_subdir_and_unlink(fs: Filesystem, reg: InMemoryRegistry) -> None:
    v = await walk(fs, "models/llama/1.0.0")
    await fs.mkdir(v, "empty")
    assert "empty" in await names(fs, "models/llama/1.0.0")
    await fs.rmdir(v, "empty")
    await fs.unlink(v, "config.json")
    with pytest.raises(NotFound):
        await walk(fs, "models/llama/1.0.0/config.json")
    reg.role = 30
    await write_file(fs, "models/llama/1.0.0/x.txt", b"x")
    with pytest.raises(Forbidden):
        await fs.unlink(v, "x.txt")  # developers upload, maintainers delete


async def test_second_writer_is_busy(fs: Filesystem) -> None:
    v = await walk(fs, "candidates/3")
    opened, _ = await fs.create(v, "m.json", os.O_WRONLY | os.O_CREAT)
    with pytest.raises(Busy):
        await fs.open(await walk(fs, "candidates/3/m.json"), os.O_WRONLY | os.O_TRUNC)
    await fs.flush(opened.fh)
    await fs.release(opened.fh)


async def test_out_of_order_and_rewritten_writes_hash_correctly(tmp_path: Path) -> None:
    from mlregfs.spool import Spool as _Spool

    sf = _Spool(tmp_path).new("src", ("c", "1"), "f.bin")
    sf.write(4, b"5678")
    sf.write(0, b"1234")
    assert sf.finish() == (8, hashlib.sha256(b"12345678").hexdigest())
    sf2 = _Spool(tmp_path).new("src", ("c", "1"), "g.bin")
    sf2.write(0, b"aaaa")
    sf2.write(4, b"bbbb")
    sf2.write(0, b"cc")  # rewrite of hashed bytes
    assert sf2.finish() == (8, hashlib.sha256(b"ccaabbbb").hexdigest())
    sf3 = _Spool(tmp_path).new("src", ("c", "1"), "h.bin")
    sf3.write(0, b"abcdef")
    sf3.truncate(3)
    assert sf3.finish() == (3, hashlib.sha256(b"abc").hexdigest())


@pytest.mark.parametrize("page_writes", [True, False], ids=["o_direct_pages", "odd_sizes"])
def test_writeback_order_is_hashed_in_one_pass(
    tmp_path: Path, page_writes: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel's writeback sends 1 MiB writes a few at a time, out of order: the running
    sha256 still covers them (no re-read at close), and the spool holds exactly the bytes,
    whether they went through O_DIRECT (whole pages) or buffered (odd sizes)."""
    from mlregfs import spool

    chunk = (1 << 20) if page_writes else 100_003
    data = os.urandom(chunk * 12 + 777)
    pieces = [(off, data[off : off + chunk]) for off in range(0, len(data), chunk)]
    rng = random.Random(3)
    order: list[tuple[int, bytes]] = []
    while pieces:  # at most 4 in flight, finishing in any order
        window = pieces[:4]
        pick = window[rng.randrange(len(window))]
        pieces.remove(pick)
        order.append(pick)
    sf = spool.Spool(tmp_path).new("src", ("c", "1"), "w.bin")
    for off, piece in order:
        sf.write(off, piece)
    rereads = 0
    real_pread = os.pread

    def counting_pread(fd: int, n: int, off: int) -> bytes:
        nonlocal rereads
        rereads += 1
        return real_pread(fd, n, off)

    monkeypatch.setattr(os, "pread", counting_pread)
    assert sf.finish() == (len(data), hashlib.sha256(data).hexdigest())
    monkeypatch.undo()
    assert rereads == 0
    assert sf.path.read_bytes() == data
    sf.close()


def test_a_gap_never_filled_falls_back_to_hashing_the_spool(tmp_path: Path) -> None:
    from mlregfs import spool

    sf = spool.Spool(tmp_path).new("src", ("c", "1"), "sparse.bin")
    sf.write(8192, b"tail")  # a hole before it: held for the hash, never completed
    assert sf.finish() == (8196, hashlib.sha256(bytes(8192) + b"tail").hexdigest())
    sf.close()


class _StallingUploads(InMemoryRegistry):
    """A registry whose PUT never answers (until cancelled, as an abandoned worker thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.put_started = trio.Event()

    async def upload(self, owner, path, source, size) -> None:
        self.put_started.set()
        await trio.sleep_forever()


def _journal_on_disk(fs: Filesystem) -> dict[str, object]:
    (p,) = fs.spool.root.glob("*.json")  # type: ignore[union-attr]
    return json.loads(p.read_text())


async def test_drain_timeout_is_a_bound_and_leaves_the_upload_interrupted(
    tmp_path: Path,
) -> None:
    """After drain_timeout the uploads in flight are abandoned: close() answers EIO at once and
    the journal stays in UPLOADING (ambiguous: `recover` asks the registry before resending)."""
    reg = _StallingUploads()
    reg.add_version("llama", "1.0.0")
    fs = _writable_fs(reg, tmp_path)
    opened, _ = await fs.create(await walk(fs, "models/llama/1.0.0"), "w.bin", os.O_CREAT)
    await fs.write(opened.fh, 0, b"stalled bytes")
    caught: list[BaseException] = []

    async def close() -> None:
        try:
            await fs.flush(opened.fh)
        except Exception as e:
            caught.append(e)
        await fs.release(opened.fh)

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(close)
            await reg.put_started.wait()
            assert fs.uploader.in_flight == 1
            assert await fs.uploader.drain(0.2) is False
    (e,) = caught
    assert to_errno(e) == errno.EIO and "recover" in str(e)
    assert fs.uploader.in_flight == 0
    assert _journal_on_disk(fs)["state"] == "uploading"
    (entry,) = fs.spool.entries()  # type: ignore[union-attr]
    assert fs.spool.data_path(entry.id).read_bytes() == b"stalled bytes"  # type: ignore[union-attr]
    # a file closed after the drain gave up is not uploaded either: kept, never sent
    opened2, _ = await fs.create(await walk(fs, "models/llama/1.0.0"), "late.bin", os.O_CREAT)
    await fs.write(opened2.fh, 0, b"late")
    with pytest.raises(MlregfsError):
        await fs.flush(opened2.fh)
    await fs.release(opened2.fh)
    states = sorted(str(e.state) for e in fs.spool.entries())  # type: ignore[union-attr]
    assert states == ["ready", "uploading"]


async def test_a_write_after_an_upload_is_journaled_as_writing(
    fs: Filesystem, reg: InMemoryRegistry
) -> None:
    """fsync uploads; later writes make the entry WRITING again on disk, so a crash before the
    next close leaves "incomplete", never "uploaded" over bytes that were not uploaded."""
    opened, _ = await fs.create(await walk(fs, "models/llama/1.0.0"), "f.bin", os.O_CREAT)
    await fs.write(opened.fh, 0, b"first")
    await fs.flush(opened.fh)  # fsync: uploaded
    assert _journal_on_disk(fs)["state"] == "uploaded"
    await fs.write(opened.fh, 5, b" and more")
    assert _journal_on_disk(fs)["state"] == "writing"
    await fs.flush(opened.fh)
    await fs.release(opened.fh)
    assert reg.stats.by_kind["upload"] == 2
    assert list(fs.spool.root.iterdir()) == []  # type: ignore[union-attr]


@pytest.mark.parametrize("queued", [True, False], ids=["queued", "direct"])
async def test_a_failed_spool_write_leaves_nothing_behind(
    reg: InMemoryRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, queued: bool
) -> None:
    """The writer is told (write or close fails with ENOSPC); then neither its partial data nor
    its journal stay in the spool, and nothing is uploaded."""
    from mlregfs.spool import SpoolFile

    def full(self: SpoolFile, off: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    fs = _writable_fs(reg, tmp_path)
    async with trio.open_nursery() as n:
        if queued:
            fs.start(n)
        opened, _ = await fs.create(await walk(fs, "models/llama/1.0.0"), "x.bin", os.O_CREAT)
        await fs.write(opened.fh, 0, b"a" * 4096)
        monkeypatch.setattr(SpoolFile, "_pwrite", full)
        with pytest.raises(OSError) as ei:
            await fs.write(opened.fh, 4096, b"b" * 4096)
            await fs.flush(opened.fh)
        assert ei.value.errno == errno.ENOSPC
        with pytest.raises(OSError):
            await fs.flush(opened.fh)  # close() fails too: nothing partial is uploaded
        await fs.release(opened.fh)
    assert reg.stats.by_kind.get("upload", 0) == 0
    assert list(fs.spool.root.iterdir()) == []  # type: ignore[union-attr]


async def test_concurrent_flushes_upload_once(fs: Filesystem, reg: InMemoryRegistry) -> None:
    """fsync and close of one file at the same time: one PUT, both see its result."""
    opened, _ = await fs.create(await walk(fs, "models/llama/1.0.0"), "c.bin", os.O_CREAT)
    await fs.write(opened.fh, 0, b"once" * 1000)
    async with trio.open_nursery() as n:
        for _ in range(3):
            n.start_soon(fs.flush, opened.fh)
    await fs.release(opened.fh)
    assert reg.stats.by_kind["upload"] == 1
    assert list(fs.spool.root.iterdir()) == []  # type: ignore[union-attr]


# -- the upload lifecycle's failure paths (review findings 3, 4, 6, 9a, 10) -----------------


async def _open_new(fs: Filesystem, name: str) -> int:
    opened, _ = await fs.create(await walk(fs, "models/llama/1.0.0"), name, os.O_CREAT)
    return opened.fh


def _stored(reg: InMemoryRegistry, name: str) -> tuple[bytes, tuple[int, ...]]:
    f, data = reg._files[("v", "llama", "1.0.0")][name]
    return data, f.older_ids


async def test_a_journal_that_cannot_be_saved_fails_close_and_nothing_is_lost(
    fs: Filesystem, reg: InMemoryRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC while journaling the close: close() gets ENOSPC, the file is still written
    (no EBUSY), and the next close uploads it (close never claims an upload it did not do)."""
    real_fsync = os.fsync
    full = False

    def fsync(fd: int) -> None:
        if full:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    fh = await _open_written(fs, "j.bin", b"data")
    full = True
    with pytest.raises(OSError) as ei:
        await fs.flush(fh)
    assert to_errno(ei.value) == errno.ENOSPC
    assert reg.stats.by_kind.get("upload", 0) == 0
    full = False
    await fs.write(fh, 4, b"more")  # not EBUSY: nothing is being uploaded
    await fs.flush(fh)
    await fs.release(fh)
    assert reg.stats.by_kind["upload"] == 1
    assert _stored(reg, "j.bin")[0] == b"datamore"
    assert list(fs.spool.root.iterdir()) == []  # type: ignore[union-attr]


class _OSErrorUploads(InMemoryRegistry):
    """The PUT fails with a plain OSError (not an MlregfsError) the first time."""

    fail = 1

    async def upload(self, owner, path, source, size) -> None:
        if self.fail:
            self.fail -= 1
            self.stats.count("upload")
            raise OSError(errno.ECONNRESET, "reset by peer")
        await super().upload(owner, path, source, size)


async def test_a_plain_oserror_from_the_put_is_reported_and_uploaded_at_the_next_close(
    tmp_path: Path,
) -> None:
    reg = _OSErrorUploads()
    reg.add_version("llama", "1.0.0")
    fs = _writable_fs(reg, tmp_path)
    fh = await _open_written(fs, "o.bin", b"payload")
    with pytest.raises(OSError) as ei:
        await fs.flush(fh)  # fsync
    assert to_errno(ei.value) == errno.ECONNRESET
    assert _journal_on_disk(fs)["state"] == "failed"
    await fs.flush(fh)  # close: uploaded now (not a silent success)
    await fs.release(fh)
    assert reg.stats.by_kind["upload"] == 2
    assert _stored(reg, "o.bin")[0] == b"payload"


async def test_a_failed_file_is_released_to_recover_at_close(
    fs: Filesystem, reg: InMemoryRegistry
) -> None:
    """While the writer holds a failed file, the journal names the daemon; at release it is
    given up (pid 0), and only then may `recover` take it."""
    fh = await _open_written(fs, "r.bin", b"kept")
    reg.down = True
    with pytest.raises(MlregfsError):
        await fs.flush(fh)
    (held,) = fs.spool.entries()  # type: ignore[union-attr]
    assert held.pid == os.getpid() and not held.orphaned()
    await fs.release(fh)
    (released,) = fs.spool.entries()  # type: ignore[union-attr]
    assert released.pid == 0 and released.orphaned() and released.state == "failed"


async def test_a_write_landing_while_the_sha256_is_computed_is_uploaded(
    fs: Filesystem, reg: InMemoryRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that lands while close computes size and sha256 is not lost: the upload sends
    the bytes as they are after it, with their own sha256."""
    from mlregfs.spool import SpoolFile

    fh = await _open_written(fs, "g.bin", b"aaaa")
    await fs.write(fh, 0, b"bbbb")  # a rewrite: close hashes the spool again
    real_finish = SpoolFile.finish
    landed = False

    def finish(self: SpoolFile) -> tuple[int, str]:
        nonlocal landed
        result = real_finish(self)
        if not landed:
            landed = True
            trio.from_thread.run(fs.write, fh, 4, b"late")
        return result

    monkeypatch.setattr(SpoolFile, "finish", finish)
    await fs.flush(fh)
    await fs.release(fh)
    assert landed
    assert _stored(reg, "g.bin")[0] == b"bbbblate"
    assert list(fs.spool.root.iterdir()) == []  # type: ignore[union-attr]


async def test_hashing_at_close_is_abandoned_when_the_drain_timeout_passes(
    fs: Filesystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spool re-hashed at close (written out of order) does not hold up shutdown."""

    release, hashing = _stall_finish(monkeypatch)
    fh = await _open_written(fs, "h.bin", b"aaaa")
    await fs.write(fh, 0, b"bbbb")
    caught: list[BaseException] = []

    async def close() -> None:
        try:
            await fs.flush(fh)
        except Exception as e:
            caught.append(e)
        await fs.release(fh)

    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as n:
                n.start_soon(close)
                await hashing.wait()
                await fs.uploader.drain(0.1, grace=1)
    finally:
        release.set()
    (e,) = caught
    assert to_errno(e) == errno.EIO and "shut down" in str(e)


async def test_an_fsynced_copy_is_replaced_by_the_final_upload(
    fs: Filesystem, reg: InMemoryRegistry
) -> None:
    """fsync -> write -> close: the fsync'd copy is deleted after the final upload, as the
    copy an O_TRUNC open replaces is (README semantics 21, Maintainer)."""
    fh = await _open_written(fs, "f.bin", b"first")
    await fs.flush(fh)  # fsync: stored
    await fs.write(fh, 5, b" and more")
    await fs.flush(fh)
    await fs.release(fh)
    assert _stored(reg, "f.bin") == (b"first and more", ())


class _StoredButTimedOut(InMemoryRegistry):
    """The first PUT is stored but its answer never comes (a timeout)."""

    lose_answer = 1

    async def upload(self, owner, path, source, size) -> None:
        from mlregfs.errors import RegistryTimeout

        await super().upload(owner, path, source, size)
        if self.lose_answer:
            self.lose_answer -= 1
            raise RegistryTimeout("PUT: no answer within 30 s")


async def test_a_timed_out_put_is_journaled_as_ambiguous_and_never_sent_twice(
    tmp_path: Path,
) -> None:
    reg = _StoredButTimedOut()
    reg.add_version("llama", "1.0.0")
    fs = _writable_fs(reg, tmp_path)
    fh = await _open_written(fs, "t.bin", b"sent once")
    with pytest.raises(MlregfsError) as ei:
        await fs.flush(fh)  # fsync
    assert to_errno(ei.value) == errno.ETIMEDOUT
    assert _journal_on_disk(fs)["state"] == "uploading"  # outcome unknown: recover asks
    await fs.flush(fh)  # close: the registry has it; not sent again
    await fs.release(fh)
    assert reg.stats.by_kind["upload"] == 1
    assert _stored(reg, "t.bin") == (b"sent once", ())
    assert list(fs.spool.root.iterdir()) == []  # type: ignore[union-attr]


async def test_a_write_after_a_timed_out_put_is_uploaded_and_replaces_it(
    tmp_path: Path,
) -> None:
    reg = _StoredButTimedOut()
    reg.add_version("llama", "1.0.0")
    fs = _writable_fs(reg, tmp_path)
    fh = await _open_written(fs, "t.bin", b"first")
    with pytest.raises(MlregfsError):
        await fs.flush(fh)
    await fs.write(fh, 5, b"+second")  # not EBUSY: no PUT is in flight
    await fs.flush(fh)
    await fs.release(fh)
    assert reg.stats.by_kind["upload"] == 2
    assert _stored(reg, "t.bin") == (b"first+second", ())


# -- review findings 2, 3, 7 (uploads-fix-2) ------------------------------------------------


async def test_a_closed_file_whose_hashing_was_cut_off_is_released_ready_for_recover(
    fs: Filesystem, reg: InMemoryRegistry, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Its writer closed it: kept as READY with no sha256 (closed, not hashed), never WRITING
    ("never closed"), and `recover retry` hashes and uploads it."""

    from mlregfs import recover

    release, hashing = _stall_finish(monkeypatch)
    fh = await _open_written(fs, "cut.bin", b"aaaa")
    await fs.write(fh, 0, b"bbbb")  # out of order: hashed again at close

    async def close() -> None:
        with pytest.raises(MlregfsError):
            await fs.flush(fh)
        await fs.release(fh)

    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as n:
                n.start_soon(close)
                await hashing.wait()
                await fs.uploader.drain(0.1, grace=1)
    finally:
        release.set()
    j = _journal_on_disk(fs)
    assert (j["state"], j["sha256"], j["size"], j["pid"]) == ("ready", None, 4, 0)
    code = await trio.to_thread.run_sync(
        lambda: recover.main(["--cache-dir", str(tmp_path), "retry"], make_registry=lambda s: reg)
    )
    assert code == 0
    assert _stored(reg, "cut.bin")[0] == b"bbbb"


async def test_a_queued_write_woken_after_close_hashed_is_ebusy_never_in_the_put(
    fs: Filesystem, reg: InMemoryRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write waiting for queue space that wakes after close took the sha256 is EBUSY: the
    PUT carries exactly the hashed bytes, and the file is uploaded once."""
    import threading

    from mlregfs.spool import SpoolFile

    real_put = SpoolFile.put
    gate = threading.Event()

    def put(self: SpoolFile, off: int, chunk: bytes) -> None:
        gate.wait(10)
        real_put(self, off, chunk)

    monkeypatch.setattr(SpoolFile, "put", put)
    for i in range(8):  # trio wakes the two waiters in either order: both are tried
        gate.clear()
        late: list[object] = []
        name = f"q{i}.bin"
        async with trio.open_nursery() as n:
            fs.start(n)
            fh = await _open_new(fs, name)
            h = fs.handles.get(fh)
            assert isinstance(h, WriteHandle) and h.writer is not None
            h.writer._limit = 4
            h.wrote = True  # as after earlier writes: this close ends the writing (no /proc)

            async def close(fh: int = fh) -> None:
                await fs.flush(fh)
                await fs.release(fh)

            async def late_write(fh: int = fh, late: list[object] = late) -> None:
                try:
                    late.append(await fs.write(fh, 4, b"bbbb"))
                except MlregfsError as e:
                    late.append(e)

            await h.upload_lock.acquire()
            n.start_soon(close)  # waits for the lock
            await trio.testing.wait_all_tasks_blocked()
            await fs.write(fh, 0, b"aaaa")  # queued; its disk write waits for the gate
            h.upload_lock.release()
            await trio.testing.wait_all_tasks_blocked()  # close waits for the queue to drain
            n.start_soon(late_write)  # waits for queue space, woken with close
            await trio.testing.wait_all_tasks_blocked()
            gate.set()
        (outcome,) = late
        assert reg.stats.by_kind["upload"] == i + 1
        if isinstance(outcome, Busy):  # woken after close took the sha256
            assert _stored(reg, name)[0] == b"aaaa"
        else:  # woken first: part of what close uploads
            assert outcome == 4 and _stored(reg, name)[0] == b"aaaabbbb"


async def test_a_write_while_the_registry_is_asked_about_a_lost_put_is_ebusy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write landing while close asks whether the timed-out PUT was stored: close is EBUSY
    (not EIO), nothing is lost, the next close uploads the new bytes."""
    reg = _StoredButTimedOut()
    reg.add_version("llama", "1.0.0")
    fs = _writable_fs(reg, tmp_path)
    fh = await _open_written(fs, "s.bin", b"first")
    with pytest.raises(MlregfsError):
        await fs.flush(fh)  # stored, answer lost
    real_stored = fs.uploader._stored

    async def stored(h, digest):
        await fs.write(fh, 5, b"+more")
        return await real_stored(h, digest)

    monkeypatch.setattr(fs.uploader, "_stored", stored)
    with pytest.raises(MlregfsError) as ei:
        await fs.flush(fh)
    assert to_errno(ei.value) == errno.EBUSY
    monkeypatch.setattr(fs.uploader, "_stored", real_stored)
    await fs.flush(fh)
    await fs.release(fh)
    assert _stored(reg, "s.bin") == (b"first+more", ())
    assert reg.stats.by_kind["upload"] == 2
    assert list(fs.spool.root.iterdir()) == []  # type: ignore[union-attr]


class _ListingDown(_StoredButTimedOut):
    list_down = False

    async def list_files(self, owner):
        if self.list_down:
            raise RegistryUnavailable("registry unreachable")
        return await super().list_files(owner)


async def test_a_lost_put_is_never_judged_from_a_cached_listing(tmp_path: Path) -> None:
    """Whether a timed-out PUT was stored is asked of the registry itself: in an outage the
    catalog's stale listing (without it) would make close send the bytes a second time."""
    from mlregfs.registry.catalog import CatalogRegistry

    inner = _ListingDown()
    inner.add_version("llama", "1.0.0")
    reg = CatalogRegistry(inner, tmp_path / "catalog" / "c.json")
    fs = _writable_fs(reg, tmp_path, origin=inner)  # as mount.py wires it
    fh = await _open_written(fs, "c.bin", b"sent once")  # the catalog has a listing without c.bin
    with pytest.raises(MlregfsError):
        await fs.flush(fh)
    inner.list_down = True
    with pytest.raises(MlregfsError) as ei:
        await fs.flush(fh)
    assert to_errno(ei.value) != errno.EBUSY
    assert inner.stats.by_kind["upload"] == 1
    inner.list_down = False
    await fs.flush(fh)
    await fs.release(fh)
    assert inner.stats.by_kind["upload"] == 1
    assert _stored(inner, "c.bin") == (b"sent once", ())


def _stall_finish(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, trio.Event]:
    """Make close's hashing (`SpoolFile.finish`) wait in its thread until `release` is set;
    `hashing` is set once it started."""
    from mlregfs.spool import SpoolFile

    release = threading.Event()
    hashing = trio.Event()
    token = trio.lowlevel.current_trio_token()
    real_finish = SpoolFile.finish

    def finish(self: SpoolFile) -> tuple[int, str]:
        token.run_sync_soon(hashing.set)
        release.wait(20)
        return real_finish(self)

    monkeypatch.setattr(SpoolFile, "finish", finish)
    return release, hashing


def _writable_fs(reg: Registry, tmp_path: Path, origin: Registry | None = None) -> Filesystem:
    """A writable core over `reg`, with its cache and spool under `tmp_path`."""
    data = DataCache(BlockStore(tmp_path / "blocks", 1 << 30), block_size=1 << 16)
    spool = Spool(tmp_path / "spool")
    return Filesystem(reg, data, source_id="test", spool=spool, origin=origin)


async def _open_written(fs: Filesystem, name: str, data: bytes) -> int:
    """A new file `name` in llama/1.0.0 holding `data` (written, not closed): its handle."""
    fh = await _open_new(fs, name)
    await fs.write(fh, 0, data)
    return fh


class _GatedUploads(InMemoryRegistry):
    """Uploads wait for `gate` (when set): a close's upload is in flight for as long as a
    test needs."""

    def __init__(self) -> None:
        super().__init__()
        self.gate: trio.Event | None = None
        self.entered = trio.Event()
        self.paths: list[str] = []

    async def upload(self, owner, path, source, size):
        self.paths.append(path)
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        await super().upload(owner, path, source, size)


@pytest.fixture
def greg() -> _GatedUploads:
    r = _GatedUploads()
    v = r.add_version("llama", "1.0.0")
    r.add_file(v, "config.json", b"old")
    r.add_file(v, "b.bin", b"B-previous")
    return r


@pytest.fixture
def gfs(greg: _GatedUploads, tmp_path: Path) -> Filesystem:
    data = DataCache(BlockStore(tmp_path / "blocks", 1 << 30), block_size=1 << 16)
    return Filesystem(greg, data, source_id="test", spool=Spool(tmp_path / "spool"))


async def _registry(reg: InMemoryRegistry) -> dict[str, bytes]:
    v = (await reg.list_models())[0].versions[0]
    return {f.path: bytes(await reg.read_range(v, f, 0, f.size)) for f in await reg.list_files(v)}


@pytest.mark.parametrize("closer", ["flush", "release"])
async def test_a_rename_during_an_upload_waits_for_it(
    gfs: Filesystem, greg: _GatedUploads, closer: str
) -> None:
    """Semantics 40: `mv a.bin b.bin` while a close (flush, or the release after a close that
    did not upload) is uploading a.bin: the upload ends first, then the rename moves the
    uploaded file (copy and delete); nothing is lost and nothing deleted by mistake."""
    v = await walk(gfs, "models/llama/1.0.0")
    opened, _ = await gfs.create(v, "a.bin", os.O_WRONLY | os.O_CREAT)
    await gfs.write(opened.fh, 0, b"A-new")
    greg.gate = trio.Event()
    async with trio.open_nursery() as n:
        n.start_soon(gfs.flush if closer == "flush" else gfs.release, opened.fh)
        await greg.entered.wait()
        n.start_soon(gfs.rename, v, "a.bin", v, "b.bin")
        await trio.sleep(0.05)
        greg.gate.set()
    if closer == "flush":
        await gfs.release(opened.fh)
    assert await _registry(greg) == {"config.json": b"old", "b.bin": b"A-new"}
    assert await names(gfs, "models/llama/1.0.0") == ["b.bin", "config.json"]


async def test_a_reopen_refused_during_an_upload_leaves_no_handle(
    gfs: Filesystem, greg: _GatedUploads
) -> None:
    """A `> f` that arrives while the release of f is uploading gets EBUSY and leaves
    nothing behind (no handle the kernel never got)."""
    v = await walk(gfs, "models/llama/1.0.0")
    opened, _ = await gfs.create(v, "r.bin", os.O_WRONLY | os.O_CREAT)
    await gfs.write(opened.fh, 0, b"first")
    greg.gate = trio.Event()
    async with trio.open_nursery() as n:
        n.start_soon(gfs.release, opened.fh)
        await greg.entered.wait()
        ino = await walk(gfs, "models/llama/1.0.0/r.bin")
        with pytest.raises(Busy):
            await gfs.open(ino, os.O_WRONLY | os.O_TRUNC)
        greg.gate.set()
    assert not list(gfs.handles)
    assert (await _registry(greg))["r.bin"] == b"first"


async def test_a_developer_cannot_remove_a_file_being_overwritten(
    gfs: Filesystem, greg: _GatedUploads
) -> None:
    """`rm` of a file whose new copy is being written, by a role that cannot delete the
    registry's copies: EACCES, and the writer's bytes are still uploaded at close."""
    greg.role = 30
    v = await walk(gfs, "models/llama/1.0.0")
    ino = await walk(gfs, "models/llama/1.0.0/config.json")
    opened = await gfs.open(ino, os.O_WRONLY | os.O_TRUNC)
    await gfs.write(opened.fh, 0, b"new bytes")
    with pytest.raises(MlregfsError) as ei:
        await gfs.unlink(v, "config.json")
    assert to_errno(ei.value) == errno.EACCES
    await gfs.flush(opened.fh)
    await gfs.release(opened.fh)
    assert (await _registry(greg))["config.json"] == b"new bytes"


async def test_readers_see_the_registry_while_an_edit_copies_it_in(
    gfs: Filesystem, greg: _GatedUploads
) -> None:
    """Semantics 43: while an in-place open copies the current bytes into the spool, a
    reader gets the whole file (from the registry), never the partial copy."""
    big = os.urandom(4 << 20)
    greg.add_file((await greg.list_models())[0].versions[0], "big.bin", big)
    ino = await walk(gfs, "models/llama/1.0.0/big.bin")
    seen: dict[str, object] = {}
    async with trio.open_nursery() as n:

        async def editor() -> None:
            seen["w"] = await gfs.open(ino, os.O_RDWR)

        n.start_soon(editor)
        for _ in range(500):
            await trio.sleep(0.001)
            if gfs._writing:
                assert (await gfs.getattr(ino)).size == len(big)
                r = await gfs.open(ino, os.O_RDONLY)
                seen["read"] = await gfs.read(r.fh, 0, len(big))
                await gfs.release(r.fh)
                break
    assert seen.get("read") == big
    w = seen["w"]
    assert hasattr(w, "fh")
    await gfs.release(w.fh)


@pytest.mark.parametrize("then", ["unlink", "rename"])
async def test_a_temporary_file_removed_or_renamed_while_its_release_hashes_it(
    gfs: Filesystem, greg: _GatedUploads, then: str
) -> None:
    """Semantics 40 and 41: the close of rsync's temporary file returns after FLUSH while
    RELEASE still hashes it; an unlink then uploads nothing, a rename uploads it once."""
    v = await walk(gfs, "models/llama/1.0.0")
    opened, _ = await gfs.create(v, ".c.bin.Ab12Cd", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    await gfs.write(opened.fh, 4096, b"y" * 4096)  # out of order: hashed again at close
    await gfs.write(opened.fh, 0, b"x" * 4096)
    await gfs.flush(opened.fh)
    async with trio.open_nursery() as n:
        n.start_soon(gfs.release, opened.fh)
        await trio.lowlevel.checkpoint()
        if then == "unlink":
            await gfs.unlink(v, ".c.bin.Ab12Cd")
        else:
            await gfs.rename(v, ".c.bin.Ab12Cd", v, "c.bin")
    reg = await _registry(greg)
    assert reg.get("c.bin") == (None if then == "unlink" else b"x" * 4096 + b"y" * 4096)
    assert greg.paths == ([] if then == "unlink" else ["c.bin"])
    assert list(gfs.spool.root.iterdir()) == []  # type: ignore[union-attr]


async def test_a_close_during_a_committing_rename_finishes_the_file(
    gfs: Filesystem, greg: _GatedUploads
) -> None:
    """Semantics 40: the writer's close arrives while its rename uploads: the close is
    counted (nothing stays "being written"), and the file can be written again later."""
    v = await walk(gfs, "models/llama/1.0.0")
    opened, _ = await gfs.create(v, "a.bin", os.O_WRONLY | os.O_CREAT)
    await gfs.write(opened.fh, 0, b"A")
    greg.gate = trio.Event()

    async def close() -> None:
        await gfs.flush(opened.fh)  # waits for the rename's upload, then has nothing to do
        await gfs.release(opened.fh)

    async with trio.open_nursery() as n:
        n.start_soon(gfs.rename, v, "a.bin", v, "b.bin")
        await greg.entered.wait()
        n.start_soon(close)
        await trio.sleep(0.05)
        greg.gate.set()
    assert not gfs._writing and greg.paths == ["b.bin"]
    assert (await _registry(greg))["b.bin"] == b"A"
    again = await gfs.open(await walk(gfs, "models/llama/1.0.0/b.bin"), os.O_WRONLY | os.O_TRUNC)
    await gfs.release(again.fh)


async def test_the_new_name_is_taken_while_a_rename_uploads(
    gfs: Filesystem, greg: _GatedUploads
) -> None:
    """Semantics 40: while a held file's rename uploads under `c.bin`, creating `c.bin` is
    EBUSY (it is being uploaded), so no other writer's bytes are silently dropped."""
    v = await walk(gfs, "models/llama/1.0.0")
    opened, _ = await gfs.create(v, ".a.bin.Ab12Cd", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    await gfs.write(opened.fh, 0, b"A")
    await gfs.flush(opened.fh)
    await gfs.release(opened.fh)
    greg.gate = trio.Event()
    async with trio.open_nursery() as n:
        n.start_soon(gfs.rename, v, ".a.bin.Ab12Cd", v, "c.bin")
        await greg.entered.wait()
        with pytest.raises(Busy):
            await gfs.create(v, "c.bin", os.O_WRONLY | os.O_CREAT)
        greg.gate.set()
    assert (await _registry(greg))["c.bin"] == b"A"
    assert list(gfs.spool.root.iterdir()) == []  # type: ignore[union-attr]


async def test_a_rename_waits_for_an_in_place_open_to_copy_in(
    gfs: Filesystem, greg: _GatedUploads
) -> None:
    """Semantics 43: a rename of a file whose in-place open is still copying its bytes in is
    EBUSY; nothing half-copied is uploaded and the open completes."""
    big = os.urandom(4 << 20)
    greg.add_file((await greg.list_models())[0].versions[0], "big.bin", big)
    v = await walk(gfs, "models/llama/1.0.0")
    ino = await walk(gfs, "models/llama/1.0.0/big.bin")
    seen: dict[str, object] = {}
    async with trio.open_nursery() as n:

        async def editor() -> None:
            seen["w"] = await gfs.open(ino, os.O_RDWR)

        n.start_soon(editor)
        for _ in range(500):
            await trio.sleep(0.001)
            if any(w.copying for w in gfs._writing.values()):
                with pytest.raises(Busy):
                    await gfs.rename(v, "big.bin", v, "moved.bin")
                seen["refused"] = True
                break
    w = seen["w"]
    assert hasattr(w, "fh")
    await gfs.release(w.fh)
    assert seen.get("refused") and (await _registry(greg))["big.bin"] == big
