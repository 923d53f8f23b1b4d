"""The filesystem core: namespace, reads, and writes that upload on close.

Returns plain dataclasses and raises mlregfs.errors types; the FUSE adapter turns those into
pyfuse3 replies and errno. Everything here can be driven without a kernel.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import hashlib
import logging
import os
import re
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from itertools import count

import semver
import trio

from mlregfs import errors as E
from mlregfs.buffers import Buffer
from mlregfs.cache.meta import MetadataCache
from mlregfs.cache.reader import CachedFile, DataCache, FileSpec, ReadStream
from mlregfs.errors import (
    AuthError,
    Busy,
    Denied,
    Exists,
    InvalidPath,
    IsADirectory,
    MlregfsError,
    NameTooLong,
    NoAttribute,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotPermitted,
    ReadOnly,
    Unsupported,
)
from mlregfs.fs import xattrs
from mlregfs.fs.holders import Holders
from mlregfs.fs.tempnames import is_temp, temp_tool
from mlregfs.fs.tree import NAME_MAX, FileDir, build_file_tree, model_dir_entries, usable_name
from mlregfs.fs.writer import SpoolWriter
from mlregfs.registry import validate
from mlregfs.registry.base import Registry
from mlregfs.registry.types import Candidate, FileOwner, Model, ModelVersion, RemoteFile, Run
from mlregfs.writeback import Spool, SpoolFile, UploadInterrupted, UploadState

log = logging.getLogger("mlregfs.fs")

ROOT_INO = 1
RECHECK_AFTER = 2.0  # a listing older than this is fetched again when a lookup misses in it
# the kernel re-asks for an alias link this often, so a lookup sees a new release within
# seconds (README Semantics 47); the link's target itself is never cached by the kernel
ALIAS_TTL = 1.0
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2  # renameat2 flags
_COPY_STEP = 1 << 20  # in-place edits copy the current bytes into the spool in these steps


class Kind(enum.Enum):
    ROOT = "root"
    MODELS = "models"
    MODEL_DIR = "model_dir"  # a model, a namespace of model names, or both
    VERSION = "version"
    CANDIDATES = "candidates"
    CANDIDATE = "candidate"
    DIR = "dir"  # a directory inside a version or candidate
    FILE = "file"
    ALIAS = "alias"  # a semver alias link in a model directory (`latest`, `1`, `1.2`)


@dataclass(frozen=True)
class Node:
    """Where an inode points. `owner` is ("v", model, version) or ("c", iid)."""

    kind: Kind
    name: str = ""  # MODEL_DIR, ALIAS: the model-name prefix
    owner: tuple[str, ...] = ()
    path: str = ""  # DIR/FILE: path inside the owner; ALIAS: the link's name

    @property
    def is_dir(self) -> bool:
        return self.kind not in (Kind.FILE, Kind.ALIAS)


def parent_node(node: Node) -> Node:
    """The directory that holds `node` (the root is its own parent)."""
    k = node.kind
    if k in (Kind.ROOT, Kind.MODELS, Kind.CANDIDATES):
        return Node(Kind.ROOT)
    if k is Kind.ALIAS:
        return Node(Kind.MODEL_DIR, name=node.name) if node.name else Node(Kind.MODELS)
    if k is Kind.MODEL_DIR:
        up = node.name.rpartition("/")[0]
        return Node(Kind.MODEL_DIR, name=up) if up else Node(Kind.MODELS)
    if k is Kind.VERSION:
        return Node(Kind.MODEL_DIR, name=node.owner[1])
    if k is Kind.CANDIDATE:
        return Node(Kind.CANDIDATES)
    up = node.path.rpartition("/")[0]
    if up:
        return Node(Kind.DIR, owner=node.owner, path=up)
    if node.owner[0] == "c":
        return Node(Kind.CANDIDATE, owner=node.owner)
    return Node(Kind.VERSION, owner=node.owner)


@dataclass(frozen=True)
class Attr:
    """What getattr/lookup answer."""

    ino: int
    is_dir: bool
    size: int
    mtime: float
    ttl: float  # how long the kernel may keep this entry and these attributes
    link: str | None = None  # a symbolic link's target

    def mode(self, writable: bool, umask: int = 0o022) -> int:
        """Permission bits: r-x/r-- on a read-only mount, rwx/rw- less `umask` otherwise."""
        if self.link is not None:
            return stat.S_IFLNK | 0o777  # as on every Linux filesystem: links have no modes
        if self.is_dir:
            return stat.S_IFDIR | ((0o777 & ~umask) if writable else 0o555)
        return stat.S_IFREG | ((0o666 & ~umask) if writable else 0o444)


@dataclass
class Timeouts:
    listing: float = 30.0
    files: float = 300.0


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


@dataclass(frozen=True)
class Opened:
    fh: int
    keep_cache: bool  # immutable bytes (sha256 known): the kernel may keep its page cache
    # writes bypass the page cache: 1 MiB requests straight to the spool, ~2x the rate of
    # the writeback cache on our VMs (its page-cache fill is fresh memory per write)
    direct_io: bool = False


# GitLab's ml_model_file_name_regex for the last path segment (reference §8.4)
FILE_NAME_RE = re.compile(r"\A[A-Za-z0-9._+\- ]+\Z")
# GitLab's package_name_regex (model names), reference §2
MODEL_NAME_RE = re.compile(
    r"\A@?(?>(?:[\w\-.+]*/)*(?:[\w\-.]+))@?(?>(?:[\w\-.+]*/)*(?:[\w\-.]*))\Z"
)
# only a valid sha256 (64 hex digits, the registry's rule) names a cache entry
_IS_SHA256 = validate.check(validate.sha256)
# a directory name that is meant as a version: starts with a digit, or v + digit
VERSION_LIKE_RE = re.compile(r"\A[vV]?\d")


def check_file_name(name: str) -> None:
    """Refuse, before any byte is written, a name GitLab's file-name regex would reject."""
    if len(name.encode()) > NAME_MAX:
        raise NameTooLong(f"file name longer than {NAME_MAX} bytes")
    if name in (".", "..") or not FILE_NAME_RE.match(name):
        raise InvalidPath(
            f"file name {name!r} refused: GitLab accepts only letters, digits, '.', '_', '-',"
            " '+' and space"
        )


def check_semver(name: str) -> None:
    """Versions are strict semver (no leading 'v', three numbers), as GitLab requires."""
    try:
        semver.Version.parse(name)
    except ValueError:
        raise InvalidPath(
            f"version {name!r} refused: not strict semver MAJOR.MINOR.PATCH[-pre][+build]"
        ) from None


class Filesystem:
    """POSIX view of one project's model registry (read path)."""

    def __init__(
        self,
        registry: Registry,
        data: DataCache,
        *,
        source_id: str,
        timeouts: Timeouts | None = None,
        meta: MetadataCache | None = None,
        spool: Spool | None = None,
        hold_temp: bool = True,
        holders: Holders | None = None,
        origin: Registry | None = None,
    ) -> None:
        self.registry = registry
        # the registry itself, under any caching wrapper (the catalog): asked where an answer
        # from before an outage would be wrong (`_stored`)
        self.origin = origin or registry
        self.hold_temp = hold_temp  # temporary names are held at close (README Semantics 41)
        self.holders = holders  # who still holds a file open (None: no /proc to ask)
        self.spool = spool  # None: a read-only mount
        self.data = data
        self.source_id = source_id  # distinguishes cache keys of files without sha256
        self.t = timeouts or Timeouts()
        self.meta = meta or MetadataCache()
        self.mounted_at = time.time()
        self._ino_of: dict[Node, int] = {Node(Kind.ROOT): ROOT_INO}
        self._node_of: dict[int, Node] = {ROOT_INO: Node(Kind.ROOT)}
        self._next_ino = count(ROOT_INO + 1)  # never reused, even after forget
        self._lookups: dict[int, int] = {}  # the kernel's lookup count of each inode
        self._holds: dict[int, int] = {}  # directory listings being read that name an inode
        self._deferred: set[int] = set()  # forgotten while in use: dropped once unused
        self._handles: dict[int, FileHandle | WriteHandle] = {}
        self._next_fh = count(1)
        # per inode, the file state its last read open served through (`_keep_pages`)
        self._page_source: dict[int, CachedFile | None] = {}
        # files being written, by (owner, path): shown in listings with their spooled size
        self._writing: dict[tuple[tuple[str, ...], str], WriteHandle] = {}
        # directories made inside a version for this mount's lifetime (GitLab has none)
        self._local_dirs: set[tuple[tuple[str, ...], str]] = set()
        # models fetched alone for an alias lookup, newer than the listing: name -> (model or
        # None if gone, when); and when each was last fetched so (rate limit)
        self._fresh_models: dict[str, tuple[Model | None, float]] = {}
        self._model_checked: dict[str, float] = {}
        self._fresh_count = 0  # bumped by each refresh: invalidates `_merged`
        self._merged: tuple[dict[str, Model], int, dict[str, Model]] | None = None
        self._uploading = 0
        self._idle = trio.Event()
        self._idle.set()
        self._upload_scopes: set[trio.CancelScope] = set()  # PUTs in flight, for shutdown
        self._closing = False  # drain_timeout passed: no upload starts any more
        self._nursery: trio.Nursery | None = None
        self.upload_stats = {"uploaded": 0, "failed": 0, "bytes": 0, "unchanged": 0}

    # -- inodes -------------------------------------------------------------------------
    def ino(self, node: Node) -> int:
        ino = self._ino_of.get(node)
        if ino is None:
            ino = next(self._next_ino)
            self._ino_of[node] = ino
            self._node_of[ino] = node
        return ino

    def node(self, ino: int) -> Node:
        try:
            return self._node_of[ino]
        except KeyError:
            raise NotFound(f"unknown inode {ino}") from None

    def remember(self, ino: int, n: int = 1) -> None:
        """The kernel got `ino` in an entry (lookup, create, mkdir, readdirplus): +n."""
        if ino in self._node_of:
            self._lookups[ino] = self._lookups.get(ino, 0) + n
            self._deferred.discard(ino)

    def forget(self, ino: int, n: int) -> None:
        """The kernel dropped `n` references to `ino`: at none, and unused, forget the inode."""
        left = self._lookups.get(ino, 0) - n
        if left > 0:
            self._lookups[ino] = left
            return
        self._lookups.pop(ino, None)
        self._drop_unused(ino)

    def hold(self, inos: list[int]) -> None:
        """Keep inodes while a directory listing that names them is being read."""
        for ino in inos:
            self._holds[ino] = self._holds.get(ino, 0) + 1

    def unhold(self, inos: list[int]) -> None:
        for ino in inos:
            n = self._holds.get(ino, 0) - 1
            if n > 0:
                self._holds[ino] = n
            else:
                self._holds.pop(ino, None)
                self._drop_unused(ino)

    def _drop_unused(self, ino: int) -> None:
        """Forget `ino` unless it is the root, the kernel knows it, a listing names it or a
        handle uses its node. Its number is never given out again."""
        node = self._node_of.get(ino)
        if node is None or ino == ROOT_INO or self._lookups.get(ino, 0) > 0:
            return
        if ino in self._holds or any(h.node == node for h in self._handles.values()):
            self._deferred.add(ino)
            return
        self._deferred.discard(ino)
        del self._node_of[ino]
        self._page_source.pop(ino, None)  # an inode the kernel forgot has no pages left
        if self._ino_of.get(node) == ino:
            del self._ino_of[node]

    def inodes_of(self, key: str) -> set[int]:
        """Inodes open for reading with cache key `key` (whose kernel pages may hold it)."""
        return {
            self._ino_of[h.node]
            for h in self._handles.values()
            if isinstance(h, FileHandle) and h.cached.spec.key == key and h.node in self._ino_of
        }

    def start(self, nursery: trio.Nursery) -> None:
        """Enable queued writes (background tasks in `nursery`)."""
        self._nursery = nursery

    # -- registry views (cached) --------------------------------------------------------
    async def models(self) -> dict[str, Model]:
        async def fetch() -> dict[str, Model]:
            return {m.name: m for m in await self.registry.list_models()}

        listing = await self.meta.get("models", fetch, self.t.listing)
        if not self._fresh_models:
            return listing
        memo = self._merged
        if memo is not None and memo[0] is listing and memo[1] == self._fresh_count:
            return memo[2]  # every lookup asks: merge once per listing and refresh
        # models fetched one by one (`_refresh_model`) since the listing: theirs is newer
        listed_at = self.meta.fetched_at("models")
        merged = dict(listing)
        for name, (model, at) in list(self._fresh_models.items()):
            if at <= listed_at:
                del self._fresh_models[name]
            elif model is None:
                merged.pop(name, None)
            else:
                merged[name] = model
        self._merged = (listing, self._fresh_count, merged)
        return merged

    async def _refresh_model(self, name: str) -> None:
        """A lookup of an alias link of `name`: fetch that one model again (one request, not
        the whole listing) if what we know of it is older than RECHECK_AFTER. Rate-limited per
        model, skipped while the registry was just unreachable (README Semantics 47)."""
        now = self.meta.now()
        known = max(self.meta.fetched_at("models"), self._model_checked.get(name, float("-inf")))
        if now - known < RECHECK_AFTER or self.meta.registry_down():
            return
        self._model_checked[name] = now
        found: list[Model | None] = []  # stays empty without an answer
        # bounded: a path walk through `latest` must not wait out the client's retries
        # while GitLab is down; the link keeps its last known target meanwhile
        with trio.move_on_after(RECHECK_AFTER):
            try:
                found.append(await self.registry.get_model(name))
            except NotFound:
                found.append(None)  # deleted: its links go
            except (E.RegistryUnavailable, E.ServerError) as e:
                log.info("refreshing model %r for its alias links: %s", name, e)
        if not found:
            self._model_checked[name] = now + self.meta.outage_grace  # back off
            return
        self._fresh_models[name] = (found[0], now)
        self._fresh_count += 1

    async def candidates(self) -> dict[int, Candidate]:
        async def fetch() -> dict[int, Candidate]:
            return {c.iid: c for c in await self.registry.list_candidates()}

        return await self.meta.get("candidates", fetch, self.t.listing)

    async def owner(self, owner: tuple[str, ...]) -> FileOwner:
        if owner[0] == "c":
            cand = (await self.candidates()).get(int(owner[1]))
            if cand is None:
                raise NotFound(f"candidate {owner[1]} not found")
            return cand
        model = (await self.models()).get(owner[1])
        for v in model.versions if model else ():
            if v.version == owner[2]:
                return v
        raise NotFound(f"model version {owner[1]}/{owner[2]} not found")

    async def file_tree(self, owner: tuple[str, ...]) -> dict[str, FileDir]:
        obj = await self.owner(owner)

        async def fetch() -> dict[str, FileDir]:
            return build_file_tree(await self.registry.list_files(obj))

        # version files are immutable in practice; candidates still receive artifacts
        ttl = self.t.files if owner[0] == "v" else self.t.listing
        return await self.meta.get(("files", owner), fetch, ttl)

    # -- directory contents -------------------------------------------------------------
    async def children(self, node: Node) -> dict[str, Node]:
        """Name -> child node of a directory node."""
        k = node.kind
        if k is Kind.ROOT:
            return {"models": Node(Kind.MODELS), "candidates": Node(Kind.CANDIDATES)}
        if k in (Kind.MODELS, Kind.MODEL_DIR):
            prefix = node.name
            entries = model_dir_entries(await self.models(), prefix)
            if entries is None:
                raise NotFound(f"model path {prefix!r} not found")
            out = {v: Node(Kind.VERSION, owner=("v", prefix, v)) for v in entries.versions}
            for seg in entries.subdirs:
                out[seg] = Node(Kind.MODEL_DIR, name=f"{prefix}/{seg}" if prefix else seg)
            for alias in entries.aliases:
                out[alias] = Node(Kind.ALIAS, name=prefix, path=alias)
            return out
        if k is Kind.CANDIDATES:
            return {
                str(i): Node(Kind.CANDIDATE, owner=("c", str(i))) for i in await self.candidates()
            }
        if k in (Kind.VERSION, Kind.CANDIDATE, Kind.DIR):
            d = (await self.file_tree(node.owner)).get(node.path)
            local_dirs, local_files = self._local_entries(node.owner, node.path)
            if node.kind is Kind.DIR:
                self._check_dir(node, d)
            base = f"{node.path}/" if node.path else ""
            dirs = set(d.dirs if d else ()) | local_dirs
            files = (set(d.files) if d else set()) | local_files
            out = {n: Node(Kind.DIR, owner=node.owner, path=base + n) for n in dirs}
            out.update({n: Node(Kind.FILE, owner=node.owner, path=base + n) for n in files - dirs})
            return out
        raise NotADirectory(f"{node} is not a directory")

    def _check_dir(self, node: Node, remote: FileDir | None) -> None:
        """A directory inside a version exists through remote files, local ones, or mkdir."""
        if remote is None and (node.owner, node.path) not in self._local_dirs:
            dirs, files = self._local_entries(node.owner, node.path)
            if not dirs and not files:
                raise NotFound(f"directory {node.path!r} no longer exists")

    def _local_entries(self, owner: tuple[str, ...], path: str) -> tuple[set[str], set[str]]:
        """Names under `path` that exist only in this mount: made dirs, files being written."""
        prefix = f"{path}/" if path else ""
        dirs: set[str] = set()
        files: set[str] = set()
        for o, p in [*self._local_dirs, *((o, p) for (o, p) in self._writing)]:
            if o != owner or not p.startswith(prefix) or p == path:
                continue
            head, sep, _ = p[len(prefix) :].partition("/")
            if sep or (o, p) in self._local_dirs:
                dirs.add(head)
            else:
                files.add(head)
        return dirs, files

    async def _remote_file(self, node: Node) -> RemoteFile:
        tree = await self.file_tree(node.owner)
        parent, _, name = node.path.rpartition("/")
        d = tree.get(parent)
        f = d.files.get(name) if d else None
        if f is None:
            raise NotFound(f"file {node.path!r} no longer exists")
        return f

    async def attr_of(self, node: Node) -> Attr:
        """`node`'s attributes. Its inode number is taken after the last await, so the caller
        counts the entry (`remember`, `hold`) in the same step: a FORGET that arrives during
        the awaits cannot leave it holding a number the daemon has dropped, and a failure
        takes no number."""
        a = await self._attr(node)
        return Attr(self.ino(node), a.is_dir, a.size, a.mtime, a.ttl, a.link)

    async def _attr(self, node: Node) -> Attr:
        """`node`'s attributes with inode number 0 (`attr_of` fills it in)."""
        ino = 0
        k = node.kind
        if k is Kind.FILE:
            w = self._writing.get((node.owner, node.path))
            if w is not None and not w.copying:  # being written: its spooled size, uncached
                return Attr(ino, False, w.spool.size, w.spool.entry.updated, 0.0)
            f = await self._remote_file(node)
            ttl = self.t.files if node.owner[0] == "v" else self.t.listing
            return Attr(ino, False, f.size, f.created_at, ttl)
        if k is Kind.ALIAS:
            target = await self.readlink_node(node)
            m = (await self.models()).get(node.name)
            return Attr(
                ino, False, len(target.encode()), m.created_at if m else 0.0, ALIAS_TTL, target
            )
        mtime = self.mounted_at
        if k is Kind.MODEL_DIR:
            m = (await self.models()).get(node.name)
            if m is not None:
                mtime = m.created_at
        elif k in (Kind.VERSION, Kind.CANDIDATE):
            owner = await self.owner(node.owner)
            mtime = owner.created_at
        elif k is Kind.DIR:
            d = (await self.file_tree(node.owner)).get(node.path)
            if d is not None:
                mtime = d.mtime
            elif (
                not any(self._local_entries(node.owner, node.path))
                and (
                    node.owner,
                    node.path,
                )
                not in self._local_dirs
            ):
                raise NotFound(f"directory {node.path!r} no longer exists")
        return Attr(ino, True, 4096, mtime, self.t.listing)

    # -- operations ---------------------------------------------------------------------
    async def lookup(self, parent_ino: int, name: str) -> Attr:
        parent = self.node(parent_ino)
        if not parent.is_dir:
            raise NotADirectory("lookup in a file")
        if name == ".":
            return await self.attr_of(parent)
        if name == "..":
            return await self.attr_of(parent_node(parent))
        child = (await self.children(parent)).get(name)
        if child is not None and child.kind is Kind.ALIAS:
            # a release since may have moved the link (README Semantics 47)
            await self._refresh_model(parent.name)
            child = (await self.children(parent)).get(name)
        elif child is None and self._recheck(parent):
            # published elsewhere since the listing was fetched (README Semantics 46)
            child = (await self.children(parent)).get(name)
        if child is None:
            raise NotFound(f"{name!r} not found")
        return await self.attr_of(child)

    def _recheck(self, parent: Node) -> bool:
        """A lookup in `parent` missed: let its listing be fetched again if it is older than
        RECHECK_AFTER (rate-limited per listing). True if it will be."""
        k = parent.kind
        if k in (Kind.MODELS, Kind.MODEL_DIR):
            return self.meta.recheck("models", RECHECK_AFTER)
        if k is Kind.CANDIDATES:
            return self.meta.recheck("candidates", RECHECK_AFTER)
        if k in (Kind.VERSION, Kind.CANDIDATE, Kind.DIR):
            return self.meta.recheck(("files", parent.owner), RECHECK_AFTER)
        return False

    async def getattr(self, ino: int) -> Attr:
        return await self.attr_of(self.node(ino))

    async def readdir(self, ino: int) -> list[tuple[str, Attr]]:
        """All entries with attributes, sorted by name (stable offsets for the adapter)."""
        node = self.node(ino)
        kids = await self.children(node)
        attrs = [(name, await self._attr(kids[name])) for name in sorted(kids)]
        # numbers after the last await, for the adapter's `hold` in the same step (attr_of)
        return [
            (name, Attr(self.ino(kids[name]), a.is_dir, a.size, a.mtime, a.ttl, a.link))
            for name, a in attrs
        ]

    async def readlink(self, ino: int) -> str:
        return await self.readlink_node(self.node(ino))

    async def readlink_node(self, node: Node) -> str:
        """An alias link's target: the version's name, relative to the model directory."""
        if node.kind is not Kind.ALIAS:
            raise Unsupported("not a symbolic link")
        entries = model_dir_entries(await self.models(), node.name)
        target = entries.aliases.get(node.path) if entries else None
        if target is None:
            raise NotFound(f"alias {node.path!r} no longer resolves")
        return target

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
            fh = next(self._next_fh)
            self._handles[fh] = WriteHandle(node, w.spool)
            self._keep_pages(ino, None)  # pages of the spool: the next open drops them
            return Opened(fh, keep_cache=False)
        f = await self._remote_file(node)
        cached = await self._open_cached(node, f)
        fh = next(self._next_fh)
        self._handles[fh] = FileHandle(node, f, cached)
        return Opened(fh, keep_cache=f.sha256 is not None and self._keep_pages(ino, cached))

    async def _open_cached(self, node: Node, f: RemoteFile) -> CachedFile:
        """`f` (a file of `node`'s owner) opened through the verified block cache."""
        owner = await self.owner(node.owner)
        spec = FileSpec(self.cache_key(f), f.size, f.sha256.lower() if f.sha256 else None)
        registry = self.registry

        async def fetch(start: int, end: int, into: memoryview | None = None) -> Buffer:
            return await registry.read_range(owner, f, start, end, into=into)

        return self.data.open(spec, fetch, into=True, name=f.path)

    def _keep_pages(self, ino: int, cached: CachedFile | None) -> bool:
        """May the kernel keep `ino`'s cached pages at this open through `cached` (None: not
        through the block cache)? Only bytes checked against the sha256 may stay: the file
        must be verified, and so must the state the inode's previous open read through. Its
        pages were dropped at that open unless the same held then, so every page the kernel
        can hold came through a verified state (whose bytes served before the check were
        compared with the checked ones). A verified file with the same bytes under another
        path shares the cache key, not this inode's pages: those may be from an unchecked
        download, so the first open of the inode after the verification drops them."""
        prev = self._page_source.get(ino)
        self._page_source[ino] = cached
        return (
            cached is not None
            and prev is not None
            and self.data.may_keep_pages(cached)
            and self.data.may_keep_pages(prev)
        )

    def cache_key(self, f: RemoteFile) -> str:
        """Content address when the sha256 is known, else the registry's file identity."""
        digest = _sha(f)
        if digest is not None:
            return digest
        ident = f"{self.source_id}|{f.package_id}|{f.file_id}|{f.size}"
        return "f" + hashlib.blake2b(ident.encode(), digest_size=20).hexdigest()

    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray | memoryview:
        h = self._handles.get(fh)
        if h is None:
            raise NotFound(f"unknown file handle {fh}")
        if isinstance(h, WriteHandle):
            await self._drain(h)  # a reader sees every byte written so far
            return h.spool.read(off, size)
        return await self.data.read(h.cached, off, size, h.stream)

    async def release(self, fh: int) -> None:
        """Last close of a handle: upload what was not uploaded yet, then forget the handle."""
        h = self._handles.pop(fh, None)
        if h is None:
            return
        ino = self._ino_of.get(h.node)
        if ino in self._deferred:  # the kernel forgot it while the handle was open
            self._drop_unused(ino)
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
                await self._upload(h)  # errors here reach no caller: logged, spool kept
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
                await self._journal(h)
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

    # -- writes -------------------------------------------------------------------------
    def _writable(self) -> Spool:
        if self.spool is None:
            raise ReadOnly("this mount is read-only")
        return self.spool

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
        h.served = _sha(replaces[0]) if replaces else None
        h.pid, h.ino, h.writers = self._process(pid), ino, 1
        if self._nursery is not None:
            h.writer = SpoolWriter(sf, self._nursery)
        self._writing[key] = h
        fh = next(self._next_fh)
        self._handles[fh] = h
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
                self._handles.pop(opened.fh, None)
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
        fh = next(self._next_fh)
        self._handles[fh] = w
        try:
            if flags & os.O_TRUNC:
                await self._drain(w)
                await self._before_change(w)
                w.spool.truncate(0)
        except BaseException:
            self._handles.pop(fh, None)
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
        h = self._handles.get(fh)
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
            await self._journal(h, UploadState.WRITING)
        except OSError as e:
            h.spool_error = e
            raise

    def _writer(self, fh: int) -> WriteHandle | None:
        """The file `fh` writes (not a reader's handle, not one removed while open)."""
        h = self._handles.get(fh)
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
            await self._upload(h)

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
            await self._upload(h)
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
            size, digest, _ = await self._finish(h)
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
                await self._journal(h, UploadState.READY)
            else:
                await self._journal(h)
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
            await self._settle(h)
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
        if w is not None and w.spool is h.spool and w.writer is not None:
            try:
                await w.writer.drain()
            except Exception as e:  # whatever it was, some bytes are not in the spool
                w.spool_error = e if isinstance(e, OSError) else OSError(errno.EIO, str(e))
                raise w.spool_error from None

    async def _upload(self, h: WriteHandle) -> None:
        """Upload the spooled file once: a second flush meanwhile waits for this one."""
        async with h.upload_lock:
            await self._upload_now(h)

    async def _upload_now(self, h: WriteHandle) -> None:
        """`_upload` for a caller that holds `h.upload_lock` (a rename)."""
        if not h.spool.dirty:  # uploaded by a concurrent flush/fsync meanwhile
            if h.error is not None:
                raise h.error
            return
        if self._closing and h.spool.entry.state is not UploadState.WRITING:
            # its journal already says what happened (UPLOADING stays ambiguous)
            h.error = UploadInterrupted(
                f"{h.spool.entry.target}: the mount is shutting down; the bytes are kept"
                " for 'mlregfs recover'"
            )
            raise h.error
        await self._upload_locked(h)

    async def _journal(self, h: WriteHandle, to: UploadState | None = None) -> None:
        """Move the entry to `to` (if given) and journal it. The snapshot is taken here, on
        the trio thread, so saves land in the order of the changes (Spool.write drops an
        older one). If the save fails the entry is back in its old state (unless a write
        changed it meanwhile) and the OSError is raised."""
        spool = self._writable()
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

    async def _settle(self, h: WriteHandle) -> None:
        """Wait until every write that has started is on disk."""
        await self._drain(h)
        while h.active:
            await h.quiet.wait()

    async def _finish(self, h: WriteHandle) -> tuple[int, str, int]:
        """Size, sha256 and write generation of bytes no write changed while they were
        hashed. Re-hashing a spool written out of order is abandoned at shutdown."""
        sf = h.spool
        for _ in range(3):
            await self._settle(h)
            gen = sf.gen
            done = sf.hashed()
            if done is None:
                with self._shutdown_scope() as scope:
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
                size, digest, gen = await self._finish(h)
                entry.size, entry.sha256, entry.error = size, digest, None
                ready = entry.state is UploadState.READY  # held: closed and hashed already
                await self._journal(h, None if ready else UploadState.READY)
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
                        await self._journal(h)
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
            self.upload_stats["uploaded"] += 1
            self.upload_stats["bytes"] += size
            entry.move(UploadState.UPLOADED)
            if sf.gen == gen:
                sf.dirty = False
            else:  # written during the PUT (a bug: writes are EBUSY from READY on, queued ones
                # checked again before they are queued); never "uploaded" over them
                entry.move(UploadState.WRITING)
            try:
                await self._journal(h)
            except OSError as e:
                # the journal still says uploading: recover finds the copy and sends nothing
                log.warning("uploaded %s but cannot journal it: %s", entry.target, e)
            elapsed = time.monotonic() - started
            log.info(
                "uploaded %s (%d bytes, sha256 %s) in %.2f s", entry.target, size, digest, elapsed
            )
            self.meta.invalidate(("files", h.node.owner))
            if drop:  # at unmount older copies may stay (GitLab serves ours)
                with self._shutdown_scope():
                    await self._drop_replaced(h, digest)
        finally:
            self._uploading -= 1
            if self._uploading == 0:
                self._idle.set()

    async def _unchanged(self, h: WriteHandle, gen: int) -> None:
        """READY -> UPLOADED with nothing sent: the registry already serves these bytes."""
        entry = h.spool.entry
        h.error, h.wrote = None, False
        self.upload_stats["unchanged"] += 1
        entry.move(UploadState.UPLOADED)
        if h.spool.gen == gen:
            h.spool.dirty = False
        else:
            entry.move(UploadState.WRITING)
        try:
            await self._journal(h)
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
        self.upload_stats["failed"] += 1
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
        with self._shutdown_scope() as scope:
            owner = await self.owner(h.node.owner)
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
            owner = await self.owner(h.node.owner)
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
        if self._closing:
            raise interrupted
        with self._shutdown_scope() as scope:
            owner = await self.owner(h.node.owner)
            if entry.state is not UploadState.READY:
                raise Busy(f"{h.node.path!r} was written again while being closed")
            await trio.lowlevel.checkpoint_if_cancelled()
            h.putting = True  # from here a write is EBUSY
            try:
                await self._journal(h, UploadState.UPLOADING)
                await self.registry.upload(owner, h.node.path, h.spool.path, size)
            finally:
                h.putting = False
        if scope.cancelled_caught:
            raise interrupted

    @contextlib.contextmanager
    def _shutdown_scope(self) -> Iterator[trio.CancelScope]:
        """A cancel scope that `drain` cancels when drain_timeout has passed."""
        with trio.CancelScope() as scope:
            if self._closing:
                scope.cancel()
            self._upload_scopes.add(scope)
            try:
                yield scope
            finally:
                self._upload_scopes.discard(scope)

    @property
    def uploads_in_flight(self) -> int:
        return self._uploading

    async def drain(self, seconds: float, grace: float = 3.0) -> bool:
        """Unmount: wait up to `seconds` for uploads in flight; True if none was left.

        Then no upload starts any more, and those still running are abandoned: their journal
        stays UPLOADING (ambiguous: `mlregfs recover` asks the registry before sending again)
        and their close() gets EIO, which this waits for up to `grace` more seconds."""
        with trio.move_on_after(seconds):
            await self._idle.wait()
        idle = self._uploading == 0
        self._closing = True  # a close after this is bounded too: kept, not uploaded
        for scope in list(self._upload_scopes):
            scope.cancel()
        if not idle:
            with trio.move_on_after(grace):
                await self._idle.wait()
        return idle

    async def pin(self, ino: int, on: bool) -> None:
        """Keep a file's cached blocks from eviction (`mlregfs warm --pin`)."""
        node = self.node(ino)
        if node.kind is not Kind.FILE:
            raise IsADirectory("only files can be pinned")
        f = await self._remote_file(node)
        await trio.to_thread.run_sync(self.data.store.pin, self.cache_key(f), on)

    # -- registry metadata (extended attributes) ---------------------------------------
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

        return await self.meta.get(("run", run_id), fetch, self.t.listing)

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
            entries = model_dir_entries(models, node.name)
            if entries is None:
                raise NotFound(f"model path {node.name!r} not found")
            return xattrs.model_attrs(models.get(node.name), entries.aliases), None
        if k is Kind.ALIAS:
            return {}, None  # the kernel keeps user.* off links; nothing to say anyway
        await self._attr(node)  # a directory inside a version must still exist
        kind = {Kind.DIR: "directory", Kind.ROOT: "root"}.get(k, k.value)
        return {"user.mlregfs.kind": kind}, None

    # -- namespace ----------------------------------------------------------------------
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
            if len(full) > 255 or not MODEL_NAME_RE.match(full):
                raise InvalidPath(f"model name {full!r} refused by GitLab's package name rules")
            await self.registry.create_model(full)
            self.meta.invalidate("models")
            return await self.lookup(parent_ino, name)
        if k is Kind.CANDIDATES:
            raise NotPermitted("candidates are created by runs (MLflow), not by mkdir")
        raise NotPermitted("directories cannot be created here")

    async def rmdir(self, parent_ino: int, name: str) -> None:
        self._writable()
        parent = self.node(parent_ino)
        child = (await self.children(parent)).get(name)
        if child is None:
            raise NotFound(f"{name!r} not found")
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
        self._writable()
        parent = self.node(parent_ino)
        child = (await self.children(parent)).get(name)
        if child is None:
            raise NotFound(f"{name!r} not found")
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

    async def _remote_or_none(self, node: Node) -> RemoteFile | None:
        try:
            return await self._remote_file(node)
        except NotFound:
            return None

    async def _delete_copies(self, f: RemoteFile) -> None:
        """Delete every copy of `f`'s name (the newest and the older duplicates)."""
        for fid in (f.file_id, *f.older_ids):
            await self.registry.delete_file(
                RemoteFile(f.path, f.size, f.sha256, f.created_at, fid, f.package_id)
            )

    # -- rename -------------------------------------------------------------------------
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
        w.served = _sha(dst_remote)
        # journaled with its new name: a crash from here on leaves it for `recover` to upload
        # there (a committing rename was asked for), or held if the new name is temporary too
        entry.held = w.held and not commit
        try:
            await self._journal(w)
            if commit:
                await self._drain(w)
                if w.spool_error is not None:
                    raise w.spool_error
                if src_remote is not None:
                    w.spool.dirty = True  # stored under the old name only: store it anew
                    if entry.state is UploadState.UPLOADED:
                        entry.move(UploadState.WRITING)  # journaled by the upload
                if w.spool.dirty:
                    await self._upload_now(w)
        except BaseException:
            self._unmove(w, src, dst, moved, w_dst)
            w.replaces, w.served = before[0], before[1]
            w.spool.dirty = w.spool.dirty or before[2]
            # closed under a temporary name again: held (recover must not upload that name)
            w.held = entry.held = w.writers <= 0 and not w.discarded and self._is_held(w)
            with contextlib.suppress(OSError), trio.CancelScope(shield=True):
                await self._journal(w)
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
                    await self._journal(w)
        if src_remote is not None:
            await self._delete_copies(src_remote)

    def _move(self, w: WriteHandle, src: Node, dst: Node) -> tuple[int | None, int | None]:
        """Give `w` (named `src`) the name `dst`: its entry, its handles, the files being
        written, its inode. Returns the inodes `src` and `dst` had (for `_unmove`)."""
        self._retarget(w, dst)
        if self._writing.get((src.owner, src.path)) is w:
            del self._writing[(src.owner, src.path)]
        self._writing[(dst.owner, dst.path)] = w
        inos = self._ino_of.get(src), self._ino_of.get(dst)
        self._move_inode(src, dst)
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
        src_ino, dst_ino = inos
        if src_ino is not None and self._ino_of.get(dst) == src_ino:
            self._ino_of[src] = src_ino
            self._node_of[src_ino] = src
            del self._ino_of[dst]
        if dst_ino is not None:
            self._ino_of[dst] = dst_ino

    def _retarget(self, w: WriteHandle, node: Node) -> None:
        """Point `w`, the readers of its spool and its journal entry at `node` (the
        namespace is changed separately)."""
        w.node = node
        for h in self._handles.values():
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
        same = _sha(f) is not None and _sha(f) == _sha(dst_remote)
        if not same:
            spool = self._writable()
            owner = await self.owner(dst.owner)
            await self.registry.authorize_upload(owner, dst.path)
            sf = await trio.to_thread.run_sync(spool.new, self.source_id, dst.owner, dst.path)
            h = WriteHandle(dst, sf, (dst_remote,) if dst_remote is not None else ())
            h.served = _sha(dst_remote)
            try:
                await self._copy_in(h, src, f)
                h.spool.dirty = True
                await self._upload(h)
            finally:
                with trio.CancelScope(shield=True):
                    await self._drop_spool(h)  # stored, or the original is still there
        if w_dst is not None:
            del self._writing[(dst.owner, dst.path)]
            w_dst.discarded = True
            await self._drop_spool(w_dst)
        self._move_inode(src, dst)
        await self._delete_copies(f)

    def _move_inode(self, src: Node, dst: Node) -> None:
        """The kernel keeps the renamed file's inode: its number now names `dst`."""
        ino = self._ino_of.pop(src, None)
        if ino is None:
            return
        self._ino_of[dst] = ino
        self._node_of[ino] = dst
        self._page_source.pop(ino, None)


class _Changed(Exception):
    """The file changed while a rename waited for it: the rename starts over."""


def _sha(f: RemoteFile | None) -> str | None:
    """`f`'s sha256 when it is a valid one (lower case), else None."""
    if f is None or not f.sha256 or not _IS_SHA256(f.sha256):
        return None
    return f.sha256.lower()
