"""Runtime counters of a mount: a JSON state file for `mlregfs status`, Prometheus text for
`-o metrics=PATH`. Both are rewritten every few seconds by the daemon (atomic renames)."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import stat
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mlregfs.localstate import DIR_MODE, FILE_MODE, write_private

log = logging.getLogger("mlregfs.status")


def state_dir() -> Path:
    """Where the daemon reports: /run/mlregfs (root), $XDG_RUNTIME_DIR/mlregfs, else
    /tmp/mlregfs-<uid> - a predictable name, so `checked_state_dir` verifies it is ours."""
    if os.geteuid() == 0:
        return Path("/run/mlregfs")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "mlregfs" if runtime else Path(f"/tmp/mlregfs-{os.getuid()}")


def state_path(mountpoint: Path) -> Path:
    digest = hashlib.sha256(str(Path(mountpoint).absolute()).encode()).hexdigest()[:24]
    return state_dir() / f"{digest}.json"


def checked_state_dir(path: Path, *, create: bool) -> Path:
    """`path` if it is a real directory (not a symlink) owned by us and closed to others.

    Another local user may have created it (or a symlink) first, in /tmp: then we refuse
    (PermissionError) rather than write where they can read or redirect us. Ours but too
    open: tightened to 0700."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not create:
            raise
        with contextlib.suppress(FileExistsError):  # lost a race: checked below
            os.mkdir(path, DIR_MODE)
        st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"refusing status directory {path}: not a directory (a symlink?)")
    if st.st_uid != os.geteuid():
        raise PermissionError(
            f"refusing status directory {path}: owned by uid {st.st_uid}, not by us"
        )
    if stat.S_IMODE(st.st_mode) != DIR_MODE:
        os.chmod(path, DIR_MODE)
    return path


def prometheus(snapshot: dict[str, Any]) -> str:
    """The counters in Prometheus text exposition format, rendered by prometheus_client (label
    escaping, `_total` on counters) from a one-shot collector over `snapshot`."""
    mountpoint = str(snapshot.get("mountpoint", ""))
    families: list[Metric] = []
    for name, (kind, help_text) in METRICS.items():
        value: Any = snapshot
        for part in name.split("."):
            value = value.get(part, 0) if isinstance(value, dict) else 0
        metric = "mlregfs_" + name.replace(".", "_")
        family = (
            CounterMetricFamily(metric, help_text, labels=["mountpoint"])
            if kind == "counter"
            else GaugeMetricFamily(metric, help_text, labels=["mountpoint"])
        )
        family.add_metric([mountpoint], float(value or 0))
        families.append(family)
    failures = CounterMetricFamily(
        "mlregfs_fuse_failures",
        "FUSE operations answered with an error",
        labels=["mountpoint", "op"],
    )
    for op, n in sorted(snapshot.get("fuse_failures", {}).items()):
        failures.add_metric([mountpoint, str(op)], float(n))
    families.append(failures)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(families))
    return generate_latest(registry).decode("utf-8")


class _Snapshot(Collector):
    """Metric families computed once from a snapshot (the daemon rewrites the file every 2 s)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


METRICS = {
    "cache.stored_bytes": ("gauge", "Bytes in the on-disk block cache"),
    "cache.capacity_bytes": ("gauge", "Configured cache_size"),
    "cache.pinned_bytes": ("gauge", "Bytes of pinned files"),
    "cache.hits": ("counter", "Block reads answered from memory or disk"),
    "cache.misses": ("counter", "Blocks fetched from the registry"),
    "cache.hit_ratio": ("gauge", "hits / (hits + misses)"),
    "cache.evictions": ("counter", "Blocks evicted"),
    "cache.integrity_failures": ("counter", "Files whose bytes did not match sha256"),
    "registry.requests": ("counter", "HTTP requests sent"),
    "registry.bytes_downloaded": ("counter", "Bytes downloaded"),
    "registry.bytes_uploaded": ("counter", "Bytes uploaded"),
    "registry.retries": ("counter", "Retried requests"),
    "registry.errors": ("counter", "Requests that failed after retries"),
    "registry.offline_answers": ("counter", "Listings answered from the catalog"),
    "uploads.uploaded": ("counter", "Files uploaded"),
    "uploads.failed": ("counter", "Uploads that failed"),
    "uploads.unchanged": ("counter", "Closes and renames whose bytes the registry already had"),
    "uploads.in_flight": ("gauge", "Uploads running now"),
    "uploads.recovery_items": ("gauge", "Spooled files kept for mlregfs recover"),
}


class Reporter:
    """Collects a snapshot from the running mount and writes the state (and metrics) files."""

    def __init__(
        self, mountpoint: Path, metrics: Path | None, collect: Any, metrics_mode: int = FILE_MODE
    ) -> None:
        self.path = state_path(mountpoint)
        self.metrics = metrics
        self.metrics_mode = metrics_mode  # -o metrics_mode: e.g. 0644 for a node exporter
        self.collect = collect  # (recovery_items) -> dict
        self._refused: str | None = None

    def write(self, snap: dict[str, Any]) -> None:
        """Rewrite the state file (0600) and the metrics textfile (`metrics_mode`).

        Neither write follows a symlink planted at the file's name; a state directory that
        is not ours is refused, with one warning (metrics are still written)."""
        try:
            checked_state_dir(self.path.parent, create=True)
        except OSError as e:
            if str(e) != self._refused:
                log.warning("no status file for `mlregfs status`: %s", e)
                self._refused = str(e)
        else:
            write_private(self.path, json.dumps(snap, indent=1))
        if self.metrics is not None:
            write_private(self.metrics, prometheus(snap), self.metrics_mode)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def render(s: dict[str, Any]) -> str:
    c, r, u = s["cache"], s["registry"], s["uploads"]
    age = time.time() - s["written_at"]
    out = [
        f"mlregfs at {s['mountpoint']} (pid {s['pid']}, up {s['uptime']:.0f}s, "
        f"{'read-only' if s['read_only'] else 'read-write'}, updated {age:.0f}s ago)",
        f"  source      {s['source']}",
        f"  cache       {_human(c['stored_bytes'])} of {_human(c['capacity_bytes'])} "
        f"({_human(c['pinned_bytes'])} pinned) in {s['cache_dir']}",
        f"  hit ratio   {c['hit_ratio']:.1%} ({c['hits']} hits, {c['misses']} misses, "
        f"{c['evictions']} evictions, {c['integrity_failures']} sha256 failures)",
        f"  registry    {r['requests']} requests, {_human(r['bytes_downloaded'])} fetched, "
        f"{_human(r['bytes_uploaded'])} uploaded, {r['retries']} retries, {r['errors']} errors"
        + (f", {r['offline_answers']} answered offline" if r["offline_answers"] else ""),
        f"  uploads     {u['uploaded']} done, {u.get('unchanged', 0)} unchanged (not sent), "
        f"{u['failed']} failed, {u['in_flight']} in flight, "
        f"{u['recovery_items']} kept for 'mlregfs recover'",
    ]
    if s.get("fuse_failures"):
        fails = ", ".join(f"{k} {v}" for k, v in sorted(s["fuse_failures"].items()))
        out.append(f"  failed ops  {fails}")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mlregfs status", description="Counters of a running mount.")
    p.add_argument("mountpoint", type=Path)
    p.add_argument("--json", action="store_true", help="print the raw snapshot")
    args = p.parse_args(argv)
    path = state_path(args.mountpoint)
    try:
        checked_state_dir(path.parent, create=False)
        with open(path, "rb") as f:  # a real file in our own directory
            snap = json.loads(f.read())
    except PermissionError as e:
        print(f"mlregfs status: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError):
        print(f"mlregfs status: no mlregfs daemon reports for {args.mountpoint}", file=sys.stderr)
        return 1
    try:
        os.kill(int(snap["pid"]), 0)
    except ProcessLookupError:
        print(
            f"mlregfs status: the daemon of {args.mountpoint} (pid {snap['pid']}) is gone;"
            " the numbers below are its last report",
            file=sys.stderr,
        )
        print(render(snap))
        return 1
    print(json.dumps(snap, indent=1) if args.json else render(snap))
    return 0
