"""Block buffers: a recycled ring within one memory budget.

On our VMs the first touch of fresh memory costs ~0.8 s of CPU per GiB (fuse-ceiling.md §0), and
with malloc's mmap threshold bounded (mount.bound_malloc, which keeps RSS flat) every 8 MiB block
buffer is fresh memory. Downloads and cache loads therefore fill buffers leased from this ring,
and the memory cache gives a buffer back when it evicts a block.

Ring buffers are anonymous mmaps: page-aligned, so the block cache can read and write them with
O_DIRECT and no staging copy (see `directio`).

The budget: at most `limit` block buffers are alive at once (counted exactly: a finalizer
notes each one that is dropped). `lease` waits for one while the budget is spent, after asking
the memory cache to let blocks go, so downloads slow down instead of the daemon growing. A
lease that cannot be met within `OVER_BUDGET_AFTER` seconds may overshoot the budget by
`OVERSHOOT` of it, and any lease is granted after `STUCK_AFTER`; both are counted
(`over_budget`): a bounded overshoot is better than a stalled read.

Ownership is explicit: `lease` (and `adopt`, for a buffer made elsewhere) hands out a `Lease`;
each holder of the bytes (the memory cache, a download, the hash, a reply) has its own lease
(`share`) and releases it exactly once when it no longer reads or writes them. A buffer goes
back to the ring when its last lease is released, and only then can it be overwritten.
"""

from __future__ import annotations

import contextlib
import mmap
import threading
import weakref
from collections.abc import Callable, Iterator

# Anything the byte paths hand around: the buffer protocol, len() in bytes, never mutated once
# filled.
Buffer = bytes | bytearray | memoryview | mmap.mmap

OVER_BUDGET_AFTER = 2.0  # seconds a lease waits for the budget before it may overshoot...
OVERSHOOT = 0.25  # ...by at most this share of the budget; past that it waits on (bounded)
STUCK_AFTER = 30.0  # ...and is granted anyway after this long (a stall is worse than RSS)
_POLL = 0.005  # buffers come back when their last lease is released: poll for that


class _Claim:
    """The holders of one buffer."""

    __slots__ = ("holders", "ring")

    def __init__(self, ring: BufferRing) -> None:
        self.ring = ring
        self.holders = 0


class Lease:
    """One holder's claim on a buffer: `buf` is the holder's to read (and, if it is the only
    holder, to fill) until `release()`, which must be called exactly once. Leases are shared
    and released on the event loop only; worker threads use `buf` while a lease is held."""

    __slots__ = ("_claim", "_released", "buf")

    def __init__(self, buf: Buffer, claim: _Claim) -> None:
        self.buf = buf
        self._claim = claim
        claim.holders += 1
        self._released = False

    def share(self) -> Lease:
        """Another holder's lease on the same buffer."""
        if self._released:
            raise RuntimeError("share of a released lease")
        return Lease(self.buf, self._claim)

    @contextlib.contextmanager
    def released_on_error(self) -> Iterator[Lease]:
        """Release this lease if the block raises: its holder would not hand it on."""
        try:
            yield self
        except BaseException:
            self.release()
            raise

    def release(self) -> bool:
        """Let the buffer go; True if it went back to the ring (this was its last lease)."""
        if self._released:
            raise RuntimeError("lease released twice")
        self._released = True
        claim = self._claim
        claim.holders -= 1
        return claim.holders == 0 and claim.ring._give(self.buf)


class BufferRing:
    """Page-aligned buffers of one size (the block size) within a budget of `limit` buffers;
    other sizes are plain bytearrays, outside the budget."""

    def __init__(self, size: int = 0, limit: int = 1 << 20) -> None:
        self.size = size
        self.limit = limit
        self.reused = 0
        self.allocated = 0
        self.over_budget = 0
        self.waits = 0
        self.alive = 0  # ring buffers that exist right now (free or in use)
        self.peak = 0
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def configure(self, size: int, limit: int) -> None:
        dropped: list[mmap.mmap] = []
        with self._lock:
            if size != self.size:
                dropped, self._free = self._free, []
            self.size, self.limit = size, max(1, limit)
        del dropped  # outside the lock: each buffer's finalizer takes it

    def _dropped(self) -> None:
        with self._lock:
            self.alive -= 1

    def _new(self) -> mmap.mmap:
        buf = mmap.mmap(-1, self.size)
        with self._lock:
            self.allocated += 1
            self.alive += 1
            self.peak = max(self.peak, self.alive)
        weakref.finalize(buf, self._dropped)
        return buf

    def take(self, n: int) -> mmap.mmap | bytearray:
        """A buffer of exactly `n` bytes with arbitrary contents: the caller overwrites all.
        Never waits (worker threads call it); `lease` is the budgeted way."""
        if n != self.size or n == 0:
            return bytearray(n)
        with self._lock:
            if self._free:
                self.reused += 1
                return self._free.pop()
        return self._new()

    def adopt(self, buf: Buffer) -> Lease:
        """A lease on a buffer from `take` (or made elsewhere): at its last release it joins
        the ring if it is a ring buffer."""
        return Lease(buf, _Claim(self))

    async def lease(self, n: int, evict: Callable[[], bool] | None = None) -> Lease:
        """`take` under a lease, within the budget: while `limit` buffers are alive and none
        is free, `evict()` (which lets one cached block go, False when it has none) is asked,
        then the lease waits for a buffer to come back."""
        return self.adopt(await self._budgeted(n, evict))

    async def _budgeted(self, n: int, evict: Callable[[], bool] | None) -> mmap.mmap | bytearray:
        import trio  # not at module level: the mount helper imports this module's types only

        if n != self.size or n == 0:
            return bytearray(n)
        started = None
        while True:
            with self._lock:
                if self._free:
                    self.reused += 1
                    return self._free.pop()
                alive = self.alive
            if alive < self.limit:
                return self._new()
            if evict is not None and evict():
                continue
            now = trio.current_time()
            if started is None:
                started = now
                self.waits += 1
            waited = now - started
            if (
                waited >= OVER_BUDGET_AFTER
                and alive < self.limit + max(1, int(self.limit * OVERSHOOT))
            ) or waited >= STUCK_AFTER:
                self.over_budget += 1
                return self._new()
            await trio.sleep(_POLL)

    def _give(self, buf: object) -> bool:
        """Take back a buffer whose last lease was released (if it is one of the ring's)."""
        if not isinstance(buf, mmap.mmap) or len(buf) != self.size:
            return False
        with self._lock:
            if len(self._free) >= self.limit:
                return False
            self._free.append(buf)
        return True

    def trim(self) -> None:
        """Let the free buffers go (their memory returns to the system)."""
        with self._lock:
            dropped, self._free = self._free, []
        del dropped  # outside the lock: each buffer's finalizer takes it


POOL = BufferRing()
