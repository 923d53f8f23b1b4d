"""The GitLab API subset as an ASGI app (Starlette request/response objects, own router).

Routing matches the raw (still percent-encoded) path, as Grape does, so that `acme%2Freg` is
one `:id` segment and a `%2F` inside a file name segment decodes to `/` and fails validation.
Each handler follows GitLab's order of checks: parameter validation (400), authentication
(401), project lookup (404 Project Not Found), permissions (403/404), then the resource.
"""

from __future__ import annotations

import base64
import json
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlencode

import anyio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlregfs.server.serving import StreamResponse, serve_file
from mlregfs.server.storage import Signer
from mlregfs.server.store import (
    CANDIDATE_PREFIX,
    ConflictError,
    InvalidError,
    NotFoundError,
    Row,
    Store,
    StoreError,
)
from mlregfs.server.validation import (
    ar_integer,
    cgi_escape,
    encode_uri_component,
    parse_semver,
    valid_file_name,
    valid_model_name,
)

API = "/api/v4"
DEFAULT_MAX_FILE_SIZE = 10 * (1 << 30)  # plan limit ml_model_max_file_size
PACKAGE_TYPES = (
    "maven npm conan nuget pypi composer generic golang debian rubygems helm "
    "terraform_module rpm ml_model cargo"
).split()
PACKAGE_STATUSES = ("default", "hidden", "processing", "error", "pending_destruction", "deprecated")
DISPLAYABLE = ("default", "error", "deprecated")
INSUFFICIENT_SCOPE = "The request requires higher privileges than provided by the access token."

GUEST, REPORTER, DEVELOPER, MAINTAINER = 10, 20, 30, 40


# ---------------------------------------------------------------------------------- plumbing


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


@dataclass
class Principal:
    """Who is calling: the token's user, kind and scopes."""

    user_id: int
    kind: str  # "personal" | "job"
    scopes: tuple[str, ...]
    token_project_id: int | None


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


# ---------------------------------------------------------------------------------- the app


Handler = Callable[["Ctx"], Awaitable[Any]]


@dataclass
class Route:
    pattern: re.Pattern[str]
    methods: dict[str, Handler]
    auth: str  # "ml_models" | "api" (job tokens allowed) | "api_nojob"
    mlflow: bool = False  # the method name comes from MLFLOW_ROUTES


class Ctx:
    """Per-request state handed to handlers."""

    def __init__(self, app: RegistryApp, request: Request, groups: dict[str, str], auth: str):
        self.app = app
        self.store = app.store
        self.request = request
        self.groups = groups
        self.auth_mode = auth
        self._principal: Principal | None = None
        self._authed = False
        self._project: Row | None = None

    # -------------------------------------------------------------- authentication

    def principal(self) -> Principal | None:
        """The caller, or None for anonymous; raises 401 for an unknown token."""
        if not self._authed:
            self._principal = self._authenticate()
            self._authed = True
        return self._principal

    def _lookup(self, token: str, kinds: tuple[str, ...]) -> Principal:
        row = self.store.find_token(token)
        if row is None or row["kind"] not in kinds:
            raise message(401, "401 Unauthorized")
        return Principal(
            int(row["user_id"]), row["kind"], tuple(row["scopes"].split(",")), row["project_id"]
        )

    def _authenticate(self) -> Principal | None:
        h = self.request.headers
        q = self.request.query_params
        if self.auth_mode == "ml_models":
            # sent_through(:http_bearer_token): only Authorization, last space-separated word
            auth = h.get("authorization")
            if auth is None or not auth.split():
                return None
            return self._lookup(auth.split()[-1], ("personal", "job"))
        pat = h.get("private-token") or q.get("private_token")
        if pat:
            return self._lookup(pat, ("personal",))
        auth = h.get("authorization", "")
        parts = auth.split(None, 1)
        if len(parts) == 2 and parts[0].lower() == "bearer" and parts[1].strip():
            return self._lookup(parts[1].strip(), ("personal",))
        if self.auth_mode == "api":
            job = h.get("job-token") or q.get("job_token")
            if job:
                return self._lookup(job, ("job",))
        return None

    def require_scope(self, *, read: bool) -> None:
        """`api` always works; `read_api` only for GET/HEAD read endpoints."""
        p = self.principal()
        if p is None or "api" in p.scopes:
            return
        if read and self.request.method in ("GET", "HEAD") and "read_api" in p.scopes:
            return
        raise ApiError(
            403,
            {
                "error": "insufficient_scope",
                "error_description": INSUFFICIENT_SCOPE,
                "scope": "api read_api",
            },
            {
                "WWW-Authenticate": 'Bearer realm="Protected by OAuth 2.0", '
                'error="insufficient_scope", '
                f'error_description="{INSUFFICIENT_SCOPE}", scope="api read_api"'
            },
        )

    # -------------------------------------------------------------- project and permissions

    def level(self, project: Row) -> int:
        p = self.principal()
        if p is None:
            return 0
        if p.kind == "job" and p.token_project_id != project["id"]:
            return 0  # a job token acts only within its own project
        return self.store.access_level(int(project["id"]), p.user_id)

    def can_read(self, project: Row) -> bool:
        vis = project["visibility"]
        if vis == "public" or (vis == "internal" and self.principal() is not None):
            return True
        return self.level(project) >= GUEST

    def project(self) -> Row:
        """`find_project!` + read access: 404 Project Not Found otherwise."""
        if self._project is None:
            ref = unquote(self.groups["id"])
            row = self.store.project(ref)
            if row is None or not self.can_read(row):
                raise message(404, PROJECT_NOT_FOUND)
            self._project = row
        return self._project

    def base_url(self) -> str:
        return str(self.request.base_url).rstrip("/")


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


# ---------------------------------------------------------------------------------- GraphQL

# The two mutations mlregfs needs (GitLab has no REST route for deleting a model version).
# Not a GraphQL engine: the mutation name and its `id` argument are read from the document
# or its variables, and the answer has GitLab's shape.
_GQL_MUTATION = re.compile(r"\b(mlModelVersionDelete|mlModelDelete|mlModelDestroy)\s*\(")
_GQL_ID = re.compile(r'\bid\s*:\s*(?:"([^"]+)"|\$(\w+))')
_GQL_GID = re.compile(r"\Agid://gitlab/Ml::(ModelVersion|Model)/(\d+)\Z")
GQL_NO_ACCESS = (
    "The resource that you are attempting to access does not exist or you don't have"
    " permission to perform this action"
)


async def graphql(ctx: Ctx) -> Response:
    """POST /api/graphql: mlModelVersionDelete / mlModelDelete (alias mlModelDestroy)."""
    if ctx.request.method != "POST":
        return json_response({"errors": [{"message": "Only POST is supported here"}]}, 405)
    try:
        ctx.principal()
    except ApiError:
        return json_response({"errors": [{"message": "Invalid token"}]}, 401)
    try:
        body = json.loads(await ctx.request.body())
        query, variables = body.get("query", ""), body.get("variables") or {}
    except (ValueError, AttributeError):
        return json_response({"errors": [{"message": "Invalid JSON body"}]}, 400)
    m = _GQL_MUTATION.search(query)
    idm = _GQL_ID.search(query[m.end() :]) if m else None
    if m is None or idm is None:
        return json_response({"errors": [{"message": "Unsupported query for this server"}]})
    field = m.group(1)
    gid = idm.group(1) or str(variables.get(idm.group(2), ""))
    kind = "ModelVersion" if field == "mlModelVersionDelete" else "Model"
    gm = _GQL_GID.match(gid)
    if gm is None or gm.group(1) != kind:
        msg = f'"{gid}" does not represent an instance of Ml::{kind}'
        return json_response({"errors": [{"message": msg}]})

    def denied() -> Response:
        err = {"message": GQL_NO_ACCESS, "path": [field]}
        return json_response({"errors": [err], "data": {field: None}})

    obj_id = int(gm.group(2))
    table = "model_versions" if kind == "ModelVersion" else "models"
    row = ctx.store.one(f"SELECT * FROM {table} WHERE id=?", (obj_id,))
    if row is None:
        # resolve: `return { errors: ['Model version not found'] }` (also for models)
        payload_key = "modelVersion" if kind == "ModelVersion" else "model"
        what = "Model version" if kind == "ModelVersion" else "Model"
        return json_response(
            {"data": {field: {payload_key: None, "errors": [f"{what} not found"]}}}
        )
    project = ctx.store.project(int(row["project_id"]))
    if project is None or ctx.principal() is None or ctx.level(project) < DEVELOPER:
        return denied()  # authorize :write_model_registry
    if "api" not in ctx.principal().scopes:  # type: ignore[union-attr]
        return denied()
    gid_out = f"gid://gitlab/Ml::{kind}/{obj_id}"
    if kind == "ModelVersion":
        ctx.store.delete_version(int(project["id"]), obj_id)
        return json_response({"data": {field: {"modelVersion": {"id": gid_out}, "errors": []}}})
    ctx.store.delete_model(int(project["id"]), obj_id)
    return json_response({"data": {field: {"model": {"id": gid_out}, "errors": []}}})


# ---------------------------------------------------------------------------------- entities


def project_entity(ctx: Ctx, p: Row) -> dict[str, Any]:
    ns, _, name = p["path"].rpartition("/")
    base = ctx.base_url()
    entity: dict[str, Any] = {
        "id": p["id"],
        "description": None,
        "name": name,
        "name_with_namespace": f"{ns.replace('/', ' / ')} / {name}",
        "path": name,
        "path_with_namespace": p["path"],
        "created_at": iso(p["created_at"]),
        "default_branch": None,
        "tag_list": [],
        "topics": [],
        "http_url_to_repo": f"{base}/{p['path']}.git",
        "web_url": f"{base}/{p['path']}",
        "readme_url": None,
        "avatar_url": None,
        "forks_count": 0,
        "star_count": 0,
        "last_activity_at": iso(p["created_at"]),
        "namespace": {
            "id": 1,
            "name": ns.rsplit("/", 1)[-1],
            "path": ns.rsplit("/", 1)[-1],
            "kind": "group",
            "full_path": ns,
            "parent_id": None,
            "avatar_url": None,
            "web_url": f"{base}/groups/{ns}",
        },
        "visibility": p["visibility"],
        "empty_repo": True,
        "archived": False,
        "packages_enabled": True,
    }
    principal = ctx.principal()
    if principal is not None:
        level = ctx.level(p)
        entity["permissions"] = {
            "project_access": {"access_level": level, "notification_level": 3} if level else None,
            "group_access": None,
        }
    return entity


def package_entity(ctx: Ctx, pkg: Row, *, with_versions: bool = False) -> dict[str, Any]:
    project = ctx.project()
    links: dict[str, str] = {"web_path": f"/{project['path']}/-/packages/{pkg['id']}"}
    if ctx.level(project) >= MAINTAINER:
        links["delete_api_path"] = (
            f"{ctx.base_url()}{API}/projects/{project['id']}/packages/{pkg['id']}"
        )
    e: dict[str, Any] = {
        "id": pkg["id"],
        "name": pkg["name"],
        "version": pkg["version"],
        "package_type": pkg["package_type"],
        "status": pkg["status"],
        "_links": links,
        "created_at": iso(pkg["created_at"]),
        "last_downloaded_at": iso(pkg["last_downloaded_at"]),
        "tags": [],
    }
    if with_versions:
        marks = ",".join("?" * len(DISPLAYABLE))
        siblings = ctx.store.all(
            f"SELECT * FROM packages WHERE project_id=? AND name=? AND package_type=? AND id!=?"
            f" AND status IN ({marks}) ORDER BY id",
            (pkg["project_id"], pkg["name"], pkg["package_type"], pkg["id"], *DISPLAYABLE),
        )
        e["versions"] = [
            {"id": s["id"], "version": s["version"], "created_at": iso(s["created_at"]), "tags": []}
            for s in siblings
        ]
    return e


def package_file_entity(f: Row) -> dict[str, Any]:
    return {
        "id": f["id"],
        "package_id": f["package_id"],
        "created_at": iso(f["created_at"]),
        "file_name": f["file_name"],
        "size": f["size"],
        "file_md5": None,
        "file_sha1": None,
        "file_sha256": f["file_sha256"],
    }


# ---------------------------------------------------------------------------------- helpers


def int_param(ctx: Ctx, name: str, value: str | None, default: int | None = None) -> int | None:
    """Grape `type: Integer`: 400 `<name> is invalid` for anything else."""
    if value is None or value == "":
        return default
    if not re.fullmatch(r"\s*[+-]?\d+\s*", value):
        raise grape_error(f"{name} is invalid")
    return int(value)


def values_param(
    ctx: Ctx, name: str, allowed: tuple[str, ...] | list[str], default: str | None = None
) -> str | None:
    v = ctx.request.query_params.get(name)
    if v is None:
        return default
    if v not in allowed:
        raise grape_error(f"{name} does not have a valid value")
    return v


def paginate(ctx: Ctx, rows: list[Any]) -> tuple[list[Any], dict[str, str]]:
    """Offset pagination with GitLab's headers (Kaminari, max_per_page 100)."""
    q = ctx.request.query_params
    page = int_param(ctx, "page", q.get("page"), 1) or 1
    per_page = int_param(ctx, "per_page", q.get("per_page"), 20) or 20
    page = max(page, 1)
    per_page = 20 if per_page <= 0 else min(per_page, 100)
    total = len(rows)
    total_pages = max(-(-total // per_page), 1)
    out_of_range = page > max(-(-total // per_page), 1) or (total == 0 and page > 1)
    next_page = page + 1 if page < total_pages and not out_of_range else None
    prev_page = page - 1 if page > 1 and not out_of_range else None
    base = f"{ctx.base_url()}{ctx.request.url.path}"
    params = dict(q)

    def href(n: int) -> str:
        merged = {**params, "page": str(n), "per_page": str(per_page)}
        return f"{base}?{urlencode(sorted(merged.items()))}"

    links = []
    if prev_page:
        links.append(f'<{href(prev_page)}>; rel="prev"')
    if next_page:
        links.append(f'<{href(next_page)}>; rel="next"')
    links.append(f'<{href(1)}>; rel="first"')
    links.append(f'<{href(total_pages)}>; rel="last"')
    headers = {
        "X-Per-Page": str(per_page),
        "X-Page": str(page),
        "X-Next-Page": str(next_page or ""),
        "X-Prev-Page": str(prev_page or ""),
        "Link": ", ".join(links),
        "X-Total": str(total),
        "X-Total-Pages": str(total_pages),
    }
    start = (page - 1) * per_page
    return rows[start : start + per_page], headers


def present_file(ctx: Ctx, f: Row, pkg: Row) -> Any:
    """`present_package_file!`: touch last_downloaded_at, then serve or redirect."""
    store = ctx.store
    store.touch_downloaded(int(pkg["id"]))
    settings = ctx.app.settings
    if settings.download_mode == "redirect":
        if settings.storage_url:
            base = settings.storage_url
        else:
            host = ctx.request.url.hostname or "127.0.0.1"
            if ":" in host:
                host = f"[{host}]"
            base = f"{ctx.request.url.scheme}://{host}:{settings.storage_port}"
        method = "HEAD" if ctx.request.method == "HEAD" else "GET"
        url = ctx.app.signer.sign(base, f["blob"], method)
        body = f"This resource has been moved temporarily to {url}."
        return Response(body, status_code=302, headers={"Location": url}, media_type="text/plain")
    name = f["file_name"]
    rfc5987 = "".join(
        c if re.match(r"[A-Za-z0-9!#$&+.^_`|~-]", c) else "".join(f"%{b:02X}" for b in c.encode())
        for c in name
    )
    headers = {
        "Content-Disposition": f"attachment; filename=\"{name}\"; filename*=UTF-8''{rfc5987}",
        "Content-Transfer-Encoding": "binary",
        "Content-Type": "application/octet-stream",
    }
    return serve_file(ctx.request, store.blob_path(f), size=int(f["size"]), headers=headers)


# ---------------------------------------------------------------------------------- projects API


async def get_project(ctx: Ctx) -> Response:
    ctx.require_scope(read=True)
    return json_response(project_entity(ctx, ctx.project()))


# ---------------------------------------------------------------------------------- packages API


def _packages_access(ctx: Ctx) -> Row:
    ctx.require_scope(read=True)
    project = ctx.project()
    if not ctx.can_read(project):  # read_package (guests included: the newer behaviour)
        raise message(403, "403 Forbidden")
    return project


def _displayable_package(ctx: Ctx, project: Row) -> Row:
    """`Packages::PackageFinder`: a displayable package of this project, else 404 Not found."""
    pid = int_param(ctx, "package_id", ctx.groups["package_id"])
    pkg = ctx.store.package(pid or 0)
    if pkg is None or pkg["project_id"] != project["id"] or pkg["status"] not in DISPLAYABLE:
        raise message(404, "404 Not found")
    return pkg


def _check_unmodified_since(ctx: Ctx, updated_at: float) -> None:
    """`destroy_conditionally!`: If-Unmodified-Since older than the object gives 412."""
    h = ctx.request.headers.get("if-unmodified-since")
    if not h:
        return
    import email.utils

    try:
        t = email.utils.parsedate_to_datetime(h).timestamp()
    except (TypeError, ValueError):
        return
    if int(updated_at) > t:
        raise message(412, "412 Precondition Failed")


async def list_packages(ctx: Ctx) -> Response:
    q = ctx.request.query_params
    ptype = values_param(ctx, "package_type", PACKAGE_TYPES)
    status = values_param(ctx, "status", PACKAGE_STATUSES)
    order_by = values_param(
        ctx, "order_by", ("created_at", "name", "version", "type"), "created_at"
    )
    sort = values_param(ctx, "sort", ("asc", "desc"), "asc")
    int_param(ctx, "page", q.get("page"))
    int_param(ctx, "per_page", q.get("per_page"))
    project = _packages_access(ctx)
    sql = "SELECT * FROM packages WHERE project_id=?"
    args: list[Any] = [project["id"]]
    if ptype:
        sql += " AND package_type=?"
        args.append(ptype)
    name = q.get("package_name")
    if name:
        # search_by_name: ILIKE %name% (fuzzy, case-insensitive)
        esc = name.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        sql += " AND name LIKE ? ESCAPE '\\'"
        args.append(f"%{esc}%")
    version = q.get("package_version")
    if version:
        sql += " AND version=?"
        args.append(version)
    if status:
        sql += " AND status=?"
        args.append(status)
    else:
        sql += f" AND status IN ({','.join('?' * len(DISPLAYABLE))})"
        args.extend(DISPLAYABLE)
    col = {
        "created_at": "created_at",
        "name": "name",
        "version": "version",
        "type": "package_type",
    }[order_by or "created_at"]
    direction = "DESC" if sort == "desc" else "ASC"
    sql += f" ORDER BY {col} {direction}, id {direction}"
    rows = ctx.store.all(sql, tuple(args))
    page, headers = paginate(ctx, rows)
    return json_response([package_entity(ctx, r) for r in page], headers=headers)


async def get_package(ctx: Ctx) -> Response:
    project = _packages_access(ctx)
    pkg = _displayable_package(ctx, project)
    return json_response(package_entity(ctx, pkg, with_versions=True))


async def delete_package(ctx: Ctx) -> Response:
    ctx.require_scope(read=False)
    project = ctx.project()
    if ctx.level(project) < MAINTAINER:
        raise message(403, "403 Forbidden")
    pkg = _displayable_package(ctx, project)
    _check_unmodified_since(ctx, pkg["updated_at"])
    ctx.store.destroy_package(int(pkg["id"]))
    return Response(status_code=204)


async def list_package_files(ctx: Ctx) -> Response:
    order_by = values_param(ctx, "order_by", ("id", "created_at", "file_name"), "id")
    sort = values_param(ctx, "sort", ("asc", "desc"), "asc")
    q = ctx.request.query_params
    int_param(ctx, "page", q.get("page"))
    int_param(ctx, "per_page", q.get("per_page"))
    project = _packages_access(ctx)
    pkg = _displayable_package(ctx, project)
    direction = "DESC" if sort == "desc" else "ASC"
    rows = ctx.store.all(
        f"SELECT * FROM package_files WHERE package_id=? AND status='default'"
        f" ORDER BY {order_by} {direction}, id {direction}",
        (pkg["id"],),
    )
    page, headers = paginate(ctx, rows)
    return json_response([package_file_entity(f) for f in page], headers=headers)


async def delete_package_file(ctx: Ctx) -> Response:
    ctx.require_scope(read=False)
    project = ctx.project()
    if ctx.level(project) < MAINTAINER:
        raise message(403, "403 Forbidden")
    pkg = _displayable_package(ctx, project)
    fid = int_param(ctx, "package_file_id", ctx.groups["file_id"])
    f = ctx.store.file(int(pkg["id"]), fid or 0)
    if f is None:
        raise message(404, NOT_FOUND)
    _check_unmodified_since(ctx, f["updated_at"])
    ctx.store.destroy_file(int(f["id"]))
    return Response(status_code=204)


async def download_package_file(ctx: Ctx) -> Any:
    project = _packages_access(ctx)
    pkg = _displayable_package(ctx, project)
    fid = int_param(ctx, "package_file_id", ctx.groups["file_id"])
    f = ctx.store.file(int(pkg["id"]), fid or 0)
    if f is None:
        raise message(404, NOT_FOUND)
    return present_file(ctx, f, pkg)


# ---------------------------------------------------------------------------------- ml_models


async def ml_models_handler(ctx: Ctx) -> Any:
    """GET/HEAD/PUT `…/ml_models/:model_version_id/files/(*path/):file_name[/authorize]`."""
    request = ctx.request
    method = request.method
    segments = ctx.groups["rest"].split("/")
    authorize = method == "PUT" and len(segments) >= 2 and segments[-1] == "authorize"
    if authorize:
        segments = segments[:-1]
    file_name = unquote(segments[-1])
    path = "/".join(unquote(s) for s in segments[:-1]) if len(segments) > 1 else None
    # 1. Grape validation (before any authentication)
    if not valid_file_name(file_name):
        raise grape_error("file_name is invalid")
    if file_name in (".", ".."):
        raise grape_error("file_name should be a valid file path")
    status = request.query_params.get("status") if method == "PUT" else None
    if status is not None and status not in ("default", "hidden"):
        raise grape_error("status does not have a valid value")
    # 2. after_validation: authenticate_non_get!, then read_model_registry on user_project
    principal = ctx.principal()
    if method == "PUT" and principal is None:
        raise message(401, "401 Unauthorized")
    ctx.require_scope(read=True)
    project = ctx.project()
    level = ctx.level(project)
    if method == "PUT":
        if level < DEVELOPER:  # authorize_create_package!
            raise message(403, "403 Forbidden")
        # write_model_registry would be checked here (404); it equals create_package for us
        if authorize:
            # what Workhorse's pre-authorization of ".../authorize/authorize" yields
            body = {"TempPath": str(ctx.store.tmp_dir)}
            return Response(
                json.dumps(body),
                status_code=200,
                media_type="application/vnd.gitlab-workhorse+json",
            )
        return await _upload(ctx, project, path, file_name, status)
    if not ctx.can_read(project):  # authorize_read_package!
        raise message(403, "403 Forbidden")
    try:
        pkg = ctx.store.owner_package(int(project["id"]), unquote(ctx.groups["mv"]))
    except NotFoundError:
        raise message(404, NOT_FOUND) from None
    full = f"{path}/{file_name}" if path is not None else file_name
    f = ctx.store.newest_file(int(pkg["id"]), encode_uri_component(full))
    if f is None:
        raise message(404, "404 Not found")  # ActiveRecord::RecordNotFound: lower-case "f"
    return present_file(ctx, f, pkg)


async def _upload(
    ctx: Ctx, project: Row, path: str | None, file_name: str, status: str | None
) -> Any:
    request = ctx.request
    store = ctx.store
    staging = store.new_staging_file()
    try:
        async for chunk in request.stream():
            if chunk:
                staging.write(chunk)
    except ClientDisconnect:
        staging.abort()
        return Response("Internal server error\n", status_code=500, media_type="text/plain")
    except BaseException:
        staging.abort()
        raise
    expected = request.headers.get("content-length")
    if expected is not None and expected.isdigit() and int(expected) != staging.size:
        # Workhorse: "expected %d bytes but got only %d" -> 500, nothing stored
        staging.abort()
        return Response("Internal server error\n", status_code=500, media_type="text/plain")
    staged = staging.finish()
    try:
        if staged.size > ctx.app.settings.max_file_size:
            raise message(400, "400 Bad request - Artifact file is too large")
        full = f"{path}/{file_name}" if path is not None else file_name
        try:
            await anyio.to_thread.run_sync(
                lambda: store.add_file(
                    int(project["id"]), unquote(ctx.groups["mv"]), full, staged, status=status
                )
            )
        except NotFoundError:
            raise message(404, NOT_FOUND) from None
        except InvalidError:
            raise message(400, "400 Bad request - Package creation failed") from None
    finally:
        staged.discard()
    return json_response({"message": "201 Created"}, 201)


# ---------------------------------------------------------------------------------- MLflow


async def _mlflow_params(ctx: Ctx) -> dict[str, Any]:
    params: dict[str, Any] = dict(ctx.request.query_params)
    if ctx.request.method in ("POST", "PATCH", "PUT", "DELETE"):
        body = await ctx.request.body()
        if body.strip():
            try:
                # Ruby's JSON.parse refuses NaN and Infinity
                data = json.loads(body, parse_constant=_no_constant)
            except ValueError:
                raise grape_error("There was a problem with the payload") from None
            if isinstance(data, dict):
                params.update(data)
    return params


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _mlflow_access(ctx: Ctx, *, registry: bool) -> Row:
    """`authenticate!` + scopes + read_model_experiments (+ read_model_registry)."""
    if ctx.principal() is None:
        raise message(401, "401 Unauthorized")
    ctx.require_scope(read=True)
    project = ctx.project()
    if not ctx.can_read(project):
        raise message(404, NOT_FOUND)
    return project


def _mlflow_write(ctx: Ctx, project: Row) -> None:
    if ctx.level(project) < DEVELOPER:
        raise message(401, "401 Unauthorized")


def _required(params: dict[str, Any], *names: str) -> None:
    for n in names:
        if params.get(n) in (None, ""):
            raise grape_error(f"{n} is missing")


def _kv(tags: Any) -> list[dict[str, str]]:
    if not isinstance(tags, list):
        return []
    return [
        {"key": str(t.get("key")), "value": str(t.get("value", ""))}
        for t in tags
        if isinstance(t, dict) and t.get("key") is not None
    ]


def _max_results(params: dict[str, Any], default: int = 200) -> int:
    v = params.get("max_results")
    if v in (None, ""):
        return default
    try:
        n = int(v)
    except (TypeError, ValueError):
        raise grape_error("max_results is invalid") from None
    return max(1, min(n, 1000))


def _keyset(
    rows: list[Row], key: Callable[[Row], Any], desc: bool, token: Any, limit: int
) -> tuple[list[Row], str | None]:
    """Keyset pagination over (key, id); the token is an opaque base64 cursor."""
    ordered = sorted(rows, key=lambda r: (key(r), r["id"]), reverse=desc)
    if token:
        try:
            cur = json.loads(base64.urlsafe_b64decode(str(token).encode() + b"==="))
            pos = (cur["k"], cur["id"])
        except (ValueError, KeyError, TypeError):
            raise mlflow_error("INVALID_PARAMETER_VALUE", 400, "Invalid page token") from None
        ordered = [
            r
            for r in ordered
            if ((key(r), r["id"]) < tuple(pos) if desc else (key(r), r["id"]) > tuple(pos))
        ]
    page = ordered[:limit]
    if len(ordered) > limit:
        last = page[-1]
        raw = json.dumps({"k": key(last), "id": last["id"]}).encode()
        return page, base64.urlsafe_b64encode(raw).decode().rstrip("=")
    return page, None


def _experiment_entity(e: Row) -> dict[str, Any]:
    return {
        "experiment_id": str(e["iid"]),
        "name": e["name"],
        "lifecycle_stage": "active",
        "artifact_location": "not_implemented",
        "tags": json.loads(e["tags"]),
    }


def _version_entity(ctx: Ctx, v: Row) -> dict[str, Any]:
    project = ctx.project()
    cand = ctx.store.one("SELECT eid FROM candidates WHERE model_version_id=?", (v["id"],))
    return {
        "name": v["model_name"],
        "version": str(v["id"]),
        "creation_timestamp": int(v["created_at"]),
        "last_updated_timestamp": int(v["updated_at"]),
        "user_id": None,
        "current_stage": "development",
        "description": v["description"] or "",
        "source": f"{ctx.base_url()}/{project['path']}/-/ml/models/{v['model_id']}"
        f"/versions/{v['id']}",
        "run_id": cand["eid"] if cand else None,
        "status": "READY",
        "status_message": "",
        "tags": json.loads(v["tags"]),
        "run_link": "",
        "aliases": [v["version"]],
    }


def _model_entity(ctx: Ctx, m: Row) -> dict[str, Any]:
    return {
        "name": m["name"],
        "creation_timestamp": int(m["created_at"]),
        "last_updated_timestamp": int(m["updated_at"]),
        "description": m["description"] or "",
        "user_id": str(m["user_id"]) if m["user_id"] is not None else "",
        "tags": json.loads(m["tags"]),
        "latest_versions": [_version_entity(ctx, v) for v in ctx.store.versions(m["id"])],
    }


def _run_entity(ctx: Ctx, c: Row) -> dict[str, Any]:
    project = ctx.project()
    exp = ctx.store.experiment(int(project["id"]), id=c["experiment_id"])
    owner = str(c["model_version_id"]) if c["model_version_id"] else f"{CANDIDATE_PREFIX}{c['iid']}"
    info: dict[str, Any] = {
        "run_id": c["eid"],
        "run_uuid": c["eid"],
        "experiment_id": str(exp["iid"]) if exp else "",
        "start_time": c["start_time"] or 0,
    }
    if c["end_time"] is not None:
        info["end_time"] = c["end_time"]
    if c["name"] is not None:
        info["run_name"] = c["name"]
    info.update(
        {
            "status": str(c["status"]).upper(),
            "artifact_uri": f"{ctx.base_url()}{API}/projects/{project['id']}"
            f"/packages/ml_models/{owner}/files/",
            "lifecycle_stage": "active",
            "user_id": str(c["user_id"]) if c["user_id"] is not None else "",
        }
    )
    # GitLab's Run entity: each metric's last logged value, the params, the tags (metadata)
    metrics = [_metric_entity(m) for m in ctx.store.latest_metrics(int(c["id"]))]
    params = [{"key": p["name"], "value": p["value"]} for p in ctx.store.params(int(c["id"]))]
    return {
        "info": info,
        "data": {"metrics": metrics, "params": params, "tags": json.loads(c["tags"])},
    }


def _metric_entity(m: Row) -> dict[str, Any]:
    """`Entities::Ml::Mlflow::Metric`: key, value, timestamp (tracked_at), step unless nil."""
    out: dict[str, Any] = {"key": m["name"], "value": m["value"], "timestamp": m["tracked_at"]}
    if m["step"] is not None:
        out["step"] = m["step"]
    return out


def _find_model(ctx: Ctx, project: Row, name: Any) -> Row:
    m = ctx.store.model(int(project["id"]), str(name)) if name else None
    if m is None:
        raise not_exist()
    return m


def _int_or_none(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


async def mlflow_experiments_get(ctx: Ctx) -> Response:
    project = _mlflow_access(ctx, registry=False)
    p = await _mlflow_params(ctx)
    _required(p, "experiment_id")
    iid = _int_or_none(p["experiment_id"])
    e = ctx.store.experiment(int(project["id"]), iid=iid) if iid is not None else None
    if e is None:
        raise not_exist()
    return json_response({"experiment": _experiment_entity(e)})


async def mlflow_experiments_get_by_name(ctx: Ctx) -> Response:
    project = _mlflow_access(ctx, registry=False)
    p = await _mlflow_params(ctx)
    _required(p, "experiment_name")
    e = ctx.store.experiment(int(project["id"]), name=str(p["experiment_name"]))
    if e is None:
        raise not_exist()
    return json_response({"experiment": _experiment_entity(e)})


async def mlflow_experiments_list(ctx: Ctx) -> Response:
    project = _mlflow_access(ctx, registry=False)
    rows = ctx.store.all(
        "SELECT * FROM experiments WHERE project_id=? ORDER BY id", (project["id"],)
    )
    return json_response({"experiments": [_experiment_entity(e) for e in rows]})


async def mlflow_experiments_search(ctx: Ctx) -> Response:
    project = _mlflow_access(ctx, registry=False)
    p = await _mlflow_params(ctx)
    rows = ctx.store.all("SELECT * FROM experiments WHERE project_id=?", (project["id"],))
    order = p.get("order_by")
    order_s = (order[0] if isinstance(order, list) and order else order) or "id ASC"
    col, _, direction = str(order_s).partition(" ")
    keyf: Callable[[Row], Any] = {
        "name": lambda r: r["name"],
        "created_at": lambda r: r["created_at"],
        "updated_at": lambda r: r["updated_at"],
    }.get(col, lambda r: r["id"])
    page, token = _keyset(
        rows, keyf, direction.strip().upper() == "DESC", p.get("page_token"), _max_results(p)
    )
    return json_response(
        {"experiments": [_experiment_entity(e) for e in page], "next_page_token": token}
    )


async def mlflow_experiments_create(ctx: Ctx) -> Response:
    project = _mlflow_access(ctx, registry=False)
    p = await _mlflow_params(ctx)
    _required(p, "name")
    _mlflow_write(ctx, project)
    principal = ctx.principal()
    try:
        e = ctx.store.create_experiment(
            int(project["id"]),
            str(p["name"]),
            user_id=principal.user_id if principal else None,
            tags=_kv(p.get("tags")),
        )
    except ConflictError:
        raise mlflow_error("RESOURCE_ALREADY_EXISTS") from None
    return json_response({"experiment_id": str(e["iid"])})


async def mlflow_runs_create(ctx: Ctx) -> Response:
    project = _mlflow_access(ctx, registry=False)
    p = await _mlflow_params(ctx)
    _mlflow_write(ctx, project)
    iid = _int_or_none(p.get("experiment_id"))
    if p.get("experiment_id") is not None and iid is None:
        raise grape_error("experiment_id is invalid")
    e = ctx.store.experiment(int(project["id"]), iid=iid) if iid is not None else None
    if e is None:
        raise not_exist()
    principal = ctx.principal()
    cand_iid = ctx.store.create_candidate(
        int(project["id"]),
        experiment=int(e["iid"]),
        name=p.get("run_name"),
        start_time=_int_or_none(p.get("start_time")),
        user_id=principal.user_id if principal else None,
        tags=_kv(p.get("tags")),
    )
    c = ctx.store.candidate(int(project["id"]), iid=cand_iid)
    assert c is not None
    return json_response({"run": _run_entity(ctx, c)})


def _find_run(ctx: Ctx, project: Row, p: dict[str, Any]) -> Row:
    rid = p.get("run_id") or p.get("run_uuid")
    if not rid:
        raise grape_error("run_id is missing")
    c = ctx.store.candidate(int(project["id"]), eid=str(rid))
    if c is None:
        raise not_exist()
    return c


async def mlflow_runs_get(ctx: Ctx) -> Response:
    project = _mlflow_access(ctx, registry=False)
    c = _find_run(ctx, project, await _mlflow_params(ctx))
    return json_response({"run": _run_entity(ctx, c)})


async def mlflow_runs_search(ctx: Ctx) -> Response:
    project = _mlflow_access(ctx, registry=False)
    p = await _mlflow_params(ctx)
    ids = p.get("experiment_ids")
    first = ids[0] if isinstance(ids, list) and ids else None
    iid = _int_or_none(first)
    e = ctx.store.experiment(int(project["id"]), iid=iid) if iid is not None else None
    if e is None:
        raise not_exist()
    rows = ctx.store.all("SELECT * FROM candidates WHERE experiment_id=?", (e["id"],))
    order = p.get("order_by")
    order_s = (order[0] if isinstance(order, list) and order else order) or "created_at DESC"
    col, _, direction = str(order_s).partition(" ")
    keyf: Callable[[Row], Any] = (
        (lambda r: r["name"] or "") if col == "name" else (lambda r: r["created_at"])
    )
    page, token = _keyset(
        rows, keyf, direction.strip().upper() != "ASC", p.get("page_token"), _max_results(p)
    )
    return json_response({"runs": [_run_entity(ctx, c) for c in page], "next_page_token": token})


def _grape_float(p: dict[str, Any], name: str) -> float:
    v = p.get(name)
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise grape_error(f"{name} is invalid")
    try:
        f = float(v)
    except ValueError:
        raise grape_error(f"{name} is invalid") from None
    if not math.isfinite(f):  # Ruby's Float() refuses "NaN" and "Infinity"
        raise grape_error(f"{name} is invalid")
    return f


def _grape_str(p: dict[str, Any], name: str, shown: str | None = None) -> str:
    """Grape `type: String`: numbers are coerced, arrays and hashes are "<name> is invalid"."""
    v = p.get(name)
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    raise grape_error(f"{shown or name} is invalid")


def _grape_int(p: dict[str, Any], name: str, *, required: bool) -> int | None:
    v = p.get(name)
    if v is None:
        if required:
            raise grape_error(f"{name} is missing")
        return None
    if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
        raise grape_error(f"{name} is invalid")
    try:
        return int(v)
    except (TypeError, ValueError):
        raise grape_error(f"{name} is invalid") from None


def _record(name: str, value: str, *, value_max: int, what: str = "Value") -> None:
    """ActiveRecord validations of a param or tag (presence, lengths), answered as the
    entrypoint's `rescue_from ActiveRecord::ActiveRecordError`: INVALID_PARAMETER_VALUE."""
    problems = []
    if not name.strip():
        problems.append("Name can't be blank")
    if len(name) > 250:
        problems.append("Name is too long (maximum is 250 characters)")
    if not value.strip():
        problems.append(f"{what} can't be blank")
    if len(value) > value_max:
        problems.append(f"{what} is too long (maximum is {value_max} characters)")
    if problems:
        raise mlflow_error(
            "INVALID_PARAMETER_VALUE", 400, "Validation failed: " + ", ".join(problems)
        )


async def _run_write(ctx: Ctx, *required: str) -> tuple[Row, dict[str, Any]]:
    """The checks every run write starts with: access, params, the run, the write role."""
    project = _mlflow_access(ctx, registry=False)
    p = await _mlflow_params(ctx)
    _mlflow_write(ctx, project)  # Grape's `before` runs ahead of the params' validation
    _required(p, "run_id", *required)
    return _find_run(ctx, project, p), p


async def mlflow_runs_log_metric(ctx: Ctx) -> Response:
    c, p = await _run_write(ctx, "key", "value")
    value = _grape_float(p, "value")
    ts = _grape_int(p, "timestamp", required=True)
    step = _grape_int(p, "step", required=False)
    key = _grape_str(p, "key")
    _record(key, "-", value_max=250)  # CandidateMetric: the name's rules only
    ctx.store.add_metrics(int(c["id"]), [(key, value, int(ts or 0), step)])
    return json_response({})


async def mlflow_runs_log_parameter(ctx: Ctx) -> Response:
    c, p = await _run_write(ctx, "key")
    _required_key(p, "value")
    key, value = _grape_str(p, "key"), _grape_str(p, "value")
    _record(key, value, value_max=250)
    try:
        ctx.store.add_params(int(c["id"]), [(key, value)], skip_duplicates=False)
    except ConflictError as e:  # the unique index: ActiveRecord::RecordNotUnique
        raise mlflow_error("INVALID_PARAMETER_VALUE", 400, str(e)) from None
    return json_response({})


async def mlflow_runs_set_tag(ctx: Ctx) -> Response:
    c, p = await _run_write(ctx, "key")
    _required_key(p, "value")
    key, value = _grape_str(p, "key"), _grape_str(p, "value")
    _record(key, value, value_max=5000)
    try:
        ctx.store.add_tags(int(c["id"]), [(key, value)], skip_duplicates=False)
    except ConflictError as e:
        raise mlflow_error("INVALID_PARAMETER_VALUE", 400, str(e)) from None
    return json_response({})


async def mlflow_runs_log_batch(ctx: Ctx) -> Response:
    """Metrics, params and tags at once; validation errors block the whole batch, duplicate
    params and tags are skipped (`insert_all`)."""
    c, p = await _run_write(ctx)
    metrics: list[tuple[str, float, int, int | None]] = []
    for i, m in enumerate(_batch_items(p, "metrics")):
        for field_name in ("key", "value", "timestamp"):
            if m.get(field_name) is None:
                raise grape_error(f"metrics[{i}][{field_name}] is missing")
        value = _grape_float(m, "value")
        ts = _grape_int(m, "timestamp", required=True)
        key = _grape_str(m, "key", f"metrics[{i}][key]")
        metrics.append((key, value, int(ts or 0), _grape_int(m, "step", required=False)))
    params = []
    for i, q in enumerate(_batch_items(p, "params")):
        for field_name in ("key", "value"):
            if q.get(field_name) is None:
                raise grape_error(f"params[{i}][{field_name}] is missing")
        params.append(
            (
                _grape_str(q, "key", f"params[{i}][key]"),
                _grape_str(q, "value", f"params[{i}][value]"),
            )
        )
    tags = [(t["key"], t["value"]) for t in _kv(p.get("tags"))]
    cand = int(c["id"])
    ctx.store.add_metrics(cand, metrics)
    ctx.store.add_params(cand, params, skip_duplicates=True)
    ctx.store.add_tags(cand, tags, skip_duplicates=True)
    return json_response({})


def _batch_items(p: dict[str, Any], name: str) -> list[dict[str, Any]]:
    items = p.get(name)
    if items is None:
        return []
    if not isinstance(items, list) or not all(isinstance(x, dict) for x in items):
        raise grape_error(f"{name} is invalid")
    return items


def _required_key(p: dict[str, Any], name: str) -> None:
    """Grape `requires`: the key must be there (an empty string passes to the model)."""
    if p.get(name) is None:
        raise grape_error(f"{name} is missing")


async def mlflow_runs_delete(ctx: Ctx) -> Response:
    c, _ = await _run_write(ctx)
    ctx.store.delete_candidate(int(c["id"]))
    return json_response({})


async def _experiment_write(ctx: Ctx, *required: str) -> tuple[Row, dict[str, Any]]:
    project = _mlflow_access(ctx, registry=False)
    p = await _mlflow_params(ctx)
    _mlflow_write(ctx, project)
    _required(p, "experiment_id", *required)
    iid = _int_or_none(p["experiment_id"])
    e = ctx.store.experiment(int(project["id"]), iid=iid) if iid is not None else None
    if e is None:
        raise not_exist()
    return e, p


async def mlflow_experiments_delete(ctx: Ctx) -> Response:
    e, _ = await _experiment_write(ctx)
    try:
        ctx.store.delete_experiment(int(e["id"]))
    except StoreError as err:  # a model's experiment: render_api_error!(message, 400)
        raise message(400, str(err)) from None
    return json_response({})


async def mlflow_experiments_set_tag(ctx: Ctx) -> Response:
    e, p = await _experiment_write(ctx, "key")
    _required_key(p, "value")
    key, value = _grape_str(p, "key"), _grape_str(p, "value")
    _record(key, value, value_max=5000)
    try:
        ctx.store.set_experiment_tag(int(e["id"]), key, value)
    except ConflictError as err:
        raise mlflow_error("INVALID_PARAMETER_VALUE", 400, str(err)) from None
    return json_response({})


async def mlflow_runs_update(ctx: Ctx) -> Response:
    project = _mlflow_access(ctx, registry=False)
    p = await _mlflow_params(ctx)
    c = _find_run(ctx, project, p)
    _mlflow_write(ctx, project)
    fields: dict[str, Any] = {}
    if p.get("status"):
        st = str(p["status"]).lower()
        if st not in ("running", "scheduled", "finished", "failed", "killed"):
            raise grape_error("status does not have a valid value")
        fields["status"] = st
    if p.get("end_time") is not None:
        fields["end_time"] = _int_or_none(p["end_time"])
    if p.get("run_name"):
        fields["name"] = str(p["run_name"])
    ctx.store.update_candidate(int(c["id"]), **fields)
    c = ctx.store.candidate(int(project["id"]), iid=c["iid"]) or c
    return json_response({"run_info": _run_entity(ctx, c)["info"]})


async def mlflow_rm_create(ctx: Ctx) -> Response:
    project = _mlflow_access(ctx, registry=True)
    p = await _mlflow_params(ctx)
    _required(p, "name")
    _mlflow_write(ctx, project)
    principal = ctx.principal()
    name = str(p["name"])
    if not valid_model_name(name):
        raise mlflow_error("INVALID_PARAMETER_VALUE", 400, "Name is invalid")
    try:
        mid = ctx.store.create_model(
            int(project["id"]),
            name,
            description=str(p.get("description") or ""),
            user_id=principal.user_id if principal else None,
            tags=_kv(p.get("tags")),
        )
    except ConflictError:
        raise mlflow_error("RESOURCE_ALREADY_EXISTS") from None
    except InvalidError as e:
        raise mlflow_error("INVALID_PARAMETER_VALUE", 400, str(e)) from None
    m = ctx.store.one("SELECT * FROM models WHERE id=?", (mid,))
    assert m is not None
    return json_response({"registered_model": _model_entity(ctx, m)})


async def mlflow_rm_get(ctx: Ctx) -> Response:
    project = _mlflow_access(ctx, registry=True)
    p = await _mlflow_params(ctx)
    m = _find_model(ctx, project, p.get("name"))
    return json_response({"registered_model": _model_entity(ctx, m)})


async def mlflow_rm_update(ctx: Ctx) -> Response:
    project = _mlflow_access(ctx, registry=True)
    p = await _mlflow_params(ctx)
    m = _find_model(ctx, project, p.get("name"))
    _mlflow_write(ctx, project)
    if p.get("description") is not None:
        with ctx.store.tx() as db:
            db.execute(
                "UPDATE models SET description=?, updated_at=? WHERE id=?",
                (str(p["description"]), time.time(), m["id"]),
            )
    m = _find_model(ctx, project, m["name"])
    return json_response({"registered_model": _model_entity(ctx, m)})


async def mlflow_rm_delete(ctx: Ctx) -> Response:
    project = _mlflow_access(ctx, registry=True)
    p = await _mlflow_params(ctx)
    m = _find_model(ctx, project, p.get("name"))
    _mlflow_write(ctx, project)
    try:
        ctx.store.delete_model(int(project["id"]), int(m["id"]))
    except NotFoundError:
        raise message(400, "Model could not be deleted") from None
    return json_response({})


_FILTER = re.compile(r"\Aname='(.*)'\Z", re.DOTALL)


async def mlflow_rm_search(ctx: Ctx) -> Response:
    project = _mlflow_access(ctx, registry=True)
    p = await _mlflow_params(ctx)
    rows = ctx.store.all("SELECT * FROM models WHERE project_id=?", (project["id"],))
    flt = p.get("filter")
    if flt:
        fm = _FILTER.match(str(flt))
        if fm is None:
            raise mlflow_error(
                "INVALID_PARAMETER_VALUE",
                400,
                "Search filter is not supported. Only `name='<value>'` is supported",
            )
        rows = [r for r in rows if fm.group(1).lower() in r["name"].lower()]
    order = p.get("order_by")
    order_s = (order[0] if isinstance(order, list) and order else order) or "name ASC"
    col, _, direction = str(order_s).strip().partition(" ")
    cols: dict[str, Callable[[Row], Any]] = {
        "name": lambda r: r["name"],
        "last_updated_timestamp": lambda r: r["updated_at"],
        "created_at": lambda r: r["created_at"],
        "id": lambda r: r["id"],
    }
    if col not in cols or direction.strip().upper() not in ("", "ASC", "DESC"):
        raise mlflow_error("INVALID_PARAMETER_VALUE", 400, f"Invalid order_by {order_s}")
    page, token = _keyset(
        rows, cols[col], direction.strip().upper() == "DESC", p.get("page_token"), _max_results(p)
    )
    return json_response(
        {"registered_models": [_model_entity(ctx, m) for m in page], "next_page_token": token}
    )


async def mlflow_rm_latest(ctx: Ctx) -> Response:
    project = _mlflow_access(ctx, registry=True)
    p = await _mlflow_params(ctx)
    m = _find_model(ctx, project, p.get("name"))
    v = ctx.store.latest_version(int(m["id"]))
    return json_response({"model_versions": [_version_entity(ctx, v)] if v else []})


async def mlflow_rm_alias(ctx: Ctx) -> Response:
    project = _mlflow_access(ctx, registry=True)
    p = await _mlflow_params(ctx)
    m = _find_model(ctx, project, p.get("name"))
    v = ctx.store.version_by_semver(int(m["id"]), str(p.get("alias") or ""))
    if v is None:
        raise not_exist()
    return json_response({"model_version": _version_entity(ctx, v)})


async def mlflow_mv_create(ctx: Ctx) -> Response:
    project = _mlflow_access(ctx, registry=True)
    p = await _mlflow_params(ctx)
    _required(p, "name")
    m = _find_model(ctx, project, p.get("name"))
    _mlflow_write(ctx, project)
    tags = _kv(p.get("tags"))
    semver = next((t["value"] for t in tags if t["key"] == "gitlab.version"), None)
    if semver is None:
        latest = ctx.store.latest_version(int(m["id"]))
        semver = f"{latest['major']}.{latest['minor']}.{latest['patch'] + 1}" if latest else "1.0.0"
    if parse_semver(semver) is None:
        raise mlflow_error("INVALID_PARAMETER_VALUE", 400, "Version must be semantic version")
    principal = ctx.principal()
    try:
        vid = ctx.store.create_version(
            int(project["id"]),
            int(m["id"]),
            semver,
            description=str(p.get("description") or ""),
            tags=tags,
            user_id=principal.user_id if principal else None,
        )
    except ConflictError:
        raise mlflow_error(
            "INVALID_PARAMETER_VALUE", 400, "Version has already been taken"
        ) from None
    except InvalidError as e:
        raise mlflow_error("INVALID_PARAMETER_VALUE", 400, str(e)) from None
    v = ctx.store.version(int(project["id"]), vid)
    assert v is not None
    return json_response({"model_version": _version_entity(ctx, v)})


def _find_version_by_semver(ctx: Ctx, project: Row, p: dict[str, Any]) -> Row:
    m = _find_model(ctx, project, p.get("name"))
    v = ctx.store.version_by_semver(int(m["id"]), str(p.get("version") or ""))
    if v is None:
        raise not_exist()
    return v


async def mlflow_mv_get(ctx: Ctx) -> Response:
    project = _mlflow_access(ctx, registry=True)
    p = await _mlflow_params(ctx)
    _required(p, "name", "version")
    return json_response(
        {"model_version": _version_entity(ctx, _find_version_by_semver(ctx, project, p))}
    )


async def mlflow_mv_update(ctx: Ctx) -> Response:
    project = _mlflow_access(ctx, registry=True)
    p = await _mlflow_params(ctx)
    for n in ("name", "version", "description"):
        if p.get(n) is None:
            raise mlflow_error("INVALID_PARAMETER_VALUE", 400, f"{n} is required")
    v = _find_version_by_semver(ctx, project, p)
    _mlflow_write(ctx, project)
    with ctx.store.tx() as db:
        db.execute(
            "UPDATE model_versions SET description=?, updated_at=? WHERE id=?",
            (str(p["description"]), time.time(), v["id"]),
        )
    v2 = ctx.store.version(int(project["id"]), int(v["id"]))
    if v2 is None:
        raise mlflow_error("UPDATE_FAILED")
    return json_response({"model_version": _version_entity(ctx, v2)})


async def mlflow_mv_download_uri(ctx: Ctx) -> Response:
    project = _mlflow_access(ctx, registry=True)
    p = await _mlflow_params(ctx)
    _required(p, "name", "version")
    if not re.fullmatch(r"\s*[+-]?\d+\s*", str(p["version"])):
        raise grape_error("version is invalid")
    m = _find_model(ctx, project, p.get("name"))
    v = ctx.store.version(int(project["id"]), int(p["version"]))
    if v is None or v["model_id"] != m["id"]:
        raise not_exist()
    return json_response({"artifact_uri": f"mlflow-artifacts:/{v['id']}"})


MLFLOW_ROUTES: dict[tuple[str, str], Handler] = {
    ("GET", "experiments/get"): mlflow_experiments_get,
    ("GET", "experiments/get-by-name"): mlflow_experiments_get_by_name,
    ("GET", "experiments/list"): mlflow_experiments_list,
    ("POST", "experiments/search"): mlflow_experiments_search,
    ("POST", "experiments/create"): mlflow_experiments_create,
    ("POST", "runs/create"): mlflow_runs_create,
    ("GET", "runs/get"): mlflow_runs_get,
    ("POST", "runs/search"): mlflow_runs_search,
    ("POST", "runs/update"): mlflow_runs_update,
    ("POST", "runs/log-metric"): mlflow_runs_log_metric,
    ("POST", "runs/log-parameter"): mlflow_runs_log_parameter,
    ("POST", "runs/set-tag"): mlflow_runs_set_tag,
    ("POST", "runs/log-batch"): mlflow_runs_log_batch,
    ("POST", "runs/delete"): mlflow_runs_delete,
    ("POST", "experiments/delete"): mlflow_experiments_delete,
    ("POST", "experiments/set-experiment-tag"): mlflow_experiments_set_tag,
    ("POST", "registered-models/create"): mlflow_rm_create,
    ("GET", "registered-models/get"): mlflow_rm_get,
    ("PATCH", "registered-models/update"): mlflow_rm_update,
    ("DELETE", "registered-models/delete"): mlflow_rm_delete,
    ("GET", "registered-models/search"): mlflow_rm_search,
    ("POST", "registered-models/get-latest-versions"): mlflow_rm_latest,
    ("GET", "registered-models/alias"): mlflow_rm_alias,
    ("POST", "model-versions/create"): mlflow_mv_create,
    ("GET", "model-versions/get"): mlflow_mv_get,
    ("PATCH", "model-versions/update"): mlflow_mv_update,
    ("GET", "model-versions/get-download-uri"): mlflow_mv_download_uri,
}


# ---------------------------------------------------------------------------- mlflow-artifacts


def _artifact_package(ctx: Ctx, project: Row, owner: str) -> Row:
    """The package behind `<mv_id>` (or `candidate:<iid>`, as newer GitLab accepts)."""
    if owner.startswith(CANDIDATE_PREFIX):
        try:
            return ctx.store.owner_package(int(project["id"]), owner)
        except NotFoundError:
            raise not_exist() from None
    vid = ar_integer(owner)
    v = ctx.store.version(int(project["id"]), vid) if vid is not None else None
    pkg = ctx.store.package(v["package_id"]) if v is not None and v["package_id"] else None
    if pkg is None or pkg["status"] == "pending_destruction":
        raise not_exist()
    return pkg


async def mlflow_artifacts_list(ctx: Ctx) -> Response:
    project = _mlflow_access(ctx, registry=True)
    path = ctx.request.query_params.get("path")
    if not path:
        raise grape_error("path is missing")
    owner, _, sub = path.partition("/")
    pkg = _artifact_package(ctx, project, owner)
    if sub:
        return json_response({"files": []})
    files = ctx.store.files(int(pkg["id"]))
    return json_response(
        {
            "files": [
                {"path": f["file_name"], "file_size": f["size"], "is_dir": False} for f in files
            ]
        }
    )


async def mlflow_artifacts_download(ctx: Ctx) -> Any:
    project = _mlflow_access(ctx, registry=True)
    pkg = _artifact_package(ctx, project, unquote(ctx.groups["mv"]))
    file_path = unquote(ctx.groups["rest"])
    f = ctx.store.newest_file(int(pkg["id"]), cgi_escape(file_path))
    if f is None:
        raise not_exist()
    return present_file(ctx, f, pkg)


def build_apps(store: Store, settings: Settings, stats: Stats) -> tuple[ASGIApp, ASGIApp]:
    """(main app, storage app), both counted into `stats`."""
    from mlregfs.server.storage import StorageApp

    main = RegistryApp(store, settings, stats)
    storage = StorageApp(store.data_dir, main.signer)
    return Counted(main, stats, settings), Counted(storage, stats, settings, label="storage")


__all__ = ["ApiError", "RegistryApp", "Settings", "Stats", "StreamResponse", "build_apps"]
