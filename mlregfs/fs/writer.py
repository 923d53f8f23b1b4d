"""Queued spool writes: a FUSE write returns once its bytes are queued, not once they are on
disk and hashed.

Files being written are opened with direct_io (1 MiB requests, no page cache), so the kernel
sends a synchronous writer's requests one at a time and each one's handler time is the writer's
time: writing and hashing in the handler made `cp` wait ~1.3 ms per MiB. Queued, the disk write
and the sha256 of a chunk run in parallel on worker threads while the next chunk arrives.

Nothing is lost quietly: the queue is bounded, a failed disk write is reported by the next
write and by flush/fsync/close (which wait for the queue to drain before uploading), and a
reader of the file being written waits for it too.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import trio

from mlregfs.spool import SpoolFile

QUEUE_BYTES = 16 << 20


class SpoolWriter:
    """Writes queued chunks to a SpoolFile in arrival order, in a background task."""

    def __init__(self, sf: SpoolFile, nursery: trio.Nursery, limit: int = QUEUE_BYTES) -> None:
        self.sf = sf
        self._nursery = nursery
        self._limit = limit
        self._queue: deque[tuple[int, bytes]] = deque()
        self._queued = 0
        self._running = False
        self._changed = trio.Event()
        self.error: Exception | None = None

    async def write(self, off: int, data: bytes, guard: Callable[[], None] | None = None) -> int:
        """Queue `data` at `off`. `guard` runs right before the bytes are queued (after any
        wait for queue space) and raises if they may no longer be written: a close that
        hashed the file meanwhile must not have bytes added under its upload."""
        self._raise()
        while self._queued and self._queued + len(data) > self._limit:
            await self._changed.wait()
            self._raise()
        if guard is not None:
            guard()
        self._queue.append((off, data))
        self._queued += len(data)
        self.sf.note_write(off, len(data))  # size visible at once (getattr, listings)
        if not self._running:
            self._running = True
            self._nursery.start_soon(self._pump)
        return len(data)

    async def drain(self) -> None:
        """Wait until every queued chunk is on disk and hashed; raise a write's failure."""
        while self._running:
            await self._changed.wait()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _pump(self) -> None:
        try:
            while self._queue and self.error is None:
                off, data = self._queue[0]
                errors: list[Exception] = []
                async with trio.open_nursery() as n:
                    n.start_soon(self._step, self.sf.put, off, data, errors)
                    n.start_soon(self._step, self.sf.hash_chunk, off, data, errors)
                self._queue.popleft()
                self._queued -= len(data)
                if errors:
                    self.error = errors[0]
                    self._queue.clear()
                    self._queued = 0
                self._notify()
        finally:
            self._running = False
            self._notify()

    @staticmethod
    async def _step(
        fn: Callable[[int, bytes], None], off: int, data: bytes, errors: list[Exception]
    ) -> None:
        try:
            await trio.to_thread.run_sync(fn, off, data)
        except Exception as e:  # reported by the next write and by flush/close
            errors.append(e)
