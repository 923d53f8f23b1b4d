"""MetadataCache single-flight/stale answers and DataCache read-ahead, without a kernel."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest
import trio
import trio.testing

from mlregfs.cache.blocks import BlockStore
from mlregfs.cache.meta import MetadataCache
from mlregfs.cache.reader import DataCache, FairLimiter, FileSpec, ReadStream
from mlregfs.errors import IntegrityError, NotFound, RegistryUnavailable


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


async def _append(out: list[int], aw) -> None:  # type: ignore[no-untyped-def]
    out.append(await aw)


async def test_stale_answer_on_outage_but_not_on_not_found() -> None:
    now = [0.0]
    mc = MetadataCache(clock=lambda: now[0])

    async def ok() -> str:
        return "v1"

    async def down() -> str:
        raise RegistryUnavailable("refused")

    async def gone() -> str:
        raise NotFound("deleted")

    assert await mc.get("k", ok, 10) == "v1"
    now[0] = 20  # expired
    assert await mc.get("k", down, 10) == "v1"  # outage: last known value
    assert mc.stale_answers == 1
    calls: list[int] = []

    async def counted() -> str:
        calls.append(1)
        return "v2"

    assert await mc.get("k", counted, 10) == "v1"  # within the outage grace: no new attempt
    assert calls == []
    now[0] = 20 + mc.outage_grace + 1
    with pytest.raises(NotFound):
        await mc.get("k", gone, 10)  # a real answer is not masked
    with pytest.raises(RegistryUnavailable):
        await mc.get("never-seen", down, 10)


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
        assert fetched == [(4_980_736, 5_242_880)]  # the aligned 256 KiB window
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
    the file is still checked once complete, reading back from disk only the few blocks it
    could not hold, and a wrong byte anywhere still fails the read."""
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

    def counting_get(key: str, idx: int, expect: str | None = None):  # type: ignore[no-untyped-def]
        nonlocal loads
        loads += 1
        return real_get(key, idx, expect)

    store.get = counting_get  # type: ignore[method-assign]
    dc = DataCache(store, block_size=bs, memory_bytes=8 * bs, readahead=4)  # the defaults
    spec = FileSpec("ooo" + str(corrupt).lower(), len(data), hashlib.sha256(data).hexdigest())
    got = bytearray()
    failed = False
    async with trio.open_nursery() as n:
        dc.start(n)
        cf = dc.open(spec, fetch)
        stream = ReadStream()
        try:
            while len(got) < len(data):
                got += await dc.read(cf, len(got), 1 << 15, stream)
        except IntegrityError:
            failed = True
        await trio.sleep(0.05)
        dc.close(cf)
    if corrupt:
        assert failed and not store.is_verified(spec.key) and store.count(spec.key) == 0
    else:
        assert not failed and bytes(got) == data and store.is_verified(spec.key)
        assert loads < nblocks // 2  # never a second pass over the whole file


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


def _rewrite_block(store: BlockStore, key: str, idx: int, change) -> None:  # type: ignore[no-untyped-def]
    """Change a block's payload on disk and recompute its header checksum (xxh3-64)."""
    import struct

    import xxhash

    path = store.root / key[:2] / key / f"{idx}.blk"
    raw = path.read_bytes()
    payload = change(raw[4096:])
    header = bytearray(raw[:4096])
    struct.pack_into("<Q", header, 24, xxhash.xxh3_64_intdigest(payload))
    path.write_bytes(bytes(header) + payload)
