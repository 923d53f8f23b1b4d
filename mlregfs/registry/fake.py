"""In-memory Registry with the same semantics as GitLabRegistry, for kernel-free tests."""

from __future__ import annotations

import hashlib
import time
from dataclasses import replace
from pathlib import Path

import semver

from mlregfs.buffers import Buffer
from mlregfs.errors import BadRequest, Conflict, Forbidden, NotFound, RegistryUnavailable
from mlregfs.names import FILE_NAME_RE, MODEL_NAME_RE
from mlregfs.registry.base import Into, RegistryStats, check_range
from mlregfs.registry.types import (
    Candidate,
    FileOwner,
    Model,
    ModelVersion,
    OwnerKey,
    ProjectInfo,
    RemoteFile,
    Run,
    owner_key,
)


class InMemoryRegistry:
    """Models, versions, candidates and file bytes in dicts; `down=True` simulates an outage."""

    def __init__(self) -> None:
        self.stats = RegistryStats()
        self.down = False
        self._models: dict[str, Model] = {}
        self._candidates: dict[int, Candidate] = {}
        self._files: dict[tuple[str, ...], dict[str, tuple[RemoteFile, bytes]]] = {}
        # the older copies of a name, by file id: GitLab serves the newest of those left when
        # the newest copy is deleted
        self._older: dict[int, tuple[RemoteFile, bytes]] = {}
        self.runs: dict[str, Run] = {}  # run id -> what `get_run` answers
        self._next_id = 1000
        self.corrupt: set[str] = set()  # paths whose served bytes differ from their sha256
        self.fail_next: dict[str, Exception] = {}
        self.role = 40  # access level of our token: 30 developer uploads, 40 maintainer deletes

    def _id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _check(self, kind: str) -> None:
        self.stats.count(kind)
        failure = self.fail_next.pop(kind, None)  # one scripted failure of this kind
        if failure is not None:
            raise failure
        if self.down:
            raise RegistryUnavailable("connection refused (simulated)")

    # -- seeding ------------------------------------------------------------------------
    def add_version(
        self, model: str, version: str, *, description: str | None = None, run_id: str | None = None
    ) -> ModelVersion:
        m = self._models.get(model) or Model(model, self._id(), time.time())
        v = ModelVersion(model, version, self._id(), time.time(), self._id(), description, run_id)
        self._models[model] = replace(m, versions=(*m.versions, v))
        return v

    def add_candidate(self, iid: int) -> Candidate:
        c = Candidate(iid, time.time(), package_id=self._id())
        self._candidates[iid] = c
        return c

    def add_file(self, owner: FileOwner, path: str, data: bytes) -> RemoteFile:
        key = self._key(owner)
        pkg = owner.package_id or 0
        old = self._files.setdefault(key, {}).get(path)
        f = RemoteFile(
            path,
            len(data),
            hashlib.sha256(data).hexdigest(),
            time.time(),
            self._id(),
            pkg,
            older_ids=(*old[0].older_ids, old[0].file_id) if old else (),
        )
        if old:
            self._older[old[0].file_id] = old
        self._files[key][path] = (f, data)
        return f

    @staticmethod
    def _key(owner: FileOwner) -> OwnerKey:
        return owner_key(owner)

    # -- Registry protocol --------------------------------------------------------------
    async def project(self) -> ProjectInfo:
        self._check("project")
        return ProjectInfo(1, "test/project", "private")

    async def list_models(self) -> list[Model]:
        self._check("list_models")
        return list(self._models.values())

    async def get_model(self, name: str) -> Model:
        self._check("get_model")
        if name not in self._models:
            raise NotFound(f"model {name!r} not found")
        return self._models[name]

    async def list_candidates(self) -> list[Candidate]:
        self._check("list_candidates")
        return list(self._candidates.values())

    async def list_files(self, owner: FileOwner) -> list[RemoteFile]:
        self._check("list_files")
        return [f for f, _ in self._files.get(self._key(owner), {}).values()]

    async def get_run(self, run_id: str) -> Run:
        self._check("get_run")
        run = self.runs.get(run_id)
        if run is None:
            raise NotFound("RESOURCE_DOES_NOT_EXIST")
        return run

    async def read_range(
        self, owner: FileOwner, file: RemoteFile, start: int, end: int, *, into: Into = None
    ) -> Buffer:
        self._check("read_range")
        check_range(file, start, end, into)
        entry = self._files.get(self._key(owner), {}).get(file.path)
        if entry is None:
            raise NotFound(f"file {file.path!r} not found")
        data = entry[1]
        if file.path in self.corrupt:
            data = bytes(b ^ 0xFF for b in data)
        self.stats.bytes_downloaded += end - start
        if into is not None:
            into[:] = data[start:end]
            return into
        return data[start:end]

    # -- writes -------------------------------------------------------------------------
    def _owner_exists(self, owner: FileOwner) -> None:
        if isinstance(owner, Candidate):
            if owner.iid not in self._candidates:
                raise NotFound("404 Not Found")
            return
        m = self._models.get(owner.model)
        if m is None or owner.version not in [v.version for v in m.versions]:
            raise NotFound("404 Not Found")

    async def authorize_upload(self, owner: FileOwner, path: str) -> None:
        # GitLab's /authorize checks the project and the role only: a missing owner is
        # refused by the upload itself
        self._check("authorize")
        if self.role < 30:
            raise Forbidden("403 Forbidden")

    async def upload(self, owner: FileOwner, path: str, source: Path, size: int) -> None:
        self._check("upload")
        if self.role < 30:
            raise Forbidden("403 Forbidden")
        self._owner_exists(owner)
        if not FILE_NAME_RE.match(path.rpartition("/")[2]):  # the last segment only (§8.4)
            raise BadRequest("file_name is invalid")
        data = source.read_bytes()  # noqa: ASYNC240 - test double, small files
        if len(data) != size:
            raise BadRequest("size mismatch")
        self.add_file(owner, path, data)

    async def delete_file(self, file: RemoteFile) -> None:
        self._check("delete_file")
        if self.role < 40:
            raise Forbidden("403 Forbidden")
        for files in self._files.values():
            for p, (f, data) in list(files.items()):
                if f.file_id == file.file_id:
                    if f.older_ids:  # the next older copy is served again
                        prev, prev_data = self._older.pop(f.older_ids[-1])
                        files[p] = (replace(prev, older_ids=f.older_ids[:-1]), prev_data)
                    else:
                        del files[p]
                elif file.file_id in f.older_ids:
                    older = tuple(i for i in f.older_ids if i != file.file_id)
                    files[p] = (replace(f, older_ids=older), data)
                    self._older.pop(file.file_id, None)

    async def may_delete_files(self) -> bool:
        return self.role >= 40

    async def create_model(self, name: str) -> Model:
        self._check("create_model")
        if len(name) > 255 or not MODEL_NAME_RE.match(name):
            raise BadRequest("name is invalid")
        if name in self._models:
            raise Conflict("RESOURCE_ALREADY_EXISTS")
        m = self._models[name] = Model(name, self._id(), time.time())
        return m

    async def create_version(self, model: str, version: str) -> ModelVersion:
        self._check("create_version")
        if model not in self._models:
            raise NotFound("RESOURCE_DOES_NOT_EXIST")
        try:
            semver.Version.parse(version)
        except ValueError:
            raise BadRequest("Version must be semantic version") from None
        if any(v.version == version for v in self._models[model].versions):
            raise BadRequest("Version has already been taken")
        return self.add_version(model, version)

    async def delete_version(self, version: ModelVersion) -> None:
        self._check("delete_version")
        m = self._models.get(version.model)
        if m is None or all(v.version != version.version for v in m.versions):
            raise NotFound("404 Model version not found")
        vs = tuple(v for v in m.versions if v.version != version.version)
        self._models[version.model] = replace(m, versions=vs)
        self._files.pop(("v", version.model, version.version), None)

    async def delete_model(self, name: str) -> None:
        self._check("delete_model")
        if self._models.pop(name, None) is None:
            raise NotFound("RESOURCE_DOES_NOT_EXIST")

    async def aclose(self) -> None:
        return None
