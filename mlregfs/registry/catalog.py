"""CatalogRegistry: a Registry decorator that remembers every listing on disk.

When the registry cannot be reached (connection errors, timeouts, 5xx), listings are answered
from the last one seen, also by a new mount after a reboot: an inference host can start and
serve the versions it has cached while GitLab is down, and an outage never looks like a
deletion. Answers that the registry did give (404, 401, ...) are never masked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import trio

from mlregfs.buffers import Buffer
from mlregfs.errors import RegistryUnavailable, ServerError
from mlregfs.localstate import FILE_MODE, private_dir, set_aside, tighten, write_private
from mlregfs.registry import validate
from mlregfs.registry.base import Into, Registry, RegistryStats
from mlregfs.registry.outage import Outage
from mlregfs.registry.types import (
    Candidate,
    FileOwner,
    Model,
    ModelVersion,
    ProjectInfo,
    RemoteFile,
    Run,
    owner_key,
)

log = logging.getLogger("mlregfs.catalog")
_OUTAGE = (RegistryUnavailable, ServerError)
RUNS_KEPT = 1024  # runs remembered for outages
T = TypeVar("T")


def _owner_key(owner: FileOwner) -> str:
    return "/".join(owner_key(owner))  # "v/<model>/<version>" or "c/<iid>"


def _model(d: dict[str, Any]) -> Model:
    versions = tuple(ModelVersion(**v) for v in d.pop("versions", []))
    return Model(**d, versions=versions)


def _file(d: dict[str, Any]) -> RemoteFile:
    d["older_ids"] = tuple(d.get("older_ids", ()))
    return RemoteFile(**d)


# -- shape of the catalog file: each entry is checked field by field when it is loaded ------
Check = Callable[[Any], bool]


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _str(v: Any) -> bool:
    return isinstance(v, str) and bool(v) and "\0" not in v


def _opt(check: Check) -> Check:
    return lambda v: v is None or check(v)


# the catalog holds what the registry said, so it is held to the same rules when read back
_valid = validate.check


_sha256 = _valid(validate.sha256)
_rel_path = _valid(validate.rel_path)


def _ids(v: Any) -> bool:
    return isinstance(v, list) and all(_int(i) for i in v)


_PROJECT = {"id": _opt(_int), "path": _str, "visibility": _str}
_VERSION = {
    "model": _valid(validate.model_name),
    "version": _valid(validate.semver),
    "id": _opt(_int),
    "created_at": _num,
    "package_id": _opt(_int),
    "description": _opt(_valid(validate.text)),
    "run_id": _opt(_valid(validate.run_id)),
}
_MODEL = {
    "name": _valid(validate.model_name),
    "id": _opt(_int),
    "created_at": _num,
    "description": _opt(_valid(validate.text)),
}
_CANDIDATE = {
    "iid": _int,
    "created_at": _num,
    "eid": _opt(_valid(validate.run_id)),
    "name": _opt(_str),
    "package_id": _opt(_int),
}
_FILE = {
    "path": _rel_path,
    "size": _valid(validate.size),
    "sha256": _sha256,  # null allowed: the registry may know no checksum
    "created_at": _num,
    "file_id": _int,
    "package_id": _int,
    "older_ids": _opt(_ids),
}


def _entry(d: Any, spec: dict[str, Check]) -> dict[str, Any] | None:
    """The fields of `spec` from `d` if every one passes its check (missing = None), else None."""
    if not isinstance(d, dict):
        return None
    out = {k: d.get(k) for k in spec}
    if not all(check(out[k]) for k, check in spec.items()):
        return None
    return {k: v for k, v in out.items() if v is not None or k != "older_ids"}


def _entries(items: Any, spec: dict[str, Check], dropped: list[str], what: str) -> list[Any]:
    if not isinstance(items, list):
        dropped.append(what)
        return []
    out = []
    for item in items:
        e = _entry(item, spec)
        if e is None:
            dropped.append(f"{what} entry")
        else:
            out.append(e)
    return out


def _validated(raw: Any) -> tuple[dict[str, Any], list[str]]:
    """The well-formed part of a loaded catalog, and what was dropped from it."""
    dropped: list[str] = []
    if not isinstance(raw, dict):
        return {"files": {}}, [f"not an object but {type(raw).__name__}"]
    data: dict[str, Any] = {"files": {}}
    if "project" in raw:
        project = _entry(raw["project"], _PROJECT)
        if project is None:
            dropped.append("project")
        else:
            data["project"] = project
    if "models" in raw:
        models = []
        for m in _entries(raw["models"], {**_MODEL, "versions": lambda v: True}, dropped, "models"):
            m["versions"] = _entries(m.get("versions") or [], _VERSION, dropped, "versions")
            models.append(m)
        data["models"] = models
    if "candidates" in raw:
        data["candidates"] = _entries(raw["candidates"], _CANDIDATE, dropped, "candidates")
    files = raw.get("files", {})
    if not isinstance(files, dict):
        dropped.append("files")
        files = {}
    for key, items in files.items():
        if not isinstance(items, list):
            dropped.append(f"files of {key}")
            continue
        data["files"][key] = _entries(items, _FILE, dropped, f"files of {key}")
    if "saved_at" in raw:
        if _num(raw["saved_at"]):
            data["saved_at"] = raw["saved_at"]
        else:
            dropped.append("saved_at")
    return data, dropped


def load_catalog(path: Path) -> dict[str, Any]:
    """The catalog at `path`, checked field by field.

    Malformed entries are dropped; if anything was dropped or the file is unreadable, the
    original is set aside (`<name>.damaged-<time>`, logged) and the valid part written back,
    so the next start neither loses it nor meets the damage again."""
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {"files": {}}
    except (OSError, ValueError) as e:  # garbage, a directory, unreadable
        set_aside(path, f"unreadable: {e}")
        return {"files": {}}
    data, dropped = _validated(raw)
    if dropped:
        shown = ", ".join(sorted(set(dropped))[:5])
        set_aside(path, f"dropped {len(dropped)} malformed part(s): {shown}")
        try:
            write_private(path, json.dumps(data))
        except OSError as e:
            log.warning("cannot rewrite the catalog %s: %s", path, e)
    return data


_PARTS = ("project", "models", "candidates")


def _write_part(path: Path, body: dict[str, Any]) -> None:
    """Replace `path` with `body` (atomically, 0600) unless it holds exactly that already;
    then only its mtime moves (when the registry last confirmed it)."""
    text = json.dumps(body, sort_keys=True).encode()
    try:
        if path.read_bytes() == text:
            os.utime(path)
            return
    except FileNotFoundError:
        pass
    except IsADirectoryError:  # os.replace cannot replace a directory
        set_aside(path, "a directory where a catalog file belongs")
    except OSError:
        pass  # unreadable: replaced below
    private_dir(path.parent, repair=True)
    write_private(path, text)


class CatalogRegistry:
    """Wraps a Registry; persists project, models, candidates and each owner's file list.

    `root` is a directory of small parts, each written atomically and only when it changed:
    `project.json`, `models.json`, `candidates.json` and `files/<digest>.json` per version or
    candidate. A cold `ls -lR` of 1,500 versions writes 1,500 small files once, instead of
    rewriting one growing file 1,500 times. A part's mtime is when the registry last said it.
    """

    def __init__(self, inner: Registry, root: Path, outage: Outage | None = None) -> None:
        self.inner = inner
        self.stats: RegistryStats = inner.stats  # the same counters object
        self.root = Path(root)
        self._data: dict[str, Any] = {"files": {}}
        try:
            private_dir(self.root.parent, repair=True)
            private_dir(self.root, repair=True)
            private_dir(self.root / "files", repair=True)
        except OSError as e:  # listings still work, only the outage fallback is lost
            log.warning("cannot create the catalog directory %s: %s", self.root, e)
        legacy = self.root.with_name(self.root.name + ".json")  # one file, before parts
        if legacy.exists():
            self._data = load_catalog(legacy)
            self._migrate(legacy)
        for part in _PARTS:
            path = self._part(part)
            if path.exists():
                loaded = load_catalog(path)
                if part in loaded:
                    self._data[part] = loaded[part]
                tighten(path, FILE_MODE)
        self.offline_answers = 0
        self.outage = outage or Outage()
        self._runs: dict[str, Run] = {}  # the last answer of each run (outages)

    def _part(self, part: str) -> Path:
        return self.root / f"{part}.json"

    def _files_part(self, key: str) -> Path:
        digest = hashlib.sha256(key.encode()).hexdigest()[:32]
        return self.root / "files" / f"{digest}.json"

    def _migrate(self, legacy: Path) -> None:
        """Split a catalog written by an older version into parts (offline start survives the
        upgrade), then remove it."""
        try:
            for part in _PARTS:
                if part in self._data:
                    _write_part(self._part(part), {part: self._data[part]})
            for key, files in self._data["files"].items():
                _write_part(self._files_part(key), {"files": {key: files}})
            legacy.unlink()
        except OSError as e:
            log.warning("cannot move the catalog %s into parts: %s", legacy, e)

    def saved_at(self, part: str = "models", key: str | None = None) -> float | None:
        """When the registry last gave this part (its mtime), or None."""
        path = self._files_part(key) if key is not None else self._part(part)
        try:
            return os.stat(path).st_mtime
        except OSError:
            return None

    async def _save(self, part: str, value: Any, key: str | None = None) -> None:
        """Write one part if its content changed; else only mark it as confirmed now."""
        path = self._files_part(key) if key is not None else self._part(part)
        body = {"files": {key: value}} if key is not None else {part: value}

        try:
            await trio.to_thread.run_sync(_write_part, path, body)
        except OSError as e:  # a full disk must not break listings
            log.warning("cannot save the catalog part %s: %s", path, e)

    def _fallback(self, what: str, error: Exception, saved_at: float | None) -> None:
        self.offline_answers += 1
        age = time.time() - (saved_at or time.time())
        log.warning(
            "registry unavailable (%s): answering %s from the catalog (%.0fs old)", error, what, age
        )

    # -- listings -----------------------------------------------------------------------
    async def _listing(
        self,
        what: str,
        fetch: Callable[[], Awaitable[T]],
        known: Callable[[], Awaitable[T | None]],
        saved_at: Callable[[], float | None],
    ) -> tuple[T, bool]:
        """`(fetch(), True)`, or on an outage (and at once while one is known: `Outage`)
        `(known(), False)`: what the catalog knows (None: nothing, the error propagates).
        Other errors propagate."""
        if self.outage.down():
            value = await known()
            if value is not None:
                self.offline_answers += 1
                return value, False
        try:
            fresh = await fetch()
        except _OUTAGE as e:
            self.outage.failed()
            value = await known()
            if value is None:
                raise
            self._fallback(what, e, saved_at())
            return value, False
        self.outage.answered()
        return fresh, True

    def _known(self, part: str, build: Callable[[Any], T]) -> Callable[[], Awaitable[T | None]]:
        async def known() -> T | None:
            return build(self._data[part]) if part in self._data else None

        return known

    async def project(self) -> ProjectInfo:
        p, fresh = await self._listing(
            "the project",
            self.inner.project,
            self._known("project", lambda d: ProjectInfo(**d)),
            lambda: self.saved_at("project"),
        )
        if fresh:
            self._data["project"] = asdict(p)
            await self._save("project", self._data["project"])
        return p

    async def list_models(self) -> list[Model]:
        models, fresh = await self._listing(
            "the model list",
            self.inner.list_models,
            self._known("models", lambda ms: [_model(dict(m)) for m in ms]),
            lambda: self.saved_at("models"),
        )
        if fresh:
            self._data["models"] = [asdict(m) for m in models]
            await self._save("models", self._data["models"])
        return models

    async def get_model(self, name: str) -> Model:
        async def known() -> Model | None:
            for m in self._data.get("models", []):
                if m["name"] == name:
                    return _model(dict(m))
            return None

        async def fetch() -> Model:
            return await self.inner.get_model(name)

        model, _ = await self._listing(
            f"model {name!r}", fetch, known, lambda: self.saved_at("models")
        )
        return model

    async def list_candidates(self) -> list[Candidate]:
        cands, fresh = await self._listing(
            "the candidate list",
            self.inner.list_candidates,
            self._known("candidates", lambda cs: [Candidate(**c) for c in cs]),
            lambda: self.saved_at("candidates"),
        )
        if fresh:
            self._data["candidates"] = [asdict(c) for c in cands]
            await self._save("candidates", self._data["candidates"])
        return cands

    async def list_files(self, owner: FileOwner) -> list[RemoteFile]:
        key = _owner_key(owner)

        async def known() -> list[RemoteFile] | None:
            rows = self._data["files"].get(key)
            if rows is None:  # read from disk on demand: a mount lists few of them
                part = await trio.to_thread.run_sync(load_catalog, self._files_part(key))
                rows = part["files"].get(key)
            return None if rows is None else [_file(dict(f)) for f in rows]

        async def fetch() -> list[RemoteFile]:
            return await self.inner.list_files(owner)

        files, fresh = await self._listing(
            f"the files of {key}", fetch, known, lambda: self.saved_at(key=key)
        )
        if fresh:
            await self._save("files", [asdict(f) for f in files], key=key)
        return files

    # -- pass-through -------------------------------------------------------------------
    async def get_run(self, run_id: str) -> Run:
        # kept in memory only: metadata shown on request, never needed to serve bytes offline
        async def fetch() -> Run:
            return await self.inner.get_run(run_id)

        async def known() -> Run | None:
            return self._runs.get(run_id)

        run, _ = await self._listing(f"run {run_id}", fetch, known, lambda: None)
        self._runs[run_id] = run
        if len(self._runs) > RUNS_KEPT:
            del self._runs[next(iter(self._runs))]
        return run

    async def read_range(
        self, owner: FileOwner, file: RemoteFile, start: int, end: int, *, into: Into = None
    ) -> Buffer:
        return await self.inner.read_range(owner, file, start, end, into=into)

    async def authorize_upload(self, owner: FileOwner, path: str) -> None:
        await self.inner.authorize_upload(owner, path)

    async def upload(self, owner: FileOwner, path: str, source: Path, size: int) -> None:
        await self.inner.upload(owner, path, source, size)

    async def delete_file(self, file: RemoteFile) -> None:
        await self.inner.delete_file(file)

    async def may_delete_files(self) -> bool:
        return await self.inner.may_delete_files()

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
