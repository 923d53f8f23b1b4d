"""One request as handlers see it (`Ctx`): params, auth, project lookup, permissions."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import unquote

from starlette.requests import Request

from mlregfs.server.http import (
    GUEST,
    INSUFFICIENT_SCOPE,
    PROJECT_NOT_FOUND,
    ApiError,
    Principal,
    message,
)
from mlregfs.server.store import (
    Row,
)

if TYPE_CHECKING:  # the app builds contexts; only its type is needed here
    from mlregfs.server.app import RegistryApp


class Ctx:
    """Per-request state handed to handlers."""

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
            self._principal = self._authenticate()
            self._authed = True
        return self._principal

    def _lookup(self, token: str, kinds: tuple[str, ...]) -> Principal:
        row = self.store.find_token(token)
        if row is None or row["kind"] not in kinds:
            raise message(401, "401 Unauthorized")
        return Principal(
            int(row["user_id"]), row["kind"], tuple(row["scopes"].split(",")), row["project_id"]
        )

    def _authenticate(self) -> Principal | None:
        h = self.request.headers
        q = self.request.query_params
        if self.auth_mode == "ml_models":
            # sent_through(:http_bearer_token): only Authorization, last space-separated word
            auth = h.get("authorization")
            if auth is None or not auth.split():
                return None
            return self._lookup(auth.split()[-1], ("personal", "job"))
        pat = h.get("private-token") or q.get("private_token")
        if pat:
            return self._lookup(pat, ("personal",))
        auth = h.get("authorization", "")
        parts = auth.split(None, 1)
        if len(parts) == 2 and parts[0].lower() == "bearer" and parts[1].strip():
            return self._lookup(parts[1].strip(), ("personal",))
        if self.auth_mode == "api":
            job = h.get("job-token") or q.get("job_token")
            if job:
                return self._lookup(job, ("job",))
        return None

    def user_id(self) -> int | None:
        """The caller's user (who creates a model, version or run); None for anonymous."""
        p = self.principal()
        return p.user_id if p else None

    def require_scope(self, *, read: bool) -> None:
        """`api` always works; `read_api` only for GET/HEAD read endpoints."""
        p = self.principal()
        if p is None or "api" in p.scopes:
            return
        if read and self.request.method in ("GET", "HEAD") and "read_api" in p.scopes:
            return
        raise ApiError(
            403,
            {
                "error": "insufficient_scope",
                "error_description": INSUFFICIENT_SCOPE,
                "scope": "api read_api",
            },
            {
                "WWW-Authenticate": 'Bearer realm="Protected by OAuth 2.0", '
                'error="insufficient_scope", '
                f'error_description="{INSUFFICIENT_SCOPE}", scope="api read_api"'
            },
        )

    # -------------------------------------------------------------- project and permissions

    def level(self, project: Row) -> int:
        p = self.principal()
        if p is None:
            return 0
        if p.kind == "job" and p.token_project_id != project["id"]:
            return 0  # a job token acts only within its own project
        return self.store.access_level(int(project["id"]), p.user_id)

    def can_read(self, project: Row) -> bool:
        vis = project["visibility"]
        if vis == "public" or (vis == "internal" and self.principal() is not None):
            return True
        return self.level(project) >= GUEST

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
