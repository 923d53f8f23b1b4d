"""Whole-file streaming: a file that is read in full (a weights file at its first read, a
sequential reader, an mmap loader's scattered faults) is fetched in the background, in file
order, a few blocks at a time, each block hashed as it arrives: a verified stream that stays
a bounded window ahead of the running sha256."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from mlregfs.cache.state import BlockFetch, CachedFile, Shared
from mlregfs.cache.verify import Verifier
from mlregfs.errors import RegistryUnavailable

log = logging.getLogger("mlregfs.cache")

MAX_WINDOW = 16  # most blocks one file's stream may run ahead of its running sha256
STREAM_FAILURES = 3  # blocks in a row a stream may fail to fetch before it gives up


class Streams:
    """The whole-file streams of one reader's open files (`files`)."""

    def __init__(
        self,
        shared: Shared,
        verifier: Verifier,
        *,
        prefetch: Callable[[CachedFile, int], Awaitable[bool]],
        forget_unused: Callable[[CachedFile], None],
    ) -> None:
        self.store, self._mem, self._files = shared.store, shared.mem, shared.files
        self.stats, self.block_size = shared.stats, shared.block_size
        self.budget_blocks, self.max_parallel = shared.budget_blocks, shared.max_parallel
        self._verifier = verifier
        self._prefetch = prefetch  # fetch a claimed block in the background
        self._forget_unused = forget_unused
        self._nursery: trio.Nursery | None = None
        self._streams = 0  # files being streamed whole right now
        # each stream needs a few buffers of the budget (its window and its downloads): more
        # files than that wait for their turn instead of starving each other
        self._stream_turns = trio.Semaphore(max(1, self.budget_blocks // 4))

    def start(self, nursery: trio.Nursery) -> None:
        """Streams run in `nursery` (none before: `stream` starts nothing)."""
        self._nursery = nursery

    def fits(self, cf: CachedFile) -> bool:
        """Can the disk cache hold all of `cf` next to the files streaming now, so that
        streaming it evicts neither itself nor them?"""
        others = sum(f.spec.size for f in self._files.values() if f.streaming and f is not cf)
        return cf.spec.size + others <= self.store.capacity - self.store.pinned_bytes()

    def window(self) -> int:
        """Blocks a stream may run ahead of its file's running sha256: half the memory budget,
        shared by the files streaming now (the other half is for the memory cache and
        other readers)."""
        share = self.budget_blocks // (2 * max(1, self._streams))
        return max(2, min(MAX_WINDOW, share, self._mem.maxsize // self.block_size // 2))

    def stream(self, cf: CachedFile, why: str) -> bool:
        """Fetch all of `cf` in the background, in file order, up to `max_parallel` blocks at
        a time, each block hashed as it arrives: a verified stream. The stream stays at most
        `window()` blocks ahead of the running sha256 (back-pressure), so no block is
        fetched, dropped unhashed and read back. Only if the disk cache can hold the file;
        stops when the file's last handle closes. True if a stream was started."""
        if (
            cf.streaming
            or self._nursery is None
            or cf.poisoned
            or cf.refs <= 0
            or (cf.verified and self.store.count(cf.spec.key) >= cf.nblocks)
            or not self.fits(cf)
        ):
            return False
        cf.streaming = True  # asked for (it may wait for a turn: `stream_running`)
        try:
            self._nursery.start_soon(self._stream, cf, why)
        except RuntimeError:  # the nursery is closing: unmount
            cf.streaming = False
            return False
        return True

    async def _stream(self, cf: CachedFile, why: str) -> None:
        key = cf.spec.key
        running = False
        try:
            async with self._stream_turns:  # a few files at a time share the budget
                if cf.poisoned or cf.refs <= 0:
                    return
                log.debug("streaming %s (%s)", key, why)
                running = cf.stream_running = True
                self._streams += 1
                self.stats.streams += 1
                self.stats.streams_peak = max(self.stats.streams_peak, self._streams)
                with trio.CancelScope() as scope:
                    cf.stream_scope = scope  # cancelled when the last handle closes
                    await self._stream_blocks(cf)
        except Exception as e:  # a reader fetches (and reports) what the stream could not
            log.debug("stream of %s stopped: %s", key, e)
        finally:
            cf.streaming = cf.stream_running = False
            cf.stream_scope = None
            if running:
                self._streams -= 1
            self._forget_unused(cf)
        log.debug("stream of %s ended (%s)", key, "verified" if cf.verified else "incomplete")

    async def _stream_blocks(self, cf: CachedFile) -> None:
        """Claim and fetch `cf`'s blocks in file order, at most `window()` ahead of its hash.
        Ends after STREAM_FAILURES failed blocks in a row (a reader's own fetch reports)."""
        key = cf.spec.key
        # one fetch slot of the file stays free for its readers' own misses
        slots = trio.Semaphore(max(1, self.max_parallel - 1))
        failures = 0

        async def one(idx: int) -> None:
            nonlocal failures
            try:
                failures = 0 if await self._prefetch(cf, idx) else failures + 1
            finally:
                slots.release()

        async with trio.open_nursery() as nursery:
            idx = 0
            while idx < cf.nblocks and not cf.poisoned and cf.refs > 0:
                if failures >= STREAM_FAILURES:
                    raise RegistryUnavailable(f"{failures} blocks in a row failed")
                if not cf.verified and idx >= cf.hashed_upto + self.window():
                    # back-pressure: wait for the hash to move on
                    h = cf.hashed_upto
                    if not self._verifier.at_hand(cf, h) and h not in cf.inflight:
                        idx = h  # the block the hash needs went away: fetch it again
                        continue
                    await self._verifier.drive_hash(cf)
                    if idx >= cf.hashed_upto + self.window() and not cf.verified:
                        with trio.move_on_after(0.05):
                            await cf.hash_moved.park()
                    continue
                if idx in cf.inflight or (key, idx) in self._mem or self.store.has(key, idx):
                    idx += 1
                    continue
                await slots.acquire()
                if idx in cf.inflight or cf.poisoned or cf.refs <= 0:
                    slots.release()
                    continue
                cf.inflight[idx] = BlockFetch()  # claimed now: readers wait for it
                nursery.start_soon(one, idx)
                idx += 1
