"""Queued spool writes: order, hash, backpressure and failures, without a kernel."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest
import trio
import trio.testing

from mlregfs.fs.writer import SpoolWriter
from mlregfs.spool import Spool


async def test_queued_writes_land_in_order_and_hash_in_one_pass(tmp_path: Path) -> None:
    sf = Spool(tmp_path).new("src", ("c", "1"), "f.bin")
    data = os.urandom((1 << 20) * 6 + 5)
    async with trio.open_nursery() as n:
        w = SpoolWriter(sf, n, limit=2 << 20)
        for off in range(0, len(data), 1 << 20):
            assert await w.write(off, data[off : off + (1 << 20)]) == len(
                data[off : off + (1 << 20)]
            )
            assert w._queued <= 2 << 20  # bounded: the writer waits for the disk
        assert sf.size == len(data)  # visible at once, before it is on disk
        await w.drain()
    assert sf.finish() == (len(data), hashlib.sha256(data).hexdigest())
    assert sf.path.read_bytes() == data
    sf.close()


async def test_a_failed_disk_write_is_reported_by_next_write_and_drain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sf = Spool(tmp_path).new("src", ("c", "1"), "f.bin")

    def full(off: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sf, "put", full)
    async with trio.open_nursery() as n:
        w = SpoolWriter(sf, n)
        await w.write(0, b"x" * 4096)  # queued: accepted
        with pytest.raises(OSError) as e1:
            await w.drain()
        assert e1.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as e2:
            await w.write(4096, b"y")
        assert e2.value.errno == errno.ENOSPC
    sf.close()


async def test_the_guard_runs_after_the_wait_for_queue_space(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that waited for queue space is checked again before its bytes are queued: an
    upload that started meanwhile makes it fail, and nothing of it reaches the spool."""
    import threading

    sf = Spool(tmp_path).new("src", ("c", "1"), "f.bin")
    gate = threading.Event()
    real_put = sf.put

    def put(off: int, data: bytes) -> None:
        gate.wait(10)
        real_put(off, data)

    monkeypatch.setattr(sf, "put", put)
    uploading = False

    def guard() -> None:
        if uploading:
            raise BlockingIOError(errno.EBUSY, "being uploaded")

    async with trio.open_nursery() as n:
        w = SpoolWriter(sf, n, limit=4)
        await w.write(0, b"aaaa", guard)
        caught: list[OSError] = []

        async def late() -> None:
            with pytest.raises(OSError) as e:
                await w.write(4, b"bbbb", guard)
            caught.append(e.value)

        n.start_soon(late)
        await trio.testing.wait_all_tasks_blocked()
        uploading = True
        gate.set()
    assert [e.errno for e in caught] == [errno.EBUSY]
    await w.drain()
    assert sf.size == 4 and sf.path.read_bytes() == b"aaaa"
    sf.close()
