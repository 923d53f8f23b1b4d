"""GitLab's two ways of paging a listing, each bounded against a server that always announces
another page (issue 9.6): offset pages (X-Next-Page, §5) and MLflow keyset pages (§5)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any, Literal

from mlregfs.errors import ProtocolError
from mlregfs.registry import validate
from mlregfs.registry.gitlab.api import Api
from mlregfs.registry.gitlab.decode import dicts, drop
from mlregfs.registry.http.errors import where_of

PER_PAGE = 100  # GitLab's max_per_page; larger values are silently capped (§5)
MLFLOW_MAX_RESULTS = 1000  # MLflow search cap on GitLab (§5)
# Bounds on one listing: pages and rows are capped, X-Total-Pages of the first page is
# believed up to the cap, and the whole listing has a deadline of its own (each page is also
# bounded by the retry deadline).
MAX_PAGES = 1_000
MAX_ITEMS = 100_000
LISTING_DEADLINE = 120.0


async def all_packages(
    api: Api, kind: str, extra: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """Every ml_model package row (with `extra` filters) that has a valid id and name."""
    params = {"package_type": "ml_model", **(extra or {})}
    rows = await offset_pages(api, kind, api.project_url("packages"), params)
    # Everything downstream keys on the package id (and puts it in URLs): drop rows
    # without a valid one.
    good = []
    for row in rows:
        try:
            if isinstance(row.get("id"), str) or not isinstance(row.get("name"), str):
                raise validate.Invalid(f"package row {validate.shown(row)} is malformed")
            validate.ident(row.get("id"), "package id")
        except validate.Invalid as exc:
            drop("package", exc)
            continue
        good.append(row)
    return good


async def offset_pages(
    api: Api, kind: str, url: str, params: Mapping[str, str]
) -> list[dict[str, Any]]:
    """Every row of a GitLab offset-paginated listing (X-Next-Page, §5), bounded.

    At most MAX_PAGES pages (X-Total-Pages of the first page, when it says fewer, + 1 for
    rows added while we list), MAX_ITEMS rows and the listing deadline; a page that repeats
    the previous one is an error, an empty page after the first ends the listing.
    """
    where = f"GET {where_of(url)}"
    rows: list[dict[str, Any]] = []
    page = 1
    limit = MAX_PAGES
    started = api.clock()
    previous: list[Any] | None = None
    for number in range(1, MAX_PAGES + 1):
        _check_deadline(api, where, started, number)
        query = {**params, "per_page": str(PER_PAGE), "page": str(page)}
        reply = await api.json(kind, "GET", url, params=query)
        items = dicts(reply.data, where_of(url))
        if number == 1:
            total = (reply.headers.get("X-Total-Pages") or "").strip()
            if total.isascii() and total.isdigit():
                if int(total) > MAX_PAGES:
                    raise ProtocolError(f"{where}: {total} pages, more than {MAX_PAGES}")
                limit = min(MAX_PAGES, int(total) + 1)
        elif not items:
            return rows  # GitLab never announces a page it then serves empty
        ids = [r.get("id") for r in items]
        if ids == previous:
            raise ProtocolError(f"{where}: page {page} repeats the previous page")
        previous = ids
        rows.extend(items)
        if len(rows) > MAX_ITEMS:
            raise ProtocolError(f"{where}: more than {MAX_ITEMS} rows")
        next_page = reply.headers.get("X-Next-Page")
        if next_page is not None:
            if not next_page.strip():
                return rows
            if (
                not (next_page.strip().isascii() and next_page.strip().isdigit())
                or int(next_page) <= page
            ):
                raise ProtocolError(f"{where}: bad X-Next-Page {validate.shown(next_page)}")
            page = int(next_page)
        elif reply.next_link or len(items) >= PER_PAGE:
            # Headers stripped by a proxy: a full page means there may be another.
            page += 1
        else:
            return rows
        if number >= limit:
            raise ProtocolError(f"{where}: more pages than the {limit} announced")
    raise ProtocolError(f"{where}: more than {MAX_PAGES} pages")


def _check_deadline(api: Api, where: str, started: float, number: int) -> None:
    """Fail a listing that has run past its deadline (checked before each page)."""
    if number > 1 and api.clock() - started > api.listing_deadline:
        raise ProtocolError(
            f"{where}: listing unfinished after {api.listing_deadline:g} s ({number - 1} pages)"
        )


async def mlflow_pages(
    api: Api,
    kind: str,
    method: Literal["GET", "POST"],
    endpoint: str,
    key: str,
    body: dict[str, Any] | None = None,
) -> AsyncIterator[list[dict[str, Any]]]:
    """Yield each page (list of dicts) of an MLflow keyset-paginated search (§5), with the
    bounds of `offset_pages` (pages, rows, deadline, a repeating token)."""
    url = api.mlflow_url(endpoint)
    where = f"{method} {where_of(url)}"
    token: str | None = None
    seen: set[str] = set()
    count = 0
    started = api.clock()
    for number in range(1, MAX_PAGES + 1):
        _check_deadline(api, where, started, number)
        if method == "GET":
            params = {"max_results": str(MLFLOW_MAX_RESULTS)}
            if token:
                params["page_token"] = token
            reply = await api.json(kind, "GET", url, route="mlflow", params=params)
        else:
            payload = {**(body or {}), "max_results": MLFLOW_MAX_RESULTS}
            if token:
                payload["page_token"] = token
            reply = await api.json(kind, "POST", url, route="mlflow", body=payload)
        data = reply.data
        if not isinstance(data, dict):
            raise ProtocolError(f"{where}: answer is not a JSON object")
        items = dicts(data.get(key) or [], endpoint)
        count += len(items)
        if count > MAX_ITEMS:
            raise ProtocolError(f"{where}: more than {MAX_ITEMS} rows")
        yield items
        token = data.get("next_page_token") or None
        if token is None:
            return
        if not isinstance(token, str) or len(token) > 4096:
            raise ProtocolError(f"{where}: bad page token {validate.shown(token)}")
        if token in seen:
            raise ProtocolError(f"{where}: page token repeats")
        if not items:
            return  # an empty page announcing more: nothing to gain from asking again
        seen.add(token)
    raise ProtocolError(f"{where}: more than {MAX_PAGES} pages")
