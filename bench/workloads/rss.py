"""Workload 9: the daemon's peak RSS during concurrent readers and over every workload."""

from __future__ import annotations

import os
import shutil
from typing import Any

from bench.harness import Bench
from bench.report import Row
from bench.util import MiB, cpu_per_gib, drop_caches, io_timeout, log, med, proc_cpu, timed

READERS = 32  # concurrent readers of one file


def measure(b: Bench) -> None:
    """Peak RSS over every workload above, and during READERS concurrent readers of one
    cold file (each starts at its own offset and wraps around, so reads are spread)."""
    size = b.cfg.seq_size
    to = io_timeout(size * 2)
    runs = []
    for r in range(b.cfg.runs):
        log(f"9 daemon peak RSS, {READERS} concurrent readers, run {r + 1}/{b.cfg.runs}")
        d: dict[str, Any] = {}
        m, cache = b.fresh_mount()
        with b.mnts.mounted(m):
            f = b.mnt_file(m, "seq")
            os.stat(f)
            drop_caches()
            mib = size // MiB
            script = "".join(
                f"(dd if='{f}' of=/dev/null bs=1M skip={k} status=none && "
                f"dd if='{f}' of=/dev/null bs=1M count={k} status=none) &\n"
                for k in (i * mib // READERS for i in range(READERS))
            )
            script += "fail=0; for j in $(jobs -p); do wait $j || fail=1; done; exit $fail\n"
            cpu0 = proc_cpu(m.pid)
            d["readers_s"] = timed(["bash", "-c", script], timeout=to)
            d["cpu_gib"] = cpu_per_gib(proc_cpu(m.pid) - cpu0, size)
            d["readers_hwm"] = b.note_hwm(f"9 {READERS} readers", m)
        shutil.rmtree(cache)
        log(
            "   VmHWM {:.0f} MiB, {:.1f} s ({:.2f} CPU-s/GiB)".format(
                d["readers_hwm"] / MiB, d["readers_s"], d["cpu_gib"]
            )
        )
        runs.append(d)
    b.raw["rss"] = {"size": size, "runs": runs, "hwm_by_workload": dict(b.hwm)}
    peak_label, peak = max(b.hwm.items(), key=lambda kv: kv[1])
    b.rows += [
        Row("9", f"daemon peak RSS (VmHWM), {READERS} concurrent readers",
            f"{max(x['readers_hwm'] for x in runs) / MiB:.0f} MiB", "max of runs",
            max(x["readers_hwm"] for x in runs) / MiB, "", "<=", 300, unit="MiB",
            cpu=f"{med([x['cpu_gib'] for x in runs]):.2f} s/GiB"),
        Row("9", "daemon peak RSS (VmHWM) over all workloads", f"{peak / MiB:.0f} MiB",
            f"max in: {peak_label}", peak / MiB, "", "<=", 300, unit="MiB"),
    ]  # fmt: skip
