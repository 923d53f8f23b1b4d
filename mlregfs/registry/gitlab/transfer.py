"""File bytes: ranged reads through the ml_models (or package-file) download route, with the
signed storage URL it redirects to remembered for a while, and uploads as one raw-body PUT
with Content-Length (what Workhorse expects, §3) after an optional /authorize preflight."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qsl, quote, urljoin, urlsplit

from mlregfs.buffers import Buffer
from mlregfs.errors import Forbidden, NotFound
from mlregfs.registry import validate
from mlregfs.registry.gitlab.api import Api, Route
from mlregfs.registry.http.errors import Failure, protocol, status_failure, where_of
from mlregfs.registry.http.wire import MAX_REDIRECTS, Answer, Into, Redirect
from mlregfs.registry.types import Candidate, FileOwner, ModelVersion, RemoteFile, owner_route_id

log = logging.getLogger(__name__)

SIGNED_URL_TTL = 60.0  # never reuse a signed storage URL longer than this (seconds)
SIGNED_URL_MARGIN = 5.0  # stop reusing it this long before the URL says it expires
# Uploads have a total deadline of `timeout + size / MIN_UPLOAD_RATE` per attempt (and the
# operation `retry_deadline + size / MIN_UPLOAD_RATE`): 10 GiB may take up to ~11 h.
MIN_UPLOAD_RATE = 256 << 10  # bytes per second

SignedKey = tuple[int, int, str]  # (package id, file id, path)


class Transfers:
    """read_range, authorize_upload and upload over one Api."""

    def __init__(self, api: Api) -> None:
        self._api = api
        self.signed: dict[SignedKey, tuple[str, float]] = {}  # -> (url, expiry)

    # ------------------------------------------------------------------------------ reads

    async def read_range(
        self, owner: FileOwner, file: RemoteFile, start: int, end: int, into: Into
    ) -> Buffer:
        """Bytes [start, end) of `file` (a non-empty range, checked by the caller)."""
        url, route = self._download_url(owner, file)
        key = (file.package_id, file.file_id, file.path)

        async def attempt() -> Buffer:
            cached = self._signed_url(key)
            if cached is not None:
                try:
                    return await self._follow(cached, "storage", start, end, file, into)
                except Failure as failure:
                    self.signed.pop(key, None)
                    if failure.error.status not in (400, 403):
                        raise
                    # Expired or revoked signature: ask GitLab for a fresh one right away.
                    log.debug("signed URL for %s refused; re-signing", file.path)
            return await self._follow(url, route, start, end, file, into, cache_key=key)

        return await self._api.retrying(attempt, f"GET {where_of(url)}")

    def _download_url(self, owner: FileOwner, file: RemoteFile) -> tuple[str, Route]:
        if isinstance(owner, Candidate) or owner.id is not None:
            segments = "/".join(quote(seg, safe="") for seg in file.path.split("/"))
            route_id = quote(owner_route_id(owner), safe=":")
            url = self._api.project_url(f"packages/ml_models/{route_id}/files/{segments}")
            return url, "ml_models"
        if file.file_id <= 0:
            raise NotFound(f"{file.path}: no file id to download by", status=None)
        # Packages-only mode knows no model-version id: download by package-file id (18.4+).
        path = f"packages/{file.package_id}/package_files/{file.file_id}/download"
        return self._api.project_url(path), "api"

    def _signed_url(self, key: SignedKey) -> str | None:
        entry = self.signed.get(key)
        if entry is None:
            return None
        url, expiry = entry
        if self._api.clock() >= expiry:
            del self.signed[key]
            return None
        return url

    def _remember_signed(self, key: SignedKey, url: str) -> None:
        ttl = min(SIGNED_URL_TTL, signed_url_lifetime(url, time.time()) - SIGNED_URL_MARGIN)
        if ttl > 0:
            self.signed[key] = (url, self._api.clock() + ttl)

    async def _follow(
        self,
        url: str,
        route: Route,
        start: int,
        end: int,
        file: RemoteFile,
        into: Into,
        cache_key: SignedKey | None = None,
    ) -> Buffer:
        """One Range GET, following redirects to storage without GitLab credentials."""
        kind = "read_storage" if route == "storage" else "read"
        result = await self._range_get(url, route, kind, start, end, file, into)
        for hop in range(MAX_REDIRECTS + 1):
            if not isinstance(result, Redirect):
                return result
            if hop == MAX_REDIRECTS:
                break
            where = f"GET {where_of(url)}"
            try:
                url = validate.url(urljoin(url, result.location))
            except (validate.Invalid, ValueError) as exc:  # urljoin refuses some garbage too
                raise protocol(f"{where}: {exc}") from None
            if hop == 0 and cache_key is not None and route != "storage":
                self._remember_signed(cache_key, url)
            # Signed object-storage URLs refuse a second auth mechanism (§4): send none.
            result = await self._range_get(url, "storage", "read_storage", start, end, file, into)
        raise protocol(f"GET {where_of(url)}: more than {MAX_REDIRECTS} redirects")

    async def _range_get(
        self,
        url: str,
        route: Route,
        kind: str,
        start: int,
        end: int,
        file: RemoteFile,
        into: Into,
    ) -> Buffer | Redirect:
        where = f"GET {where_of(url)}"
        headers = self._api.auth_headers(route)
        headers["Range"] = f"bytes={start}-{end - 1}"
        headers["Accept-Encoding"] = "identity"  # byte offsets must mean file offsets
        self._api.stats.count(kind)
        result, received = await self._api.bytes.get_range(
            url, headers, where, start, end, file.size, into
        )
        self._api.stats.bytes_downloaded += received
        log.debug("%s [%d-%d) -> %s", where, start, end, type(result).__name__)
        if isinstance(result, Answer):
            raise status_failure(where, result.status, result.headers, result.body, self._api.scrub)
        return result

    # ------------------------------------------------------------------------------ writes

    # The /authorize preflight runs every permission and name check of the upload, stores
    # nothing.

    def _file_url(self, owner: FileOwner, path: str) -> str:
        if isinstance(owner, ModelVersion) and owner.id is None:
            # only the MLflow API tells a version's id, and it refuses job tokens (§6, §7)
            raise Forbidden(
                f"cannot upload to {owner.model}/{owner.version}: its id is only listed by the"
                " MLflow API, which refuses this token (CI job tokens can upload to candidates;"
                " use a personal or project access token for versions)"
            )
        segments = "/".join(quote(seg, safe="") for seg in path.split("/"))
        route_id = quote(owner_route_id(owner), safe=":")
        return self._api.project_url(f"packages/ml_models/{route_id}/files/{segments}")

    async def authorize_upload(self, owner: FileOwner, path: str) -> None:
        """PUT …/files/<path>/authorize: 200 if an upload of `path` would be accepted."""
        url = self._file_url(owner, path) + "/authorize"
        await self._api.json("authorize", "PUT", url, route="ml_models")

    async def upload(self, owner: FileOwner, path: str, source: Path, size: int) -> None:
        """Raw-body PUT of the file at `source`, streamed from disk; 201 or an error."""
        api = self._api
        url = self._file_url(owner, path)
        where = f"PUT {where_of(url)}"

        # a total deadline that grows with the size: a slow link is fine, a stall is not
        transfer = size / MIN_UPLOAD_RATE
        budget = api.timeout + transfer

        async def attempt() -> None:
            api.stats.count("upload")
            headers = {
                **api.auth_headers("ml_models"),  # per attempt: the token may rotate
                "Content-Type": "application/octet-stream",
            }
            answer = await api.bytes.put_file(url, headers, where, source, size, budget)
            if answer.status != 201:
                raise status_failure(where, answer.status, answer.headers, answer.body, api.scrub)
            api.stats.bytes_uploaded += size

        await api.retrying(attempt, where, extra=transfer)


def signed_url_lifetime(url: str, now: float) -> float:
    """Seconds a signed storage URL stays valid, from its query (inf when it does not say)."""
    query = {k.lower(): v for k, v in parse_qsl(urlsplit(url).query, keep_blank_values=True)}
    for prefix in ("x-amz-", "x-goog-"):
        expires = query.get(prefix + "expires")
        if expires is not None and expires.isascii() and expires.isdigit():
            signed_at = _parse_compact_date(query.get(prefix + "date", ""))
            start = signed_at if signed_at is not None else now
            return start + int(expires) - now
    expires = query.get("expires")  # S3 v2 query auth, GCS v2, CloudFront: epoch seconds
    if expires is not None and expires.isascii() and expires.isdigit():
        return int(expires) - now
    return float("inf")


def _parse_compact_date(text: str) -> float | None:
    try:
        return datetime.strptime(text, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None
