"""The lean byte path: a range of at most SMALL_FETCH bytes over a trio-native keep-alive
connection (a small pool per origin) with lean response parsing: no thread hop, no
http.client, no httpx. Answers it leaves alone (a 200 that ignored Range, a chunked body)
go to the worker-thread path: `get` returns FALLBACK for them.

A connection goes back to the pool only after a clean, fully read answer (issue 9.7).
"""

from __future__ import annotations

import re
import socket
import ssl
from collections import Counter
from collections.abc import Callable
from typing import Any

import trio

from mlregfs.buffers import POOL, Buffer
from mlregfs.registry.http.errors import Answered, Failure, client_closed, no_location, truncated
from mlregfs.registry.http.wire import (
    ERROR_BODY,
    MAX_HEAD,
    REDIRECT_BODY,
    REDIRECTS,
    Answer,
    Into,
    Redirect,
    Route,
    parse_head,
    range_skip,
)

IDLE_PER_ORIGIN = 8  # idle trio connections kept per origin
FALLBACK = object()

_SEP = b"\r\n\r\n"
_CHUNK_SIZE_LINE = re.compile(rb"\A[0-9a-fA-F]+[^\r\n]*\r\n")
_CLOSED_BEFORE = (
    "connection closed before an answer"  # the lean path leaves this answer to the thread path
)
_SOCKET_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)

# (where, exception) -> the Failure to raise (errors.socket_failure, bound by the transport)
SocketFailure = Callable[[str, Exception], Failure]


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


class LeanPath:
    """The trio-native connection pool and its one request: see the module docstring."""

    def __init__(self, context: ssl.SSLContext, sent: Counter[str], fail: SocketFailure) -> None:
        self._ssl = context
        self._sent = sent
        self._fail = fail
        self._closed = False
        self._idle: dict[tuple[str, str], list[_Conn]] = {}
        self._live: set[_Conn] = set()  # every open trio connection, idle or busy

    def aclose(self) -> None:
        self._closed = True
        live, self._live = list(self._live), set()
        self._idle.clear()
        for c in live:
            c.close()

    async def _take(self, route: Route) -> tuple[_Conn, bool]:
        """An idle connection to the route's origin (reused=True), else a new one."""
        if self._closed:
            raise client_closed()
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
                raise client_closed()
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

    async def get(
        self,
        route: Route,
        request: bytes,
        where: str,
        start: int,
        end: int,
        size: int,
        into: Into,
    ) -> Any:
        """One Range GET on a pooled connection: (bytes or Redirect or Answer, body bytes
        received), or FALLBACK for an answer it leaves to the thread path."""
        for fresh in (False, True):
            try:
                conn, reused = await (self._take_new(route) if fresh else self._take(route))
            except _SOCKET_ERRORS as exc:
                raise self._fail(where, _connect_cause(exc)) from exc
            keep = False
            try:
                self._sent["small"] += 1
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
                return result if result is FALLBACK else (result, got)
            except (*_SOCKET_ERRORS, Answered) as exc:
                raise self._fail(where, exc) from exc
            finally:
                if keep:
                    self._give(conn)
                else:
                    self._drop(conn)
        raise AssertionError("unreachable")

    async def _take_new(self, route: Route) -> tuple[_Conn, bool]:
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
                status, headers = parse_head(bytes(view[:at]))
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
        into: Into,
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
                raise no_location(where, status)
            return Redirect(location), 0, keep
        if status not in (200, 206):
            body, keep = await self._small_body(conn, at, filled, length, chunked, ERROR_BODY)
            return Answer(status, headers, body), 0, keep
        if status == 200 or chunked or length is None:
            return FALLBACK, 0, False  # rare: http.client slices and de-chunks them
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
