"""Workloads 1, 4 and 6: a cold sequential read of the mount against curl, the warm re-read
against tmpfs, and the disk-cache re-read after a remount against ext4.

Every read here is fio's (bench/fio/seq_read.fio: 1 MiB reads, as `dd bs=1M`); the JSON keeps
the `dd_*` key names of the earlier runs so that results stay comparable.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from bench.harness import Bench
from bench.references import curl_sha256
from bench.report import Row
from bench.util import (
    cpu_per_gib,
    drop_caches,
    fio_secs,
    io_timeout,
    log,
    mbps,
    med,
    proc_cpu,
    timed,
)


def measure(b: Bench) -> None:
    size = b.cfg.seq_size
    url = b.obj["seq"]
    to = io_timeout(size)
    runs: list[dict[str, Any]] = []
    for r in range(b.cfg.runs):
        log(f"1/4/6 sequential, run {r + 1}/{b.cfg.runs}")
        d: dict[str, Any] = {}
        drop_caches()
        d["curl_s"] = timed(["curl", "-sSf", "-o", "/dev/null", url], timeout=to)
        drop_caches()
        d["curl_sha_s"], (d["sha256"],) = curl_sha256([url], to)
        m, cache = b.fresh_mount()
        with b.mnts.mounted(m):
            f = b.mnt_file(m, "seq")
            os.stat(f)
            drop_caches()
            cpu0 = proc_cpu(m.pid)
            d["dd_s"] = fio_secs(f, to)
            d["cpu_gib"] = cpu_per_gib(proc_cpu(m.pid) - cpu0, size)
            cpu0 = proc_cpu(m.pid)
            d["warm_dd_s"] = fio_secs(f, to)
            d["warm_cpu_gib"] = cpu_per_gib(proc_cpu(m.pid) - cpu0, size)
            d["rss_hwm"] = b.note_hwm("1 cold seq + 4 warm", m)
        # 6: remount on the same cache; reference: the source file on local disk (ext4)
        drop_caches()
        d["local_dd_s"] = fio_secs(b.files["seq"], to)
        m2 = b.mnts.mlregfs(b.url, cache, b.cfg.mount_opts)
        with b.mnts.mounted(m2):
            f = b.mnt_file(m2, "seq")
            os.stat(f)  # lookups are not what 6 measures
            drop_caches()
            mark = b.ng.log_mark()
            cpu0 = proc_cpu(m2.pid)
            d["diskcache_dd_s"] = fio_secs(f, to)
            d["diskcache_cpu_gib"] = cpu_per_gib(proc_cpu(m2.pid) - cpu0, size)
            d["diskcache_http_bytes"] = b.ng.served_since(mark)[1]
            b.note_hwm("6 disk cache", m2)
        shutil.rmtree(cache)
        # 4 reference: the same file on tmpfs, second read
        shm = b.files["seq_shm"]
        fio_secs(shm, to)
        d["tmpfs_dd_s"] = fio_secs(shm, to)
        for k in list(d):
            if k.endswith("_s"):
                d[k.removesuffix("_s") + "_MBps"] = round(mbps(size, d[k]), 1)
        runs.append(d)
        log(
            "   curl {curl_MBps} curl|sha256 {curl_sha_MBps} fio {dd_MBps} ({cpu_gib:.2f} "
            "CPU-s/GiB) warm {warm_dd_MBps} tmpfs {tmpfs_dd_MBps} diskcache "
            "{diskcache_dd_MBps} local disk {local_dd_MBps} MB/s".format(**d)
        )
    b.raw["sequential"] = {"size": size, "runs": runs}
    if b.profiler and b.profiler.enabled:
        cache = b.mnts.new_dir("cache")
        seq = b.mnt_file
        b.profile_read("cold-seq-read", cache, lambda m: fio_secs(seq(m, "seq"), to))
        # the same cache_dir again: the re-read comes from the disk cache
        b.profile_read("diskcache-re-read", cache, lambda m: fio_secs(seq(m, "seq"), to))
        shutil.rmtree(cache)

    def ratio(num: str, den: str) -> float:
        return med([x[num] / x[den] for x in runs])

    def fig(k: str) -> str:
        return f"{med([x[k] for x in runs]):.0f} MB/s"

    def cpu(k: str) -> str:
        return f"{med([x[k] for x in runs]):.2f} s/GiB"

    b.rows += [
        Row("1", "cold seq read (1 MiB reads, fio) vs curl | sha256", fig("dd_MBps"),
            "curl|openssl " + fig("curl_sha_MBps"), ratio("dd_MBps", "curl_sha_MBps"), "",
            ">=", 0.8, cpu=cpu("cpu_gib")),
        Row("1", "cold seq read (1 MiB reads, fio) vs curl -o /dev/null", fig("dd_MBps"),
            "curl " + fig("curl_MBps"), ratio("dd_MBps", "curl_MBps"), "", "", None,
            cpu=cpu("cpu_gib")),
        Row("4", "warm re-read (page cache) vs tmpfs", fig("warm_dd_MBps"),
            "tmpfs " + fig("tmpfs_dd_MBps"), ratio("warm_dd_MBps", "tmpfs_dd_MBps"), "",
            ">=", 0.8, cpu=cpu("warm_cpu_gib")),
        Row("6", "disk-cache re-read after remount vs local disk", fig("diskcache_dd_MBps"),
            "ext4 " + fig("local_dd_MBps"), ratio("diskcache_dd_MBps", "local_dd_MBps"), "",
            "", None, cpu=cpu("diskcache_cpu_gib")),
    ]  # fmt: skip
