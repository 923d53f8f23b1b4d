"""In-memory Registry with the same semantics as GitLabRegistry, for kernel-free tests."""

from __future__ import annotations

import hashlib
import time

from mlregfs.errors import NotFound, RegistryUnavailable
from mlregfs.registry.base import RegistryStats
from mlregfs.registry.types import (
    Candidate,
    FileOwner,
    Model,
    ModelVersion,
    ProjectInfo,
    RemoteFile,
)


class InMemoryRegistry:
    """Models, versions, candidates and file bytes in dicts; `down=True` simulates an outage."""

    def __init__(self) -> None:
        self.stats = RegistryStats()
        self.down = False
        self._models: dict[str, Model] = {}
        self._candidates: dict[int, Candidate] = {}
        self._files: dict[tuple[str, ...], dict[str, tuple[RemoteFile, bytes]]] = {}
        self._next_id = 1000
        self.corrupt: set[str] = set()  # paths whose served bytes differ from their sha256

    def _id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _check(self, kind: str) -> None:
        self.stats.count(kind)
        if self.down:
            raise RegistryUnavailable("connection refused (simulated)")

    # -- seeding ------------------------------------------------------------------------
    def add_version(self, model: str, version: str) -> ModelVersion:
        m = self._models.get(model) or Model(model, self._id(), time.time())
        v = ModelVersion(model, version, self._id(), time.time(), self._id())
        self._models[model] = Model(m.name, m.id, m.created_at, (*m.versions, v))
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
        self._files[key][path] = (f, data)
        return f

    @staticmethod
    def _key(owner: FileOwner) -> tuple[str, ...]:
        if isinstance(owner, Candidate):
            return ("c", str(owner.iid))
        return ("v", owner.model, owner.version)

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

    async def read_range(self, owner: FileOwner, file: RemoteFile, start: int, end: int) -> bytes:
        self._check("read_range")
        entry = self._files.get(self._key(owner), {}).get(file.path)
        if entry is None:
            raise NotFound(f"file {file.path!r} not found")
        data = entry[1]
        if file.path in self.corrupt:
            data = bytes(b ^ 0xFF for b in data)
        self.stats.bytes_downloaded += end - start
        return data[start:end]

    async def aclose(self) -> None:
        return None
