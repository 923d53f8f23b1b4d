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
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio
from cachetools import LRUCache

from mlregfs.buffers import POOL, Buffer
from mlregfs.cache.blocks import BlockStore
from mlregfs.errors import IntegrityError, ProtocolError

log = logging.getLogger("mlregfs.cache")

Block = Buffer  # a block's bytes: whatever the fetcher or the disk filled
Fetcher = Callable[[int, int], Awaitable[Block]]

SMALL_READ = 64 << 10  # a non-sequential read up to this size is "small"...
SMALL_WINDOW = 256 << 10  # ...and is served by fetching this aligned window only
MAX_UNHASHED = 4  # blocks held for the running sha256 while an earlier one is still in flight
HASH_BATCH = 16  # blocks hashed per worker-thread call


class _BlockLRU(LRUCache[tuple[str, int], Block]):
    """The memory cache: an evicted block's buffer goes back to the pool if no one else
    still holds it (a reader's view, a hash or a disk write in progress)."""

    def popitem(self) -> tuple[tuple[str, int], Block]:
        key, value = super().popitem()
        POOL.give(value, refs=1)
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
    refs: int = 0
    verified: bool = False
    poisoned: bool = False  # a sha256 check failed: every read fails until all handles close
    inflight: dict[int, BlockFetch] = field(default_factory=dict)
    # sha256 computed while blocks arrive in order, so a sequential read needs no re-read
    hasher: Any = field(default_factory=hashlib.sha256)
    hashed_upto: int = 0  # blocks [0, hashed_upto) are in `hasher`
    # blocks that arrived ahead of `hashed_upto` (parallel fetches finish out of order); held
    # here, not in the memory LRU, so the last blocks of a file need no re-read from disk
    unhashed: dict[int, Block] = field(default_factory=dict)
    hash_lock: trio.Lock = field(default_factory=trio.Lock)
    # digests of blocks [0, hashed_upto), for the verified marker
    hashed_digests: list[str] = field(default_factory=list)
    # known-good block digests once verified (from the marker or the check): every block
    # loaded from disk or fetched again is compared with its entry
    digests: list[str] | None = None
    served: set[int] = field(default_factory=set)  # blocks served whole through this state


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


class DataCache:
    """Serves byte ranges of remote files out of memory, disk, or the network."""

    def __init__(
        self,
        store: BlockStore,
        *,
        block_size: int = 8 << 20,
        memory_bytes: int = 64 << 20,
        readahead: int = 4,
        max_parallel: int = 4,
        on_corrupt: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.block_size = block_size
        self.readahead = readahead
        self.stats = DataStats()
        self._mem = _BlockLRU(max(memory_bytes, 1), getsizeof=len)
        self._small: LRUCache[tuple[str, int], Block] = LRUCache(16 << 20, getsizeof=len)
        self._limiter = FairLimiter(total=max_parallel, per_file=max_parallel)
        self._files: dict[str, CachedFile] = {}
        self._nursery: trio.Nursery | None = None
        # called with the key of a file whose download did not match its sha256 (the mount
        # drops the kernel's cached pages of it)
        self.on_corrupt = on_corrupt

    def start(self, nursery: trio.Nursery) -> None:
        """Enable background read-ahead in `nursery`."""
        self._nursery = nursery

    # -- open/close ---------------------------------------------------------------------
    def open(self, spec: FileSpec, fetch: Fetcher) -> CachedFile:
        cf = self._files.get(spec.key)
        if cf is None or cf.spec != spec or (cf.poisoned and not cf.inflight):
            nblocks = max(1, -(-spec.size // self.block_size))
            cf = CachedFile(spec, fetch, nblocks)
            if spec.sha256 is not None:
                digests = self.store.verified_digests(spec.key, self.block_size)
                if digests is not None and len(digests) == nblocks:
                    cf.digests = digests
            cf.verified = spec.sha256 is None or cf.digests is not None
            self._files[spec.key] = cf
        cf.fetch = fetch  # newest handle's fetcher (fresh owner metadata)
        cf.refs += 1
        return cf

    def close(self, cf: CachedFile) -> None:
        cf.refs -= 1
        if cf.refs <= 0 and self._files.get(cf.spec.key) is cf and not cf.inflight:
            del self._files[cf.spec.key]

    def is_complete(self, spec: FileSpec) -> bool:
        """All blocks on disk and (if a sha256 is known) verified."""
        nblocks = max(1, -(-spec.size // self.block_size))
        return self.store.count(spec.key) >= nblocks and (
            spec.sha256 is None or self.store.is_verified(spec.key)
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
        end = min(off + size, cf.spec.size)
        if off >= end:
            return b""
        bs = self.block_size
        first, last = off // bs, (end - 1) // bs
        if stream is not None:
            self._maybe_readahead(cf, stream, off, end, last)
            if (
                first == last
                and cf.nblocks > 1  # a one-block file is always fetched whole and verified
                and self.block_size > SMALL_WINDOW
                and stream.sequential_hits == 0
                and end - off <= SMALL_READ
                and not self._have(cf, first)
            ):
                return await self._small_read(cf, off, end)
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
        if not cf.verified:
            cf.served.update(range(first, last + 1))
            whole = len(cf.served) >= cf.nblocks
            if whole or last == cf.nblocks - 1:
                await self._settle(cf, whole)
        self.stats.bytes_served += len(out)
        return out

    async def _settle(self, cf: CachedFile, whole: bool) -> None:
        """Before the end of a file, or the read that completes a reading of every block, is
        served: finish the sha256 check, so whoever reads a whole file gets EIO, not success,
        when the download does not match. `whole`: every block was served, so blocks the
        running hash missed are re-read or fetched again for it; otherwise (a reader of the
        tail alone) the check completes only if every block is at hand."""
        for flight in list(cf.inflight.values()):
            await flight.done.wait()
        if cf.spec.sha256 is not None and (whole or self.store.count(cf.spec.key) >= cf.nblocks):
            async with cf.hash_lock:
                await self._verify(cf, fill=whole)
        if cf.poisoned:
            raise IntegrityError(f"{cf.spec.key} did not match its sha256; reopen to refetch")

    def _have(self, cf: CachedFile, idx: int) -> bool:
        key = (cf.spec.key, idx)
        return key in self._mem or idx in cf.inflight or self.store.has(*key)

    async def _small_read(self, cf: CachedFile, off: int, end: int) -> bytes | memoryview:
        """A random small read of an uncached block: fetch only the aligned window around it.

        A whole block would cost its transfer time in latency (8 MiB: several ms); a random
        reader (4 KiB preads, index lookups) wants one short Range request. Windows are kept in
        memory only: they are not whole blocks, so they cannot be checked against sha256 and
        are not persisted."""
        w0 = off - off % SMALL_WINDOW
        w1 = min(cf.spec.size, -(-end // SMALL_WINDOW) * SMALL_WINDOW)
        key = (cf.spec.key, -1 - w0)  # negative index: a window, never a block
        data = self._small.get(key)
        if data is None or len(data) < w1 - w0:
            async with self._limiter.slot(cf.spec.key):
                data = await cf.fetch(w0, w1)
            if len(data) != w1 - w0:
                raise ProtocolError(f"expected {w1 - w0} bytes of {cf.spec.key}, got {len(data)}")
            self.stats.small_reads += 1
            self.stats.fetched_bytes += len(data)
            self._small[key] = bytes(data)
        self.stats.bytes_served += end - off
        return memoryview(data)[off - w0 : end - w0]

    def _maybe_readahead(
        self, cf: CachedFile, stream: ReadStream, off: int, end: int, last: int
    ) -> None:
        if off == stream.next_off:
            stream.sequential_hits += 1
        else:
            stream.sequential_hits = 0
        stream.next_off = end
        # two sequential reads in a row look like a streaming reader; a lone pread does not
        if self._nursery is None or self.readahead <= 0 or stream.sequential_hits < 2:
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
            data = await trio.to_thread.run_sync(
                self.store.get, cf.spec.key, idx, self._expected(cf, idx)
            )
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

    async def _prefetch(self, cf: CachedFile, idx: int) -> None:
        try:
            data = await self._fetch(cf, idx, claimed=True)
            self.stats.prefetched_blocks += 1
            self._recycle(cf, idx, data)
        except IntegrityError:
            cf.poisoned = True
        except Exception as e:  # the foreground read will retry and report
            log.debug("read-ahead of %s block %d failed: %s", cf.spec.key, idx, e)

    async def _block(self, cf: CachedFile, idx: int) -> Block:
        key = (cf.spec.key, idx)
        while True:
            data = self._mem.get(key)
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
                if key in self._mem or self.store.has(*key):
                    continue
            if self.store.has(*key):
                data = await trio.to_thread.run_sync(self.store.get, *key, self._expected(cf, idx))
                if data is not None:
                    self.stats.disk_hits += 1
                    self._remember(key, data)
                    await self._advance_hash(cf, idx, data)
                    return data
            return await self._fetch(cf, idx, claimed=False)

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

        try:
            start = idx * self.block_size
            end = min(start + self.block_size, spec.size)
            async with self._limiter.slot(spec.key):
                data = await cf.fetch(start, end)
            if len(data) != end - start:
                raise ProtocolError(f"expected {end - start} bytes of {spec.key}, got {len(data)}")
            self.stats.fetched_blocks += 1
            self.stats.fetched_bytes += len(data)
            if cf.digests is not None:
                # a block of a verified file, fetched again (evicted or damaged on disk): it
                # must be the block that was verified, before anyone sees it
                known = cf.digests
                if await trio.to_thread.run_sync(self.store.digest, data) != known[idx]:
                    self._corrupt(cf)
                    raise IntegrityError(f"{spec.key}: block {idx} differs from the verified one")
                await trio.to_thread.run_sync(self._store_verified, spec.key, idx, data, known)
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
                await trio.to_thread.run_sync(self._store_verified, spec.key, idx, data, [digest])
                cf.digests, cf.verified = [digest], True
                self._remember(key, data)
                return data
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
            if not cf.verified and self.store.count(spec.key) >= cf.nblocks:
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

    def _remember(self, key: tuple[str, int], data: Block) -> bool:
        # a block larger than the whole memory budget is simply not kept in memory
        if len(data) <= self._mem.maxsize:
            self._mem[key] = data
            return True
        return False

    def _store_verified(self, key: str, idx: int, data: Block, digests: list[str]) -> None:
        """Store a checked block; (re)write the marker if eviction or damage removed it."""
        self.store.put(key, idx, data)
        if not self.store.is_verified(key):
            self.store.mark_verified(key, self.block_size, digests)

    @staticmethod
    def _expected(cf: CachedFile, idx: int) -> str | None:
        return cf.digests[idx] if cf.digests is not None else None

    async def _advance_hash(self, cf: CachedFile, idx: int, data: Block) -> None:
        """Feed blocks to the running sha256 in file order, off the FUSE thread.

        Parallel fetches finish out of order: a block ahead of the hash waits in `cf.unhashed`;
        past MAX_UNHASHED of them it is left to the memory cache or the disk, and the hash
        picks it up there when its turn comes (at the latest in `_verify`, once every block is
        stored). So a complete file is checked without hashing it all again."""
        if cf.verified or idx < cf.hashed_upto:
            return
        if idx > cf.hashed_upto:
            if len(cf.unhashed) < MAX_UNHASHED:
                cf.unhashed[idx] = data
            return
        async with cf.hash_lock:
            await self._hash_forward(cf, idx, data)
            if cf.hashed_upto >= cf.nblocks:  # complete, whatever is still on disk
                await self._conclude(cf)

    async def _hash_forward(self, cf: CachedFile, idx: int = -1, data: Block | None = None) -> None:
        """Hash as far as blocks are at hand (queue, memory, disk), in one worker-thread call
        per run of blocks. Call with `cf.hash_lock` held."""
        key = cf.spec.key
        while cf.hashed_upto < cf.nblocks and not cf.verified:
            batch: list[Block | None] = []  # None: on disk, loaded by the worker
            for i in range(cf.hashed_upto, min(cf.nblocks, cf.hashed_upto + HASH_BATCH)):
                block = data if i == idx else cf.unhashed.get(i)
                if block is None:
                    block = self._mem.get((key, i))
                if block is None and not self.store.has(key, i):
                    break  # not fetched yet: its own _advance_hash continues from here
                batch.append(block)
            if not batch:
                return
            start = cf.hashed_upto

            def work(batch: list[Block | None] = batch, start: int = start) -> int:
                for n, block in enumerate(batch):
                    if block is None:
                        block = self.store.get(key, start + n)
                        if block is None:  # evicted or damaged meanwhile
                            return n
                    cf.hasher.update(block)
                    cf.hashed_digests.append(self.store.digest(block))
                return len(batch)

            done = await trio.to_thread.run_sync(work)
            for i in range(start, start + done):
                cf.unhashed.pop(i, None)
            cf.hashed_upto = start + done
            if done < len(batch):
                return

    async def _verify(self, cf: CachedFile, fill: bool = False) -> None:
        """Check a complete file against its sha256; discard everything on mismatch. `fill`:
        blocks the running hash cannot find in memory or on disk are fetched again just for
        hashing (not stored). Call with `cf.hash_lock` held."""
        if cf.verified:
            return
        await self._hash_forward(cf)
        while fill and cf.hashed_upto < cf.nblocks and not cf.verified:
            idx = cf.hashed_upto
            start = idx * self.block_size
            end = min(start + self.block_size, cf.spec.size)
            async with self._limiter.slot(cf.spec.key):
                data = await cf.fetch(start, end)
            if len(data) != end - start:
                got = len(data)
                raise ProtocolError(f"expected {end - start} bytes of {cf.spec.key}, got {got}")
            self.stats.fetched_bytes += len(data)
            await self._hash_forward(cf, idx, data)  # hashes at least block `idx`
        if cf.hashed_upto < cf.nblocks:
            return  # a block was evicted meanwhile: checked once it is back
        await self._conclude(cf)

    async def _conclude(self, cf: CachedFile) -> None:
        """The running hash covers the whole file: compare it. Call with `cf.hash_lock` held."""
        spec = cf.spec
        if cf.verified or cf.poisoned:
            return
        if cf.hasher.hexdigest() == spec.sha256:
            digests = list(cf.hashed_digests)
            await trio.to_thread.run_sync(
                self.store.mark_verified, spec.key, self.block_size, digests
            )
            cf.digests, cf.verified = digests, True
            cf.unhashed.clear()
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
        self.stats.integrity_failures += 1
        log.error("sha256 mismatch for %s: cached blocks discarded", key)
        for k in [k for k in self._mem if k[0] == key]:
            self._mem.pop(k, None)
        self.store.drop(key)
        if self.on_corrupt is not None:
            self.on_corrupt(key)
