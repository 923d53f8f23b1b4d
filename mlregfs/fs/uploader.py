"""Uploads of spooled files: the journaled state machine from close to the registry.

WRITING -> READY (hashed, journaled) -> UPLOADING (journaled before the PUT) -> UPLOADED, or
FAILED; a PUT whose answer was lost stays UPLOADING, and the registry is asked before the
same bytes are sent again. At unmount, `drain` waits, then abandons what is left (kept for
`mlregfs recover`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator

import trio

from mlregfs import errors as E
from mlregfs.cache.meta import MetadataCache
from mlregfs.errors import AuthError, Busy, MlregfsError, ReadOnly
from mlregfs.fs.handles import WriteHandle
from mlregfs.registry.base import Registry
from mlregfs.registry.types import FileOwner, OwnerKey, RemoteFile
from mlregfs.spool import Spool, UploadInterrupted, UploadState

log = logging.getLogger("mlregfs.fs")


class Uploader:
    """Uploads write handles' spools, one at a time per file, and drains them at unmount."""

    def __init__(
        self,
        registry: Registry,
        origin: Registry,
        spool: Spool | None,
        meta: MetadataCache,
        owner: Callable[[OwnerKey], Awaitable[FileOwner]],
    ) -> None:
        self.registry = registry
        # the registry itself, under any caching wrapper (the catalog): asked where an answer
        # from before an outage would be wrong (`_stored`)
        self.origin = origin
        self.spool = spool
        self._meta = meta
        self._owner = owner  # resolves an owner key to the registry's object
        self._uploading = 0
        self._idle = trio.Event()
        self._idle.set()
        self._upload_scopes: set[trio.CancelScope] = set()  # PUTs in flight, for shutdown
        self.closing = False  # drain_timeout passed: no upload starts any more
        self.stats = {"uploaded": 0, "failed": 0, "bytes": 0, "unchanged": 0}

    def writable(self) -> Spool:
        """The spool; ReadOnly on a read-only mount (the one check of it)."""
        if self.spool is None:
            raise ReadOnly("this mount is read-only")
        return self.spool

    async def upload(self, h: WriteHandle) -> None:
        """Upload the spooled file once: a second flush meanwhile waits for this one."""
        async with h.upload_lock:
            await self.upload_held(h)

    async def upload_held(self, h: WriteHandle) -> None:
        """`_upload` for a caller that holds `h.upload_lock` (a rename)."""
        if not h.spool.dirty:  # uploaded by a concurrent flush/fsync meanwhile
            if h.error is not None:
                raise h.error
            return
        if self.closing and h.spool.entry.state is not UploadState.WRITING:
            # its journal already says what happened (UPLOADING stays ambiguous)
            h.error = UploadInterrupted(
                f"{h.spool.entry.target}: the mount is shutting down; the bytes are kept"
                " for 'mlregfs recover'"
            )
            raise h.error
        await self._upload_locked(h)

    async def journal(self, h: WriteHandle, to: UploadState | None = None) -> None:
        """Move the entry to `to` (if given) and journal it. The snapshot is taken here, on
        the trio thread, so saves land in the order of the changes (Spool.write drops an
        older one). If the save fails the entry is back in its old state (unless a write
        changed it meanwhile) and the OSError is raised."""
        spool = self.writable()
        entry = h.spool.entry
        before = entry.state
        if to is not None:
            entry.move(to)
        snap = spool.snapshot(entry)
        try:
            await trio.to_thread.run_sync(spool.write, snap)
        except BaseException:
            if to is not None and entry.state is to:
                entry.state = before
            raise

    async def finish(self, h: WriteHandle) -> tuple[int, str, int]:
        """Size, sha256 and write generation of bytes no write changed while they were
        hashed. Re-hashing a spool written out of order is abandoned at shutdown."""
        sf = h.spool
        for _ in range(3):
            await h.settle()
            gen = sf.gen
            done = sf.hashed()
            if done is None:
                with self.shutdown_scope() as scope:
                    done = await trio.to_thread.run_sync(sf.finish, abandon_on_cancel=True)
                if scope.cancelled_caught or done is None:
                    sf.abandoned = True  # the abandoned thread stops at its next chunk
                    raise UploadInterrupted(
                        f"{sf.entry.target}: the mount shut down while its sha256 was computed;"
                        " not uploaded"
                    )
            if sf.gen == gen and not h.active:
                return done[0], done[1], gen
        raise Busy(f"{h.node.path!r} kept being written while it was closed")

    async def _upload_locked(self, h: WriteHandle) -> None:
        sf = h.spool
        entry = sf.entry
        self._uploading += 1
        self._idle = trio.Event() if self._uploading == 1 else self._idle
        started = time.monotonic()
        unchanged = False
        try:
            try:
                size, digest, gen = await self.finish(h)
                entry.size, entry.sha256, entry.error = size, digest, None
                ready = entry.state is UploadState.READY  # held: closed and hashed already
                await self.journal(h, None if ready else UploadState.READY)
                if digest == h.served and h.unsure is None:
                    # the registry serves these very bytes under this name (Semantics 44)
                    unchanged = True
                    if entry.state is not UploadState.READY:  # written while we journaled
                        raise Busy(f"{h.node.path!r} was written again while being closed")
                elif h.unsure == digest and await self._stored(h, digest):
                    # the PUT whose answer we missed was stored: not sent again
                    log.info("%s: the earlier upload was stored after all", entry.target)
                    h.unsure = None  # newer bytes are sent, and replace it (drop_older)
                    if entry.state is not UploadState.READY:  # written while we asked
                        raise Busy(f"{h.node.path!r} was written again while being closed")
                    entry.move(UploadState.UPLOADING)
                else:
                    await self._put(h, size)
            except Exception as e:
                if h.spool_error is not None:
                    raise  # the spool lost bytes: reported as such, never uploaded
                self._upload_failed(h, e)
                assert h.error is not None
                if entry.state in (UploadState.FAILED, UploadState.UPLOADING):
                    try:
                        await self.journal(h)
                    except OSError as je:
                        log.error("cannot journal the failure of %s: %s", entry.target, je)
                if h.error is e:
                    raise
                raise h.error from e
            if unchanged:
                await self._unchanged(h, gen)
                return
            drop = h.drop_older or bool(h.replaces)
            h.error, h.unsure, h.drop_older = None, None, True
            h.served, h.wrote = digest, False
            h.uploads += 1
            self.stats["uploaded"] += 1
            self.stats["bytes"] += size
            entry.move(UploadState.UPLOADED)
            if sf.gen == gen:
                sf.dirty = False
            else:  # written during the PUT (a bug: writes are EBUSY from READY on, queued ones
                # checked again before they are queued); never "uploaded" over them
                entry.move(UploadState.WRITING)
            try:
                await self.journal(h)
            except OSError as e:
                # the journal still says uploading: recover finds the copy and sends nothing
                log.warning("uploaded %s but cannot journal it: %s", entry.target, e)
            elapsed = time.monotonic() - started
            log.info(
                "uploaded %s (%d bytes, sha256 %s) in %.2f s", entry.target, size, digest, elapsed
            )
            self._meta.invalidate(("files", h.node.owner))
            if drop:  # at unmount older copies may stay (GitLab serves ours)
                with self.shutdown_scope():
                    await self._drop_replaced(h, digest)
        finally:
            self._uploading -= 1
            if self._uploading == 0:
                self._idle.set()

    async def _unchanged(self, h: WriteHandle, gen: int) -> None:
        """READY -> UPLOADED with nothing sent: the registry already serves these bytes."""
        entry = h.spool.entry
        h.error, h.wrote = None, False
        self.stats["unchanged"] += 1
        entry.move(UploadState.UPLOADED)
        if h.spool.gen == gen:
            h.spool.dirty = False
        else:
            entry.move(UploadState.WRITING)
        try:
            await self.journal(h)
        except OSError as e:
            log.warning("cannot journal %s: %s", entry.target, e)
        log.info("%s unchanged (sha256 %s): nothing uploaded", entry.target, entry.sha256)

    def _upload_failed(self, h: WriteHandle, e: Exception) -> None:
        """Record a failed upload: the error the caller sees (with an errno), the state."""
        # refused: certainly not stored. No answer: perhaps stored.
        refused = (E.AuthError, E.BadRequest, E.TooLarge, E.NotFound, E.Conflict, E.RateLimited)
        maybe_stored = (E.RegistryTimeout, E.ServerError, E.ProtocolError)
        entry = h.spool.entry
        h.spool.dirty = True
        h.error = e if isinstance(e, MlregfsError | OSError) else MlregfsError(f"{e!r}")
        self.stats["failed"] += 1
        if isinstance(e, UploadInterrupted):
            # a PUT cut off stays UPLOADING (ambiguous); one never sent is READY or WRITING
            log.error(
                "upload of %s abandoned at unmount (state %s); the bytes are kept (journal"
                " %s): run 'mlregfs recover' to retry",
                entry.target,
                entry.state.value,
                entry.id,
            )
            return
        sent = entry.state is UploadState.UPLOADING
        if sent and not isinstance(e, refused):
            h.unsure, h.drop_older = entry.sha256, True  # asked before it is sent again
        if sent and isinstance(e, maybe_stored):
            # no answer: the registry may have stored it. The journal says so, and recover
            # (like our next upload) asks the registry before it sends the bytes again
            entry.error = str(h.error)
        elif entry.can(UploadState.FAILED):  # else written again meanwhile: WRITING
            entry.move(UploadState.FAILED)
            entry.error = str(h.error)
        log.error(
            "upload of %s failed: %s; the bytes are kept (journal %s): run"
            " 'mlregfs recover' to retry",
            entry.target,
            h.error,
            entry.id,
        )

    async def _stored(self, h: WriteHandle, digest: str) -> bool:
        """The registry holds these bytes at this path (our PUT whose answer was lost).
        Asked of the registry itself, never of the catalog: its listing from before an
        outage would say "not stored" and the bytes would be sent twice. An outage raises
        (the close fails, the bytes are kept, asked again at the next close or by recover)."""
        with self.shutdown_scope() as scope:
            owner = await self._owner(h.node.owner)
            for f in await self.origin.list_files(owner):
                if f.path == h.node.path and f.sha256 is not None and f.sha256.lower() == digest:
                    return True
        if scope.cancelled_caught:  # no answer: unknown, so nothing is sent
            raise UploadInterrupted(
                f"{h.spool.entry.target}: the mount shut down while asking the registry whether"
                " an earlier upload was stored; the bytes are kept for 'mlregfs recover'"
            )
        return False

    async def _drop_replaced(self, h: WriteHandle, digest: str) -> None:
        """After an overwrite (or a second upload through this handle), delete the older
        copies of the path: those the registry lists behind ours (needs Maintainer; else
        kept). If ours is not the newest (someone wrote after us), only the copy this
        handle replaced at open."""
        replaced, h.replaces = h.replaces, ()
        ids = [i for f in replaced for i in (f.file_id, *f.older_ids)]
        template = replaced[0] if replaced else None
        try:
            owner = await self._owner(h.node.owner)
            for f in await self.registry.list_files(owner):
                if f.path == h.node.path and f.sha256 is not None and f.sha256.lower() == digest:
                    ids = [i for i in f.older_ids if i != f.file_id]
                    template = f
        except MlregfsError as e:
            log.warning("could not list the older copies of %s: %s", h.spool.entry.target, e)
        if template is None:
            return
        for fid in ids:
            t = template
            try:
                await self.registry.delete_file(
                    RemoteFile(t.path, t.size, t.sha256, t.created_at, fid, t.package_id)
                )
            except AuthError:
                log.info(
                    "kept older copies of %s: deleting package files needs the Maintainer"
                    " role (GitLab serves the newest copy)",
                    h.spool.entry.target,
                )
                return
            except MlregfsError as e:
                log.warning("could not delete an older copy of %s: %s", h.spool.entry.target, e)

    async def _put(self, h: WriteHandle, size: int) -> None:
        """READY -> UPLOADING (journaled before the PUT) -> the PUT; UploadInterrupted if the
        unmount abandons it (the journal then says READY if nothing was sent)."""
        entry = h.spool.entry
        interrupted = UploadInterrupted(
            f"upload of {entry.target} interrupted: the mount is shutting down; the bytes are"
            " kept for 'mlregfs recover'"
        )
        if self.closing:
            raise interrupted
        with self.shutdown_scope() as scope:
            owner = await self._owner(h.node.owner)
            if entry.state is not UploadState.READY:
                raise Busy(f"{h.node.path!r} was written again while being closed")
            await trio.lowlevel.checkpoint_if_cancelled()
            h.putting = True  # from here a write is EBUSY
            try:
                await self.journal(h, UploadState.UPLOADING)
                await self.registry.upload(owner, h.node.path, h.spool.path, size)
            finally:
                h.putting = False
        if scope.cancelled_caught:
            raise interrupted

    @contextlib.contextmanager
    def shutdown_scope(self) -> Iterator[trio.CancelScope]:
        """A cancel scope that `drain` cancels when drain_timeout has passed."""
        with trio.CancelScope() as scope:
            if self.closing:
                scope.cancel()
            self._upload_scopes.add(scope)
            try:
                yield scope
            finally:
                self._upload_scopes.discard(scope)

    @property
    def in_flight(self) -> int:
        return self._uploading

    async def drain(self, seconds: float, grace: float = 3.0) -> bool:
        """Unmount: wait up to `seconds` for uploads in flight; True if none was left.

        Then no upload starts any more, and those still running are abandoned: their journal
        stays UPLOADING (ambiguous: `mlregfs recover` asks the registry before sending again)
        and their close() gets EIO, which this waits for up to `grace` more seconds."""
        with trio.move_on_after(seconds):
            await self._idle.wait()
        idle = self._uploading == 0
        self.closing = True  # a close after this is bounded too: kept, not uploaded
        for scope in list(self._upload_scopes):
            scope.cancel()
        if not idle:
            with trio.move_on_after(grace):
                await self._idle.wait()
        return idle
