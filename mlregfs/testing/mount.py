"""Real FUSE mounts in subprocesses (mlregfs or a peer): start, wait until mounted, unmount,
and always clean up."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

TOKEN_VARS = ("GITLAB_TOKEN", "CI_JOB_TOKEN")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without registry tokens (a mount gets only the one it is given)."""
    env = {k: v for k, v in os.environ.items() if k not in TOKEN_VARS}
    env.update(extra)
    return env


def mount_points() -> list[str]:
    """The mount points of this mount namespace (/proc/self/mounts, escapes decoded)."""
    with open("/proc/self/mounts") as f:
        fields = [line.split()[1] for line in f]
    # the kernel writes space, tab, newline and backslash as three-digit octal escapes
    return [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), x) for x in fields]


def is_mounted(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a mount point. Unlike os.path.ismount, also true for a FUSE mount
    whose daemon died (stat answers ENOTCONN there): teardown must still unmount it."""
    return os.path.realpath(path) in mount_points()


def unmount(path: str | os.PathLike[str], *, attempts: int = 1) -> None:
    """`fusermount3 -u` (tried `attempts` times while busy), then a lazy unmount."""
    for i in range(attempts):
        if not is_mounted(path):
            return
        if _fusermount("-u", path) == 0:
            return
        if i + 1 < attempts:
            time.sleep(0.25)
    if is_mounted(path):
        _fusermount("-uz", path)


def _fusermount(flag: str, path: str | os.PathLike[str]) -> int:
    argv = ["fusermount3", flag, os.fspath(path)]
    return subprocess.run(argv, check=False, capture_output=True, timeout=30).returncode


def wait_or_kill(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """`proc`'s exit status; SIGKILL first if it has not exited within `timeout` seconds."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def read_log(path: Path | None) -> str:
    """A log file's text so far ("" while there is none)."""
    if path is None:
        return ""
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


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


def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `pred` until it holds; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s")


def wait_for_mount(
    path: Path,
    timeout: float = 30,
    *,
    proc: subprocess.Popen[bytes] | None = None,
    ready: Callable[[], bool] | None = None,
    what: str = "mount",
) -> None:
    """Until `path` is a mount that answers stat (and `ready()` holds, if given).

    RuntimeError when `proc` exits first, TimeoutError after `timeout` seconds.
    """

    def up() -> bool:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        # os.path.ismount stats the root: true only once the daemon answers requests
        return os.path.ismount(path) and (ready is None or ready())

    wait_for(up, timeout, what)


class FuseProcess:
    """A FUSE program in the foreground as our child (`argv`); mounted at `path`, output in
    `log`. Ready when `path` is a mount that answers (and `ready()` holds, if given)."""

    kind = "fuse"

    def __init__(
        self,
        argv: Sequence[str],
        path: Path,
        log: Path,
        *,
        kind: str | None = None,
        env: dict[str, str] | None = None,
        ready: Callable[[], bool] | None = None,
        unmount_attempts: int = 1,
    ) -> None:
        self._argv = list(argv)
        self.path, self.log = path, log
        self.kind = kind or self.kind
        self.env = env if env is not None else clean_env()
        self.ready = ready
        self.unmount_attempts = unmount_attempts
        self.proc: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None

    def argv(self) -> list[str]:
        return list(self._argv)

    @property
    def pid(self) -> int:
        """The running process's id."""
        if self.proc is None:
            raise RuntimeError(f"{self.kind} at {self.path} is not running")
        return self.proc.pid

    def start(self, timeout: float = 30) -> FuseProcess:
        self.path.mkdir(parents=True, exist_ok=True)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._out = open(self.log, "ab")
        self.proc = subprocess.Popen(
            self.argv(),
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_mount(self.path, timeout, proc=self.proc, ready=self.ready, what=self.kind)
        except (RuntimeError, TimeoutError) as e:
            self.stop()
            raise RuntimeError(f"{e}: {self.stderr()}") from None
        except BaseException:
            self.stop()
            raise
        return self

    def stderr(self) -> str:
        """What the process wrote so far."""
        return read_log(self.log)

    def stop(self, timeout: float = 20) -> int | None:
        """Unmount like a user would and wait for the process to exit; returns its status."""
        if self.proc is None:
            return None
        try:
            unmount(self.path, attempts=self.unmount_attempts)
            code = wait_or_kill(self.proc, timeout)
            unmount(self.path)  # killed: the dead mount is left behind
        finally:
            if self._out is not None:
                self._out.close()
                self._out = None
            self.proc = None
        return code

    def __enter__(self) -> FuseProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Mount(FuseProcess):
    """`mlregfs mount SOURCE MNT -o cache_dir=CACHE`: in the foreground (`-f`, our child; its
    output in CACHE/mount-stderr.log) or, with `daemon=True`, detached as `mlregfs mount`
    leaves it (its log in CACHE/mlregfs.log, its pid found in /proc)."""

    kind = "mlregfs"

    def __init__(
        self,
        source: str,
        mnt: Path,
        cache_dir: Path,
        *,
        token: str | None = None,
        job_token: str | None = None,
        options: list[str] | None = None,
        daemon: bool = False,
        unmount_attempts: int = 1,
    ) -> None:
        log_name = "mlregfs.log" if daemon else "mount-stderr.log"
        super().__init__((), mnt, cache_dir / log_name, unmount_attempts=unmount_attempts)
        self.source, self.cache_dir, self.daemon = source, cache_dir, daemon
        if token:
            self.env["GITLAB_TOKEN"] = token
        if job_token:
            self.env["CI_JOB_TOKEN"] = job_token
        self.options = [f"cache_dir={cache_dir}", *(options or [])]
        self.daemon_pid: int | None = None

    def argv(self, foreground: bool | None = None) -> list[str]:
        args = [sys.executable, "-m", "mlregfs", "mount", self.source, str(self.path)]
        if (not self.daemon) if foreground is None else foreground:
            args.append("-f")
        for o in self.options:
            args += ["-o", o]
        return args

    @property
    def pid(self) -> int:
        """The daemon's process id (our child's in the foreground)."""
        if not self.daemon:
            return super().pid
        if self.daemon_pid is None:
            raise RuntimeError(f"no mlregfs daemon at {self.path}")
        return self.daemon_pid

    def start(self, timeout: float = 30) -> Mount:
        if not self.daemon:
            super().start(timeout)
            return self
        self.path.mkdir(parents=True, exist_ok=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        try:
            # returns once the daemon reported ready (or failed): no polling needed
            p = subprocess.run(
                self.argv(),
                env=self.env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            if p.returncode != 0:
                err = p.stderr.strip()[-800:]
                raise RuntimeError(f"mlregfs mount exited {p.returncode}: {err}")
            self.daemon_pid = find_daemon(self.path)
        except BaseException as e:
            # the daemon may still be coming up (interrupted mid-mount): end it too
            reap_daemons(str(self.path), grace=3.0)
            if isinstance(e, RuntimeError) and self.log.exists():
                tail = "\n".join(self.stderr().splitlines()[-15:])
                raise RuntimeError(f"{e}\n--- {self.log} (tail):\n{tail}") from None
            raise
        return self

    def stop(self, timeout: float = 20) -> int | None:
        """Unmount and wait for the daemon to exit (SIGTERM, then SIGKILL, if it does not).
        A detached daemon is not our child: its status is unknown, None."""
        if not self.daemon:
            return super().stop(timeout)
        pid, self.daemon_pid = self.daemon_pid, None
        if pid is None:
            return None
        try:
            unmount(self.path, attempts=self.unmount_attempts)
        finally:
            deadline = time.monotonic() + timeout
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid_alive(pid):
                log.warning("mlregfs pid %d still alive after unmount: SIGTERM", pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                time.sleep(2)
                if pid_alive(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        return None

    def __enter__(self) -> Mount:
        return self.start()


def _daemons() -> list[tuple[int, list[bytes]]]:
    """(pid, argv) of every `mlregfs mount` process on the machine."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"mlregfs" in argv and b"mount" in argv:
            found.append((int(d.name), argv))
    return found


def find_daemon(mnt: Path) -> int:
    """The pid of the mlregfs daemon serving `mnt`."""
    for pid, argv in _daemons():
        if str(mnt).encode() in argv:
            return pid
    raise RuntimeError(f"no mlregfs daemon found for {mnt}")


def reap_daemons(needle: str, grace: float = 0.0) -> None:
    """Unmount and end every mlregfs daemon whose argv mentions `needle` (a path under a
    directory of the caller's own, such as a bench run's work dir), including one still
    coming up; mounts under `needle` that outlive them get a lazy unmount."""
    deadline = time.monotonic() + grace
    while True:
        pids = [p for p, argv in _daemons() if any(needle.encode() in a for a in argv)]
        pids = [p for p in pids if pid_alive(p)]
        for mp in _mounts_under(needle):
            unmount(mp, attempts=20)
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
    for mp in _mounts_under(needle):
        _fusermount("-uz", mp)


def _mounts_under(prefix: str) -> list[str]:
    return [mp for mp in mount_points() if mp.startswith(prefix)]
