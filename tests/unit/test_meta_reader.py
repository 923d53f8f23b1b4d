"""MetadataCache single-flight/stale answers and DataCache read-ahead, without a kernel."""

from __future__ import annotations

import hashlib
import mmap
import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from mlregfs.cache.blocks import BlockStore
from mlregfs.cache.meta import MetadataCache
from mlregfs.cache.reader import DataCache, FairLimiter, FileSpec, ReadStream
from mlregfs.errors import (
    IntegrityError,
    ProtocolError,
    RegistryTimeout,
)


async def test_single_flight_shares_one_fetch() -> None:
    mc = MetadataCache()
    calls = 0

    async def fetch() -> int:
        nonlocal calls
        calls += 1
        await trio.sleep(0.05)
        return 42

    results: list[int] = []
    async with trio.open_nursery() as n:
        for _ in range(5):
            n.start_soon(lambda: _append(results, mc.get("k", fetch, 10)))
    assert results == [42] * 5 and calls == 1


async def _append(out: list[int], aw: Awaitable[int]) -> None:
    out.append(await aw)


async def test_readahead_fetches_ahead_of_sequential_reader(tmp_path: Path) -> None:
    bs = 1 << 16
    data = bytes(range(256)) * (bs * 10 // 256)
    fetched: list[int] = []

    async def fetch(start: int, end: int) -> bytes:
        fetched.append(start // bs)
        return data[start:end]

    dc = DataCache(BlockStore(tmp_path, 1 << 30), block_size=bs, readahead=3)
    spec = FileSpec(
        "k" + hashlib.sha256(data).hexdigest()[:10], len(data), hashlib.sha256(data).hexdigest()
    )
    async with trio.open_nursery() as n:
        dc.start(n)
        cf = dc.open(spec, fetch)
        stream = ReadStream()
        got = bytearray()
        for off in range(0, len(data), 4096 * 4):
            got += await dc.read(cf, off, 4096 * 4, stream)
        dc.close(cf)
    assert bytes(got) == data
    assert sorted(fetched) == list(range(10))  # each block fetched once
    assert dc.stats.prefetched_blocks >= 5
    assert dc.store.is_verified(spec.key)  # whole file checked against sha256


async def test_random_pread_fetches_only_its_block(tmp_path: Path) -> None:
    bs = 1 << 16
    data = bytes(1 << 20)
    fetched: list[int] = []

    async def fetch(start: int, end: int) -> bytes:
        fetched.append(start // bs)
        return data[start:end]

    dc = DataCache(BlockStore(tmp_path, 1 << 30), block_size=bs, readahead=8)
    async with trio.open_nursery() as n:
        dc.start(n)
        cf = dc.open(FileSpec("zeros", len(data), None), fetch)
        stream = ReadStream()
        await dc.read(cf, 5 * bs + 7, 4096, stream)
        await dc.read(cf, 2 * bs, 4096, stream)
    assert fetched == [5, 2]


async def test_small_random_reads_fetch_a_window_not_a_block(tmp_path: Path) -> None:
    bs = 4 << 20
    data = bytes(range(256)) * (3 * bs // 256)
    fetched: list[tuple[int, int]] = []

    async def fetch(start: int, end: int) -> bytes:
        fetched.append((start, end))
        return data[start:end]

    dc = DataCache(BlockStore(tmp_path, 1 << 30), block_size=bs, readahead=4)
    async with trio.open_nursery() as n:
        dc.start(n)
        cf = dc.open(FileSpec("w", len(data), None), fetch)
        stream = ReadStream()
        off = 5_000_000
        assert bytes(await dc.read(cf, off, 4096, stream)) == data[off : off + 4096]
        assert fetched == [(4_980_736, 5_046_272)]  # the aligned 64 KiB window
        assert bytes(await dc.read(cf, off + 8192, 4096, stream)) == data[off + 8192 : off + 12288]
        assert len(fetched) == 1  # same window, from memory
        # sequential reading switches back to whole blocks
        for o in range(0, 3 * 65536, 65536):
            await dc.read(cf, o, 65536, stream)
        assert (0, bs) in fetched


@pytest.mark.parametrize("corrupt", [False, True], ids=["intact", "one_byte_flipped"])
async def test_out_of_order_blocks_are_verified_without_rehashing_the_file(
    tmp_path: Path, corrupt: bool
) -> None:
    """Parallel read-ahead finishes blocks out of order and the running sha256 falls behind;
    the file is still checked once complete, without reading any block back from disk, and a
    wrong byte anywhere still fails the read."""
    bs = 1 << 16
    nblocks = 40
    data = os.urandom(bs * nblocks + 123)
    served = bytearray(data)
    if corrupt:
        served[bs * 23 + 7] ^= 1
    rng = random.Random(7)

    async def fetch(start: int, end: int) -> bytes:
        await trio.sleep(rng.random() * 0.004)  # uneven latency: completions out of order
        return bytes(served[start:end])

    store = BlockStore(tmp_path, 1 << 30)
    loads = 0
    real_get = store.get

    def counting_get(
        key: str, index: int, expect: str | None = None, into: mmap.mmap | bytearray | None = None
    ) -> mmap.mmap | bytearray | None:
        nonlocal loads
        loads += into is None  # the hash's own loads (a reader's lease a buffer: `into`)
        return real_get(key, index, expect, into)

    store.get = counting_get  # type: ignore[method-assign]
    dc = DataCache(store, block_size=bs, memory_bytes=8 * bs, readahead=4)  # the defaults
    spec = FileSpec("ooo" + str(corrupt).lower(), len(data), hashlib.sha256(data).hexdigest())
    got = bytearray()
    failed = False
    async with trio.open_nursery() as n:
        dc.start(n)
        cf = dc.open(spec, fetch)
        cf.hasher = hashed = _CountingSha256()
        stream = ReadStream()
        try:
            while len(got) < len(data):
                # the reader never waits for the hash; on a loaded machine worker threads can
                # lag far behind it and push blocks out of memory before they are hashed. The
                # scenario is blocks arriving out of order, not slow threads: start each read
                # with the hash caught up with what is at hand.
                async with cf.hash_lock:
                    pass
                got += await dc.read(cf, len(got), 1 << 15, stream)
        except IntegrityError:
            failed = True
        await trio.sleep(0.05)
        dc.close(cf)
    if corrupt:
        assert failed and not store.is_verified(spec.key) and store.count(spec.key) == 0
    else:
        assert not failed and bytes(got) == data and store.is_verified(spec.key)
        assert hashed.n == len(data)  # every byte hashed exactly once
        # a reader from the start gets the file streamed within a window of the running
        # hash: the hash reads no block back from disk (`DataCache.stream`)
        assert loads == 0


class _CountingSha256:
    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.n = 0

    def update(self, b: bytes) -> None:
        self.n += len(b)
        self.h.update(b)

    def hexdigest(self) -> str:
        return self.h.hexdigest()


async def test_stalled_fetches_of_one_file_do_not_starve_another(tmp_path: Path) -> None:
    """Four downloads of one file that never finish hold every slot of the old mount-wide
    limiter; a read of another file must still be served."""
    bs = 1 << 16
    stall = trio.Event()  # never set
    stalled = 0

    async def stuck(start: int, end: int) -> bytes:
        nonlocal stalled
        stalled += 1
        await stall.wait()
        raise AssertionError("unreachable")

    other = os.urandom(bs + 10)

    async def fine(start: int, end: int) -> bytes:
        return other[start:end]

    dc = DataCache(BlockStore(tmp_path, 1 << 30), block_size=bs, readahead=0, max_parallel=4)
    a = dc.open(FileSpec("stuck", 8 * bs, None), stuck)
    b = dc.open(FileSpec("fine", len(other), hashlib.sha256(other).hexdigest()), fine)
    async with trio.open_nursery() as n:
        for i in range(6):
            n.start_soon(dc.read, a, i * bs, bs)
        await trio.testing.wait_all_tasks_blocked()
        assert stalled == 4  # every slot of the old limiter is held
        with trio.fail_after(10):
            got = bytearray()
            while len(got) < len(other):
                got += await dc.read(b, len(got), bs)
        assert bytes(got) == other
        assert stalled == 4  # one file never has more than its share in flight
        n.cancel_scope.cancel()


async def test_fair_limiter_caps_each_file_and_admits_a_new_one() -> None:
    lim = FairLimiter(total=2, per_file=2)
    order: list[str] = []
    release = trio.Event()

    async def use(key: str) -> None:
        async with lim.slot(key):
            order.append(key)
            await release.wait()

    async with trio.open_nursery() as n:
        for key in ("a", "a", "a", "b"):
            n.start_soon(use, key)
            await trio.testing.wait_all_tasks_blocked()
        assert order == ["a", "a", "b"]  # a's third waits; b's first never does
        assert lim.active == {"a": 2, "b": 1}
        release.set()
    assert order == ["a", "a", "b", "a"] and lim.in_use == 0 and lim.active == {}


async def test_whole_file_read_out_of_order_is_checked_even_when_evicted(tmp_path: Path) -> None:
    """Every block read, the first one last, through a cache holding 4 of 12 blocks: the read
    that completes the file fails (blocks the running hash missed are fetched again for it)."""
    bs = 1 << 16
    data = os.urandom(12 * bs)
    fetches: list[int] = []

    async def fetch(start: int, end: int) -> bytes:
        fetches.append(start // bs)
        return data[start:end]

    store = BlockStore(tmp_path, 4 * bs)
    dc = DataCache(store, block_size=bs, memory_bytes=bs, readahead=0)
    cf = dc.open(FileSpec("ooo-evicted", len(data), "0" * 64), fetch)  # wrong sha256
    for i in range(1, 12):
        assert bytes(await dc.read(cf, i * bs, bs)) == data[i * bs : (i + 1) * bs]
    with pytest.raises(IntegrityError):
        await dc.read(cf, 0, bs)
    assert store.count("ooo-evicted") == 0 and not store.is_verified("ooo-evicted")


async def test_verified_file_checks_blocks_from_disk_and_refetched(tmp_path: Path) -> None:
    """A verified file's marker lists its block digests: a damaged block on disk (its header
    checksum rewritten) is refetched, and a refetched block that differs fails."""
    bs = 1 << 16
    data = os.urandom(3 * bs + 5)
    served = bytearray(data)

    async def fetch(start: int, end: int) -> bytes:
        return bytes(served[start:end])

    store = BlockStore(tmp_path, 1 << 30)
    spec = FileSpec(hashlib.sha256(data).hexdigest(), len(data), hashlib.sha256(data).hexdigest())
    dc = DataCache(store, block_size=bs, readahead=0)
    cf = dc.open(spec, fetch)
    assert bytes(await dc.read(cf, 0, len(data))) == data
    dc.close(cf)
    assert store.is_verified(spec.key)
    _rewrite_block(store, spec.key, 1, lambda b: b[:7] + bytes([b[7] ^ 1]) + b[8:])
    dc = DataCache(store, block_size=bs, readahead=0)  # a new mount: nothing in memory
    cf = dc.open(spec, fetch)
    assert cf.verified
    assert bytes(await dc.read(cf, 0, len(data))) == data  # block 1 fetched again
    assert store.stats.corrupt == 1
    dc.close(cf)
    _rewrite_block(store, spec.key, 2, lambda b: b[:3] + b"\0" + b[4:])
    served[2 * bs + 3] ^= 0xFF  # and the registry now sends other bytes too
    dc = DataCache(store, block_size=bs, readahead=0)
    cf = dc.open(spec, fetch)
    with pytest.raises(IntegrityError):
        await dc.read(cf, 2 * bs, bs)
    assert not store.is_verified(spec.key) and store.count(spec.key) == 0


def _rewrite_block(store: BlockStore, key: str, idx: int, change: Callable[[bytes], bytes]) -> None:
    """Change a block's payload on disk and recompute its header checksum (xxh3-64)."""
    import struct

    import xxhash

    path = store.root / key[:2] / key / f"{idx}.blk"
    raw = path.read_bytes()
    payload = change(raw[4096:])
    header = bytearray(raw[:4096])
    struct.pack_into("<Q", header, 24, xxhash.xxh3_64_intdigest(payload))
    path.write_bytes(bytes(header) + payload)


def _evict(dc: DataCache, key: str, idx: int) -> None:
    """Block `idx` of `key` leaves memory and disk (as LRU eviction would)."""
    dc._mem.pop((key, idx))
    store = dc.store
    store._forget(key, idx)
    store._path(key, idx).unlink(missing_ok=True)


async def test_small_read_of_a_verified_file_is_checked(tmp_path: Path) -> None:
    """A verified file's evicted block is fetched whole and checked against its digest, even
    for a 4 KiB pread: never an unchecked window."""
    bs = 1 << 20
    data = os.urandom(4 * bs)
    served = bytearray(data)

    async def fetch(start: int, end: int) -> bytes:
        return bytes(served[start:end])

    spec = FileSpec("smallver", len(data), hashlib.sha256(data).hexdigest())
    dc = DataCache(BlockStore(tmp_path, 1 << 30), block_size=bs, readahead=0)
    cf = dc.open(spec, fetch)
    assert bytes(await dc.read(cf, 0, len(data))) == data and cf.verified
    _evict(dc, spec.key, 1)
    served[bs + 10] ^= 1  # the registry now sends another block 1
    with pytest.raises(IntegrityError):
        await dc.read(cf, bs, 4096, ReadStream())


async def test_small_reads_covering_a_file_end_in_eio(tmp_path: Path) -> None:
    """Random small preads that together cover every byte of a mismatching file: one of
    them fails; and after a mismatch, a reopen never serves the bad download's windows."""
    bs = 1 << 20
    data = os.urandom(3 * bs)
    rng = random.Random(3)

    async def fetch(start: int, end: int) -> bytes:
        return data[start:end]

    spec = FileSpec("smallcover", len(data), "0" * 64)  # wrong sha256
    dc = DataCache(BlockStore(tmp_path, 1 << 30), block_size=bs, readahead=0)
    cf = dc.open(spec, fetch)
    offs = list(range(0, len(data), 48 << 10))
    rng.shuffle(offs)
    failed = False
    for o in offs:
        try:
            got = await dc.read(cf, o, 48 << 10, ReadStream())
        except IntegrityError:
            failed = True
            break
        assert bytes(got) == data[o : o + (48 << 10)]
    assert failed and dc.stats.small_reads > 0
    dc.close(cf)
    assert not any(k[0] == spec.key for k in dc._mem.windows)


async def test_reader_bytes_are_the_checked_bytes(tmp_path: Path) -> None:
    """Block 1 is wrong on its first download only. The reader got that block, then it was
    evicted and fetched again for the whole-file check: the check must compare what the
    reader got, so the read that completes the file fails."""
    bs = 1 << 16
    data = os.urandom(6 * bs)
    fetch = _wrong_first_download(data, bs)

    spec = FileSpec("twice", len(data), hashlib.sha256(data).hexdigest())
    store = BlockStore(tmp_path, bs)  # blocks evicted from disk as others arrive
    dc = DataCache(store, block_size=bs, memory_bytes=bs, readahead=0)
    cf = dc.open(spec, fetch)
    failed = False
    try:
        for i in (5, 4, 3, 2, 1, 5, 0):
            await dc.read(cf, i * bs, bs)
    except IntegrityError:
        failed = True
    assert failed and not store.is_verified(spec.key)


async def test_blocks_in_memory_from_an_earlier_open_are_checked_too(tmp_path: Path) -> None:
    """A wrong block 1 read through one open stays in memory after close; a new open that
    serves it must compare it with the bytes its check hashes (fetched again here)."""
    bs = 1 << 16
    data = os.urandom(6 * bs)
    fetch = _wrong_first_download(data, bs)

    spec = FileSpec("carried", len(data), hashlib.sha256(data).hexdigest())
    store = BlockStore(tmp_path, bs)
    dc = DataCache(store, block_size=bs, memory_bytes=bs, readahead=0)
    cf = dc.open(spec, fetch)
    await dc.read(cf, bs, bs)
    dc.close(cf)
    cf = dc.open(spec, fetch)
    failed = False
    try:
        for i in (1, 5, 4, 3, 2, 0):
            await dc.read(cf, i * bs, bs)
    except IntegrityError:
        failed = True
    assert failed and not store.is_verified(spec.key)


async def test_check_fetches_missing_blocks_in_parallel_within_a_deadline(
    tmp_path: Path,
) -> None:
    """The blocks fetched again for the whole-file check go in parallel, and the whole
    check has a deadline: one read stays bounded."""
    bs = 1 << 16
    data = os.urandom(12 * bs)
    spec = FileSpec("par", len(data), hashlib.sha256(data).hexdigest())

    async def run(root: Path, again: float, deadline: float) -> tuple[DataCache, int]:
        active = peak = 0
        downloads: set[int] = set()

        async def fetch(start: int, end: int) -> bytes:
            nonlocal active, peak
            if start in downloads:  # fetched again for the check
                active += 1
                peak = max(peak, active)
                try:
                    await trio.sleep(again)
                finally:
                    active -= 1
            downloads.add(start)
            return data[start:end]

        dc = DataCache(
            BlockStore(root, 2 * bs),
            block_size=bs,
            memory_bytes=bs,
            memory_limit=4 * bs,  # blocks ahead of the hash are held up to the window only
            readahead=0,
            check_deadline=deadline,
        )
        cf = dc.open(spec, fetch)
        for i in range(1, 12):  # block 0 last: the running hash cannot follow
            assert bytes(await dc.read(cf, i * bs, bs)) == data[i * bs : (i + 1) * bs]
        with trio.fail_after(30):
            assert bytes(await dc.read(cf, 0, bs)) == data[:bs]
        assert cf.verified
        return dc, peak

    _, peak = await run(tmp_path / "a", 0.05, 30)
    assert peak > 1  # not one block after another
    with pytest.raises(RegistryTimeout), trio.fail_after(30):
        await run(tmp_path / "b", 1000, 0.5)


async def test_close_during_readahead_forgets_the_file(tmp_path: Path) -> None:
    """A handle closed while its read-ahead is still downloading: once the download ends,
    the file's state is not kept."""
    bs = 1 << 16
    data = os.urandom(8 * bs)
    gate = trio.Event()

    async def fetch(start: int, end: int) -> bytes:
        if start >= 2 * bs:
            await gate.wait()
        return data[start:end]

    dc = DataCache(BlockStore(tmp_path, 1 << 30), block_size=bs, readahead=2)
    async with trio.open_nursery() as n:
        dc.start(n)
        cf = dc.open(FileSpec("ra", len(data), hashlib.sha256(data).hexdigest()), fetch)
        stream = ReadStream()
        for off in (0, 4096, 8192):
            await dc.read(cf, off, 4096, stream)
        assert cf.inflight
        dc.close(cf)
        gate.set()
        await trio.testing.wait_all_tasks_blocked()
    assert "ra" not in dc._files


async def test_a_reader_never_waits_for_the_hash_lock_of_another(tmp_path: Path) -> None:
    """The hash lock may be held across network fetches (the completing check): a reader's
    own download does not wait for it, and a reader's check waits within its deadline."""
    bs = 1 << 16
    data = os.urandom(4 * bs)

    async def fetch(start: int, end: int) -> bytes:
        return data[start:end]

    dc = DataCache(BlockStore(tmp_path, 1 << 30), block_size=bs, readahead=0, check_deadline=0.5)
    cf = dc.open(FileSpec("hl", len(data), hashlib.sha256(data).hexdigest()), fetch)
    stall = trio.Event()
    async with trio.open_nursery() as n:

        async def holder() -> None:  # a check stuck in a refetch
            async with cf.hash_lock:
                await stall.wait()

        n.start_soon(holder)
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(5):
            assert bytes(await dc.read(cf, 0, bs)) == data[:bs]  # hash at block 0: lock busy
            for i in (1, 2):
                await dc.read(cf, i * bs, bs)
            with pytest.raises(RegistryTimeout):
                await dc.read(cf, 3 * bs, bs)  # completes the file: check bounded
        stall.set()
    assert bytes(await dc.read(cf, 3 * bs, bs)) == data[3 * bs :]
    assert cf.verified


async def test_small_read_of_a_hashed_block_fetches_no_window(tmp_path: Path) -> None:
    """A small read of a block the hash has passed reads the block whole: no window is
    fetched first only to be thrown away."""
    bs = 1 << 20
    data = os.urandom(4 * bs)
    fetched: list[tuple[int, int]] = []

    async def fetch(start: int, end: int) -> bytes:
        fetched.append((start, end))
        return data[start:end]

    dc = DataCache(BlockStore(tmp_path, 1 << 30), block_size=bs, readahead=0)
    cf = dc.open(FileSpec("sm", len(data), hashlib.sha256(data).hexdigest()), fetch)
    await dc.read(cf, 0, bs)
    assert cf.hashed_upto == 1
    _evict(dc, "sm", 0)
    fetched.clear()
    assert bytes(await dc.read(cf, 100, 4096, ReadStream())) == data[100:4196]
    assert fetched == [(0, bs)]


def _wrong_first_download(data: bytes, bs: int) -> Callable[[int, int], Awaitable[bytes]]:
    """A fetcher whose first download of block 1 has one flipped bit; later ones are right."""
    downloads: dict[int, int] = {}

    async def fetch(start: int, end: int) -> bytes:
        idx = start // bs
        downloads[idx] = downloads.get(idx, 0) + 1
        out = bytearray(data[start:end])
        if idx == 1 and downloads[idx] == 1:
            out[5] ^= 1
        return bytes(out)

    return fetch


async def test_a_stream_gives_up_on_a_registry_that_keeps_failing(tmp_path: Path) -> None:
    """A file streamed whole whose blocks keep failing (404, file changed...) is not fetched
    again and again while it stays open: the stream ends after a few failed blocks."""
    bs = 1 << 16
    calls = 0

    async def fetch(start: int, end: int) -> bytes:
        nonlocal calls
        calls += 1
        raise ProtocolError("the file changed size")

    dc = DataCache(BlockStore(tmp_path, 1 << 30), block_size=bs, readahead=0)
    async with trio.open_nursery() as n:
        dc.start(n)
        cf = dc.open(FileSpec("gone", 40 * bs, None), fetch)
        assert dc.stream(cf, "test")
        with trio.fail_after(10):
            await trio.testing.wait_all_tasks_blocked()
        assert not cf.streaming
        assert calls <= 3 + dc.max_parallel  # a few blocks, not the file over and over
        assert cf.refs == 1 and not cf.stream_running
        dc.close(cf)


async def test_closing_the_last_handle_stops_the_stream(tmp_path: Path) -> None:
    """Prefetch stops at close: downloads in flight are cancelled, no more are started."""
    bs = 1 << 16
    data = os.urandom(40 * bs)
    started: list[int] = []

    async def fetch(start: int, end: int) -> bytes:
        started.append(start)
        await trio.sleep_forever()
        raise AssertionError

    dc = DataCache(BlockStore(tmp_path, 1 << 30), block_size=bs, readahead=0)
    async with trio.open_nursery() as n:
        dc.start(n)
        cf = dc.open(FileSpec("closed", len(data), hashlib.sha256(data).hexdigest()), fetch)
        assert dc.stream(cf, "test")
        await trio.testing.wait_all_tasks_blocked()
        assert started and cf.inflight
        dc.close(cf)
        with trio.fail_after(5):
            await trio.testing.wait_all_tasks_blocked()
        assert not cf.streaming and not cf.inflight
    assert "closed" not in dc._files


async def test_a_missed_lookup_refetches_an_older_listing_at_most_every_min_age() -> None:
    """Semantics 46: a lookup that misses makes a listing older than 2 s be fetched again,
    rate-limited; the TTL stays for everything else."""
    now = [0.0]
    mc = MetadataCache(clock=lambda: now[0])
    calls = 0

    async def fetch() -> int:
        nonlocal calls
        calls += 1
        return calls

    assert await mc.get("files", fetch, 300) == 1
    now[0] = 1.0
    assert not mc.recheck("files", 2.0)  # fetched 1 s ago: fresh enough
    now[0] = 2.5
    assert mc.recheck("files", 2.0)
    assert await mc.get("files", fetch, 300) == 2
    now[0] = 5.0
    assert mc.recheck("files", 2.0)
    assert await mc.get("files", fetch, 300) == 3
    now[0] = 6.0
    assert not mc.recheck("files", 2.0)  # rechecked 1 s ago
    assert await mc.get("files", fetch, 300) == 3  # the TTL still holds
    assert not mc.recheck("never fetched", 2.0)
