"""The world of one bench run: its configuration, test data, `mlregfs serve` behind nginx, the
mounts it started, and where the workloads put their figures. Processes come from
mlregfs.testing, the harness the tests and the demo use."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.profiling import Profiler
from bench.references import Nginx
from bench.report import Row
from bench.util import (
    REPO,
    GiB,
    MiB,
    drop_caches,
    log,
    proc_status,
    write_random,
    write_safetensors,
)
from mlregfs.testing import FuseProcess, Mount, ServerProcess, free_port
from mlregfs.testing.mount import reap_daemons

RESULTS = REPO / "bench" / "results"
PROJECT = "bench/models"
SEED = 20261123
SHARDS = 4
ALL = frozenset(range(1, 11))


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


class Mounts:
    """Every FUSE mount this run started (mlregfs daemons and peers), cleaned up on the way
    out; a busy mount point is retried (20 x 0.25 s) before a lazy unmount."""

    def __init__(self, work: Path, token: str) -> None:
        self.work = work
        self.token = token
        self.active: dict[Path, FuseProcess] = {}
        self._n = 0

    def new_dir(self, prefix: str) -> Path:
        self._n += 1
        d = self.work / f"{prefix}-{self._n}"
        d.mkdir(parents=True)
        return d

    def mlregfs(self, url: str, cache_dir: Path, opts: str = "") -> Mount:
        """`mlregfs mount` as users run it: a detached daemon, its log in cache_dir."""
        mnt = self.new_dir("mnt")
        m = Mount(url, mnt, cache_dir, token=self.token, options=[opts] if opts else None,
                  daemon=True, unmount_attempts=20)  # fmt: skip
        m.start(timeout=90)
        self.active[mnt] = m
        return m

    def peer(self, kind: str, argv: list[str], mnt: Path, timeout: float = 30) -> FuseProcess:
        """A peer FUSE program in the foreground; ready once its root lists something."""
        logf = self.work / f"{kind}-{self._n}.log"
        m = FuseProcess(argv, mnt, logf, kind=kind, ready=lambda: bool(os.listdir(mnt)),
                        unmount_attempts=20)  # fmt: skip
        m.start(timeout)
        self.active[mnt] = m
        return m

    def umount(self, m: FuseProcess, wait: float = 30) -> None:
        self.active.pop(m.path, None)
        try:
            m.stop(wait)
        finally:
            with contextlib.suppress(OSError):
                m.path.rmdir()

    def cleanup(self) -> None:
        for m in list(self.active.values()):
            try:
                self.umount(m, wait=10)
            except Exception as e:  # keep going: every mount must go
                log(f"cleanup of {m.path}: {e}")
        # any daemon or mount of this run still there (one interrupted mid-mount), lazy
        # unmount as a last resort
        reap_daemons(str(self.work) + "/", grace=1.0)

    @contextlib.contextmanager
    def mounted(self, m: FuseProcess) -> Iterator[FuseProcess]:
        try:
            yield m
        finally:
            self.umount(m)


@dataclass
class Bench:
    """What the workloads share: each workload is a function of a Bench (bench/workloads)."""

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

    def mnt_file(self, m: FuseProcess, key: str) -> Path:
        model, name = self.names[key]
        return m.path / "models" / model / "1.0.0" / name

    def fresh_mount(self, opts: str = "") -> tuple[Mount, Path]:
        cache = self.mnts.new_dir("cache")
        opts = ",".join(x for x in (self.cfg.mount_opts, opts) if x)
        return self.mnts.mlregfs(self.url, cache, opts), cache

    def note_hwm(self, label: str, m: FuseProcess) -> int:
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
                    self.server.close()
            finally:
                try:
                    if self.nginx is not None:
                        self.nginx.stop()
                finally:
                    if hasattr(self, "shm"):
                        shutil.rmtree(self.shm, ignore_errors=True)
