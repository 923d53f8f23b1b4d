"""Which project SOURCE names: each relative-root split is tried in turn (§7), a job token
is probed through the packages API, and the project's permissions say who may delete."""

from __future__ import annotations

import logging
from urllib.parse import unquote

import trio

from mlregfs.errors import ProtocolError
from mlregfs.registry import validate
from mlregfs.registry.gitlab.api import Api
from mlregfs.registry.http.errors import status_error
from mlregfs.registry.source import SourceSplit
from mlregfs.registry.types import ProjectInfo

log = logging.getLogger(__name__)

MAINTAINER_LEVEL = 40  # GitLab's Gitlab::Access::MAINTAINER
_REFUSALS = frozenset({401, 403, 404})  # answers the resolution explains itself


class Project:
    """The project once resolved; until then every operation waits for `get()`."""

    def __init__(self, api: Api, splits: list[SourceSplit]) -> None:
        self._api = api
        self._splits = splits
        self._lock = trio.Lock()
        self.info: ProjectInfo | None = None

    async def get(self) -> ProjectInfo:
        """Resolve SOURCE to a project (trying each relative-root split) and check access."""
        async with self._lock:
            if self.info is None:
                self.info = await self._resolve()
            return self.info

    async def _resolve(self) -> ProjectInfo:
        for split in self._splits:
            info = await self._try_split(split)
            if info is not None:
                self._api.api_base = split.api_base
                # Numeric ids survive project renames and need no encoding.
                self._api.ref = str(info.id) if info.id is not None else split.project_ref
                log.debug("project %s resolved at %s", info.path, split.api_base)
                return info
        first = self._splits[0]
        raise status_error(
            404,
            f"project {unquote(first.project_ref)} not found at {first.api_base} "
            "or not visible with this token",
        )

    async def _try_split(self, split: SourceSplit) -> ProjectInfo | None:
        """ProjectInfo if this split names a readable project, None on 404, else raise."""
        url = f"{split.api_base}/projects/{split.project_ref}"
        path = unquote(split.project_ref)
        reply = await self._api.json("project", "GET", url, passthrough=_REFUSALS)
        status, data = reply.status, reply.data
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
        if self._api.token is not None and self._api.token_kind == "job":
            # Job tokens often may not read the project entity, but may read its packages.
            return await self._probe_packages(split, path)
        if status == 404:
            return None
        if status == 401:
            if self._api.token is None:
                raise status_error(
                    401, f"anonymous access to project {path} refused (401); pass a token"
                )
            raise status_error(
                401, f"token refused for project {path} (401): invalid, expired or revoked"
            )
        raise status_error(
            403, f"token may not read project {path} (403): check its scopes (read_api or api)"
        )

    async def _probe_packages(self, split: SourceSplit, path: str) -> ProjectInfo | None:
        url = f"{split.api_base}/projects/{split.project_ref}/packages"
        reply = await self._api.json(
            "project", "GET", url, params={"per_page": "1"}, passthrough=_REFUSALS
        )
        if reply.status == 200:
            return ProjectInfo(id=None, path=path, visibility="private")
        if reply.status == 404:
            return None
        raise status_error(
            reply.status,
            f"job token refused for project {path} ({reply.status}): the job's project must "
            "be allowed in this project's job token allowlist",
        )

    async def may_delete_files(self) -> bool:
        """Maintainer or above, from the project's `permissions` (GET /projects/:id): the
        higher of the project and the group access level. Unknown (a job token may not read
        the project; an admin has neither) counts as no."""
        url = f"{self._api.api_base}/projects/{self._api.ref}"
        reply = await self._api.json("project", "GET", url, passthrough=_REFUSALS)
        data = reply.data
        if reply.status != 200 or not isinstance(data, dict):
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
