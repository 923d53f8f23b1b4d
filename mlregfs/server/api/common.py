"""Entities (GitLab's JSON shapes) and parameter helpers shared by the REST APIs."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlencode

from starlette.responses import Response

from mlregfs.server.context import Ctx
from mlregfs.server.http import API, DISPLAYABLE, MAINTAINER, grape_error, iso
from mlregfs.server.serving import serve_file
from mlregfs.server.store import (
    Row,
)

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
