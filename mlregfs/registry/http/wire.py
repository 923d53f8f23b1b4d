"""HTTP/1.1 on the wire for the byte transport: where a request's connection goes (proxies
included), request and response heads, and the framing checks of a ranged answer."""

from __future__ import annotations

import base64
import re
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from mlregfs.errors import ProtocolError
from mlregfs.registry.base import Into as Into  # the Protocol's, re-exported
from mlregfs.registry.http.errors import Answered, Failure, changed, protocol

MAX_HEAD = 64 << 10  # bound on a response's status line + headers
USER_AGENT = "mlregfs/0.1"
REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 3  # hops followed, by the byte path and by JSON requests alike
ERROR_BODY = 4096  # bytes of an error answer kept for its message
REDIRECT_BODY = 64 << 10  # a redirect body longer than this is not read: the connection goes

_CONTENT_RANGE = re.compile(r"\Abytes\s+([0-9]+)-([0-9]+)/([0-9]+|\*)\Z")
_STATUS_LINE = re.compile(r"\AHTTP/1\.[01] ([0-9]{3})(?: [^\r\n]*)?\Z")


@dataclass(frozen=True)
class Redirect:
    location: str


@dataclass(frozen=True)
class Answer:
    """An answer the byte path does not consume itself: the caller maps its status."""

    status: int
    headers: Mapping[str, str]  # lower-case names
    body: bytes  # the start of the body, for the error message


@dataclass(frozen=True)
class Route:
    """Where a request's connection goes: the origin, or a proxy in front of it."""

    scheme: str
    host: str
    port: int
    netloc: str  # the origin's host[:port]: the Host header and the pool key
    proxy: tuple[str, int] | None = None
    proxy_auth: str | None = None  # Proxy-Authorization value


def route(url: str, proxies: Mapping[str, str]) -> tuple[Route, str]:
    """(route, request target) of an http(s) URL, honouring the proxies and NO_PROXY."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise protocol(f"refusing to fetch a {scheme!r} URL")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise protocol("bad port in a URL") from None
    netloc = parts.netloc.rpartition("@")[2]
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    found = Route(scheme, parts.hostname, port, netloc)
    proxy = proxies.get(scheme)
    if not proxy or urllib.request.proxy_bypass(parts.hostname):
        return found, target
    p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    auth = None
    if p.username is not None:
        pair = f"{unquote(p.username)}:{unquote(p.password or '')}".encode()
        auth = "Basic " + base64.b64encode(pair).decode()
    found = Route(scheme, parts.hostname, port, netloc, (p.hostname or "", p.port or 80), auth)
    if scheme == "http":
        target = f"http://{netloc}{target}"  # absolute form through an HTTP proxy
    return found, target


def request_head(method: str, target: str, route: Route, headers: Mapping[str, str]) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {route.netloc}", f"User-Agent: {USER_AGENT}"]
    for name, value in headers.items():
        if any(c in value for c in "\r\n\0") or any(c in name for c in "\r\n\0: "):
            raise protocol(f"invalid value in header {name}")
        lines.append(f"{name}: {value}")
    try:
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    except UnicodeEncodeError:
        raise protocol("a header is not latin-1") from None


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
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
            raise changed(where, int(m.group(3)), size)
        return 0
    length = header("content-length")  # 200: the server ignored Range
    if length is not None and length.isascii() and length.isdigit() and int(length) != size:
        raise changed(where, int(length), size)
    return start
