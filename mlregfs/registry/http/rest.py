"""JSON requests over httpx.AsyncClient under trio: one attempt each, bounded in total by the
timeout, same-origin redirects followed by hand (the token is in a header httpx would not
strip), any status not accepted mapped by errors.py. Retries are the caller's (retrying.py).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
import trio

from mlregfs.registry.base import RegistryStats
from mlregfs.registry.http.errors import (
    Scrub,
    httpx_failure,
    not_json,
    over_deadline,
    protocol,
    status_failure,
    where_of,
)
from mlregfs.registry.http.wire import MAX_REDIRECTS, REDIRECTS, USER_AGENT

log = logging.getLogger(__name__)

# what tests inject to carry the JSON requests (the byte path always uses real sockets)
JsonTransport = httpx.AsyncBaseTransport


@dataclass(frozen=True)
class Reply:
    """A JSON answer: decoded body (None when empty), status and headers."""

    data: Any
    status: int
    headers: Mapping[str, str]  # case-insensitive
    next_link: bool  # a `Link: <...>; rel="next"` header


class Rest:
    """One httpx client for the JSON requests of one registry client."""

    def __init__(
        self,
        timeout: float,
        transport: JsonTransport | None,
        stats: RegistryStats,
        scrub: Scrub,
    ) -> None:
        # `timeout` bounds one HTTP request in total (connect, headers and body), not one
        # socket read: a server that drips a byte a second must not hold a reader for ever.
        self._timeout = timeout
        self._stats = stats
        self._scrub = scrub
        self._client = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(timeout),
            follow_redirects=False,  # redirects are followed by hand, without credentials
            headers={"User-Agent": USER_AGENT},
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def request(
        self,
        kind: str,
        method: str,
        url: str,
        headers: dict[str, str],
        params: Mapping[str, str] | None,
        body: Any,
        passthrough: frozenset[int],
    ) -> Reply:
        """One attempt. Statuses in `passthrough` are returned, not raised."""
        headers = {"Accept": "application/json", **headers}
        where = f"{method} {where_of(url)}"
        for _hop in range(MAX_REDIRECTS + 1):
            self._stats.count(kind)
            resp = await self._bounded(where, method, url, params, body, headers)
            log.debug("%s -> %d", where, resp.status_code)
            if resp.status_code not in REDIRECTS or method != "GET":
                break
            # A renamed project answers 301 (§7). Follow only within the same origin, since
            # these requests carry the token in a header httpx would not strip.
            target = urljoin(str(resp.url), resp.headers.get("Location", ""))
            if _origin(target) != _origin(url):
                raise protocol(f"{where} -> {resp.status_code} to another host; not followed")
            url, params = target, None
        status = resp.status_code
        if 200 <= status < 300 or status in passthrough:
            data = None
            if resp.content:
                try:
                    data = resp.json()
                except ValueError:
                    if status not in passthrough or status < 300:
                        raise not_json(where, status) from None
            return Reply(data, status, resp.headers, "next" in resp.links)
        raise status_failure(where, status, resp.headers, resp.content, self._scrub)

    async def _bounded(
        self,
        where: str,
        method: str,
        url: str,
        params: Mapping[str, str] | None,
        body: Any,
        headers: dict[str, str],
    ) -> httpx.Response:
        """One httpx request, body included, within `timeout` in total (not per read)."""
        with trio.move_on_after(self._timeout):
            try:
                return await self._client.request(
                    method, url, params=params, json=body, headers=headers
                )
            except httpx.HTTPError as exc:
                raise httpx_failure(where, exc, self._timeout, self._scrub) from exc
        raise over_deadline(where, self._timeout)


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return (parts.scheme.lower(), parts.netloc.lower())
