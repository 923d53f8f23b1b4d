"""The namespace as the registry shows it: listings (cached), directory entries, attributes.

The base of `Filesystem`: its state, and the views the write path and the operations share.
"""

from __future__ import annotations

import hashlib
import logging
import time

import trio

from mlregfs import errors as E
from mlregfs.buffers import Buffer
from mlregfs.cache.meta import MetadataCache
from mlregfs.cache.reader import CachedFile, DataCache, FileSpec
from mlregfs.errors import MlregfsError, NotADirectory, NotFound, Unsupported
from mlregfs.fs.handles import FileHandle, HandleTable, WriteHandle, sha
from mlregfs.fs.holders import Holders
from mlregfs.fs.nodes import Attr, InodeTable, Kind, Node, Timeouts, parent_node
from mlregfs.fs.tree import FileDir, ModelDirEntries, build_file_tree, model_dir_entries
from mlregfs.fs.uploader import Uploader
from mlregfs.registry.base import Registry
from mlregfs.registry.outage import Outage
from mlregfs.registry.types import Candidate, FileOwner, Model, OwnerKey, RemoteFile
from mlregfs.spool import Spool

log = logging.getLogger("mlregfs.fs")

RECHECK_AFTER = 2.0  # a listing older than this is fetched again when a lookup misses in it
# the kernel re-asks for an alias link this often, so a lookup sees a new release within
# seconds (README Semantics 47); the link's target itself is never cached by the kernel
ALIAS_TTL = 1.0
# version file listings fetched ahead when a model directory is listed: at most this many
# at once, and only the first PREFETCH_MAX versions of a model
PREFETCH_LISTINGS = 4
PREFETCH_MAX = 64


class Namespace:
    """What the registry holds, as nodes with attributes, plus this mount's own entries."""

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
        outage: Outage | None = None,
    ) -> None:
        self.registry = registry
        self.hold_temp = hold_temp  # temporary names are held at close (README Semantics 41)
        self.holders = holders  # who still holds a file open (None: no /proc to ask)
        self.spool = spool  # None: a read-only mount
        self.data = data
        self.source_id = source_id  # distinguishes cache keys of files without sha256
        self.timeouts = timeouts or Timeouts()
        self.meta = meta or MetadataCache()
        # whether the registry was just found down (the catalog's): no lookup waits on it
        self.outage = outage or Outage()
        self.mounted_at = time.time()
        self.handles = HandleTable()
        self.inodes = InodeTable(self.handles.uses, self._pages_gone)
        self.uploader = Uploader(registry, origin or registry, spool, self.meta, self.owner)
        # per inode, the file state its last read open served through (`_keep_pages`)
        self._page_source: dict[int, CachedFile | None] = {}
        # files being written, by (owner, path): shown in listings with their spooled size
        self._writing: dict[tuple[OwnerKey, str], WriteHandle] = {}
        # directories made inside a version for this mount's lifetime (GitLab has none)
        self._local_dirs: set[tuple[OwnerKey, str]] = set()
        # models fetched alone for an alias lookup, newer than the listing: name -> (model or
        # None if gone, when); and when each was last fetched so (rate limit)
        self._fresh_models: dict[str, tuple[Model | None, float]] = {}
        self._model_checked: dict[str, float] = {}
        self._fresh_count = 0  # bumped by each refresh: invalidates `_merged`
        self._merged: tuple[dict[str, Model], int, dict[str, Model]] | None = None
        self._dirs_memo: tuple[dict[str, Model], dict[str, ModelDirEntries | None]] | None = None
        self._nursery: trio.Nursery | None = None
        self._prefetching = trio.CapacityLimiter(PREFETCH_LISTINGS)

    # -- inodes -------------------------------------------------------------------------
    def ino(self, node: Node) -> int:
        return self.inodes.ino(node)

    def node(self, ino: int) -> Node:
        return self.inodes.node(ino)

    def remember(self, ino: int, n: int = 1) -> None:
        self.inodes.remember(ino, n)

    def forget(self, ino: int, n: int) -> None:
        self.inodes.forget(ino, n)

    def hold(self, inos: list[int]) -> None:
        self.inodes.hold(inos)

    def unhold(self, inos: list[int]) -> None:
        self.inodes.unhold(inos)

    def _pages_gone(self, ino: int) -> None:
        """`ino` was dropped or now names another file: no page of it is kept."""
        self._page_source.pop(ino, None)

    def inodes_of(self, key: str) -> set[int]:
        """Inodes open for reading with cache key `key` (whose kernel pages may hold it)."""
        out = set()
        for h in self.handles:
            if isinstance(h, FileHandle) and h.cached.spec.key == key:
                ino = self.inodes.known(h.node)
                if ino is not None:
                    out.add(ino)
        return out

    def start(self, nursery: trio.Nursery) -> None:
        """Enable queued writes (background tasks in `nursery`)."""
        self._nursery = nursery

    async def models(self) -> dict[str, Model]:
        async def fetch() -> dict[str, Model]:
            return {m.name: m for m in await self.registry.list_models()}

        listing = await self.meta.get("models", fetch, self.timeouts.listing)
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
        if now - known < RECHECK_AFTER or self.outage.down():
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
            self._model_checked[name] = now + self.outage.grace  # back off
            return
        self._fresh_models[name] = (found[0], now)
        self._fresh_count += 1

    def model_dir(self, models: dict[str, Model], prefix: str) -> ModelDirEntries | None:
        """`model_dir_entries` of `models`, remembered while the listing stays the same
        object: a walk asks for each model directory many times (readdir, each lookup, each
        link), and each answer scans every model name."""
        memo = self._dirs_memo
        if memo is None or memo[0] is not models:
            memo = self._dirs_memo = (models, {})
        known = memo[1]
        if prefix not in known:
            known[prefix] = model_dir_entries(models, prefix)
        return known[prefix]

    async def candidates(self) -> dict[int, Candidate]:
        async def fetch() -> dict[int, Candidate]:
            return {c.iid: c for c in await self.registry.list_candidates()}

        return await self.meta.get("candidates", fetch, self.timeouts.listing)

    async def owner(self, owner: OwnerKey) -> FileOwner:
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

    async def file_tree(self, owner: OwnerKey) -> dict[str, FileDir]:
        obj = await self.owner(owner)

        async def fetch() -> dict[str, FileDir]:
            return build_file_tree(await self.registry.list_files(obj))

        # version files are immutable in practice; candidates still receive artifacts
        ttl = self.timeouts.files if owner[0] == "v" else self.timeouts.listing
        return await self.meta.get(("files", owner), fetch, ttl)

    async def children(self, node: Node) -> dict[str, Node]:
        """Name -> child node of a directory node."""
        k = node.kind
        if k is Kind.ROOT:
            return {"models": Node(Kind.MODELS), "candidates": Node(Kind.CANDIDATES)}
        if k in (Kind.MODELS, Kind.MODEL_DIR):
            prefix = node.name
            entries = self.model_dir(await self.models(), prefix)
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

    def _local_entries(self, owner: OwnerKey, path: str) -> tuple[set[str], set[str]]:
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

    async def _remote_or_none(self, node: Node) -> RemoteFile | None:
        try:
            return await self._remote_file(node)
        except NotFound:
            return None

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
            ttl = self.timeouts.files if node.owner[0] == "v" else self.timeouts.listing
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
        return Attr(ino, True, 4096, mtime, self.timeouts.listing)

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
        if self.outage.down():
            return False  # the registry was just unreachable: no lookup waits on it
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
        if node.kind is Kind.MODEL_DIR:
            self._prefetch_files([k.owner for k in kids.values() if k.kind is Kind.VERSION])
        attrs = [(name, await self._attr(kids[name])) for name in sorted(kids)]
        # numbers after the last await, for the adapter's `hold` in the same step (attr_of)
        return [
            (name, Attr(self.ino(kids[name]), a.is_dir, a.size, a.mtime, a.ttl, a.link))
            for name, a in attrs
        ]

    def _prefetch_files(self, owners: list[OwnerKey]) -> None:
        """A model directory is being listed: fetch its versions' file listings in the
        background, a few at once, so a walk (`ls -lR`, `find`, `du`) that enters them
        next finds them fetched or in flight instead of waiting for each in turn."""
        nursery = self._nursery
        if nursery is None:
            return
        ttl = self.timeouts.files
        for owner in owners[:PREFETCH_MAX]:
            if not self.meta.cached(("files", owner), ttl):
                nursery.start_soon(self._prefetch_one, owner)

    async def _prefetch_one(self, owner: OwnerKey) -> None:
        async with self._prefetching:
            if self.meta.cached(("files", owner), self.timeouts.files):
                return
            try:
                await self.file_tree(owner)
            except MlregfsError as e:  # the walk's own lookup reports it
                log.debug("prefetching the files of %s: %s", owner, e)
            except Exception:  # a task of the mount's nursery: it must never end the mount
                log.exception("prefetching the files of %s", owner)

    async def readlink(self, ino: int) -> str:
        return await self.readlink_node(self.node(ino))

    async def readlink_node(self, node: Node) -> str:
        """An alias link's target: the version's name, relative to the model directory."""
        if node.kind is not Kind.ALIAS:
            raise Unsupported("not a symbolic link")
        entries = self.model_dir(await self.models(), node.name)
        target = entries.aliases.get(node.path) if entries else None
        if target is None:
            raise NotFound(f"alias {node.path!r} no longer resolves")
        return target

    async def _open_cached(self, node: Node, f: RemoteFile) -> CachedFile:
        """`f` (a file of `node`'s owner) opened through the verified block cache."""
        owner = await self.owner(node.owner)
        spec = FileSpec(self.cache_key(f), f.size, f.sha256.lower() if f.sha256 else None)
        registry = self.registry

        async def fetch(start: int, end: int, into: memoryview | None = None) -> Buffer:
            return await registry.read_range(owner, f, start, end, into=into)

        await self.data.load_marker(spec)  # its disk read, off the event loop
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
        digest = sha(f)
        if digest is not None:
            return digest
        ident = f"{self.source_id}|{f.package_id}|{f.file_id}|{f.size}"
        return "f" + hashlib.blake2b(ident.encode(), digest_size=20).hexdigest()

    def _writable(self) -> Spool:
        return self.uploader.writable()
