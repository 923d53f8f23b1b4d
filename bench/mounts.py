"""FUSE mounts (mlregfs and peers) and helper processes of one bench run; py-spy profiling."""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.util import is_mounted, log, pid_alive, run, wait_for

PY = sys.executable

# ----------------------------------------------------------------------------- mounts


@dataclass
class Mount:
    kind: str  # mlregfs | rclone | httpdirfs
    path: Path
    pid: int
    proc: subprocess.Popen[bytes] | None = None  # when we hold the process (peers)
    log: Path | None = None
    cache: Path | None = None


class Mounts:
    """Every FUSE mount and helper process this run started, cleaned up on the way out."""

    def __init__(self, work: Path, token: str) -> None:
        self.work = work
        self.token = token
        self.active: dict[Path, Mount] = {}
        self.procs: list[subprocess.Popen[bytes]] = []
        self._n = 0

    def new_dir(self, prefix: str) -> Path:
        self._n += 1
        d = self.work / f"{prefix}-{self._n}"
        d.mkdir(parents=True)
        return d

    # -- mlregfs
    def mlregfs(self, url: str, cache_dir: Path, opts: str = "") -> Mount:
        mnt = self.new_dir("mnt")
        o = f"cache_dir={cache_dir}" + (f",{opts}" if opts else "")
        env = dict(os.environ, GITLAB_TOKEN=self.token)
        try:
            run([PY, "-m", "mlregfs", "mount", url, str(mnt), "-o", o], timeout=90, env=env)
        except BaseException as e:
            # the daemon may still be coming up (interrupted mid-mount): end it too
            self._reap_daemons(str(mnt), grace=3.0)
            logf = cache_dir / "mlregfs.log"
            if logf.exists() and isinstance(e, RuntimeError):
                tail = "\n".join(logf.read_text(errors="replace").splitlines()[-15:])
                raise RuntimeError(f"{e}\n--- {logf} (tail):\n{tail}") from None
            raise
        pid = self._find_daemon(mnt)
        m = Mount("mlregfs", mnt, pid, log=cache_dir / "mlregfs.log")
        self.active[mnt] = m
        return m

    def _reap_daemons(self, needle: str, grace: float = 0.0) -> None:
        """Unmount and end every mlregfs daemon of ours whose argv mentions `needle` (a path
        under this run's unique work dir), including one still coming up."""
        deadline = time.monotonic() + grace
        while True:
            pids = self._daemon_pids(needle)
            for mp in self._mounts_under(needle):
                self._fusermount(Path(mp))
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
        for mp in self._mounts_under(needle):
            run(["fusermount3", "-uz", mp], check=False, timeout=30)

    @staticmethod
    def _mounts_under(prefix: str) -> list[str]:
        with open("/proc/self/mounts") as f:
            return [x.split()[1] for x in f if x.split()[1].startswith(prefix)]

    @staticmethod
    def _daemon_pids(needle: str) -> list[int]:
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"mlregfs" in argv and b"mount" in argv and any(needle.encode() in a for a in argv):
                if pid_alive(int(d.name)):
                    pids.append(int(d.name))
        return pids

    @staticmethod
    def _find_daemon(mnt: Path) -> int:
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"mlregfs" in argv and b"mount" in argv and str(mnt).encode() in argv:
                return int(d.name)
        raise RuntimeError(f"no mlregfs daemon found for {mnt}")

    # -- peers
    def peer(self, kind: str, argv: list[str], mnt: Path, timeout: float = 30) -> Mount:
        logf = self.work / f"{kind}-{self._n}.log"
        with open(logf, "wb") as lf:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=lf, stderr=subprocess.STDOUT
            )
        self.procs.append(proc)
        m = Mount(kind, mnt, proc.pid, proc=proc, log=logf)
        self.active[mnt] = m
        try:
            wait_for(
                lambda: proc.poll() is not None or (is_mounted(mnt) and bool(os.listdir(mnt))),
                timeout,
                f"{kind} mount",
            )
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{kind} exited {proc.returncode}: {logf.read_text(errors='replace')[-800:]}"
                )
        except BaseException:
            self.umount(m)
            raise
        return m

    # -- teardown
    @staticmethod
    def _fusermount(mnt: Path) -> None:
        for _ in range(20):
            if not is_mounted(mnt):
                return
            if run(["fusermount3", "-u", str(mnt)], check=False, timeout=30).returncode == 0:
                return
            time.sleep(0.25)
        run(["fusermount3", "-uz", str(mnt)], check=False, timeout=30)

    def umount(self, m: Mount, wait: float = 30) -> None:
        self.active.pop(m.path, None)
        try:
            self._fusermount(m.path)
        finally:
            deadline = time.monotonic() + wait
            while pid_alive(m.pid) and time.monotonic() < deadline:
                if m.proc is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        m.proc.wait(0.1)
                else:
                    time.sleep(0.05)
            if pid_alive(m.pid):
                log(f"{m.kind} pid {m.pid} still alive after unmount: SIGTERM")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(m.pid, signal.SIGTERM)
                time.sleep(2)
                if pid_alive(m.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(m.pid, signal.SIGKILL)
            if m.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    m.proc.wait(5)
            with contextlib.suppress(OSError):
                m.path.rmdir()

    def cleanup(self) -> None:
        for m in list(self.active.values()):
            try:
                self.umount(m, wait=10)
            except Exception as e:  # keep going: every mount must go
                log(f"cleanup of {m.path}: {e}")
        # any daemon or mount of this run still there (one interrupted mid-mount), lazy
        # unmount as a last resort
        self._reap_daemons(str(self.work) + "/", grace=1.0)
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()

    @contextlib.contextmanager
    def mounted(self, m: Mount) -> Iterator[Mount]:
        try:
            yield m
        finally:
            self.umount(m)


# ----------------------------------------------------------------------------- profiling


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


# ----------------------------------------------------------------------------- nginx


NGINX_BUCKET = "mlregfs-packages"  # mlregfs.server.storage.BUCKET: the redirect's path layout


class Nginx:
    """A private nginx (sendfile, keep-alive): object storage for `mlregfs serve --storage-url`
    (`/<bucket>/` aliased to the server's DATA/blobs/) and a static autoindex of `www` for the
    peers. Its access log records status and body bytes per request."""

    def __init__(self, work: Path, port: int, blobs: Path, www: Path) -> None:
        self.dir = work
        self.port = port
        self.blobs = blobs
        self.www = www
        self.access = work / "access.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
        if nginx is None:
            raise RuntimeError("nginx not installed (bash bench/setup.sh)")
        (self.dir / "tmp").mkdir(parents=True, exist_ok=True)
        ng = self.dir
        conf = ng / "nginx.conf"
        conf.write_text(f"""
daemon off;
master_process on;
worker_processes 2;
user root;
pid {ng}/nginx.pid;
error_log {ng}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    log_format bytes '$status $body_bytes_sent';
    access_log {self.access} bytes;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 300s;
    keepalive_requests 1000000;
    default_type application/octet-stream;
    client_body_temp_path {ng}/tmp/body;
    proxy_temp_path {ng}/tmp/proxy;
    fastcgi_temp_path {ng}/tmp/fastcgi;
    uwsgi_temp_path {ng}/tmp/uwsgi;
    scgi_temp_path {ng}/tmp/scgi;
    server {{
        listen 127.0.0.1:{self.port};
        location /{NGINX_BUCKET}/ {{ alias {self.blobs}/; }}
        location /www/ {{
            alias {self.www}/;
            autoindex on;
            autoindex_exact_size on;
        }}
    }}
}}
""")
        self.proc = subprocess.Popen(
            [nginx, "-c", str(conf), "-p", str(ng), "-e", str(ng / "error.log")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        proc = self.proc

        def up() -> bool:
            if proc.poll() is not None:
                err = (ng / "error.log").read_text(errors="replace")[-500:]
                raise RuntimeError(f"nginx exited: {err}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return True
            except OSError:
                return False

        wait_for(up, 15, "nginx")

    def log_mark(self) -> int:
        """Where the access log ends now (for `served_since`)."""
        try:
            return self.access.stat().st_size
        except FileNotFoundError:
            return 0

    def served_since(self, mark: int) -> tuple[int, int]:
        """(requests, body bytes) nginx logged since `mark`."""
        n = nbytes = 0
        with contextlib.suppress(FileNotFoundError), open(self.access, "rb") as f:
            f.seek(mark)
            for line in f:
                parts = line.split()
                if len(parts) == 2 and parts[1].isdigit():
                    n += 1
                    nbytes += int(parts[1])
        return n, nbytes

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: nginx's fast shutdown, workers included
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
