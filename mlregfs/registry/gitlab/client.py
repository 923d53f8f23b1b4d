"""GitLabRegistry: the `Registry` over GitLab's REST, packages and MLflow-compatible APIs. It
resolves the project once, then hands each operation to its module (project, listing, files,
transfer, admin), which share one `Api` session.

Authentication (§7): the ml_models file routes read only `Authorization: Bearer`, every other
API route reads `PRIVATE-TOKEN` (personal/project/group tokens) or `JOB-TOKEN` (CI job tokens).
MLflow routes refuse job tokens and anonymous callers, so with either the client lists through
the packages API only. Redirects to object storage are followed without any GitLab credential.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import trio

from mlregfs.buffers import Buffer
from mlregfs.registry import types as t
from mlregfs.registry.base import RegistryStats, check_range
from mlregfs.registry.gitlab.admin import Admin
from mlregfs.registry.gitlab.api import Api, TokenKind
from mlregfs.registry.gitlab.files import Files
from mlregfs.registry.gitlab.listing import Listing
from mlregfs.registry.gitlab.pages import LISTING_DEADLINE
from mlregfs.registry.gitlab.project import Project
from mlregfs.registry.gitlab.transfer import Transfers
from mlregfs.registry.http.rest import JsonTransport
from mlregfs.registry.http.retrying import Clock, Sleep
from mlregfs.registry.http.wire import Into
from mlregfs.registry.retry import RetryPolicy
from mlregfs.registry.source import candidates

log = logging.getLogger(__name__)


class GitLabRegistry:
    """`Registry` implementation over GitLab's REST, packages and MLflow-compatible APIs."""

    def __init__(
        self,
        source: str,
        token: str | None = None,
        *,
        token_kind: TokenKind = "personal",
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        transport: JsonTransport | None = None,
        sleep: Sleep | None = None,
        clock: Clock | None = None,
        token_refresh: Callable[[], str | None] | None = None,
        listing_deadline: float | None = None,
    ) -> None:
        if token_kind not in ("personal", "job"):
            raise ValueError(f"token_kind must be 'personal' or 'job', not {token_kind!r}")
        splits = candidates(source)  # ValueError on a bad SOURCE
        parts = urlsplit(source.strip())
        self._display = parts._replace(query="", fragment="").geturl()
        # called on a 401: a rotated token (re-read from its file) is tried once
        self._token_refresh = token_refresh
        policy = retry or RetryPolicy()
        self._api = Api(
            splits[0],
            token or None,
            token_kind,
            timeout=timeout,
            policy=policy,
            transport=transport,
            sleep=sleep or trio.sleep,
            clock=clock or trio.current_time,
            refresh=self._refresh_token if token_refresh is not None else None,
            listing_deadline=(
                listing_deadline
                if listing_deadline is not None
                else max(LISTING_DEADLINE, policy.deadline)
            ),
        )
        self.stats: RegistryStats = self._api.stats
        self._project = Project(self._api, splits)
        self._listing = Listing(self._api)
        self._files = Files(self._api)
        self._transfer = Transfers(self._api)
        self._admin = Admin(self._api)

    def set_token(self, token: str | None) -> None:
        """Use a new token from now on (rotated CI/deploy tokens)."""
        self._api.token = token or None
        self._transfer.signed.clear()

    def _refresh_token(self) -> bool:
        """After a 401: re-read the token; True if it changed (the request is then repeated)."""
        assert self._token_refresh is not None
        new = self._token_refresh()
        if new and new != self._api.token:
            log.info("token refused (401); retrying with the re-read token")
            self.set_token(new)
            return True
        return False

    def __repr__(self) -> str:
        auth = f"{self._api.token_kind} token" if self._api.token else "anonymous"
        return f"GitLabRegistry({self._display!r}, {auth})"

    async def __aenter__(self) -> GitLabRegistry:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Release connections, including those of worker threads still blocked on them."""
        await self._api.aclose()

    # Every operation resolves the project first (once per session).

    async def project(self) -> t.ProjectInfo:
        """Resolve SOURCE to a project (trying each relative-root split) and check access."""
        return await self._project.get()

    async def list_models(self) -> list[t.Model]:
        """Every model with all its versions (MLflow search, else the packages API)."""
        await self.project()
        return await self._listing.list_models()

    async def get_model(self, name: str) -> t.Model:
        """One model by exact name, with all its versions; NotFound if absent."""
        await self.project()
        return await self._listing.get_model(name)

    async def list_candidates(self) -> list[t.Candidate]:
        """Candidates not promoted to a version: MLflow runs merged with candidate_N packages."""
        await self.project()
        return await self._listing.list_candidates()

    async def get_run(self, run_id: str) -> t.Run:
        """What the run logged (`runs/get`): params, metrics with their history, tags."""
        await self.project()
        return await self._listing.get_run(run_id)

    async def list_files(self, owner: t.FileOwner) -> list[t.RemoteFile]:
        """Files of a version or candidate, newest copy per path; [] if it has no package."""
        await self.project()
        return await self._files.list_files(owner)

    async def read_range(
        self, owner: t.FileOwner, file: t.RemoteFile, start: int, end: int, *, into: Into = None
    ) -> Buffer:
        """Bytes [start, end) of `file`; exactly end-start bytes or an error. With `into`
        (end-start bytes long) they land there and `into` is returned."""
        check_range(file, start, end, into)
        if start == end:
            return into if into is not None else b""
        if self._project.info is None:  # the lock is a trip through trio's scheduler per read
            await self.project()
        return await self._transfer.read_range(owner, file, start, end, into)

    async def authorize_upload(self, owner: t.FileOwner, path: str) -> None:
        """PUT …/files/<path>/authorize: 200 if an upload of `path` would be accepted."""
        await self.project()
        await self._transfer.authorize_upload(owner, path)

    async def upload(self, owner: t.FileOwner, path: str, source: Path, size: int) -> None:
        """Raw-body PUT of the file at `source`, streamed from disk; 201 or an error."""
        await self.project()
        await self._transfer.upload(owner, path, source, size)

    async def may_delete_files(self) -> bool:
        """Maintainer or above on the project (unknown counts as no)."""
        await self.project()
        return await self._project.may_delete_files()

    async def delete_file(self, file: t.RemoteFile) -> None:
        """DELETE one package file (Maintainer; 204)."""
        await self.project()
        await self._admin.delete_file(file)

    async def create_model(self, name: str) -> t.Model:
        """MLflow registered-models/create."""
        await self.project()
        return await self._admin.create_model(name)

    async def create_version(self, model: str, version: str) -> t.ModelVersion:
        """MLflow model-versions/create; the `gitlab.version` tag sets the semver."""
        await self.project()
        return await self._admin.create_version(model, version)

    async def delete_version(self, version: t.ModelVersion) -> None:
        """GraphQL mlModelVersionDelete: GitLab has no REST route for it."""
        await self.project()
        await self._admin.delete_version(version)

    async def delete_model(self, name: str) -> None:
        """MLflow registered-models/delete."""
        await self.project()
        await self._admin.delete_model(name)
