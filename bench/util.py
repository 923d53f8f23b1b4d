"""Measurements of the benchmark: commands and timing, test data, loaders, fio, /proc."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
MiB = 1 << 20
GiB = 1 << 30


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


def cpu_per_gib(cpu_s: float, nbytes: int) -> float:
    return cpu_s / (nbytes / GiB) if nbytes else float("nan")


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
import random, sys, time
from safetensors import safe_open
t0 = time.perf_counter()
n = 0
with safe_open(sys.argv[1], framework="np") as f:
    keys = sorted(f.keys())
    random.Random(int(sys.argv[2])).shuffle(keys)  # loaders do not read in file order
    for k in keys:
        n += f.get_tensor(k).nbytes
print(time.perf_counter() - t0, n)
"""


def load_safetensors(path: Path, timeout: float, seed: int = 0) -> tuple[float, int]:
    """Load every tensor in a seeded random order (safe_open, numpy) in a fresh process;
    (seconds, tensor bytes)."""
    argv = [PY, "-c", SAFETENSORS_LOADER, str(path), str(seed)]
    out = run(argv, timeout=timeout).stdout.split()
    return float(out[0]), int(out[1])


MMAP_TOUCHER = r"""
import sys, time
import numpy as np
t0 = time.perf_counter()
mm = np.memmap(sys.argv[1], dtype=np.uint8, mode="r")
pages = np.random.default_rng(int(sys.argv[2])).permutation(len(mm) // 4096) * 4096
total = 0
for i in range(0, len(pages), 4096):  # fancy indexing touches the pages in the given order
    total += int(mm[pages[i : i + 4096]].sum(dtype=np.uint64))
print(time.perf_counter() - t0, len(pages), total)
"""


def mmap_touch(path: Path, timeout: float, seed: int = 0) -> tuple[float, int, int]:
    """numpy.memmap of `path`, every 4 KiB page touched once in a seeded random order, in a
    fresh process; (seconds, pages, byte sum: the same for the same bytes)."""
    out = run([PY, "-c", MMAP_TOUCHER, str(path), str(seed)], timeout=timeout).stdout.split()
    return float(out[0]), int(out[1]), int(out[2])


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


def proc_status(pid: int, key: str) -> int:
    """A kB field of /proc/<pid>/status, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def proc_cpu(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


FIO_SEQ_READ = Path(__file__).resolve().parent / "fio" / "seq_read.fio"


def fio_read(path: Path | str, timeout: float, budget: float | None = None) -> tuple[int, float]:
    """Sequential 1 MiB reads of `path` by fio (bench/fio/seq_read.fio), to EOF or for `budget`
    seconds; (bytes read, seconds: fio's own job runtime)."""
    if ":" in str(path):  # fio splits file names at colons
        raise ValueError(f"fio cannot read {path}")
    runtime = math.ceil(budget) if budget else math.ceil(timeout)
    env = dict(os.environ, FILE=str(path), RUNTIME=str(runtime))
    argv = ["fio", "--output-format=json", "--readonly", str(FIO_SEQ_READ)]
    out = run(argv, timeout=timeout + 30, env=env).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    if job["error"]:
        raise RuntimeError(f"fio read of {path}: error {job['error']}")
    return int(job["read"]["io_bytes"]), max(job["read"]["runtime"], 1) / 1e3


def fio_secs(path: Path | str, timeout: float) -> float:
    """Seconds fio takes to read `path` to EOF (sequential 1 MiB reads, as `dd bs=1M`)."""
    return fio_read(path, timeout)[1]
