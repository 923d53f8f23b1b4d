"""The byte transport of the GitLab client: Range GETs and upload PUTs, the same code in
tests and in production (issue 10). httpx carries the JSON/API requests only (rest.py).

Two ways to carry one request, chosen by size: a range of at most SMALL_FETCH bytes takes the
trio-native lean path (lean.py); larger ranges, uploads, proxied requests and the odd answers
the lean path leaves alone run http.client in a worker thread (threaded.py).

Both keep issue 9's rules: a total deadline per request, a connection closed after any broken
or unread answer, strict Content-Range / Content-Length / Content-Encoding checks, a 200 that
ignored Range sliced, proxies honoured (HTTP(S)_PROXY, NO_PROXY). Redirects, signed URLs,
retries and status mapping stay with the caller: this module answers Redirect, Answer or bytes.
No URL query (signatures) and no header value ever goes into a message.
"""

from __future__ import annotations

import functools
import ssl
import urllib.request
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import trio

from mlregfs.buffers import Buffer
from mlregfs.registry.http import errors
from mlregfs.registry.http.errors import Scrub, over_deadline
from mlregfs.registry.http.lean import FALLBACK, LeanPath
from mlregfs.registry.http.threaded import Request, ThreadPath
from mlregfs.registry.http.wire import Answer, Into, Redirect, Route, request_head, route

SMALL_FETCH = 64 << 10  # ranges up to this size take the trio-native path
ROUTES_KEPT = 1024  # parsed URLs remembered


class Transport:
    """Range GETs and upload PUTs for one registry client (see the module docstring)."""

    def __init__(self, timeout: float, scrub: Scrub) -> None:
        self.timeout = timeout
        self._proxies = urllib.request.getproxies()  # read once: the environment is fixed
        context = ssl.create_default_context()
        # requests sent per path: tests assert the byte path they meant ran
        self.sent: Counter[str] = Counter()
        fail = functools.partial(errors.socket_failure, timeout=timeout, scrub=scrub)
        self.lean = LeanPath(context, self.sent, fail)
        self.threads = ThreadPath(timeout, context, self.sent, fail)
        self._routes: dict[str, tuple[Route, str]] = {}

    def _route(self, url: str) -> tuple[Route, str]:
        """route(), remembered: a file's URL (or signed URL) is read many times."""
        found = self._routes.get(url)
        if found is None:
            found = route(url, self._proxies)
            if len(self._routes) >= ROUTES_KEPT:
                self._routes.clear()
            self._routes[url] = found
        return found

    async def aclose(self) -> None:
        """Close every connection, including those of worker threads blocked on them."""
        self.threads.aclose()
        self.lean.aclose()

    async def get_range(
        self,
        url: str,
        headers: Mapping[str, str],
        where: str,
        start: int,
        end: int,
        size: int,
        into: Into = None,
    ) -> tuple[Buffer | Redirect | Answer, int]:
        """One Range GET of [start, end) of a `size`-byte file: the bytes (in `into` when
        given), a Redirect or an Answer to map; and the body bytes received."""
        found, target = self._route(url)
        request = request_head("GET", target, found, headers)
        deadline = trio.current_time() + self.timeout
        if end - start <= SMALL_FETCH and found.proxy is None:
            with trio.move_on_at(deadline) as scope:
                result = await self.lean.get(found, request, where, start, end, size, into)
            if scope.cancelled_caught:
                raise over_deadline(where, self.timeout)
            if result is not FALLBACK:
                return result
        req = Request(found, target, headers, where)
        budget = deadline - trio.current_time()
        get = self.threads.get
        return await self.threads.run(where, budget, self.timeout, get, req, start, end, size, into)

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
        found, target = self._route(url)
        request_head("PUT", target, found, headers)  # the same header checks as a GET
        req = Request(found, target, headers, where)
        return await self.threads.run(where, budget, budget, self.threads.put, req, source, size)
