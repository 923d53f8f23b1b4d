"""CatalogRegistry: a Registry decorator that remembers every listing on disk.

When the registry cannot be reached (connection errors, timeouts, 5xx), listings are answered
from the last one seen, also by a new mount after a reboot: an inference host can start and
serve the versions it has cached while GitLab is down, and an outage never looks like a
deletion. Answers that the registry did give (404, 401, ...) are never masked.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import trio

from mlregfs.buffers import Buffer
from mlregfs.errors import RegistryUnavailable, ServerError
from mlregfs.registry.base import Registry, RegistryStats
from mlregfs.registry.types import (
    Candidate,
    FileOwner,
    Model,
    ModelVersion,
    ProjectInfo,
    RemoteFile,
)

log = logging.getLogger("mlregfs.catalog")
_OUTAGE = (RegistryUnavailable, ServerError)


def _owner_key(owner: FileOwner) -> str:
    if isinstance(owner, Candidate):
        return f"c/{owner.iid}"
    return f"v/{owner.model}/{owner.version}"


def _model(d: dict[str, Any]) -> Model:
    versions = tuple(ModelVersion(**v) for v in d.pop("versions", []))
    return Model(**d, versions=versions)


def _file(d: dict[str, Any]) -> RemoteFile:
    d["older_ids"] = tuple(d.get("older_ids", ()))
    return RemoteFile(**d)


class CatalogRegistry:
    """Wraps a Registry; persists project, models, candidates and file lists to `path`."""

    def __init__(self, inner: Registry, path: Path) -> None:
        self.inner = inner
        self.stats: RegistryStats = inner.stats  # the same counters object
        self.path = Path(path)
        self._lock = threading.Lock()
        self._data: dict[str, Any] = {}
        try:
            self._data = json.loads(self.path.read_text())
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable catalog %s: %s", self.path, e)
        self._data.setdefault("files", {})
        self.offline_answers = 0

    @property
    def saved_at(self) -> float | None:
        value = self._data.get("saved_at")
        return float(value) if value is not None else None

    async def _save(self) -> None:
        def write() -> None:
            with self._lock:
                self._data["saved_at"] = time.time()
                text = json.dumps(self._data)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(text)
            os.replace(tmp, self.path)

        try:
            await trio.to_thread.run_sync(write)
        except OSError as e:  # a full disk must not break listings
            log.warning("cannot save the catalog %s: %s", self.path, e)

    def _fallback(self, what: str, error: Exception) -> None:
        self.offline_answers += 1
        age = time.time() - (self.saved_at or time.time())
        log.warning(
            "registry unavailable (%s): answering %s from the catalog (%.0fs old)", error, what, age
        )

    # -- listings -----------------------------------------------------------------------
    async def project(self) -> ProjectInfo:
        try:
            p = await self.inner.project()
        except _OUTAGE as e:
            if "project" not in self._data:
                raise
            self._fallback("the project", e)
            return ProjectInfo(**self._data["project"])
        self._data["project"] = asdict(p)
        return p

    async def list_models(self) -> list[Model]:
        try:
            models = await self.inner.list_models()
        except _OUTAGE as e:
            if "models" not in self._data:
                raise
            self._fallback("the model list", e)
            return [_model(dict(m)) for m in self._data["models"]]
        self._data["models"] = [asdict(m) for m in models]
        await self._save()
        return models

    async def get_model(self, name: str) -> Model:
        try:
            return await self.inner.get_model(name)
        except _OUTAGE as e:
            for m in self._data.get("models", []):
                if m["name"] == name:
                    self._fallback(f"model {name!r}", e)
                    return _model(dict(m))
            raise

    async def list_candidates(self) -> list[Candidate]:
        try:
            cands = await self.inner.list_candidates()
        except _OUTAGE as e:
            if "candidates" not in self._data:
                raise
            self._fallback("the candidate list", e)
            return [Candidate(**c) for c in self._data["candidates"]]
        self._data["candidates"] = [asdict(c) for c in cands]
        await self._save()
        return cands

    async def list_files(self, owner: FileOwner) -> list[RemoteFile]:
        key = _owner_key(owner)
        try:
            files = await self.inner.list_files(owner)
        except _OUTAGE as e:
            if key not in self._data["files"]:
                raise
            self._fallback(f"the files of {key}", e)
            return [_file(dict(f)) for f in self._data["files"][key]]
        self._data["files"][key] = [asdict(f) for f in files]
        await self._save()
        return files

    # -- pass-through -------------------------------------------------------------------
    async def read_range(self, owner: FileOwner, file: RemoteFile, start: int, end: int) -> Buffer:
        return await self.inner.read_range(owner, file, start, end)

    async def authorize_upload(self, owner: FileOwner, path: str) -> None:
        await self.inner.authorize_upload(owner, path)

    async def upload(self, owner: FileOwner, path: str, source: Path, size: int) -> None:
        await self.inner.upload(owner, path, source, size)

    async def delete_file(self, file: RemoteFile) -> None:
        await self.inner.delete_file(file)

    async def create_model(self, name: str) -> Model:
        return await self.inner.create_model(name)

    async def create_version(self, model: str, version: str) -> ModelVersion:
        return await self.inner.create_version(model, version)

    async def delete_version(self, version: ModelVersion) -> None:
        await self.inner.delete_version(version)

    async def delete_model(self, name: str) -> None:
        await self.inner.delete_model(name)

    async def aclose(self) -> None:
        await self.inner.aclose()
