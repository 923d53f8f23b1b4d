#!/usr/bin/env python3
"""mlregfs benchmark: one table of ratios, each against a reference measured in the same run.

    bash bench/setup.sh                         # once: rclone httpdirfs nginx-light curl, .[bench]
    sudo .venv/bin/python bench/run.py --quick  # smoke run, < 3 min
    sudo .venv/bin/python bench/run.py          # full run (1 GiB files, 4 GiB for RSS), ~20 min

Runs as root (drop_caches between cold runs). Starts `mlregfs serve` (embedded registry) and a
static nginx with the same bytes, mounts with the real CLI (`python -m mlregfs mount`), and
compares against curl, tmpfs, local disk, `rclone mount` and `httpdirfs`. Every figure is the
median of `--runs` runs; every ratio is the median of per-run ratios. Writes
bench/results/<timestamp>.json (raw numbers, machine, git rev) and <timestamp>.png.
Every mount and process it started is cleaned up on exit, failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from mlregfs.server.testing import ServerProcess

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
PY = sys.executable
MiB = 1 << 20
GiB = 1 << 30
PROJECT = "bench/models"
TREE_PROJECT = "bench/tree"
SEED = 20261123


# ----------------------------------------------------------------------------- configuration


@dataclass
class Config:
    quick: bool
    runs: int
    seq_size: int  # workloads 1-4, 7, 8
    st_size: int  # workload 5 (safetensors)
    rss_size: int  # workload 9
    models: int  # workload 6: models x versions x files
    versions: int = 3
    files: int = 5
    randoms: int = 64  # workload 4: random 4 KiB preads per run, each in its own 16 MiB region
    peers: bool = True
    only: frozenset[int] = frozenset(range(1, 10))
    profile: bool = False
    workdir: Path = Path("/tmp")
    keep: bool = False
    mount_opts: str = ""

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> Config:
        if a.quick:
            c = cls(True, a.runs, 256 * MiB, 128 * MiB, 512 * MiB, 30)
        else:
            c = cls(False, a.runs, GiB, GiB, 4 * GiB, 500)
        if a.size_mib:
            c.seq_size = c.st_size = a.size_mib * MiB
        if a.rss_size_mib:
            c.rss_size = a.rss_size_mib * MiB
        if a.models:
            c.models = a.models
        c.peers = not a.no_peers
        if a.only:
            c.only = frozenset(int(x) for x in a.only.split(","))
            if 8 in c.only:  # peer ratios use the mlregfs figures of 1 (seq) and 4 (random)
                c.only |= {1, 4}
        c.profile = a.profile
        c.workdir = Path(a.workdir)
        c.keep = a.keep_workdir
        c.mount_opts = a.mount_opts
        return c


# ----------------------------------------------------------------------------- small helpers


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(
    cmd: list[str] | str, *, timeout: float = 600, check: bool = True, **kw: Any
) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(
        cmd,
        shell=isinstance(cmd, str),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )
    if check and p.returncode != 0:
        raise RuntimeError(f"{cmd!r} exited {p.returncode}: {p.stderr.strip()[-800:]}")
    return p


def timed(cmd: list[str] | str, *, timeout: float = 600, **kw: Any) -> float:
    t0 = time.perf_counter()
    run(cmd, timeout=timeout, **kw)
    return time.perf_counter() - t0


def dd(path: Path | str, timeout: float) -> float:
    """Seconds for `dd if=path of=/dev/null bs=1M`."""
    return timed(["dd", f"if={path}", "of=/dev/null", "bs=1M", "status=none"], timeout=timeout)


def drop_caches() -> None:
    os.sync()
    if os.geteuid() == 0:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def mbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6 if seconds > 0 else float("inf")


def med(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


def io_timeout(nbytes: int) -> float:
    """A generous bound for moving nbytes through anything here (>= 10 MB/s)."""
    return 120 + nbytes / 10e6


def write_random(path: Path, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 64 * MiB)
            f.write(rng.bytes(n))
            left -= n


def write_safetensors(path: Path, size: int, seed: int) -> int:
    """A valid .safetensors file of float32 tensors, about `size` bytes; returns tensor count.

    Written directly in the format (8-byte header length, JSON header, raw data), streaming,
    so a 4 GiB file never has to sit in memory.
    """
    tensor = 64 * MiB if size >= GiB else max(MiB, size // 8)
    count = max(1, size // tensor)
    rows = tensor // 4 // 1024
    header: dict[str, Any] = {"__metadata__": {"format": "np", "generator": "mlregfs-bench"}}
    for i in range(count):
        header[f"layer.{i:03d}.weight"] = {
            "dtype": "F32",
            "shape": [rows, 1024],
            "data_offsets": [i * tensor, (i + 1) * tensor],
        }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for _ in range(count):
            f.write(rng.bytes(tensor))
    return count


SAFETENSORS_LOADER = r"""
import sys, time
from safetensors import safe_open
t0 = time.perf_counter()
n = 0
with safe_open(sys.argv[1], framework="np") as f:
    for k in f.keys():
        n += f.get_tensor(k).nbytes
print(time.perf_counter() - t0, n)
"""


def load_safetensors(path: Path, timeout: float) -> tuple[float, int]:
    """Load every tensor (safe_open, numpy) in a fresh process; (seconds, tensor bytes)."""
    out = run([PY, "-c", SAFETENSORS_LOADER, str(path)], timeout=timeout).stdout.split()
    return float(out[0]), int(out[1])


def read_seq(path: Path, budget: float, bs: int = MiB) -> tuple[int, float]:
    """read(2) of `bs` bytes until EOF or `budget` seconds (as dd bs=1M); (bytes, seconds)."""
    buf = bytearray(bs)
    n = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        while (k := os.readv(fd, [buf])) > 0:
            n += k
            if time.perf_counter() - t0 > budget:
                break
        return n, time.perf_counter() - t0
    finally:
        os.close(fd)


def rand_preads(path: Path, offsets: list[int], size: int = 4096) -> list[float]:
    """Latency (s) of each 4 KiB pread, in order, on one open file descriptor."""
    lat = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for off in offsets:
            t0 = time.perf_counter()
            got = os.pread(fd, size, off)
            lat.append(time.perf_counter() - t0)
            if len(got) != size:
                raise RuntimeError(f"short pread at {off}: {len(got)}")
    finally:
        os.close(fd)
    return lat


def curl_range_latencies(url: str, offsets: list[int], size: int = 4096) -> list[float]:
    """curl's time_total for one Range request per offset (a new connection each)."""
    lat = []
    for off in offsets:
        out = run(
            ["curl", "-sSf", "-o", "/dev/null", "-r", f"{off}-{off + size - 1}", "-w",
             "%{http_code} %{size_download} %{time_total}", url],
            timeout=60,
        ).stdout.split()  # fmt: skip
        if out[:2] != ["206", str(size)]:
            raise RuntimeError(f"Range request: {out}")
        lat.append(float(out[2]))
    return lat


def range_latencies(url: str, offsets: list[int], size: int = 4096) -> list[float]:
    """Latency of one HTTP Range request per offset, on one httpx keep-alive connection."""
    lat = []
    with httpx.Client(timeout=30) as c:
        c.get(url, headers={"Range": "bytes=0-0"}).raise_for_status()  # connect
        for off in offsets:
            t0 = time.perf_counter()
            r = c.get(url, headers={"Range": f"bytes={off}-{off + size - 1}"})
            lat.append(time.perf_counter() - t0)
            if r.status_code != 206 or len(r.content) != size:
                raise RuntimeError(f"Range request: {r.status_code}, {len(r.content)} bytes")
    return lat


def proc_status(pid: int, key: str) -> int:
    """A kB field of /proc/<pid>/status, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def proc_cpu(pid: int) -> float:
    """utime + stime of a process, seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f)


def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie child of ours counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# ----------------------------------------------------------------------------- mounts


@dataclass
class Mount:
    kind: str  # mlregfs | rclone | httpdirfs
    path: Path
    pid: int
    proc: subprocess.Popen[bytes] | None = None  # when we hold the process (peers)
    log: Path | None = None
    cache: Path | None = None


class Mounts:
    """Every FUSE mount and helper process this run started, cleaned up on the way out."""

    def __init__(self, work: Path, token: str) -> None:
        self.work = work
        self.token = token
        self.active: dict[Path, Mount] = {}
        self.procs: list[subprocess.Popen[bytes]] = []
        self._n = 0

    def new_dir(self, prefix: str) -> Path:
        self._n += 1
        d = self.work / f"{prefix}-{self._n}"
        d.mkdir(parents=True)
        return d

    # -- mlregfs
    def mlregfs(self, url: str, cache_dir: Path, opts: str = "") -> Mount:
        mnt = self.new_dir("mnt")
        o = f"cache_dir={cache_dir}" + (f",{opts}" if opts else "")
        env = dict(os.environ, GITLAB_TOKEN=self.token)
        try:
            run([PY, "-m", "mlregfs", "mount", url, str(mnt), "-o", o], timeout=90, env=env)
        except BaseException as e:
            # the daemon may still be coming up (interrupted mid-mount): end it too
            self._reap_daemons(str(mnt), grace=3.0)
            logf = cache_dir / "mlregfs.log"
            if logf.exists() and isinstance(e, RuntimeError):
                tail = "\n".join(logf.read_text(errors="replace").splitlines()[-15:])
                raise RuntimeError(f"{e}\n--- {logf} (tail):\n{tail}") from None
            raise
        pid = self._find_daemon(mnt)
        m = Mount("mlregfs", mnt, pid, log=cache_dir / "mlregfs.log")
        self.active[mnt] = m
        return m

    def _reap_daemons(self, needle: str, grace: float = 0.0) -> None:
        """Unmount and end every mlregfs daemon of ours whose argv mentions `needle` (a path
        under this run's unique work dir), including one still coming up."""
        deadline = time.monotonic() + grace
        while True:
            pids = self._daemon_pids(needle)
            for mp in self._mounts_under(needle):
                self._fusermount(Path(mp))
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)  # SIGTERM unmounts cleanly
            if time.monotonic() >= deadline and not pids:
                break
            if time.monotonic() >= deadline + 10:
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.2)
        for mp in self._mounts_under(needle):
            run(["fusermount3", "-uz", mp], check=False, timeout=30)

    @staticmethod
    def _mounts_under(prefix: str) -> list[str]:
        with open("/proc/self/mounts") as f:
            return [x.split()[1] for x in f if x.split()[1].startswith(prefix)]

    @staticmethod
    def _daemon_pids(needle: str) -> list[int]:
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"mlregfs" in argv and b"mount" in argv and any(needle.encode() in a for a in argv):
                if pid_alive(int(d.name)):
                    pids.append(int(d.name))
        return pids

    @staticmethod
    def _find_daemon(mnt: Path) -> int:
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"mlregfs" in argv and b"mount" in argv and str(mnt).encode() in argv:
                return int(d.name)
        raise RuntimeError(f"no mlregfs daemon found for {mnt}")

    # -- peers
    def peer(self, kind: str, argv: list[str], mnt: Path, timeout: float = 30) -> Mount:
        logf = self.work / f"{kind}-{self._n}.log"
        with open(logf, "wb") as lf:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=lf, stderr=subprocess.STDOUT
            )
        self.procs.append(proc)
        m = Mount(kind, mnt, proc.pid, proc=proc, log=logf)
        self.active[mnt] = m
        try:
            wait_for(
                lambda: proc.poll() is not None or (is_mounted(mnt) and bool(os.listdir(mnt))),
                timeout,
                f"{kind} mount",
            )
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{kind} exited {proc.returncode}: {logf.read_text(errors='replace')[-800:]}"
                )
        except BaseException:
            self.umount(m)
            raise
        return m

    # -- teardown
    @staticmethod
    def _fusermount(mnt: Path) -> None:
        for _ in range(20):
            if not is_mounted(mnt):
                return
            if run(["fusermount3", "-u", str(mnt)], check=False, timeout=30).returncode == 0:
                return
            time.sleep(0.25)
        run(["fusermount3", "-uz", str(mnt)], check=False, timeout=30)

    def umount(self, m: Mount, wait: float = 30) -> None:
        self.active.pop(m.path, None)
        try:
            self._fusermount(m.path)
        finally:
            deadline = time.monotonic() + wait
            while pid_alive(m.pid) and time.monotonic() < deadline:
                if m.proc is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        m.proc.wait(0.1)
                else:
                    time.sleep(0.05)
            if pid_alive(m.pid):
                log(f"{m.kind} pid {m.pid} still alive after unmount: SIGTERM")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(m.pid, signal.SIGTERM)
                time.sleep(2)
                if pid_alive(m.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(m.pid, signal.SIGKILL)
            if m.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    m.proc.wait(5)
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
        self._reap_daemons(str(self.work) + "/", grace=1.0)
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()

    @contextlib.contextmanager
    def mounted(self, m: Mount) -> Iterator[Mount]:
        try:
            yield m
        finally:
            self.umount(m)


# ----------------------------------------------------------------------------- profiling


class Profiler:
    """py-spy record (raw collapsed stacks) of one pid while a block runs."""

    def __init__(self, enabled: bool, out_dir: Path, stamp: str) -> None:
        self.enabled = enabled and shutil.which("py-spy", path=str(Path(PY).parent)) is not None
        self.exe = str(Path(PY).parent / "py-spy")
        self.out_dir = out_dir
        self.stamp = stamp
        self.summaries: dict[str, Any] = {}

    @contextlib.contextmanager
    def record(self, label: str, pid: int) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        out = self.out_dir / f"{self.stamp}-profile-{label}.txt"
        p = subprocess.Popen(
            [
                self.exe,
                "record",
                "--pid",
                str(pid),
                "--rate",
                "250",
                "--format",
                "raw",
                "--nonblocking",
                "-o",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # let it attach
        t0 = time.perf_counter()
        try:
            yield
        finally:
            wall = time.perf_counter() - t0
            p.send_signal(signal.SIGINT)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if out.exists():
                self.summaries[label] = summarize_profile(out, rate=250)
                self.summaries[label]["file"] = str(out)
                self.summaries[label]["wall_s"] = round(wall, 2)


def summarize_profile(path: Path, rate: int, top: int = 12) -> dict[str, Any]:
    """Active samples: self % per leaf function, inclusive % per mlregfs function, and active
    thread-seconds of the trio (FUSE) thread vs the worker threads (py-spy counts a thread
    blocked in file or socket I/O as active, so these can exceed wall x CPUs).

    py-spy's raw format is one collapsed stack per line: `frame;frame;... count`, each frame
    `function (path:line)`; without --idle only running threads are sampled.
    """
    leaf: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0

    def name(frame: str) -> str:
        fn, _, loc = frame.partition(" (")
        file = loc.rsplit(":", 1)[0]
        if "/mlregfs/" in file or file.startswith("mlregfs/"):
            file = "mlregfs/" + file.split("mlregfs/", 1)[-1]
        else:
            file = file.rsplit("/", 1)[-1]
        return f"{fn} ({file})"

    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit() or not stack:
            continue
        k = int(n)
        total += k
        frames = [name(f) for f in stack.split(";") if " (" in f]
        threads["trio" if "unrolled_run (trio" in stack else "workers"] += k
        if frames:
            leaf[frames[-1]] += k
        for f in set(frames):
            if "(mlregfs/" in f:
                incl[f] += k
    if not total:
        return {"samples": 0}

    def as_pct(c: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(n, round(100 * v / total, 1)) for n, v in c.most_common(top)]

    return {
        "samples": total,
        "active_thread_s": {t: round(v / rate, 2) for t, v in threads.items()},
        "self": as_pct(leaf),
        "mlregfs_inclusive": as_pct(incl),
    }


# ----------------------------------------------------------------------------- the bench


@dataclass
class Row:
    wid: str
    label: str
    value: str  # mlregfs figure
    ref: str  # reference figure
    ratio: float | None
    ratio_fmt: str
    op: str  # ">=", "<=" or ""
    target: float | None
    unit: str = "x"
    note: str = ""

    @property
    def result(self) -> str:
        if self.ratio is None or self.ratio != self.ratio:
            return "ERROR" if self.op else ""
        if not self.op or self.target is None:
            return "info"
        ok = self.ratio >= self.target if self.op == ">=" else self.ratio <= self.target
        return "PASS" if ok else "MISS"


@dataclass
class Bench:
    cfg: Config
    work: Path
    stamp: str
    server: ServerProcess | None = None
    mounts: Mounts | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    files: dict[str, Any] = field(default_factory=dict)
    nginx_url: str = ""
    profiler: Profiler | None = None

    @property
    def srv(self) -> ServerProcess:
        assert self.server is not None
        return self.server

    @property
    def mnts(self) -> Mounts:
        assert self.mounts is not None
        return self.mounts

    @property
    def srv_pid(self) -> int:
        assert self.srv.proc is not None
        return self.srv.proc.pid

    # -- setup ----------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        src = self.work / "src"
        src.mkdir()
        log(f"generating data in {self.work}")
        self.files["seq"] = src / "big.bin"
        write_random(self.files["seq"], cfg.seq_size, SEED)
        if 5 in cfg.only:
            self.files["st"] = src / "model.safetensors"
            write_safetensors(self.files["st"], cfg.st_size, SEED + 1)
        if 9 in cfg.only:
            self.files["rss"] = src / "big4.safetensors"
            write_safetensors(self.files["rss"], cfg.rss_size, SEED + 2)

        self.server = ServerProcess(self.work / "srv", download_mode="local")
        self.server.start()
        st = self.server.store
        st.create_project(PROJECT, "public")
        self.token = st.create_token(PROJECT, "maintainer")
        self.vids: dict[str, int] = {}
        for model, key, name in (
            ("seq", "seq", "big.bin"),
            ("st", "st", "model.safetensors"),
            ("rss", "rss", "big4.safetensors"),
        ):
            if key not in self.files:
                continue
            st.create_model(PROJECT, model)
            vid = st.create_version(PROJECT, model, "1.0.0")
            st.add_file(PROJECT, vid, name, self.files[key])
            self.vids[key] = vid
        st.create_model(PROJECT, "upl")
        self.vids["upl"] = st.create_version(PROJECT, "upl", "1.0.0")
        self.url = f"{self.server.url}/{PROJECT}"
        self.pid_enc = urllib.parse.quote(PROJECT, safe="")
        log(f"mlregfs serve at {self.srv.url} (pid {self.srv_pid})")
        self.mounts = Mounts(self.work, self.token)
        self.profiler = Profiler(self.cfg.profile, RESULTS, self.stamp)

        # tmpfs copy: warm-read reference and upload source
        self.shm = Path(tempfile.mkdtemp(prefix="mlregfs-bench-", dir="/dev/shm"))
        self.files["seq_shm"] = self.shm / "big.bin"
        shutil.copyfile(self.files["seq"], self.files["seq_shm"])

    def dl_url(self, key: str, name: str) -> str:
        return (
            f"{self.srv.api}/projects/{self.pid_enc}/packages/ml_models/"
            f"{self.vids[key]}/files/{name}"
        )

    def mnt_file(self, m: Mount, model: str, name: str) -> Path:
        return m.path / "models" / model / "1.0.0" / name

    def fresh_mount(self, opts: str = "") -> tuple[Mount, Path]:
        cache = self.mnts.new_dir("cache")
        opts = ",".join(x for x in (self.cfg.mount_opts, opts) if x)
        return self.mnts.mlregfs(self.url, cache, opts), cache

    def profile_read(
        self, label: str, cache: Path, subdir: str, name: str, action: Callable[[Path], object]
    ) -> None:
        """py-spy of the daemon while `action(file)` runs on a mount of `cache`, page cache
        dropped (`cache` empty: a cold read; reused: a disk-cache read)."""
        assert self.profiler is not None
        m = self.mnts.mlregfs(self.url, cache, self.cfg.mount_opts)
        with self.mnts.mounted(m):
            f = self.mnt_file(m, subdir, name)
            os.stat(f)
            drop_caches()
            with self.profiler.record(label, m.pid):
                action(f)

    # -- 1, 2, 3: sequential, warm, disk cache ---------------------------------------------
    def w_sequential(self) -> None:
        size = self.cfg.seq_size
        url = self.dl_url("seq", "big.bin")
        to = io_timeout(size)
        runs: list[dict[str, Any]] = []
        for r in range(self.cfg.runs):
            log(f"1-3 sequential, run {r + 1}/{self.cfg.runs}")
            d: dict[str, Any] = {}
            drop_caches()
            d["curl_s"] = timed(["curl", "-sSf", "-o", "/dev/null", url], timeout=to)
            # 1 (dd) + 2 (warm) on one mount; then 3 (remount on the same cache)
            m, cache = self.fresh_mount()
            with self.mnts.mounted(m):
                f = self.mnt_file(m, "seq", "big.bin")
                cpu0, srv0 = proc_cpu(m.pid), proc_cpu(self.srv_pid)
                drop_caches()
                d["dd_s"] = dd(f, to)
                d["daemon_cpu_s"] = proc_cpu(m.pid) - cpu0
                d["server_cpu_s"] = proc_cpu(self.srv_pid) - srv0
                d["rss_hwm"] = proc_status(m.pid, "VmHWM")
                d["warm_dd_s"] = dd(f, to)
            blks = list(cache.rglob("*.blk"))
            d["cache_bytes"] = sum(b.stat().st_size for b in blks)
            drop_caches()
            d["disk_cat_s"] = timed(
                f"find {cache} -name '*.blk' -print0 | xargs -0 cat >/dev/null", timeout=to
            )
            m2 = self.mnts.mlregfs(self.url, cache, self.cfg.mount_opts)
            with self.mnts.mounted(m2):
                f = self.mnt_file(m2, "seq", "big.bin")
                os.stat(f)  # lookups are not what 3 measures
                drop_caches()
                req0 = self.srv.stats()
                d["diskcache_dd_s"] = dd(f, to)
                d["diskcache_http_bytes"] = self.srv.stats()["bytes_served"] - req0["bytes_served"]
            shutil.rmtree(cache)
            # 1 (cat) on its own fresh mount and cache
            m, cache = self.fresh_mount()
            with self.mnts.mounted(m):
                f = self.mnt_file(m, "seq", "big.bin")
                drop_caches()
                d["cat_s"] = timed(f"cat '{f}' >/dev/null", timeout=to)
            shutil.rmtree(cache)
            # 2 reference: the same file on tmpfs, second read
            shm = self.files["seq_shm"]
            dd(shm, to)
            d["tmpfs_dd_s"] = dd(shm, to)
            for k in list(d):
                if k.endswith("_s") and k not in ("daemon_cpu_s", "server_cpu_s"):
                    nbytes = d["cache_bytes"] if k == "disk_cat_s" else size
                    d[k.replace("_s", "_MBps")] = round(mbps(nbytes, d[k]), 1)
            runs.append(d)
            msg = (
                "   curl {curl_MBps} dd {dd_MBps} cat {cat_MBps} warm {warm_dd_MBps} tmpfs "
                "{tmpfs_dd_MBps} diskcache {diskcache_dd_MBps} disk {disk_cat_MBps} MB/s"
            )
            log(msg.format(**d))
        self.raw["sequential"] = {"size": size, "runs": runs}
        if self.profiler and self.profiler.enabled:
            cache = self.mnts.new_dir("cache")
            self.profile_read("cold-seq-read", cache, "seq", "big.bin", lambda f: dd(f, to))
            # the same cache_dir again: the re-read comes from the disk cache
            self.profile_read("diskcache-re-read", cache, "seq", "big.bin", lambda f: dd(f, to))
            shutil.rmtree(cache)

        def ratio(a: str, b: str) -> float:
            return med([x[a] / x[b] for x in runs])

        def fig(k: str) -> str:
            return f"{med([x[k] for x in runs]):.0f} MB/s"

        self.rows += [
            Row(
                "1",
                "cold seq read, dd bs=1M vs curl",
                fig("dd_MBps"),
                "curl " + fig("curl_MBps"),
                ratio("dd_MBps", "curl_MBps"),
                "",
                ">=",
                0.8,
            ),
            Row(
                "1",
                "cold seq read, cat vs curl",
                fig("cat_MBps"),
                "curl " + fig("curl_MBps"),
                ratio("cat_MBps", "curl_MBps"),
                "",
                ">=",
                0.8,
            ),
            Row(
                "2",
                "warm re-read (page cache) vs tmpfs",
                fig("warm_dd_MBps"),
                "tmpfs " + fig("tmpfs_dd_MBps"),
                ratio("warm_dd_MBps", "tmpfs_dd_MBps"),
                "",
                ">=",
                0.5,
            ),
            Row(
                "3",
                "re-read after remount (disk cache) vs local disk",
                fig("diskcache_dd_MBps"),
                "cat blocks " + fig("disk_cat_MBps"),
                ratio("diskcache_dd_MBps", "disk_cat_MBps"),
                "",
                ">=",
                0.6,
            ),
        ]

    # -- 4: random 4 KiB preads -------------------------------------------------------------
    def offsets(self, size: int, run_no: int) -> list[int]:
        """Random 4 KiB-aligned offsets, each in a 16 MiB region no earlier one touched.

        So every pread is a cold read for any block size up to 16 MiB (mlregfs: 8 MiB), and
        p50/p99 measure the cold-read latency rather than a hit ratio. Same offsets for the
        peers and the Range reference.
        """
        rng = np.random.default_rng(SEED + 100 + run_no)
        region = 16 * MiB
        n = min(self.cfg.randoms, size // region)
        slots = rng.choice(size // region, n, replace=False)
        return [int(s) * region + int(rng.integers(region // 4096)) * 4096 for s in slots]

    def w_random(self) -> None:
        size = self.cfg.seq_size
        url = self.dl_url("seq", "big.bin")
        runs = []
        for r in range(self.cfg.runs):
            log(f"4 random 4 KiB preads, run {r + 1}/{self.cfg.runs}")
            offs = self.offsets(size, r)
            drop_caches()
            ref = curl_range_latencies(url, offs)
            drop_caches()
            ref_ka = range_latencies(url, offs)
            m, cache = self.fresh_mount()
            with self.mnts.mounted(m):
                f = self.mnt_file(m, "seq", "big.bin")
                os.stat(f)
                drop_caches()
                self.srv.reset_stats()
                lat = rand_preads(f, offs)
                stats = self.srv.stats()
            shutil.rmtree(cache)
            d = {
                "p50_ms": pct(lat, 50) * 1e3,
                "p99_ms": pct(lat, 99) * 1e3,
                "mean_ms": statistics.fmean(lat) * 1e3,
                "range_p50_ms": pct(ref, 50) * 1e3,
                "range_p99_ms": pct(ref, 99) * 1e3,
                "range_keepalive_p50_ms": pct(ref_ka, 50) * 1e3,
                "range_keepalive_p99_ms": pct(ref_ka, 99) * 1e3,
                "http_requests": stats["requests"],
                "http_bytes": stats["bytes_served"],
                "preads": len(offs),
            }
            log(
                "   p50 {p50_ms:.2f} ms p99 {p99_ms:.2f} ms; Range p50 {range_p50_ms:.2f} ms "
                "p99 {range_p99_ms:.2f} ms (keep-alive httpx p50 {range_keepalive_p50_ms:.2f} ms); "
                "{http_requests} HTTP requests".format(**d)
            )
            runs.append(d)
        self.raw["random"] = {"size": size, "runs": runs}
        if self.profiler and self.profiler.enabled:
            cache = self.mnts.new_dir("cache")
            offsets = self.offsets(size, 99)
            self.profile_read(
                "random-4k", cache, "seq", "big.bin", lambda f: rand_preads(f, offsets)
            )
            shutil.rmtree(cache)

        def fig(k: str) -> str:
            return f"{med([x[k] for x in runs]):.2f} ms"

        self.rows += [
            Row(
                "4",
                "random 4K pread p50 vs one Range request",
                fig("p50_ms"),
                "Range " + fig("range_p50_ms"),
                med([x["p50_ms"] / x["range_p50_ms"] for x in runs]),
                "",
                "<=",
                2.0,
            ),
            Row(
                "4",
                "random 4K pread p99 vs Range p99",
                fig("p99_ms"),
                "Range " + fig("range_p99_ms"),
                med([x["p99_ms"] / x["range_p99_ms"] for x in runs]),
                "",
                "",
                None,
            ),
        ]

    # -- 5: safetensors ------------------------------------------------------------------------
    def w_safetensors(self) -> None:
        size = self.files["st"].stat().st_size
        url = self.dl_url("st", "model.safetensors")
        to = io_timeout(size)
        runs = []
        for r in range(self.cfg.runs):
            log(f"5 safetensors cold load, run {r + 1}/{self.cfg.runs}")
            d: dict[str, Any] = {}
            dst = self.shm / "dl.safetensors"
            drop_caches()
            d["curl_s"] = timed(["curl", "-sSf", "-o", str(dst), url], timeout=to)
            d["local_load_s"], n = load_safetensors(dst, to)
            dst.unlink()
            d["ref_s"] = d["curl_s"] + d["local_load_s"]
            m, cache = self.fresh_mount()
            with self.mnts.mounted(m):
                f = self.mnt_file(m, "st", "model.safetensors")
                drop_caches()
                t0 = time.perf_counter()
                d["load_s"], n2 = load_safetensors(f, to)
                d["load_wall_s"] = time.perf_counter() - t0
                d["rss_hwm"] = proc_status(m.pid, "VmHWM")
            shutil.rmtree(cache)
            if n != n2:
                raise RuntimeError(f"tensor bytes differ: {n} vs {n2}")
            d["ratio"] = d["load_s"] / d["ref_s"]
            log(
                "   mlregfs {load_s:.2f} s; curl {curl_s:.2f} s + load {local_load_s:.2f} s".format(
                    **d
                )
            )
            runs.append(d)
        self.raw["safetensors"] = {"size": size, "runs": runs}
        if self.profiler and self.profiler.enabled:
            cache = self.mnts.new_dir("cache")
            self.profile_read(
                "safetensors-load",
                cache,
                "st",
                "model.safetensors",
                lambda f: load_safetensors(f, to),
            )
            shutil.rmtree(cache)
        self.rows.append(
            Row(
                "5",
                "safetensors cold load vs curl->tmpfs + load",
                f"{med([x['load_s'] for x in runs]):.2f} s",
                f"{med([x['ref_s'] for x in runs]):.2f} s",
                med([x["ratio"] for x in runs]),
                "",
                "<=",
                1.2,
            )
        )

    # -- 6: ls -lR ------------------------------------------------------------------------------
    def w_listing(self) -> None:
        cfg = self.cfg
        st = self.srv.store
        log(f"6 seeding {cfg.models} models x {cfg.versions} versions x {cfg.files} files")
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
        runs = []
        for r in range(cfg.runs):
            log(f"6 ls -lR, run {r + 1}/{cfg.runs}")
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
            shutil.rmtree(cache)
            expected = cfg.models * cfg.versions * cfg.files
            if d["cold_entries"] != expected:
                raise RuntimeError(f"ls -lR saw {d['cold_entries']} files, expected {expected}")
            d["cold_requests_per_unit"] = d["cold_requests"] / units
            log(
                "   cold {cold_s:.2f} s {cold_requests} req; warm {warm_s:.2f} s "
                "{warm_requests} req".format(**d)
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
            Row(
                "6",
                f"ls -lR {tree} cold: HTTP req per model+version",
                f"{med([x['cold_s'] for x in runs]):.2f} s, "
                f"{med([x['cold_requests'] for x in runs]):.0f} req",
                f"{units} models+versions",
                med([x["cold_requests_per_unit"] for x in runs]),
                "",
                "<=",
                2.0,
                unit="req",
            ),
            Row(
                "6",
                f"ls -lR {tree} warm: HTTP requests",
                f"{med([x['warm_s'] for x in runs]):.2f} s, "
                f"{med([x['warm_requests'] for x in runs]):.0f} req",
                "—",
                med([x["warm_requests"] for x in runs]),
                "",
                "<=",
                0,
                unit="req",
            ),
        ]

    # -- 7: upload -------------------------------------------------------------------------------
    def upload_curl(self, src: Path, vid: int, name: str, timeout: float) -> float:
        url = f"{self.srv.api}/projects/{self.pid_enc}/packages/ml_models/{vid}/files/{name}"
        t0 = time.perf_counter()
        p = run(
            [
                "curl",
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-T",
                str(src),
                "-H",
                f"Authorization: Bearer {self.token}",
                url,
            ],
            timeout=timeout,
        )
        dt_ = time.perf_counter() - t0
        if p.stdout.strip() != "201":
            raise RuntimeError(f"curl upload answered {p.stdout.strip()}")
        return dt_

    def w_upload(self) -> None:
        src = self.files["seq_shm"]
        size = src.stat().st_size
        to = io_timeout(size)
        runs = []
        for r in range(self.cfg.runs):
            log(f"7 upload, run {r + 1}/{self.cfg.runs}")
            d: dict[str, Any] = {}
            d["curl_s"] = self.upload_curl(src, self.vids["upl"], f"curl-{r}.bin", to)
            m, cache = self.fresh_mount()
            with self.mnts.mounted(m):
                dst = self.mnt_file(m, "upl", f"cp-{r}.bin")
                os.stat(dst.parent)
                d["cp_s"] = timed(["cp", str(src), str(dst)], timeout=to)
                d["rss_hwm"] = proc_status(m.pid, "VmHWM")
            # the daemon logs the PUT's duration: the rest of cp's time is the write phase
            text = m.log.read_text(errors="replace") if m.log and m.log.exists() else ""
            put = re.findall(r"uploaded .* in ([0-9.]+) s", text)
            d["put_s"] = float(put[-1]) if put else None
            shutil.rmtree(cache)
            d["cp_MBps"], d["curl_MBps"] = mbps(size, d["cp_s"]), mbps(size, d["curl_s"])
            log(
                f"   cp {d['cp_MBps']:.0f} MB/s (PUT after close: {d['put_s']} s),"
                f" curl -T {d['curl_MBps']:.0f} MB/s"
            )
            runs.append(d)
        self.raw["upload"] = {"size": size, "runs": runs}
        if self.profiler and self.profiler.enabled:
            m, cache = self.fresh_mount()
            with self.mnts.mounted(m):
                dst = self.mnt_file(m, "upl", "cp-profile.bin")
                os.stat(dst.parent)
                with self.profiler.record("upload-cp", m.pid):
                    run(["cp", str(src), str(dst)], timeout=to)
            shutil.rmtree(cache)
        self.rows.append(
            Row(
                "7",
                "upload: cp into a version vs curl -T",
                f"{med([x['cp_MBps'] for x in runs]):.0f} MB/s",
                f"curl {med([x['curl_MBps'] for x in runs]):.0f} MB/s",
                med([x["cp_MBps"] / x["curl_MBps"] for x in runs]),
                "",
                ">=",
                0.7,
            )
        )

    # -- 8: peers --------------------------------------------------------------------------------
    def start_nginx(self) -> None:
        if not shutil.which("nginx") and not Path("/usr/sbin/nginx").exists():
            raise RuntimeError("nginx not installed (bash bench/setup.sh)")
        www = self.work / "www"
        www.mkdir()
        os.link(self.files["seq"], www / "big.bin")  # the same bytes as the registry serves
        ng = self.work / "nginx"
        (ng / "tmp").mkdir(parents=True)
        port = free_port()
        conf = ng / "nginx.conf"
        conf.write_text(f"""
daemon off;
master_process on;
worker_processes 2;
user root;
pid {ng}/nginx.pid;
error_log {ng}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    default_type application/octet-stream;
    client_body_temp_path {ng}/tmp/body;
    proxy_temp_path {ng}/tmp/proxy;
    fastcgi_temp_path {ng}/tmp/fastcgi;
    uwsgi_temp_path {ng}/tmp/uwsgi;
    scgi_temp_path {ng}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {www};
        autoindex on;
        autoindex_exact_size on;
    }}
}}
""")
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        proc = subprocess.Popen(
            [nginx, "-c", str(conf), "-p", str(ng), "-e", str(ng / "error.log")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.mnts.procs.append(proc)
        self.nginx_url = f"http://127.0.0.1:{port}/"

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {(ng / 'error.log').read_text()[-500:]}")
            try:
                return httpx.head(self.nginx_url + "big.bin", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 15, "nginx")

    def peer_mount(self, kind: str) -> Mount:
        """A cold peer mount: fresh cache directory, fresh process."""
        mnt = self.mnts.new_dir("mnt")
        cache = self.mnts.new_dir("cache")
        if kind == "rclone":
            conf = self.work / "rclone.conf"
            conf.touch()
            argv = ["rclone", "mount", ":http:", str(mnt), "--http-url", self.nginx_url,
                    "--read-only", "--vfs-cache-mode", "off", "--config", str(conf),
                    "--cache-dir", str(cache)]  # fmt: skip
        else:
            # --cache: its 8 MiB-segment disk cache (without it, every 128 KiB kernel read is
            # one blocking ~100 ms transfer: ~1.3 MB/s). --no-range-check: Debian's 1.2.5
            # exits ("does not support HTTP range requests") on nginx's 206 answers.
            argv = ["httpdirfs", "-f", "--cache", "--cache-location", str(cache),
                    "--no-range-check", self.nginx_url, str(mnt)]  # fmt: skip
        m = self.mnts.peer(kind, argv, mnt)
        m.cache = cache
        return m

    def w_peers(self) -> None:
        size = self.cfg.seq_size
        budget = 30.0 if self.cfg.quick else 120.0  # a slow peer reads only part of the file
        try:
            self.start_nginx()
        except Exception as e:
            self.errors["nginx"] = str(e)
            log(f"8 peers skipped: {e}")
            return
        # nginx itself, as a sanity reference for the static server
        drop_caches()
        t = timed(["curl", "-sSf", "-o", "/dev/null", self.nginx_url + "big.bin"], timeout=600)
        self.raw["peers"] = {"nginx_curl_MBps": mbps(size, t)}
        ml_seq = [x["dd_MBps"] for x in self.raw.get("sequential", {}).get("runs", [])]
        ml_p50 = [x["p50_ms"] for x in self.raw.get("random", {}).get("runs", [])]
        for kind in ("rclone", "httpdirfs"):
            runs: list[dict[str, Any]] = []
            if not shutil.which(kind):
                self.errors[kind] = f"{kind} not installed (bash bench/setup.sh)"
            try:
                for r in range(self.cfg.runs if kind not in self.errors else 0):
                    log(f"8 {kind}, run {r + 1}/{self.cfg.runs}")
                    d: dict[str, Any] = {}
                    m = self.peer_mount(kind)
                    with self.mnts.mounted(m):
                        f = m.path / "big.bin"
                        os.stat(f)
                        drop_caches()
                        d["read_bytes"], d["read_s"] = read_seq(f, budget)
                        d["rss_hwm"] = proc_status(m.pid, "VmHWM")
                    if m.cache is not None:
                        shutil.rmtree(m.cache, ignore_errors=True)
                    m = self.peer_mount(kind)
                    with self.mnts.mounted(m):
                        f = m.path / "big.bin"
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
                log(f"8 {kind} failed: {self.errors[kind]}")
            self.raw["peers"][kind] = {"runs": runs, "error": self.errors.get(kind)}
            if not runs:
                self.rows.append(Row("8", f"vs {kind}: not measured", "", "", None, "", ">=",
                                     1.0, note=self.errors.get(kind, "")))  # fmt: skip
                continue
            peer_seq, peer_p50 = (
                med([x["seq_MBps"] for x in runs]),
                med([x["p50_ms"] for x in runs]),
            )
            part = " (partial read)" if any(x["partial"] for x in runs) else ""
            self.rows += [
                Row("8", f"cold seq read vs {kind}", f"{med(ml_seq):.0f} MB/s",
                    f"{kind} {peer_seq:.0f} MB/s{part}", med(ml_seq) / peer_seq, "", ">=", 1.0),
                Row("8", f"random 4K p50 speedup vs {kind}", f"{med(ml_p50):.2f} ms",
                    f"{kind} {peer_p50:.2f} ms", peer_p50 / med(ml_p50), "", ">=", 1.0),
            ]  # fmt: skip

    # -- 9: RSS ------------------------------------------------------------------------------
    def w_rss(self) -> None:
        src = self.files["rss"]
        size = src.stat().st_size
        to = io_timeout(size)
        name = "big4.safetensors"
        runs = []
        for r in range(self.cfg.runs):
            log(f"9 daemon peak RSS with {size / GiB:.1f} GiB, run {r + 1}/{self.cfg.runs}")
            d: dict[str, Any] = {}
            m, cache = self.fresh_mount()
            with self.mnts.mounted(m):
                drop_caches()
                d["seq_s"] = timed(
                    [
                        "dd",
                        f"if={self.mnt_file(m, 'rss', name)}",
                        "of=/dev/null",
                        "bs=1M",
                        "status=none",
                    ],
                    timeout=to,
                )
                d["seq_hwm"] = proc_status(m.pid, "VmHWM")
            shutil.rmtree(cache)
            m, cache = self.fresh_mount()
            with self.mnts.mounted(m):
                drop_caches()
                d["st_s"], _ = load_safetensors(self.mnt_file(m, "rss", name), to)
                d["st_hwm"] = proc_status(m.pid, "VmHWM")
            shutil.rmtree(cache)
            run(f"cat '{src}' >/dev/null", timeout=to)  # the upload source in page cache
            m, cache = self.fresh_mount()
            with self.mnts.mounted(m):
                dst = self.mnt_file(m, "upl", f"rss-{r}.safetensors")
                os.stat(dst.parent)
                d["cp_s"] = timed(["cp", str(src), str(dst)], timeout=to)
                d["cp_hwm"] = proc_status(m.pid, "VmHWM")
            shutil.rmtree(cache)
            d["max_hwm"] = max(d["seq_hwm"], d["st_hwm"], d["cp_hwm"])
            log(
                "   VmHWM seq {:.0f} MiB ({:.0f} MB/s), safetensors {:.0f} MiB ({:.1f} s), "
                "cp {:.0f} MiB ({:.0f} MB/s)".format(
                    d["seq_hwm"] / MiB,
                    mbps(size, d["seq_s"]),
                    d["st_hwm"] / MiB,
                    d["st_s"],
                    d["cp_hwm"] / MiB,
                    mbps(size, d["cp_s"]),
                )
            )
            runs.append(d)
        self.raw["rss"] = {"size": size, "runs": runs}
        parts = ", ".join(
            f"{k} {med([x[k + '_hwm'] for x in runs]) / MiB:.0f}" for k in ("seq", "st", "cp")
        )
        self.rows.append(
            Row(
                "9",
                f"daemon peak RSS (VmHWM), {size / GiB:.1f} GiB file",
                f"{med([x['max_hwm'] for x in runs]) / MiB:.0f} MiB",
                f"MiB: {parts}",
                med([x["max_hwm"] for x in runs]) / MiB,
                "",
                "<=",
                300,
                unit="MiB",
            )
        )

    # -- driver ---------------------------------------------------------------------------
    def run_all(self) -> None:
        steps: list[tuple[int, str, Callable[[], None]]] = [
            (1, "sequential", self.w_sequential),
            (4, "random", self.w_random),
            (5, "safetensors", self.w_safetensors),
            (6, "listing", self.w_listing),
            (7, "upload", self.w_upload),
            (8, "peers", self.w_peers),
            (9, "rss", self.w_rss),
        ]
        for wid, name, fn in steps:
            if wid not in self.cfg.only and not (wid == 1 and self.cfg.only & {2, 3}):
                continue
            t0 = time.perf_counter()
            try:
                fn()
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:
                self.errors[name] = f"{type(e).__name__}: {e}"
                log(f"workload {wid} ({name}) failed: {e}\n{traceback.format_exc()}")
                self.rows.append(
                    Row(
                        str(wid),
                        f"{name}: FAILED",
                        "",
                        "",
                        None,
                        "",
                        ">=",
                        0,
                        note=self.errors[name],
                    )
                )
                for mnt in list(self.mnts.active.values()):
                    self.mnts.umount(mnt)
            self.raw.setdefault("durations_s", {})[name] = round(time.perf_counter() - t0, 1)

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
                if hasattr(self, "shm"):
                    shutil.rmtree(self.shm, ignore_errors=True)


# ----------------------------------------------------------------------------- output


def fmt_ratio(row: Row) -> str:
    if row.ratio is None or row.ratio != row.ratio:
        return "—"
    if row.unit == "MiB":
        return f"{row.ratio:.0f} MiB"
    if row.unit == "req":
        return f"{row.ratio:.2f}" if row.ratio % 1 else f"{row.ratio:.0f}"
    return f"{row.ratio:.2f}x"


def fmt_target(row: Row) -> str:
    if not row.op or row.target is None:
        return "—"
    op = "≥" if row.op == ">=" else "≤"
    unit = {"MiB": " MiB", "req": "", "x": "x"}[row.unit]
    t = f"{row.target:g}"
    return f"{op} {t}{unit}"


def table(rows: list[Row]) -> str:
    head = ("#", "workload", "mlregfs", "reference", "ratio", "target", "result")
    body = [(r.wid, r.label, r.value, r.ref, fmt_ratio(r), fmt_target(r), r.result) for r in rows]
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(str(h).ljust(w) for h, w in zip(head, widths, strict=True)), line]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(out)


def score(row: Row) -> float | None:
    """ratio / target, oriented so that > 1 meets the target (for the chart)."""
    if row.ratio is None or row.ratio != row.ratio or not row.op or row.target is None:
        return None
    if row.target == 0:  # "0 requests": met or not
        return 1.0 if row.ratio <= 0 else 1 / (1 + row.ratio)
    if row.op == ">=":
        return row.ratio / row.target
    return row.target / row.ratio if row.ratio > 0 else 100.0


def chart(rows: list[Row], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [(r, score(r)) for r in rows if score(r) is not None]
    if not shown:
        return
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(shown) + 1.6))
    labels = [f"{r.wid}. {r.label}" for r, _ in shown]
    vals = [min(100.0, max(0.01, s or 0.01)) for _, s in shown]
    colors = ["#3a9d5d" if r.result == "PASS" else "#d0543f" for r, _ in shown]
    y = list(range(len(shown)))[::-1]
    ax.barh(y, vals, color=colors)
    ax.axvline(1.0, color="black", lw=1)
    ax.set_xscale("log")
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlabel("ratio ÷ target  (≥ 1 meets the target; log scale)")
    for yi, v, (r, _) in zip(y, vals, shown, strict=True):
        ax.text(v * 1.05, yi, f"{fmt_ratio(r)} (target {fmt_target(r)})", va="center", fontsize=7)
    ax.set_xlim(min([*vals, 0.1]) / 1.5, max([*vals, 10]) * 8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_info() -> dict[str, Any]:
    def cmd(argv: list[str]) -> str:
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=20)
            return (p.stdout or p.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return ""

    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":")[1].strip()
    try:
        import pyfuse3

        pyfuse3_v = pyfuse3.__version__
    except Exception:
        pyfuse3_v = ""
    return {
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "cpu": cpu,
        "mem_total": mem,
        "python": platform.python_version(),
        "pyfuse3": pyfuse3_v,
        "libfuse3": cmd(["dpkg-query", "-W", "-f", "${Version}", "libfuse3-3"]),
        "curl": cmd(["curl", "--version"]),
        "rclone": cmd(["rclone", "version"]),
        "httpdirfs": cmd(["httpdirfs", "--version"]),
        "nginx": cmd(["nginx", "-v"]),
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def git_info() -> dict[str, Any]:
    def g(*a: str) -> str:
        p = subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True)
        return p.stdout.strip()

    return {"rev": g("rev-parse", "HEAD"), "dirty": bool(g("status", "--porcelain", "mlregfs"))}


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small files, smoke run (< 3 min)")
    p.add_argument("--runs", type=int, default=3, help="runs per figure (median), default 3")
    p.add_argument("--only", help="comma-separated workload numbers (1-9)")
    p.add_argument("--no-peers", action="store_true", help="skip rclone/httpdirfs (workload 8)")
    p.add_argument("--size-mib", type=int, help="override the 1 GiB file size")
    p.add_argument("--rss-size-mib", type=int, help="override the 4 GiB RSS file size")
    p.add_argument("--models", type=int, help="override the number of models for ls -lR")
    p.add_argument("--mount-opts", default="", help="extra -o options for every mlregfs mount")
    p.add_argument(
        "--profile",
        action="store_true",
        help="py-spy record the daemon during one extra run of 1, 4, 5, 7",
    )
    p.add_argument("--workdir", default=tempfile.gettempdir(), help="where test data goes")
    p.add_argument("--keep-workdir", action="store_true", help="do not delete the test data")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = Config.from_args(args)
    if os.geteuid() != 0:
        log("warning: not root: page cache is not dropped, 'cold' figures are not cold")
    for tool in ("curl", "fusermount3", "dd"):
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
    }
    interrupted = False
    try:
        bench.setup()
        bench.run_all()
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: cleaning up")
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
        f"mlregfs {record['git']['rev'][:10]} bench ({mode}, median of {cfg.runs}) "
        f"{stamp}, {record['machine']['nproc']} CPU, kernel {record['machine']['kernel']}"
    )
    try:
        chart(bench.rows, ppath, title)
    except Exception as e:
        log(f"chart failed: {e}")
    print()
    print(title)
    print(table(bench.rows))
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
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
