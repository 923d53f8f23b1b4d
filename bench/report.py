"""The result table, the PNG chart, machine and git info."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


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
    cpu: str = ""  # the daemon's CPU cost of the mlregfs figure (CPU-s per GiB moved)

    @property
    def result(self) -> str:
        if self.ratio is None or self.ratio != self.ratio:
            return "ERROR" if self.op else ""
        if not self.op or self.target is None:
            return "info"
        ok = self.ratio >= self.target if self.op == ">=" else self.ratio <= self.target
        return "PASS" if ok else "MISS"


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
    head = ("#", "workload", "mlregfs", "reference", "ratio", "target", "result", "daemon CPU")
    body = [
        (r.wid, r.label, r.value, r.ref, fmt_ratio(r), fmt_target(r), r.result, r.cpu) for r in rows
    ]
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


def table_md(rows: list[Row]) -> str:
    """The same table as Markdown (for README.md and reports)."""
    head = ("#", "workload", "mlregfs", "reference", "ratio", "target", "result", "daemon CPU")
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = (r.wid, r.label, r.value, r.ref, fmt_ratio(r), fmt_target(r), r.result, r.cpu)
        out.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out)
