"""`mlregfs warm PATH...`: fetch files of a mount into its cache, verified, before they are used.

Every byte is read through the mount, so the daemon downloads, caches and checks the sha256
exactly as for any reader; a file whose bytes do not match fails (EIO) and so does `warm`.
With `--pin` the files are pinned first (an xattr the daemon understands), so eviction never
drops them. Exit status 0 only when every file was read completely: usable as ExecStartPre=.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

PIN_XATTR = "user.mlregfs.pin"
CHUNK = 8 << 20


def _files(paths: list[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            for root, _dirs, names in os.walk(p):
                out += [Path(root) / n for n in sorted(names)]
        else:
            out.append(p)
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="mlregfs warm", description=__doc__)
    ap.add_argument("paths", nargs="+", type=Path, help="files or directories inside a mount")
    ap.add_argument("--pin", action="store_true", help="keep them from cache eviction")
    ap.add_argument("--unpin", action="store_true", help="release a pin (nothing is read)")
    ap.add_argument("-j", "--jobs", type=int, default=4, help="files read in parallel")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        files = _files(args.paths)
    except OSError as e:
        print(f"mlregfs warm: {e}", file=sys.stderr)
        return 1
    if args.unpin:
        for f in files:
            os.setxattr(f, PIN_XATTR, b"0")
        return 0
    total = 0
    for f in files:
        total += f.stat().st_size
    failures: list[str] = []
    lock = threading.Lock()
    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=args.quiet,
        desc="warming",
        file=sys.stderr,
    )

    def warm(f: Path) -> None:
        if args.pin:
            os.setxattr(f, PIN_XATTR, b"1")
        with open(f, "rb", buffering=0) as fh:
            buf = bytearray(CHUNK)
            while n := fh.readinto(buf):
                with lock:
                    bar.update(n)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(warm, f): f for f in files}
        for fut in as_completed(futures):
            try:
                fut.result()
            except OSError as e:
                failures.append(f"{futures[fut]}: {e.strerror or e}")
    bar.close()
    for line in failures:
        print(f"mlregfs warm: {line}", file=sys.stderr)
    if not args.quiet:
        pinned = " and pinned" if args.pin else ""
        print(f"{len(files) - len(failures)} of {len(files)} files cached{pinned}", file=sys.stderr)
    return 1 if failures else 0
