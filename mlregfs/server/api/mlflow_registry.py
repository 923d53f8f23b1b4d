"""The MLflow model registry API as GitLab serves it (registered models, versions) and
mlflow-artifacts."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

from starlette.responses import Response

from mlregfs.server.api.common import present_file
from mlregfs.server.api.mlflow import (
    _find_model,
    _keyset,
    _kv,
    _max_results,
    _mlflow_access,
    _mlflow_params,
    _mlflow_write,
    _model_entity,
    _required,
    _version_entity,
    mlflow_experiments_create,
    mlflow_experiments_delete,
    mlflow_experiments_get,
    mlflow_experiments_get_by_name,
    mlflow_experiments_list,
    mlflow_experiments_search,
    mlflow_experiments_set_tag,
    mlflow_runs_create,
    mlflow_runs_delete,
    mlflow_runs_get,
    mlflow_runs_log_batch,
    mlflow_runs_log_metric,
    mlflow_runs_log_parameter,
    mlflow_runs_search,
    mlflow_runs_set_tag,
    mlflow_runs_update,
)
from mlregfs.server.context import Ctx, Handler
from mlregfs.server.http import grape_error, json_response, message, mlflow_error, not_exist
from mlregfs.server.store import (
    CANDIDATE_PREFIX,
    ConflictError,
    InvalidError,
    NotFoundError,
    Row,
)
from mlregfs.server.validation import (
    ar_integer,
    cgi_escape,
    parse_semver,
    valid_model_name,
)


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
