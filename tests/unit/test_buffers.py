"""Block buffers: recycled only when their last lease is released; direct I/O helpers."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from mlregfs import directio
from mlregfs.buffers import BufferRing


def test_pool_hands_out_aligned_buffers_of_its_size_only() -> None:
    pool = BufferRing(1 << 16)
    buf = pool.take(1 << 16)
    assert isinstance(buf, mmap.mmap) and len(buf) == 1 << 16
    assert directio.address(buf) % directio.ALIGN == 0
    other = pool.take(1000)
    assert isinstance(other, bytearray) and len(other) == 1000
    assert not pool.adopt(other).release()  # not of the pool's size: never pooled


def test_buffer_with_a_live_lease_is_not_reused() -> None:
    pool = BufferRing(4096)
    buf = pool.take(4096)
    buf[:5] = b"hello"
    owner = pool.adopt(buf)
    reader = owner.share()  # a reader's own lease on the same bytes
    assert not owner.release()
    assert pool.take(4096) is not buf  # a new buffer: the reader's bytes stay intact
    assert bytes(reader.buf[1:2]) == b"e"
    assert reader.release()  # the last lease: back to the ring
    assert pool.take(4096) is buf and pool.reused == 1


def test_a_lease_is_released_exactly_once() -> None:
    pool = BufferRing(4096)
    lease = pool.adopt(pool.take(4096))
    other = lease.share()
    assert not lease.release()
    with pytest.raises(RuntimeError):
        lease.release()  # would free the buffer under `other`
    with pytest.raises(RuntimeError):
        lease.share()
    assert other.release()


def test_ring_keeps_a_bounded_number_of_free_buffers() -> None:
    pool = BufferRing(4096, limit=2)
    bufs = [pool.take(4096) for _ in range(3)]
    # a temporary holds no reference of the caller: refs=0
    assert [pool.adopt(bufs.pop()).release() for _ in range(3)] == [True, True, False]


def test_write_all_spans_several_buffers(tmp_path: Path) -> None:
    data = os.urandom(3 * directio.ALIGN)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        directio.write_all(fd, [memoryview(data)[:4096], memoryview(data)[4096:]])
        assert os.pread(fd, len(data) + 1, 0) == data
    finally:
        os.close(fd)


def test_reconfiguring_with_free_buffers_does_not_deadlock() -> None:
    """Dropping free buffers runs their finalizers, which count under the ring's lock: they
    must not run while `configure` or `trim` holds it."""
    ring = BufferRing(4096, limit=4)
    buf = ring.take(4096)
    given = ring.adopt(buf).release()
    del buf
    assert given
    ring.configure(8192, 4)  # used to hang here
    assert ring.alive == 0
    buf = ring.take(8192)
    given = ring.adopt(buf).release()
    del buf
    assert given
    ring.trim()
    assert ring.alive == 0


async def test_lease_waits_for_the_budget_then_overshoots_by_a_bounded_share() -> None:
    """Within the budget a lease waits (back-pressure); a buffer given back ends the wait;
    a lease stuck past OVER_BUDGET_AFTER may overshoot by OVERSHOOT of the budget only."""
    import trio

    from mlregfs import buffers

    ring = BufferRing(4096, limit=4)
    held = [await ring.lease(4096) for _ in range(4)]
    assert ring.alive == 4

    async def give_back_soon() -> None:
        await trio.sleep(0.05)
        assert held.pop().release()

    async with trio.open_nursery() as n:
        n.start_soon(give_back_soon)
        with trio.fail_after(1):
            held.append(await ring.lease(4096))  # waited for the one given back
    assert ring.alive == 4 and ring.over_budget == 0 and ring.waits == 1

    old = buffers.OVER_BUDGET_AFTER, buffers.STUCK_AFTER
    buffers.OVER_BUDGET_AFTER, buffers.STUCK_AFTER = 0.05, 0.3
    try:
        held.append(await ring.lease(4096))  # one over (25 % of 4)
        assert ring.alive == 5 and ring.over_budget == 1
        start = trio.current_time()
        held.append(await ring.lease(4096))  # the next waits until STUCK_AFTER
        assert trio.current_time() - start >= 0.3 and ring.over_budget == 2
    finally:
        buffers.OVER_BUDGET_AFTER, buffers.STUCK_AFTER = old
