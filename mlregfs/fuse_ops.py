"""FUSE adapter: pyfuse3 handlers that call the core and map every error to errno, once.

No decisions live here. An exception other than FUSEError escaping a handler would stop the
whole mount (pyfuse3 runs all handlers in one trio nursery), so every handler goes through
`_guard`, which turns anything into FUSEError(errno) and logs it once.

Kernel bookkeeping lives here too: every entry the kernel receives (lookup, create, mkdir,
readdirplus) is counted for the core's `forget`, and the pages of a file whose download did not
match its sha256 are dropped from the kernel's page cache.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3
import trio

from mlregfs.errors import MlregfsError, to_errno
from mlregfs.fs.core import Attr, Filesystem

log = logging.getLogger("mlregfs.fuse")
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

PIN_XATTR = b"user.mlregfs.pin"

# expected misses are not worth more than a debug line
_QUIET = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, pyfuse3.ENOATTR}


def _guard(func: F) -> F:
    @functools.wraps(func)
    async def wrapper(self: Operations, *args: Any) -> Any:
        try:
            return await func(self, *args)
        except pyfuse3.FUSEError:
            raise
        except Exception as e:
            code = to_errno(e)
            self.failures[func.__name__] = self.failures.get(func.__name__, 0) + 1
            if code in _QUIET:
                log.debug("%s: %s", func.__name__, e)
            elif isinstance(e, MlregfsError):
                log.warning("%s failed (%s): %s", func.__name__, errno.errorcode.get(code, code), e)
            else:
                log.exception("%s: unexpected error, answering EIO", func.__name__)
            raise pyfuse3.FUSEError(code) from None

    return wrapper  # type: ignore[return-value]


class Operations(pyfuse3.Operations):
    """pyfuse3 entry points over a `Filesystem`."""

    supports_dot_lookup = True
    # the kernel merges small writes into ~1 MiB requests (see fuse-ceiling.md §1.8, §3)
    enable_writeback_cache = True

    def __init__(
        self, fs: Filesystem, *, uid: int | None = None, gid: int | None = None, umask: int = 0o022
    ) -> None:
        super().__init__()
        self.fs = fs
        self._umask = umask
        self.failures: dict[str, int] = {}
        self._dirs: dict[int, list[tuple[str, Attr]]] = {}
        self._next_dh = 1
        self._uid = os.getuid() if uid is None else uid
        self._gid = os.getgid() if gid is None else gid
        # page invalidations run in worker threads that may outlive their task: the session
        # must not be closed under one (`close_session`)
        self._notify_lock = threading.Lock()
        self._closing = False
        fs.data.on_corrupt = self._drop_pages

    def _drop_pages(self, key: str) -> None:
        """A download of `key` failed its sha256 check: no page the kernel cached from it may
        be served again. Called inside a read handler of that inode, so the invalidation runs
        in its own task and thread (it waits for page locks that this read holds)."""
        for ino in self.fs.inodes_of(key):
            trio.lowlevel.spawn_system_task(self._invalidate, ino)

    async def _invalidate(self, ino: int) -> None:
        def invalidate() -> None:
            with self._notify_lock:
                # pyfuse3.main has returned (trio_token unset) or the session is closing:
                # pyfuse3.close() frees the session, so nothing may be sent to it any more
                if self._closing or pyfuse3.trio_token is None:
                    return
                pyfuse3.invalidate_inode(ino, False)

        try:
            await trio.to_thread.run_sync(invalidate, abandon_on_cancel=True)
        except Exception as e:  # e.g. the kernel forgot the inode meanwhile: no pages left
            log.debug("invalidating the pages of inode %d: %s", ino, e)

    def close_session(self, wait: float = 30.0) -> None:
        """Call before pyfuse3.close(): no page invalidation starts after this, and one in
        progress is waited for. pyfuse3.invalidate_inode uses the session pointer after its
        write to the kernel returns (libfuse's fuse_send_msg), and pyfuse3.close() frees the
        session: so the wait is long (`wait` seconds). It is bounded all the same: an
        invalidation blocked on a page lock of a request that will never be answered is only
        released by closing the session."""
        self._closing = True  # set first: an invalidation waiting for the lock never starts
        if self._notify_lock.acquire(timeout=wait):
            self._notify_lock.release()
        else:
            log.error(
                "closing the FUSE session while a page invalidation is still in progress after %gs",
                wait,
            )

    def _entry(self, a: Attr) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = a.ino
        e.generation = 0
        e.entry_timeout = a.ttl
        e.attr_timeout = a.ttl
        e.st_mode = a.mode(self.fs.writable, self._umask)
        e.st_nlink = 2 if a.is_dir else 1  # links: 1
        e.st_uid = self._uid
        e.st_gid = self._gid
        e.st_size = a.size
        e.st_blksize = 1 << 20  # tells cp/dd to use large reads
        e.st_blocks = (a.size + 511) // 512
        ns = int(a.mtime * 1e9)
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = ns
        return e

    @_guard
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: Any = None
    ) -> pyfuse3.EntryAttributes:
        a = await self.fs.lookup(parent_inode, os.fsdecode(name))
        # counted in the same step as the number was taken (no await between): a FORGET
        # cannot drop it in between (Filesystem.attr_of)
        self.fs.remember(a.ino)
        return self._entry(a)

    @_guard
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._entry(await self.fs.getattr(inode))

    async def forget(self, inode_list: Any) -> None:
        # no reply and no errno: forget must not raise
        for ino, n in inode_list:
            try:
                self.fs.forget(ino, n)
            except Exception:
                log.exception("forget of inode %d failed", ino)

    @_guard
    async def opendir(self, inode: int, ctx: Any) -> int:
        entries = await self.fs.readdir(inode)  # snapshot: offsets stay stable while listing
        # its inode numbers stay valid until released; held in the same step as they were
        # taken (no await between), so a FORGET cannot drop one in between
        self.fs.hold([a.ino for _, a in entries])
        dh = self._next_dh
        self._next_dh += 1
        self._dirs[dh] = entries
        return dh

    @_guard
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        entries = self._dirs.get(fh, [])
        for i in range(start_id, len(entries)):
            name, a = entries[i]
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._entry(a), i + 1):
                break
            self.fs.remember(a.ino)  # readdirplus: the kernel counts each entry it took

    @_guard
    async def releasedir(self, fh: int) -> None:
        entries = self._dirs.pop(fh, None)
        if entries is not None:
            self.fs.unhold([a.ino for _, a in entries])

    @_guard
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        opened = await self.fs.open(inode, flags, ctx.pid)
        return pyfuse3.FileInfo(
            fh=opened.fh, keep_cache=opened.keep_cache, direct_io=opened.direct_io
        )

    @_guard
    async def read(self, fh: int, off: int, size: int) -> bytes:
        # pyfuse3 accepts any buffer (memoryview slices avoid a copy); its stub says bytes
        return await self.fs.read(fh, off, size)  # type: ignore[return-value]

    @_guard
    async def release(self, fh: int) -> None:
        await self.fs.release(fh)

    @_guard
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        opened, attr = await self.fs.create(parent_inode, os.fsdecode(name), flags, ctx.pid)
        info = pyfuse3.FileInfo(fh=opened.fh, keep_cache=False, direct_io=opened.direct_io)
        self.fs.remember(attr.ino)
        return info, self._entry(attr)

    @_guard
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.fs.write(fh, off, buf)

    @_guard
    async def flush(self, fh: int) -> None:
        await self.fs.flush(fh)

    @_guard
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.fs.fsync(fh)

    @_guard
    async def setattr(
        self, inode: int, attr: pyfuse3.EntryAttributes, fields: Any, fh: int | None, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        if fields.update_size:
            await self.fs.truncate(inode, attr.st_size)
        # mode, owner and times are not stored by the registry: accepted and not kept, so that
        # `cp -p`, `touch` and the writeback cache's mtime updates work
        return self._entry(await self.fs.getattr(inode))

    @_guard
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        a = await self.fs.mkdir(parent_inode, os.fsdecode(name))
        self.fs.remember(a.ino)
        return self._entry(a)

    @_guard
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.fs.rmdir(parent_inode, os.fsdecode(name))

    @_guard
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.fs.unlink(parent_inode, os.fsdecode(name))

    @_guard
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: Any,
    ) -> None:
        await self.fs.rename(
            parent_inode_old,
            os.fsdecode(name_old),
            parent_inode_new,
            os.fsdecode(name_new),
            flags,
        )

    @_guard
    async def link(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    @_guard
    async def symlink(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    @_guard
    async def mknod(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    @_guard
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        await self.fs.access(inode, mode)
        return True

    @_guard
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = 4096
        fs = self.fs.statfs()
        st.f_blocks = fs.blocks
        st.f_bfree = st.f_bavail = fs.free
        st.f_files = fs.files
        st.f_ffree = st.f_favail = 0
        st.f_namemax = 255
        return st

    @_guard
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        # the kernel asks for security.capability before every write(2): answered here,
        # with no await (fuse-ceiling.md §1.9)
        if not name.startswith(b"user."):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return await self.fs.getxattr(inode, os.fsdecode(name))

    @_guard
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return [os.fsencode(n) for n in await self.fs.xattr_names(inode)]

    @_guard
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return os.fsencode(await self.fs.readlink(inode))

    @_guard
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        # the control channel of `mlregfs warm --pin`: registry metadata is read-only
        if name == PIN_XATTR:
            await self.fs.pin(inode, value.strip() not in (b"", b"0"))
            return
        raise pyfuse3.FUSEError(errno.ENOTSUP)
