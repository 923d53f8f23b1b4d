"""The filesystem core: lookup, getattr, readdir, open, read, release, statfs.

Returns plain dataclasses and raises mlregfs.errors types; the FUSE adapter turns those into
pyfuse3 replies and errno. Everything here can be driven without a kernel.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from itertools import count

from mlregfs.cache.meta import MetadataCache
from mlregfs.cache.reader import CachedFile, DataCache, FileSpec, ReadStream
from mlregfs.errors import IsADirectory, NotADirectory, NotFound, ReadOnly
from mlregfs.fs.tree import FileDir, build_file_tree, model_dir_entries
from mlregfs.registry.base import Registry
from mlregfs.registry.types import Candidate, FileOwner, Model, RemoteFile

log = logging.getLogger("mlregfs.fs")

ROOT_INO = 1


class Kind(enum.Enum):
    ROOT = "root"
    MODELS = "models"
    MODEL_DIR = "model_dir"  # a model, a namespace of model names, or both
    VERSION = "version"
    CANDIDATES = "candidates"
    CANDIDATE = "candidate"
    DIR = "dir"  # a directory inside a version or candidate
    FILE = "file"


@dataclass(frozen=True)
class Node:
    """Where an inode points. `owner` is ("v", model, version) or ("c", iid)."""

    kind: Kind
    name: str = ""  # MODEL_DIR: the model-name prefix
    owner: tuple[str, ...] = ()
    path: str = ""  # DIR/FILE: path inside the owner

    @property
    def is_dir(self) -> bool:
        return self.kind is not Kind.FILE


def parent_node(node: Node) -> Node:
    """The directory that holds `node` (the root is its own parent)."""
    k = node.kind
    if k in (Kind.ROOT, Kind.MODELS, Kind.CANDIDATES):
        return Node(Kind.ROOT)
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

    @property
    def mode(self) -> int:
        return (stat.S_IFDIR | 0o555) if self.is_dir else (stat.S_IFREG | 0o444)


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


@dataclass(frozen=True)
class Opened:
    fh: int
    keep_cache: bool  # immutable bytes (sha256 known): the kernel may keep its page cache


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
    ) -> None:
        self.registry = registry
        self.data = data
        self.source_id = source_id  # distinguishes cache keys of files without sha256
        self.t = timeouts or Timeouts()
        self.meta = meta or MetadataCache()
        self.mounted_at = time.time()
        self._ino_of: dict[Node, int] = {Node(Kind.ROOT): ROOT_INO}
        self._node_of: dict[int, Node] = {ROOT_INO: Node(Kind.ROOT)}
        self._next_ino = count(ROOT_INO + 1)
        self._handles: dict[int, FileHandle] = {}
        self._next_fh = count(1)

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

    # -- registry views (cached) --------------------------------------------------------
    async def models(self) -> dict[str, Model]:
        async def fetch() -> dict[str, Model]:
            return {m.name: m for m in await self.registry.list_models()}

        return await self.meta.get("models", fetch, self.t.listing)

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
            return out
        if k is Kind.CANDIDATES:
            return {
                str(i): Node(Kind.CANDIDATE, owner=("c", str(i))) for i in await self.candidates()
            }
        if k in (Kind.VERSION, Kind.CANDIDATE, Kind.DIR):
            tree = await self.file_tree(node.owner)
            d = tree.get(node.path)
            if d is None:
                raise NotFound(f"directory {node.path!r} no longer exists")
            base = f"{node.path}/" if node.path else ""
            out = {n: Node(Kind.DIR, owner=node.owner, path=base + n) for n in d.dirs}
            out.update({n: Node(Kind.FILE, owner=node.owner, path=base + n) for n in d.files})
            return out
        raise NotADirectory(f"{node} is not a directory")

    async def _remote_file(self, node: Node) -> RemoteFile:
        tree = await self.file_tree(node.owner)
        parent, _, name = node.path.rpartition("/")
        d = tree.get(parent)
        f = d.files.get(name) if d else None
        if f is None:
            raise NotFound(f"file {node.path!r} no longer exists")
        return f

    async def attr_of(self, node: Node) -> Attr:
        ino = self.ino(node)
        k = node.kind
        if k is Kind.FILE:
            f = await self._remote_file(node)
            ttl = self.t.files if node.owner[0] == "v" else self.t.listing
            return Attr(ino, False, f.size, f.created_at, ttl)
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
            if d is None:
                raise NotFound(f"directory {node.path!r} no longer exists")
            mtime = d.mtime
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
        if child is None:
            raise NotFound(f"{name!r} not found")
        return await self.attr_of(child)

    async def getattr(self, ino: int) -> Attr:
        return await self.attr_of(self.node(ino))

    async def readdir(self, ino: int) -> list[tuple[str, Attr]]:
        """All entries with attributes, sorted by name (stable offsets for the adapter)."""
        node = self.node(ino)
        kids = await self.children(node)
        return [(name, await self.attr_of(kids[name])) for name in sorted(kids)]

    async def open(self, ino: int, flags: int) -> Opened:
        node = self.node(ino)
        if node.is_dir:
            raise IsADirectory("open of a directory for reading data")
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC):
            raise ReadOnly("this mount is read-only")
        f = await self._remote_file(node)
        owner = await self.owner(node.owner)
        spec = FileSpec(self.cache_key(f), f.size, f.sha256)
        registry = self.registry

        async def fetch(start: int, end: int) -> bytes:
            return await registry.read_range(owner, f, start, end)

        cached = self.data.open(spec, fetch)
        fh = next(self._next_fh)
        self._handles[fh] = FileHandle(node, f, cached)
        return Opened(fh, keep_cache=f.sha256 is not None)

    def cache_key(self, f: RemoteFile) -> str:
        """Content address when the sha256 is known, else the registry's file identity."""
        if f.sha256:
            return f.sha256.lower()
        ident = f"{self.source_id}|{f.package_id}|{f.file_id}|{f.size}"
        return "f" + hashlib.blake2b(ident.encode(), digest_size=20).hexdigest()

    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray | memoryview:
        h = self._handles.get(fh)
        if h is None:
            raise NotFound(f"unknown file handle {fh}")
        return await self.data.read(h.cached, off, size, h.stream)

    def release(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if h is not None:
            self.data.close(h.cached)

    def open_handles(self) -> int:
        return len(self._handles)
