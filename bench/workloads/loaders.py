"""Workload 2: cold loads the way model loaders read (numpy.memmap random page touch,
safetensors), against a download to ext4 followed by the same load."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from bench.harness import SEED, Bench
from bench.report import Row
from bench.util import (
    cpu_per_gib,
    drop_caches,
    io_timeout,
    load_safetensors,
    log,
    med,
    mmap_touch,
    proc_cpu,
    timed,
)


def measure(b: Bench) -> None:
    for key, label in (("seq", "mmap"), ("st", "safetensors")):
        if key not in b.files:
            continue
        size = b.files[key].stat().st_size
        to = io_timeout(size)
        runs = []
        for r in range(b.cfg.runs):
            log(f"2 {label} cold load, run {r + 1}/{b.cfg.runs}")
            seed = SEED + r

            def load(p: Path, label: str = label, to: float = to, seed: int = seed) -> Any:
                """(seconds, a check that is equal for equal bytes)"""
                if label == "mmap":
                    t, _, total = mmap_touch(p, to, seed=seed)
                    return t, total
                return load_safetensors(p, to, seed=seed)

            d: dict[str, Any] = {}
            dst = b.dl / b.files[key].name
            drop_caches()
            # reference: download to local disk (ext4), then the same load from there
            d["curl_s"] = timed(["curl", "-sSf", "-o", str(dst), b.obj[key]], timeout=to)
            d["local_load_s"], check = load(dst)
            dst.unlink()
            d["ref_s"] = d["curl_s"] + d["local_load_s"]
            m, cache = b.fresh_mount()
            with b.mnts.mounted(m):
                f = b.mnt_file(m, key)
                os.stat(f)
                drop_caches()
                cpu0 = proc_cpu(m.pid)
                d["load_s"], check2 = load(f)
                d["cpu_gib"] = cpu_per_gib(proc_cpu(m.pid) - cpu0, size)
                d["rss_hwm"] = b.note_hwm(f"2 {label}", m)
            shutil.rmtree(cache)
            if check != check2:
                raise RuntimeError(f"{label}: different bytes read ({check} vs {check2})")
            d["ratio"] = d["load_s"] / d["ref_s"]
            log(
                "   mlregfs {load_s:.2f} s ({cpu_gib:.2f} CPU-s/GiB); curl {curl_s:.2f} s "
                "+ load {local_load_s:.2f} s".format(**d)
            )
            runs.append(d)
        b.raw[label] = {"size": size, "runs": runs}
        what = (
            "mmap, every 4K page in random order"
            if label == "mmap"
            else "safetensors safe_open(np), tensors in random order"
        )
        b.rows.append(
            Row("2", f"cold load: {what}", f"{med([x['load_s'] for x in runs]):.2f} s",
                f"curl to ext4 + load {med([x['ref_s'] for x in runs]):.2f} s",
                med([x["ratio"] for x in runs]), "", "<=", 2.0,
                cpu=f"{med([x['cpu_gib'] for x in runs]):.2f} s/GiB")
        )  # fmt: skip
    if b.profiler and b.profiler.enabled and "st" in b.files:
        cache = b.mnts.new_dir("cache")
        b.profile_read(
            "safetensors-load",
            cache,
            lambda m: load_safetensors(b.mnt_file(m, "st"), io_timeout(b.cfg.st_size)),
        )
        shutil.rmtree(cache)
