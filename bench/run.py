#!/usr/bin/env python3
"""mlregfs benchmark: one table of ratios, each against a reference measured in the same run.

    bash bench/setup.sh                         # once: nginx-light curl rclone httpdirfs, .[bench]
    sudo .venv/bin/python bench/run.py --quick  # smoke run, a few minutes
    sudo .venv/bin/python bench/run.py          # full run (1 GiB files), ~20-30 min

The references are not our own server: a private nginx (sendfile, keep-alive) serves the
registry's blobs as object storage, `mlregfs serve --download-mode redirect --storage-url
<nginx>` answers downloads with a 302 to it (as GitLab does with object storage), and the mount
talks to that serve. curl, openssl, ext4, tmpfs, rclone and httpdirfs give the references.
Runs as root (drop_caches between cold runs). Every figure is the median of `--runs` runs;
every ratio is the median of per-run ratios. Writes bench/results/<timestamp>.json (raw
numbers, machine, git rev) and <timestamp>.png. Every mount and process it started is cleaned
up on exit, failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: `bench` (this dir) as a package; appended,
    sys.path.append(str(REPO))  # so PYTHONPATH can point mlregfs at another checkout

from bench.mounts import Mount, Mounts, Nginx, Profiler  # noqa: E402
from bench.report import Row, chart, git_info, machine_info, table, table_md  # noqa: E402
from bench.util import (  # noqa: E402
    GiB,
    MiB,
    curl_range_latencies,
    curl_sha256,
    dd,
    drop_caches,
    free_port,
    io_timeout,
    load_safetensors,
    log,
    mbps,
    med,
    mmap_touch,
    pct,
    proc_cpu,
    proc_status,
    rand_preads,
    read_seq,
    run,
    socket_range_latencies,
    timed,
    write_random,
    write_safetensors,
)
from mlregfs.server.testing import ServerProcess  # noqa: E402

RESULTS = REPO / "bench" / "results"
PY = sys.executable
PROJECT = "bench/models"
TREE_PROJECT = "bench/tree"
SEED = 20261123
SHARDS = 4
READERS = 32  # workload 9: concurrent readers of one file
ALL = frozenset(range(1, 11))


# ----------------------------------------------------------------------------- configuration


@dataclass
class Config:
    quick: bool
    runs: int
    seq_size: int  # workloads 1, 3, 4, 6, 7, 9, 10; 5 reads SHARDS files of seq_size / SHARDS
    st_size: int  # workload 2 (safetensors)
    models: int  # workload 8: models x versions x files
    versions: int = 3
    files: int = 5
    randoms: int = 64  # workload 3: random 4 KiB preads per run, each in its own 16 MiB region
    peers: bool = True
    only: frozenset[int] = ALL
    profile: bool = False
    workdir: Path = Path("/tmp")
    keep: bool = False
    mount_opts: str = ""

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> Config:
        if a.quick:
            c = cls(True, a.runs, 256 * MiB, 128 * MiB, 30)
        else:
            c = cls(False, a.runs, GiB, GiB, 500)
        if a.size_mib:
            c.seq_size = c.st_size = a.size_mib * MiB
        if a.models:
            c.models = a.models
        c.peers = not a.no_peers
        if a.only:
            c.only = frozenset(int(x) for x in a.only.split(","))
            if 10 in c.only:  # peer ratios use the mlregfs figures of 1 (seq) and 3 (random)
                c.only |= {1, 3}
        if not c.peers:
            c.only -= {10}
        c.profile = a.profile
        c.workdir = Path(a.workdir)
        c.keep = a.keep_workdir
        c.mount_opts = a.mount_opts
        return c


def cpu_per_gib(cpu_s: float, nbytes: int) -> float:
    return cpu_s / (nbytes / GiB) if nbytes else float("nan")


# ----------------------------------------------------------------------------- the bench


@dataclass
class Bench:
    cfg: Config
    work: Path
    stamp: str
    server: ServerProcess | None = None
    nginx: Nginx | None = None
    mounts: Mounts | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    obj: dict[str, str] = field(default_factory=dict)  # nginx (object storage) URL per file
    hwm: dict[str, int] = field(default_factory=dict)  # daemon VmHWM per workload (max)
    profiler: Profiler | None = None

    @property
    def srv(self) -> ServerProcess:
        assert self.server is not None
        return self.server

    @property
    def ng(self) -> Nginx:
        assert self.nginx is not None
        return self.nginx

    @property
    def mnts(self) -> Mounts:
        assert self.mounts is not None
        return self.mounts

    # -- setup ----------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        src = self.work / "src"
        src.mkdir()
        log(f"generating data in {self.work}")
        # not a weights name (.bin, .safetensors, ...): a mount's prefetch policy may stream
        # those whole at open, and 3 measures small cold reads, not reads behind a prefetch
        self.files["seq"] = src / "big.dat"
        write_random(self.files["seq"], cfg.seq_size, SEED)
        if 2 in cfg.only:
            self.files["st"] = src / "model.safetensors"
            write_safetensors(self.files["st"], cfg.st_size, SEED + 1)
        if 5 in cfg.only:
            for i in range(SHARDS):
                f = src / f"model-{i + 1:05d}-of-{SHARDS:05d}.safetensors"
                write_random(f, cfg.seq_size // SHARDS, SEED + 10 + i)
                self.files[f"shard{i}"] = f

        ng_port = free_port()
        self.server = ServerProcess(
            self.work / "srv",
            download_mode="redirect",
            extra_args=["--storage-url", f"http://127.0.0.1:{ng_port}"],
        )
        self.server.start()
        www = self.work / "www"
        www.mkdir()
        os.link(self.files["seq"], www / "big.dat")  # the peers read the same bytes
        self.nginx = Nginx(self.work / "nginx", ng_port, self.work / "srv" / "blobs", www)
        self.nginx.start()
        st = self.server.store
        st.create_project(PROJECT, "public")
        self.token = st.create_token(PROJECT, "maintainer")
        self.vids: dict[str, int] = {}
        self.names: dict[str, tuple[str, str]] = {}  # key -> (model, file name)
        for key, path in self.files.items():
            model = "shards" if key.startswith("shard") else key
            if model not in self.vids:
                st.create_model(PROJECT, model)
                self.vids[model] = st.create_version(PROJECT, model, "1.0.0")
            st.add_file(PROJECT, self.vids[model], path.name, path)
            self.names[key] = (model, path.name)
            self.obj[key] = self.object_url(model, path.name)
        st.create_model(PROJECT, "upl")
        self.vids["upl"] = st.create_version(PROJECT, "upl", "1.0.0")
        self.url = f"{self.server.url}/{PROJECT}"
        log(f"mlregfs serve at {self.srv.url} (redirect to nginx at {self.ng.url})")
        self.mounts = Mounts(self.work, self.token)
        self.profiler = Profiler(self.cfg.profile, RESULTS, self.stamp)
        # tmpfs copy: warm-read reference and upload source
        self.shm = Path(tempfile.mkdtemp(prefix="mlregfs-bench-", dir="/dev/shm"))
        self.files["seq_shm"] = self.shm / "big.dat"
        shutil.copyfile(self.files["seq"], self.files["seq_shm"])
        self.dl = self.work / "dl"  # download-then-load references land here (ext4)
        self.dl.mkdir()

    def api_url(self, model: str, name: str) -> str:
        pid = urllib.parse.quote(PROJECT, safe="")
        return f"{self.srv.api}/projects/{pid}/packages/ml_models/{self.vids[model]}/files/{name}"

    def object_url(self, model: str, name: str) -> str:
        """Where the registry redirects a download of this file: the reference's URL."""
        r = httpx.get(
            self.api_url(model, name),
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=30,
        )
        if r.status_code != 302 or not r.headers["location"].startswith(self.ng.url):
            raise RuntimeError(f"expected a 302 to nginx, got {r.status_code}")
        # nginx ignores the signed query; without it the URL never expires
        url = r.headers["location"].split("?", 1)[0]
        if httpx.head(url, timeout=30).status_code != 200:
            raise RuntimeError(f"nginx does not serve {url}")
        return url

    def mnt_file(self, m: Mount, key: str) -> Path:
        model, name = self.names[key]
        return m.path / "models" / model / "1.0.0" / name

    def fresh_mount(self, opts: str = "") -> tuple[Mount, Path]:
        cache = self.mnts.new_dir("cache")
        opts = ",".join(x for x in (self.cfg.mount_opts, opts) if x)
        return self.mnts.mlregfs(self.url, cache, opts), cache

    def note_hwm(self, label: str, m: Mount) -> int:
        v = proc_status(m.pid, "VmHWM")
        self.hwm[label] = max(self.hwm.get(label, 0), v)
        return v

    def profile_read(self, label: str, cache: Path, action: Callable[[Mount], object]) -> None:
        """py-spy of the daemon while `action(mount)` runs on a mount of `cache`, page cache
        dropped (`cache` empty: a cold read; reused: a disk-cache read)."""
        assert self.profiler is not None
        m = self.mnts.mlregfs(self.url, cache, self.cfg.mount_opts)
        with self.mnts.mounted(m):
            os.stat(self.mnt_file(m, "seq"))
            drop_caches()
            with self.profiler.record(label, m.pid):
                action(m)

    # -- 1, 4, 6: cold sequential, warm re-read, disk-cache re-read -----------------------------
    def w_sequential(self) -> None:
        size = self.cfg.seq_size
        url = self.obj["seq"]
        to = io_timeout(size)
        runs: list[dict[str, Any]] = []
        for r in range(self.cfg.runs):
            log(f"1/4/6 sequential, run {r + 1}/{self.cfg.runs}")
            d: dict[str, Any] = {}
            drop_caches()
            d["curl_s"] = timed(["curl", "-sSf", "-o", "/dev/null", url], timeout=to)
            drop_caches()
            d["curl_sha_s"], (d["sha256"],) = curl_sha256([url], to)
            m, cache = self.fresh_mount()
            with self.mnts.mounted(m):
                f = self.mnt_file(m, "seq")
                os.stat(f)
                drop_caches()
                cpu0 = proc_cpu(m.pid)
                d["dd_s"] = dd(f, to)
                d["cpu_gib"] = cpu_per_gib(proc_cpu(m.pid) - cpu0, size)
                cpu0 = proc_cpu(m.pid)
                d["warm_dd_s"] = dd(f, to)
                d["warm_cpu_gib"] = cpu_per_gib(proc_cpu(m.pid) - cpu0, size)
                d["rss_hwm"] = self.note_hwm("1 cold seq + 4 warm", m)
            # 6: remount on the same cache; reference: the source file on local disk (ext4)
            drop_caches()
            d["local_dd_s"] = dd(self.files["seq"], to)
            m2 = self.mnts.mlregfs(self.url, cache, self.cfg.mount_opts)
            with self.mnts.mounted(m2):
                f = self.mnt_file(m2, "seq")
                os.stat(f)  # lookups are not what 6 measures
                drop_caches()
                mark = self.ng.log_mark()
                cpu0 = proc_cpu(m2.pid)
                d["diskcache_dd_s"] = dd(f, to)
                d["diskcache_cpu_gib"] = cpu_per_gib(proc_cpu(m2.pid) - cpu0, size)
                d["diskcache_http_bytes"] = self.ng.served_since(mark)[1]
                self.note_hwm("6 disk cache", m2)
            shutil.rmtree(cache)
            # 4 reference: the same file on tmpfs, second read
            shm = self.files["seq_shm"]
            dd(shm, to)
            d["tmpfs_dd_s"] = dd(shm, to)
            for k in list(d):
                if k.endswith("_s"):
                    d[k.removesuffix("_s") + "_MBps"] = round(mbps(size, d[k]), 1)
            runs.append(d)
            log(
                "   curl {curl_MBps} curl|sha256 {curl_sha_MBps} dd {dd_MBps} ({cpu_gib:.2f} "
                "CPU-s/GiB) warm {warm_dd_MBps} tmpfs {tmpfs_dd_MBps} diskcache "
                "{diskcache_dd_MBps} local disk {local_dd_MBps} MB/s".format(**d)
            )
        self.raw["sequential"] = {"size": size, "runs": runs}
        if self.profiler and self.profiler.enabled:
            cache = self.mnts.new_dir("cache")
            seq = self.mnt_file
            self.profile_read("cold-seq-read", cache, lambda m: dd(seq(m, "seq"), to))
            # the same cache_dir again: the re-read comes from the disk cache
            self.profile_read("diskcache-re-read", cache, lambda m: dd(seq(m, "seq"), to))
            shutil.rmtree(cache)

        def ratio(a: str, b: str) -> float:
            return med([x[a] / x[b] for x in runs])

        def fig(k: str) -> str:
            return f"{med([x[k] for x in runs]):.0f} MB/s"

        def cpu(k: str) -> str:
            return f"{med([x[k] for x in runs]):.2f} s/GiB"

        self.rows += [
            Row("1", "cold seq read (dd bs=1M) vs curl | sha256", fig("dd_MBps"),
                "curl|openssl " + fig("curl_sha_MBps"), ratio("dd_MBps", "curl_sha_MBps"), "",
                ">=", 0.8, cpu=cpu("cpu_gib")),
            Row("1", "cold seq read (dd bs=1M) vs curl -o /dev/null", fig("dd_MBps"),
                "curl " + fig("curl_MBps"), ratio("dd_MBps", "curl_MBps"), "", "", None,
                cpu=cpu("cpu_gib")),
            Row("4", "warm re-read (page cache) vs tmpfs", fig("warm_dd_MBps"),
                "tmpfs " + fig("tmpfs_dd_MBps"), ratio("warm_dd_MBps", "tmpfs_dd_MBps"), "",
                ">=", 0.8, cpu=cpu("warm_cpu_gib")),
            Row("6", "disk-cache re-read after remount vs local disk", fig("diskcache_dd_MBps"),
                "ext4 " + fig("local_dd_MBps"), ratio("diskcache_dd_MBps", "local_dd_MBps"), "",
                "", None, cpu=cpu("diskcache_cpu_gib")),
        ]  # fmt: skip

    # -- 2: loaders: mmap random-page touch, safetensors --------------------------------------
    def w_loaders(self) -> None:
        for key, label in (("seq", "mmap"), ("st", "safetensors")):
            if key not in self.files:
                continue
            size = self.files[key].stat().st_size
            to = io_timeout(size)
            runs = []
            for r in range(self.cfg.runs):
                log(f"2 {label} cold load, run {r + 1}/{self.cfg.runs}")
                seed = SEED + r

                def load(p: Path, label: str = label, to: float = to, seed: int = seed) -> Any:
                    """(seconds, a check that is equal for equal bytes)"""
                    if label == "mmap":
                        t, _, total = mmap_touch(p, to, seed=seed)
                        return t, total
                    return load_safetensors(p, to, seed=seed)

                d: dict[str, Any] = {}
                dst = self.dl / self.files[key].name
                drop_caches()
                # reference: download to local disk (ext4), then the same load from there
                d["curl_s"] = timed(["curl", "-sSf", "-o", str(dst), self.obj[key]], timeout=to)
                d["local_load_s"], check = load(dst)
                dst.unlink()
                d["ref_s"] = d["curl_s"] + d["local_load_s"]
                m, cache = self.fresh_mount()
                with self.mnts.mounted(m):
                    f = self.mnt_file(m, key)
                    os.stat(f)
                    drop_caches()
                    cpu0 = proc_cpu(m.pid)
                    d["load_s"], check2 = load(f)
                    d["cpu_gib"] = cpu_per_gib(proc_cpu(m.pid) - cpu0, size)
                    d["rss_hwm"] = self.note_hwm(f"2 {label}", m)
                shutil.rmtree(cache)
                if check != check2:
                    raise RuntimeError(f"{label}: different bytes read ({check} vs {check2})")
                d["ratio"] = d["load_s"] / d["ref_s"]
                log(
                    "   mlregfs {load_s:.2f} s ({cpu_gib:.2f} CPU-s/GiB); curl {curl_s:.2f} s "
                    "+ load {local_load_s:.2f} s".format(**d)
                )
                runs.append(d)
            self.raw[label] = {"size": size, "runs": runs}
            what = (
                "mmap, every 4K page in random order"
                if label == "mmap"
                else "safetensors safe_open(np), tensors in random order"
            )
            self.rows.append(
                Row("2", f"cold load: {what}", f"{med([x['load_s'] for x in runs]):.2f} s",
                    f"curl to ext4 + load {med([x['ref_s'] for x in runs]):.2f} s",
                    med([x["ratio"] for x in runs]), "", "<=", 2.0,
                    cpu=f"{med([x['cpu_gib'] for x in runs]):.2f} s/GiB")
            )  # fmt: skip
        if self.profiler and self.profiler.enabled and "st" in self.files:
            cache = self.mnts.new_dir("cache")
            self.profile_read(
                "safetensors-load",
                cache,
                lambda m: load_safetensors(self.mnt_file(m, "st"), io_timeout(self.cfg.st_size)),
            )
            shutil.rmtree(cache)

    # -- 3: random 4 KiB preads -------------------------------------------------------------
    def offsets(self, size: int, run_no: int) -> list[int]:
        """Random 4 KiB-aligned offsets, each in a 16 MiB region no earlier one touched.

        So every pread is a cold read for any block size up to 16 MiB (mlregfs: 8 MiB), and
        p50/p99 measure the cold-read latency rather than a hit ratio. Same offsets for the
        peers and the Range references.
        """
        rng = np.random.default_rng(SEED + 100 + run_no)
        region = 16 * MiB
        n = min(self.cfg.randoms, size // region)
        slots = rng.choice(size // region, n, replace=False)
        return [int(s) * region + int(rng.integers(region // 4096)) * 4096 for s in slots]

    def w_random(self) -> None:
        size = self.cfg.seq_size
        url = self.obj["seq"]
        path = urllib.parse.urlsplit(url).path
        runs = []
        for r in range(self.cfg.runs):
            log(f"3 random 4 KiB preads, run {r + 1}/{self.cfg.runs}")
            offs = self.offsets(size, r)
            drop_caches()
            curl = curl_range_latencies(url, offs)
            drop_caches()
            sock = socket_range_latencies("127.0.0.1", self.ng.port, path, offs)
            m, cache = self.fresh_mount()
            with self.mnts.mounted(m):
                f = self.mnt_file(m, "seq")
                os.stat(f)
                drop_caches()
                mark = self.ng.log_mark()
                cpu0 = proc_cpu(m.pid)
                lat = rand_preads(f, offs)
                cpu = proc_cpu(m.pid) - cpu0
                reqs, nbytes = self.ng.served_since(mark)
                self.note_hwm("3 random", m)
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
        self.raw["random"] = {"size": size, "runs": runs}
        if self.profiler and self.profiler.enabled:
            cache = self.mnts.new_dir("cache")
            offsets = self.offsets(size, 99)
            self.profile_read(
                "random-4k", cache, lambda m: rand_preads(self.mnt_file(m, "seq"), offsets)
            )
            shutil.rmtree(cache)

        def fig(k: str) -> str:
            return f"{med([x[k] for x in runs]):.2f} ms"

        cpu_fig = f"{med([x['cpu_ms_per_read'] for x in runs]):.2f} ms/read"
        self.rows += [
            Row("3", "random 4K pread p50 vs one Range request", fig("p50_ms"),
                f"Range {fig('ref_p50_ms')} (curl {fig('curl_p50_ms')}, "
                f"socket {fig('socket_p50_ms')})",
                med([x["p50_ms"] / x["ref_p50_ms"] for x in runs]), "", "<=", 2.0, cpu=cpu_fig),
            Row("3", "random 4K pread p99 vs Range p99", fig("p99_ms"),
                "Range " + fig("ref_p99_ms"), med([x["p99_ms"] / x["ref_p99_ms"] for x in runs]),
                "", "", None),
        ]  # fmt: skip

    # -- 5: shards at once --------------------------------------------------------------------
    def w_shards(self) -> None:
        keys = [f"shard{i}" for i in range(SHARDS)]
        total = sum(self.files[k].stat().st_size for k in keys)
        to = io_timeout(total)
        runs = []
        for r in range(self.cfg.runs):
            log(f"5 {SHARDS} shards at once, run {r + 1}/{self.cfg.runs}")
            d: dict[str, Any] = {}
            drop_caches()
            d["curl_sha_s"], _ = curl_sha256([self.obj[k] for k in keys], to)
            m, cache = self.fresh_mount()
            with self.mnts.mounted(m):
                fs = [self.mnt_file(m, k) for k in keys]
                for f in fs:
                    os.stat(f)
                drop_caches()
                script = "".join(f"dd if='{f}' of=/dev/null bs=1M status=none &\n" for f in fs)
                script += "fail=0; for j in $(jobs -p); do wait $j || fail=1; done; exit $fail\n"
                cpu0 = proc_cpu(m.pid)
                d["dd_s"] = timed(["bash", "-c", script], timeout=to)
                d["cpu_gib"] = cpu_per_gib(proc_cpu(m.pid) - cpu0, total)
                d["rss_hwm"] = self.note_hwm("5 shards", m)
            shutil.rmtree(cache)
            d["dd_MBps"], d["curl_sha_MBps"] = mbps(total, d["dd_s"]), mbps(total, d["curl_sha_s"])
            log(
                "   mlregfs {dd_MBps:.0f} MB/s ({cpu_gib:.2f} CPU-s/GiB); "
                "4 x curl|sha256 {curl_sha_MBps:.0f} MB/s".format(**d)
            )
            runs.append(d)
        self.raw["shards"] = {"size": total, "runs": runs}
        self.rows.append(
            Row("5", f"{SHARDS} shards read at once (4 dd) vs 4 x curl | sha256",
                f"{med([x['dd_MBps'] for x in runs]):.0f} MB/s",
                f"curl|openssl {med([x['curl_sha_MBps'] for x in runs]):.0f} MB/s",
                med([x["dd_MBps"] / x["curl_sha_MBps"] for x in runs]), "", ">=", 0.8,
                cpu=f"{med([x['cpu_gib'] for x in runs]):.2f} s/GiB")
        )  # fmt: skip

    # -- 8: ls -lR ------------------------------------------------------------------------------
    def w_listing(self) -> None:
        cfg = self.cfg
        st = self.srv.store
        log(f"8 seeding {cfg.models} models x {cfg.versions} versions x {cfg.files} files")
        t0 = time.perf_counter()
        st.create_project(TREE_PROJECT, "public")
        for i in range(cfg.models):
            name = f"model-{i:04d}"
            st.create_model(TREE_PROJECT, name)
            for v in range(cfg.versions):
                vid = st.create_version(TREE_PROJECT, name, f"1.{v}.0")
                for k in range(cfg.files):
                    st.add_file(TREE_PROJECT, vid, f"file-{k}.json", f"{name} {v} {k}\n".encode())
        log(f"   seeded in {time.perf_counter() - t0:.0f} s")
        url = f"{self.srv.url}/{TREE_PROJECT}"
        units = cfg.models + cfg.models * cfg.versions
        replay = self.listing_replay(cfg.models * cfg.versions)
        runs = []
        for r in range(cfg.runs):
            log(f"8 ls -lR, run {r + 1}/{cfg.runs}")
            cache = self.mnts.new_dir("cache")
            m = self.mnts.mlregfs(url, cache, cfg.mount_opts)
            with self.mnts.mounted(m):
                d: dict[str, Any] = {}
                drop_caches()
                for phase in ("cold", "warm"):
                    self.srv.reset_stats()
                    t0 = time.perf_counter()
                    out = run(["ls", "-lR", str(m.path / "models")], timeout=900).stdout
                    d[f"{phase}_s"] = time.perf_counter() - t0
                    s = self.srv.stats()
                    d[f"{phase}_requests"] = s["requests"]
                    d[f"{phase}_by_route"] = s["by_route"]
                    d[f"{phase}_entries"] = sum(1 for x in out.splitlines() if x.startswith("-"))
                self.note_hwm("8 listing", m)
            shutil.rmtree(cache)
            expected = cfg.models * cfg.versions * cfg.files
            if d["cold_entries"] != expected:
                raise RuntimeError(f"ls -lR saw {d['cold_entries']} files, expected {expected}")
            d["cold_requests_per_unit"] = d["cold_requests"] / units
            # the reference: the same kinds and number of requests, back to back, one curl
            # process with keep-alive (what the listing costs at the server's own speed)
            self.srv.reset_stats()
            d["curl_s"] = timed(["curl", "-sS", "--fail-early", "-K", str(replay)], timeout=900)
            d["curl_requests"] = self.srv.stats()["requests"]
            d["cold_vs_curl"] = d["cold_s"] / d["curl_s"]
            log(
                "   cold {cold_s:.2f} s {cold_requests} req; warm {warm_s:.2f} s "
                "{warm_requests} req; curl {curl_requests} req back to back {curl_s:.2f} s".format(
                    **d
                )
            )
            runs.append(d)
        self.raw["listing"] = {
            "models": cfg.models,
            "versions": cfg.models * cfg.versions,
            "files": cfg.models * cfg.versions * cfg.files,
            "runs": runs,
        }
        tree = f"{cfg.models}x{cfg.versions}x{cfg.files}"
        self.rows += [
            Row("8", f"ls -lR {tree} cold: HTTP req per model+version",
                f"{med([x['cold_s'] for x in runs]):.2f} s, "
                f"{med([x['cold_requests'] for x in runs]):.0f} req",
                f"{units} models+versions", med([x["cold_requests_per_unit"] for x in runs]), "",
                "<=", 2.0, unit="req"),
            Row("8", f"ls -lR {tree} cold: time vs its requests back to back (curl -K)",
                f"{med([x['cold_s'] for x in runs]):.2f} s",
                f"curl {med([x['curl_s'] for x in runs]):.2f} s, "
                f"{med([x['curl_requests'] for x in runs]):.0f} req",
                med([x["cold_vs_curl"] for x in runs]), "", "<=", 2.0),
            Row("8", f"ls -lR {tree} warm: HTTP requests",
                f"{med([x['warm_s'] for x in runs]):.2f} s, "
                f"{med([x['warm_requests'] for x in runs]):.0f} req",
                "—", med([x["warm_requests"] for x in runs]), "", "<=", 0, unit="req"),
        ]  # fmt: skip

    def listing_replay(self, versions: int) -> Path:
        """A curl config with the requests a cold `ls -lR` of the tree sends: the model
        listing, every page of the package listing, and each package's files."""
        st = self.srv.store
        project = st.project(TREE_PROJECT)
        assert project is not None
        api = f"{self.srv.url}/api/v4/projects/{project['id']}"
        pkgs = st.all("SELECT id FROM packages WHERE project_id=? ORDER BY id", (project["id"],))
        urls = [f"{api}/ml/mlflow/api/2.0/mlflow/registered-models/search?max_results=1000"]
        urls += [
            f"{api}/packages?package_type=ml_model&per_page=100&page={n + 1}"
            for n in range(-(-len(pkgs) // 100))
        ]
        urls += [
            f"{api}/packages/{p['id']}/package_files?per_page=100&order_by=id&sort=asc"
            for p in pkgs[:versions]
        ]
        path = self.mnts.new_dir("replay") / "listing.curl"
        path.write_text("".join(f'url = "{u}"\noutput = /dev/null\n' for u in urls))
        return path

    # -- 7: upload -------------------------------------------------------------------------------
    def upload_curl(self, src: Path, name: str, timeout: float) -> float:
        t0 = time.perf_counter()
        p = run(
            ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-T", str(src),
             "-H", f"Authorization: Bearer {self.token}", self.api_url("upl", name)],
            timeout=timeout,
        )  # fmt: skip
        took = time.perf_counter() - t0
        if p.stdout.strip() != "201":
            raise RuntimeError(f"curl upload answered {p.stdout.strip()}")
        return took

    def w_upload(self) -> None:
        src = self.files["seq_shm"]
        size = src.stat().st_size
        to = io_timeout(size)
        runs = []
        for r in range(self.cfg.runs):
            log(f"7 upload, run {r + 1}/{self.cfg.runs}")
            d: dict[str, Any] = {}
            d["curl_s"] = self.upload_curl(src, f"curl-{r}.bin", to)
            m, cache = self.fresh_mount()
            with self.mnts.mounted(m):
                dst = m.path / "models" / "upl" / "1.0.0" / f"cp-{r}.bin"
                os.stat(dst.parent)
                cpu0 = proc_cpu(m.pid)
                d["cp_s"] = timed(["cp", str(src), str(dst)], timeout=to)
                d["cpu_gib"] = cpu_per_gib(proc_cpu(m.pid) - cpu0, size)
                d["rss_hwm"] = self.note_hwm("7 upload", m)
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
        self.raw["upload"] = {"size": size, "runs": runs}
        if self.profiler and self.profiler.enabled:
            m, cache = self.fresh_mount()
            with self.mnts.mounted(m):
                dst = m.path / "models" / "upl" / "1.0.0" / "cp-profile.bin"
                os.stat(dst.parent)
                with self.profiler.record("upload-cp", m.pid):
                    run(["cp", str(src), str(dst)], timeout=to)
            shutil.rmtree(cache)
        self.rows.append(
            Row("7", "upload: cp into a version vs curl -T",
                f"{med([x['cp_MBps'] for x in runs]):.0f} MB/s",
                f"curl {med([x['curl_MBps'] for x in runs]):.0f} MB/s",
                med([x["cp_MBps"] / x["curl_MBps"] for x in runs]), "", ">=", 0.7,
                cpu=f"{med([x['cpu_gib'] for x in runs]):.2f} s/GiB")
        )  # fmt: skip
        unchanged = all(x["rerun_unchanged"] for x in runs)
        self.rows += [
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

    # -- 9: RSS ------------------------------------------------------------------------------
    def w_rss(self) -> None:
        """Peak RSS over every workload above, and during READERS concurrent readers of one
        cold file (each starts at its own offset and wraps around, so reads are spread)."""
        size = self.cfg.seq_size
        to = io_timeout(size * 2)
        runs = []
        for r in range(self.cfg.runs):
            log(f"9 daemon peak RSS, {READERS} concurrent readers, run {r + 1}/{self.cfg.runs}")
            d: dict[str, Any] = {}
            m, cache = self.fresh_mount()
            with self.mnts.mounted(m):
                f = self.mnt_file(m, "seq")
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
                d["readers_hwm"] = self.note_hwm(f"9 {READERS} readers", m)
            shutil.rmtree(cache)
            log(
                "   VmHWM {:.0f} MiB, {:.1f} s ({:.2f} CPU-s/GiB)".format(
                    d["readers_hwm"] / MiB, d["readers_s"], d["cpu_gib"]
                )
            )
            runs.append(d)
        self.raw["rss"] = {"size": size, "runs": runs, "hwm_by_workload": dict(self.hwm)}
        peak_label, peak = max(self.hwm.items(), key=lambda kv: kv[1])
        self.rows += [
            Row("9", f"daemon peak RSS (VmHWM), {READERS} concurrent readers",
                f"{max(x['readers_hwm'] for x in runs) / MiB:.0f} MiB", "max of runs",
                max(x["readers_hwm"] for x in runs) / MiB, "", "<=", 300, unit="MiB",
                cpu=f"{med([x['cpu_gib'] for x in runs]):.2f} s/GiB"),
            Row("9", "daemon peak RSS (VmHWM) over all workloads", f"{peak / MiB:.0f} MiB",
                f"max in: {peak_label}", peak / MiB, "", "<=", 300, unit="MiB"),
        ]  # fmt: skip

    # -- 10: peers -------------------------------------------------------------------------------
    def peer_mount(self, kind: str) -> Mount:
        """A cold peer mount: fresh cache directory, fresh process."""
        mnt = self.mnts.new_dir("mnt")
        cache = self.mnts.new_dir("cache")
        url = self.ng.url + "/www/"
        if kind == "rclone":
            conf = self.work / "rclone.conf"
            conf.touch()
            argv = ["rclone", "mount", ":http:", str(mnt), "--http-url", url,
                    "--read-only", "--vfs-cache-mode", "off", "--config", str(conf),
                    "--cache-dir", str(cache)]  # fmt: skip
        else:
            # --cache: its 8 MiB-segment disk cache (without it, every 128 KiB kernel read is
            # one blocking ~100 ms transfer: ~1.3 MB/s). --no-range-check: Debian's 1.2.5
            # exits ("does not support HTTP range requests") on nginx's 206 answers.
            argv = ["httpdirfs", "-f", "--cache", "--cache-location", str(cache),
                    "--no-range-check", url, str(mnt)]  # fmt: skip
        m = self.mnts.peer(kind, argv, mnt)
        m.cache = cache
        return m

    def w_peers(self) -> None:
        size = self.cfg.seq_size
        budget = 30.0 if self.cfg.quick else 120.0  # a slow peer reads only part of the file
        ml_seq = [x["dd_MBps"] for x in self.raw.get("sequential", {}).get("runs", [])]
        ml_p50 = [x["p50_ms"] for x in self.raw.get("random", {}).get("runs", [])]
        self.raw["peers"] = {}
        for kind in ("rclone", "httpdirfs"):
            runs: list[dict[str, Any]] = []
            if not shutil.which(kind):
                self.errors[kind] = f"{kind} not installed (bash bench/setup.sh)"
            try:
                for r in range(self.cfg.runs if kind not in self.errors else 0):
                    log(f"10 {kind}, run {r + 1}/{self.cfg.runs}")
                    d: dict[str, Any] = {}
                    m = self.peer_mount(kind)
                    with self.mnts.mounted(m):
                        f = m.path / "big.dat"
                        os.stat(f)
                        drop_caches()
                        d["read_bytes"], d["read_s"] = read_seq(f, budget)
                        d["rss_hwm"] = proc_status(m.pid, "VmHWM")
                    if m.cache is not None:
                        shutil.rmtree(m.cache, ignore_errors=True)
                    m = self.peer_mount(kind)
                    with self.mnts.mounted(m):
                        f = m.path / "big.dat"
                        os.stat(f)
                        drop_caches()
                        lat = rand_preads(f, self.offsets(size, r))
                    if m.cache is not None:
                        shutil.rmtree(m.cache, ignore_errors=True)
                    d["seq_MBps"] = mbps(d["read_bytes"], d["read_s"])
                    d["partial"] = d["read_bytes"] < size
                    d["p50_ms"], d["p99_ms"] = pct(lat, 50) * 1e3, pct(lat, 99) * 1e3
                    log("   seq {seq_MBps:.0f} MB/s{}; random p50 {p50_ms:.2f} ms "
                        "p99 {p99_ms:.2f} ms".format(
                            f" (first {d['read_bytes'] / MiB:.0f} MiB in {budget:.0f} s)"
                            if d["partial"] else "", **d))  # fmt: skip
                    runs.append(d)
            except Exception as e:
                self.errors[kind] = f"{type(e).__name__}: {e}"
                log(f"10 {kind} failed: {self.errors[kind]}")
            self.raw["peers"][kind] = {"runs": runs, "error": self.errors.get(kind)}
            if not runs:
                self.rows.append(Row("10", f"vs {kind}: not measured", "", "", None, "", ">=",
                                     1.0, note=self.errors.get(kind, "")))  # fmt: skip
                continue
            peer_seq, peer_p50 = (
                med([x["seq_MBps"] for x in runs]),
                med([x["p50_ms"] for x in runs]),
            )
            part = " (partial read)" if any(x["partial"] for x in runs) else ""
            self.rows += [
                Row("10", f"cold seq read vs {kind}", f"{med(ml_seq):.0f} MB/s",
                    f"{kind} {peer_seq:.0f} MB/s{part}", med(ml_seq) / peer_seq, "", ">=", 1.0),
                Row("10", f"random 4K p50 speedup vs {kind}", f"{med(ml_p50):.2f} ms",
                    f"{kind} {peer_p50:.2f} ms", peer_p50 / med(ml_p50), "", ">=", 1.0),
            ]  # fmt: skip

    # -- driver ---------------------------------------------------------------------------
    def run_all(self) -> None:
        steps: list[tuple[frozenset[int], str, Callable[[], None]]] = [
            (frozenset({1, 4, 6}), "sequential", self.w_sequential),
            (frozenset({2}), "loaders", self.w_loaders),
            (frozenset({3}), "random", self.w_random),
            (frozenset({5}), "shards", self.w_shards),
            (frozenset({7}), "upload", self.w_upload),
            (frozenset({8}), "listing", self.w_listing),
            (frozenset({9}), "rss", self.w_rss),
            (frozenset({10}), "peers", self.w_peers),
        ]
        for wids, name, fn in steps:
            if not wids & self.cfg.only:
                continue
            t0 = time.perf_counter()
            try:
                fn()
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:
                self.errors[name] = f"{type(e).__name__}: {e}"
                log(f"workload {name} failed: {e}\n{traceback.format_exc()}")
                self.daemon_log_tail()
                self.rows.append(Row(str(min(wids)), f"{name}: FAILED", "", "", None, "", ">=", 0,
                                     note=self.errors[name]))  # fmt: skip
                for mnt in list(self.mnts.active.values()):
                    self.mnts.umount(mnt)
            self.raw.setdefault("durations_s", {})[name] = round(time.perf_counter() - t0, 1)
        self.rows.sort(key=lambda r: int(r.wid))  # stable: rows of one workload keep their order

    def daemon_log_tail(self, lines: int = 25) -> None:
        """After a failure: the newest daemon log's last non-debug lines (the cache dir of a
        failed workload is left in place until the end of the run)."""
        logs = sorted(self.work.glob("cache-*/mlregfs.log"), key=lambda p: p.stat().st_mtime)
        if logs:
            text = logs[-1].read_text(errors="replace").splitlines()
            tail = [x for x in text if " DEBUG " not in x][-lines:]
            log(f"--- {logs[-1]} (tail):\n" + "\n".join(tail))

    def teardown(self) -> None:
        try:
            if self.mounts is not None:
                self.mounts.cleanup()
        finally:
            try:
                if self.server is not None:
                    self.server.stop()
                    if self.server._store is not None:
                        self.server._store.close()
            finally:
                try:
                    if self.nginx is not None:
                        self.nginx.stop()
                finally:
                    if hasattr(self, "shm"):
                        shutil.rmtree(self.shm, ignore_errors=True)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small files, smoke run")
    p.add_argument("--runs", type=int, default=3, help="runs per figure (median), default 3")
    p.add_argument("--only", help="comma-separated workload numbers (1-10)")
    p.add_argument("--no-peers", action="store_true", help="skip rclone/httpdirfs (workload 10)")
    p.add_argument("--size-mib", type=int, help="override the 1 GiB file size")
    p.add_argument("--models", type=int, help="override the number of models for ls -lR")
    p.add_argument("--mount-opts", default="", help="extra -o options for every mlregfs mount")
    p.add_argument(
        "--profile",
        action="store_true",
        help="py-spy record the daemon during one extra run of 1, 2, 3, 6, 7",
    )
    p.add_argument("--workdir", default=tempfile.gettempdir(), help="where test data goes")
    p.add_argument("--keep-workdir", action="store_true", help="do not delete the test data")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = Config.from_args(args)
    if os.geteuid() != 0:
        log("warning: not root: page cache is not dropped, 'cold' figures are not cold")
    for tool in ("curl", "openssl", "fusermount3", "dd"):
        if not shutil.which(tool):
            log(f"{tool} missing: run bash bench/setup.sh")
            return 2
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mlregfs-bench-", dir=cfg.workdir))
    bench = Bench(cfg, work, stamp)

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    t0 = time.perf_counter()
    record: dict[str, Any] = {
        "timestamp": stamp,
        "command": [Path(PY).name, *sys.argv],
        "config": {
            k: (sorted(v) if isinstance(v, frozenset) else str(v) if isinstance(v, Path) else v)
            for k, v in cfg.__dict__.items()
        },
        "machine": machine_info(),
        "git": git_info(),
        # the code the daemon and the server run (PYTHONPATH may point at another checkout)
        "mlregfs_path": str(Path(sys.modules["mlregfs"].__file__ or "").parent),
    }
    interrupted = False
    try:
        bench.setup()
        bench.run_all()
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: cleaning up")
    except Exception as e:  # setup failed: still clean up and write what we have
        bench.errors["setup"] = f"{type(e).__name__}: {e}"
        log(f"setup failed: {e}\n{traceback.format_exc()}")
    finally:
        try:
            bench.teardown()
        finally:
            if not cfg.keep:
                shutil.rmtree(work, ignore_errors=True)
            else:
                log(f"test data kept in {work}")
    record.update(
        duration_s=round(time.perf_counter() - t0, 1),
        loadavg_end=Path("/proc/loadavg").read_text().split()[:3],
        git_end=git_info(),  # others may commit while a long run goes on
        interrupted=interrupted,
        errors=bench.errors,
        rows=[{**r.__dict__, "result": r.result} for r in bench.rows],
        raw=bench.raw,
        profiles=bench.profiler.summaries if bench.profiler else {},
    )
    jpath, ppath = RESULTS / f"{stamp}.json", RESULTS / f"{stamp}.png"
    jpath.write_text(json.dumps(record, indent=1, default=str))
    mode = "quick" if cfg.quick else "full"
    title = (
        f"mlregfs {record['git']['rev'][:10]}{'+dirty' if record['git']['dirty'] else ''} "
        f"bench ({mode}, median of {cfg.runs}) {stamp}, {record['machine']['nproc']} CPU, "
        f"kernel {record['machine']['kernel']}"
    )
    if Path(record["mlregfs_path"]) != REPO / "mlregfs":
        title += f", mlregfs from {record['mlregfs_path']}"
    try:
        chart(bench.rows, ppath, title)
    except Exception as e:
        log(f"chart failed: {e}")
    print()
    print(title)
    print(table(bench.rows))
    print()
    print(table_md(bench.rows))
    for name, err in bench.errors.items():
        print(f"! {name}: {err}")
    for label, s in (bench.profiler.summaries if bench.profiler else {}).items():
        print(
            f"\nprofile {label}: {s.get('wall_s')} s wall, active thread-s "
            f"{s.get('active_thread_s')}, "
            f"{s.get('samples', 0)} samples ({s.get('file', '')}):"
        )
        for fn, p in s.get("self", [])[:10]:
            print(f"  self {p:5.1f}%  {fn}")
        for fn, p in s.get("mlregfs_inclusive", [])[:12]:
            print(f"  incl {p:5.1f}%  {fn}")
    print(f"\n{jpath}\n{ppath}\n({record['duration_s']:.0f} s)")
    return 130 if interrupted or bench.errors.get("setup") else 0


if __name__ == "__main__":
    sys.exit(main())
