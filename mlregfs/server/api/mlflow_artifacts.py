"""mlflow-artifacts: a model version's (or run's) package files as MLflow lists and fetches them."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from starlette.responses import Response

from mlregfs.server.api.downloads import present_file
from mlregfs.server.api.mlflow import mlflow_access
from mlregfs.server.context import Ctx
from mlregfs.server.http import grape_error, json_response, not_exist
from mlregfs.server.store import CANDIDATE_PREFIX, NotFoundError, Row
from mlregfs.server.validation import ar_integer, cgi_escape


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
    project = mlflow_access(ctx, registry=True)
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
    project = mlflow_access(ctx, registry=True)
    pkg = _artifact_package(ctx, project, unquote(ctx.groups["mv"]))
    file_path = unquote(ctx.groups["rest"])
    f = ctx.store.newest_file(int(pkg["id"]), cgi_escape(file_path))
    if f is None:
        raise not_exist()
    return present_file(ctx, f, pkg)
