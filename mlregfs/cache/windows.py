"""Small random reads of uncached blocks: only the aligned window around the read is
fetched (one short range request), kept in memory and joined to the file's sha256 check."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from mlregfs.cache.state import SMALL_WINDOW, Block, CachedFile, Shared
from mlregfs.cache.verify import Verifier, still_good
from mlregfs.errors import IntegrityError


class Windows:
    """Small reads served by windows of SMALL_WINDOW bytes."""

    def __init__(
        self,
        shared: Shared,
        verifier: Verifier,
        *,
        download: Callable[[CachedFile, int, int], Awaitable[Block]],
    ) -> None:
        self.store, self._mem, self.stats = shared.store, shared.mem, shared.stats
        self.block_size = shared.block_size
        self._verifier = verifier
        self._download = download

    async def read(self, cf: CachedFile, off: int, end: int) -> memoryview | None:
        """A random small read of an uncached block: fetch only the aligned window around it.

        A whole block would cost its transfer time in latency (8 MiB: several ms); a random
        reader (4 KiB preads, index lookups) wants one short Range request. Windows are kept in
        memory only and not persisted. A window cannot be checked against the sha256 alone:
        its digest is recorded and compared with the block's bytes when the running hash
        reaches them, and bytes it served count toward "every block read" (`Verifier.settle`). None:
        the window can no longer join the check (its block is hashed or being hashed, or the
        file is verified): the caller reads the block whole instead."""
        key = cf.spec.key
        sw = SMALL_WINDOW
        w0 = off - off % sw
        w1 = -(-end // sw) * sw  # never past the block: blocks are whole windows, not the last
        idx = off // self.block_size
        starts = range(w0, w1, sw)
        kept = [self._mem.windows.get((key, -1 - w)) for w in starts]  # negative: never a block
        parts: list[Block] = [p for p in kept if p is not None]
        if self.too_late(cf, idx):
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
                    self._mem.windows[(key, -1 - w)] = part
        if cf.poisoned:
            raise IntegrityError(f"{key} did not match its sha256; reopen to refetch")
        if cf.spec.sha256 is not None:
            # no await until the windows are recorded: the hash must not pass `idx` meanwhile
            if self.too_late(cf, idx):
                return None
            wins = cf.windows.setdefault(idx, {})
            for w, part in zip(starts, parts, strict=True):
                digest = self.store.digest(part)
                if wins.setdefault(w, digest) != digest:  # two downloads of it differ
                    await self._verifier.corrupt(cf)
                    raise IntegrityError(f"{key}: two downloads of bytes {w}-{w + sw} differ")
            whole = False
            for w in starts:
                if idx not in cf.served and self._cover(cf, idx, w, max(off, w), min(end, w + sw)):
                    cf.served.add(idx)
                    whole = len(cf.served) >= cf.nblocks
            if whole:
                await self._verifier.settle(cf, True)
        still_good(cf)
        self.stats.bytes_served += end - off
        if len(parts) == 1:
            return memoryview(parts[0])[off - w0 : end - w0]
        return memoryview(b"".join(parts))[off - w0 : end - w0]

    @staticmethod
    def too_late(cf: CachedFile, idx: int) -> bool:
        """A window of block `idx` can no longer join the check (`read`)."""
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
