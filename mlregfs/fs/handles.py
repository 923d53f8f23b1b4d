"""Open files: a read handle of a registry file, a write handle of a spooled one; the table."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import count

import trio

from mlregfs.cache.reader import CachedFile, ReadStream
from mlregfs.errors import MlregfsError
from mlregfs.fs.nodes import Node
from mlregfs.fs.writer import SpoolWriter
from mlregfs.registry import validate
from mlregfs.registry.types import RemoteFile
from mlregfs.spool import SpoolFile

# only a valid sha256 (64 hex digits, the registry's rule) names a cache entry
_IS_SHA256 = validate.check(validate.sha256)


@dataclass
class FileHandle:
    node: Node
    file: RemoteFile
    cached: CachedFile
    stream: ReadStream = field(default_factory=ReadStream)


@dataclass
class WriteHandle:
    """A file being written: bytes go to a spool file and are uploaded at flush/fsync/close."""

    node: Node
    spool: SpoolFile
    replaces: tuple[RemoteFile, ...] = ()  # the copy being overwritten (O_TRUNC)
    # the last upload failure, reported again on fsync/close (an OSError: the journal could
    # not be saved); both carry an errno
    error: MlregfsError | OSError | None = None
    uploads: int = 0
    writer: SpoolWriter | None = None  # queued writes (when the filesystem has a nursery)
    spool_error: OSError | None = None  # a spool write failed: nothing of it is ever uploaded
    upload_lock: trio.Lock = field(default_factory=trio.Lock)  # one upload at a time per file
    # a PUT of this handle was stored (or may have been): the next upload deletes the older
    # copies of the path the registry lists, so an fsync'd copy does not stay (README 21)
    drop_older: bool = False
    # sha256 of a PUT that failed after it was sent (timeout, cut off, 5xx): the registry may
    # hold it. The next upload of the same bytes asks the registry first and does not send
    # them again if they are there (as `recover` does); other bytes are sent, and the copy
    # that may exist is an older copy deleted after it (drop_older)
    unsure: str | None = None
    putting: bool = False  # a PUT is in flight: a write or truncate now is EBUSY
    active: int = 0  # unqueued writes running in worker threads
    quiet: trio.Event = field(default_factory=trio.Event)  # set when `active` drops to 0
    # sha256 of the bytes the registry serves under this name (None: nothing, or unknown):
    # an upload of the same bytes is skipped (README Semantics 44)
    served: str | None = None
    pid: int = 0  # the process that opened it for writing (0: unknown): see `_last_close`
    ino: int = 0  # the kernel's inode number of the file, for the same
    wrote: bool = False  # written or truncated since it was opened or last uploaded
    writers: int = 0  # open write handles; 0 once closed (held, or being released)
    held: bool = False  # closed with a temporary name: uploaded when renamed (Semantics 41)
    # created with O_EXCL, as every temporary-file maker does (mkstemp, Rust's tempfile):
    # `cp` or `open("w")` of a file that only looks temporary is not held
    excl: bool = False
    copying: bool = False  # its current bytes are being copied in: readers use the registry
    discarded: bool = False  # removed while open: nothing is uploaded, the spool goes at release

    async def drain(self) -> None:
        """Wait for this writer's queued writes; raise their failure (kept as the spool's)."""
        if self.writer is None:
            return
        try:
            await self.writer.drain()
        except Exception as e:  # whatever it was, some bytes are not in the spool
            self.spool_error = e if isinstance(e, OSError) else OSError(errno.EIO, str(e))
            raise self.spool_error from None

    async def settle(self) -> None:
        """Wait until every write that has started is on disk."""
        await self.drain()
        while self.active:
            await self.quiet.wait()


@dataclass(frozen=True)
class Opened:
    fh: int
    keep_cache: bool  # immutable bytes (sha256 known): the kernel may keep its page cache
    # writes bypass the page cache: 1 MiB requests straight to the spool, ~2x the rate of
    # the writeback cache on our VMs (its page-cache fill is fresh memory per write)
    direct_io: bool = False


class HandleTable:
    """File handle numbers, never reused, for read and write handles."""

    def __init__(self) -> None:
        self._handles: dict[int, FileHandle | WriteHandle] = {}
        self._next_fh = count(1)

    def add(self, h: FileHandle | WriteHandle) -> int:
        fh = next(self._next_fh)
        self._handles[fh] = h
        return fh

    def get(self, fh: int) -> FileHandle | WriteHandle | None:
        return self._handles.get(fh)

    def pop(self, fh: int) -> FileHandle | WriteHandle | None:
        return self._handles.pop(fh, None)

    def __iter__(self) -> Iterator[FileHandle | WriteHandle]:
        return iter(list(self._handles.values()))

    def uses(self, node: Node) -> bool:
        """Does an open handle point at `node`?"""
        return any(h.node == node for h in self._handles.values())


def sha(f: RemoteFile | None) -> str | None:
    """`f`'s sha256 when it is a valid one (lower case), else None."""
    if f is None or not f.sha256 or not _IS_SHA256(f.sha256):
        return None
    return f.sha256.lower()
