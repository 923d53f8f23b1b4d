"""Server plumbing: API errors as GitLab shapes them, settings, request counting (middleware)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

API = "/api/v4"
DEFAULT_MAX_FILE_SIZE = 10 * (1 << 30)  # plan limit ml_model_max_file_size
PACKAGE_TYPES = (
    "maven npm conan nuget pypi composer generic golang debian rubygems helm "
    "terraform_module rpm ml_model cargo"
).split()
PACKAGE_STATUSES = ("default", "hidden", "processing", "error", "pending_destruction", "deprecated")
DISPLAYABLE = ("default", "error", "deprecated")


class ApiError(Exception):
    """An error answer: status, JSON body, extra headers."""

    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None):
        super().__init__(status, body)
        self.status = status
        self.body = body
        self.headers = headers or {}


def message(status: int, text: str) -> ApiError:
    """`render_api_error!`: {"message": "<text>"}."""
    return ApiError(status, {"message": text})


def grape_error(text: str, status: int = 400) -> ApiError:
    """Grape validation / routing errors: {"error": "<text>"}."""
    return ApiError(status, {"error": text})


NOT_FOUND = "404 Not Found"
PROJECT_NOT_FOUND = "404 Project Not Found"


def mlflow_error(code: str, status: int = 400, msg: str | None = None) -> ApiError:
    body: dict[str, Any] = {"error_code": code}
    if msg is not None:
        body["message"] = msg
    return ApiError(status, body)


def not_exist() -> ApiError:
    return mlflow_error("RESOURCE_DOES_NOT_EXIST", 404)


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(data, status_code=status, headers=headers)


def iso(ts: float | None) -> str | None:
    """Rails' JSON time format, UTC with milliseconds."""
    if ts is None:
        return None
    dt = datetime.fromtimestamp(ts, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


@dataclass
class Stats:
    """Counters behind /-/mlregfs/stats (both listeners)."""

    requests: int = 0
    bytes_served: int = 0
    by_route: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "bytes_served": self.bytes_served,
            "by_route": dict(sorted(self.by_route.items())),
        }

    def reset(self) -> None:
        self.requests = 0
        self.bytes_served = 0
        self.by_route = {}


@dataclass
class Settings:
    """Server options that change behaviour."""

    download_mode: str = "local"  # "local" | "redirect"
    max_file_size: int = DEFAULT_MAX_FILE_SIZE
    latency_ms: float = 0.0
    storage_port: int | None = None  # redirect mode: the storage listener's port
    # redirect mode: an external object store (e.g. nginx aliasing /<bucket>/ to DATA/blobs/)
    # that serves the blobs instead of the built-in listener; no trailing slash
    storage_url: str | None = None
    url_expires: int = 300


class Counted:
    """ASGI wrapper: counts requests per route label and body bytes sent; adds latency."""

    def __init__(self, app: ASGIApp, stats: Stats, settings: Settings, label: str | None = None):
        self.app = app
        self.stats = stats
        self.settings = settings
        self.label = label

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await _lifespan(receive, send)
            return
        internal = scope["path"].startswith("/-/mlregfs/")
        if internal:
            await self.app(scope, receive, send)
            return
        self.stats.requests += 1
        label = self.label or route_label(
            scope["raw_path"].decode("latin-1") if scope.get("raw_path") else scope["path"]
        )
        self.stats.by_route[label] = self.stats.by_route.get(label, 0) + 1
        delayed = False

        async def counting_send(msg: Message) -> None:
            nonlocal delayed
            if msg["type"] == "http.response.start" and self.settings.latency_ms and not delayed:
                delayed = True
                await anyio.sleep(self.settings.latency_ms / 1000)
            if msg["type"] == "http.response.body":
                self.stats.bytes_served += len(msg.get("body", b""))
            await send(msg)

        await self.app(scope, receive, counting_send)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def route_label(raw_path: str) -> str:
    """Coarse route name for stats: ml_models, mlflow, mlflow_artifacts, packages, ..."""
    if "/packages/ml_models/" in raw_path:
        return "ml_models"
    if "/ml/mlflow/api/2.0/mlflow-artifacts/" in raw_path:
        return "mlflow_artifacts"
    if "/ml/mlflow/" in raw_path:
        return "mlflow"
    if raw_path.endswith("/download") and "/package_files/" in raw_path:
        return "package_file_download"
    if "/package_files" in raw_path:
        return "package_files"
    if re.search(r"/projects/[^/]+/packages", raw_path):
        return "packages"
    if re.fullmatch(r"/api/v4/projects/[^/]+", raw_path):
        return "project"
    return "other"
