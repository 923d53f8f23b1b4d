"""The memory cache: whole blocks in ring buffers (LRU) and small-read windows (plain bytes,
outside the ring). An evicted block's buffer goes back to the ring for the next download."""

from __future__ import annotations

from cachetools import LRUCache

from mlregfs.buffers import POOL
from mlregfs.cache.state import Block

_GIVEN = b""  # what `_BlockLRU.popitem` returns for a block whose buffer went back to the ring

Key = tuple[str, int]  # (file key, block index); a window's index is -1 - its offset


class _BlockLRU(LRUCache[Key, Block]):
    """An evicted block's buffer goes back to the pool if no one else still holds it (a
    reader's view, a hash or a disk write in progress)."""

    def popitem(self) -> tuple[Key, Block]:
        key, value = super().popitem()
        if POOL.give(value, refs=1):
            return key, _GIVEN  # the caller must not use a recycled buffer
        return key, value


class MemoryCache:
    """Blocks of at most `capacity` bytes; windows of at most `windows` bytes."""

    def __init__(self, capacity: int, windows: int) -> None:
        self._blocks = _BlockLRU(max(capacity, 1), getsizeof=len)
        self.windows: LRUCache[Key, Block] = LRUCache(windows, getsizeof=len)

    @property
    def maxsize(self) -> int:
        return int(self._blocks.maxsize)

    def __contains__(self, key: Key) -> bool:
        return key in self._blocks

    def get(self, key: Key) -> Block | None:
        return self._blocks.get(key)

    def pop(self, key: Key, default: Block | None = None) -> Block | None:
        return self._blocks.pop(key, default)

    def remember(self, key: Key, data: Block) -> bool:
        """Keep block `key`; False if it is larger than the whole memory budget (not kept)."""
        if len(data) <= self._blocks.maxsize:
            self._blocks[key] = data
            return True
        return False

    def drop_blocks(self, file_key: str) -> None:
        for k in [k for k in self._blocks if k[0] == file_key]:
            self._blocks.pop(k, None)

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
            if self._blocks.popitem()[1] is _GIVEN:
                return True
        return False
