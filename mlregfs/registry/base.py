"""The narrow interface the filesystem core programs against."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from mlregfs.buffers import Buffer
from mlregfs.registry import types as t

Into = memoryview | None  # a caller's buffer of end-start bytes for `read_range` to fill


def check_range(file: t.RemoteFile, start: int, end: int, into: Into) -> None:
    """The Protocol's `read_range` arguments: [start, end) inside `file`, and an `into` of
    exactly that length. ValueError otherwise (a caller's bug, never a registry's answer)."""
    if not 0 <= start <= end:
        raise ValueError(f"invalid range [{start}, {end})")
    if end > file.size:
        raise ValueError(f"range end {end} is past the end of {file.path} ({file.size} B)")
    if into is not None and len(into) != end - start:
        raise ValueError(f"into is {len(into)} bytes, the range {end - start}")


@dataclass
class RegistryStats:
    """Counters a registry client keeps; read by status/metrics and by tests."""

    requests: int = 0
    bytes_downloaded: int = 0
    bytes_uploaded: int = 0
    retries: int = 0
    errors: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)  # "list_models" -> count

    def count(self, kind: str) -> None:
        self.requests += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1


class Registry(Protocol):
    """What mlregfs needs from a model registry. All methods raise mlregfs.errors types."""

    stats: RegistryStats

    async def project(self) -> t.ProjectInfo:
        """Resolve the project and check that it can be read with our credentials."""
        ...

    async def list_models(self) -> list[t.Model]:
        """Every model of the project, each with all of its versions."""
        ...

    async def get_model(self, name: str) -> t.Model:
        """One model (exact name) with all its versions; NotFound if absent."""
        ...

    async def list_candidates(self) -> list[t.Candidate]:
        """Candidates that own a `candidate_<iid>` package (not promoted to a version)."""
        ...

    async def list_files(self, owner: t.FileOwner) -> list[t.RemoteFile]:
        """Files of a version or candidate, one entry per path (the newest copy)."""
        ...

    async def get_run(self, run_id: str) -> t.Run:
        """What an MLflow run (candidate) logged: params, metrics, tags; NotFound if absent."""
        ...

    async def read_range(
        self, owner: t.FileOwner, file: t.RemoteFile, start: int, end: int, *, into: Into = None
    ) -> Buffer:
        """Bytes [start, end) of `file`; exactly end-start bytes or an error. `into`: a
        buffer of end-start bytes to fill (and return) instead of a new one."""
        ...

    # -- writes (issue #3) ----------------------------------------------------------------
    async def authorize_upload(self, owner: t.FileOwner, path: str) -> None:
        """Preflight (as Workhorse does): may `path` be uploaded to `owner`? Stores nothing."""
        ...

    async def upload(self, owner: t.FileOwner, path: str, source: Path, size: int) -> None:
        """Upload the file at `source` (exactly `size` bytes) as `path` of `owner`."""
        ...

    async def delete_file(self, file: t.RemoteFile) -> None:
        """Delete one package file (one copy of a name)."""
        ...

    async def may_delete_files(self) -> bool:
        """Does our role let us delete package files (Maintainer or above)? Asked before an
        operation that must not be left half done (a rename: copy, then delete)."""
        ...

    async def create_model(self, name: str) -> t.Model:
        """Create a model; Conflict if it exists."""
        ...

    async def create_version(self, model: str, version: str) -> t.ModelVersion:
        """Create version `version` (semver) of `model`."""
        ...

    async def delete_version(self, version: t.ModelVersion) -> None:
        """Delete a model version and its files."""
        ...

    async def delete_model(self, name: str) -> None:
        """Delete a model (and all its versions)."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...
