"""Redirect mode: signed, expiring URLs and the object-storage-like listener that honours them.

Modelled on S3 presigned URLs: the query carries X-Amz-Date, X-Amz-Expires and an HMAC in
X-Amz-Signature over (method, path, date, expires). Like S3, the listener refuses a second
auth mechanism (an Authorization header) with 400 InvalidArgument, and unsigned, expired or
tampered requests with 403 AccessDenied; errors are XML.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from mlregfs.server.serving import Part, RangeError, StreamResponse, http_date, parse_range

BUCKET = "mlregfs-packages"
_BLOB_PATH = re.compile(rf"\A/{BUCKET}/([0-9]+)/([0-9]+)/([0-9]+)\Z")


class Signer:
    """Makes and checks presigned URLs for blobs."""

    def __init__(self, key: bytes, *, expires: int = 300) -> None:
        self.key = key
        self.expires = expires

    def _mac(self, method: str, path: str, date: str, expires: str) -> str:
        msg = f"{method}\n{path}\n{date}\n{expires}".encode()
        return hmac.new(self.key, msg, hashlib.sha256).hexdigest()

    def sign(
        self, base_url: str, blob_rel: str, method: str = "GET", *, now: float | None = None
    ) -> str:
        """URL of `blobs/<p>/<pkg>/<file>` on the storage listener at `base_url`."""
        tail = blob_rel.split("blobs/", 1)[1]
        path = f"/{BUCKET}/{tail}"
        date = datetime.fromtimestamp(now if now is not None else time.time(), UTC).strftime(
            "%Y%m%dT%H%M%SZ"
        )
        expires = str(self.expires)
        query = urlencode(
            {
                "X-Amz-Algorithm": "AWS4-HMAC-SHA256",
                "X-Amz-Credential": f"mlregfs/{date[:8]}/local/s3/aws4_request",
                "X-Amz-Date": date,
                "X-Amz-Expires": expires,
                "X-Amz-SignedHeaders": "host",
                "X-Amz-Signature": self._mac(method, path, date, expires),
            }
        )
        return f"{base_url}{path}?{query}"

    def check(self, method: str, path: str, query: dict[str, str]) -> str | None:
        """None when the request is validly signed and fresh, else the S3 error message."""
        sig = query.get("X-Amz-Signature")
        date = query.get("X-Amz-Date", "")
        expires = query.get("X-Amz-Expires", "")
        if not sig:
            return "Access Denied"
        expected = self._mac(method, path, date, expires)
        if not hmac.compare_digest(sig, expected):
            return "The request signature we calculated does not match the signature you provided."
        try:
            t0 = datetime.strptime(date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
            ttl = int(expires)
        except ValueError:
            return "Access Denied"
        if time.time() > t0 + ttl:
            return "Request has expired"
        return None


def s3_error(status: int, code: str, message: str, **extra: str) -> Response:
    fields = "".join(f"<{k}>{v}</{k}>" for k, v in extra.items())
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>{fields}"
        f"<RequestId>{secrets.token_hex(8).upper()}</RequestId></Error>"
    )
    return Response(body, status_code=status, media_type="application/xml")


class StorageApp:
    """ASGI app of the storage listener: serves blobs under DATA/blobs to signed requests."""

    def __init__(self, data_dir: Path, signer: Signer) -> None:
        self.data_dir = data_dir
        self.signer = signer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        response = self.handle(Request(scope, receive))
        await response(scope, receive, send)

    def handle(self, request: Request) -> Response | StreamResponse:
        method = request.method
        if method not in ("GET", "HEAD"):
            return s3_error(
                405,
                "MethodNotAllowed",
                "The specified method is not allowed against this resource.",
            )
        query = dict(request.query_params)
        if "authorization" in request.headers:
            # S3: a presigned URL plus an Authorization header is two auth mechanisms. The
            # header value is deliberately not echoed back (S3 would): it is a GitLab token.
            return s3_error(
                400,
                "InvalidArgument",
                "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, "
                "Signature query string parameter or the Authorization header should be specified",
                ArgumentName="Authorization",
            )
        path = request.url.path
        problem = self.signer.check(method, path, query)
        if problem is not None:
            extra = {}
            if problem == "Request has expired":
                extra = {
                    "X-Amz-Expires": query.get("X-Amz-Expires", ""),
                    "ServerTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                }
            return s3_error(403, "AccessDenied", problem, **extra)
        m = _BLOB_PATH.match(path)
        blob = self.data_dir / "blobs" / m.group(1) / m.group(2) / m.group(3) if m else None
        try:
            st = blob.stat() if blob is not None else None
        except FileNotFoundError:
            st = None
        if blob is None or st is None:
            return s3_error(404, "NoSuchKey", "The specified key does not exist.")
        size = st.st_size
        headers = {
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Last-Modified": http_date(st.st_mtime),
            "ETag": f'"{hashlib.md5(f"{blob.name}-{size}-{st.st_mtime_ns}".encode()).hexdigest()}"',
        }
        head = method == "HEAD"
        try:
            ranges = parse_range(request.headers.get("range", ""), size)
        except RangeError as e:
            if e.no_overlap:
                return s3_error(
                    416,
                    "InvalidRange",
                    "The requested range is not satisfiable",
                    RangeRequested=request.headers.get("range", ""),
                    ActualObjectSize=str(size),
                )
            ranges = []  # S3 ignores a malformed Range header
        if len(ranges) == 1:  # S3 serves one range; several are ignored (whole object)
            start, n = ranges[0]
            headers.update(
                {"Content-Range": f"bytes {start}-{start + n - 1}/{size}", "Content-Length": str(n)}
            )
            return StreamResponse(
                206, headers, path=blob, parts=[Part(start=start, length=n)], head=head
            )
        headers["Content-Length"] = str(size)
        return StreamResponse(
            200, headers, path=blob, parts=[Part(start=0, length=size)], head=head
        )
