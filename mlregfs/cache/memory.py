"""The memory cache: whole blocks in ring buffers, each held under a lease (LRU), and
small-read windows (plain bytes, outside the ring). An evicted block's lease is released, so
its buffer goes back to the ring for the next download once no one else holds it."""

from __future__ import annotations

from cachetools import LRUCache

from mlregfs.buffers import Lease
from mlregfs.cache.state import Block

Key = tuple[str, int]  # (file key, block index); a window's index is -1 - its offset


def _size(lease: Lease) -> int:
    return len(lease.buf)


class _BlockLRU(LRUCache[Key, Lease]):
    """Releases the lease of each block it lets go (`released`: whether that freed a buffer)."""

    released = False

    def popitem(self) -> tuple[Key, Lease]:
        key, lease = super().popitem()
        self.released = lease.release()
        return key, lease


class MemoryCache:
    """Blocks of at most `capacity` bytes; windows of at most `windows` bytes."""

    def __init__(self, capacity: int, windows: int) -> None:
        self._blocks = _BlockLRU(max(capacity, 1), getsizeof=_size)
        self.windows: LRUCache[Key, Block] = LRUCache(windows, getsizeof=len)

    @property
    def maxsize(self) -> int:
        return int(self._blocks.maxsize)

    def __contains__(self, key: Key) -> bool:
        return key in self._blocks

    def get(self, key: Key) -> Block | None:
        """Block `key`'s bytes, to look at now (a holder takes a `share`)."""
        lease = self._blocks.get(key)
        return None if lease is None else lease.buf

    def share(self, key: Key) -> Lease | None:
        """A lease of the caller's own on block `key`, if it is in memory."""
        lease = self._blocks.get(key)
        return None if lease is None else lease.share()

    def pop(self, key: Key) -> None:
        lease = self._blocks.pop(key, None)
        if lease is not None:
            lease.release()

    def remember(self, key: Key, lease: Lease) -> bool:
        """Keep (a share of) block `key`; False if it is larger than the whole memory budget
        (not kept)."""
        if len(lease.buf) > self._blocks.maxsize:
            return False
        self.pop(key)
        self._blocks[key] = lease.share()
        return True

    def drop_blocks(self, file_key: str) -> None:
        for k in [k for k in self._blocks if k[0] == file_key]:
            self.pop(k)

    def drop_windows(self, file_key: str) -> None:
        for k in [k for k in self.windows if k[0] == file_key]:
            self.windows.pop(k, None)

    def evict_one(self) -> bool:
        """Let least recently used blocks go until one buffer is back in the ring (for
        `POOL.lease`); blocks still held elsewhere (a reply, the hash, a disk write) free
        nothing, so at most a few of them are dropped per call."""
        for _ in range(4):
            if not self._blocks:
                return False
            self._blocks.popitem()
            if self._blocks.released:
                return True
        return False
