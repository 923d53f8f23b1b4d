"""GitLabRegistry: the one module that speaks HTTP to GitLab. API/JSON requests go through
httpx.AsyncClient under trio; file bytes (ranged reads, uploads) through transfer.py, the one
byte transport, which tests run over real sockets as production does.

Routes and quirks follow /work/shared/reference/gitlab-api.md; the section numbers cited in
comments (§5, §7, ...) refer to it.

Authentication (§7): the ml_models file routes read only `Authorization: Bearer`, every other
API route reads `PRIVATE-TOKEN` (personal/project/group tokens) or `JOB-TOKEN` (CI job tokens).
MLflow routes refuse job tokens and anonymous callers, so with either the client lists through
the packages API only. Redirects to object storage are followed without any GitLab credential.

The token is kept in one private attribute and only ever copied into request headers: error
messages are built from method, path, status and the (scrubbed) GitLab message body.
"""

from __future__ import annotations

import functools
import http.client
import json
import logging
import math
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urljoin, urlsplit

import httpx
import trio

from mlregfs.buffers import Buffer
from mlregfs.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    ProtocolError,
    RateLimited,
    RegistryError,
    RegistryTimeout,
    RegistryUnavailable,
    ServerError,
    TooLarge,
    Unauthorized,
)
from mlregfs.registry import validate
from mlregfs.registry.base import RegistryStats
from mlregfs.registry.retry import (
    ErrorKind,
    RetryPolicy,
    kind_of,
    parse_retry_after,
    retry_delay,
)
from mlregfs.registry.runs import run_from_mlflow
from mlregfs.registry.source import SourceSplit, candidates
from mlregfs.registry.transfer import (
    REDIRECTS,
    USER_AGENT,
    Answer,
    Answered,
    Redirect,
    Transfer,
    deadline_error,
)
from mlregfs.registry.transfer import Failure as _Failure
from mlregfs.registry.types import (
    Candidate,
    FileOwner,
    Model,
    ModelVersion,
    ProjectInfo,
    RemoteFile,
    Run,
    owner_route_id,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
Route = Literal["api", "mlflow", "ml_models", "storage", "graphql"]
Sleep = Callable[[float], Awaitable[None]]
Clock = Callable[[], float]

PER_PAGE = 100  # GitLab's max_per_page; larger values are silently capped (§5)
MLFLOW_MAX_RESULTS = 1000  # MLflow search cap on GitLab (§5)
# Bounds on one listing, against a server that always announces another page (issue 9.6):
# pages and rows are capped, X-Total-Pages of the first page is believed up to the cap, and
# the whole listing has a deadline of its own (each page is also bounded by the retry deadline).
MAX_PAGES = 1_000
MAX_ITEMS = 100_000
LISTING_DEADLINE = 120.0
# Uploads have a total deadline of `timeout + size / MIN_UPLOAD_RATE` per attempt (and the
# operation `retry_deadline + size / MIN_UPLOAD_RATE`): 10 GiB may take up to ~11 h.
MIN_UPLOAD_RATE = 256 << 10  # bytes per second
MLFLOW_CONCURRENCY = 8  # runs/search requests in flight while listing candidates
SIGNED_URL_TTL = 60.0  # never reuse a signed storage URL longer than this (seconds)
SIGNED_URL_MARGIN = 5.0  # stop reusing it this long before the URL says it expires
MAX_REDIRECTS = 3
# package lookups: this many within SWEEP_WINDOW seconds list all packages at once, and that
# index answers for INDEX_TTL seconds
SWEEP_LOOKUPS, SWEEP_WINDOW, INDEX_TTL = 3, 10.0, 30.0
# After a connection-level failure, operations started within this many seconds make a single
# attempt: while the registry is known to be down, a burst of kernel reads must not each pay
# the whole backoff sequence (24 reads x 3 s = EIO after more than a minute).
OUTAGE_WINDOW = 5.0
ERROR_DETAIL_CHARS = 200

_REDIRECTS = REDIRECTS
_CANDIDATE_VERSION = re.compile(r"\Acandidate_([0-9]+)\Z")
_CANDIDATE_URI = re.compile(r"candidate:([0-9]+)")
_MODEL_ID_IN_SOURCE = re.compile(r"/-/ml/models/([0-9]+)(?:/|$)")
_CONTENT_RANGE = re.compile(r"\Abytes\s+([0-9]+)-([0-9]+)/([0-9]+|\*)\Z")


# True when a text is a version GitLab accepts for a model version (no leading `v`, §2)
is_semver = validate.check(validate.semver)


def _drop(what: str, exc: validate.Invalid) -> None:
    """Log an entry left out of a listing because the registry sent an invalid value."""
    log.warning("registry listing: %s dropped: %s", what, exc)


@dataclass(frozen=True)
class _Package:
    id: int
    hidden: bool
    created_at: float
    indexed: bool = False  # from the all-packages index, which may be up to INDEX_TTL old


MAINTAINER_LEVEL = 40  # GitLab's Gitlab::Access::MAINTAINER


class GitLabRegistry:
    """`Registry` implementation over GitLab's REST, packages and MLflow-compatible APIs."""

    def __init__(
        self,
        source: str,
        token: str | None = None,
        *,
        token_kind: Literal["personal", "job"] = "personal",
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Sleep | None = None,
        clock: Clock | None = None,
        token_refresh: Callable[[], str | None] | None = None,
        listing_deadline: float | None = None,
    ) -> None:
        if token_kind not in ("personal", "job"):
            raise ValueError(f"token_kind must be 'personal' or 'job', not {token_kind!r}")
        self._splits: list[SourceSplit] = candidates(source)  # ValueError on a bad SOURCE
        parts = urlsplit(source.strip())
        self._display = parts._replace(query="", fragment="").geturl()
        self._token = token or None
        self._token_kind = token_kind
        # called on a 401: a rotated token (re-read from its file) is tried once
        self._token_refresh = token_refresh
        # `timeout` bounds one HTTP request in total (connect, headers and body), not one
        # socket read: a server that drips a byte a second must not hold a reader for ever.
        self._timeout = timeout
        self._policy = retry or RetryPolicy()
        self._listing_deadline = (
            listing_deadline
            if listing_deadline is not None
            else max(LISTING_DEADLINE, self._policy.deadline)
        )
        self._sleep: Sleep = sleep or trio.sleep
        self._clock: Clock = clock or trio.current_time
        self._client = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(timeout),
            follow_redirects=False,  # redirects are followed by hand, without credentials
            headers={"User-Agent": USER_AGENT},
        )
        self.stats = RegistryStats()
        # ranged reads and uploads: one byte transport, in tests as in production (a test
        # `transport` only carries the JSON requests)
        self._transfer = Transfer(timeout, self._socket_failure)

        self._resolve_lock = trio.Lock()
        self._project: ProjectInfo | None = None
        self._api_base = self._splits[0].api_base
        self._ref = self._splits[0].project_ref
        # MLflow is tried once per session; None = not known yet. Job tokens and anonymous
        # callers are always refused there (§6, §7), so do not even ask.
        mlflow_possible = self._token is not None and token_kind == "personal"
        self._mlflow_models: bool | None = None if mlflow_possible else False
        self._mlflow_runs: bool | None = None if mlflow_possible else False
        self._package_ids: dict[tuple[str, str], int] = {}  # owner key -> package id
        # all ml_model packages by owner key, fetched when lookups come in a sweep
        self._index: dict[tuple[str, str], _Package] = {}
        self._index_at = float("-inf")
        self._lookups: list[float] = []  # clock times of recent package lookups
        self._signed: dict[tuple[int, int, str], tuple[str, float]] = {}  # -> (url, expiry)
        self._down_since: float | None = None  # clock time of the last connection failure

    def set_token(self, token: str | None) -> None:
        """Use a new token from now on (rotated CI/deploy tokens)."""
        self._token = token or None
        self._signed.clear()

    def __repr__(self) -> str:
        auth = f"{self._token_kind} token" if self._token else "anonymous"
        return f"GitLabRegistry({self._display!r}, {auth})"

    async def __aenter__(self) -> GitLabRegistry:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Release connections, including those of worker threads still blocked on them."""
        await self._transfer.aclose()
        await self._client.aclose()

    # ------------------------------------------------------------------------------ project

    async def project(self) -> ProjectInfo:
        """Resolve SOURCE to a project (trying each relative-root split) and check access."""
        async with self._resolve_lock:
            if self._project is None:
                self._project = await self._resolve_project()
            return self._project

    async def _resolve_project(self) -> ProjectInfo:
        for split in self._splits:
            info = await self._try_split(split)
            if info is not None:
                self._api_base = split.api_base
                # Numeric ids survive project renames and need no encoding.
                self._ref = str(info.id) if info.id is not None else split.project_ref
                log.debug("project %s resolved at %s", info.path, split.api_base)
                return info
        first = self._splits[0]
        raise NotFound(
            f"project {unquote(first.project_ref)} not found at {first.api_base} "
            "or not visible with this token",
            status=404,
        )

    async def _try_split(self, split: SourceSplit) -> ProjectInfo | None:
        """ProjectInfo if this split names a readable project, None on 404, else raise."""
        url = f"{split.api_base}/projects/{split.project_ref}"
        path = unquote(split.project_ref)
        data, resp = await self._json("project", "GET", url, passthrough=frozenset({401, 403, 404}))
        status = resp.status_code
        if status == 200:
            if not isinstance(data, dict) or not isinstance(data.get("id"), int):
                raise ProtocolError(f"GET /projects/{path}: answer is not a project")
            try:
                project_id = validate.ident(data["id"], "project id")
            except validate.Invalid as exc:
                raise ProtocolError(f"GET /projects/{path}: {exc}") from None
            return ProjectInfo(
                id=project_id,
                path=str(data.get("path_with_namespace") or path),
                visibility=str(data.get("visibility") or "private"),
            )
        if self._token is not None and self._token_kind == "job":
            # Job tokens often may not read the project entity, but may read its packages.
            return await self._probe_packages(split, path)
        if status == 404:
            return None
        if status == 401:
            if self._token is None:
                raise Unauthorized(
                    f"anonymous access to project {path} refused (401); pass a token",
                    status=401,
                )
            raise Unauthorized(
                f"token refused for project {path} (401): invalid, expired or revoked",
                status=401,
            )
        raise Forbidden(
            f"token may not read project {path} (403): check its scopes (read_api or api)",
            status=403,
        )

    async def _probe_packages(self, split: SourceSplit, path: str) -> ProjectInfo | None:
        url = f"{split.api_base}/projects/{split.project_ref}/packages"
        _, resp = await self._json(
            "project",
            "GET",
            url,
            params={"per_page": "1"},
            passthrough=frozenset({401, 403, 404}),
        )
        status = resp.status_code
        if status == 200:
            return ProjectInfo(id=None, path=path, visibility="private")
        if status == 404:
            return None
        cls = Unauthorized if status == 401 else Forbidden
        raise cls(
            f"job token refused for project {path} ({status}): the job's project must be "
            "allowed in this project's job token allowlist",
            status=status,
        )

    # ------------------------------------------------------------------------------ models

    async def list_models(self) -> list[Model]:
        """Every model with all its versions (MLflow search, else the packages API)."""
        await self.project()
        if self._mlflow_models is not False:
            try:
                models = await self._mlflow_list_models()
            except (Unauthorized, Forbidden, NotFound) as exc:
                self._mlflow_off("models", exc)
            else:
                self._mlflow_models = True
                return models
        return self._models_from_packages(await self._all_packages("list_models"))

    async def get_model(self, name: str) -> Model:
        """One model by exact name, with all its versions; NotFound if absent."""
        await self.project()
        if self._mlflow_models is not False:
            data, resp = await self._json(
                "get_model",
                "GET",
                self._mlflow_url("registered-models/get"),
                route="mlflow",
                params={"name": name},
                passthrough=frozenset({401, 403, 404}),
            )
            if resp.status_code == 200:
                self._mlflow_models = True
                rm = data.get("registered_model") if isinstance(data, dict) else None
                if not isinstance(rm, dict):
                    raise ProtocolError("registered-models/get: answer has no registered_model")
                return self._checked_model(rm)
            if resp.status_code == 404 and _error_code(data) == "RESOURCE_DOES_NOT_EXIST":
                self._mlflow_models = True
                raise NotFound(f"model {name!r} not found", status=404)
            self._mlflow_off("models", f"registered-models/get answered {resp.status_code}")
        rows = await self._all_packages("get_model", {"package_name": name})
        # package_name is a fuzzy (substring) search in GitLab (§8.18): compare exactly here.
        exact = [r for r in rows if r.get("name") == name]
        models = self._models_from_packages(exact)
        if not models:
            raise NotFound(f"model {name!r} not found", status=404)
        return models[0]

    async def _mlflow_list_models(self) -> list[Model]:
        models: list[Model] = []
        async for page in self._mlflow_pages(
            "list_models", "GET", "registered-models/search", "registered_models"
        ):
            for rm in page:
                try:
                    models.append(self._model_from_mlflow(rm))
                except validate.Invalid as exc:
                    _drop("model", exc)
        return models

    def _checked_model(self, rm: dict[str, Any]) -> Model:
        """One model answer that must be usable (get, create): ProtocolError if it is not."""
        try:
            return self._model_from_mlflow(rm)
        except validate.Invalid as exc:
            raise ProtocolError(f"registry answered an unusable model: {exc}") from None

    def _model_from_mlflow(self, rm: dict[str, Any]) -> Model:
        """Model from an MLflow registered model; Invalid if its name is unusable. Versions
        with an invalid id or version string are dropped (logged)."""
        name = validate.model_name(rm.get("name"))
        model_id: int | None = None
        versions: list[ModelVersion] = []
        # GitLab puts ALL versions into latest_versions (§5); `version` is the DB id and the
        # semver is aliases[0] (§6).
        for mv in rm.get("latest_versions") or []:
            if not isinstance(mv, dict):
                continue
            aliases = mv.get("aliases") or []
            alias = aliases[0] if isinstance(aliases, list) and aliases else None
            if alias is None:
                log.debug("model %r: version without a semver alias, skipped", name)
                continue
            try:
                mv_id = validate.ident(mv.get("version"), "model version id")
                semver = validate.semver(alias)
            except validate.Invalid as exc:
                _drop(f"version of model {validate.shown(name)}", exc)
                continue
            source = mv.get("source")
            if model_id is None and isinstance(source, str):
                m = _MODEL_ID_IN_SOURCE.search(source)
                model_id = int(m.group(1)) if m and len(m.group(1)) <= 18 else None
            versions.append(
                ModelVersion(
                    model=name,
                    version=semver,
                    id=mv_id,
                    created_at=_timestamp(mv.get("creation_timestamp")),
                    description=validate.optional(validate.text, mv.get("description")),
                    run_id=validate.optional(validate.run_id, mv.get("run_id")),
                )
            )
        return Model(
            name=name,
            id=model_id,
            created_at=_timestamp(rm.get("creation_timestamp")),
            versions=tuple(versions),
            description=validate.optional(validate.text, rm.get("description")),
        )

    def _models_from_packages(self, rows: list[dict[str, Any]]) -> list[Model]:
        """Models as the packages API sees them: no ids, no models without packages."""
        by_name: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            name = row.get("name")
            if not isinstance(name, str) or name.startswith("ml_experiment_"):
                continue  # experiment candidates, not a model
            try:
                validate.model_name(name)
            except validate.Invalid as exc:
                _drop("model package", exc)
                continue
            by_name.setdefault(name, []).append(row)
        models = []
        for name, pkgs in sorted(by_name.items()):
            # rows come from _all_packages: their ids are validated already
            versions = tuple(
                ModelVersion(
                    model=name,
                    version=str(p["version"]),
                    id=None,
                    created_at=_timestamp(p.get("created_at")),
                    package_id=int(p["id"]),
                )
                for p in sorted(pkgs, key=lambda p: int(p["id"]))
                if isinstance(p.get("version"), str) and is_semver(p["version"])
            )
            created = min((_timestamp(p.get("created_at")) for p in pkgs), default=0.0)
            models.append(Model(name=name, id=None, created_at=created, versions=versions))
        return models

    # ------------------------------------------------------------------------------ candidates

    async def list_candidates(self) -> list[Candidate]:
        """Candidates not promoted to a version: MLflow runs merged with candidate_N packages."""
        await self.project()
        runs: dict[int, Candidate] | None = None
        if self._mlflow_runs is not False:
            try:
                runs = await self._mlflow_candidates()
            except (Unauthorized, Forbidden, NotFound) as exc:
                self._mlflow_off("runs", exc)
            else:
                self._mlflow_runs = True
        merged: dict[int, Candidate] = dict(runs or {})
        for row in await self._all_packages("list_candidates"):
            m = _CANDIDATE_VERSION.match(str(row.get("version", "")))
            if not m:
                continue
            try:
                iid = validate.ident(m.group(1), "candidate iid")
            except validate.Invalid as exc:
                _drop("candidate package", exc)
                continue
            pkg_id = int(row["id"])  # validated by _all_packages
            known = merged.get(iid)
            if known is None:
                merged[iid] = Candidate(
                    iid=iid, created_at=_timestamp(row.get("created_at")), package_id=pkg_id
                )
            else:
                created = known.created_at or _timestamp(row.get("created_at"))
                merged[iid] = replace(known, package_id=pkg_id, created_at=created)
        return [merged[iid] for iid in sorted(merged)]

    async def _mlflow_candidates(self) -> dict[int, Candidate]:
        experiment_ids = await self._mlflow_experiment_ids()
        found: dict[int, Candidate] = {}
        limiter = trio.CapacityLimiter(MLFLOW_CONCURRENCY)

        async def runs_of(experiment_id: str) -> None:
            async with limiter:
                async for page in self._mlflow_pages(
                    "list_candidates",
                    "POST",
                    "runs/search",
                    "runs",
                    body={"experiment_ids": [experiment_id]},
                ):
                    for run in page:
                        cand = _candidate_from_run(run)
                        if cand is not None:
                            found[cand.iid] = cand

        await _gather([functools.partial(runs_of, e) for e in experiment_ids])
        return found

    async def _mlflow_experiment_ids(self) -> list[str]:
        ids: list[str] = []
        try:
            async for page in self._mlflow_pages(
                "list_candidates", "POST", "experiments/search", "experiments", body={}
            ):
                ids.extend(str(e["experiment_id"]) for e in page if _active(e))
        except (Forbidden, NotFound):
            # POST needs the `api` scope and older servers lack experiments/search; the
            # unpaginated GET experiments/list works with read_api.
            data, _ = await self._json(
                "list_candidates", "GET", self._mlflow_url("experiments/list"), route="mlflow"
            )
            rows = data.get("experiments") if isinstance(data, dict) else None
            ids = [str(e["experiment_id"]) for e in _dicts(rows, "experiments") if _active(e)]
        return ids

    async def get_run(self, run_id: str) -> Run:
        """What the run logged (`runs/get`): params, metrics with their history, tags."""
        await self.project()
        data, _ = await self._json(
            "get_run",
            "GET",
            self._mlflow_url("runs/get"),
            route="mlflow",
            params={"run_id": validate.run_id(run_id)},
        )
        try:
            return run_from_mlflow(data)
        except validate.Invalid as exc:
            raise ProtocolError(f"registry answered an unusable run: {exc}") from None

    def _mlflow_off(self, what: Literal["models", "runs"], why: object) -> None:
        log.info("MLflow API unavailable for %s (%s); using the packages API", what, why)
        if what == "models":
            self._mlflow_models = False
        else:
            self._mlflow_runs = False

    # ------------------------------------------------------------------------------ files

    async def list_files(self, owner: FileOwner) -> list[RemoteFile]:
        """Files of a version or candidate, newest copy per path; [] if it has no package."""
        await self.project()
        key = _owner_key(owner)
        known = owner.package_id if owner.package_id is not None else self._package_ids.get(key)
        if known is not None:
            rows = await self._package_files(known)
            if rows is not None:
                self._package_ids[key] = known
                return _files_from_rows(rows, known)
            self._package_ids.pop(key, None)  # deleted, or hidden since: look it up again
        pkg = await self._find_package(owner)
        if pkg is None:
            return []
        if not pkg.hidden:
            rows = await self._package_files(pkg.id)
            if rows is None and pkg.indexed:  # deleted or hidden since the index was made
                self._index_at = float("-inf")
                pkg = await self._query_package(owner)
                if pkg is None:
                    return []
                rows = None if pkg.hidden else await self._package_files(pkg.id)
            if rows is not None:
                self._package_ids[key] = pkg.id
                return _files_from_rows(rows, pkg.id)
        # A hidden package is invisible to /package_files (§5) but its files still download.
        return await self._artifact_files(owner, pkg)

    async def _find_package(self, owner: FileOwner) -> _Package | None:
        indexed = await self._indexed_package(owner)
        if indexed is not None:
            return indexed
        return await self._query_package(owner)

    async def _indexed_package(self, owner: FileOwner) -> _Package | None:
        """The package from one listing of all ml_model packages, when a sweep (`ls -lR`,
        `find`, `warm`) looks many up: one request per 100 packages instead of one per
        version. A single lookup keeps its targeted query; the index is trusted for
        INDEX_TTL, and a name it lacks is still asked for (new since, or hidden)."""
        now = self._clock()
        self._lookups = [t for t in self._lookups if now - t < SWEEP_WINDOW]
        self._lookups.append(now)
        if now - self._index_at >= INDEX_TTL:
            if len(self._lookups) < SWEEP_LOOKUPS:
                return None
            rows = await self._all_packages("list_files")
            index: dict[tuple[str, str], _Package] = {}
            for r in sorted(rows, key=lambda r: int(r["id"])):  # the newest package wins
                version = str(r.get("version", ""))
                m = _CANDIDATE_VERSION.match(version)
                key = ("candidate", m.group(1)) if m else (str(r["name"]), version)
                index[key] = _Package(
                    int(r["id"]), False, _timestamp(r.get("created_at")), indexed=True
                )
            self._index, self._index_at = index, self._clock()
        return self._index.get(_owner_key(owner))

    async def _query_package(self, owner: FileOwner) -> _Package | None:
        if isinstance(owner, Candidate):
            name: str | None = None
            version = f"candidate_{owner.iid}"
            params = {"package_version": version}
        else:
            name, version = owner.model, owner.version
            params = {"package_name": name, "package_version": version}
        for status in (None, "hidden"):  # hidden packages are left out unless asked for (§5)
            query = dict(params, status=status) if status else params
            rows = await self._all_packages("list_files", query)
            hits = [
                r
                for r in rows
                if r.get("version") == version and (name is None or r.get("name") == name)
            ]
            if hits:
                best = max(hits, key=lambda r: int(r["id"]))
                return _Package(
                    id=int(best["id"]),
                    hidden=status == "hidden",
                    created_at=_timestamp(best.get("created_at")),
                )
        return None

    async def _package_files(self, package_id: int) -> list[dict[str, Any]] | None:
        """All package_files rows of a package, or None when GitLab says 404."""
        url = self._project_url(f"packages/{package_id}/package_files")
        try:
            return await self._offset_pages("list_files", url, {"order_by": "id", "sort": "asc"})
        except NotFound:
            return None

    async def _artifact_files(self, owner: FileOwner, pkg: _Package) -> list[RemoteFile]:
        """List a hidden package through mlflow-artifacts: names and sizes only."""
        if (isinstance(owner, ModelVersion) and owner.id is None) or self._mlflow_models is False:
            log.warning(
                "files of %s are in a hidden package and cannot be listed without MLflow "
                "access (personal token) and the model-version id",
                _owner_label(owner),
            )
            return []
        data, resp = await self._json(
            "list_files",
            "GET",
            self._project_url("ml/mlflow/api/2.0/mlflow-artifacts/artifacts"),
            route="mlflow",
            params={"path": owner_route_id(owner)},
            passthrough=frozenset({404}),
        )
        if resp.status_code == 404:
            return []
        by_path: dict[str, RemoteFile] = {}
        for row in _dicts(data.get("files") if isinstance(data, dict) else None, "files"):
            if row.get("is_dir"):
                continue
            path = decode_file_name(str(row.get("path", "")))
            if path is None:
                continue
            try:
                size = validate.size(row.get("file_size"))
            except validate.Invalid as exc:
                _drop(f"file {validate.shown(path)}", exc)
                continue
            # No file ids here; 0 marks "unknown", reads go through the ml_models route by
            # name, which serves the newest copy, like the last row we keep.
            by_path[path] = RemoteFile(
                path=path,
                size=size,
                sha256=None,
                created_at=pkg.created_at,
                file_id=0,
                package_id=pkg.id,
            )
        return [by_path[p] for p in sorted(by_path)]

    # ------------------------------------------------------------------------------ reads

    async def read_range(
        self,
        owner: FileOwner,
        file: RemoteFile,
        start: int,
        end: int,
        *,
        into: memoryview | None = None,
    ) -> Buffer:
        """Bytes [start, end) of `file`; exactly end-start bytes or an error. With `into`
        (end-start bytes long) they land there and `into` is returned."""
        if not 0 <= start <= end:
            raise ValueError(f"invalid range [{start}, {end})")
        if end > file.size:
            raise ValueError(f"range end {end} is past the end of {file.path} ({file.size} B)")
        if into is not None and len(into) != end - start:
            raise ValueError(f"into is {len(into)} bytes, the range {end - start}")
        if start == end:
            return into if into is not None else b""
        if self._project is None:  # the lock is a trip through trio's scheduler per read
            await self.project()
        url, route = self._download_url(owner, file)
        key = (file.package_id, file.file_id, file.path)

        async def attempt() -> Buffer:
            cached = self._signed_url(key)
            if cached is not None:
                try:
                    return await self._follow(cached, "storage", start, end, file, into)
                except _Failure as failure:
                    self._signed.pop(key, None)
                    if failure.error.status not in (400, 403):
                        raise
                    # Expired or revoked signature: ask GitLab for a fresh one right away.
                    log.debug("signed URL for %s refused; re-signing", file.path)
            return await self._follow(url, route, start, end, file, into, cache_key=key)

        return await self._retrying(attempt, f"GET {_where(url)}")

    def _download_url(self, owner: FileOwner, file: RemoteFile) -> tuple[str, Route]:
        if isinstance(owner, Candidate) or owner.id is not None:
            segments = "/".join(quote(seg, safe="") for seg in file.path.split("/"))
            route_id = quote(owner_route_id(owner), safe=":")
            return self._project_url(f"packages/ml_models/{route_id}/files/{segments}"), "ml_models"
        if file.file_id <= 0:
            raise NotFound(f"{file.path}: no file id to download by", status=None)
        # Packages-only mode knows no model-version id: download by package-file id (18.4+).
        path = f"packages/{file.package_id}/package_files/{file.file_id}/download"
        return self._project_url(path), "api"

    def _signed_url(self, key: tuple[int, int, str]) -> str | None:
        entry = self._signed.get(key)
        if entry is None:
            return None
        url, expiry = entry
        if self._clock() >= expiry:
            del self._signed[key]
            return None
        return url

    def _remember_signed(self, key: tuple[int, int, str], url: str) -> None:
        ttl = min(SIGNED_URL_TTL, signed_url_lifetime(url, time.time()) - SIGNED_URL_MARGIN)
        if ttl > 0:
            self._signed[key] = (url, self._clock() + ttl)

    async def _follow(
        self,
        url: str,
        route: Route,
        start: int,
        end: int,
        file: RemoteFile,
        into: memoryview | None,
        cache_key: tuple[int, int, str] | None = None,
    ) -> Buffer:
        """One Range GET, following redirects to storage without GitLab credentials."""
        kind = "read_storage" if route == "storage" else "read"
        result = await self._range_get(url, route, kind, start, end, file, into)
        for hop in range(MAX_REDIRECTS + 1):
            if not isinstance(result, Redirect):
                return result
            if hop == MAX_REDIRECTS:
                break
            where = f"GET {_where(url)}"
            try:
                url = validate.url(urljoin(url, result.location))
            except (validate.Invalid, ValueError) as exc:  # urljoin refuses some garbage too
                raise _Failure(ProtocolError(f"{where}: {exc}"), retryable=False) from None
            if hop == 0 and cache_key is not None and route != "storage":
                self._remember_signed(cache_key, url)
            # Signed object-storage URLs refuse a second auth mechanism (§4): send none.
            result = await self._range_get(url, "storage", "read_storage", start, end, file, into)
        raise _Failure(
            ProtocolError(f"GET {_where(url)}: more than {MAX_REDIRECTS} redirects"),
            retryable=False,
        )

    async def _range_get(
        self,
        url: str,
        route: Route,
        kind: str,
        start: int,
        end: int,
        file: RemoteFile,
        into: memoryview | None,
    ) -> Buffer | Redirect:
        where = f"GET {_where(url)}"
        headers = self._auth_headers(route)
        headers["Range"] = f"bytes={start}-{end - 1}"
        headers["Accept-Encoding"] = "identity"  # byte offsets must mean file offsets
        self.stats.count(kind)
        result, received = await self._transfer.get_range(
            url, headers, where, start, end, file.size, into
        )
        self.stats.bytes_downloaded += received
        log.debug("%s [%d-%d) -> %s", where, start, end, type(result).__name__)
        if isinstance(result, Answer):
            raise self._status_failure("GET", url, result.status, result.headers, result.body)
        return result

    # ------------------------------------------------------------------------------ writes

    # Uploads are one raw-body PUT with Content-Length (what Workhorse expects, §3); the
    # /authorize preflight runs every permission and name check of the upload, stores nothing.

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
        return self._project_url(f"packages/ml_models/{route_id}/files/{segments}")

    async def authorize_upload(self, owner: FileOwner, path: str) -> None:
        """PUT …/files/<path>/authorize: 200 if an upload of `path` would be accepted."""
        await self.project()
        url = self._file_url(owner, path) + "/authorize"
        await self._json("authorize", "PUT", url, route="ml_models")

    async def upload(self, owner: FileOwner, path: str, source: Path, size: int) -> None:
        """Raw-body PUT of the file at `source`, streamed from disk; 201 or an error."""
        await self.project()
        url = self._file_url(owner, path)
        where = f"PUT {_where(url)}"

        # a total deadline that grows with the size: a slow link is fine, a stall is not
        transfer = size / MIN_UPLOAD_RATE
        budget = self._timeout + transfer

        async def attempt() -> None:
            self.stats.count("upload")
            headers = {
                **self._auth_headers("ml_models"),  # per attempt: the token may rotate
                "Content-Type": "application/octet-stream",
            }
            answer = await self._transfer.put_file(url, headers, where, source, size, budget)
            if answer.status != 201:
                raise self._status_failure("PUT", url, answer.status, answer.headers, answer.body)
            self.stats.bytes_uploaded += size

        await self._retrying(attempt, where, extra=transfer)

    async def delete_file(self, file: RemoteFile) -> None:
        """DELETE /projects/:id/packages/:pkg/package_files/:file (Maintainer; 204)."""
        await self.project()
        url = self._project_url(f"packages/{file.package_id}/package_files/{file.file_id}")
        await self._json("delete_file", "DELETE", url)

    async def may_delete_files(self) -> bool:
        """Maintainer or above, from the project's `permissions` (GET /projects/:id): the
        higher of the project and the group access level. Unknown (a job token may not read
        the project; an admin has neither) counts as no."""
        await self.project()
        url = f"{self._api_base}/projects/{self._ref}"
        data, resp = await self._json("project", "GET", url, passthrough=frozenset({401, 403, 404}))
        if resp.status_code != 200 or not isinstance(data, dict):
            return False
        perms = data.get("permissions")
        levels = [0]
        if isinstance(perms, dict):
            for kind in ("project_access", "group_access"):
                access = perms.get(kind)
                level = access.get("access_level") if isinstance(access, dict) else None
                if isinstance(level, int) and not isinstance(level, bool):
                    levels.append(level)
        return max(levels) >= MAINTAINER_LEVEL

    async def create_model(self, name: str) -> Model:
        """MLflow registered-models/create."""
        await self.project()
        data, _ = await self._json(
            "create_model",
            "POST",
            self._mlflow_url("registered-models/create"),
            route="mlflow",
            body={"name": name},
        )
        return self._checked_model(_dict(data, "registered_model"))

    async def create_version(self, model: str, version: str) -> ModelVersion:
        """MLflow model-versions/create; the `gitlab.version` tag sets the semver."""
        await self.project()
        body = {"name": model, "tags": [{"key": "gitlab.version", "value": version}]}
        data, _ = await self._json(
            "create_version",
            "POST",
            self._mlflow_url("model-versions/create"),
            route="mlflow",
            body=body,
        )
        mv = _dict(data, "model_version")
        aliases = mv.get("aliases") or [version]
        try:
            mv_id = validate.ident(mv.get("version"), "model version id")
            semver = validate.semver(aliases[0] if isinstance(aliases, list) else None)
        except validate.Invalid as exc:
            raise ProtocolError(f"model-versions/create: unusable answer: {exc}") from None
        return ModelVersion(model, semver, mv_id, _timestamp(mv.get("creation_timestamp")))

    async def delete_version(self, version: ModelVersion) -> None:
        """GraphQL mlModelVersionDelete: GitLab has no REST route for it."""
        await self.project()
        if version.id is None:
            raise BadRequest(f"cannot delete {version.model}/{version.version}: its id is unknown")
        gid = f"gid://gitlab/Ml::ModelVersion/{version.id}"
        await self._graphql("mlModelVersionDelete", gid, f"{version.model}/{version.version}")

    async def delete_model(self, name: str) -> None:
        """MLflow registered-models/delete."""
        await self.project()
        await self._json(
            "delete_model",
            "DELETE",
            self._mlflow_url("registered-models/delete"),
            route="mlflow",
            params={"name": name},
        )

    async def _graphql(self, mutation: str, gid: str, what: str) -> None:
        url = self._api_base.rsplit("/v4", 1)[0] + "/graphql"
        query = (
            f"mutation($id: {'MlModelVersionID' if 'Version' in mutation else 'MlModelID'}!)"
            f" {{ {mutation}(input: {{id: $id}}) {{ errors }} }}"
        )
        data, _ = await self._json(
            "graphql", "POST", url, route="graphql", body={"query": query, "variables": {"id": gid}}
        )
        if not isinstance(data, dict):
            raise ProtocolError(f"GraphQL {mutation}: unexpected answer")
        payload = (data.get("data") or {}).get(mutation)
        if payload is None:
            messages = "; ".join(str(e.get("message", e)) for e in data.get("errors") or [])
            raise Forbidden(f"GraphQL {mutation} on {what}: {self._scrub(messages)}")
        errors = payload.get("errors") or []
        if errors:
            text = "; ".join(map(str, errors))
            cls = NotFound if "not found" in text.lower() else BadRequest
            raise cls(f"GraphQL {mutation} on {what}: {self._scrub(text)}")

    # ------------------------------------------------------------------------------ HTTP core

    def _project_url(self, tail: str) -> str:
        return f"{self._api_base}/projects/{self._ref}/{tail}"

    def _mlflow_url(self, method: str) -> str:
        return self._project_url(f"ml/mlflow/api/2.0/mlflow/{method}")

    def _auth_headers(self, route: Route) -> dict[str, str]:
        if self._token is None or route == "storage":
            return {}
        if route in ("ml_models", "graphql"):
            # ml_models reads only the Authorization header; PRIVATE-TOKEN would be ignored
            # and the request treated as anonymous (§7).
            return {"Authorization": f"Bearer {self._token}"}
        if self._token_kind == "job":
            return {"JOB-TOKEN": self._token}
        return {"PRIVATE-TOKEN": self._token}

    async def _json(
        self,
        kind: str,
        method: str,
        url: str,
        *,
        route: Route = "api",
        params: Mapping[str, str] | None = None,
        body: Any = None,
        passthrough: frozenset[int] = frozenset(),
    ) -> tuple[Any, httpx.Response]:
        """A JSON request with retries. Statuses in `passthrough` are returned, not raised."""

        async def attempt() -> tuple[Any, httpx.Response]:
            return await self._json_once(kind, method, url, route, params, body, passthrough)

        return await self._retrying(attempt, f"{method} {_where(url)}")

    async def _json_once(
        self,
        kind: str,
        method: str,
        url: str,
        route: Route,
        params: Mapping[str, str] | None,
        body: Any,
        passthrough: frozenset[int],
    ) -> tuple[Any, httpx.Response]:
        headers = {"Accept": "application/json", **self._auth_headers(route)}
        where = f"{method} {_where(url)}"
        for _hop in range(MAX_REDIRECTS + 1):
            self.stats.count(kind)
            resp = await self._bounded_request(where, method, url, params, body, headers)
            log.debug("%s -> %d", where, resp.status_code)
            if resp.status_code not in _REDIRECTS or method != "GET":
                break
            # A renamed project answers 301 (§7). Follow only within the same origin, since
            # these requests carry the token in a header httpx would not strip.
            target = urljoin(str(resp.url), resp.headers.get("Location", ""))
            if _origin(target) != _origin(url):
                raise _Failure(
                    ProtocolError(f"{where} -> {resp.status_code} to another host; not followed"),
                    retryable=False,
                )
            url, params = target, None
        status = resp.status_code
        if 200 <= status < 300 or status in passthrough:
            if not resp.content:
                return None, resp
            try:
                return resp.json(), resp
            except ValueError:
                if status in passthrough and status >= 300:
                    return None, resp
                raise _Failure(ProtocolError(f"{where} -> {status}: body is not JSON")) from None
        raise self._status_failure(method, url, status, resp.headers, resp.content)

    async def _bounded_request(
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
                raise self._transport_failure(where, exc) from exc
        raise _Failure(deadline_error(where, self._timeout), outage=False)

    async def _retrying(
        self, attempt: Callable[[], Awaitable[T]], where: str, *, extra: float = 0.0
    ) -> T:
        """Run `attempt` until it succeeds or the retry policy gives up.

        The whole operation is bounded by the policy's deadline (plus `extra`, the transfer
        allowance of an upload): no attempt starts or continues past it. A deadline of 0 means
        one attempt, bounded by the per-request timeout only.
        """
        started = self._clock()
        policy = self._policy
        if extra:
            policy = replace(policy, deadline=policy.deadline + extra)
        if self._down_since is not None and started - self._down_since < OUTAGE_WINDOW:
            policy = replace(policy, max_attempts=1)  # known outage: fail fast
        number = 0
        refreshed = False
        last: _Failure | None = None
        while True:
            number += 1
            left = policy.deadline - (self._clock() - started)
            if number > 1 and left <= 0 and last is not None:
                self.stats.errors += 1
                raise last.error from last.__cause__
            try:
                with trio.move_on_after(left if policy.deadline > 0 else math.inf):
                    result = await attempt()
                    self._down_since = None
                    return result
                raise _Failure(
                    RegistryTimeout(f"{where}: no answer within {policy.deadline:g} s"),
                    retryable=False,
                    outage=False,
                )
            except _Failure as failure:
                last = failure
                if (
                    isinstance(failure.error, Unauthorized)
                    and self._token_refresh is not None
                    and not refreshed
                ):
                    refreshed = True
                    new = self._token_refresh()
                    if new and new != self._token:
                        log.info("token refused (401); retrying with the re-read token")
                        self.set_token(new)
                        continue
                kind = kind_of(failure.error) if failure.retryable else ErrorKind.FATAL
                if failure.outage and kind in (ErrorKind.CONNECT, ErrorKind.TIMEOUT):
                    self._down_since = self._clock()
                delay = retry_delay(
                    policy,
                    attempt=number,
                    kind=kind,
                    elapsed=self._clock() - started,
                    retry_after=failure.retry_after,
                    jitter=random.random(),
                )
                if delay is None:
                    self.stats.errors += 1
                    raise failure.error from failure.__cause__
                self.stats.retries += 1
                log.debug("%s; retry %d in %.2f s", failure.error, number, delay)
                await self._sleep(delay)

    def _status_failure(
        self, method: str, url: str, status: int, headers: Mapping[str, str], body: bytes
    ) -> _Failure:
        detail = self._scrub(_error_detail(body))
        message = f"{method} {_where(url)} -> {status}" + (f": {detail}" if detail else "")
        retry_after = None
        if status == 429 or status >= 500:
            # lower-case: byte answers come with lower-case names, httpx.Headers ignores case
            retry_after = parse_retry_after(headers.get("retry-after"), time.time())
        cls: type[RegistryError]
        if status == 400:
            if "RESOURCE_ALREADY_EXISTS" in detail:
                cls = Conflict
            else:
                cls = TooLarge if "too large" in detail.lower() else BadRequest
        elif status == 401:
            cls = Unauthorized
        elif status == 403:
            cls = Forbidden
        elif status in (404, 410):
            cls = NotFound
        elif status == 409:
            cls = Conflict
        elif status == 413:
            cls = TooLarge
        elif status == 429:
            cls = RateLimited
        elif status >= 500:
            cls = ServerError
        elif 400 <= status < 500:
            cls = BadRequest
        else:
            cls = ProtocolError
        retryable = status == 429 or status >= 500
        return _Failure(cls(message, status=status), retryable=retryable, retry_after=retry_after)

    def _socket_failure(self, where: str, exc: Exception) -> _Failure:
        """A socket, http.client or HTTP framing error of the byte path, as the error we would
        raise.

        Every one is retried like a dropped connection; a body cut short or a keep-alive
        connection the server closed says the registry is up (no fail-fast outage mode)."""
        if isinstance(exc, TimeoutError):
            return _Failure(RegistryTimeout(f"{where}: no answer within {self._timeout:g} s"))
        # short body, closed keep-alive, garbage instead of an answer
        answered = isinstance(exc, http.client.HTTPException | Answered)
        message = self._scrub(f"{where}: {_describe(exc)}")
        return _Failure(RegistryUnavailable(message), outage=not answered)

    def _transport_failure(self, where: str, exc: httpx.HTTPError) -> _Failure:
        """An httpx exception (no HTTP status) as the error we raise if we give up."""
        if isinstance(exc, httpx.TimeoutException):
            return _Failure(RegistryTimeout(f"{where}: no answer within {self._timeout:g} s"))
        if isinstance(exc, httpx.TransportError):
            # RemoteProtocolError: the peer closed mid-body; it answered, so no outage mode
            answered = isinstance(exc, httpx.RemoteProtocolError)
            message = self._scrub(f"{where}: {_describe(exc)}")
            return _Failure(RegistryUnavailable(message), outage=not answered)
        return _Failure(ProtocolError(self._scrub(f"{where}: {_describe(exc)}")))

    def _scrub(self, text: str) -> str:
        """Belt and braces: no server echo or library message may carry the token."""
        if self._token and self._token in text:
            text = text.replace(self._token, "[token]")
        return text

    # ------------------------------------------------------------------------------ pagination

    async def _all_packages(
        self, kind: str, extra: Mapping[str, str] | None = None
    ) -> list[dict[str, Any]]:
        params = {"package_type": "ml_model", **(extra or {})}
        rows = await self._offset_pages(kind, self._project_url("packages"), params)
        # Everything downstream keys on the package id (and puts it in URLs): drop rows
        # without a valid one.
        good = []
        for row in rows:
            try:
                if isinstance(row.get("id"), str) or not isinstance(row.get("name"), str):
                    raise validate.Invalid(f"package row {validate.shown(row)} is malformed")
                validate.ident(row.get("id"), "package id")
            except validate.Invalid as exc:
                _drop("package", exc)
                continue
            good.append(row)
        return good

    async def _offset_pages(
        self, kind: str, url: str, params: Mapping[str, str]
    ) -> list[dict[str, Any]]:
        """Every row of a GitLab offset-paginated listing (X-Next-Page, §5), bounded.

        At most MAX_PAGES pages (X-Total-Pages of the first page, when it says fewer, + 1 for
        rows added while we list), MAX_ITEMS rows and the listing deadline; a page that repeats
        the previous one is an error, an empty page after the first ends the listing.
        """
        where = f"GET {_where(url)}"
        rows: list[dict[str, Any]] = []
        page = 1
        limit = MAX_PAGES
        started = self._clock()
        previous: list[Any] | None = None
        for number in range(1, MAX_PAGES + 1):
            self._check_listing(where, started, number)
            query = {**params, "per_page": str(PER_PAGE), "page": str(page)}
            data, resp = await self._json(kind, "GET", url, params=query)
            items = _dicts(data, _where(url))
            if number == 1:
                total = (resp.headers.get("X-Total-Pages") or "").strip()
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
            next_page = resp.headers.get("X-Next-Page")
            if next_page is not None:
                if not next_page.strip():
                    return rows
                if (
                    not (next_page.strip().isascii() and next_page.strip().isdigit())
                    or int(next_page) <= page
                ):
                    raise ProtocolError(f"{where}: bad X-Next-Page {validate.shown(next_page)}")
                page = int(next_page)
            elif "next" in resp.links or len(items) >= PER_PAGE:
                # Headers stripped by a proxy: a full page means there may be another.
                page += 1
            else:
                return rows
            if number >= limit:
                raise ProtocolError(f"{where}: more pages than the {limit} announced")
        raise ProtocolError(f"{where}: more than {MAX_PAGES} pages")

    def _check_listing(self, where: str, started: float, number: int) -> None:
        """Fail a listing that has run past its deadline (checked before each page)."""
        if number > 1 and self._clock() - started > self._listing_deadline:
            raise ProtocolError(
                f"{where}: listing unfinished after {self._listing_deadline:g} s "
                f"({number - 1} pages)"
            )

    async def _mlflow_pages(
        self,
        kind: str,
        method: Literal["GET", "POST"],
        endpoint: str,
        key: str,
        body: dict[str, Any] | None = None,
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """Yield each page (list of dicts) of an MLflow keyset-paginated search (§5), with the
        bounds of `_offset_pages` (pages, rows, deadline, a repeating token)."""
        url = self._mlflow_url(endpoint)
        where = f"{method} {_where(url)}"
        token: str | None = None
        seen: set[str] = set()
        count = 0
        started = self._clock()
        for number in range(1, MAX_PAGES + 1):
            self._check_listing(where, started, number)
            if method == "GET":
                params = {"max_results": str(MLFLOW_MAX_RESULTS)}
                if token:
                    params["page_token"] = token
                data, _ = await self._json(kind, "GET", url, route="mlflow", params=params)
            else:
                payload = {**(body or {}), "max_results": MLFLOW_MAX_RESULTS}
                if token:
                    payload["page_token"] = token
                data, _ = await self._json(kind, "POST", url, route="mlflow", body=payload)
            if not isinstance(data, dict):
                raise ProtocolError(f"{where}: answer is not a JSON object")
            items = _dicts(data.get(key) or [], endpoint)
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


# ---------------------------------------------------------------------------------- helpers


def decode_file_name(stored: str) -> str | None:
    """Stored (percent-encoded) file_name -> relative path, or None if unsafe (§2, §8.3).

    Every decoded segment must be a usable name: not empty, `.` or `..`, no control
    character, at most 255 bytes. An unusable one is logged (escaped) and left out.
    """
    try:
        path = unquote(stored, errors="strict")  # `+` stays `+`: GitLab encodes it as %2B
        return validate.rel_path(path, "file name")
    except UnicodeDecodeError:
        _drop("file", validate.Invalid(f"file name {validate.shown(stored)} is not UTF-8"))
    except validate.Invalid as exc:
        _drop("file", exc)
    return None


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


def _files_from_rows(rows: list[dict[str, Any]], package_id: int) -> list[RemoteFile]:
    """Group package_files rows by decoded path; the highest id is what GitLab serves (§8.2)."""
    by_path: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        name = row.get("file_name")
        if not isinstance(name, str) or isinstance(row.get("id"), str):
            _drop("file", validate.Invalid(f"package file row {validate.shown(row)}"))
            continue
        try:
            validate.ident(row.get("id"), "package file id")
        except validate.Invalid as exc:
            _drop("file", exc)
            continue
        path = decode_file_name(name)
        if path is not None:
            by_path.setdefault(path, []).append(row)
    files = []
    for path in sorted(by_path):
        copies = sorted(by_path[path], key=lambda r: int(r["id"]))
        newest = copies[-1]
        # The newest copy is what GitLab serves: if it is unusable the name is dropped, never
        # replaced by an older copy's metadata.
        try:
            pkg = newest.get("package_id")
            files.append(
                RemoteFile(
                    path=path,
                    size=validate.size(newest.get("size")),
                    sha256=validate.sha256(newest.get("file_sha256")),
                    created_at=_timestamp(newest.get("created_at")),
                    file_id=int(newest["id"]),
                    package_id=package_id if pkg is None else validate.ident(pkg, "package id"),
                    older_ids=tuple(int(r["id"]) for r in copies[:-1]),
                )
            )
        except validate.Invalid as exc:
            _drop(f"file {validate.shown(path)}", exc)
    return files


def _candidate_from_run(run: Any) -> Candidate | None:
    info = run.get("info") if isinstance(run, dict) else None
    if not isinstance(info, dict) or info.get("lifecycle_stage") == "deleted":
        return None
    m = _CANDIDATE_URI.search(str(info.get("artifact_uri") or ""))
    if m is None:
        return None  # promoted to a model version (artifacts under its id), or legacy
    try:
        iid = validate.ident(m.group(1), "candidate iid")
    except validate.Invalid as exc:
        _drop("MLflow run", exc)
        return None
    return Candidate(
        iid=iid,
        created_at=_timestamp(info.get("start_time")),
        eid=validate.optional(validate.run_id, info.get("run_id")),
        name=validate.optional_text(info.get("run_name")),
    )


def _timestamp(value: Any) -> float:
    """GitLab/MLflow time -> epoch seconds. Numbers over 1e11 are milliseconds (MLflow runs).

    A time we cannot use (absent, unparsable, not finite, out of range) is 0, "unknown": a
    timestamp never names anything, so it does not cost the entry its place in the listing.
    """
    try:
        return validate.timestamp(_seconds(value))
    except (ValueError, OverflowError, OSError) as exc:  # validate.Invalid is a ValueError
        log.warning("registry listing: timestamp %s ignored: %s", validate.shown(value), exc)
        return 0.0


def _seconds(value: Any) -> float:
    if value is None or isinstance(value, bool):
        return 0.0
    if isinstance(value, int | float):
        return value / 1000.0 if value > 1e11 else float(value)
    if isinstance(value, str) and value:
        if value.isascii() and value.isdigit():
            return _seconds(int(value))
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            return 0.0
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return when.timestamp()
    return 0.0


def _error_code(data: Any) -> str | None:
    return data.get("error_code") if isinstance(data, dict) else None


def _error_detail(body: bytes) -> str:
    """The message part of a GitLab error body, one line, truncated. Never headers."""
    text = body[:4096].decode("utf-8", errors="replace").strip()
    if not text:
        return ""
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        parts = []
        for key in ("error_code", "message", "error", "error_description"):
            value = data.get(key)
            if isinstance(value, dict):  # {"message": {"error": "..."}}
                value = "; ".join(f"{k}: {v}" for k, v in value.items())
            if value:
                parts.append(str(value))
        text = " - ".join(parts) if parts else text
    elif text.startswith("<"):
        return "(HTML page)"
    text = " ".join(text.split())
    return text if len(text) <= ERROR_DETAIL_CHARS else text[: ERROR_DETAIL_CHARS - 3] + "..."


def _dicts(data: Any, what: str) -> list[dict[str, Any]]:
    if data is None:
        return []
    if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
        raise ProtocolError(f"{what}: expected a JSON list of objects")
    return data


def _dict(data: Any, key: str) -> dict[str, Any]:
    value = data.get(key) if isinstance(data, dict) else None
    if not isinstance(value, dict):
        raise ProtocolError(f"expected a JSON object with {key!r}")
    return value


def _active(experiment: dict[str, Any]) -> bool:
    return "experiment_id" in experiment and experiment.get("lifecycle_stage") != "deleted"


def _owner_key(owner: FileOwner) -> tuple[str, str]:
    if isinstance(owner, Candidate):
        return ("candidate", str(owner.iid))
    return (owner.model, owner.version)


def _owner_label(owner: FileOwner) -> str:
    if isinstance(owner, Candidate):
        return f"candidate {owner.iid}"
    return f"{owner.model}/{owner.version}"


def _where(url: str) -> str:
    """Host-less path of a URL for messages: never the query (signatures), never userinfo."""
    return urlsplit(url).path or "/"


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return (parts.scheme.lower(), parts.netloc.lower())


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def _gather(tasks: list[Callable[[], Awaitable[None]]]) -> None:
    """Run tasks concurrently; re-raise the first failure itself, not an ExceptionGroup."""
    try:
        async with trio.open_nursery() as nursery:
            for task in tasks:
                nursery.start_soon(task)
    except BaseExceptionGroup as group:
        _raise_first(group)


def _raise_first(group: BaseExceptionGroup[BaseException]) -> NoReturn:
    first = group.exceptions[0]
    if isinstance(first, BaseExceptionGroup):
        _raise_first(first)
    raise first
