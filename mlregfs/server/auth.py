"""Who is calling and what they may do: tokens to principals, token scopes, access levels.

GitLab reads a token from different places per API: the ml_models routes only from
`Authorization` (`sent_through(:http_bearer_token)`), the others from PRIVATE-TOKEN /
private_token, a Bearer header, and (where job tokens are allowed) JOB-TOKEN / job_token.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from mlregfs.server.http import ApiError, message
from mlregfs.server.store import Row, Store

GUEST, REPORTER, DEVELOPER, MAINTAINER = 10, 20, 30, 40
INSUFFICIENT_SCOPE = "The request requires higher privileges than provided by the access token."


@dataclass
class Principal:
    """Who is calling: the token's user, kind and scopes."""

    user_id: int
    kind: str  # "personal" | "job"
    scopes: tuple[str, ...]
    token_project_id: int | None


def _lookup(store: Store, token: str, kinds: tuple[str, ...]) -> Principal:
    row = store.find_token(token)
    if row is None or row["kind"] not in kinds:
        raise message(401, "401 Unauthorized")
    return Principal(
        int(row["user_id"]), row["kind"], tuple(row["scopes"].split(",")), row["project_id"]
    )


def authenticate(
    store: Store, headers: Mapping[str, str], query: Mapping[str, str], mode: str
) -> Principal | None:
    """The caller, or None for anonymous; 401 for an unknown token.

    `mode` is the route's: "ml_models", "api" (job tokens allowed) or "api_nojob".
    """
    h, q = headers, query
    if mode == "ml_models":
        # sent_through(:http_bearer_token): only Authorization, last space-separated word
        auth = h.get("authorization")
        if auth is None or not auth.split():
            return None
        return _lookup(store, auth.split()[-1], ("personal", "job"))
    pat = h.get("private-token") or q.get("private_token")
    if pat:
        return _lookup(store, pat, ("personal",))
    auth = h.get("authorization", "")
    parts = auth.split(None, 1)
    if len(parts) == 2 and parts[0].lower() == "bearer" and parts[1].strip():
        return _lookup(store, parts[1].strip(), ("personal",))
    if mode == "api":
        job = h.get("job-token") or q.get("job_token")
        if job:
            return _lookup(store, job, ("job",))
    return None


def require_scope(p: Principal | None, method: str, *, read: bool) -> None:
    """`api` always works; `read_api` only for GET/HEAD read endpoints (else 403)."""
    if p is None or "api" in p.scopes:
        return
    if read and method in ("GET", "HEAD") and "read_api" in p.scopes:
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


def access_level(store: Store, p: Principal | None, project: Row) -> int:
    """The caller's role in `project` (0 for none)."""
    if p is None:
        return 0
    if p.kind == "job" and p.token_project_id != project["id"]:
        return 0  # a job token acts only within its own project
    return store.access_level(int(project["id"]), p.user_id)


def can_read(store: Store, p: Principal | None, project: Row) -> bool:
    """Public projects for all, internal ones for any signed-in user, else guests and up."""
    vis = project["visibility"]
    if vis == "public" or (vis == "internal" and p is not None):
        return True
    return access_level(store, p, project) >= GUEST
