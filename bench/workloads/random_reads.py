"""Workload 3: random 4 KiB preads on a cold file against one Range request each.

Python's own pread timing, not fio: each read's latency at the very offsets the Range
references use (fio reports percentiles from latency buckets).
"""

from __future__ import annotations

import os
import shutil
import statistics
import urllib.parse

from bench.harness import Bench
from bench.references import curl_range_latencies, socket_range_latencies
from bench.report import Row
from bench.util import drop_caches, log, med, pct, proc_cpu, rand_preads


def measure(b: Bench) -> None:
    size = b.cfg.seq_size
    url = b.obj["seq"]
    path = urllib.parse.urlsplit(url).path
    runs = []
    for r in range(b.cfg.runs):
        log(f"3 random 4 KiB preads, run {r + 1}/{b.cfg.runs}")
        offs = b.offsets(size, r)
        drop_caches()
        curl = curl_range_latencies(url, offs)
        drop_caches()
        sock = socket_range_latencies("127.0.0.1", b.ng.port, path, offs)
        m, cache = b.fresh_mount()
        with b.mnts.mounted(m):
            f = b.mnt_file(m, "seq")
            os.stat(f)
            drop_caches()
            mark = b.ng.log_mark()
            cpu0 = proc_cpu(m.pid)
            lat = rand_preads(f, offs)
            cpu = proc_cpu(m.pid) - cpu0
            reqs, nbytes = b.ng.served_since(mark)
            b.note_hwm("3 random", m)
        shutil.rmtree(cache)
        d = {
            "p50_ms": pct(lat, 50) * 1e3,
            "p99_ms": pct(lat, 99) * 1e3,
            "mean_ms": statistics.fmean(lat) * 1e3,
            "curl_p50_ms": pct(curl, 50) * 1e3,
            "curl_p99_ms": pct(curl, 99) * 1e3,
            "socket_p50_ms": pct(sock, 50) * 1e3,
            "socket_p99_ms": pct(sock, 99) * 1e3,
            "cpu_ms_per_read": cpu / len(offs) * 1e3,
            "http_requests": reqs,
            "http_bytes": nbytes,
            "preads": len(offs),
        }
        # the stricter (smaller) of the two is the reference
        d["ref_p50_ms"] = min(d["curl_p50_ms"], d["socket_p50_ms"])
        d["ref_p99_ms"] = min(d["curl_p99_ms"], d["socket_p99_ms"])
        log(
            "   p50 {p50_ms:.2f} ms p99 {p99_ms:.2f} ms ({cpu_ms_per_read:.2f} CPU-ms/read); "
            "Range p50 curl {curl_p50_ms:.2f} ms, raw socket {socket_p50_ms:.2f} ms; "
            "{http_requests} requests, {http_bytes} bytes from nginx".format(**d)
        )
        runs.append(d)
    b.raw["random"] = {"size": size, "runs": runs}
    if b.profiler and b.profiler.enabled:
        cache = b.mnts.new_dir("cache")
        offsets = b.offsets(size, 99)
        b.profile_read("random-4k", cache, lambda m: rand_preads(b.mnt_file(m, "seq"), offsets))
        shutil.rmtree(cache)

    def fig(k: str) -> str:
        return f"{med([x[k] for x in runs]):.2f} ms"

    cpu_fig = f"{med([x['cpu_ms_per_read'] for x in runs]):.2f} ms/read"
    b.rows += [
        Row("3", "random 4K pread p50 vs one Range request", fig("p50_ms"),
            f"Range {fig('ref_p50_ms')} (curl {fig('curl_p50_ms')}, "
            f"socket {fig('socket_p50_ms')})",
            med([x["p50_ms"] / x["ref_p50_ms"] for x in runs]), "", "<=", 2.0, cpu=cpu_fig),
        Row("3", "random 4K pread p99 vs Range p99", fig("p99_ms"),
            "Range " + fig("ref_p99_ms"), med([x["p99_ms"] / x["ref_p99_ms"] for x in runs]),
            "", "", None),
    ]  # fmt: skip
