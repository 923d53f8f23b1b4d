"""Range reads through the block cache: memory LRU -> disk blocks -> one fetch per block.

The cache knows nothing of HTTP: a file comes with a ``fetch(start, end)`` coroutine. Fetches
are single-flight per block and bounded in parallelism, fairly: a stalled file never holds
another file's first fetch back (`FairLimiter`); sequential readers trigger read-ahead of the
next blocks in the background.

Integrity: blocks are hashed in file order as they arrive. The file is checked against its
sha256 as soon as the hash is complete, and at the latest before the read that completes a
reading of every block returns (blocks the running hash missed are re-read from disk or
fetched again just for hashing), so whoever reads a whole file gets EIO on a mismatch, even
for a file larger than the cache. A mismatch discards every block. A verified file's marker
lists its block digests: every later load from disk or fetch of one of its blocks is compared
with that list.

What is checked is what readers got: every copy of a block that enters memory (a download or
a load from disk) and every small-read window served has its digest recorded until the block
is hashed, and is compared with the hashed bytes then (or at once, if the block was hashed
already). A block fetched again only for the check therefore cannot stand in for different
bytes a reader was served.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import mmap
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio
from cachetools import LRUCache

from mlregfs.buffers import POOL, Buffer
from mlregfs.cache.blocks import BlockStore
from mlregfs.cache.prefetch import wants_prefetch
from mlregfs.errors import IntegrityError, ProtocolError, RegistryTimeout, RegistryUnavailable

log = logging.getLogger("mlregfs.cache")

Block = Buffer  # a block's bytes: whatever the fetcher or the disk filled
Fetcher = Callable[..., Awaitable[Block]]  # (start, end) or (start, end, into=buffer)

SMALL_READ = 64 << 10  # a non-sequential read up to this size is "small"...
SMALL_WINDOW = 64 << 10  # ...and is served by fetching this aligned window only (one short GET)
MAX_WINDOW = 16  # most blocks one file's stream may run ahead of its running sha256
DENSE_BLOCKS = 3  # distinct blocks read out of order before a file is streamed whole
STREAM_AFTER = 8 << 20  # bytes read in order (and 2 blocks) before a file is streamed whole
STREAM_FAILURES = 3  # blocks in a row a stream may fail to fetch before it gives up
HASH_BATCH = 16  # blocks hashed per worker-thread call
CHECK_DEADLINE = 120.0  # seconds one read may spend fetching blocks again for the sha256 check


_GIVEN = b""  # what `_BlockLRU.popitem` returns for a block whose buffer went back to the ring


class _BlockLRU(LRUCache[tuple[str, int], Block]):
    """The memory cache: an evicted block's buffer goes back to the pool if no one else
    still holds it (a reader's view, a hash or a disk write in progress)."""

    def popitem(self) -> tuple[tuple[str, int], Block]:
        key, value = super().popitem()
        if POOL.give(value, refs=1):
            return key, _GIVEN  # the caller must not use a recycled buffer
        return key, value


@dataclass(frozen=True)
class FileSpec:
    """Identity of remote bytes: cache key, size and expected sha256 (hex) if known."""

    key: str
    size: int
    sha256: str | None


@dataclass
class CachedFile:
    """Shared state of one remote file while any handle has it open."""

    spec: FileSpec
    fetch: Fetcher
    nblocks: int
    fetch_into: bool = False  # `fetch(start, end, into=buffer)` fills a leased buffer
    refs: int = 0
    verified: bool = False
    poisoned: bool = False  # a sha256 check failed: every read fails until all handles close
    # the prefetch policy wants it streamed whole: started by the first read, so an open that
    # reads nothing (rsync's basis file, tools that only look) fetches nothing
    prefetch: bool = False
    inflight: dict[int, BlockFetch] = field(default_factory=dict)
    # sha256 computed while blocks arrive in order, so a sequential read needs no re-read
    hasher: Any = field(default_factory=hashlib.sha256)
    hashed_upto: int = 0  # blocks [0, hashed_upto) are in `hasher`
    # blocks that arrived ahead of `hashed_upto` (parallel fetches finish out of order); held
    # here, not in the memory LRU, so the last blocks of a file need no re-read from disk
    unhashed: dict[int, Block] = field(default_factory=dict)
    # blocks fetched again only for the check (`_fill`): hashed, never served
    refill: dict[int, Block] = field(default_factory=dict)
    hash_lock: trio.Lock = field(default_factory=trio.Lock)
    # digests of blocks [0, hashed_upto), for the verified marker
    hashed_digests: list[str] = field(default_factory=list)
    # known-good block digests once verified (from the marker or the check): every block
    # loaded from disk or fetched again is compared with its entry
    digests: list[str] | None = None
    served: set[int] = field(default_factory=set)  # blocks served whole through this state
    # digests of the copies of block i that entered memory (downloads, disk loads) before i
    # was hashed: each is compared with the hashed bytes when the hash reaches i
    seen: dict[int, set[str]] = field(default_factory=dict)
    # small-read windows served from block i before it was hashed: {window start: digest}
    windows: dict[int, dict[int, str]] = field(default_factory=dict)
    # byte ranges served by small reads, per window start, until the window is covered
    partial: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    covered: dict[int, set[int]] = field(default_factory=dict)  # whole windows served, per block
    hashing_to: int = 0  # blocks [hashed_upto, hashing_to) are being hashed right now
    hash_moved: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)
    # the whole-file stream (`DataCache.stream`): running, and its cancel scope
    streaming: bool = False  # asked for: running or waiting for its turn
    stream_running: bool = False
    stream_scope: trio.CancelScope | None = None
    scattered: set[int] = field(default_factory=set)  # blocks read out of order


class FairLimiter:
    """Bounds parallel fetches without letting one file starve the others.

    A file with no fetch in progress always gets a slot at once, so stalled downloads of some
    files never hold back a read of another; further parallel fetches of a file wait until it
    has fewer than `per_file` and the mount fewer than `total`."""

    def __init__(self, total: int, per_file: int) -> None:
        self.total = max(1, total)
        self.per_file = max(1, per_file)
        self.active: dict[str, int] = {}
        self.in_use = 0
        self._lot = trio.lowlevel.ParkingLot()

    def _admits(self, key: str) -> bool:
        n = self.active.get(key, 0)
        return n == 0 or (n < self.per_file and self.in_use < self.total)

    @asynccontextmanager
    async def slot(self, key: str) -> AsyncIterator[None]:
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._admits(key):
            await self._lot.park()
        self.active[key] = self.active.get(key, 0) + 1
        self.in_use += 1
        try:
            yield
        finally:
            self.in_use -= 1
            if self.active[key] <= 1:
                del self.active[key]
            else:
                self.active[key] -= 1
            self._lot.unpark_all()  # waiters re-check their own condition


@dataclass
class BlockFetch:
    """One block download in progress; waiters share its outcome, including its error.

    `ready`: the bytes are in memory (or it failed), readers may go on. `done`: also stored on
    disk and fed to the sha256, or failed; only then does it leave `inflight`."""

    ready: trio.Event = field(default_factory=trio.Event)
    done: trio.Event = field(default_factory=trio.Event)
    error: Exception | None = None

    def finish(self) -> None:
        self.ready.set()
        self.done.set()


@dataclass
class ReadStream:
    """Per-handle access pattern, for read-ahead decisions."""

    next_off: int = 0
    sequential_hits: int = 0
    run_bytes: int = 0  # bytes read in order since the last jump


@dataclass
class DataStats:
    bytes_served: int = 0
    memory_hits: int = 0
    disk_hits: int = 0
    fetched_blocks: int = 0
    fetched_bytes: int = 0
    prefetched_blocks: int = 0
    small_reads: int = 0
    integrity_failures: int = 0
    streams: int = 0  # files streamed whole (prefetch, sequential or dense readers)
    streams_peak: int = 0  # most files streamed at the same time


class DataCache:
    """Serves byte ranges of remote files out of memory, disk, or the network."""

    def __init__(
        self,
        store: BlockStore,
        *,
        block_size: int = 8 << 20,
        memory_bytes: int | None = None,
        memory_limit: int = 192 << 20,
        readahead: int = 4,
        max_parallel: int = 4,
        on_corrupt: Callable[[str], None] | None = None,
        check_deadline: float = CHECK_DEADLINE,
        prefetch: str = "off",
    ) -> None:
        self.store = store
        self.prefetch = prefetch  # `prefetch.PREFETCH_POLICIES`: streamed whole at open
        self.block_size = block_size
        self.readahead = readahead
        self.stats = DataStats()
        # One budget for every block buffer (memory cache, downloads, blocks waiting for the
        # hash): the ring. The memory cache may fill what the rest leaves and gives blocks
        # back when a download needs a buffer (`_lease`).
        self.budget_blocks = max(2, memory_limit // block_size)
        POOL.configure(block_size, self.budget_blocks - 1)  # and one scratch for the hash
        self._scratch: mmap.mmap | bytearray | None = None
        self._scratch_lock = trio.Lock()
        cap = memory_limit if memory_bytes is None else min(memory_bytes, memory_limit)
        self._mem = _BlockLRU(max(cap, 1), getsizeof=len)
        # small-read windows: plain bytes outside the ring, at most 1/8 of the budget
        self._small: LRUCache[tuple[str, int], Block] = LRUCache(
            max(memory_limit // 8, SMALL_WINDOW), getsizeof=len
        )
        self.max_parallel = max(1, max_parallel)
        self._loads = trio.CapacityLimiter(self.max_parallel)
        self._streams = 0  # files being streamed whole right now
        # each stream needs a few buffers of the budget (its window and its downloads): more
        # files than that wait for their turn instead of starving each other
        self._stream_turns = trio.Semaphore(max(1, self.budget_blocks // 4))
        self.check_deadline = check_deadline
        self._limiter = FairLimiter(total=max_parallel, per_file=max_parallel)
        self._files: dict[str, CachedFile] = {}
        self._nursery: trio.Nursery | None = None
        # called with the key of a file whose download did not match its sha256 (the mount
        # drops the kernel's cached pages of it)
        self.on_corrupt = on_corrupt

    def start(self, nursery: trio.Nursery) -> None:
        """Enable background read-ahead in `nursery`."""
        self._nursery = nursery

    # -- streaming whole files ----------------------------------------------------------
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
        return max(2, min(MAX_WINDOW, share, int(self._mem.maxsize) // self.block_size // 2))

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

    def _may_hold(self, cf: CachedFile) -> bool:
        """May one more block wait in memory for `cf`'s hash? Within its window, and while
        all files together hold at most half the budget this way (past that, a block waits
        on disk and the hash reads it back)."""
        if len(cf.unhashed) >= self.window() + self.max_parallel:
            return False
        held = sum(len(f.unhashed) for f in self._files.values())
        return held < max(2, self.budget_blocks // 2)

    def _at_hand(self, cf: CachedFile, idx: int) -> bool:
        """Block `idx` can be hashed without a download."""
        key = (cf.spec.key, idx)
        return idx in cf.unhashed or idx in cf.refill or key in self._mem or self.store.has(*key)

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
                    if not self._at_hand(cf, h) and h not in cf.inflight:
                        idx = h  # the block the hash needs went away: fetch it again
                        continue
                    await self._drive_hash(cf)
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

    async def _drive_hash(self, cf: CachedFile) -> None:
        """Hash what is at hand if no one else is hashing (blocks found on disk or in memory
        start no hash of their own)."""
        if cf.verified or cf.poisoned or cf.hash_lock.locked():
            return
        async with cf.hash_lock:
            await self._hash_forward(cf)
            if cf.hashed_upto >= cf.nblocks:
                await self._conclude(cf)

    def _evict_one(self) -> bool:
        """Let least recently used blocks of the memory cache go until one buffer is back in
        the ring (for `POOL.lease`); blocks still held elsewhere (a reply, the hash, a disk
        write) free nothing, so at most a few of them are dropped per call."""
        for _ in range(4):
            if not self._mem:
                return False
            if self._mem.popitem()[1] is _GIVEN:
                return True
        return False

    # -- open/close ---------------------------------------------------------------------
    def open(
        self, spec: FileSpec, fetch: Fetcher, *, into: bool = False, name: str = ""
    ) -> CachedFile:
        """The shared state of `spec`, one more handle on it. `into`: `fetch` takes an
        `into=` buffer. `name`: the file's name, for the prefetch policy (a weights file is
        streamed whole from its first read on)."""
        cf = self._open(spec, fetch, into)
        if name and wants_prefetch(self.prefetch, name):
            cf.prefetch = True
        return cf

    def _open(self, spec: FileSpec, fetch: Fetcher, into: bool) -> CachedFile:
        cf = self._files.get(spec.key)
        if cf is None or cf.spec != spec or (cf.poisoned and not cf.inflight):
            nblocks = max(1, -(-spec.size // self.block_size))
            cf = CachedFile(spec, fetch, nblocks)
            if spec.sha256 is not None:
                digests = self.store.verified_digests(spec.key, self.block_size, size=spec.size)
                if digests is not None and len(digests) == nblocks:
                    cf.digests = digests
            cf.verified = spec.sha256 is None or cf.digests is not None
            if not cf.verified:
                # copies in memory were noted by an earlier CachedFile of this key, not by
                # this one: served from here they would escape its check (`_note`)
                for k in [k for k in self._mem if k[0] == spec.key]:
                    self._mem.pop(k, None)
            self._files[spec.key] = cf
        cf.fetch = fetch  # newest handle's fetcher (fresh owner metadata)
        cf.fetch_into = into
        cf.refs += 1
        return cf

    def may_keep_pages(self, cf: CachedFile) -> bool:
        """May the kernel keep the file's cached pages at this open of `cf`? Only if it is
        verified. Every page the kernel can hold then has checked bytes: pages of earlier
        `CachedFile`s of this key were dropped when this one was first opened (it was not
        verified then, or it was verified from the start), and every byte this one served
        before its verification was compared with the hashed bytes (`_note`, windows) when
        the check passed; a mismatch drops the kernel's pages at once (`on_corrupt`)."""
        return cf.spec.sha256 is not None and cf.verified and not cf.poisoned

    def close(self, cf: CachedFile) -> None:
        cf.refs -= 1
        if cf.refs <= 0:
            cf.hash_moved.unpark_all()  # a stream waiting for the hash stops...
            if cf.stream_scope is not None:
                cf.stream_scope.cancel()  # ...and so do its downloads
        self._forget_unused(cf)

    def _forget_unused(self, cf: CachedFile) -> None:
        """Drop the state of a file no handle has open and no download still uses (called
        at close and when a download ends: a read-ahead may outlive the last handle). Kept
        only as a record of whether it was verified (the mount asks at the next open)."""
        if cf.refs > 0 or cf.inflight or cf.streaming or self._files.get(cf.spec.key) is not cf:
            return
        del self._files[cf.spec.key]
        cf.unhashed.clear()
        cf.refill.clear()
        cf.hashed_digests.clear()
        cf.seen.clear()
        cf.windows.clear()
        cf.partial.clear()
        cf.covered.clear()
        cf.served.clear()

    def is_complete(self, spec: FileSpec) -> bool:
        """All blocks on disk and (if a sha256 is known) verified."""
        nblocks = max(1, -(-spec.size // self.block_size))
        return self.store.count(spec.key) >= nblocks and (
            spec.sha256 is None or self.store.is_verified(spec.key, size=spec.size)
        )

    # -- reads --------------------------------------------------------------------------
    async def read(
        self, cf: CachedFile, off: int, size: int, stream: ReadStream | None = None
    ) -> bytes | bytearray | memoryview:
        """Bytes [off, off+size) clipped at EOF."""
        if cf.poisoned:
            # sticky while the file stays open: the kernel retries a failed read page by page,
            # and no retry may succeed with bytes from the mismatching download
            raise IntegrityError(f"{cf.spec.key} did not match its sha256; reopen to refetch")
        if cf.prefetch:
            cf.prefetch = False
            self.stream(cf, "prefetch")
        end = min(off + size, cf.spec.size)
        if off >= end:
            return b""
        bs = self.block_size
        first, last = off // bs, (end - 1) // bs
        if stream is not None:
            self._track(cf, stream, off, end, first, last)
            if (
                first == last
                # the last block goes whole, so a read of the end settles the check; a
                # one-block file is always fetched whole and verified
                and last < cf.nblocks - 1
                and cf.digests is None  # a verified file's blocks are checked whole
                and bs > SMALL_WINDOW
                and bs % SMALL_WINDOW == 0
                and stream.sequential_hits == 0
                and end - off <= SMALL_READ
                and not self._have(cf, first)
            ):
                small = await self._small_read(cf, off, end)
                if small is not None:
                    return small
        if first == last:
            block = await self._block(cf, first)
            out: bytearray | memoryview = memoryview(block)[off - first * bs : end - first * bs]
        else:
            out = bytearray()
            for idx in range(first, last + 1):
                block = await self._block(cf, idx)
                lo = max(off, idx * bs) - idx * bs
                hi = min(end, (idx + 1) * bs) - idx * bs
                out += memoryview(block)[lo:hi]
                del block  # copied: never hold a buffer while waiting for the next one
        if not cf.verified:
            cf.served.update(range(first, last + 1))
            whole = len(cf.served) >= cf.nblocks
            if whole or last == cf.nblocks - 1:
                await self._settle(cf, whole)
        self._still_good(cf)
        self.stats.bytes_served += len(out)
        return out

    @staticmethod
    def _still_good(cf: CachedFile) -> None:
        """Right before bytes go to the kernel (no await in between): a check that failed
        while this read waited must fail it too, or its pages would outlive the drop."""
        if cf.poisoned:
            raise IntegrityError(f"{cf.spec.key} did not match its sha256; reopen to refetch")

    async def _settle(self, cf: CachedFile, whole: bool) -> None:
        """Before the end of a file, or the read that completes a reading of every block, is
        served: finish the sha256 check, so whoever reads a whole file gets EIO, not success,
        when the download does not match. `whole`: every block was served, so blocks the
        running hash missed are re-read or fetched again for it; otherwise (a reader of the
        tail alone) the check completes only if every block is at hand."""
        for flight in list(cf.inflight.values()):
            await flight.done.wait()
        if cf.spec.sha256 is not None and (whole or self.store.count(cf.spec.key) >= cf.nblocks):
            # one deadline for waiting for the check another reader is running and for this
            # one's own (blocks fetched again included): k readers do not wait k deadlines
            with trio.move_on_after(self.check_deadline) as scope:
                async with cf.hash_lock:
                    await self._verify(cf, fill=whole)
            if scope.cancelled_caught:
                raise RegistryTimeout(
                    f"{cf.spec.key}: the sha256 check took longer than {self.check_deadline:g}s"
                )
        if cf.poisoned:
            raise IntegrityError(f"{cf.spec.key} did not match its sha256; reopen to refetch")

    def _have(self, cf: CachedFile, idx: int) -> bool:
        key = (cf.spec.key, idx)
        return key in self._mem or idx in cf.inflight or self.store.has(*key)

    async def _small_read(self, cf: CachedFile, off: int, end: int) -> memoryview | None:
        """A random small read of an uncached block: fetch only the aligned window around it.

        A whole block would cost its transfer time in latency (8 MiB: several ms); a random
        reader (4 KiB preads, index lookups) wants one short Range request. Windows are kept in
        memory only and not persisted. A window cannot be checked against the sha256 alone:
        its digest is recorded and compared with the block's bytes when the running hash
        reaches them, and bytes it served count toward "every block read" (`_settle`). None:
        the window can no longer join the check (its block is hashed or being hashed, or the
        file is verified): the caller reads the block whole instead."""
        key = cf.spec.key
        sw = SMALL_WINDOW
        w0 = off - off % sw
        w1 = -(-end // sw) * sw  # never past the block: blocks are whole windows, not the last
        idx = off // self.block_size
        starts = range(w0, w1, sw)
        kept = [self._small.get((key, -1 - w)) for w in starts]  # negative: never a block
        parts: list[Block] = [p for p in kept if p is not None]
        if self._window_too_late(cf, idx):
            return None
        if len(parts) < len(kept):
            data = await self._download(cf, w0, w1)
            self.stats.small_reads += 1
            self.stats.fetched_bytes += len(data)
            # one window: keep the fetched buffer itself (no copy)
            parts = (
                [data] if len(starts) == 1 else [bytes(data[w - w0 : w - w0 + sw]) for w in starts]
            )
            if not cf.poisoned:
                for w, part in zip(starts, parts, strict=True):
                    self._small[(key, -1 - w)] = part
        if cf.poisoned:
            raise IntegrityError(f"{key} did not match its sha256; reopen to refetch")
        if cf.spec.sha256 is not None:
            # no await until the windows are recorded: the hash must not pass `idx` meanwhile
            if self._window_too_late(cf, idx):
                return None
            wins = cf.windows.setdefault(idx, {})
            for w, part in zip(starts, parts, strict=True):
                digest = self.store.digest(part)
                if wins.setdefault(w, digest) != digest:  # two downloads of it differ
                    self._corrupt(cf)
                    raise IntegrityError(f"{key}: two downloads of bytes {w}-{w + sw} differ")
            whole = False
            for w in starts:
                if idx not in cf.served and self._cover(cf, idx, w, max(off, w), min(end, w + sw)):
                    cf.served.add(idx)
                    whole = len(cf.served) >= cf.nblocks
            if whole:
                await self._settle(cf, True)
        self._still_good(cf)
        self.stats.bytes_served += end - off
        if len(parts) == 1:
            return memoryview(parts[0])[off - w0 : end - w0]
        return memoryview(b"".join(parts))[off - w0 : end - w0]

    @staticmethod
    def _window_too_late(cf: CachedFile, idx: int) -> bool:
        """A window of block `idx` can no longer join the check (`_small_read`)."""
        return cf.spec.sha256 is not None and (
            cf.digests is not None or idx < max(cf.hashed_upto, cf.hashing_to)
        )

    def _cover(self, cf: CachedFile, idx: int, w0: int, off: int, end: int) -> bool:
        """Record that bytes [off, end) of window `w0` were served; True once every byte of
        block `idx` was served by small reads."""
        lo, hi = off, end
        merged: list[tuple[int, int]] = []
        for a, b in cf.partial.get(w0, []):
            if b < lo or a > hi:
                merged.append((a, b))
            else:
                lo, hi = min(a, lo), max(b, hi)
        merged.append((lo, hi))
        if merged != [(w0, w0 + SMALL_WINDOW)]:
            cf.partial[w0] = sorted(merged)
            return False
        cf.partial.pop(w0, None)
        done = cf.covered.setdefault(idx, set())
        done.add(w0)
        if len(done) < self.block_size // SMALL_WINDOW:
            return False
        del cf.covered[idx]
        return True

    def _track(
        self, cf: CachedFile, stream: ReadStream, off: int, end: int, first: int, last: int
    ) -> None:
        """Read-ahead decisions from a handle's access pattern. A reader of the file in order
        from where its sha256 stands, or one that touches several blocks out of order (mmap
        loaders: page faults arrive as scattered 1 MiB reads), gets the file streamed whole;
        other sequential readers get `readahead` blocks ahead of them."""
        if off == stream.next_off:
            stream.sequential_hits += 1
            stream.run_bytes += end - off
        else:
            stream.sequential_hits = stream.run_bytes = 0
            # page faults of an mmap loader (the kernel reads around them: 128 KiB and more),
            # not small random preads (index lookups), which keep their short range requests
            if not cf.verified and end - off > SMALL_READ and first not in cf.scattered:
                cf.scattered.add(first)
                if len(cf.scattered) >= max(DENSE_BLOCKS, cf.nblocks // 16):
                    self.stream(cf, "reads out of order")
        stream.next_off = end
        # two sequential reads in a row look like a streaming reader; a lone pread does not
        if self._nursery is None or self.readahead <= 0 or stream.sequential_hits < 2:
            return
        if cf.stream_running or (
            # a reader of the file from where its hash stands, past its first blocks (not
            # `head`: the kernel's own read-ahead makes any first read look sequential)
            not cf.verified
            and stream.run_bytes >= max(2 * self.block_size, STREAM_AFTER)
            and first <= cf.hashed_upto + self.window()
            and self.stream(cf, "sequential reader")
        ):
            return
        for idx in range(last + 1, min(last + 1 + self.readahead, cf.nblocks)):
            key = (cf.spec.key, idx)
            if key in self._mem or idx in cf.inflight:
                continue
            cf.inflight[idx] = BlockFetch()  # claim it now so the foreground waits for it
            if self.store.has(*key):  # on disk: load it into memory ahead of the reader
                self._nursery.start_soon(self._preload, cf, idx)
            else:
                self._nursery.start_soon(self._prefetch, cf, idx)

    async def _preload(self, cf: CachedFile, idx: int) -> None:
        flight = cf.inflight[idx]
        try:
            data = await self._load(cf, idx)
            if data is not None:
                self.stats.disk_hits += 1
                self._remember((cf.spec.key, idx), data)
                await self._advance_hash(cf, idx, data)
                self._recycle(cf, idx, data)
        except Exception as e:  # the foreground read will try again and report
            log.debug("read-ahead of %s block %d from disk failed: %s", cf.spec.key, idx, e)
        finally:
            if cf.inflight.get(idx) is flight:
                del cf.inflight[idx]
            flight.finish()
            self._forget_unused(cf)

    async def _prefetch(self, cf: CachedFile, idx: int) -> bool:
        """Fetch block `idx` (claimed by the caller) in the background; False if it failed."""
        try:
            data = await self._fetch(cf, idx, claimed=True)
            self.stats.prefetched_blocks += 1
            self._recycle(cf, idx, data)
            return True
        except IntegrityError:
            cf.poisoned = True
        except Exception as e:  # the foreground read will retry and report
            log.debug("read-ahead of %s block %d failed: %s", cf.spec.key, idx, e)
        return False

    async def _block(self, cf: CachedFile, idx: int) -> Block:
        key = (cf.spec.key, idx)
        while True:
            data = self._mem.get(key)
            if data is None:
                data = cf.unhashed.get(idx)  # held for the hash (noted when it arrived)
            if data is not None:
                self.stats.memory_hits += 1
                return data
            flight = cf.inflight.get(idx)
            if flight is not None:
                await flight.ready.wait()
                if key not in self._mem and not self.store.has(*key):
                    await flight.done.wait()  # evicted from memory before it reached the disk
                if flight.error is not None:
                    # share the failure: N waiters must not each wait out the retries again
                    raise flight.error
                continue  # look again: in memory, on disk, or another flight took over
            if self.store.has(*key):
                # one load per block, however many readers want it (mmap faults come in
                # bursts of 1 MiB reads of the same block)
                flight = cf.inflight[idx] = BlockFetch()
                try:
                    data = await self._load(cf, idx)
                    if data is not None:
                        self.stats.disk_hits += 1
                        self._remember(key, data)
                        flight.ready.set()
                        await self._advance_hash(cf, idx, data)
                        return data
                except Exception as e:
                    flight.error = e
                    raise
                finally:
                    if cf.inflight.get(idx) is flight:
                        del cf.inflight[idx]
                    flight.finish()
                    self._forget_unused(cf)
            return await self._fetch(cf, idx, claimed=False)

    async def _load(self, cf: CachedFile, idx: int) -> Block | None:
        """Block `idx` from disk, checked against the verified digests if there are any, or
        else noted for the comparison with the hashed bytes (`_note`)."""
        expect = self._expected(cf, idx)
        note = cf.spec.sha256 is not None and expect is None

        def load(buf: mmap.mmap | bytearray) -> tuple[Block | None, str | None]:
            data = self.store.get(cf.spec.key, idx, expect, into=buf)
            return data, (self.store.digest(data) if note and data is not None else None)

        async with self._loads:  # a bounded number of buffers filling from disk at once
            buf = await self._lease(cf, idx)
            data, digest = await trio.to_thread.run_sync(load, buf)
        del buf
        if digest is not None:
            self._note(cf, idx, digest)
        return data

    def _note(self, cf: CachedFile, idx: int, digest: str) -> None:
        """A copy of block `idx` with `digest` is about to be served: compare it with the
        checked bytes of that block if they are known, else record it for when the running
        hash reaches the block. Synchronous: nothing may hash `idx` between the two."""
        known = cf.digests
        if known is None and idx < cf.hashed_upto:
            known = cf.hashed_digests
        if known is None:
            cf.seen.setdefault(idx, set()).add(digest)
        elif known[idx] != digest:
            self._corrupt(cf)
            raise IntegrityError(f"{cf.spec.key}: block {idx} differs from the one checked")

    async def _fetch(self, cf: CachedFile, idx: int, *, claimed: bool) -> Block:
        spec = cf.spec
        flight = cf.inflight.get(idx) if claimed else None
        if flight is None:
            flight = cf.inflight[idx] = BlockFetch()
        key = (spec.key, idx)

        def release() -> None:
            if cf.inflight.get(idx) is flight:
                del cf.inflight[idx]
            flight.finish()
            self._forget_unused(cf)

        try:
            start = idx * self.block_size
            end = min(start + self.block_size, spec.size)
            data = await self._download(cf, start, end, block=idx)
            self.stats.fetched_blocks += 1
            self.stats.fetched_bytes += len(data)
            if cf.digests is not None:
                # a block of a verified file, fetched again (evicted or damaged on disk): it
                # must be the block that was verified, before anyone sees it
                known = cf.digests
                if await trio.to_thread.run_sync(self.store.digest, data) != known[idx]:
                    self._corrupt(cf)
                    raise IntegrityError(f"{spec.key}: block {idx} differs from the verified one")
                await trio.to_thread.run_sync(self._store_verified, spec, idx, data, known)
                self._remember(key, data)
                return data
            if cf.nblocks == 1 and spec.sha256 is not None:
                # a one-block file is checked before anyone sees it

                def check() -> tuple[str, str]:
                    return hashlib.sha256(data).hexdigest(), self.store.digest(data)

                sha, digest = await trio.to_thread.run_sync(check)
                if sha != spec.sha256:
                    self._corrupt(cf)
                    raise IntegrityError(f"{spec.key}: downloaded bytes do not match sha256")
                await trio.to_thread.run_sync(self._store_verified, spec, idx, data, [digest])
                cf.digests, cf.verified = [digest], True
                self._remember(key, data)
                return data
            if spec.sha256 is not None:
                # what readers get is what the check compares (`_note`)
                self._note(cf, idx, await trio.to_thread.run_sync(self.store.digest, data))
            # Readers may have the block as soon as it is in memory, while it is written to
            # disk and hashed; the end of the file waits for the sha256 check (`_settle`).
            if self._remember(key, data):
                flight.ready.set()
            # hashed as it arrives (arrival order is nearly file order; the disk write can finish
            # in any order); `_verify` finds whatever the running hash had to skip on disk
            await self._advance_hash(cf, idx, data)
            await trio.to_thread.run_sync(self.store.put, spec.key, idx, data)
            if cf.poisoned:  # the check failed while this block was being stored
                await trio.to_thread.run_sync(self.store.drop, spec.key)
                raise IntegrityError(f"{spec.key} did not match its sha256; discarded")
            if (
                not cf.verified
                and self.store.count(spec.key) >= cf.nblocks
                and not cf.hash_lock.locked()  # its holder checks, or a reader's `_settle` will
            ):
                async with cf.hash_lock:
                    await self._verify(cf)
            return data
        except Exception as e:
            flight.error = e
            raise
        finally:
            release()

    def _recycle(self, cf: CachedFile, idx: int, data: Block) -> None:
        """A read-ahead task is done with `data`: if the memory cache already let it go (it
        was evicted while being stored or hashed) and no one else holds it, reuse it."""
        if self._mem.get((cf.spec.key, idx)) is not data and idx not in cf.unhashed:
            POOL.give(data, refs=2)  # this frame's `data` and the caller's

    async def _download(
        self, cf: CachedFile, start: int, end: int, *, block: int | None = None
    ) -> Block:
        """Bytes [start, end) of `cf` in one fetch under the fair limiter, exactly that many.
        Block `block` lands in a buffer leased from the ring inside the fetch slot (at most
        one buffer per slot)."""
        key = cf.spec.key
        async with self._limiter.slot(key):
            if block is None or not cf.fetch_into:
                data: Block = await cf.fetch(start, end)
                n = len(data)
            else:
                data = await self._lease(cf, block)
                view = memoryview(data)
                got = await cf.fetch(start, end, into=view)
                n = len(got)
                if got is not view and n == len(view):  # it ignored `into`: no stale bytes
                    view[:] = got
                del got, view  # views into the buffer: it must stay recyclable
        if n != end - start:
            raise ProtocolError(f"expected {end - start} bytes of {key}, got {n}")
        return data

    async def _lease(self, cf: CachedFile, idx: int) -> mmap.mmap | bytearray:
        """A buffer for block `idx`, within the memory budget (waits while it is spent)."""
        n = min(self.block_size, cf.spec.size - idx * self.block_size)
        return await POOL.lease(n, self._evict_one)

    def _remember(self, key: tuple[str, int], data: Block) -> bool:
        # a block larger than the whole memory budget is simply not kept in memory
        if len(data) <= self._mem.maxsize:
            self._mem[key] = data
            return True
        return False

    def _store_verified(self, spec: FileSpec, idx: int, data: Block, digests: list[str]) -> None:
        """Store a checked block; (re)write the marker if eviction or damage removed it."""
        self.store.put(spec.key, idx, data)
        if not self.store.is_verified(spec.key, size=spec.size):
            self.store.mark_verified(spec.key, self.block_size, digests, size=spec.size)

    @staticmethod
    def _expected(cf: CachedFile, idx: int) -> str | None:
        return cf.digests[idx] if cf.digests is not None else None

    async def _advance_hash(self, cf: CachedFile, idx: int, data: Block) -> None:
        """Feed blocks to the running sha256 in file order, off the FUSE thread.

        Parallel fetches finish out of order: a block ahead of the hash waits in `cf.unhashed`;
        past the stream window of them it is left to the memory cache or the disk, and the hash
        picks it up there when its turn comes (at the latest in `_verify`, once every block is
        stored). So a complete file is checked without hashing it all again."""
        if cf.verified or idx < cf.hashed_upto:
            return
        if idx > cf.hashed_upto and self._may_hold(cf):
            cf.unhashed.setdefault(idx, data)  # a held copy may have been served: keep it
        if idx > cf.hashed_upto and not self._at_hand(cf, cf.hashed_upto):
            return  # the hash continues when the block it needs arrives
        try:
            cf.hash_lock.acquire_nowait()
        except trio.WouldBlock:
            # the hash is busy, and its holder may be fetching blocks for the check: never
            # wait for that. The next block is parked for the holder's `_hash_forward`, which
            # looks here first (one such block at most: the hash is not past it), or for the
            # next arrival that finds the lock free.
            if idx == cf.hashed_upto:
                cf.unhashed.setdefault(idx, data)
            return
        try:
            await self._hash_forward(cf, idx, data)
            if cf.hashed_upto >= cf.nblocks:  # complete, whatever is still on disk
                await self._conclude(cf)
        finally:
            cf.hash_lock.release()

    async def _hash_forward(self, cf: CachedFile, idx: int = -1, data: Block | None = None) -> None:
        """Hash as far as blocks are at hand (queue, memory, disk), in one worker-thread call
        per run of blocks, and compare what readers were served of those blocks (`_note`,
        `_small_read`) with the hashed bytes. Call with `cf.hash_lock` held."""
        key, bs = cf.spec.key, self.block_size
        while cf.hashed_upto < cf.nblocks and not cf.verified and not cf.poisoned:
            span = range(cf.hashed_upto, min(cf.nblocks, cf.hashed_upto + HASH_BATCH))
            # blocks back from disk go through the one scratch buffer of the budget (a lease
            # could wait for the very blocks this hash is about to let go)
            scratch = None
            if any(
                i != idx
                and i not in cf.unhashed
                and i not in cf.refill
                and (key, i) not in self._mem
                and self.store.has(key, i)
                for i in span
            ):
                await self._scratch_lock.acquire()
                if self._scratch is None:
                    self._scratch = POOL.take(self.block_size)
                scratch = self._scratch
                if cf.verified or cf.poisoned or cf.hashed_upto != span.start:
                    self._scratch_lock.release()
                    continue
            batch: list[Block | None] = []  # None: on disk, loaded by the worker
            for i in span:
                block = data if i == idx else cf.unhashed.get(i)
                if block is None:
                    block = cf.refill.get(i)
                if block is None:
                    block = self._mem.get((key, i))
                if block is None and not self.store.has(key, i):
                    break  # not fetched yet: its own _advance_hash continues from here
                batch.append(block)
            if not batch:
                if scratch is not None:
                    self._scratch_lock.release()
                return
            start = cf.hashed_upto
            hasher = cf.hasher
            # windows served so far; one served from now on falls back to its block, which
            # is compared by `_note` (`hashing_to`)
            windows = {
                i: dict(cf.windows[i]) for i in range(start, start + len(batch)) if i in cf.windows
            }

            block = data = None  # the batch holds what it needs, no longer than it

            def work(
                batch: list[Block | None] = batch,
                start: int = start,
                windows: dict[int, dict[int, str]] = windows,
                hasher: Any = hasher,
                scratch: mmap.mmap | bytearray | None = scratch,
            ) -> tuple[list[str], bool]:
                digests: list[str] = []
                for n, block in enumerate(batch):
                    i = start + n
                    if block is None:
                        block = self.store.get(key, i, into=scratch)
                        if block is None:  # evicted or damaged meanwhile
                            return digests, False
                    view = memoryview(block)
                    for w0, digest in windows.get(i, {}).items():
                        lo = w0 - i * bs
                        if self.store.digest(view[lo : lo + SMALL_WINDOW]) != digest:
                            return digests, True
                    hasher.update(block)
                    digests.append(self.store.digest(block))
                return digests, False

            wanted = len(batch)
            cf.hashing_to = start + wanted
            try:
                digests, mismatch = await trio.to_thread.run_sync(work)
            finally:
                cf.hashing_to = 0
                del batch
                if scratch is not None:
                    self._scratch_lock.release()
            if cf.poisoned or cf.hasher is not hasher:
                return  # discarded meanwhile
            for n, digest in enumerate(digests):
                cf.unhashed.pop(start + n, None)
                cf.refill.pop(start + n, None)
                cf.windows.pop(start + n, None)
                if any(d != digest for d in cf.seen.pop(start + n, ())):
                    mismatch = True  # a reader got other bytes than the ones hashed
            cf.hashed_digests.extend(digests)
            cf.hashed_upto = start + len(digests)
            cf.hash_moved.unpark_all()
            if mismatch:
                self._corrupt(cf)
                raise IntegrityError(f"{key}: bytes served differ from the ones checked")
            if len(digests) < wanted:
                return

    async def _verify(self, cf: CachedFile, fill: bool = False) -> None:
        """Check a complete file against its sha256; discard everything on mismatch. `fill`:
        blocks the running hash cannot find in memory or on disk are fetched again just for
        hashing (not stored), several at a time (the caller, `_settle`, bounds the whole
        check by `check_deadline`; what was hashed stays hashed for the next try). Call with
        `cf.hash_lock` held."""
        if cf.verified:
            return
        await self._hash_forward(cf)
        if fill and cf.hashed_upto < cf.nblocks and not cf.verified:
            await self._fill(cf)
        if cf.hashed_upto < cf.nblocks:
            return  # a block was evicted meanwhile: checked once it is back
        await self._conclude(cf)

    async def _fill(self, cf: CachedFile) -> None:
        """Fetch the blocks the running hash is missing, up to the limiter's per-file share
        in parallel, and hash them in order."""
        bs = self.block_size
        while cf.hashed_upto < cf.nblocks and not cf.verified and not cf.poisoned:
            start = cf.hashed_upto
            span = range(start, min(cf.nblocks, start + HASH_BATCH))
            flights = [cf.inflight[i] for i in span if i in cf.inflight]
            if flights:  # a stream or a reader is fetching them: never download a block twice
                for flight in flights:
                    await flight.done.wait()
                await self._hash_forward(cf)
                continue
            want = [i for i in span if i == start or not self._at_hand(cf, i)]
            want = want[: self._limiter.per_file]
            got: dict[int, Block] = {}
            errors: list[Exception] = []

            async def one(
                i: int, nursery: trio.Nursery, got: dict[int, Block], errors: list[Exception]
            ) -> None:
                lo, hi = i * bs, min((i + 1) * bs, cf.spec.size)
                try:
                    block = await self._download(cf, lo, hi, block=i)
                except Exception as e:
                    errors.append(e)
                    nursery.cancel_scope.cancel()
                    return
                self.stats.fetched_bytes += len(block)
                got[i] = block

            async with trio.open_nursery() as nursery:
                for i in want:
                    nursery.start_soon(one, i, nursery, got, errors)
            if errors:
                raise errors[0]
            if cf.poisoned or cf.verified:
                return
            cf.refill.update(got)  # where the running hash looks first; popped as hashed
            await self._hash_forward(cf)
            if cf.hashed_upto == start:
                return  # no progress (cannot happen with block `start` at hand): give up

    async def _conclude(self, cf: CachedFile) -> None:
        """The running hash covers the whole file: compare it. Call with `cf.hash_lock` held."""
        spec = cf.spec
        if cf.verified or cf.poisoned:
            return
        if cf.hasher.hexdigest() == spec.sha256:
            digests = list(cf.hashed_digests)
            await trio.to_thread.run_sync(
                functools.partial(
                    self.store.mark_verified, spec.key, self.block_size, digests, size=spec.size
                )
            )
            cf.digests, cf.verified = digests, True
            cf.unhashed.clear()
            cf.refill.clear()
            log.debug("%s verified against sha256", spec.key)
            return
        self._corrupt(cf)
        raise IntegrityError(f"{spec.key}: downloaded bytes do not match sha256; discarded")

    def _corrupt(self, cf: CachedFile) -> None:
        key = cf.spec.key
        cf.poisoned = True
        cf.verified, cf.digests = False, None
        cf.hasher, cf.hashed_upto = hashlib.sha256(), 0
        cf.hashed_digests.clear()
        cf.unhashed.clear()
        cf.refill.clear()
        cf.seen.clear()
        cf.windows.clear()
        cf.partial.clear()
        cf.covered.clear()
        for k in [k for k in self._small if k[0] == key]:  # never served again, after reopen
            self._small.pop(k, None)
        self.stats.integrity_failures += 1
        cf.hash_moved.unpark_all()
        log.error("sha256 mismatch for %s: cached blocks discarded", key)
        for k in [k for k in self._mem if k[0] == key]:
            self._mem.pop(k, None)
        self.store.drop(key)
        if self.on_corrupt is not None:
            self.on_corrupt(key)
