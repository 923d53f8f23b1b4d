"""The ASGI entry of the GitLab API subset (Starlette request/response objects, own router).

`RegistryApp` resolves a request's route (routing.py), hands its handler a `Ctx` and turns an
`ApiError` into GitLab's JSON answer; `build_apps` wraps it and the storage listener in the
counting middleware. Each handler follows GitLab's order of checks: parameter validation
(400), authentication (401), project lookup (404 Project Not Found), permissions (403/404),
then the resource.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from mlregfs.server.api.graphql import graphql
from mlregfs.server.api.internal import internal
from mlregfs.server.context import Ctx
from mlregfs.server.http import ApiError, Counted, Settings, Stats, json_response
from mlregfs.server.routing import resolve
from mlregfs.server.serving import StreamResponse
from mlregfs.server.storage import Signer
from mlregfs.server.store import Store


class RegistryApp:
    """ASGI app answering /api/v4/... like GitLab (plus /-/mlregfs/ test endpoints)."""

    def __init__(self, store: Store, settings: Settings, stats: Stats) -> None:
        self.store = store
        self.settings = settings
        self.stats = stats
        self.signer = Signer(store.signing_key(), expires=settings.url_expires)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        response = await self.handle(request)
        await response(scope, receive, send)

    async def handle(self, request: Request) -> Any:
        path = request.scope["path"]
        if path.startswith("/-/mlregfs/"):
            return internal(request, self.stats)
        if path == "/api/graphql":
            return await graphql(Ctx(self, request, {}, "api_nojob"))
        raw = request.scope.get("raw_path", path.encode()).decode("latin-1").split("?", 1)[0]
        method = request.method
        try:
            route, handler, groups = resolve(method, raw)
            result = await handler(Ctx(self, request, groups, route.auth))
            if method == "HEAD" and isinstance(result, Response):
                result.body = b""  # headers (incl. Content-Length) stay those of the GET
            return result
        except ApiError as e:
            resp = json_response(e.body, e.status, e.headers)
            if method == "HEAD":
                resp.body = b""
            return resp


def build_apps(store: Store, settings: Settings, stats: Stats) -> tuple[ASGIApp, ASGIApp]:
    """(main app, storage app), both counted into `stats`."""
    from mlregfs.server.storage import StorageApp

    main = RegistryApp(store, settings, stats)
    storage = StorageApp(store.data_dir, main.signer)
    return Counted(main, stats, settings), Counted(storage, stats, settings, label="storage")


__all__ = ["ApiError", "RegistryApp", "Settings", "Stats", "StreamResponse", "build_apps"]
