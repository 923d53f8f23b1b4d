"""Changing entries: mkdir, rmdir, unlink and rename (README Semantics 40, 45).

GitLab has no rename: a file not uploaded yet takes its upload to the new name; an uploaded
one is copied, then the old name's copies are deleted (Maintainer).
"""

from __future__ import annotations

import contextlib
import logging

import trio

from mlregfs.errors import (
    Busy,
    Denied,
    Exists,
    InvalidPath,
    IsADirectory,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotPermitted,
    Unsupported,
)
from mlregfs.fs.handles import WriteHandle, sha
from mlregfs.fs.nodes import Attr, Kind, Node
from mlregfs.fs.tree import usable_name
from mlregfs.fs.writes import Writes
from mlregfs.names import VERSION_LIKE_RE, check_file_name, check_model_name, check_semver
from mlregfs.registry.types import Candidate, RemoteFile
from mlregfs.spool import UploadState

log = logging.getLogger("mlregfs.fs")

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2  # renameat2 flags


class _Changed(Exception):
    """The file changed while a rename waited for it: the rename starts over."""


class Entries(Writes):
    """Operations that add, remove or rename directory entries."""

    async def mkdir(self, parent_ino: int, name: str) -> Attr:
        self._writable()
        parent = self.node(parent_ino)
        if not usable_name(name):
            raise InvalidPath(f"invalid directory name {name!r}")
        kids = await self.children(parent)
        if name in kids:
            raise Exists(f"{name!r} exists")
        k = parent.kind
        if k in (Kind.VERSION, Kind.CANDIDATE, Kind.DIR):
            path = f"{parent.path}/{name}" if parent.path else name
            self._local_dirs.add((parent.owner, path))
            return await self.attr_of(Node(Kind.DIR, owner=parent.owner, path=path))
        if k is Kind.MODEL_DIR and VERSION_LIKE_RE.match(name):
            check_semver(name)
            if parent.name not in await self.models():
                raise NotFound(f"no model named {parent.name!r}: mkdir the model first")
            await self.registry.create_version(parent.name, name)
            self.meta.invalidate("models")
            return await self.lookup(parent_ino, name)
        if k in (Kind.MODELS, Kind.MODEL_DIR):
            full = f"{parent.name}/{name}" if parent.name else name
            check_model_name(full)
            await self.registry.create_model(full)
            self.meta.invalidate("models")
            return await self.lookup(parent_ino, name)
        if k is Kind.CANDIDATES:
            raise NotPermitted("candidates are created by runs (MLflow), not by mkdir")
        raise NotPermitted("directories cannot be created here")

    async def _child_to_remove(self, parent_ino: int, name: str) -> Node:
        """The entry `name` of a directory, for rmdir or unlink (a writable mount only)."""
        self._writable()
        child = (await self.children(self.node(parent_ino))).get(name)
        if child is None:
            raise NotFound(f"{name!r} not found")
        return child

    async def rmdir(self, parent_ino: int, name: str) -> None:
        child = await self._child_to_remove(parent_ino, name)
        if not child.is_dir:
            raise NotADirectory(f"{name!r} is a file")
        if await self.children(child):
            raise NotEmpty(f"{name!r} is not empty")
        if child.kind is Kind.DIR:
            self._local_dirs.discard((child.owner, child.path))
            return
        if child.kind is Kind.VERSION:
            version = await self.owner(child.owner)
            assert not isinstance(version, Candidate)
            await self.registry.delete_version(version)
            self.meta.invalidate("models")
            return
        if child.kind is Kind.MODEL_DIR and child.name in await self.models():
            await self.registry.delete_model(child.name)
            self.meta.invalidate("models")
            return
        raise NotPermitted(f"{name!r} cannot be removed")

    async def unlink(self, parent_ino: int, name: str) -> None:
        child = await self._child_to_remove(parent_ino, name)
        if child.is_dir:
            raise IsADirectory(f"{name!r} is a directory")
        if child.kind is Kind.ALIAS:
            raise NotPermitted(f"{name!r} is a semver alias link: it follows the releases")
        key = (child.owner, child.path)
        w = self._writing.get(key)
        if w is not None:
            # not uploaded yet (open or held): its bytes are dropped, nothing is uploaded
            if w.putting or w.upload_lock.locked() or w.copying:
                raise Busy(f"{name!r} is being uploaded")
            if (w.replaces or w.uploads) and await self._remote_or_none(child) is not None:
                # the registry's copies go too: refused before anything is dropped
                if not await self.registry.may_delete_files():
                    raise Denied(f"removing {name!r}: deleting package files needs Maintainer")
                if self._writing.get(key) is not w or w.upload_lock.locked():
                    raise Busy(f"{name!r} changed while it was removed")
            del self._writing[key]
            w.discarded = True
            if w.writers <= 0:
                await self._drop_spool(w)
            log.info("%s removed before its upload: not uploaded", w.spool.entry.target)
            if not w.replaces and not w.uploads:
                return  # nothing of it is in the registry
        f = await self._remote_or_none(child)
        if f is not None:
            await self._delete_copies(f)
        self.meta.invalidate(("files", child.owner))

    async def _delete_copies(self, f: RemoteFile) -> None:
        """Delete every copy of `f`'s name (the newest and the older duplicates)."""
        for fid in (f.file_id, *f.older_ids):
            await self.registry.delete_file(
                RemoteFile(f.path, f.size, f.sha256, f.created_at, fid, f.package_id)
            )

    async def rename(
        self, old_parent: int, old_name: str, new_parent: int, new_name: str, flags: int = 0
    ) -> None:
        """Rename a file inside and between versions and candidates (README Semantics 40, 45):
        a file not uploaded yet takes its upload to the new name; an uploaded one is copied
        and deleted (Maintainer). A rename to a name that is not temporary commits: it
        returns once the registry answered."""
        for _ in range(3):
            try:
                return await self._rename(old_parent, old_name, new_parent, new_name, flags)
            except _Changed:
                continue  # an upload, close or rename of the file ended while we waited
        raise Busy(f"{old_name!r} kept changing while it was renamed")

    async def _rename(
        self, old_parent: int, old_name: str, new_parent: int, new_name: str, flags: int
    ) -> None:
        self._writable()
        if flags & RENAME_EXCHANGE:
            raise Unsupported("RENAME_EXCHANGE is not supported: GitLab has no rename")
        sp, dp = self.node(old_parent), self.node(new_parent)
        if not sp.is_dir or not dp.is_dir:
            raise NotADirectory("rename between non-directories")
        src = (await self.children(sp)).get(old_name)
        if src is None:
            raise NotFound(f"{old_name!r} not found")
        if src.is_dir or src.kind is Kind.ALIAS:
            raise NotPermitted("directories and links cannot be renamed: GitLab has no such thing")
        if dp.kind not in (Kind.VERSION, Kind.CANDIDATE, Kind.DIR):
            raise NotPermitted("files can only be inside a version or candidate directory")
        check_file_name(new_name)
        dst = Node(Kind.FILE, owner=dp.owner, path=f"{dp.path}/{new_name}" if dp.path else new_name)
        if dst == src:
            return
        existing = (await self.children(dp)).get(new_name)
        if existing is not None:
            if existing.is_dir:
                raise IsADirectory(f"{new_name!r} is a directory")
            if flags & RENAME_NOREPLACE:
                raise Exists(f"{new_name!r} exists")
        w_dst = self._writing.get((dst.owner, dst.path))
        if w_dst is not None and (w_dst.writers or w_dst.putting or w_dst.upload_lock.locked()):
            raise Busy(f"{new_name!r} is being written through this mount")
        dst_remote = await self._remote_or_none(dst)
        w = self._writing.get((src.owner, src.path))
        if w is not None and w.copying:
            raise Busy(f"{old_name!r} is being opened for an in-place edit")
        if w is not None:
            # one upload at a time per file: a close's upload finishes first, and none starts
            # while the file changes its name
            async with w.upload_lock:
                if (
                    self._writing.get((src.owner, src.path)) is not w
                    or w.copying
                    or self._writing.get((dst.owner, dst.path)) is not w_dst
                    or (w_dst is not None and (w_dst.writers or w_dst.upload_lock.locked()))
                ):
                    raise _Changed
                src_remote = await self._uploaded_source(src, w)
                await self._rename_pending(w, dst, dst_remote, w_dst, src_remote)
        else:
            src_remote = await self._uploaded_source(src, None)
            if src_remote is None:
                raise NotFound(f"{old_name!r} no longer exists")
            await self._rename_uploaded(src, src_remote, dst, dst_remote, w_dst)
        self.meta.invalidate(("files", src.owner))
        self.meta.invalidate(("files", dst.owner))

    async def _uploaded_source(self, src: Node, w: WriteHandle | None) -> RemoteFile | None:
        """The registry's copy of `src` that a rename must delete, if any (permission checked)."""
        src_remote = None
        if w is None or w.replaces or w.uploads:
            # its bytes are (also) in the registry under the old name: GitLab has no rename,
            # so the old copies must be deleted after the new one is stored. Refused up front
            # when the role cannot delete, rather than leaving the file under both names.
            src_remote = await self._remote_or_none(src)
            if src_remote is not None and not await self.registry.may_delete_files():
                raise Denied(
                    f"renaming {src.path!r}: GitLab cannot rename a file, and deleting the old"
                    " name's copies needs the Maintainer role"
                )
        return src_remote

    async def _rename_pending(
        self,
        w: WriteHandle,
        dst: Node,
        dst_remote: RemoteFile | None,
        w_dst: WriteHandle | None,
        src_remote: RemoteFile | None,
    ) -> None:
        """Rename a file whose bytes are in the spool (open, or closed and held). The caller
        holds its upload lock. The new name is taken at once (a create, open or removal of
        it meanwhile is EBUSY: the file is being uploaded) and given back if the upload fails."""
        src = w.node
        commit = src_remote is not None or not self._is_held(w, dst.path)
        if dst.owner != src.owner:
            await self.registry.authorize_upload(await self.owner(dst.owner), dst.path)
        if (
            self._writing.get((src.owner, src.path)) is not w
            or self._writing.get((dst.owner, dst.path)) is not w_dst
        ):
            raise _Changed  # during the preflight
        entry = w.spool.entry
        before = (w.replaces, w.served, w.spool.dirty)
        moved = self._move(w, src, dst)
        w.replaces = (dst_remote,) if dst_remote is not None else ()
        w.served = sha(dst_remote)
        # journaled with its new name: a crash from here on leaves it for `recover` to upload
        # there (a committing rename was asked for), or held if the new name is temporary too
        entry.held = w.held and not commit
        try:
            await self.uploader.journal(w)
            if commit:
                await self._drain(w)
                if w.spool_error is not None:
                    raise w.spool_error
                if src_remote is not None:
                    w.spool.dirty = True  # stored under the old name only: store it anew
                    if entry.state is UploadState.UPLOADED:
                        entry.move(UploadState.WRITING)  # journaled by the upload
                if w.spool.dirty:
                    await self.uploader.upload_held(w)
        except BaseException:
            self._unmove(w, src, dst, moved, w_dst)
            w.replaces, w.served = before[0], before[1]
            w.spool.dirty = w.spool.dirty or before[2]
            # closed under a temporary name again: held (recover must not upload that name)
            w.held = entry.held = w.writers <= 0 and not w.discarded and self._is_held(w)
            with contextlib.suppress(OSError), trio.CancelScope(shield=True):
                await self.uploader.journal(w)
            raise
        # the rename takes effect
        if w_dst is not None and w_dst is not w:
            w_dst.discarded = True
            await self._drop_spool(w_dst)
        if w.writers <= 0 and not w.discarded:
            if not w.spool.dirty and w.spool.entry.state is UploadState.UPLOADED:
                self._forget_writer(w)  # stored: done
                await self._drop_spool(w)
            else:  # closed, not uploaded: held under its new (temporary) name
                w.held = entry.held = True
                with contextlib.suppress(OSError):
                    await self.uploader.journal(w)
        if src_remote is not None:
            await self._delete_copies(src_remote)

    def _move(self, w: WriteHandle, src: Node, dst: Node) -> tuple[int | None, int | None]:
        """Give `w` (named `src`) the name `dst`: its entry, its handles, the files being
        written, its inode. Returns the inodes `src` and `dst` had (for `_unmove`)."""
        self._retarget(w, dst)
        if self._writing.get((src.owner, src.path)) is w:
            del self._writing[(src.owner, src.path)]
        self._writing[(dst.owner, dst.path)] = w
        inos = self.inodes.known(src), self.inodes.known(dst)
        self.inodes.move(src, dst)
        return inos

    def _unmove(
        self,
        w: WriteHandle,
        src: Node,
        dst: Node,
        inos: tuple[int | None, int | None],
        w_dst: WriteHandle | None,
    ) -> None:
        """Undo `_move` after a failed rename."""
        self._retarget(w, src)
        if self._writing.get((dst.owner, dst.path)) is w:
            del self._writing[(dst.owner, dst.path)]
            if w_dst is not None:
                self._writing[(dst.owner, dst.path)] = w_dst
        if not w.discarded:
            self._writing[(src.owner, src.path)] = w
        self.inodes.restore(src, dst, inos)

    def _retarget(self, w: WriteHandle, node: Node) -> None:
        """Point `w`, the readers of its spool and its journal entry at `node` (the
        namespace is changed separately)."""
        w.node = node
        for h in self.handles:
            if isinstance(h, WriteHandle) and h.spool is w.spool:
                h.node = node
        w.spool.entry.owner, w.spool.entry.path = list(node.owner), node.path

    async def _rename_uploaded(
        self,
        src: Node,
        f: RemoteFile,
        dst: Node,
        dst_remote: RemoteFile | None,
        w_dst: WriteHandle | None,
    ) -> None:
        """Copy an uploaded file's verified bytes to the new name, then delete the old name's
        copies (the caller checked the role)."""
        same = sha(f) is not None and sha(f) == sha(dst_remote)
        if not same:
            spool = self._writable()
            owner = await self.owner(dst.owner)
            await self.registry.authorize_upload(owner, dst.path)
            sf = await trio.to_thread.run_sync(spool.new, self.source_id, dst.owner, dst.path)
            h = WriteHandle(dst, sf, (dst_remote,) if dst_remote is not None else ())
            h.served = sha(dst_remote)
            try:
                await self._copy_in(h, src, f)
                h.spool.dirty = True
                await self.uploader.upload(h)
            finally:
                with trio.CancelScope(shield=True):
                    await self._drop_spool(h)  # stored, or the original is still there
        if w_dst is not None:
            del self._writing[(dst.owner, dst.path)]
            w_dst.discarded = True
            await self._drop_spool(w_dst)
        self.inodes.move(src, dst)  # the kernel keeps the inode
        await self._delete_copies(f)
