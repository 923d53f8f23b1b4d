"""`mlregfs demo`: start the embedded registry with sample models, mount it, show it."""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path


def _tree(root: Path) -> list[str]:
    lines = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = Path(dirpath).relative_to(root)
        depth = len(rel.parts)
        if depth:
            lines.append(f"{'  ' * (depth - 1)}{rel.name}/")
        for name in sorted(filenames):
            size = (Path(dirpath) / name).stat().st_size
            lines.append(f"{'  ' * depth}{name}  ({size:,} bytes)")
    return lines


def run_demo(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mlregfs demo", description=__doc__)
    p.add_argument("--data", type=Path, default=None, help="server data dir (default: a temp dir)")
    p.add_argument("--mountpoint", type=Path, default=None, help="default: ./mnt")
    p.add_argument("--keep", action="store_true", help="stay mounted until Ctrl-C")
    args = p.parse_args(argv)

    # the demo runs the embedded registry and the mount exactly as the tests do
    from mlregfs.testing import Mount, ServerProcess

    tmp = tempfile.TemporaryDirectory(prefix="mlregfs-demo-")
    data = args.data or Path(tmp.name) / "server"
    mnt = (args.mountpoint or Path("mnt")).absolute()
    cache = Path(tmp.name) / "cache"
    with ServerProcess(data, extra_args=["--init-demo"]) as server:
        source = f"{server.url}/demo/models"
        print(f"embedded registry: {server.url}  (project demo/models)")
        print("$ mlregfs mount", source, mnt)
        mount = Mount(source, mnt, cache, daemon=True)
        try:
            mount.start(timeout=90)
        except RuntimeError as e:
            print(e, file=sys.stderr)
            return 1
        try:
            print(f"\n$ find {mnt}")
            print("\n".join(_tree(mnt)))
            cfg = mnt / "models/llama-tiny/1.1.0/config.json"
            if cfg.exists():
                print(f"\n$ cat {cfg}\n{cfg.read_text()}")
            weights = next(mnt.glob("models/llama-tiny/*/model.safetensors"), None)
            if weights is not None:
                t0 = time.monotonic()
                digest = hashlib.sha256(weights.read_bytes()).hexdigest()
                print(f"$ sha256sum {weights}\n{digest}  ({time.monotonic() - t0:.2f}s)")
            if args.keep:
                print(f"\nmounted at {mnt}; press Ctrl-C to unmount")
                try:
                    while True:
                        time.sleep(3600)
                except KeyboardInterrupt:
                    pass
        finally:
            mount.stop()
            print(f"\nunmounted {mnt}")
    tmp.cleanup()
    return 0
