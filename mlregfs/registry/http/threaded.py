"""The worker-thread byte path: larger ranges, uploads, proxied requests and the answers the
lean path leaves alone run http.client in a worker thread, so the second core receives while
the trio thread serves FUSE. A thread past its deadline (or whose caller is cancelled) is
abandoned and its socket shut down, so it ends promptly and never holds the daemon.

Any failure after a request was sent closes its connection: a half-read answer must not be
the start of the next one (issue 9.7).
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import socket
import ssl
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import trio

from mlregfs import directio
from mlregfs.buffers import POOL, Buffer
from mlregfs.registry.http.errors import (
    abandoned,
    client_closed,
    no_location,
    over_deadline,
    truncated,
)
from mlregfs.registry.http.lean import SocketFailure
from mlregfs.registry.http.wire import (
    ERROR_BODY,
    REDIRECT_BODY,
    REDIRECTS,
    USER_AGENT,
    Answer,
    Into,
    Redirect,
    Route,
    range_skip,
)

T = TypeVar("T")

UPLOAD_CHUNK = 1 << 20
READ_CHUNK = 1 << 20  # one readinto (the abandon lock is taken per chunk)


class _Ticket:
    """One blocking request in a worker thread: the connection it uses, so that the trio side
    can cut it off when the request's deadline passes or its caller is cancelled. `lock` is
    held around each write into a caller's buffer: once abandon() returns, none follows."""

    def __init__(self) -> None:
        self.conn: http.client.HTTPConnection | None = None
        self.abandoned = False
        self.lock = threading.Lock()

    def abandon(self) -> None:
        self.abandoned = True
        _shutdown(self.conn)
        with self.lock:  # the read in progress ends at once on a shut-down socket
            pass


def _close(conn: http.client.HTTPConnection | None) -> None:
    if conn is not None:
        conn.close()


def _shutdown(conn: http.client.HTTPConnection | None) -> None:
    """Make a thread blocked on `conn` return at once (shutdown is safe across threads)."""
    sock = conn.sock if conn is not None else None
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _Limited:
    """A file object that ends after `size` bytes: the body always matches Content-Length."""

    def __init__(self, f: Any, size: int) -> None:
        self.f, self.left = f, size

    def read(self, n: int = -1) -> bytes | memoryview:
        n = self.left if n < 0 else min(n, self.left)
        data = self.f.read(n) if n else b""
        self.left -= len(data)
        if n and not data:
            raise OSError(f"spool ended {self.left} bytes early")
        return data


@dataclass(frozen=True)
class Request:
    """One request for a worker thread: where its connection goes, its target and headers,
    and how messages name it."""

    route: Route
    target: str
    headers: Mapping[str, str]
    where: str


class ThreadPath:
    """http.client connections, one per worker thread and route: see the module docstring."""

    def __init__(
        self, timeout: float, context: ssl.SSLContext, sent: Counter[str], fail: SocketFailure
    ) -> None:
        self.timeout = timeout
        self._ssl = context
        self._sent, self._fail = sent, fail
        self._closed = False
        self._local = threading.local()
        # every pooled http.client connection of every worker thread, so that aclose() can cut
        # them all (threads abandoned in a socket read then end at once)
        self._conns: set[http.client.HTTPConnection] = set()
        self._conns_lock = threading.Lock()

    def aclose(self) -> None:
        self._closed = True
        with self._conns_lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            _shutdown(conn)
            conn.close()

    async def run(
        self, where: str, budget: float, shown: float, fn: Callable[..., T], *args: Any
    ) -> T:
        """Run blocking `fn(ticket, *args)` in a worker thread for at most `budget` seconds.

        Past the budget, or when the caller is cancelled (unmount), the thread is abandoned
        and its socket shut down, so it ends promptly and never holds the daemon or a reader.
        """
        ticket = _Ticket()
        finished = False
        try:
            with trio.move_on_after(max(budget, 0.0)):
                result = await trio.to_thread.run_sync(
                    functools.partial(fn, ticket, *args), abandon_on_cancel=True
                )
                finished = True
                return result
        finally:
            if not finished:
                ticket.abandon()
        raise over_deadline(where, shown)

    def _connection(self, route: Route) -> http.client.HTTPConnection:
        """A keep-alive connection per worker thread and route (also listed transfer-wide)."""
        pool: dict[Route, http.client.HTTPConnection] = getattr(self._local, "pool", None) or {}
        self._local.pool = pool
        conn = pool.get(route)
        if conn is None or conn not in self._conns:  # new, or cut by aclose()
            if self._closed:
                raise client_closed()
            host, port = route.proxy or (route.host, route.port)
            if route.scheme == "https":
                conn = http.client.HTTPSConnection(
                    host, port, timeout=self.timeout, context=self._ssl, blocksize=UPLOAD_CHUNK
                )
            else:
                conn = http.client.HTTPConnection(
                    host, port, timeout=self.timeout, blocksize=UPLOAD_CHUNK
                )
            if route.proxy is not None and route.scheme == "https":
                tunnel = {"Proxy-Authorization": route.proxy_auth} if route.proxy_auth else None
                conn.set_tunnel(route.host, route.port, headers=tunnel)
            pool[route] = conn
            with self._conns_lock:
                self._conns.add(conn)
        return conn

    def _open(
        self, ticket: _Ticket, route: Route, where: str
    ) -> tuple[http.client.HTTPConnection, dict[str, str], bool]:
        """The thread's connection, connected now (not inside request(), so that a request
        abandoned while connecting never goes on to wait for an answer), the headers every
        request on it carries, and whether it was open already (reused)."""
        conn = self._connection(route)
        ticket.conn = conn
        reused = conn.sock is not None
        if not reused:
            conn.connect()
        if ticket.abandoned:
            raise abandoned(where)
        extra = {"User-Agent": USER_AGENT}
        if route.proxy_auth and route.scheme == "http":
            extra["Proxy-Authorization"] = route.proxy_auth
        return conn, extra, reused

    @contextlib.contextmanager
    def _exchange(self, ticket: _Ticket, where: str) -> Iterator[None]:
        """Around a blocking exchange: after any failure its connection is closed (a half-read
        answer must not be the start of the next one, issue 9.7), and a socket or http.client
        error is raised as errors.socket_failure maps it."""
        try:
            yield
        except (OSError, http.client.HTTPException) as exc:  # TimeoutError is an OSError
            _close(ticket.conn)
            raise self._fail(where, exc) from exc
        except BaseException:
            _close(ticket.conn)
            raise

    def get(
        self, ticket: _Ticket, req: Request, start: int, end: int, size: int, into: Into
    ) -> tuple[Buffer | Redirect | Answer, int]:
        """The large-range path, in a worker thread: http.client reads straight into one
        buffer with the GIL released. Any failure after the request was sent closes the
        connection: a half-read answer must not be the start of the next one (issue 9.7)."""
        self._sent["thread"] += 1
        where = req.where
        with self._exchange(ticket, where):
            conn, extra, reused = self._open(ticket, req.route, where)
            try:
                conn.request("GET", req.target, headers={**req.headers, **extra})
                resp = conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                if not reused or ticket.abandoned:
                    raise
                conn.close()  # an idle keep-alive connection the server had closed: once more
                conn, extra, _ = self._open(ticket, req.route, where)
                conn.request("GET", req.target, headers={**req.headers, **extra})
                resp = conn.getresponse()
            result = self._range_answer(ticket, conn, resp, where, start, end, size, into)
        if ticket.abandoned:
            conn.close()  # its socket may have been shut down under us
        return result

    def _range_answer(
        self,
        ticket: _Ticket,
        conn: http.client.HTTPConnection,
        resp: http.client.HTTPResponse,
        where: str,
        start: int,
        end: int,
        size: int,
        into: Into,
    ) -> tuple[Buffer | Redirect | Answer, int]:
        status = resp.status
        if status in REDIRECTS:
            location = resp.getheader("Location")
            resp.read(REDIRECT_BODY)
            if not resp.isclosed():
                conn.close()  # a redirect with a big body: not worth reading
            if not location:
                raise no_location(where, status)
            return Redirect(location), 0
        if status not in (200, 206):
            body = resp.read(ERROR_BODY)
            conn.close()
            return Answer(status, {k.lower(): v for k, v in resp.getheaders()}, body), 0
        skip = range_skip(where, status, resp.getheader, start, end, size)
        want = end - start
        buf: Buffer = into if into is not None else POOL.take(want)
        view = memoryview(buf)
        received = 0
        while skip:
            chunk = resp.read(min(skip, READ_CHUNK))
            if not chunk:
                break
            skip -= len(chunk)
            received += len(chunk)
        pos = 0
        while pos < want:
            with ticket.lock:  # never write into a caller's buffer once abandoned
                if ticket.abandoned:
                    raise abandoned(where)
                n = resp.readinto(view[pos : pos + READ_CHUNK])
            if not n:
                break
            pos += n
        received += pos
        if pos < want:
            raise truncated(where, pos, want)
        if status == 200 or resp.length:
            conn.close()  # unread rest of a full answer: don't reuse this connection
        return buf, received

    def put(self, ticket: _Ticket, req: Request, source: Path, size: int) -> Answer:
        """On a worker thread: http.client streams the spool file in 1 MiB sends with the GIL
        released. The connection is kept only after a clean 2xx answer read whole."""
        self._sent["upload"] += 1
        with self._exchange(ticket, req.where):
            conn, extra, _ = self._open(ticket, req.route, req.where)
            with directio.SequentialReader(source, UPLOAD_CHUNK) as f:
                payload = _Limited(f, size)  # gives memoryviews: http.client sends any buffer
                conn.request(
                    "PUT",
                    req.target,
                    body=payload,  # type: ignore[arg-type]
                    headers={**req.headers, **extra, "Content-Length": str(size)},
                )
            resp = conn.getresponse()
            body = resp.read(REDIRECT_BODY)
        if ticket.abandoned or not resp.isclosed() or not 200 <= resp.status < 300:
            conn.close()
        return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)
