"""Workload 10: other FUSE mounts of the same bytes (rclone, httpdirfs over nginx's
autoindex): cold sequential read and random 4 KiB p50, against the mlregfs figures of 1 and 3."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from bench.harness import Bench
from bench.references import PEERS, peer_argv
from bench.report import Row
from bench.util import (
    MiB,
    drop_caches,
    fio_read,
    io_timeout,
    log,
    mbps,
    med,
    pct,
    proc_status,
    rand_preads,
)
from mlregfs.testing import FuseProcess


def peer_mount(b: Bench, kind: str) -> tuple[FuseProcess, Path]:
    """A cold peer mount: fresh cache directory, fresh process."""
    mnt = b.mnts.new_dir("mnt")
    cache = b.mnts.new_dir("cache")
    argv = peer_argv(kind, b.ng.url + "/www/", mnt, cache, b.work)
    return b.mnts.peer(kind, argv, mnt), cache


def measure(b: Bench) -> None:
    size = b.cfg.seq_size
    budget = 30.0 if b.cfg.quick else 120.0  # a slow peer reads only part of the file
    ml_seq = [x["dd_MBps"] for x in b.raw.get("sequential", {}).get("runs", [])]
    ml_p50 = [x["p50_ms"] for x in b.raw.get("random", {}).get("runs", [])]
    b.raw["peers"] = {}
    for kind in PEERS:
        runs: list[dict[str, Any]] = []
        if not shutil.which(kind):
            b.errors[kind] = f"{kind} not installed (bash bench/setup.sh)"
        try:
            for r in range(b.cfg.runs if kind not in b.errors else 0):
                log(f"10 {kind}, run {r + 1}/{b.cfg.runs}")
                d: dict[str, Any] = {}
                m, cache = peer_mount(b, kind)
                with b.mnts.mounted(m):
                    f = m.path / "big.dat"
                    os.stat(f)
                    drop_caches()
                    d["read_bytes"], d["read_s"] = fio_read(f, io_timeout(size), budget)
                    d["rss_hwm"] = proc_status(m.pid, "VmHWM")
                shutil.rmtree(cache, ignore_errors=True)
                m, cache = peer_mount(b, kind)
                with b.mnts.mounted(m):
                    f = m.path / "big.dat"
                    os.stat(f)
                    drop_caches()
                    lat = rand_preads(f, b.offsets(size, r))
                shutil.rmtree(cache, ignore_errors=True)
                d["seq_MBps"] = mbps(d["read_bytes"], d["read_s"])
                d["partial"] = d["read_bytes"] < size
                d["p50_ms"], d["p99_ms"] = pct(lat, 50) * 1e3, pct(lat, 99) * 1e3
                log("   seq {seq_MBps:.0f} MB/s{}; random p50 {p50_ms:.2f} ms "
                    "p99 {p99_ms:.2f} ms".format(
                        f" (first {d['read_bytes'] / MiB:.0f} MiB in {budget:.0f} s)"
                        if d["partial"] else "", **d))  # fmt: skip
                runs.append(d)
        except Exception as e:
            b.errors[kind] = f"{type(e).__name__}: {e}"
            log(f"10 {kind} failed: {b.errors[kind]}")
        b.raw["peers"][kind] = {"runs": runs, "error": b.errors.get(kind)}
        if not runs:
            b.rows.append(Row("10", f"vs {kind}: not measured", "", "", None, "", ">=",
                                 1.0, note=b.errors.get(kind, "")))  # fmt: skip
            continue
        peer_seq, peer_p50 = (
            med([x["seq_MBps"] for x in runs]),
            med([x["p50_ms"] for x in runs]),
        )
        part = " (partial read)" if any(x["partial"] for x in runs) else ""
        b.rows += [
            Row("10", f"cold seq read vs {kind}", f"{med(ml_seq):.0f} MB/s",
                f"{kind} {peer_seq:.0f} MB/s{part}", med(ml_seq) / peer_seq, "", ">=", 1.0),
            Row("10", f"random 4K p50 speedup vs {kind}", f"{med(ml_p50):.2f} ms",
                f"{kind} {peer_p50:.2f} ms", peer_p50 / med(ml_p50), "", ">=", 1.0),
        ]  # fmt: skip
