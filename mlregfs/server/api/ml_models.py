"""The ml_models package files API: upload and download of a version's or run's files."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote

import anyio
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from mlregfs.server.api.downloads import present_file
from mlregfs.server.auth import DEVELOPER
from mlregfs.server.context import Ctx
from mlregfs.server.http import NOT_FOUND, grape_error, json_response, message
from mlregfs.server.store import (
    InvalidError,
    NotFoundError,
    Row,
)
from mlregfs.server.validation import (
    encode_uri_component,
    valid_file_name,
)


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
