"""The byte transport of GitLabRegistry: Range GETs and upload PUTs, the same code in tests
and in production (issue 10). httpx carries the JSON/API requests only.

Two ways to carry one request, chosen by size, both here:
- a range of at most SMALL_FETCH bytes goes over a trio-native keep-alive connection (a small
  pool per origin) with lean response parsing: no thread hop, no http.client, no httpx;
- larger ranges, uploads, proxied requests and the odd answers the lean path leaves alone (a
  200 that ignored Range, a chunked body) run http.client in a worker thread: the second core
  receives while the trio thread serves FUSE. A thread past its deadline is abandoned and its
  socket shut down.

Both keep issue 9's rules: a total deadline per request, a connection closed after any broken
or unread answer, strict Content-Range / Content-Length / Content-Encoding checks, a 200 that
ignored Range sliced, proxies honoured (HTTP(S)_PROXY, NO_PROXY). Redirects, signed URLs,
retries and status mapping stay with the caller: this module answers Redirect, Answer or bytes.
No URL query (signatures) and no header value ever goes into a message.
"""

from __future__ import annotations

import base64
import functools
import http.client
import re
import socket
import ssl
import threading
import urllib.request
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import trio

from mlregfs import directio
from mlregfs.buffers import POOL, Buffer
from mlregfs.errors import ProtocolError, RegistryError, RegistryTimeout, RegistryUnavailable

T = TypeVar("T")

SMALL_FETCH = 64 << 10  # ranges up to this size take the trio-native path
MAX_HEAD = 64 << 10  # bound on a response's status line + headers
IDLE_PER_ORIGIN = 8
ROUTES_KEPT = 1024  # parsed URLs remembered  # idle trio connections kept per origin
UPLOAD_CHUNK = 1 << 20
READ_CHUNK = 1 << 20  # one readinto of the thread path (the abandon lock is taken per chunk)
USER_AGENT = "mlregfs/0.1"
REDIRECTS = frozenset({301, 302, 303, 307, 308})
ERROR_BODY = 4096  # bytes of an error answer kept for its message
REDIRECT_BODY = 64 << 10  # a redirect body longer than this is not read: the connection goes

_SEP = b"\r\n\r\n"
_CONTENT_RANGE = re.compile(r"\Abytes\s+([0-9]+)-([0-9]+)/([0-9]+|\*)\Z")
_STATUS_LINE = re.compile(r"\AHTTP/1\.[01] ([0-9]{3})(?: [^\r\n]*)?\Z")
_CHUNK_SIZE_LINE = re.compile(rb"\A[0-9a-fA-F]+[^\r\n]*\r\n")
_FALLBACK = object()
_CLOSED_BEFORE = (
    "connection closed before an answer"  # the lean path leaves this answer to the thread path
)
_SOCKET_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


class Failure(Exception):
    """One failed attempt: the error to raise if we give up, and how retryable it is.

    `outage=False` marks a failure that says nothing about the registry being down (a body
    cut short, a request over its deadline): it does not switch on the fail-fast outage mode.
    """

    def __init__(
        self,
        error: RegistryError,
        *,
        retryable: bool = True,
        retry_after: float | None = None,
        outage: bool = True,
    ) -> None:
        super().__init__(str(error))
        self.error = error
        self.retryable = retryable
        self.retry_after = retry_after
        self.outage = outage


class Answered(Exception):
    """The peer answered, but not with a usable HTTP/1.1 message (closed early, garbage)."""


@dataclass(frozen=True)
class Redirect:
    location: str


@dataclass(frozen=True)
class Answer:
    """An answer the byte path does not consume itself: the caller maps its status."""

    status: int
    headers: Mapping[str, str]  # lower-case names
    body: bytes  # the start of the body, for the error message


# (where, exception) -> the Failure to raise: the registry's own mapping (and scrubbing)
SocketFailure = Callable[[str, Exception], Failure]


def deadline_error(where: str, budget: float) -> RegistryTimeout:
    return RegistryTimeout(f"{where}: no complete answer within {budget:g} s")


def truncated(where: str, got: int, want: int) -> Failure:
    """A body that ended early: like a dropped connection (full retry budget), not an outage."""
    return Failure(
        RegistryUnavailable(f"{where}: body cut short, got {got} of {want} bytes"), outage=False
    )


def changed(where: str, size: int, listed: int) -> ProtocolError:
    return ProtocolError(
        f"{where}: file is {size} bytes but was listed as {listed}; it changed on the "
        "registry, list it again"
    )


def range_skip(
    where: str, status: int, header: Callable[[str], str | None], start: int, end: int, size: int
) -> int:
    """Check the framing headers of a 200/206 answer to `Range: bytes=start-(end-1)` of a file
    of `size` bytes; returns the body bytes to skip before `start` (0, or `start` for a 200)."""
    encoding = (header("content-encoding") or "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise Failure(ProtocolError(f"{where}: unexpected {encoding} encoding"))
    if status == 206:
        text = header("content-range") or ""
        m = _CONTENT_RANGE.match(text.strip())
        if m is None or int(m.group(1)) != start or int(m.group(2)) != end - 1:
            raise Failure(
                ProtocolError(f"{where}: Content-Range {text!r} is not bytes {start}-{end - 1}")
            )
        if m.group(3) != "*" and int(m.group(3)) != size:
            raise Failure(changed(where, int(m.group(3)), size), retryable=False)
        return 0
    length = header("content-length")  # 200: the server ignored Range
    if length is not None and length.isascii() and length.isdigit() and int(length) != size:
        raise Failure(changed(where, int(length), size), retryable=False)
    return start


# ---------------------------------------------------------------------------------- routes


@dataclass(frozen=True)
class _Route:
    """Where a request's connection goes: the origin, or a proxy in front of it."""

    scheme: str
    host: str
    port: int
    netloc: str  # the origin's host[:port]: the Host header and the pool key
    proxy: tuple[str, int] | None = None
    proxy_auth: str | None = None  # Proxy-Authorization value


def _route(url: str, proxies: Mapping[str, str]) -> tuple[_Route, str]:
    """(route, request target) of an http(s) URL, honouring the proxies and NO_PROXY."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise Failure(ProtocolError(f"refusing to fetch a {scheme!r} URL"), retryable=False)
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise Failure(ProtocolError("bad port in a URL"), retryable=False) from None
    netloc = parts.netloc.rpartition("@")[2]
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    route = _Route(scheme, parts.hostname, port, netloc)
    proxy = proxies.get(scheme)
    if not proxy or urllib.request.proxy_bypass(parts.hostname):
        return route, target
    p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    auth = None
    if p.username is not None:
        pair = f"{unquote(p.username)}:{unquote(p.password or '')}".encode()
        auth = "Basic " + base64.b64encode(pair).decode()
    route = _Route(scheme, parts.hostname, port, netloc, (p.hostname or "", p.port or 80), auth)
    if scheme == "http":
        target = f"http://{netloc}{target}"  # absolute form through an HTTP proxy
    return route, target


def _request_head(method: str, target: str, route: _Route, headers: Mapping[str, str]) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {route.netloc}", f"User-Agent: {USER_AGENT}"]
    for name, value in headers.items():
        if any(c in value for c in "\r\n\0") or any(c in name for c in "\r\n\0: "):
            raise Failure(ProtocolError(f"invalid value in header {name}"), retryable=False)
        lines.append(f"{name}: {value}")
    try:
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    except UnicodeEncodeError:
        raise Failure(ProtocolError("a header is not latin-1"), retryable=False) from None


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """Status and headers (lower-case names) of a response head without its blank line."""
    lines = head.decode("latin-1").split("\r\n")
    m = _STATUS_LINE.match(lines[0])
    if m is None:
        raise Answered("not an HTTP/1.1 status line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise Answered("malformed header line")
        key = name.lower()
        text = value.strip()
        old = headers.get(key)
        if old is None:
            headers[key] = text
        elif key == "content-length":
            if old != text:
                raise Answered("conflicting Content-Length headers")
        else:
            headers[key] = f"{old}, {text}"
    return int(m.group(1)), headers


# ---------------------------------------------------------------------------------- trio path


class _Conn:
    """One trio-native keep-alive connection, with its head buffer.

    Plain TCP runs on the bare non-blocking socket: a send or recv that can go at once does,
    and only a wait goes through trio (wait_readable/wait_writable). trio's own socket methods
    add a scheduler round trip to every call that succeeds, and that is most of the cost of
    a 4 KiB read. TLS goes through trio.SSLStream."""

    __slots__ = ("head", "key", "sock", "stream")

    def __init__(self, stream: trio.abc.Stream, key: tuple[str, str]) -> None:
        self.key = key
        self.head = bytearray(MAX_HEAD)
        self.sock: socket.socket | None = None
        self.stream: trio.abc.Stream | None = None
        if isinstance(stream, trio.SocketStream):
            self.sock = socket.socket(fileno=stream.socket.detach())  # keeps TCP_NODELAY
            self.sock.setblocking(False)
        else:
            self.stream = stream

    async def send_all(self, data: bytes) -> None:
        if self.stream is not None:
            await self.stream.send_all(data)
            return
        assert self.sock is not None
        view = memoryview(data)
        while view:
            try:
                view = view[self.sock.send(view) :]
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.sock)

    async def recv_into(self, view: memoryview) -> int:
        if self.stream is not None:
            data = await self.stream.receive_some(len(view))
            view[: len(data)] = data
            return len(data)
        assert self.sock is not None
        while True:
            try:
                return self.sock.recv_into(view)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)

    def close(self) -> None:
        """Close at once (no TLS close_notify): a task blocked on it wakes up."""
        if self.sock is not None:
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()
            return
        stream: Any = self.stream
        while not isinstance(stream, trio.SocketStream):
            stream = stream.transport_stream
        stream.socket.close()


# ---------------------------------------------------------------------------------- thread path


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


# ---------------------------------------------------------------------------------- transport


class Transfer:
    """Range GETs and upload PUTs for one registry client (see the module docstring)."""

    def __init__(self, timeout: float, socket_failure: SocketFailure) -> None:
        self.timeout = timeout
        self._socket_failure = socket_failure
        self._proxies = urllib.request.getproxies()  # read once: the environment is fixed
        self._ssl = ssl.create_default_context()
        # requests sent per path: tests assert the byte path they meant ran
        self.sent: Counter[str] = Counter()
        self._closed = False
        self._routes: dict[str, tuple[_Route, str]] = {}
        self._idle: dict[tuple[str, str], list[_Conn]] = {}
        self._live: set[_Conn] = set()  # every open trio connection, idle or busy
        self._local = threading.local()
        # every pooled http.client connection of every worker thread, so that aclose() can cut
        # them all (threads abandoned in a socket read then end at once)
        self._conns: set[http.client.HTTPConnection] = set()
        self._conns_lock = threading.Lock()

    def _route(self, url: str) -> tuple[_Route, str]:
        """_route(), remembered: a file's URL (or signed URL) is read many times."""
        found = _route(url, self._proxies)
        if len(self._routes) >= ROUTES_KEPT:
            self._routes.clear()
        self._routes[url] = found
        return found

    async def aclose(self) -> None:
        """Close every connection, including those of worker threads blocked on them."""
        self._closed = True
        with self._conns_lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            _shutdown(conn)
            conn.close()
        live, self._live = list(self._live), set()
        self._idle.clear()
        for c in live:
            c.close()

    # ------------------------------------------------------------------ ranged GET

    async def get_range(
        self,
        url: str,
        headers: Mapping[str, str],
        where: str,
        start: int,
        end: int,
        size: int,
        into: memoryview | None = None,
    ) -> tuple[Buffer | Redirect | Answer, int]:
        """One Range GET of [start, end) of a `size`-byte file: the bytes (in `into` when
        given), a Redirect or an Answer to map; and the body bytes received."""
        route, target = self._routes.get(url) or self._route(url)
        request = _request_head("GET", target, route, headers)
        deadline = trio.current_time() + self.timeout
        if end - start <= SMALL_FETCH and route.proxy is None:
            with trio.move_on_at(deadline) as scope:
                result = await self._small_get(route, request, where, start, end, size, into)
            if scope.cancelled_caught:
                raise Failure(deadline_error(where, self.timeout), outage=False)
            if result is not _FALLBACK:
                return result
        return await self._in_thread(
            where,
            deadline - trio.current_time(),
            self.timeout,
            self._blocking_get,
            *(route, target, headers, where, start, end, size, into),
        )

    async def _take(self, route: _Route) -> tuple[_Conn, bool]:
        """An idle connection to the route's origin (reused=True), else a new one."""
        if self._closed:
            raise Failure(RegistryUnavailable("registry client closed"), retryable=False)
        key = (route.scheme, route.netloc)
        idle = self._idle.get(key)
        if idle:
            return idle.pop(), True
        stream: trio.abc.Stream = await trio.open_tcp_stream(route.host, route.port)
        if route.scheme == "https":
            stream = trio.SSLStream(
                stream, self._ssl, server_hostname=route.host, https_compatible=True
            )
        conn = _Conn(stream, key)
        self._live.add(conn)
        try:
            if isinstance(stream, trio.SSLStream):
                await stream.do_handshake()
            if self._closed:  # aclose() ran while we connected
                raise Failure(RegistryUnavailable("registry client closed"), retryable=False)
        except BaseException:
            self._drop(conn)
            raise
        return conn, False

    def _give(self, conn: _Conn) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if self._closed or len(idle) >= IDLE_PER_ORIGIN:
            self._drop(conn)
        else:
            idle.append(conn)

    def _drop(self, conn: _Conn) -> None:
        conn.close()
        self._live.discard(conn)

    async def _small_get(
        self,
        route: _Route,
        request: bytes,
        where: str,
        start: int,
        end: int,
        size: int,
        into: memoryview | None,
    ) -> Any:
        """The lean path: one request on a pooled trio connection; _FALLBACK for an answer
        it leaves to the thread path. A connection goes back to the pool only after a clean,
        fully read answer."""
        for fresh in (False, True):
            try:
                conn, reused = await (self._take_new(route) if fresh else self._take(route))
            except _SOCKET_ERRORS as exc:
                raise self._socket_failure(where, _connect_cause(exc)) from exc
            keep = False
            try:
                self.sent["small"] += 1
                try:
                    await conn.send_all(request)
                    status, headers, at, filled = await self._read_head(conn)
                except (*_SOCKET_ERRORS, Answered) as exc:
                    if reused and not fresh and _stale(exc):
                        continue  # an idle keep-alive connection the server had closed
                    raise
                result, got, keep = await self._small_answer(
                    conn, status, headers, at, filled, where, start, end, size, into
                )
                # the server said it closes this connection (nginx after keepalive_requests)
                keep = keep and "close" not in headers.get("connection", "").lower()
                return result if result is _FALLBACK else (result, got)
            except (*_SOCKET_ERRORS, Answered) as exc:
                raise self._socket_failure(where, exc) from exc
            finally:
                if keep:
                    self._give(conn)
                else:
                    self._drop(conn)
        raise AssertionError("unreachable")

    async def _take_new(self, route: _Route) -> tuple[_Conn, bool]:
        key = (route.scheme, route.netloc)
        for c in self._idle.pop(key, []):  # their peers are as stale as the one that failed
            self._drop(c)
        return await self._take(route)

    async def _read_head(self, conn: _Conn) -> tuple[int, dict[str, str], int, int]:
        """Status, headers, where the body starts in conn.head and how much of it is there."""
        buf = conn.head
        view = memoryview(buf)
        filled = 0
        while True:
            if filled >= MAX_HEAD:
                raise Answered(f"answer headers over {MAX_HEAD} bytes")
            n = await conn.recv_into(view[filled:])
            if not n:
                raise Answered(_CLOSED_BEFORE if not filled else "connection closed in a head")
            at = buf.find(_SEP, max(0, filled - 3), filled + n)
            filled += n
            if at >= 0:
                status, headers = _parse_head(bytes(view[:at]))
                return status, headers, at + 4, filled

    async def _small_answer(
        self,
        conn: _Conn,
        status: int,
        headers: dict[str, str],
        at: int,
        filled: int,
        where: str,
        start: int,
        end: int,
        size: int,
        into: memoryview | None,
    ) -> tuple[Any, int, bool]:
        """(result, body bytes received, keep the connection)."""
        chunked = "transfer-encoding" in headers
        length_text = headers.get("content-length")
        length = (
            int(length_text)
            if length_text is not None and length_text.isascii() and length_text.isdigit()
            else None
        )
        if length_text is not None and length is None:
            raise Answered("bad Content-Length")
        if status in REDIRECTS:
            _, keep = await self._small_body(conn, at, filled, length, chunked, REDIRECT_BODY)
            location = headers.get("location")
            if not location:
                raise Failure(
                    ProtocolError(f"{where} -> {status} without Location"), retryable=False
                )
            return Redirect(location), 0, keep
        if status not in (200, 206):
            body, keep = await self._small_body(conn, at, filled, length, chunked, ERROR_BODY)
            return Answer(status, headers, body), 0, keep
        if status == 200 or chunked or length is None:
            return _FALLBACK, 0, False  # rare: http.client slices and de-chunks them
        range_skip(where, status, headers.get, start, end, size)
        want = end - start
        buf: Buffer = into if into is not None else POOL.take(want)
        view = memoryview(buf)
        take = min(length, want)
        have = filled - at
        first = min(have, take)
        view[:first] = conn.head[at : at + first]
        pos = first
        while pos < take:
            n = await conn.recv_into(view[pos:take])
            if not n:
                break
            pos += n
        if pos < want:
            raise truncated(where, pos, want)
        # anything after the body, or a body longer than the range: don't reuse
        return buf, pos, length == want and have <= length

    async def _small_body(
        self, conn: _Conn, at: int, filled: int, length: int | None, chunked: bool, limit: int
    ) -> tuple[bytes, bool]:
        """The start of a non-byte answer's body (up to `limit`), and whether the connection
        is clean afterwards (a Content-Length body read whole)."""
        have = bytes(conn.head[at:filled])
        if chunked or length is None:
            m = _CHUNK_SIZE_LINE.match(have) if chunked else None
            return (have[m.end() :] if m else have)[:limit], False
        if length > limit:
            return have[:limit], False
        while len(have) < length:
            view = memoryview(conn.head)[: length - len(have)]
            n = await conn.recv_into(view)
            if not n:
                return have, False
            have += view[:n]
        return have[:length], len(have) == length

    # ------------------------------------------------------------------ worker threads

    async def _in_thread(
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
        raise Failure(deadline_error(where, shown), outage=False)

    def _connection(self, route: _Route) -> http.client.HTTPConnection:
        """A keep-alive connection per worker thread and route (also listed transfer-wide)."""
        pool: dict[_Route, http.client.HTTPConnection] = getattr(self._local, "pool", None) or {}
        self._local.pool = pool
        conn = pool.get(route)
        if conn is None or conn not in self._conns:  # new, or cut by aclose()
            if self._closed:
                raise Failure(RegistryUnavailable("registry client closed"), retryable=False)
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
        self, ticket: _Ticket, route: _Route, where: str
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
            raise Failure(RegistryTimeout(f"{where}: abandoned"), outage=False)
        extra = {"User-Agent": USER_AGENT}
        if route.proxy_auth and route.scheme == "http":
            extra["Proxy-Authorization"] = route.proxy_auth
        return conn, extra, reused

    def _abort(
        self, conn: http.client.HTTPConnection | None, where: str, exc: BaseException
    ) -> BaseException:
        """After any failure of a blocking exchange: close its connection (a half-read answer
        must not be the start of the next one, issue 9.7); the error to raise, a socket or
        http.client error mapped by `socket_failure`."""
        if conn is not None:
            conn.close()
        if isinstance(exc, (OSError, http.client.HTTPException)):  # TimeoutError is an OSError
            return self._socket_failure(where, exc)
        return exc

    def _blocking_get(
        self,
        ticket: _Ticket,
        route: _Route,
        target: str,
        headers: Mapping[str, str],
        where: str,
        start: int,
        end: int,
        size: int,
        into: memoryview | None,
    ) -> tuple[Buffer | Redirect | Answer, int]:
        """The large-range path, in a worker thread: http.client reads straight into one
        buffer with the GIL released. Any failure after the request was sent closes the
        connection: a half-read answer must not be the start of the next one (issue 9.7)."""
        self.sent["thread"] += 1
        conn: http.client.HTTPConnection | None = None
        try:
            conn, extra, reused = self._open(ticket, route, where)
            try:
                conn.request("GET", target, headers={**headers, **extra})
                resp = conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                if not reused or ticket.abandoned:
                    raise
                conn.close()  # an idle keep-alive connection the server had closed: once more
                conn, extra, _ = self._open(ticket, route, where)
                conn.request("GET", target, headers={**headers, **extra})
                resp = conn.getresponse()
            result = self._range_answer(ticket, conn, resp, where, start, end, size, into)
        except BaseException as exc:
            failure = self._abort(conn, where, exc)
            if failure is exc:
                raise
            raise failure from exc
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
        into: memoryview | None,
    ) -> tuple[Buffer | Redirect | Answer, int]:
        status = resp.status
        if status in REDIRECTS:
            location = resp.getheader("Location")
            resp.read(REDIRECT_BODY)
            if not resp.isclosed():
                conn.close()  # a redirect with a big body: not worth reading
            if not location:
                raise Failure(
                    ProtocolError(f"{where} -> {status} without Location"), retryable=False
                )
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
                    raise Failure(RegistryTimeout(f"{where}: abandoned"), outage=False)
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

    # ------------------------------------------------------------------ upload PUT

    async def put_file(
        self,
        url: str,
        headers: Mapping[str, str],
        where: str,
        source: Path,
        size: int,
        budget: float,
    ) -> Answer:
        """Raw-body PUT of `size` bytes of the file at `source`, within `budget` seconds."""
        route, target = self._route(url)
        _request_head("PUT", target, route, headers)  # the same header checks as a GET
        return await self._in_thread(
            where, budget, budget, self._blocking_put, route, target, headers, where, source, size
        )

    def _blocking_put(
        self,
        ticket: _Ticket,
        route: _Route,
        target: str,
        headers: Mapping[str, str],
        where: str,
        source: Path,
        size: int,
    ) -> Answer:
        """On a worker thread: http.client streams the spool file in 1 MiB sends with the GIL
        released. The connection is kept only after a clean 2xx answer read whole."""
        self.sent["upload"] += 1
        conn: http.client.HTTPConnection | None = None
        try:
            conn, extra, _ = self._open(ticket, route, where)
            with directio.SequentialReader(source, UPLOAD_CHUNK) as f:
                payload = _Limited(f, size)  # gives memoryviews: http.client sends any buffer
                conn.request(
                    "PUT",
                    target,
                    body=payload,  # type: ignore[arg-type]
                    headers={**headers, **extra, "Content-Length": str(size)},
                )
            resp = conn.getresponse()
            body = resp.read(REDIRECT_BODY)
        except BaseException as exc:
            failure = self._abort(conn, where, exc)
            if failure is exc:
                raise
            raise failure from exc
        if ticket.abandoned or not resp.isclosed() or not 200 <= resp.status < 300:
            conn.close()
        return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)


def _connect_cause(exc: Exception) -> Exception:
    """trio's "all attempts to connect ... failed" carries the reason (refused, unreachable)
    in its cause: name that one, as http.client would."""
    cause: BaseException | None = exc.__cause__
    while isinstance(cause, BaseExceptionGroup):
        cause = cause.exceptions[0]
    return cause if isinstance(cause, OSError) else exc


def _stale(exc: BaseException) -> bool:
    """A reused keep-alive connection that failed before any answer: the server closed it
    while it was idle. The request is sent again once on a fresh connection (GET only)."""
    if isinstance(exc, Answered):
        return str(exc) == _CLOSED_BEFORE
    return isinstance(exc, ConnectionError | trio.BrokenResourceError)
