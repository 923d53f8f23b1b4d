"""Page-aligned buffers and O_DIRECT file I/O for the block cache and the write spool.

Why: on our VMs a buffered write costs 1.3-2.5 s of CPU per GiB (every page-cache page is
fresh memory the host must back), an O_DIRECT write of the same bytes 0.04 s; an O_DIRECT read
into a reused buffer costs 0.05 s/GiB where a buffered read into a new one costs ~1.1 s/GiB
(measured, see bench/README.md). The cache's bytes are already in the kernel's page cache of the
mount; keeping a second copy of them in the page cache of the cache directory is waste anyway.

O_DIRECT needs the buffer address, file offset and length aligned (we use 4 KiB). Filesystems
without O_DIRECT (older tmpfs, some FUSE or network filesystems) answer EINVAL: callers then
fall back to buffered I/O for good.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import threading

ALIGN = 4096
O_DIRECT: int = getattr(os, "O_DIRECT", 0)
DONTNEED: int = getattr(os, "POSIX_FADV_DONTNEED", 4)
DROP_EVERY = 64 << 20  # a sequential reader drops what it has read from the page cache


def round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def address(buf: bytearray | mmap.mmap) -> int:
    """Address of a writable buffer's first byte."""
    c = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(c)
    finally:
        del c  # drop the export at once: a bytearray with exports cannot be resized or freed


def aligned_view(size: int) -> memoryview:
    """A writable, page-aligned view of `size` bytes inside a fresh bytearray.

    A bytearray (not an mmap) because malloc can reuse freed memory for it, and because the view
    can be handed out as a block: it keeps its bytearray alive and nothing else owns it."""
    raw = bytearray(size + ALIGN)
    off = -address(raw) % ALIGN
    return memoryview(raw)[off : off + size]


def unsupported(exc: OSError) -> bool:
    """Does this error mean "no O_DIRECT here" (rather than a real I/O failure)?"""
    return exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP)


class StagingPool:
    """Reusable page-aligned buffers (anonymous mmaps), so O_DIRECT writes of unaligned data
    cost one memcpy into memory that is already backed, not fresh pages per block."""

    def __init__(self, keep: int = 4) -> None:
        self._free: list[mmap.mmap] = []
        self._keep = keep
        self._lock = threading.Lock()

    def take(self, size: int) -> mmap.mmap:
        with self._lock:
            for i, buf in enumerate(self._free):
                if len(buf) >= size:
                    return self._free.pop(i)
        return mmap.mmap(-1, round_up(max(size, ALIGN)))

    def give(self, buf: mmap.mmap) -> None:
        with self._lock:
            if len(self._free) < self._keep:
                self._free.append(buf)
                return
        buf.close()


Buffers = list[mmap.mmap] | list[memoryview]


def write_all(fd: int, bufs: Buffers) -> None:
    """pwritev `bufs` at offset 0 of `fd`, to the end (O_DIRECT writes may, rarely, be short:
    the rest goes on from the last aligned offset)."""
    views = [memoryview(b) for b in bufs]
    total = sum(len(v) for v in views)
    done = 0
    while done < total:
        n = os.pwritev(fd, _from(views, done), done)
        if n <= 0:
            raise OSError(errno.EIO, "write made no progress")
        done += n


def _from(views: list[memoryview], offset: int) -> list[memoryview]:
    """The iovec list that starts `offset` bytes into `views`."""
    out = []
    for v in views:
        if offset >= len(v):
            offset -= len(v)
            continue
        out.append(v[offset:])
        offset = 0
    return out


class SequentialReader:
    """A file read front to back into one reused buffer: `read(n)` returns a view of that
    buffer, valid until the next call.

    For the upload of a spool, whose pages were written with O_DIRECT and are on disk only:
    buffered reads with POSIX_FADV_SEQUENTIAL let the kernel's readahead fetch the next part
    while the current one is sent (O_DIRECT reads here waited for the disk between sends), and
    what was read is dropped from the page cache as it goes."""

    def __init__(self, path: str | os.PathLike[str], chunk: int = 1 << 20) -> None:
        self._buf = mmap.mmap(-1, round_up(chunk))
        self._pos = 0
        self._dropped = 0
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    def read(self, n: int = -1) -> memoryview:
        n = len(self._buf) if n < 0 else min(n, len(self._buf))
        view = memoryview(self._buf)
        got = os.preadv(self._fd, [view[:n]], self._pos)
        self._pos += got
        if self._pos - self._dropped >= DROP_EVERY:
            with contextlib.suppress(OSError):
                os.posix_fadvise(self._fd, self._dropped, self._pos - self._dropped, DONTNEED)
            self._dropped = self._pos
        return view[:got]

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.posix_fadvise(self._fd, 0, 0, DONTNEED)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SequentialReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
