"""Integrity of the files being read: the running sha256 fed in file order, the whole-file
check, per-block digests of verified files, and poisoning on a mismatch.

Blocks are hashed in file order as they arrive. The file is checked against its sha256 as
soon as the hash is complete, and at the latest before the read that completes a reading of
every block returns (`settle`; blocks the running hash missed are re-read from disk or
fetched again just for hashing), so whoever reads a whole file gets EIO on a mismatch, even
for a file larger than the cache. A mismatch discards every block (`corrupt`). A verified
file's marker lists its block digests: every later load from disk or fetch of one of its
blocks is compared with that list.

What is checked is what readers got: every copy of a block that enters memory (a download or
a load from disk) and every small-read window served has its digest recorded until the block
is hashed (`note`), and is compared with the hashed bytes then (or at once, if the block was
hashed already). A block fetched again only for the check therefore cannot stand in for
different bytes a reader was served.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import mmap
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from mlregfs.buffers import POOL, Lease
from mlregfs.cache.state import (
    SMALL_WINDOW,
    Block,
    CachedFile,
    FileSpec,
    Held,
    Shared,
)
from mlregfs.errors import IntegrityError, RegistryTimeout

log = logging.getLogger("mlregfs.cache")

HASH_BATCH = 16  # blocks hashed per worker-thread call
CHECK_DEADLINE = 120.0  # seconds one read may spend fetching blocks again for the sha256 check

Download = Callable[[CachedFile, int], Awaitable[Lease]]  # block i in one fetch, under a lease


def still_good(cf: CachedFile) -> None:
    """Right before bytes go to the kernel (no await in between): a check that failed while
    this read waited must fail it too, or its pages would outlive the drop."""
    if cf.poisoned:
        raise IntegrityError(f"{cf.spec.key} did not match its sha256; reopen to refetch")


class Verifier:
    """Checks the open files of one reader (`files`) against their sha256."""

    def __init__(
        self,
        shared: Shared,
        *,
        check_deadline: float,
        download: Download,
        window: Callable[[], int],
    ) -> None:
        self.store, self._mem, self._files = shared.store, shared.mem, shared.files
        self.stats, self._limiter = shared.stats, shared.limiter
        self.block_size, self.budget_blocks = shared.block_size, shared.budget_blocks
        self.max_parallel = shared.max_parallel
        self.check_deadline = check_deadline
        self._download = download
        self.window = window  # blocks a stream may run ahead of the hash (`Streams.window`)
        # blocks back from disk for the hash go through one scratch buffer of the budget
        self._scratch: mmap.mmap | bytearray | None = None
        self._scratch_lock = trio.Lock()
        # called with the key of a file whose download did not match its sha256 (the mount
        # drops the kernel's cached pages of it)
        self.on_corrupt: Callable[[str], None] | None = None

    def may_hold(self, cf: CachedFile) -> bool:
        """May one more block wait in memory for `cf`'s hash? Within its window, and while
        all files together hold at most half the budget this way (past that, a block waits
        on disk and the hash reads it back)."""
        if len(cf.unhashed) >= self.window() + self.max_parallel:
            return False
        held = sum(len(f.unhashed) for f in self._files.values())
        return held < max(2, self.budget_blocks // 2)

    def at_hand(self, cf: CachedFile, idx: int) -> bool:
        """Block `idx` can be hashed without a download."""
        key = (cf.spec.key, idx)
        return idx in cf.unhashed or idx in cf.refill or key in self._mem or self.store.has(*key)

    async def drive_hash(self, cf: CachedFile) -> None:
        """Hash what is at hand if no one else is hashing (blocks found on disk or in memory
        start no hash of their own)."""
        if cf.verified or cf.poisoned or cf.hash_lock.locked():
            return
        async with cf.hash_lock:
            await self.hash_forward(cf)
            if cf.hashed_upto >= cf.nblocks:
                await self.conclude(cf)

    async def settle(self, cf: CachedFile, whole: bool) -> None:
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
                    await self.verify(cf, fill=whole)
            if scope.cancelled_caught:
                raise RegistryTimeout(
                    f"{cf.spec.key}: the sha256 check took longer than {self.check_deadline:g}s"
                )
        if cf.poisoned:
            raise IntegrityError(f"{cf.spec.key} did not match its sha256; reopen to refetch")

    async def note(self, cf: CachedFile, idx: int, digest: str) -> None:
        """A copy of block `idx` with `digest` is about to be served: compare it with the
        checked bytes of that block if they are known, else record it for when the running
        hash reaches the block. No await before either: nothing may hash `idx` between the
        two."""
        known = cf.digests
        if known is None and idx < cf.hashed_upto:
            known = cf.hashed_digests
        if known is None:
            cf.seen.setdefault(idx, set()).add(digest)
        elif known[idx] != digest:
            await self.corrupt(cf)
            raise IntegrityError(f"{cf.spec.key}: block {idx} differs from the one checked")

    def store_verified(self, spec: FileSpec, idx: int, data: Block, digests: list[str]) -> None:
        """Store a checked block; (re)write the marker if eviction or damage removed it."""
        self.store.put(spec.key, idx, data)
        if not self.store.is_verified(spec.key, size=spec.size):
            self.store.mark_verified(spec.key, self.block_size, digests, size=spec.size)

    @staticmethod
    def expected(cf: CachedFile, idx: int) -> str | None:
        return cf.digests[idx] if cf.digests is not None else None

    async def advance_hash(self, cf: CachedFile, idx: int, lease: Lease) -> None:
        """Feed blocks to the running sha256 in file order, off the FUSE thread.

        Parallel fetches finish out of order: a block ahead of the hash waits in `cf.unhashed`;
        past the stream window of them it is left to the memory cache or the disk, and the hash
        picks it up there when its turn comes (at the latest in `verify`, once every block is
        stored). So a complete file is checked without hashing it all again."""
        if cf.verified or idx < cf.hashed_upto:
            return
        if idx > cf.hashed_upto and self.may_hold(cf):
            cf.unhashed.keep(idx, lease)  # a held copy may have been served: keep it
        if idx > cf.hashed_upto and not self.at_hand(cf, cf.hashed_upto):
            return  # the hash continues when the block it needs arrives
        try:
            cf.hash_lock.acquire_nowait()
        except trio.WouldBlock:
            # the hash is busy, and its holder may be fetching blocks for the check: never
            # wait for that. The next block is parked for the holder's `hash_forward`, which
            # looks here first (one such block at most: the hash is not past it), or for the
            # next arrival that finds the lock free.
            if idx == cf.hashed_upto:
                cf.unhashed.keep(idx, lease)
            return
        try:
            await self.hash_forward(cf, idx, lease)
            if cf.hashed_upto >= cf.nblocks:  # complete, whatever is still on disk
                await self.conclude(cf)
        finally:
            cf.hash_lock.release()

    async def hash_forward(self, cf: CachedFile, idx: int = -1, lease: Lease | None = None) -> None:
        """Hash as far as blocks are at hand (queue, memory, disk), in one worker-thread call
        per run of blocks, and compare what readers were served of those blocks (`note`,
        `windows`) with the hashed bytes. Call with `cf.hash_lock` held."""
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
            # each block under a lease of the batch's own while the worker hashes it (the
            # memory cache may let it go meanwhile); None: on disk, loaded by the worker
            batch: list[Lease | None] = []
            for i in span:
                held = lease if i == idx else cf.unhashed.get(i) or cf.refill.get(i)
                share = held.share() if held is not None else self._mem.share((key, i))
                if share is None and not self.store.has(key, i):
                    break  # not fetched yet: its own advance_hash continues from here
                batch.append(share)
            if not batch:
                if scratch is not None:
                    self._scratch_lock.release()
                return
            start = cf.hashed_upto
            hasher = cf.hasher
            # windows served so far; one served from now on falls back to its block, which
            # is compared by `note` (`hashing_to`)
            windows = {
                i: dict(cf.windows[i]) for i in range(start, start + len(batch)) if i in cf.windows
            }

            def work(
                batch: list[Lease | None] = batch,
                start: int = start,
                windows: dict[int, dict[int, str]] = windows,
                hasher: Any = hasher,
                scratch: mmap.mmap | bytearray | None = scratch,
            ) -> tuple[list[str], bool]:
                digests: list[str] = []
                for n, share in enumerate(batch):
                    i = start + n
                    block = share.buf if share is not None else self.store.get(key, i, into=scratch)
                    if block is None:
                        return digests, False  # evicted or damaged meanwhile
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
                for share in batch:
                    if share is not None:
                        share.release()
                if scratch is not None:
                    self._scratch_lock.release()
            if cf.poisoned or cf.hasher is not hasher:
                return  # discarded meanwhile
            for n, digest in enumerate(digests):
                cf.unhashed.let_go(start + n)
                cf.refill.let_go(start + n)
                cf.windows.pop(start + n, None)
                if any(d != digest for d in cf.seen.pop(start + n, ())):
                    mismatch = True  # a reader got other bytes than the ones hashed
            cf.hashed_digests.extend(digests)
            cf.hashed_upto = start + len(digests)
            cf.hash_moved.unpark_all()
            if mismatch:
                await self.corrupt(cf)
                raise IntegrityError(f"{key}: bytes served differ from the ones checked")
            if len(digests) < wanted:
                return

    async def verify(self, cf: CachedFile, fill: bool = False) -> None:
        """Check a complete file against its sha256; discard everything on mismatch. `fill`:
        blocks the running hash cannot find in memory or on disk are fetched again just for
        hashing (not stored), several at a time (the caller, `settle`, bounds the whole
        check by `check_deadline`; what was hashed stays hashed for the next try). Call with
        `cf.hash_lock` held."""
        if cf.verified:
            return
        await self.hash_forward(cf)
        if fill and cf.hashed_upto < cf.nblocks and not cf.verified:
            await self.fill(cf)
        if cf.hashed_upto < cf.nblocks:
            return  # a block was evicted meanwhile: checked once it is back
        await self.conclude(cf)

    async def fill(self, cf: CachedFile) -> None:
        """Fetch the blocks the running hash is missing, up to the limiter's per-file share
        in parallel, and hash them in order."""
        while cf.hashed_upto < cf.nblocks and not cf.verified and not cf.poisoned:
            start = cf.hashed_upto
            span = range(start, min(cf.nblocks, start + HASH_BATCH))
            flights = [cf.inflight[i] for i in span if i in cf.inflight]
            if flights:  # a stream or a reader is fetching them: never download a block twice
                for flight in flights:
                    await flight.done.wait()
                await self.hash_forward(cf)
                continue
            want = [i for i in span if i == start or not self.at_hand(cf, i)]
            want = want[: self._limiter.per_file]
            got = Held()  # where the running hash looks first (`refill`): popped as hashed
            errors: list[Exception] = []

            async def one(
                i: int, nursery: trio.Nursery, got: Held, errors: list[Exception]
            ) -> None:
                try:
                    block = await self._download(cf, i)
                except Exception as e:
                    errors.append(e)
                    nursery.cancel_scope.cancel()
                    return
                self.stats.fetched_bytes += len(block.buf)
                got.own(i, block)

            try:
                async with trio.open_nursery() as nursery:
                    for i in want:
                        nursery.start_soon(one, i, nursery, got, errors)
            except BaseException:
                got.let_go_all()
                raise
            if errors or cf.poisoned or cf.verified:
                got.let_go_all()
                if errors:
                    raise errors[0]
                return
            for i, block in got.items():
                cf.refill.own(i, block)
            await self.hash_forward(cf)
            if cf.hashed_upto == start:
                return  # no progress (cannot happen with block `start` at hand): give up

    async def conclude(self, cf: CachedFile) -> None:
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
            cf.unhashed.let_go_all()
            cf.refill.let_go_all()
            log.debug("%s verified against sha256", spec.key)
            return
        await self.corrupt(cf)
        raise IntegrityError(f"{spec.key}: downloaded bytes do not match sha256; discarded")

    async def corrupt(self, cf: CachedFile) -> None:
        """Poison `cf`: every read fails until its last handle closes, and its blocks and
        windows are discarded. All but the removal of its files happens before the first
        await, so no one serves or hashes the discarded bytes meanwhile, and the mount drops
        the kernel's pages of it even if the removal is cancelled."""
        key = cf.spec.key
        cf.poisoned = True
        cf.verified, cf.digests = False, None
        cf.hasher, cf.hashed_upto = hashlib.sha256(), 0
        cf.hashed_digests.clear()
        cf.unhashed.let_go_all()
        cf.refill.let_go_all()
        cf.seen.clear()
        cf.windows.clear()
        cf.partial.clear()
        cf.covered.clear()
        self._mem.drop_windows(key)  # never served again, after reopen
        self.stats.integrity_failures += 1
        cf.hash_moved.unpark_all()
        log.error("sha256 mismatch for %s: cached blocks discarded", key)
        self._mem.drop_blocks(key)
        self.store.forget(key)
        if self.on_corrupt is not None:
            self.on_corrupt(key)
        await trio.to_thread.run_sync(self.store.drop, key)
