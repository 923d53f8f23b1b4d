"""Streaming file responses with Range support.

`serve_file` mimics Go's `http.ServeContent`, which is what answers a GitLab download in local
storage mode (Rails sets X-Sendfile; Workhorse serves the file with ServeContent). Bytes are
read from disk in 1 MiB chunks in a worker thread, so a multi-GiB file never sits in memory.
"""

from __future__ import annotations

import email.utils
import os
import re
import secrets
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import anyio
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

CHUNK = 1 << 20


class RangeError(ValueError):
    """An unparseable Range header, or none of its ranges overlaps the content."""

    def __init__(self, message: str, *, no_overlap: bool = False) -> None:
        super().__init__(message)
        self.no_overlap = no_overlap


_GO_INT = re.compile(r"[+-]?[0-9]+\Z")


def _go_parse_int(s: str) -> int | None:
    # strconv.ParseInt(s, 10, 64): optional sign, ASCII digits only, no spaces or underscores
    return int(s) if _GO_INT.match(s) else None


def parse_range(header: str, size: int) -> list[tuple[int, int]]:
    """Go's `parseRange`: a list of (start, length); [] for an empty header."""
    if header == "":
        return []
    if not header.startswith("bytes="):
        raise RangeError("invalid range")
    ranges: list[tuple[int, int]] = []
    no_overlap = False
    for raw in header[len("bytes=") :].split(","):
        ra = raw.strip(" \t")
        if ra == "":
            continue
        if "-" not in ra:
            raise RangeError("invalid range")
        start_s, end_s = (x.strip(" \t") for x in ra.split("-", 1))
        if start_s == "":
            # suffix range: the last N bytes
            if end_s == "" or end_s[0] == "-":
                raise RangeError("invalid range")
            n = _go_parse_int(end_s)
            if n is None or n < 0:
                raise RangeError("invalid range")
            n = min(n, size)
            ranges.append((size - n, n))
            continue
        start = _go_parse_int(start_s)
        if start is None or start < 0:
            raise RangeError("invalid range")
        if start >= size:
            no_overlap = True
            continue
        if end_s == "":
            ranges.append((start, size - start))
            continue
        end = _go_parse_int(end_s)
        if end is None or start > end:
            raise RangeError("invalid range")
        end = min(end, size - 1)
        ranges.append((start, end - start + 1))
    if no_overlap and not ranges:
        raise RangeError("invalid range: failed to overlap", no_overlap=True)
    return ranges


def http_date(ts: float) -> str:
    return email.utils.formatdate(ts, usegmt=True)


def _parse_http_date(value: str) -> float | None:
    try:
        dt = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return dt.timestamp() if dt is not None else None


async def iter_file(path: Path, start: int, length: int) -> AsyncIterator[bytes]:
    """Yield `length` bytes of `path` from `start`, 1 MiB at a time, reading off the loop."""
    f = await anyio.to_thread.run_sync(open, path, "rb")
    try:
        await anyio.to_thread.run_sync(f.seek, start)
        remaining = length
        while remaining > 0:
            chunk = await anyio.to_thread.run_sync(f.read, min(CHUNK, remaining))
            if not chunk:
                break  # file shrank under us: the client sees a short body
            remaining -= len(chunk)
            yield chunk
    finally:
        f.close()


@dataclass
class Part:
    """Either literal bytes or a slice of a file."""

    data: bytes = b""
    start: int = 0
    length: int = 0


class StreamResponse:
    """ASGI response made of literal byte strings and file slices; no body for HEAD."""

    def __init__(
        self,
        status: int,
        headers: Mapping[str, str],
        *,
        path: Path | None = None,
        parts: list[Part] | None = None,
        head: bool = False,
    ) -> None:
        self.status_code = status
        self.headers = dict(headers)
        self.path = path
        self.parts = parts or []
        self.head = head

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        await send({"type": "http.response.start", "status": self.status_code, "headers": raw})
        if not self.head:
            for part in self.parts:
                if part.data:
                    await send({"type": "http.response.body", "body": part.data, "more_body": True})
                if part.length and self.path is not None:
                    async for chunk in iter_file(self.path, part.start, part.length):
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _text_error(
    status: int, message: str, extra: Mapping[str, str] | None = None
) -> StreamResponse:
    # Go's http.Error
    body = (message + "\n").encode()
    headers = {
        "Content-Type": "text/plain; charset=utf-8",
        "X-Content-Type-Options": "nosniff",
        "Content-Length": str(len(body)),
        **(extra or {}),
    }
    return StreamResponse(status, headers, parts=[Part(body)])


def serve_file(
    request: Request,
    path: Path,
    *,
    size: int,
    headers: Mapping[str, str],
    content_type: str = "application/octet-stream",
) -> StreamResponse:
    """Go `http.ServeContent`: conditionals, single and multipart ranges, HEAD."""
    head = request.method == "HEAD"
    try:
        mtime = float(int(os.stat(path).st_mtime))  # HTTP dates have 1 s resolution
    except FileNotFoundError:
        mtime = 0.0
    base = {**headers, "Last-Modified": http_date(mtime), "Accept-Ranges": "bytes"}
    base.setdefault("Content-Type", content_type)
    # checkPreconditions: If-Unmodified-Since, then If-Modified-Since (no ETags here)
    ius = request.headers.get("if-unmodified-since")
    if ius and request.headers.get("if-match") is None:
        t = _parse_http_date(ius)
        if t is not None and mtime > t:
            return StreamResponse(412, base, head=True)
    ims = request.headers.get("if-modified-since")
    if ims and request.method in ("GET", "HEAD") and request.headers.get("if-none-match") is None:
        t = _parse_http_date(ims)
        if t is not None and mtime <= t:
            h = {k: v for k, v in base.items() if k not in ("Content-Type", "Content-Length")}
            return StreamResponse(304, h, head=True)
    range_header = request.headers.get("range", "")
    if_range = request.headers.get("if-range")
    if range_header and if_range:
        # an ETag never matches (we send none); a date must equal Last-Modified exactly
        t = None if if_range.startswith(('"', "W/")) else _parse_http_date(if_range)
        if t is None or t != mtime:
            range_header = ""
    try:
        ranges = parse_range(range_header, size)
    except RangeError as e:
        extra = {"Content-Range": f"bytes */{size}"} if e.no_overlap else {}
        return _text_error(416, str(e), extra)
    if sum(n for _, n in ranges) > size:
        ranges = []  # the client asked for more than the whole: send it all, as Go does
    if len(ranges) == 1:
        start, n = ranges[0]
        h = {
            **base,
            "Content-Range": f"bytes {start}-{start + n - 1}/{size}",
            "Content-Length": str(n),
        }
        return StreamResponse(206, h, path=path, parts=[Part(start=start, length=n)], head=head)
    if len(ranges) > 1:
        boundary = secrets.token_hex(30)
        ctype = base["Content-Type"]
        parts: list[Part] = []
        total = 0
        for i, (start, n) in enumerate(ranges):
            sep = ("\r\n" if i else "") + f"--{boundary}\r\n"
            hdr = (
                f"{sep}Content-Range: bytes {start}-{start + n - 1}/{size}\r\n"
                f"Content-Type: {ctype}\r\n\r\n"
            ).encode()
            parts.append(Part(hdr, start, n))
            total += len(hdr) + n
        tail = f"\r\n--{boundary}--\r\n".encode()
        parts.append(Part(tail))
        total += len(tail)
        h = {
            **base,
            "Content-Type": f"multipart/byteranges; boundary={boundary}",
            "Content-Length": str(total),
        }
        return StreamResponse(206, h, path=path, parts=parts, head=head)
    h = {**base, "Content-Length": str(size)}
    return StreamResponse(200, h, path=path, parts=[Part(start=0, length=size)], head=head)
