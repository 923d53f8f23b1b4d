"""Range reads through the block cache: memory LRU -> disk blocks -> one fetch per block.

The cache knows nothing of HTTP: a file comes with a ``fetch(start, end)`` coroutine. Fetches
are single-flight per block and bounded in parallelism, fairly: a stalled file never holds
another file's first fetch back (`FairLimiter`); sequential readers trigger read-ahead of the
next blocks in the background, and files read whole are streamed (`stream`). Every byte
served joins the file's sha256 check (`verify`); small random reads fetch a window only
(`windows`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import mmap
from collections.abc import Callable
from typing import cast

import trio

from mlregfs.buffers import POOL, Lease
from mlregfs.cache.blocks import BlockStore
from mlregfs.cache.memory import MemoryCache
from mlregfs.cache.prefetch import wants_prefetch
from mlregfs.cache.state import (
    SMALL_WINDOW,
    Block,
    BlockFetch,
    CachedFile,
    DataStats,
    FairLimiter,
    Fetcher,
    FileSpec,
    ReadStream,
    Shared,
)
from mlregfs.cache.stream import Streams
from mlregfs.cache.verify import CHECK_DEADLINE, Verifier, still_good
from mlregfs.cache.windows import Windows
from mlregfs.errors import IntegrityError, ProtocolError

# imported from here by the filesystem and the tests
__all__ = ["CachedFile", "DataCache", "DataStats", "FairLimiter", "FileSpec", "ReadStream"]

log = logging.getLogger("mlregfs.cache")

SMALL_READ = 64 << 10  # a non-sequential read up to this size is served by a window only
DENSE_BLOCKS = 3  # distinct blocks read out of order before a file is streamed whole
STREAM_AFTER = 8 << 20  # bytes read in order (and 2 blocks) before a file is streamed whole


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
        cap = memory_limit if memory_bytes is None else min(memory_bytes, memory_limit)
        # small-read windows: plain bytes outside the ring, at most 1/8 of the budget
        self._mem = MemoryCache(cap, windows=max(memory_limit // 8, SMALL_WINDOW))
        self.max_parallel = max(1, max_parallel)
        self._loads = trio.CapacityLimiter(self.max_parallel)
        self._limiter = FairLimiter(total=max_parallel, per_file=max_parallel)
        self._files: dict[str, CachedFile] = {}
        # block digests of files verified while this mount had them open: key -> (size,
        # digests), so that reopening one reads no marker on the event loop
        self._verified: dict[str, tuple[int, list[str]]] = {}
        self._nursery: trio.Nursery | None = None
        shared = Shared(
            store,
            self._mem,
            self._files,
            self.stats,
            self._limiter,
            block_size=block_size,
            budget_blocks=self.budget_blocks,
            max_parallel=self.max_parallel,
        )
        self._verifier = Verifier(
            shared,
            check_deadline=check_deadline,
            download=self._download,
            window=lambda: self._streams.window(),
        )
        self._verifier.on_corrupt = on_corrupt
        self._streams = Streams(
            shared, self._verifier, prefetch=self._prefetch, forget_unused=self._forget_unused
        )
        self._windows = Windows(shared, self._verifier, download=self._fetch_range)
        self._replying: list[Lease] = []  # leases on blocks whose reply is being sent

    @property
    def on_corrupt(self) -> Callable[[str], None] | None:
        """Called with the key of a file whose download did not match its sha256 (the mount
        drops the kernel's cached pages of it)."""
        return self._verifier.on_corrupt

    @on_corrupt.setter
    def on_corrupt(self, hook: Callable[[str], None] | None) -> None:
        self._verifier.on_corrupt = hook

    def start(self, nursery: trio.Nursery) -> None:
        """Enable background read-ahead and streaming in `nursery`."""
        self._nursery = nursery
        self._streams.start(nursery)

    def stream(self, cf: CachedFile, why: str) -> bool:
        """Stream all of `cf` in the background (`Streams.stream`); True if one started."""
        return self._streams.stream(cf, why)

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
                digests = self._verified_digests(spec)
                if digests is not None and len(digests) == nblocks:
                    cf.digests = digests
            cf.verified = spec.sha256 is None or cf.digests is not None
            if not cf.verified:
                # copies in memory were noted by an earlier CachedFile of this key, not by
                # this one: served from here they would escape its check (`Verifier.note`)
                self._mem.drop_blocks(spec.key)
            self._files[spec.key] = cf
        cf.fetch = fetch  # newest handle's fetcher (fresh owner metadata)
        cf.fetch_into = into
        cf.refs += 1
        return cf

    async def load_marker(self, spec: FileSpec) -> None:
        """Read `spec`'s verified marker in a worker thread if `open` would read it from
        disk: the caller awaits this first, so `open` itself never touches the disk."""
        known = self._verified.get(spec.key)
        if spec.sha256 is None or not self.store.marked(spec.key):
            return
        if known is not None and known[0] == spec.size:
            return
        digests = await trio.to_thread.run_sync(
            functools.partial(
                self.store.verified_digests, spec.key, self.block_size, size=spec.size
            )
        )
        if digests is not None:
            self._verified[spec.key] = (spec.size, digests)

    def _verified_digests(self, spec: FileSpec) -> list[str] | None:
        """The block digests in `spec`'s verified marker: from memory if this mount verified
        or read it, from disk (once) otherwise; none without a marker (no I/O then)."""
        if not self.store.marked(spec.key):
            self._verified.pop(spec.key, None)  # evicted or discarded since
            return None
        known = self._verified.get(spec.key)
        if known is not None and known[0] == spec.size:
            return known[1]
        digests = self.store.verified_digests(spec.key, self.block_size, size=spec.size)
        if digests is not None:
            self._verified[spec.key] = (spec.size, digests)
        return digests

    def may_keep_pages(self, cf: CachedFile) -> bool:
        """May the kernel keep the file's cached pages at this open of `cf`? Only if it is
        verified. Every page the kernel can hold then has checked bytes: pages of earlier
        `CachedFile`s of this key were dropped when this one was first opened (it was not
        verified then, or it was verified from the start), and every byte this one served
        before its verification was compared with the hashed bytes (`Verifier.note`, windows) when
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
        if cf.verified and cf.digests is not None and not cf.poisoned:
            self._verified[cf.spec.key] = (cf.spec.size, cf.digests)
        cf.unhashed.let_go_all()
        cf.refill.let_go_all()
        cf.hashed_digests.clear()
        cf.seen.clear()
        cf.windows.clear()
        cf.partial.clear()
        cf.covered.clear()
        cf.served.clear()

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
            self._streams.stream(cf, "prefetch")
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
                small = await self._windows.read(cf, off, end)
                if small is not None:
                    return small
        held = None  # the block a one-block read returns a view of
        if first == last:
            held = await self._block(cf, first)
            out: bytearray | memoryview = memoryview(held.buf)[off - first * bs : end - first * bs]
        else:
            out = bytearray()
            for idx in range(first, last + 1):
                block = await self._block(cf, idx)
                lo = max(off, idx * bs) - idx * bs
                hi = min(end, (idx + 1) * bs) - idx * bs
                out += memoryview(block.buf)[lo:hi]
                block.release()  # copied: never hold a buffer while waiting for the next one
        try:
            if not cf.verified:
                cf.served.update(range(first, last + 1))
                whole = len(cf.served) >= cf.nblocks
                if whole or last == cf.nblocks - 1:
                    await self._verifier.settle(cf, whole)
            still_good(cf)
        except BaseException:
            if held is not None:
                del out
                held.release()
            raise
        self.stats.bytes_served += len(out)
        if held is not None:
            self._release_after_reply(held)
        return out

    def _release_after_reply(self, lease: Lease) -> None:
        """Release `lease` at the event loop's next turn: the FUSE reply copies the view this
        read returns right after the read returns, without yielding in between."""
        self._replying.append(lease)
        if len(self._replying) == 1:
            trio.lowlevel.current_trio_token().run_sync_soon(self._replied)

    def _replied(self) -> None:
        replied, self._replying = self._replying, []
        for lease in replied:
            lease.release()

    def _have(self, cf: CachedFile, idx: int) -> bool:
        key = (cf.spec.key, idx)
        return key in self._mem or idx in cf.inflight or self.store.has(*key)

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
                    self._streams.stream(cf, "reads out of order")
        stream.next_off = end
        # two sequential reads in a row look like a streaming reader; a lone pread does not
        if self._nursery is None or self.readahead <= 0 or stream.sequential_hits < 2:
            return
        if cf.stream_running or (
            # a reader of the file from where its hash stands, past its first blocks (not
            # `head`: the kernel's own read-ahead makes any first read look sequential)
            not cf.verified
            and stream.run_bytes >= max(2 * self.block_size, STREAM_AFTER)
            and first <= cf.hashed_upto + self._streams.window()
            and self._streams.stream(cf, "sequential reader")
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
            lease = await self._load(cf, idx)
            if lease is not None:
                try:
                    self.stats.disk_hits += 1
                    self._mem.remember((cf.spec.key, idx), lease)
                    await self._verifier.advance_hash(cf, idx, lease)
                finally:
                    lease.release()
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
            (await self._fetch(cf, idx, claimed=True)).release()
            self.stats.prefetched_blocks += 1
            return True
        except IntegrityError:
            cf.poisoned = True
        except Exception as e:  # the foreground read will retry and report
            log.debug("read-ahead of %s block %d failed: %s", cf.spec.key, idx, e)
        return False

    async def _block(self, cf: CachedFile, idx: int) -> Lease:
        """Block `idx` under a lease of the caller's own."""
        key = (cf.spec.key, idx)
        while True:
            lease = self._mem.share(key)
            if lease is None and idx in cf.unhashed:
                lease = cf.unhashed[idx].share()  # held for the hash (noted when it arrived)
            if lease is not None:
                self.stats.memory_hits += 1
                return lease
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
                    lease = await self._load(cf, idx)
                    if lease is not None:
                        self.stats.disk_hits += 1
                        self._mem.remember(key, lease)
                        flight.ready.set()
                        with lease.released_on_error():
                            await self._verifier.advance_hash(cf, idx, lease)
                        return lease
                except Exception as e:
                    flight.error = e
                    raise
                finally:
                    if cf.inflight.get(idx) is flight:
                        del cf.inflight[idx]
                    flight.finish()
                    self._forget_unused(cf)
            return await self._fetch(cf, idx, claimed=False)

    async def _load(self, cf: CachedFile, idx: int) -> Lease | None:
        """Block `idx` from disk, checked against the verified digests if there are any, or
        else noted for the comparison with the hashed bytes (`Verifier.note`)."""
        expect = self._verifier.expected(cf, idx)
        note = cf.spec.sha256 is not None and expect is None

        def load(buf: mmap.mmap | bytearray) -> tuple[Block | None, str | None]:
            data = self.store.get(cf.spec.key, idx, expect, into=buf)
            return data, (self.store.digest(data) if note and data is not None else None)

        async with self._loads:  # a bounded number of buffers filling from disk at once
            lease = await self._lease(cf, idx)
            buf = cast("mmap.mmap | bytearray", lease.buf)  # from the ring: never bytes
            with lease.released_on_error():
                data, digest = await trio.to_thread.run_sync(load, buf)
        if data is not buf:  # missing, or of another size than expected
            lease.release()
            if data is None:
                return None
            lease = POOL.adopt(data)
        if digest is not None:
            with lease.released_on_error():
                await self._verifier.note(cf, idx, digest)
        return lease

    async def _fetch(self, cf: CachedFile, idx: int, *, claimed: bool) -> Lease:
        """Download block `idx`; returned under a lease of the caller's own."""
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

        lease = None
        try:
            lease = await self._download(cf, idx)
            data = lease.buf
            self.stats.fetched_blocks += 1
            self.stats.fetched_bytes += len(data)
            if cf.digests is not None:
                # a block of a verified file, fetched again (evicted or damaged on disk): it
                # must be the block that was verified, before anyone sees it
                known = cf.digests
                if await trio.to_thread.run_sync(self.store.digest, data) != known[idx]:
                    await self._verifier.corrupt(cf)
                    raise IntegrityError(f"{spec.key}: block {idx} differs from the verified one")
                await trio.to_thread.run_sync(self._verifier.store_verified, spec, idx, data, known)
                self._mem.remember(key, lease)
                return lease
            if cf.nblocks == 1 and spec.sha256 is not None:
                # a one-block file is checked before anyone sees it

                def check() -> tuple[str, str]:
                    return hashlib.sha256(data).hexdigest(), self.store.digest(data)

                sha, digest = await trio.to_thread.run_sync(check)
                if sha != spec.sha256:
                    await self._verifier.corrupt(cf)
                    raise IntegrityError(f"{spec.key}: downloaded bytes do not match sha256")
                await trio.to_thread.run_sync(
                    self._verifier.store_verified, spec, idx, data, [digest]
                )
                cf.digests, cf.verified = [digest], True
                self._mem.remember(key, lease)
                return lease
            if spec.sha256 is not None:
                # what readers get is what the check compares (`Verifier.note`)
                await self._verifier.note(
                    cf, idx, await trio.to_thread.run_sync(self.store.digest, data)
                )
            # Readers may have the block as soon as it is in memory, while it is written to
            # disk and hashed; the end of the file waits for the sha256 check (`Verifier.settle`).
            if self._mem.remember(key, lease):
                flight.ready.set()
            # hashed as it arrives (arrival order is nearly file order; the disk write can finish
            # in any order); `Verifier.verify` finds whatever the running hash had to skip on disk
            await self._verifier.advance_hash(cf, idx, lease)
            await trio.to_thread.run_sync(self.store.put, spec.key, idx, data)
            if cf.poisoned:  # the check failed while this block was being stored
                await trio.to_thread.run_sync(self.store.drop, spec.key)
                raise IntegrityError(f"{spec.key} did not match its sha256; discarded")
            if (
                not cf.verified
                and self.store.count(spec.key) >= cf.nblocks
                and not cf.hash_lock.locked()  # its holder checks, or a reader's `settle` will
            ):
                async with cf.hash_lock:
                    await self._verifier.verify(cf)
            return lease
        except BaseException as e:
            if lease is not None:
                lease.release()
            if isinstance(e, Exception):
                flight.error = e
            raise
        finally:
            release()

    async def _download(self, cf: CachedFile, idx: int) -> Lease:
        """Block `idx` of `cf` in one fetch under the fair limiter, into a buffer leased from
        the ring inside the fetch slot (at most one buffer per slot)."""
        start = idx * self.block_size
        end = min(start + self.block_size, cf.spec.size)
        async with self._limiter.slot(cf.spec.key):
            if not cf.fetch_into:
                lease = POOL.adopt(await cf.fetch(start, end))
                n = len(lease.buf)
            else:
                lease = await self._lease(cf, idx)
                with lease.released_on_error():
                    view = memoryview(lease.buf)
                    got = await cf.fetch(start, end, into=view)
                    n = len(got)
                    if got is not view and n == len(view):  # it ignored `into`: no stale bytes
                        view[:] = got
                    del got, view
        if n != end - start:
            lease.release()
            raise ProtocolError(f"expected {end - start} bytes of {cf.spec.key}, got {n}")
        return lease

    async def _fetch_range(self, cf: CachedFile, start: int, end: int) -> Block:
        """Bytes [start, end) of `cf` in one fetch under the fair limiter (a window)."""
        async with self._limiter.slot(cf.spec.key):
            data: Block = await cf.fetch(start, end)
        if len(data) != end - start:
            raise ProtocolError(f"expected {end - start} bytes of {cf.spec.key}, got {len(data)}")
        return data

    async def _lease(self, cf: CachedFile, idx: int) -> Lease:
        """A buffer for block `idx`, within the memory budget (waits while it is spent)."""
        n = min(self.block_size, cf.spec.size - idx * self.block_size)
        return await POOL.lease(n, self._mem.evict_one)
