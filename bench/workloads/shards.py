"""Workload 5: the shards of a checkpoint read at once (4 `dd`), against 4 x curl | sha256."""

from __future__ import annotations

import os
import shutil
from typing import Any

from bench.harness import SHARDS, Bench
from bench.references import curl_sha256
from bench.report import Row
from bench.util import cpu_per_gib, drop_caches, io_timeout, log, mbps, med, proc_cpu, timed


def measure(b: Bench) -> None:
    keys = [f"shard{i}" for i in range(SHARDS)]
    total = sum(b.files[k].stat().st_size for k in keys)
    to = io_timeout(total)
    runs = []
    for r in range(b.cfg.runs):
        log(f"5 {SHARDS} shards at once, run {r + 1}/{b.cfg.runs}")
        d: dict[str, Any] = {}
        drop_caches()
        d["curl_sha_s"], _ = curl_sha256([b.obj[k] for k in keys], to)
        m, cache = b.fresh_mount()
        with b.mnts.mounted(m):
            fs = [b.mnt_file(m, k) for k in keys]
            for f in fs:
                os.stat(f)
            drop_caches()
            script = "".join(f"dd if='{f}' of=/dev/null bs=1M status=none &\n" for f in fs)
            script += "fail=0; for j in $(jobs -p); do wait $j || fail=1; done; exit $fail\n"
            cpu0 = proc_cpu(m.pid)
            d["dd_s"] = timed(["bash", "-c", script], timeout=to)
            d["cpu_gib"] = cpu_per_gib(proc_cpu(m.pid) - cpu0, total)
            d["rss_hwm"] = b.note_hwm("5 shards", m)
        shutil.rmtree(cache)
        d["dd_MBps"], d["curl_sha_MBps"] = mbps(total, d["dd_s"]), mbps(total, d["curl_sha_s"])
        log(
            "   mlregfs {dd_MBps:.0f} MB/s ({cpu_gib:.2f} CPU-s/GiB); "
            "4 x curl|sha256 {curl_sha_MBps:.0f} MB/s".format(**d)
        )
        runs.append(d)
    b.raw["shards"] = {"size": total, "runs": runs}
    b.rows.append(
        Row("5", f"{SHARDS} shards read at once (4 dd) vs 4 x curl | sha256",
            f"{med([x['dd_MBps'] for x in runs]):.0f} MB/s",
            f"curl|openssl {med([x['curl_sha_MBps'] for x in runs]):.0f} MB/s",
            med([x["dd_MBps"] / x["curl_sha_MBps"] for x in runs]), "", ">=", 0.8,
            cpu=f"{med([x['cpu_gib'] for x in runs]):.2f} s/GiB")
    )  # fmt: skip
