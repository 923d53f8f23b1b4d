"""The packages REST API (`/projects/:id/packages...`): list, show, delete, files, download."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlencode

from starlette.responses import Response

from mlregfs.server.api.downloads import present_file
from mlregfs.server.auth import MAINTAINER
from mlregfs.server.context import Ctx
from mlregfs.server.http import (
    API,
    DISPLAYABLE,
    NOT_FOUND,
    PACKAGE_STATUSES,
    PACKAGE_TYPES,
    grape_error,
    iso,
    json_response,
    message,
)
from mlregfs.server.store import Row

# ------------------------------------------------------------------------ entities and params


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
        siblings = ctx.store.package_versions(pkg, DISPLAYABLE)
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


def _package_to_destroy(ctx: Ctx) -> Row:
    """`api` scope and a maintainer (403), then the displayable package (404)."""
    ctx.require_scope(read=False)
    project = ctx.project()
    if ctx.level(project) < MAINTAINER:
        raise message(403, "403 Forbidden")
    return _displayable_package(ctx, project)


def _package_file(ctx: Ctx, pkg: Row) -> Row:
    """The route's installable file of `pkg`, else 404 Not Found."""
    fid = int_param(ctx, "package_file_id", ctx.groups["file_id"])
    f = ctx.store.file(int(pkg["id"]), fid or 0)
    if f is None:
        raise message(404, NOT_FOUND)
    return f


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
    rows = ctx.store.packages(
        int(project["id"]),
        statuses=(status,) if status else DISPLAYABLE,
        package_type=ptype,
        name_like=q.get("package_name"),
        version=q.get("package_version"),
        order_by=order_by or "created_at",
        descending=sort == "desc",
    )
    page, headers = paginate(ctx, rows)
    return json_response([package_entity(ctx, r) for r in page], headers=headers)


async def get_package(ctx: Ctx) -> Response:
    project = _packages_access(ctx)
    pkg = _displayable_package(ctx, project)
    return json_response(package_entity(ctx, pkg, with_versions=True))


async def delete_package(ctx: Ctx) -> Response:
    pkg = _package_to_destroy(ctx)
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
    rows = ctx.store.files(int(pkg["id"]), order_by=order_by or "id", descending=sort == "desc")
    page, headers = paginate(ctx, rows)
    return json_response([package_file_entity(f) for f in page], headers=headers)


async def delete_package_file(ctx: Ctx) -> Response:
    pkg = _package_to_destroy(ctx)
    f = _package_file(ctx, pkg)
    _check_unmodified_since(ctx, f["updated_at"])
    ctx.store.destroy_file(int(f["id"]))
    return Response(status_code=204)


async def download_package_file(ctx: Ctx) -> Any:
    project = _packages_access(ctx)
    pkg = _displayable_package(ctx, project)
    f = _package_file(ctx, pkg)
    return present_file(ctx, f, pkg)
