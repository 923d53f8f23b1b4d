"""A hostile registry for tests: a loopback HTTP proxy in front of a real `mlregfs serve`.

    with HostileProxy(server.url) as proxy:
        proxy.rewrite_json = lambda path, query, data: ...   # lie in listings
        proxy.drip = lambda path: "part-000" in path         # 1 byte/s after the headers
        proxy.truncate_rate = 0.2                            # cut download bodies short
        mount(proxy.url + "/acme/registry")

Faults apply per request and can be switched at any time; everything is bounded (drips end after
`drip_limit` seconds or at close) and the proxy listens on 127.0.0.1 only.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

# headers that describe one hop, not the answer
_HOP = {"connection", "keep-alive", "transfer-encoding", "host", "content-length"}

JsonRewrite = Callable[[str, dict[str, str], Any], Any]
# (method, path, query) -> (status, headers, JSON data) answered without asking upstream, or None
Answer = Callable[[str, str, dict[str, str]], tuple[int, dict[str, str], Any] | None]
# (path, query, data, headers) -> (data, headers); may answer without asking upstream
PageRewrite = Callable[[str, dict[str, str], Any, dict[str, str]], tuple[Any, dict[str, str]]]


def is_download(path: str) -> bool:
    """A byte download (ml_models file route or package-file download), not a listing."""
    return ("/packages/ml_models/" in path and "/files/" in path) or path.endswith("/download")


class HostileProxy:
    """Forward to `upstream`, applying the faults currently switched on."""

    def __init__(self, upstream: str, *, seed: int = 9) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.rewrite_json: JsonRewrite | None = None  # applied to every JSON answer
        self.rewrite_page: PageRewrite | None = None  # applied to JSON answers, with headers
        self.answer: Answer | None = None  # made-up JSON answers (endless pages, ...)
        self.drip: Callable[[str], bool] | None = None  # True: send this body 1 byte per second
        self.drip_limit = 60.0  # seconds one drip may last
        self.truncate_rate = 0.0  # share of download bodies cut off mid-way
        self.bad_content_range = 0  # the next N partial downloads get a wrong Content-Range
        self.gzip = 0  # the next N downloads claim Content-Encoding: gzip
        self.counts: Counter[str] = Counter()  # path -> requests seen
        self.faults: Counter[str] = Counter()  # fault name -> times applied
        self.closing = threading.Event()
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def requests(self, contains: str = "") -> int:
        """Requests seen so far whose path contains `contains`."""
        with self._lock:
            return sum(n for p, n in self.counts.items() if contains in p)

    def take(self, fault: str) -> bool:
        """Consume one of the next-N faults (`bad_content_range`, `gzip`)."""
        with self._lock:
            left = getattr(self, fault)
            if left <= 0:
                return False
            setattr(self, fault, left - 1)
            self.faults[fault] += 1
            return True

    def roll(self, rate: float, fault: str) -> bool:
        with self._lock:
            hit = rate > 0 and self._random.random() < rate
            if hit:
                self.faults[fault] += 1
            return hit

    def start(self) -> HostileProxy:
        self._thread.start()
        return self

    def close(self) -> None:
        self.closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def __enter__(self) -> HostileProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _handler(proxy: HostileProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as GitLab: poisoned connections matter

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: pytest shows the test's own output

        def do_GET(self) -> None:
            self._forward()

        do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

        def _forward(self) -> None:
            parts = urlsplit(self.path)
            path, query = parts.path, dict(parse_qsl(parts.query))
            with proxy._lock:
                proxy.counts[path] += 1
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            made = proxy.answer(self.command, path, query) if proxy.answer else None
            if made is not None:
                status, out, data = made
                self._send(
                    status, {"Content-Type": "application/json", **out}, json.dumps(data).encode()
                )
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                out = {k: v for k, v in resp.getheaders() if k.lower() not in _HOP}
                ctype = resp.getheader("Content-Type") or ""
                if self.command == "GET" and is_download(path) and resp.status in (200, 206):
                    self._download(resp, path, out)
                elif "json" in ctype and (proxy.rewrite_json or proxy.rewrite_page):
                    self._json(resp.status, path, query, resp.read(), out)
                else:
                    self._send(resp.status, out, resp.read())
            finally:
                conn.close()

        def _json(
            self, status: int, path: str, query: dict[str, str], raw: bytes, out: dict[str, str]
        ) -> None:
            data = json.loads(raw) if raw else None
            if proxy.rewrite_json is not None:
                data = proxy.rewrite_json(path, query, data)
            if proxy.rewrite_page is not None:
                data, out = proxy.rewrite_page(path, query, data, out)
            self._send(status, out, json.dumps(data).encode())

        def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command == "HEAD":
                return
            if proxy.drip is not None and proxy.drip(urlsplit(self.path).path):
                with proxy._lock:
                    proxy.faults["drip"] += 1
                self._drip(body)
            else:
                self.wfile.write(body)

        def _download(self, resp: http.client.HTTPResponse, path: str, out: dict[str, str]) -> None:
            body = resp.read()
            if resp.status == 206 and proxy.take("bad_content_range"):
                out = {k: v for k, v in out.items() if k.lower() != "content-range"}
                out["Content-Range"] = f"bytes 0-{len(body) - 1}/{len(body) + 12345}"
            if proxy.take("gzip"):
                out["Content-Encoding"] = "gzip"
            self.send_response(resp.status)
            for k, v in out.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if proxy.drip is not None and proxy.drip(path):
                with proxy._lock:
                    proxy.faults["drip"] += 1
                self._drip(body)
            elif len(body) > 1 and proxy.roll(proxy.truncate_rate, "truncate"):
                cut = proxy._random.randrange(0, len(body))
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True  # the peer sees the connection end mid-body
            else:
                self.wfile.write(body)

        def _drip(self, body: bytes) -> None:
            """One byte per second until the body ends, the limit passes or we close."""
            end = time.monotonic() + proxy.drip_limit
            self.close_connection = True
            for i in range(len(body)):
                if proxy.closing.is_set() or time.monotonic() > end:
                    return
                try:
                    self.wfile.write(body[i : i + 1])
                    self.wfile.flush()
                except OSError:
                    with proxy._lock:
                        proxy.faults["drip_cut"] += 1  # the client gave up: good
                    return
                if proxy.closing.wait(1.0):
                    return

    return Handler
