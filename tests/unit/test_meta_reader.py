"""MetadataCache single-flight/stale answers and DataCache read-ahead, without a kernel."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest
import trio

from mlregfs.cache.blocks import BlockStore
from mlregfs.cache.meta import MetadataCache
from mlregfs.cache.reader import DataCache, FileSpec, ReadStream
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

    def counting_get(key: str, idx: int):  # type: ignore[no-untyped-def]
        nonlocal loads
        loads += 1
        return real_get(key, idx)

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
