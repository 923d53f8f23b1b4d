"""Workload 7: writes the way tools write (cp, rsync, rsync of unchanged data) against
`curl -T` to the same endpoint."""

from __future__ import annotations

import os
import re
import shutil
from typing import Any

from bench.harness import Bench
from bench.references import curl_upload
from bench.report import Row
from bench.util import cpu_per_gib, io_timeout, log, mbps, med, proc_cpu, run, timed


def measure(b: Bench) -> None:
    src = b.files["seq_shm"]
    size = src.stat().st_size
    to = io_timeout(size)
    runs = []
    for r in range(b.cfg.runs):
        log(f"7 upload, run {r + 1}/{b.cfg.runs}")
        d: dict[str, Any] = {}
        d["curl_s"] = curl_upload(src, b.api_url("upl", f"curl-{r}.bin"), b.token, to)
        m, cache = b.fresh_mount()
        with b.mnts.mounted(m):
            dst = m.path / "models" / "upl" / "1.0.0" / f"cp-{r}.bin"
            os.stat(dst.parent)
            cpu0 = proc_cpu(m.pid)
            d["cp_s"] = timed(["cp", str(src), str(dst)], timeout=to)
            d["cpu_gib"] = cpu_per_gib(proc_cpu(m.pid) - cpu0, size)
            d["rss_hwm"] = b.note_hwm("7 upload", m)
            # rsync: a temporary name, held at close, uploaded by the rename; then the
            # same again, unchanged: written and hashed, nothing uploaded (Semantics 44)
            tree = src.parent / f"rsync-src-{r}"  # beside the tmpfs source: a hard link
            shutil.rmtree(tree, ignore_errors=True)
            tree.mkdir()
            os.link(src, tree / f"rs-{r}.bin")
            rsync = ["rsync", "-a", "--whole-file", f"{tree}/", f"{dst.parent}/"]
            cpu0 = proc_cpu(m.pid)
            d["rsync_s"] = timed(rsync, timeout=to)
            d["rsync_cpu_gib"] = cpu_per_gib(proc_cpu(m.pid) - cpu0, size)
            cpu0 = proc_cpu(m.pid)
            d["rerun_s"] = timed(["rsync", "-a", "--whole-file", "--ignore-times",
                                  f"{tree}/", f"{dst.parent}/"], timeout=to)  # fmt: skip
            d["rerun_cpu_gib"] = cpu_per_gib(proc_cpu(m.pid) - cpu0, size)
            shutil.rmtree(tree)
        # the daemon logs the PUT's duration: the rest of cp's time is the write phase
        text = m.log.read_text(errors="replace") if m.log and m.log.exists() else ""
        put = re.findall(r"uploaded .* in ([0-9.]+) s", text)
        d["put_s"] = float(put[-2]) if len(put) >= 2 else None  # cp's (rsync's is last)
        d["rerun_unchanged"] = "unchanged (sha256" in text
        shutil.rmtree(cache)
        d["cp_MBps"], d["curl_MBps"] = mbps(size, d["cp_s"]), mbps(size, d["curl_s"])
        d["rsync_MBps"], d["rerun_MBps"] = mbps(size, d["rsync_s"]), mbps(size, d["rerun_s"])
        log(
            f"   cp {d['cp_MBps']:.0f} MB/s ({d['cpu_gib']:.2f} CPU-s/GiB, PUT after close:"
            f" {d['put_s']} s), rsync {d['rsync_MBps']:.0f} MB/s, rsync again (unchanged:"
            f" {d['rerun_unchanged']}) {d['rerun_MBps']:.0f} MB/s, curl -T"
            f" {d['curl_MBps']:.0f} MB/s"
        )
        runs.append(d)
    b.raw["upload"] = {"size": size, "runs": runs}
    if b.profiler and b.profiler.enabled:
        m, cache = b.fresh_mount()
        with b.mnts.mounted(m):
            dst = m.path / "models" / "upl" / "1.0.0" / "cp-profile.bin"
            os.stat(dst.parent)
            with b.profiler.record("upload-cp", m.pid):
                run(["cp", str(src), str(dst)], timeout=to)
        shutil.rmtree(cache)
    b.rows.append(
        Row("7", "upload: cp into a version vs curl -T",
            f"{med([x['cp_MBps'] for x in runs]):.0f} MB/s",
            f"curl {med([x['curl_MBps'] for x in runs]):.0f} MB/s",
            med([x["cp_MBps"] / x["curl_MBps"] for x in runs]), "", ">=", 0.7,
            cpu=f"{med([x['cpu_gib'] for x in runs]):.2f} s/GiB")
    )  # fmt: skip
    unchanged = all(x["rerun_unchanged"] for x in runs)
    b.rows += [
        Row("7", "upload: rsync -a (temp name + rename) vs curl -T",
            f"{med([x['rsync_MBps'] for x in runs]):.0f} MB/s",
            f"curl {med([x['curl_MBps'] for x in runs]):.0f} MB/s",
            med([x["rsync_MBps"] / x["curl_MBps"] for x in runs]), "", ">=", 0.7,
            cpu=f"{med([x['rsync_cpu_gib'] for x in runs]):.2f} s/GiB"),
        Row("7", "rsync -a again, unchanged (nothing uploaded) vs curl -T",
            f"{med([x['rerun_MBps'] for x in runs]):.0f} MB/s",
            f"curl {med([x['curl_MBps'] for x in runs]):.0f} MB/s",
            med([x["rerun_MBps"] / x["curl_MBps"] for x in runs]), "", ">=", 1.0,
            cpu=f"{med([x['rerun_cpu_gib'] for x in runs]):.2f} s/GiB",
            note="" if unchanged else "the re-run uploaded a copy"),
    ]  # fmt: skip
