"""The references of one bench run: object storage (a private nginx), curl and raw-socket
clients of it, and the argv of the peer FUSE mounts (rclone, httpdirfs) over it."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from bench.util import run
from mlregfs.testing.mount import wait_for

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


def curl_upload(src: Path, url: str, token: str, timeout: float) -> float:
    """Seconds for `curl -T src url` (a PUT with Content-Length, as GitLab's Workhorse wants)."""
    t0 = time.perf_counter()
    p = run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-T", str(src),
         "-H", f"Authorization: Bearer {token}", url],
        timeout=timeout,
    )  # fmt: skip
    took = time.perf_counter() - t0
    if p.stdout.strip() != "201":
        raise RuntimeError(f"curl upload answered {p.stdout.strip()}")
    return took


PEERS = ("rclone", "httpdirfs")


def peer_argv(kind: str, url: str, mnt: Path, cache: Path, work: Path) -> list[str]:
    """The foreground command of a cold peer mount of `url` (an nginx autoindex) at `mnt`."""
    if kind == "rclone":
        conf = work / "rclone.conf"
        conf.touch()
        return ["rclone", "mount", ":http:", str(mnt), "--http-url", url,
                "--read-only", "--vfs-cache-mode", "off", "--config", str(conf),
                "--cache-dir", str(cache)]  # fmt: skip
    # --cache: its 8 MiB-segment disk cache (without it, every 128 KiB kernel read is one
    # blocking ~100 ms transfer: ~1.3 MB/s). --no-range-check: Debian's 1.2.5 exits ("does
    # not support HTTP range requests") on nginx's 206 answers.
    return ["httpdirfs", "-f", "--cache", "--cache-location", str(cache),
            "--no-range-check", url, str(mnt)]  # fmt: skip
