"""The projects and packages REST APIs (`/projects/:id`, `/projects/:id/packages...`)."""

from __future__ import annotations

from typing import Any

from starlette.responses import Response

from mlregfs.server.api.common import (
    int_param,
    package_entity,
    package_file_entity,
    paginate,
    present_file,
    project_entity,
    values_param,
)
from mlregfs.server.context import Ctx
from mlregfs.server.http import (
    DISPLAYABLE,
    MAINTAINER,
    NOT_FOUND,
    PACKAGE_STATUSES,
    PACKAGE_TYPES,
    json_response,
    message,
)
from mlregfs.server.store import (
    Row,
)

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
