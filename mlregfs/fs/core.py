"""The filesystem core: the operations the FUSE adapter forwards, kernel-free.

Returns plain dataclasses and raises mlregfs.errors types; the adapter turns those into
pyfuse3 replies and errno. Everything here can be driven without a kernel. The capabilities
live beside it: `namespace` (listings, entries, attributes), `writes` (the write path),
`uploader` (the upload state machine), `entries` (mkdir, rmdir, unlink, rename), `nodes`
and `handles` (the inode and handle tables), `xattrs` (registry metadata).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import trio

from mlregfs.errors import (
    IsADirectory,
    NoAttribute,
    NotFound,
    NotPermitted,
    ReadOnly,
)
from mlregfs.fs import xattrs
from mlregfs.fs.entries import RENAME_EXCHANGE, RENAME_NOREPLACE, Entries
from mlregfs.fs.handles import FileHandle, Opened, WriteHandle
from mlregfs.fs.namespace import ALIAS_TTL, RECHECK_AFTER
from mlregfs.fs.nodes import ROOT_INO, Attr, Kind, Node, Timeouts
from mlregfs.registry.types import Candidate, ModelVersion, Run

__all__ = [
    "ALIAS_TTL",
    "RECHECK_AFTER",
    "RENAME_EXCHANGE",
    "RENAME_NOREPLACE",
    "ROOT_INO",
    "Attr",
    "Filesystem",
    "Opened",
    "StatFs",
    "Timeouts",
    "WriteHandle",
]


@dataclass(frozen=True)
class StatFs:
    """What statfs answers, in 4 KiB blocks."""

    blocks: int  # the disk cache's size (or what it holds, if more)
    free: int  # 0 on a read-only mount: nothing can be written
    files: int  # inodes known now


class Filesystem(Entries):
    """POSIX view of one project's model registry."""

    @property
    def writable(self) -> bool:
        return self.spool is not None

    async def access(self, ino: int, mode: int) -> None:
        """access(2): the file must exist; writing needs a writable mount (EROFS)."""
        await self.getattr(ino)
        if mode & os.W_OK and not self.writable:
            raise ReadOnly("this mount is read-only")

    def statfs(self) -> StatFs:
        store = self.data.store
        used = store.stats.stored_bytes // 4096
        blocks = max(store.capacity // 4096, used)
        return StatFs(blocks, blocks if self.writable else 0, len(self.inodes))

    async def open(self, ino: int, flags: int, pid: int = 0) -> Opened:
        """`pid`: the opening process (0: unknown), for `_last_close`."""
        node = self.node(ino)
        if node.is_dir:
            raise IsADirectory("open of a directory for reading data")
        if node.kind is Kind.ALIAS:
            raise NotPermitted("an alias link is opened through its version")
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC):
            return await self._open_for_write(node, flags, pid, ino)
        w = self._writing.get((node.owner, node.path))
        if w is not None and not w.copying:  # a file still being written: read its spool
            fh = self.handles.add(WriteHandle(node, w.spool))
            self._keep_pages(ino, None)  # pages of the spool: the next open drops them
            return Opened(fh, keep_cache=False)
        f = await self._remote_file(node)
        cached = await self._open_cached(node, f)
        fh = self.handles.add(FileHandle(node, f, cached))
        return Opened(fh, keep_cache=f.sha256 is not None and self._keep_pages(ino, cached))

    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray | memoryview:
        h = self.handles.get(fh)
        if h is None:
            raise NotFound(f"unknown file handle {fh}")
        if isinstance(h, WriteHandle):
            await self._drain(h)  # a reader sees every byte written so far
            return h.spool.read(off, size)
        return await self.data.read(h.cached, off, size, h.stream)

    async def pin(self, ino: int, on: bool) -> None:
        """Keep a file's cached blocks from eviction (`mlregfs warm --pin`)."""
        node = self.node(ino)
        if node.kind is not Kind.FILE:
            raise IsADirectory("only files can be pinned")
        f = await self._remote_file(node)
        await trio.to_thread.run_sync(self.data.store.pin, self.cache_key(f), on)

    async def xattr_names(self, ino: int) -> list[str]:
        """Names `getxattr` answers for `ino`; the run's are listed without fetching it."""
        attrs, run_id = await self._xattrs(self.node(ino))
        return sorted([*attrs, *(xattrs.RUN_NAMES if run_id else ())])

    async def getxattr(self, ino: int, name: str) -> bytes:
        if not name.startswith(xattrs.PREFIXES):
            raise NoAttribute(name)  # e.g. a file manager's user.xdg.*: no await, no I/O
        attrs, run_id = await self._xattrs(self.node(ino))
        if name in xattrs.RUN_NAMES and run_id:
            try:
                attrs = xattrs.run_attrs(await self.run(run_id))
            except NotFound:  # the run was deleted: it has nothing to show
                raise NoAttribute(f"run {run_id} not found") from None
        return xattrs.value(attrs, name)

    async def run(self, run_id: str) -> Run:
        """What a run logged (cached like a listing)."""

        async def fetch() -> Run:
            return await self.registry.get_run(run_id)

        return await self.meta.get(("run", run_id), fetch, self.timeouts.listing)

    async def _xattrs(self, node: Node) -> tuple[xattrs.Attrs, str | None]:
        """The attributes of `node` known without fetching its run, and its run id."""
        k = node.kind
        if k is Kind.FILE:
            w = self._writing.get((node.owner, node.path))
            if w is not None and not w.copying:
                return xattrs.pending_attrs("held" if w.held else "pending"), None
            f = await self._remote_file(node)
            cached = self.data.store.stored_bytes(self.cache_key(f))
            return xattrs.file_attrs(f, cached), None
        if k is Kind.VERSION:
            v = await self.owner(node.owner)
            assert isinstance(v, ModelVersion)
            if v.package_id is None:  # MLflow's version entity has none; its files do
                top = (await self.file_tree(node.owner)).get("")
                some = next(iter(top.files.values()), None) if top else None
                v = replace(v, package_id=some.package_id if some else None)
            return xattrs.version_attrs(v), v.run_id
        if k is Kind.CANDIDATE:
            c = await self.owner(node.owner)
            assert isinstance(c, Candidate)
            return xattrs.candidate_attrs(c), c.eid
        if k is Kind.MODEL_DIR:
            models = await self.models()
            entries = self.model_dir(models, node.name)
            if entries is None:
                raise NotFound(f"model path {node.name!r} not found")
            return xattrs.model_attrs(models.get(node.name), entries.aliases), None
        if k is Kind.ALIAS:
            return {}, None  # the kernel keeps user.* off links; nothing to say anyway
        await self._attr(node)  # a directory inside a version must still exist
        kind = {Kind.DIR: "directory", Kind.ROOT: "root"}.get(k, k.value)
        return {"user.mlregfs.kind": kind}, None
