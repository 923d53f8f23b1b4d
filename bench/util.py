"""Helpers of the benchmark: processes, timing, test data, measurements, /proc."""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
MiB = 1 << 20
GiB = 1 << 30


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


def curl_sha256(urls: list[str], timeout: float) -> tuple[float, list[str]]:
    """Seconds for `curl URL | openssl dgst -sha256`, one pipeline per URL, all at once;
    (wall seconds, digests)."""
    script = "set -o pipefail\n" + "".join(
        f"(curl -sSf '{u}' | openssl dgst -sha256 -r) > \"$1.{i}\" &\n" for i, u in enumerate(urls)
    )
    script += "fail=0; for j in $(jobs -p); do wait $j || fail=1; done; exit $fail\n"
    with tempfile.TemporaryDirectory(prefix="mlregfs-bench-") as d:
        t0 = time.perf_counter()
        run(["bash", "-c", script, "bash", f"{d}/sum"], timeout=timeout)
        wall = time.perf_counter() - t0
        digests = [Path(f"{d}/sum.{i}").read_text().split()[0] for i in range(len(urls))]
    return wall, digests


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


def socket_range_latencies(
    host: str, port: int, path: str, offsets: list[int], size: int = 4096
) -> list[float]:
    """Latency of one 4 KiB Range GET per offset on one raw keep-alive socket: the cheapest
    way a client can ask for a small range (no HTTP library in the way)."""
    with socket.create_connection((host, port), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        f = s.makefile("rb")

        def get(off: int) -> float:
            req = (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                f"Range: bytes={off}-{off + size - 1}\r\n\r\n"
            ).encode()
            t0 = time.perf_counter()
            s.sendall(req)
            status = f.readline()
            length = -1
            while (line := f.readline()) not in (b"\r\n", b""):
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    length = int(v)
            body = f.read(length) if length >= 0 else b""
            took = time.perf_counter() - t0
            if b" 206 " not in status or len(body) != size:
                raise RuntimeError(f"Range request: {status!r}, {len(body)} bytes")
            return took

        get(0)  # connect and warm up; not measured
        return [get(off) for off in offsets]


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
