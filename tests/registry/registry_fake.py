"""A small in-process GitLab for GitLabRegistry tests, served over real sockets (wire.py; the
`gitlab` fixture) or through httpx.MockTransport (JSON-only tests).

It implements just enough of the routes in /work/shared/reference/gitlab-api.md (§1, §5, §6) to
exercise the client: auth headers per route, offset and keyset pagination, fuzzy package_name,
encoded file names, duplicate rows, hidden packages, Range, 302 to signed storage, and a queue
of injected failures. Every request is recorded for assertions.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import httpx

API = "https://gitlab.example/api/v4"
SOURCE = "https://gitlab.example/group/proj"
TOKEN = "glpat-SECRET-abc123"
JOB_TOKEN = "glcbt-JOBSECRET-xyz"
PROJECT_ID = 7


def encode_name(path: str) -> str:
    """How GitLab stores a file name: encodeURIComponent of the whole relative path (§2)."""
    return quote(path, safe="-_.!~*'()")


class ChunkedStream(httpx.AsyncByteStream, httpx.SyncByteStream):
    """A response body delivered in fixed-size chunks, like a socket would."""

    def __init__(self, data: bytes, chunk: int) -> None:
        self._data = data
        self._chunk = chunk

    def __iter__(self) -> Iterator[bytes]:
        for i in range(0, len(self._data), self._chunk):
            yield self._data[i : i + self._chunk]

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self:
            yield chunk


@dataclass
class FakeFile:
    id: int
    package_id: int
    file_name: str  # stored (encoded) form
    data: bytes
    created_at: str = "2024-05-01T10:00:00.000Z"


@dataclass
class FakePackage:
    id: int
    name: str
    version: str
    hidden: bool = False
    created_at: str = "2024-05-01T09:00:00.000Z"


@dataclass
class FakeGitLab:
    """State of one project plus switches that make the server misbehave on purpose."""

    tokens: dict[str, str] = field(default_factory=lambda: {TOKEN: "personal", JOB_TOKEN: "job"})
    visibility: str = "private"
    project_entity_for_job: bool = False  # GET /projects/:id refuses job tokens
    mlflow_enabled: bool = True
    models: dict[str, int] = field(default_factory=dict)  # name -> model id
    versions: dict[int, tuple[str, str]] = field(default_factory=dict)  # mv id -> (model, semver)
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # experiment iid -> runs
    packages: list[FakePackage] = field(default_factory=list)
    files: list[FakeFile] = field(default_factory=list)
    honour_range: bool = True
    redirect: bool = False  # serve downloads as 302 to "object storage"
    signed_expires: int = 600
    storage_refuse: set[str] = field(default_factory=set)  # signed URLs that answer 403
    failures: list[tuple[str, Callable[[httpx.Request], httpx.Response]]] = field(
        default_factory=list
    )
    requests: list[httpx.Request] = field(default_factory=list)
    mlflow_page_size: int = 1000
    short_body: int = 0  # cut this many bytes off every download body
    download_chunk: int = 1 << 20
    _next_id: int = 100
    sign_count: int = 0
    origin: str = "https://gitlab.example"  # where the GitLab API answers
    storage_origin: str = "https://storage.example"  # where signed URLs point
    wires: list[Any] = field(default_factory=list)  # the WireServers, when on sockets

    @property
    def source(self) -> str:
        return f"{self.origin}/group/proj"

    def is_storage(self, request: httpx.Request) -> bool:
        """Did this request reach the storage origin (not GitLab)?"""
        want = urlsplit(self.storage_origin)
        return (request.url.host, request.url.port) == (want.hostname, want.port)

    # ---------------------------------------------------------------- building state

    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def add_model(self, name: str) -> int:
        self.models[name] = self.new_id()
        return self.models[name]

    def add_version(self, model: str, semver: str, *, package: bool = True) -> int:
        if model not in self.models:
            self.add_model(model)
        mv_id = self.new_id()
        self.versions[mv_id] = (model, semver)
        if package:
            self.add_package(model, semver)
        return mv_id

    def add_package(self, name: str, version: str, *, hidden: bool = False) -> FakePackage:
        pkg = FakePackage(self.new_id(), name, version, hidden)
        self.packages.append(pkg)
        return pkg

    def add_file(self, pkg: FakePackage, path: str, data: bytes) -> FakeFile:
        f = FakeFile(self.new_id(), pkg.id, encode_name(path), data)
        self.files.append(f)
        return f

    def fail(self, pattern: str, *responses: Callable[[httpx.Request], httpx.Response]) -> None:
        """Answer the next requests whose path matches `pattern` with `responses`, in order."""
        for r in responses:
            self.failures.append((pattern, r))

    # ---------------------------------------------------------------- transport

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def paths(self) -> list[str]:
        return [r.url.path for r in self.requests]

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        raw = request.url.raw_path.decode()
        path = raw.split("?", 1)[0]
        for i, (pattern, responder) in enumerate(self.failures):
            if re.search(pattern, path):
                del self.failures[i]
                return responder(request)
        if self.is_storage(request):
            return self.storage(request)
        m = re.fullmatch(r"/api/v4/projects/([^/]+)(/.*)?", path)
        if not m:
            return _json(404, {"error": "404 Not Found"})
        ref, rest = m.group(1), m.group(2) or ""
        if ref not in (str(PROJECT_ID), "group%2Fproj"):
            return _json(404, {"message": "404 Project Not Found"})
        if rest.startswith("/packages/ml_models/"):
            return self.ml_models(request, rest)
        if rest.startswith("/ml/mlflow/"):
            return self.mlflow(request, rest)
        who = self.api_user(request)
        if who == "invalid":
            return _json(401, {"message": "401 Unauthorized"})
        if who is None and self.visibility != "public":
            return _json(404, {"message": "404 Project Not Found"})
        if rest == "":
            if who == "job" and not self.project_entity_for_job:
                return _json(404, {"message": "404 Project Not Found"})
            return _json(
                200,
                {
                    "id": PROJECT_ID,
                    "path_with_namespace": "group/proj",
                    "visibility": self.visibility,
                },
            )
        if rest == "/packages":
            return self.list_packages(request)
        m = re.fullmatch(r"/packages/(\d+)/package_files", rest)
        if m:
            return self.list_package_files(request, int(m.group(1)))
        m = re.fullmatch(r"/packages/(\d+)/package_files/(\d+)/download", rest)
        if m:
            f = next((f for f in self.files if f.id == int(m.group(2))), None)
            if f is None or f.package_id != int(m.group(1)):
                return _json(404, {"message": "404 Not found"})
            return self.serve(request, f)
        return _json(404, {"error": "404 Not Found"})

    def api_user(self, request: httpx.Request) -> str | None:
        """Who a PRIVATE-TOKEN / JOB-TOKEN request is; 'invalid' for a bad token."""
        for header in ("PRIVATE-TOKEN", "JOB-TOKEN"):
            value = request.headers.get(header)
            if value is not None:
                kind = self.tokens.get(value)
                expected = "personal" if header == "PRIVATE-TOKEN" else "job"
                return kind if kind == expected else "invalid"
        return None

    # ---------------------------------------------------------------- packages API

    def list_packages(self, request: httpx.Request) -> httpx.Response:
        q = request.url.params
        status = q.get("status")
        pkgs = [p for p in self.packages if p.hidden == (status == "hidden")]
        if "package_name" in q:  # fuzzy, like GitLab's search_by_name
            pkgs = [p for p in pkgs if q["package_name"].lower() in p.name.lower()]
        if "package_version" in q:
            pkgs = [p for p in pkgs if p.version == q["package_version"]]
        rows = [
            {
                "id": p.id,
                "name": p.name,
                "version": p.version,
                "package_type": "ml_model",
                "status": "hidden" if p.hidden else "default",
                "created_at": p.created_at,
            }
            for p in pkgs
        ]
        return _page(request, rows)

    def list_package_files(self, request: httpx.Request, pkg_id: int) -> httpx.Response:
        pkg = next((p for p in self.packages if p.id == pkg_id), None)
        if pkg is None or pkg.hidden:
            return _json(404, {"message": "404 Not Found"})
        rows = [
            {
                "id": f.id,
                "package_id": f.package_id,
                "created_at": f.created_at,
                "file_name": f.file_name,
                "size": len(f.data),
                "file_md5": None,
                "file_sha1": None,
                "file_sha256": hashlib.sha256(f.data).hexdigest(),
            }
            for f in sorted(self.files, key=lambda f: f.id)
            if f.package_id == pkg_id
        ]
        return _page(request, rows)

    # ---------------------------------------------------------------- ml_models + storage

    def ml_models(self, request: httpx.Request, rest: str) -> httpx.Response:
        auth = request.headers.get("Authorization")
        if auth is not None and self.tokens.get(auth.split()[-1]) is None:
            return _json(401, {"message": "401 Unauthorized"})
        if auth is None and self.visibility != "public":
            return _json(404, {"message": "404 Project Not Found"})
        m = re.fullmatch(r"/packages/ml_models/([^/]+)/files/(.+)", rest)
        if not m:
            return _json(404, {"error": "404 Not Found"})
        owner = unquote(m.group(1))
        if owner.startswith("candidate:"):
            want = ("*", f"candidate_{owner.removeprefix('candidate:')}")
        elif owner.isdigit() and int(owner) in self.versions:
            want = self.versions[int(owner)]
        else:
            return _json(404, {"message": "404 Not Found"})
        pkg = next(
            (p for p in self.packages if p.version == want[1] and want[0] in ("*", p.name)),
            None,
        )
        if pkg is None:
            return _json(404, {"message": "404 Not Found"})
        path = "/".join(unquote(s) for s in m.group(2).split("/"))
        copies = [f for f in self.files if f.package_id == pkg.id and unquote(f.file_name) == path]
        if not copies:
            return _json(404, {"message": "404 Not found"})
        return self.serve(request, max(copies, key=lambda f: f.id))

    def serve(self, request: httpx.Request, f: FakeFile) -> httpx.Response:
        if self.redirect:
            self.sign_count += 1
            now = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            url = (
                f"{self.storage_origin}/bucket/{f.id}?X-Amz-Date={now}"
                f"&X-Amz-Expires={self.signed_expires}&X-Amz-Signature=sig{self.sign_count}"
            )
            return httpx.Response(302, headers={"Location": url})
        return self.ranged(request, f.data)

    def storage(self, request: httpx.Request) -> httpx.Response:
        if any(h in request.headers for h in ("Authorization", "PRIVATE-TOKEN", "JOB-TOKEN")):
            return httpx.Response(400, text="<Error>Only one auth mechanism allowed</Error>")
        if str(request.url) in self.storage_refuse:
            return httpx.Response(403, text="<Error><Code>AccessDenied</Code></Error>")
        fid = int(request.url.path.rsplit("/", 1)[1])
        f = next(f for f in self.files if f.id == fid)
        return self.ranged(request, f.data)

    def ranged(self, request: httpx.Request, data: bytes) -> httpx.Response:
        rng = request.headers.get("Range")
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", rng or "")
        if m and self.honour_range:
            a, b = int(m.group(1)), min(int(m.group(2)), len(data) - 1)
            body = data[a : b + 1]
            status = 206
            headers = {"Content-Range": f"bytes {a}-{b}/{len(data)}"}
        else:
            body, status, headers = data, 200, {}
        # declared: on the wire, a short body then ends with the connection
        headers["Content-Length"] = str(len(body))
        if self.short_body:
            body = body[: -self.short_body]
        return httpx.Response(
            status, headers=headers, stream=ChunkedStream(body, self.download_chunk)
        )

    # ---------------------------------------------------------------- MLflow

    def mlflow(self, request: httpx.Request, rest: str) -> httpx.Response:
        auth = request.headers.get("PRIVATE-TOKEN") or request.headers.get("Authorization")
        if request.headers.get("JOB-TOKEN") or auth is None:
            return _json(401, {"message": "401 Unauthorized"})
        if self.tokens.get(auth.split()[-1]) != "personal":
            return _json(401, {"message": "401 Unauthorized"})
        if not self.mlflow_enabled:
            return _json(404, {"message": "404 Not Found"})
        method = rest.removeprefix("/ml/mlflow/api/2.0/")
        q = request.url.params
        body = json.loads(request.content) if request.content else {}
        if method == "mlflow/registered-models/search":
            names = sorted(self.models)
            return self.keyset(
                names,
                q.get("page_token"),
                int(q["max_results"]),
                "registered_models",
                self.registered_model,
            )
        if method == "mlflow/registered-models/get":
            if q.get("name") not in self.models:
                return _json(404, {"error_code": "RESOURCE_DOES_NOT_EXIST"})
            return _json(200, {"registered_model": self.registered_model(q["name"])})
        if method == "mlflow/experiments/search" and request.method == "POST":
            ids = sorted(self.runs)
            return self.keyset(
                ids,
                body.get("page_token"),
                int(body["max_results"]),
                "experiments",
                lambda e: {"experiment_id": e, "name": f"exp{e}"},
            )
        if method == "mlflow/runs/search" and request.method == "POST":
            runs = self.runs.get(body["experiment_ids"][0], [])
            return self.keyset(
                list(range(len(runs))),
                body.get("page_token"),
                int(body["max_results"]),
                "runs",
                lambda i: runs[i],
            )
        if method == "mlflow-artifacts/artifacts":
            mv = q.get("path", "")
            if not mv.isdigit() or int(mv) not in self.versions:
                return _json(404, {"error_code": "RESOURCE_DOES_NOT_EXIST"})
            name, ver = self.versions[int(mv)]
            pkg = next((p for p in self.packages if (p.name, p.version) == (name, ver)), None)
            if pkg is None:
                return _json(404, {"error_code": "RESOURCE_DOES_NOT_EXIST"})
            files = [
                {"path": f.file_name, "file_size": len(f.data), "is_dir": False}
                for f in self.files
                if f.package_id == pkg.id
            ]
            return _json(200, {"files": files})
        return _json(404, {"error": "404 Not Found"})

    def registered_model(self, name: str) -> dict[str, Any]:
        mid = self.models[name]
        versions = [
            {
                "name": name,
                "version": str(mv_id),
                "aliases": [semver],
                "creation_timestamp": 1_700_000_000 + mv_id,
                "source": f"https://gitlab.example/group/proj/-/ml/models/{mid}/versions/{mv_id}",
                "current_stage": "development",
            }
            for mv_id, (model, semver) in sorted(self.versions.items())
            if model == name
        ]
        return {"name": name, "creation_timestamp": 1_700_000_000, "latest_versions": versions}

    def keyset(
        self,
        keys: list[Any],
        token: str | None,
        limit: int,
        field_name: str,
        render: Callable[[Any], Any],
    ) -> httpx.Response:
        limit = min(limit, self.mlflow_page_size)
        start = int(token) if token else 0
        chunk = keys[start : start + limit]
        nxt = str(start + limit) if start + limit < len(keys) else None
        return _json(200, {field_name: [render(k) for k in chunk], "next_page_token": nxt})


def _json(status: int, data: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json=data, headers=headers)


def _page(request: httpx.Request, rows: list[dict[str, Any]]) -> httpx.Response:
    """GitLab offset pagination: per_page capped at 100, X-Next-Page empty on the last page."""
    q = request.url.params
    per_page = min(int(q.get("per_page", 20)), 100)
    page = int(q.get("page", 1))
    chunk = rows[(page - 1) * per_page : page * per_page]
    more = page * per_page < len(rows)
    headers = {
        "X-Page": str(page),
        "X-Per-Page": str(per_page),
        "X-Next-Page": str(page + 1) if more else "",
        "X-Total": str(len(rows)),
    }
    return _json(200, chunk, headers)


@dataclass
class Sleeps:
    """Injected sleep + clock: records delays and advances a fake clock instantly."""

    now: float = 0.0
    delays: list[float] = field(default_factory=list)

    async def sleep(self, seconds: float) -> None:
        self.delays.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now
