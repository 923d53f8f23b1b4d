"""Recycled block buffers.

On our VMs the first touch of fresh memory costs ~0.8 s of CPU per GiB (fuse-ceiling.md §0), and
with malloc's mmap threshold bounded (mount.bound_malloc, which keeps RSS flat) every 8 MiB block
buffer is fresh memory. Downloads and cache loads therefore fill buffers taken from this pool,
and the memory cache gives a buffer back when it evicts a block.

Pooled buffers are anonymous mmaps: page-aligned, so the block cache can read and write them
with O_DIRECT and no staging copy (see `directio`).

A buffer is reused only if nothing else refers to it: CPython counts every reference, and every
memoryview of a bytearray holds one, so `sys.getrefcount` proves that no reader, hasher or
writer still sees the old bytes before they are overwritten.
"""

from __future__ import annotations

import mmap
import sys
import threading

# Anything the byte paths hand around: the buffer protocol, len() in bytes, never mutated once
# filled.
Buffer = bytes | bytearray | memoryview | mmap.mmap


class BufferPool:
    """Page-aligned buffers of one size (the block size); other sizes are plain bytearrays."""

    def __init__(self, size: int = 0, keep: int = 4) -> None:
        self.size = size
        self.keep = keep
        self.reused = 0
        self.allocated = 0
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def configure(self, size: int, keep: int = 4) -> None:
        with self._lock:
            if size != self.size:
                self._free.clear()
            self.size, self.keep = size, keep

    def take(self, n: int) -> mmap.mmap | bytearray:
        """A buffer of exactly `n` bytes with arbitrary contents: the caller overwrites all."""
        if n != self.size or n == 0:
            return bytearray(n)
        with self._lock:
            if self._free:
                self.reused += 1
                return self._free.pop()
            self.allocated += 1
        return mmap.mmap(-1, n)

    def give(self, buf: object, refs: int) -> bool:
        """Take `buf` back if the caller's `refs` references are all there are.

        `refs` counts the caller's own references, e.g. 1 for a local variable; the argument
        and getrefcount's own are added here."""
        if (
            not isinstance(buf, mmap.mmap)
            or len(buf) != self.size
            or sys.getrefcount(buf) != refs + 2
        ):
            return False
        with self._lock:
            if len(self._free) >= self.keep:
                return False
            self._free.append(buf)
        return True


POOL = BufferPool()
