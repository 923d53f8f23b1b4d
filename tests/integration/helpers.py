"""Real mounts in subprocesses: start, wait until ready, unmount, and always clean up."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path


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


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GITLAB_TOKEN", "CI_JOB_TOKEN")}
    env.update(extra)
    return env


def unmount(path: Path) -> None:
    if os.path.ismount(path):
        subprocess.run(["fusermount3", "-u", str(path)], check=False, capture_output=True)
    if os.path.ismount(path):
        subprocess.run(["fusermount3", "-uz", str(path)], check=False, capture_output=True)


class Mount:
    """`mlregfs mount SOURCE MNT -f` as a child process; ready when the mount point is a mount."""

    def __init__(
        self,
        source: str,
        mnt: Path,
        cache_dir: Path,
        *,
        token: str | None = None,
        job_token: str | None = None,
        options: list[str] | None = None,
    ) -> None:
        self.source, self.path, self.cache_dir = source, mnt, cache_dir
        self.env = clean_env()
        if token:
            self.env["GITLAB_TOKEN"] = token
        if job_token:
            self.env["CI_JOB_TOKEN"] = job_token
        self.options = [f"cache_dir={cache_dir}", *(options or [])]
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = cache_dir / "mount-stderr.log"

    def argv(self, foreground: bool = True) -> list[str]:
        args = [sys.executable, "-m", "mlregfs", "mount", self.source, str(self.path)]
        if foreground:
            args.append("-f")
        for o in self.options:
            args += ["-o", o]
        return args

    def start(self, timeout: float = 30) -> Mount:
        self.path.mkdir(parents=True, exist_ok=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._err = open(self.log, "ab")
        self.proc = subprocess.Popen(
            self.argv(), env=self.env, stderr=self._err, stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mount exited with {self.proc.returncode}: {self.stderr()}")
            if os.path.ismount(self.path):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mount not ready after {timeout}s: {self.stderr()}")

    def stderr(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 20) -> int | None:
        """Unmount like a user would and wait for the daemon to exit; returns its status."""
        if self.proc is None:
            return None
        unmount(self.path)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGKILL)
            code = self.proc.wait()
            unmount(self.path)
        self._err.close()
        self.proc = None
        return code

    def __enter__(self) -> Mount:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def recover(cache: Path, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`mlregfs recover --cache-dir CACHE ARGS...` with `token` as GITLAB_TOKEN."""
    return subprocess.run(
        [sys.executable, "-m", "mlregfs", "recover", "--cache-dir", str(cache), *args],
        env=clean_env(GITLAB_TOKEN=token),
        capture_output=True,
        text=True,
        timeout=60,
    )
