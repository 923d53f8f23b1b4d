"""The files of a version or candidate: its package is found (by a targeted query, or in an
index of all packages when lookups come in a sweep), then its package_files are listed; a
hidden package is listed through mlflow-artifacts instead (§5). File names are decoded and
checked here (§2, §8.3)."""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from mlregfs.errors import NotFound
from mlregfs.registry import validate
from mlregfs.registry.gitlab.api import Api
from mlregfs.registry.gitlab.decode import dicts, drop, owner_key, owner_label, timestamp
from mlregfs.registry.gitlab.listing import CANDIDATE_VERSION
from mlregfs.registry.gitlab.pages import all_packages, offset_pages
from mlregfs.registry.types import (
    Candidate,
    FileOwner,
    ModelVersion,
    RemoteFile,
    owner_route_id,
)

log = logging.getLogger(__name__)

# package lookups: this many within SWEEP_WINDOW seconds list all packages at once, and that
# index answers for INDEX_TTL seconds
SWEEP_LOOKUPS, SWEEP_WINDOW, INDEX_TTL = 3, 10.0, 30.0


@dataclass(frozen=True)
class _Package:
    id: int
    hidden: bool
    created_at: float
    indexed: bool = False  # from the all-packages index, which may be up to INDEX_TTL old


class Files:
    """list_files over one Api, with the package ids and the package index it learns."""

    def __init__(self, api: Api) -> None:
        self._api = api
        self._package_ids: dict[tuple[str, str], int] = {}  # owner key -> package id
        # all ml_model packages by owner key, fetched when lookups come in a sweep
        self._index: dict[tuple[str, str], _Package] = {}
        self._index_at = float("-inf")
        # clock times of recent package lookups, oldest first (a sweep makes thousands)
        self._lookups: deque[float] = deque()

    async def list_files(self, owner: FileOwner) -> list[RemoteFile]:
        """Files of a version or candidate, newest copy per path; [] if it has no package."""
        key = owner_key(owner)
        known = owner.package_id if owner.package_id is not None else self._package_ids.get(key)
        if known is not None:
            rows = await self._package_files(known)
            if rows is not None:
                self._package_ids[key] = known
                return _files_from_rows(rows, known)
            self._package_ids.pop(key, None)  # deleted, or hidden since: look it up again
        pkg = await self._find_package(owner)
        if pkg is None:
            return []
        if not pkg.hidden:
            rows = await self._package_files(pkg.id)
            if rows is None and pkg.indexed:  # deleted or hidden since the index was made
                self._index_at = float("-inf")
                pkg = await self._query_package(owner)
                if pkg is None:
                    return []
                rows = None if pkg.hidden else await self._package_files(pkg.id)
            if rows is not None:
                self._package_ids[key] = pkg.id
                return _files_from_rows(rows, pkg.id)
        # A hidden package is invisible to /package_files (§5) but its files still download.
        return await self._artifact_files(owner, pkg)

    async def _find_package(self, owner: FileOwner) -> _Package | None:
        indexed = await self._indexed_package(owner)
        if indexed is not None:
            return indexed
        return await self._query_package(owner)

    async def _indexed_package(self, owner: FileOwner) -> _Package | None:
        """The package from one listing of all ml_model packages, when a sweep (`ls -lR`,
        `find`, `warm`) looks many up: one request per 100 packages instead of one per
        version. A single lookup keeps its targeted query; the index is trusted for
        INDEX_TTL, and a name it lacks is still asked for (new since, or hidden)."""
        now = self._api.clock()
        while self._lookups and now - self._lookups[0] >= SWEEP_WINDOW:
            self._lookups.popleft()
        self._lookups.append(now)
        if now - self._index_at >= INDEX_TTL:
            if len(self._lookups) < SWEEP_LOOKUPS:
                return None
            rows = await all_packages(self._api, "list_files")
            index: dict[tuple[str, str], _Package] = {}
            for r in sorted(rows, key=lambda r: int(r["id"])):  # the newest package wins
                version = str(r.get("version", ""))
                m = CANDIDATE_VERSION.match(version)
                key = ("candidate", m.group(1)) if m else (str(r["name"]), version)
                index[key] = _Package(
                    int(r["id"]), False, timestamp(r.get("created_at")), indexed=True
                )
            self._index, self._index_at = index, self._api.clock()
        return self._index.get(owner_key(owner))

    async def _query_package(self, owner: FileOwner) -> _Package | None:
        if isinstance(owner, Candidate):
            name: str | None = None
            version = f"candidate_{owner.iid}"
            params = {"package_version": version}
        else:
            name, version = owner.model, owner.version
            params = {"package_name": name, "package_version": version}
        for status in (None, "hidden"):  # hidden packages are left out unless asked for (§5)
            query = dict(params, status=status) if status else params
            rows = await all_packages(self._api, "list_files", query)
            hits = [
                r
                for r in rows
                if r.get("version") == version and (name is None or r.get("name") == name)
            ]
            if hits:
                best = max(hits, key=lambda r: int(r["id"]))
                return _Package(
                    id=int(best["id"]),
                    hidden=status == "hidden",
                    created_at=timestamp(best.get("created_at")),
                )
        return None

    async def _package_files(self, package_id: int) -> list[dict[str, Any]] | None:
        """All package_files rows of a package, or None when GitLab says 404."""
        url = self._api.project_url(f"packages/{package_id}/package_files")
        try:
            return await offset_pages(
                self._api, "list_files", url, {"order_by": "id", "sort": "asc"}
            )
        except NotFound:
            return None

    async def _artifact_files(self, owner: FileOwner, pkg: _Package) -> list[RemoteFile]:
        """List a hidden package through mlflow-artifacts: names and sizes only."""
        if (isinstance(owner, ModelVersion) and owner.id is None) or self._api.mlflow[
            "models"
        ] is False:
            log.warning(
                "files of %s are in a hidden package and cannot be listed without MLflow "
                "access (personal token) and the model-version id",
                owner_label(owner),
            )
            return []
        reply = await self._api.json(
            "list_files",
            "GET",
            self._api.project_url("ml/mlflow/api/2.0/mlflow-artifacts/artifacts"),
            route="mlflow",
            params={"path": owner_route_id(owner)},
            passthrough=frozenset({404}),
        )
        if reply.status == 404:
            return []
        data = reply.data
        by_path: dict[str, RemoteFile] = {}
        for row in dicts(data.get("files") if isinstance(data, dict) else None, "files"):
            if row.get("is_dir"):
                continue
            path = decode_file_name(str(row.get("path", "")))
            if path is None:
                continue
            try:
                size = validate.size(row.get("file_size"))
            except validate.Invalid as exc:
                drop(f"file {validate.shown(path)}", exc)
                continue
            # No file ids here; 0 marks "unknown", reads go through the ml_models route by
            # name, which serves the newest copy, like the last row we keep.
            by_path[path] = RemoteFile(
                path=path,
                size=size,
                sha256=None,
                created_at=pkg.created_at,
                file_id=0,
                package_id=pkg.id,
            )
        return [by_path[p] for p in sorted(by_path)]


def decode_file_name(stored: str) -> str | None:
    """Stored (percent-encoded) file_name -> relative path, or None if unsafe (§2, §8.3).

    Every decoded segment must be a usable name: not empty, `.` or `..`, no control
    character, at most 255 bytes. An unusable one is logged (escaped) and left out.
    """
    try:
        path = unquote(stored, errors="strict")  # `+` stays `+`: GitLab encodes it as %2B
        return validate.rel_path(path, "file name")
    except UnicodeDecodeError:
        drop("file", validate.Invalid(f"file name {validate.shown(stored)} is not UTF-8"))
    except validate.Invalid as exc:
        drop("file", exc)
    return None


def _files_from_rows(rows: list[dict[str, Any]], package_id: int) -> list[RemoteFile]:
    """Group package_files rows by decoded path; the highest id is what GitLab serves (§8.2)."""
    by_path: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        name = row.get("file_name")
        if not isinstance(name, str) or isinstance(row.get("id"), str):
            drop("file", validate.Invalid(f"package file row {validate.shown(row)}"))
            continue
        try:
            validate.ident(row.get("id"), "package file id")
        except validate.Invalid as exc:
            drop("file", exc)
            continue
        path = decode_file_name(name)
        if path is not None:
            by_path.setdefault(path, []).append(row)
    files = []
    for path in sorted(by_path):
        copies = sorted(by_path[path], key=lambda r: int(r["id"]))
        newest = copies[-1]
        # The newest copy is what GitLab serves: if it is unusable the name is dropped, never
        # replaced by an older copy's metadata.
        try:
            pkg = newest.get("package_id")
            files.append(
                RemoteFile(
                    path=path,
                    size=validate.size(newest.get("size")),
                    sha256=validate.sha256(newest.get("file_sha256")),
                    created_at=timestamp(newest.get("created_at")),
                    file_id=int(newest["id"]),
                    package_id=package_id if pkg is None else validate.ident(pkg, "package id"),
                    older_ids=tuple(int(r["id"]) for r in copies[:-1]),
                )
            )
        except validate.Invalid as exc:
            drop(f"file {validate.shown(path)}", exc)
    return files
