"""The state the reader keeps per open file and per mount: file identity, per-file check and
stream state, in-flight downloads, per-handle access patterns, statistics, and the fair limit
on parallel fetches."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from mlregfs.buffers import Buffer, Lease

if TYPE_CHECKING:
    from mlregfs.cache.blocks import BlockStore
    from mlregfs.cache.memory import MemoryCache

Block = Buffer  # a block's bytes: whatever the fetcher or the disk filled
Fetcher = Callable[..., Awaitable[Block]]  # (start, end) or (start, end, into=buffer)


class Held(dict[int, Lease]):
    """Blocks held by index, each under its own lease (released when it leaves)."""

    def keep(self, idx: int, lease: Lease) -> None:
        """Hold a share of `lease` as block `idx`, unless a copy is held already."""
        if idx not in self:
            self[idx] = lease.share()

    def own(self, idx: int, lease: Lease) -> None:
        """Hold `lease` itself as block `idx` (it is this map's to release now)."""
        old = self.get(idx)
        self[idx] = lease
        if old is not None:
            old.release()

    def let_go(self, idx: int) -> None:
        lease = self.pop(idx, None)
        if lease is not None:
            lease.release()

    def let_go_all(self) -> None:
        for lease in self.values():
            lease.release()
        self.clear()


SMALL_WINDOW = 64 << 10  # a small read fetches this aligned window of a block only (`windows`)


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
    unhashed: Held = field(default_factory=Held)
    # blocks fetched again only for the check (`Verifier.fill`): hashed, never served
    refill: Held = field(default_factory=Held)
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
    # the whole-file stream (`Streams`): running, and its cancel scope
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


@dataclass
class Shared:
    """What the parts of one reader share: the disk and memory caches, the open files, the
    statistics, the fetch limiter and the sizes of the budget."""

    store: BlockStore
    mem: MemoryCache
    files: dict[str, CachedFile]
    stats: DataStats
    limiter: FairLimiter
    block_size: int
    budget_blocks: int  # block buffers in the ring, all users together
    max_parallel: int
