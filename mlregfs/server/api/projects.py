"""The projects API (`GET /projects/:id`) and GitLab's project entity."""

from __future__ import annotations

from typing import Any

from starlette.responses import Response

from mlregfs.server.context import Ctx
from mlregfs.server.http import iso, json_response
from mlregfs.server.store import Row


async def get_project(ctx: Ctx) -> Response:
    ctx.require_scope(read=True)
    return json_response(project_entity(ctx, ctx.project()))


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
