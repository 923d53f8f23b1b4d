"""One request as handlers see it (`Ctx`): route params, the caller, the project."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import unquote

from starlette.requests import Request

from mlregfs.server import auth
from mlregfs.server.auth import Principal
from mlregfs.server.http import PROJECT_NOT_FOUND, message
from mlregfs.server.store import Row

if TYPE_CHECKING:  # the app builds contexts; only its type is needed here
    from mlregfs.server.app import RegistryApp


class Ctx:
    """Per-request state handed to handlers; the caller is authenticated once, when asked."""

    def __init__(self, app: RegistryApp, request: Request, groups: dict[str, str], auth: str):
        self.app = app
        self.store = app.store
        self.request = request
        self.groups = groups
        self.auth_mode = auth
        self._principal: Principal | None = None
        self._authed = False
        self._project: Row | None = None

    # -------------------------------------------------------------- authentication

    def principal(self) -> Principal | None:
        """The caller, or None for anonymous; raises 401 for an unknown token."""
        if not self._authed:
            r = self.request
            self._principal = auth.authenticate(
                self.store, r.headers, r.query_params, self.auth_mode
            )
            self._authed = True
        return self._principal

    def user_id(self) -> int | None:
        """The caller's user (who creates a model, version or run); None for anonymous."""
        p = self.principal()
        return p.user_id if p else None

    def require_scope(self, *, read: bool) -> None:
        """`api` always works; `read_api` only for GET/HEAD read endpoints."""
        auth.require_scope(self.principal(), self.request.method, read=read)

    # -------------------------------------------------------------- project and permissions

    def level(self, project: Row) -> int:
        return auth.access_level(self.store, self.principal(), project)

    def can_read(self, project: Row) -> bool:
        if project["visibility"] == "public":
            return True  # decided without the token: an unknown one is no 401 here
        return auth.can_read(self.store, self.principal(), project)

    def project(self) -> Row:
        """`find_project!` + read access: 404 Project Not Found otherwise."""
        if self._project is None:
            ref = unquote(self.groups["id"])
            row = self.store.project(ref)
            if row is None or not self.can_read(row):
                raise message(404, PROJECT_NOT_FOUND)
            self._project = row
        return self._project

    def base_url(self) -> str:
        return str(self.request.base_url).rstrip("/")
