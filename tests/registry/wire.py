"""Serve an httpx-style handler (httpx.Request -> httpx.Response) over real HTTP/1.1 sockets.

The registry's byte path (mlregfs/registry/http/transport.py) only talks to sockets, so the fake
GitLab of registry_fake.py is put on the wire here: keep-alive, bodies written chunk by chunk
as the handler's stream yields them, a body shorter than its declared Content-Length ends
with the connection (a truncated answer), a handler that raises drops the connection.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

Handler = Callable[[httpx.Request], httpx.Response]
_HOP = {"transfer-encoding", "connection", "keep-alive"}


class WireServer:
    """One listening origin on 127.0.0.1; `lock` serialises handler calls (share it between
    the servers of one fake)."""

    def __init__(
        self,
        handler: Handler,
        lock: threading.Lock | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.handler = handler
        self.scheme = "https" if tls else "http"
        self.lock = lock or threading.Lock()
        self.connections = 0  # TCP connections accepted: keep-alive reuse shows here
        # close each connection after its answer, without saying so (an idle timeout)
        self.close_each = False
        self._server = _QuietServer(("127.0.0.1", 0), _request_handler(self))
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.02,), daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def start(self) -> WireServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def __enter__(self) -> WireServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hung up mid-answer is what several tests do on purpose


def _request_handler(server: WireServer) -> type[BaseHTTPRequestHandler]:
    class RequestHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def setup(self) -> None:
            super().setup()
            # no Nagle: headers and body go in separate writes (40 ms delayed-ACK stalls)
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with server.lock:
                server.connections += 1

        def do_GET(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            request = httpx.Request(
                self.command,
                f"{server.url}{self.path}",
                headers=list(self.headers.items()),
                content=body,
            )
            try:
                with server.lock:
                    response = server.handler(request)
                    chunks = list(response.stream)  # type: ignore[arg-type]
            except Exception:
                self.close_connection = True  # like a server that died mid-request
                return
            self._send(response, chunks)

        do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

        def _send(self, response: httpx.Response, chunks: list[bytes]) -> None:
            declared = response.headers.get("Content-Length")
            total = sum(len(c) for c in chunks)
            self.send_response(response.status_code)
            for name, value in response.headers.multi_items():
                if name.lower() not in _HOP and name.lower() != "content-length":
                    self.send_header(name, value)
            self.send_header("Content-Length", declared if declared is not None else str(total))
            self.end_headers()
            if self.command == "HEAD":
                return
            for chunk in chunks:
                self.wfile.write(chunk)
            if declared is not None and int(declared) != total:
                self.close_connection = True  # the peer sees the body end early
            if server.close_each:
                self.close_connection = True

    return RequestHandler
