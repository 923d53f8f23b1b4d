#!/usr/bin/env python3
"""mlregfs benchmark: one table of ratios, each against a reference measured in the same run.

    bash bench/setup.sh                         # once: nginx, curl, fio, peers, .[bench]
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

This file is the runner (arguments, the order of the workloads, the table, JSON and chart);
the workloads are bench/workloads/, the run's world bench/harness.py, the references
bench/references.py and bench/fio/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: `bench` (this dir) as a package; appended,
    sys.path.append(str(REPO))  # so PYTHONPATH can point mlregfs at another checkout

from bench.harness import RESULTS, Bench, Config  # noqa: E402
from bench.report import Row, chart, git_info, machine_info, table, table_md  # noqa: E402
from bench.util import PY, log  # noqa: E402
from bench.workloads import STEPS  # noqa: E402

TOOLS = ("curl", "openssl", "fusermount3", "dd", "fio")


def run_all(bench: Bench) -> None:
    """Every selected workload in turn; a failed one becomes a FAILED row, the rest go on."""
    for wids, name, fn in STEPS:
        if not wids & bench.cfg.only:
            continue
        t0 = time.perf_counter()
        try:
            fn(bench)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:
            bench.errors[name] = f"{type(e).__name__}: {e}"
            log(f"workload {name} failed: {e}\n{traceback.format_exc()}")
            bench.daemon_log_tail()
            bench.rows.append(Row(str(min(wids)), f"{name}: FAILED", "", "", None, "", ">=", 0,
                                  note=bench.errors[name]))  # fmt: skip
            for mnt in list(bench.mnts.active.values()):
                bench.mnts.umount(mnt)
        bench.raw.setdefault("durations_s", {})[name] = round(time.perf_counter() - t0, 1)
    bench.rows.sort(key=lambda r: int(r.wid))  # stable: rows of one workload keep their order


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
    for tool in TOOLS:
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
        run_all(bench)
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
