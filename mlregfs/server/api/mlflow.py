"""What the MLflow APIs share: request params, access checks, keyset pages, model entities.

GitLab serves MLflow's REST API under `/projects/:id/ml/mlflow/api/2.0/mlflow/`; its errors
have MLflow's shape (`error_code`), its params come from the query and a JSON body alike.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

from mlregfs.server.auth import DEVELOPER
from mlregfs.server.context import Ctx
from mlregfs.server.http import NOT_FOUND, grape_error, message, mlflow_error, not_exist
from mlregfs.server.store import Row


async def mlflow_params(ctx: Ctx) -> dict[str, Any]:
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


def mlflow_access(ctx: Ctx, *, registry: bool) -> Row:
    """`authenticate!` + scopes + read_model_experiments (+ read_model_registry)."""
    if ctx.principal() is None:
        raise message(401, "401 Unauthorized")
    ctx.require_scope(read=True)
    project = ctx.project()
    if not ctx.can_read(project):
        raise message(404, NOT_FOUND)
    return project


def mlflow_write(ctx: Ctx, project: Row) -> None:
    if ctx.level(project) < DEVELOPER:
        raise message(401, "401 Unauthorized")


def require_params(params: dict[str, Any], *names: str) -> None:
    for n in names:
        if params.get(n) in (None, ""):
            raise grape_error(f"{n} is missing")


def tag_list(tags: Any) -> list[dict[str, str]]:
    if not isinstance(tags, list):
        return []
    return [
        {"key": str(t.get("key")), "value": str(t.get("value", ""))}
        for t in tags
        if isinstance(t, dict) and t.get("key") is not None
    ]


def max_results(params: dict[str, Any], default: int = 200) -> int:
    v = params.get("max_results")
    if v in (None, ""):
        return default
    try:
        n = int(v)
    except (TypeError, ValueError):
        raise grape_error("max_results is invalid") from None
    return max(1, min(n, 1000))


def keyset(
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


def version_entity(ctx: Ctx, v: Row) -> dict[str, Any]:
    project = ctx.project()
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
        "run_id": ctx.store.version_run_id(int(v["id"])),
        "status": "READY",
        "status_message": "",
        "tags": json.loads(v["tags"]),
        "run_link": "",
        "aliases": [v["version"]],
    }


def model_entity(ctx: Ctx, m: Row) -> dict[str, Any]:
    return {
        "name": m["name"],
        "creation_timestamp": int(m["created_at"]),
        "last_updated_timestamp": int(m["updated_at"]),
        "description": m["description"] or "",
        "user_id": str(m["user_id"]) if m["user_id"] is not None else "",
        "tags": json.loads(m["tags"]),
        "latest_versions": [version_entity(ctx, v) for v in ctx.store.versions(m["id"])],
    }


def find_model(ctx: Ctx, project: Row, name: Any) -> Row:
    m = ctx.store.model(int(project["id"]), str(name)) if name else None
    if m is None:
        raise not_exist()
    return m
