"""The GitLab API subset as an ASGI app (Starlette request/response objects, own router).

Routing matches the raw (still percent-encoded) path, as Grape does, so that `acme%2Freg` is
one `:id` segment and a `%2F` inside a file name segment decodes to `/` and fails validation.
Each handler follows GitLab's order of checks: parameter validation (400), authentication
(401), project lookup (404 Project Not Found), permissions (403/404), then the resource.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from mlregfs.server.api.graphql import graphql
from mlregfs.server.api.ml_models import ml_models_handler
from mlregfs.server.api.mlflow_registry import (
    MLFLOW_ROUTES,
    mlflow_artifacts_download,
    mlflow_artifacts_list,
)
from mlregfs.server.api.packages import (
    delete_package,
    delete_package_file,
    download_package_file,
    get_package,
    get_project,
    list_package_files,
    list_packages,
)
from mlregfs.server.context import Ctx, Route
from mlregfs.server.http import ApiError, Counted, Settings, Stats, grape_error, json_response
from mlregfs.server.serving import StreamResponse
from mlregfs.server.storage import Signer
from mlregfs.server.store import (
    Store,
)


class RegistryApp:
    """ASGI app answering /api/v4/... like GitLab (plus /-/mlregfs/ test endpoints)."""

    def __init__(self, store: Store, settings: Settings, stats: Stats) -> None:
        self.store = store
        self.settings = settings
        self.stats = stats
        self.signer = Signer(store.signing_key(), expires=settings.url_expires)
        P = r"\A/api/v4/projects/(?P<id>[^/]+)"
        ml = ml_models_handler
        self.routes = [
            Route(re.compile(P + r"\Z"), {"GET": get_project}, "api_nojob"),
            Route(re.compile(P + r"/packages\Z"), {"GET": list_packages}, "api"),
            Route(
                re.compile(P + r"/packages/ml_models/(?P<mv>[^/.?]+)/files/(?P<rest>.*[^/])\Z"),
                {"GET": ml, "PUT": ml},
                "ml_models",
            ),
            Route(
                re.compile(P + r"/packages/(?P<package_id>[^/.?]+)\Z"),
                {"GET": get_package, "DELETE": delete_package},
                "api",
            ),
            Route(
                re.compile(P + r"/packages/(?P<package_id>[^/.?]+)/package_files\Z"),
                {"GET": list_package_files},
                "api",
            ),
            Route(
                re.compile(
                    P + r"/packages/(?P<package_id>[^/.?]+)/package_files/(?P<file_id>[^/.?]+)\Z"
                ),
                {"DELETE": delete_package_file},
                "api",
            ),
            Route(
                re.compile(
                    P
                    + r"/packages/(?P<package_id>[^/.?]+)/package_files"
                    + r"/(?P<file_id>[^/.?]+)/download\Z"
                ),
                {"GET": download_package_file},
                "api",
            ),
            Route(
                re.compile(P + r"/ml/mlflow/api/2\.0/mlflow-artifacts/artifacts\Z"),
                {"GET": mlflow_artifacts_list},
                "api_nojob",
            ),
            Route(
                re.compile(
                    P
                    + r"/ml/mlflow/api/2\.0/mlflow-artifacts/artifacts"
                    + r"/(?P<mv>[^/.?]+)/(?P<rest>.+)\Z"
                ),
                {"GET": mlflow_artifacts_download},
                "api_nojob",
            ),
            Route(
                re.compile(P + r"/ml/mlflow/api/2\.0/mlflow/(?P<method>[a-z\-]+/[a-z\-]+)\Z"),
                {},
                "api_nojob",
                mlflow=True,
            ),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        response = await self.handle(request)
        await response(scope, receive, send)

    async def handle(self, request: Request) -> Any:
        path = request.scope["path"]
        if path.startswith("/-/mlregfs/"):
            return self.internal(request)
        if path == "/api/graphql":
            return await graphql(Ctx(self, request, {}, "api_nojob"))
        raw = request.scope.get("raw_path", path.encode()).decode("latin-1").split("?", 1)[0]
        method = request.method
        try:
            for route in self.routes:
                m = route.pattern.match(raw)
                if m is None:
                    continue
                # Grape answers HEAD with the GET route
                verb = "GET" if method == "HEAD" else method
                methods = route.methods
                if route.mlflow:
                    name = m.group("method")
                    methods = {v: h for (v, n), h in MLFLOW_ROUTES.items() if n == name}
                    if not methods:
                        raise grape_error("404 Not Found", 404)
                handler = methods.get(verb)
                if handler is None:
                    allowed = sorted(
                        {*methods, "OPTIONS"} | ({"HEAD"} if "GET" in methods else set())
                    )
                    raise ApiError(405, {"error": "405 Not Allowed"}, {"Allow": ", ".join(allowed)})
                groups = m.groupdict()
                # Grape `type: Integer` path params are validated before anything else
                for group, param in (("package_id", "package_id"), ("file_id", "package_file_id")):
                    if group in groups and not re.fullmatch(r"[+-]?\d+", unquote(groups[group])):
                        raise grape_error(f"{param} is invalid")
                ctx = Ctx(self, request, groups, route.auth)
                result = await handler(ctx)
                if method == "HEAD" and isinstance(result, Response):
                    result.body = b""  # headers (incl. Content-Length) stay those of the GET
                return result
            raise grape_error("404 Not Found", 404)
        except ApiError as e:
            resp = json_response(e.body, e.status, e.headers)
            if method == "HEAD":
                resp.body = b""
            return resp

    def internal(self, request: Request) -> Response:
        p = request.url.path
        if p == "/-/mlregfs/stats" and request.method == "GET":
            return json_response(self.stats.as_dict())
        if p == "/-/mlregfs/stats/reset" and request.method == "POST":
            self.stats.reset()
            return json_response({"ok": True})
        if p == "/-/mlregfs/health":
            return json_response({"status": "ok"})
        return json_response({"error": "404 Not Found"}, 404)


def build_apps(store: Store, settings: Settings, stats: Stats) -> tuple[ASGIApp, ASGIApp]:
    """(main app, storage app), both counted into `stats`."""
    from mlregfs.server.storage import StorageApp

    main = RegistryApp(store, settings, stats)
    storage = StorageApp(store.data_dir, main.signer)
    return Counted(main, stats, settings), Counted(storage, stats, settings, label="storage")


__all__ = ["ApiError", "RegistryApp", "Settings", "Stats", "StreamResponse", "build_apps"]
