"""Daemon wiring: the object graph of one mount, built from its config (no logic here).

`mount.serve` connects, calls `assemble`, mounts and runs; `snapshot` is what the status
file and the metrics say about the graph.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.parse
from dataclasses import dataclass, field

import trio

from mlregfs.buffers import POOL
from mlregfs.cache.blocks import BlockStore
from mlregfs.cache.reader import DataCache
from mlregfs.config import Config
from mlregfs.fs.core import Filesystem, Timeouts
from mlregfs.fs.holders import Holders
from mlregfs.fuse_ops import Operations
from mlregfs.registry.catalog import CatalogRegistry
from mlregfs.registry.gitlab import GitLabRegistry
from mlregfs.spool import Spool

log = logging.getLogger("mlregfs.mount")


def public_source(source: str) -> str:
    """SOURCE without any userinfo (never show credentials)."""
    p = urllib.parse.urlsplit(source)
    host = p.hostname or ""
    if p.port:
        host = f"{host}:{p.port}"
    return urllib.parse.urlunsplit((p.scheme, host, p.path, "", ""))


@dataclass
class Daemon:
    """One mount's parts, from the registry client to the pyfuse3 operations."""

    cfg: Config
    client: GitLabRegistry
    registry: CatalogRegistry
    store: BlockStore
    data: DataCache
    spool: Spool | None
    fs: Filesystem
    ops: Operations
    started: float = field(default_factory=time.time)


async def assemble(cfg: Config, client: GitLabRegistry, registry: CatalogRegistry) -> Daemon:
    """Build the caches, the spool, the core and the adapter over a connected registry."""
    store = await trio.to_thread.run_sync(BlockStore, cfg.cache_dir / "blocks", cfg.cache_size)
    data = DataCache(  # configures POOL: every block buffer within memory_limit
        store,
        block_size=cfg.block_size,
        memory_bytes=cfg.memory_cache,
        memory_limit=cfg.memory_limit,
        readahead=cfg.readahead_blocks,
        prefetch=cfg.prefetch,
    )
    spool = None
    if not cfg.read_only:
        spool = await trio.to_thread.run_sync(Spool, cfg.cache_dir / "spool")
        leftovers = await trio.to_thread.run_sync(spool.leftovers)
        if leftovers:
            log.warning(
                "%d spooled file(s) from earlier mounts were not uploaded (%s); run"
                " 'mlregfs recover --cache-dir %s' to retry or discard them",
                len(leftovers),
                ", ".join(e.target for e in leftovers[:5]),
                cfg.cache_dir,
            )
    # mountinfo names the mount point with its symlinks resolved
    mountpoint = await trio.to_thread.run_sync(os.path.realpath, cfg.mountpoint)
    fs = Filesystem(
        registry,
        data,
        source_id=public_source(cfg.source),
        timeouts=Timeouts(listing=cfg.listing_ttl, files=cfg.file_ttl),
        spool=spool,
        hold_temp=cfg.temp_files == "hold",
        holders=Holders(mountpoint),
        origin=client,
        outage=registry.outage,
    )
    ops = Operations(fs, uid=cfg.uid, gid=cfg.gid, umask=cfg.umask)
    return Daemon(cfg, client, registry, store, data, spool, fs, ops)


def snapshot(d: Daemon, recovery_items: int) -> dict[str, object]:
    """The mount's numbers for `mlregfs status` and the metrics textfile."""
    cfg, store, data, fs, registry = d.cfg, d.store, d.data, d.fs, d.registry
    st, ds, rs = store.stats, data.stats, registry.stats
    hits = ds.memory_hits + ds.disk_hits
    return {
        "mountpoint": str(cfg.mountpoint),
        "source": public_source(cfg.source),
        "pid": os.getpid(),
        "read_only": cfg.read_only,
        "cache_dir": str(cfg.cache_dir),
        "uptime": time.time() - d.started,
        "written_at": time.time(),
        "cache": {
            "stored_bytes": st.stored_bytes,
            "capacity_bytes": store.capacity,
            "pinned_bytes": store.pinned_bytes(),
            "hits": hits,
            "misses": ds.fetched_blocks,
            "hit_ratio": hits / (hits + ds.fetched_blocks) if hits + ds.fetched_blocks else 0,
            "evictions": st.evictions,
            "integrity_failures": ds.integrity_failures,
            "block_buffers_reused": POOL.reused,
            "block_buffers_allocated": POOL.allocated,
            "block_buffers_alive": POOL.alive,
            "block_buffers_peak": POOL.peak,
            "block_buffer_waits": POOL.waits,
            "block_buffers_over_budget": POOL.over_budget,
            "streams": ds.streams,
            "streams_peak": ds.streams_peak,
        },
        "registry": {
            "requests": rs.requests,
            "bytes_downloaded": rs.bytes_downloaded,
            "bytes_uploaded": rs.bytes_uploaded,
            "retries": rs.retries,
            "errors": rs.errors,
            "offline_answers": registry.offline_answers,
            "by_kind": dict(rs.by_kind),
        },
        "uploads": {
            **fs.uploader.stats,
            "in_flight": fs.uploader.in_flight,
            "recovery_items": recovery_items,
        },
        "fuse_failures": dict(d.ops.failures),
    }
