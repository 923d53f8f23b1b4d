"""Helpers of the integration tests: test data, digests, `mlregfs recover`; the mount harness
itself is mlregfs.testing (re-exported here for the tests that import it from this module)."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
from pathlib import Path

from mlregfs.testing import Mount, clean_env, unmount

__all__ = ["Mount", "blob", "clean_env", "entries", "file_sha", "recover", "sha", "unmount"]


def blob(seed: int, size: int) -> bytes:
    """Deterministic pseudo-random bytes."""
    return random.Random(seed).randbytes(size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def entries(path: Path) -> list[str]:
    """Sorted names in `path` that are not symbolic links (the semver alias links)."""
    return sorted(n for n in os.listdir(path) if not (path / n).is_symlink())


def file_sha(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def recover(cache: Path, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`mlregfs recover --cache-dir CACHE ARGS...` with `token` as GITLAB_TOKEN."""
    return subprocess.run(
        [sys.executable, "-m", "mlregfs", "recover", "--cache-dir", str(cache), *args],
        env=clean_env(GITLAB_TOKEN=token),
        capture_output=True,
        text=True,
        timeout=60,
    )
