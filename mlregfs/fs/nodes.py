"""What an inode points at (`Node`), what getattr answers (`Attr`), and the inode table."""

from __future__ import annotations

import enum
import stat
from collections.abc import Callable
from dataclasses import dataclass
from itertools import count

from mlregfs.errors import NotFound
from mlregfs.registry.types import OwnerKey

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
    ALIAS = "alias"  # a semver alias link in a model directory (`latest`, `1`, `1.2`)


@dataclass(frozen=True)
class Node:
    """Where an inode points. `owner` is ("v", model, version) or ("c", iid)."""

    kind: Kind
    name: str = ""  # MODEL_DIR, ALIAS: the model-name prefix
    owner: OwnerKey = ()  # `registry.types.owner_key`: ("v", model, version) or ("c", iid)
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


class InodeTable:
    """Inode numbers for nodes, with the kernel's lookup counts (pyfuse3's passthroughfs):
    an inode the kernel forgot, no listing names and no handle uses is dropped. Numbers are
    never given out again, even after a forget."""

    def __init__(self, in_use: Callable[[Node], bool], dropped: Callable[[int], None]) -> None:
        self._in_use = in_use  # a handle uses the node: dropped once it does not
        self._dropped = dropped  # told of each inode dropped (or moved to another node)
        self._ino_of: dict[Node, int] = {Node(Kind.ROOT): ROOT_INO}
        self._node_of: dict[int, Node] = {ROOT_INO: Node(Kind.ROOT)}
        self._next_ino = count(ROOT_INO + 1)
        self._lookups: dict[int, int] = {}  # the kernel's lookup count of each inode
        self._holds: dict[int, int] = {}  # directory listings being read that name an inode
        self._deferred: set[int] = set()  # forgotten while in use: dropped once unused

    def __len__(self) -> int:
        return len(self._node_of)

    def ino(self, node: Node) -> int:
        ino = self._ino_of.get(node)
        if ino is None:
            ino = next(self._next_ino)
            self._ino_of[node] = ino
            self._node_of[ino] = node
        return ino

    def known(self, node: Node) -> int | None:
        """`node`'s number if it has one (none is taken)."""
        return self._ino_of.get(node)

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
        self.drop_unused(ino)

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
                self.drop_unused(ino)

    def released(self, node: Node) -> None:
        """A handle of `node` was closed: drop its inode if the kernel forgot it meanwhile."""
        ino = self._ino_of.get(node)
        if ino in self._deferred:
            self.drop_unused(ino)

    def drop_unused(self, ino: int) -> None:
        """Forget `ino` unless it is the root, the kernel knows it, a listing names it or a
        handle uses its node. Its number is never given out again."""
        node = self._node_of.get(ino)
        if node is None or ino == ROOT_INO or self._lookups.get(ino, 0) > 0:
            return
        if ino in self._holds or self._in_use(node):
            self._deferred.add(ino)
            return
        self._deferred.discard(ino)
        del self._node_of[ino]
        self._dropped(ino)  # an inode the kernel forgot has no pages left
        if self._ino_of.get(node) == ino:
            del self._ino_of[node]

    def move(self, src: Node, dst: Node) -> None:
        """The kernel keeps a renamed file's inode: its number now names `dst`."""
        ino = self._ino_of.pop(src, None)
        if ino is None:
            return
        self._ino_of[dst] = ino
        self._node_of[ino] = dst
        self._dropped(ino)

    def restore(self, src: Node, dst: Node, inos: tuple[int | None, int | None]) -> None:
        """Undo `move(src, dst)`: `inos` are the numbers `src` and `dst` had before it."""
        src_ino, dst_ino = inos
        if src_ino is not None and self._ino_of.get(dst) == src_ino:
            self._ino_of[src] = src_ino
            self._node_of[src_ino] = src
            del self._ino_of[dst]
        if dst_ino is not None:
            self._ino_of[dst] = dst_ino
