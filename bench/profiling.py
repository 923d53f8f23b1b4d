"""py-spy profiles of the mlregfs daemon during a workload (`bench/run.py --profile`)."""

from __future__ import annotations

import collections
import contextlib
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.util import PY


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
