"""Writing files: open for writing, create, write, truncate, flush, fsync and the last close.

Bytes go to a spool file; the close that ends the writing hands it to the `Uploader`, and a
temporary name is held until it is renamed (README Semantics 41-44).
"""

from __future__ import annotations

import contextlib
import logging
import os

import trio

from mlregfs import errors as E
from mlregfs.cache.reader import ReadStream
from mlregfs.errors import Busy, Exists, MlregfsError, NotPermitted
from mlregfs.fs.handles import FileHandle, Opened, WriteHandle, sha
from mlregfs.fs.namespace import Namespace
from mlregfs.fs.nodes import Attr, Kind, Node
from mlregfs.fs.tempnames import is_temp, temp_tool
from mlregfs.fs.writer import SpoolWriter
from mlregfs.names import check_file_name
from mlregfs.registry.types import RemoteFile
from mlregfs.spool import UploadState

log = logging.getLogger("mlregfs.fs")

_COPY_STEP = 1 << 20  # in-place edits copy the current bytes into the spool in these steps


class Writes(Namespace):
    """The write path of the filesystem (a read-only mount refuses it: `_writable`)."""

    async def release(self, fh: int) -> None:
        """Last close of a handle: upload what was not uploaded yet, then forget the handle."""
        h = self.handles.pop(fh)
        if h is None:
            return
        self.inodes.released(h.node)  # the kernel may have forgotten it meanwhile
        if isinstance(h, FileHandle):
            self.data.close(h.cached)
            return
        if h.discarded:  # removed while open: nothing is uploaded
            h.writers -= 1
            if h.writers <= 0:
                await self._drop_spool(h)
            return
        if self._writing.get((h.node.owner, h.node.path)) is not h:
            return  # a reader of a file being written
        h.writers -= 1
        if h.writers > 0:
            return
        if self._is_held(h) and h.spool_error is None and h.spool.dirty:
            await self._hold(h)
            return
        kept = False
        try:
            await self._drain(h)
            if h.writers > 0 or h.discarded:
                return  # opened again or removed meanwhile: that decides (the finally skips)
            if h.spool.dirty and h.error is None and h.spool_error is None:
                await self.uploader.upload(h)  # errors here reach no caller: logged, spool kept
        except (MlregfsError, OSError):
            pass  # logged where it happened; a spool write failure is in h.spool_error
        finally:
            # not if it was opened again (or removed) meanwhile: that handle finishes it
            if h.writers <= 0 and not h.discarded:
                kept = self._close_spool(h)
        if kept:
            # its writer closed it: kept, as journaled, and released (pid 0), so `mlregfs
            # recover` may take it now (it never touches an entry a running daemon holds)
            entry = h.spool.entry
            entry.pid, entry.pid_start = 0, None
            try:
                await self.uploader.journal(h)
            except OSError as e:
                log.warning("cannot release %s for 'mlregfs recover': %s", h.spool.entry.id, e)

    def _close_spool(self, h: WriteHandle) -> bool:
        """After the last close: close `h`'s spool and forget it; drop its bytes unless they
        are still to be uploaded. True if its entry is kept for `mlregfs recover`."""
        try:
            size = os.fstat(h.spool.fd).st_size
        except OSError:
            size = h.spool.size
        h.spool.close()
        self._forget_writer(h)
        entry = h.spool.entry
        if h.spool_error is not None:
            # the writer was told (write or close failed): its partial bytes help nobody,
            # and kept they would fill the spool's disk for every later upload
            log.error(
                "not uploading %s: writing its spool failed: %s; its bytes are deleted",
                entry.target,
                h.spool_error,
            )
            h.spool.spool.remove(entry)
            return False
        if entry.state is UploadState.UPLOADED or (not h.spool.dirty and h.error is None):
            # uploaded, or an in-place open that changed nothing: the registry has it
            h.spool.spool.remove(entry)
            return False
        if entry.state is UploadState.WRITING:
            # its writer closed it, but its sha256 was not taken (hashing cut off at unmount,
            # Busy, READY not saved). READY with no sha256 says "closed, not hashed": `recover
            # retry` hashes and uploads it. WRITING stays for files never closed (the daemon
            # killed while they were open).
            entry.move(UploadState.READY)
            entry.sha256, entry.size = None, size
        return True

    def _forget_writer(self, h: WriteHandle) -> None:
        """Drop `h` from the files being written, under its name now (a rename moves it)."""
        key = (h.node.owner, h.node.path)
        if self._writing.get(key) is h:
            del self._writing[key]

    def _is_held(self, h: WriteHandle, path: str | None = None) -> bool:
        """Is `h` (named `path`, default its name) held at close instead of uploaded: a
        temporary name, created exclusively (Semantics 41)?"""
        return self.hold_temp and h.excl and is_temp(h.node.path if path is None else path)

    async def _new_writer(
        self, node: Node, replaces: tuple[RemoteFile, ...], pid: int = 0, ino: int = 0
    ) -> tuple[Opened, WriteHandle]:
        spool = self._writable()
        key = (node.owner, node.path)
        if key in self._writing:
            raise Busy(f"{node.path!r} is already being written through this mount")
        owner = await self.owner(node.owner)
        # the preflight (as Workhorse does it) turns a missing permission into EACCES at
        # open(), before gigabytes are written
        await self.registry.authorize_upload(owner, node.path)
        sf = await trio.to_thread.run_sync(spool.new, self.source_id, node.owner, node.path)
        h = WriteHandle(node, sf, replaces)
        h.served = sha(replaces[0]) if replaces else None
        h.pid, h.ino, h.writers = self._process(pid), ino, 1
        if self._nursery is not None:
            h.writer = SpoolWriter(sf, self._nursery)
        self._writing[key] = h
        fh = self.handles.add(h)
        return Opened(fh, keep_cache=False, direct_io=True), h

    def _process(self, pid: int) -> int:
        """The opener's process for `_last_close` (0: unknown)."""
        if pid <= 0 or self.holders is None:
            return 0
        return self.holders.process(pid)

    async def _open_for_write(self, node: Node, flags: int, pid: int, ino: int) -> Opened:
        self._writable()
        w = self._writing.get((node.owner, node.path))
        if w is not None:
            if w.writers or w.discarded:
                raise Busy(f"{node.path!r} is already being written through this mount")
            return await self._reopen(w, flags, pid, ino)
        f = await self._remote_file(node)
        opened, h = await self._new_writer(node, (f,), pid, ino)
        if not flags & os.O_TRUNC:  # an in-place edit or an append (README Semantics 43)
            h.copying = True
            try:
                await self._copy_in(h, node, f)
                h.copying = False
            except BaseException:
                self.handles.pop(opened.fh)
                self._forget_writer(h)
                with trio.CancelScope(shield=True):
                    await self._drop_spool(h)
                raise
        return opened

    async def _reopen(self, w: WriteHandle, flags: int, pid: int, ino: int) -> Opened:
        """Open for writing a file that is closed but not uploaded (held): same spool."""
        if w.putting or w.upload_lock.locked():
            raise Busy(f"{w.node.path!r} is being uploaded")
        w.writers += 1  # counted at once: a release still finishing sees it and leaves it
        fh = self.handles.add(w)
        try:
            if flags & os.O_TRUNC:
                await self._drain(w)
                await self._before_change(w)
                w.spool.truncate(0)
        except BaseException:
            self.handles.pop(fh)
            w.writers -= 1
            raise
        w.held = w.spool.entry.held = False
        w.pid, w.ino, w.wrote = self._process(pid), ino or w.ino, bool(flags & os.O_TRUNC)
        return Opened(fh, keep_cache=False, direct_io=True)

    async def _copy_in(self, h: WriteHandle, node: Node, f: RemoteFile) -> None:
        """Copy `f`'s bytes (a file of `node`'s owner) into `h`'s spool through the verified
        cache: a read of the whole file, so a mismatch with its sha256 fails with EIO."""
        cached = await self._open_cached(node, f)
        stream = ReadStream()
        try:
            off = 0
            while off < f.size:
                chunk = await self.data.read(cached, off, min(_COPY_STEP, f.size - off), stream)
                if not len(chunk):
                    raise E.ProtocolError(f"{f.path}: ends at {off} of {f.size} bytes")
                data = bytes(chunk)
                await trio.to_thread.run_sync(h.spool.write, off, data)
                off += len(data)
        finally:
            self.data.close(cached)
        h.spool.dirty, h.wrote = False, False

    async def create(
        self, parent_ino: int, name: str, flags: int, pid: int = 0
    ) -> tuple[Opened, Attr]:
        """O_CREAT of a new file inside a version or candidate directory."""
        self._writable()
        parent = self.node(parent_ino)
        if parent.kind not in (Kind.VERSION, Kind.CANDIDATE, Kind.DIR):
            raise NotPermitted("files can only be created inside a version or candidate directory")
        check_file_name(name)
        path = f"{parent.path}/{name}" if parent.path else name
        node = Node(Kind.FILE, owner=parent.owner, path=path)
        if name in await self.children(parent):
            if flags & os.O_EXCL:
                raise Exists(f"{path!r} exists")
            opened = await self._open_for_write(node, flags | os.O_TRUNC, pid, self.ino(node))
            return opened, await self.attr_of(node)
        opened, h = await self._new_writer(node, (), pid)
        h.excl = bool(flags & os.O_EXCL)
        attr = await self.attr_of(node)
        h.ino = attr.ino
        return opened, attr

    async def write(self, fh: int, off: int, data: bytes) -> int:
        h = self.handles.get(fh)
        if not isinstance(h, WriteHandle) or not (
            h.discarded or self._writing.get((h.node.owner, h.node.path)) is h
        ):
            raise NotPermitted("handle not open for writing")
        await self._before_change(h)
        h.wrote = True
        try:
            if h.writer is not None:  # queued: disk write and hash overlap the next request
                # a wait for queue space may end after a close took the sha256: checked again
                # right before the bytes are queued
                return await h.writer.write(off, data, lambda: self._still_writing(h))
            # disk write and hashing run on the second core; the FUSE loop keeps serving
            h.active += 1
            if h.active == 1:
                h.quiet = trio.Event()
            h.spool.gen += 1  # an upload computing the sha256 now sees the change
            try:
                return await trio.to_thread.run_sync(h.spool.write, off, data)
            finally:
                h.active -= 1
                if h.active == 0:
                    h.quiet.set()
        except OSError as e:
            h.spool_error = e
            raise

    def _still_writing(self, h: WriteHandle) -> None:
        """Busy unless new bytes may go into the spool now (WRITING, no PUT in flight)."""
        if h.putting or h.spool.entry.state is not UploadState.WRITING:
            raise Busy(f"{h.node.path!r} is being uploaded (a close or fsync is running)")

    async def _before_change(self, h: WriteHandle) -> None:
        """Before bytes of `h`'s spool change (write, truncate): raise an earlier spool
        failure; the first change after an upload journals the entry as WRITING again, so a
        crash before the next close never leaves "uploaded" over bytes that were not."""
        if h.spool_error is not None:
            raise h.spool_error
        entry = h.spool.entry
        if entry.state is UploadState.WRITING:
            return
        if h.putting or not entry.can(UploadState.WRITING):
            raise Busy(f"{h.node.path!r} is being uploaded (a close or fsync is running)")
        try:
            await self.uploader.journal(h, UploadState.WRITING)
        except OSError as e:
            h.spool_error = e
            raise

    def _writer(self, fh: int) -> WriteHandle | None:
        """The file `fh` writes (not a reader's handle, not one removed while open)."""
        h = self.handles.get(fh)
        if isinstance(h, WriteHandle) and self._writing.get((h.node.owner, h.node.path)) is h:
            return h
        return None

    async def flush(self, fh: int) -> None:
        """close(2) of a descriptor: upload if this close ends the writing (`_last_close`) and
        anything changed since the last upload; report its failure (README Semantics 42)."""
        h = self._writer(fh)
        if h is None:
            return
        await self._drain(h)
        if h.spool_error is not None:  # never upload a file some bytes of which are missing
            raise h.spool_error
        if not h.spool.dirty:
            if h.error is not None:
                raise h.error
            return
        if self._is_held(h):
            return  # uploaded when it is renamed (Semantics 41)
        if await self._last_close(h):
            await self.uploader.upload(h)

    async def fsync(self, fh: int) -> None:
        """fsync(2): upload now; a file with a temporary name is only synced to the spool."""
        h = self._writer(fh)
        if h is None:
            return
        await self._drain(h)
        if h.spool_error is not None:
            raise h.spool_error
        if self._is_held(h):
            await trio.to_thread.run_sync(os.fsync, h.spool.fd)
        elif h.spool.dirty:
            await self.uploader.upload(h)
        elif h.error is not None:
            raise h.error

    async def _last_close(self, h: WriteHandle) -> bool:
        """Does the close being flushed end the writing of `h`? FUSE flushes at every close of
        every descriptor, duplicates and children's copies included: it does if neither the
        process that opened the file nor its children still hold it. When that cannot be
        known, if bytes were written since the open or the last upload (a shell's `> f` and
        `dd of=` close a duplicate before writing)."""
        if self.holders is not None and h.pid > 0 and h.ino > 0:
            name = h.node.path.rpartition("/")[2]
            held = await trio.to_thread.run_sync(self.holders.still_open, h.pid, h.ino, name)
            if held is not None:
                return not held
        return h.wrote

    async def _hold(self, h: WriteHandle) -> None:
        """Last close of a file with a temporary name: keep it, hashed and journaled READY
        (held), until it is renamed (uploaded then) or removed (Semantics 41)."""
        entry = h.spool.entry
        try:
            await self._drain(h)
            size, digest, _ = await self.uploader.finish(h)
            if (
                h.writers > 0
                or h.discarded
                or h.upload_lock.locked()  # a rename is committing it
                or self._writing.get((h.node.owner, h.node.path)) is not h
            ):
                return  # opened again, removed or renamed meanwhile
            entry.size, entry.sha256, entry.held = size, digest, True
            h.held = True
            if entry.state is not UploadState.READY:
                await self.uploader.journal(h, UploadState.READY)
            else:
                await self.uploader.journal(h)
        except (MlregfsError, OSError) as e:
            h.held = h.writers <= 0 and not h.discarded
            log.warning("holding %s: %s", entry.target, e)
        log.info(
            "holding %s: a temporary name (%s); it is uploaded when renamed",
            entry.target,
            temp_tool(h.node.path.rpartition("/")[2]),
        )

    async def _drop_spool(self, h: WriteHandle) -> None:
        """Forget a file nobody writes any more whose bytes are not to be uploaded."""
        with contextlib.suppress(MlregfsError, OSError):
            await h.settle()
        h.spool.close()
        await trio.to_thread.run_sync(self._writable().remove, h.spool.entry)

    def release_held(self) -> list[str]:
        """At unmount: give up the held files (left in the spool for `mlregfs recover`, which
        does not upload them unless asked). Their targets, for the log."""
        out = []
        for h in list(self._writing.values()):
            if not h.held or self.spool is None:
                continue
            entry = h.spool.entry
            entry.pid, entry.pid_start = 0, None
            try:
                self.spool.save(entry)
            except OSError as e:
                log.warning("cannot release %s for 'mlregfs recover': %s", entry.id, e)
            h.spool.close()
            out.append(entry.target)
        return out

    async def truncate(self, ino: int, size: int) -> None:
        node = self.node(ino)
        w = self._writing.get((node.owner, node.path))
        if w is None:
            raise NotPermitted("only a file being written can be truncated (open it with O_TRUNC)")
        await self._drain(w)
        await self._before_change(w)
        w.spool.truncate(size)
        w.wrote = True

    async def _drain(self, h: WriteHandle) -> None:
        """Wait for the queued writes of the file `h` writes or reads; raise their failure."""
        # the writer's own queue even once it is no longer named (removed while open)
        w = h if h.writer is not None else self._writing.get((h.node.owner, h.node.path))
        if w is not None and w.spool is h.spool:
            await w.drain()
