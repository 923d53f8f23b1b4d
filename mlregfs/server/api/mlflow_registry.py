"""The MLflow model registry API: registered models and their versions."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from starlette.responses import Response

from mlregfs.server.api.mlflow import (
    find_model,
    keyset,
    max_results,
    mlflow_access,
    mlflow_params,
    mlflow_write,
    model_entity,
    require_params,
    tag_list,
    version_entity,
)
from mlregfs.server.context import Ctx
from mlregfs.server.http import grape_error, json_response, message, mlflow_error, not_exist
from mlregfs.server.store import ConflictError, InvalidError, NotFoundError, Row
from mlregfs.server.validation import parse_semver, valid_model_name


async def mlflow_rm_create(ctx: Ctx) -> Response:
    project = mlflow_access(ctx, registry=True)
    p = await mlflow_params(ctx)
    require_params(p, "name")
    mlflow_write(ctx, project)
    name = str(p["name"])
    if not valid_model_name(name):
        raise mlflow_error("INVALID_PARAMETER_VALUE", 400, "Name is invalid")
    try:
        mid = ctx.store.create_model(
            int(project["id"]),
            name,
            description=str(p.get("description") or ""),
            user_id=ctx.user_id(),
            tags=tag_list(p.get("tags")),
        )
    except ConflictError:
        raise mlflow_error("RESOURCE_ALREADY_EXISTS") from None
    except InvalidError as e:
        raise mlflow_error("INVALID_PARAMETER_VALUE", 400, str(e)) from None
    m = ctx.store.model_by_id(mid)
    assert m is not None
    return json_response({"registered_model": model_entity(ctx, m)})


async def _model_request(ctx: Ctx) -> tuple[Row, dict[str, Any], Row]:
    """The project, the params and the registered model they name (else not found)."""
    project = mlflow_access(ctx, registry=True)
    p = await mlflow_params(ctx)
    return project, p, find_model(ctx, project, p.get("name"))


async def mlflow_rm_get(ctx: Ctx) -> Response:
    _, _, m = await _model_request(ctx)
    return json_response({"registered_model": model_entity(ctx, m)})


async def mlflow_rm_update(ctx: Ctx) -> Response:
    project, p, m = await _model_request(ctx)
    mlflow_write(ctx, project)
    if p.get("description") is not None:
        ctx.store.set_model_description(int(m["id"]), str(p["description"]))
    m = find_model(ctx, project, m["name"])
    return json_response({"registered_model": model_entity(ctx, m)})


async def mlflow_rm_delete(ctx: Ctx) -> Response:
    project, _, m = await _model_request(ctx)
    mlflow_write(ctx, project)
    try:
        ctx.store.delete_model(int(project["id"]), int(m["id"]))
    except NotFoundError:
        raise message(400, "Model could not be deleted") from None
    return json_response({})


_FILTER = re.compile(r"\Aname='(.*)'\Z", re.DOTALL)


async def mlflow_rm_search(ctx: Ctx) -> Response:
    project = mlflow_access(ctx, registry=True)
    p = await mlflow_params(ctx)
    rows = ctx.store.models(int(project["id"]))
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
    page, token = keyset(
        rows, cols[col], direction.strip().upper() == "DESC", p.get("page_token"), max_results(p)
    )
    return json_response(
        {"registered_models": [model_entity(ctx, m) for m in page], "next_page_token": token}
    )


async def mlflow_rm_latest(ctx: Ctx) -> Response:
    _, _, m = await _model_request(ctx)
    v = ctx.store.latest_version(int(m["id"]))
    return json_response({"model_versions": [version_entity(ctx, v)] if v else []})


async def mlflow_rm_alias(ctx: Ctx) -> Response:
    _, p, m = await _model_request(ctx)
    v = ctx.store.version_by_semver(int(m["id"]), str(p.get("alias") or ""))
    if v is None:
        raise not_exist()
    return json_response({"model_version": version_entity(ctx, v)})


async def mlflow_mv_create(ctx: Ctx) -> Response:
    project = mlflow_access(ctx, registry=True)
    p = await mlflow_params(ctx)
    require_params(p, "name")
    m = find_model(ctx, project, p.get("name"))
    mlflow_write(ctx, project)
    tags = tag_list(p.get("tags"))
    semver = next((t["value"] for t in tags if t["key"] == "gitlab.version"), None)
    if semver is None:
        latest = ctx.store.latest_version(int(m["id"]))
        semver = f"{latest['major']}.{latest['minor']}.{latest['patch'] + 1}" if latest else "1.0.0"
    if parse_semver(semver) is None:
        raise mlflow_error("INVALID_PARAMETER_VALUE", 400, "Version must be semantic version")
    try:
        vid = ctx.store.create_version(
            int(project["id"]),
            int(m["id"]),
            semver,
            description=str(p.get("description") or ""),
            tags=tags,
            user_id=ctx.user_id(),
        )
    except ConflictError:
        raise mlflow_error(
            "INVALID_PARAMETER_VALUE", 400, "Version has already been taken"
        ) from None
    except InvalidError as e:
        raise mlflow_error("INVALID_PARAMETER_VALUE", 400, str(e)) from None
    v = ctx.store.version(int(project["id"]), vid)
    assert v is not None
    return json_response({"model_version": version_entity(ctx, v)})


def _find_version_by_semver(ctx: Ctx, project: Row, p: dict[str, Any]) -> Row:
    m = find_model(ctx, project, p.get("name"))
    v = ctx.store.version_by_semver(int(m["id"]), str(p.get("version") or ""))
    if v is None:
        raise not_exist()
    return v


async def mlflow_mv_get(ctx: Ctx) -> Response:
    project = mlflow_access(ctx, registry=True)
    p = await mlflow_params(ctx)
    require_params(p, "name", "version")
    return json_response(
        {"model_version": version_entity(ctx, _find_version_by_semver(ctx, project, p))}
    )


async def mlflow_mv_update(ctx: Ctx) -> Response:
    project = mlflow_access(ctx, registry=True)
    p = await mlflow_params(ctx)
    for n in ("name", "version", "description"):
        if p.get(n) is None:
            raise mlflow_error("INVALID_PARAMETER_VALUE", 400, f"{n} is required")
    v = _find_version_by_semver(ctx, project, p)
    mlflow_write(ctx, project)
    ctx.store.set_version_description(int(v["id"]), str(p["description"]))
    v2 = ctx.store.version(int(project["id"]), int(v["id"]))
    if v2 is None:
        raise mlflow_error("UPDATE_FAILED")
    return json_response({"model_version": version_entity(ctx, v2)})


async def mlflow_mv_download_uri(ctx: Ctx) -> Response:
    project = mlflow_access(ctx, registry=True)
    p = await mlflow_params(ctx)
    require_params(p, "name", "version")
    if not re.fullmatch(r"\s*[+-]?\d+\s*", str(p["version"])):
        raise grape_error("version is invalid")
    m = find_model(ctx, project, p.get("name"))
    v = ctx.store.version(int(project["id"]), int(p["version"]))
    if v is None or v["model_id"] != m["id"]:
        raise not_exist()
    return json_response({"artifact_uri": f"mlflow-artifacts:/{v['id']}"})
