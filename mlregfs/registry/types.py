"""Plain value types the registry layer returns. Frozen, hashable, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ProjectInfo:
    """The project a mount is bound to, as resolved from SOURCE."""

    id: int | None  # None when the token may not read the project entity (CI job token)
    path: str  # "namespace/project"
    visibility: str  # "private" | "internal" | "public"


@dataclass(frozen=True)
class ModelVersion:
    """One version of a model. `version` is the semver string; `id` the DB id GitLab routes by."""

    model: str
    version: str
    id: int | None  # model-version DB id; None when only the packages API could be used
    created_at: float  # epoch seconds
    package_id: int | None = None


@dataclass(frozen=True)
class Model:
    """A registered model and all of its versions."""

    name: str  # may contain "/"
    id: int | None
    created_at: float
    versions: tuple[ModelVersion, ...] = ()


@dataclass(frozen=True)
class Candidate:
    """A candidate (MLflow run) whose artifacts live in its own `candidate_<iid>` package."""

    iid: int
    created_at: float
    eid: str | None = None  # MLflow run_id (UUID)
    name: str | None = None
    package_id: int | None = None


FileOwner = ModelVersion | Candidate


@dataclass(frozen=True)
class RemoteFile:
    """One file of a version or candidate. `path` is decoded ("dir/model.bin")."""

    path: str
    size: int
    sha256: str | None
    created_at: float
    file_id: int  # package-file id of the newest copy (the one GitLab serves)
    package_id: int
    older_ids: tuple[int, ...] = field(default=())  # duplicate rows of the same name


def owner_route_id(owner: FileOwner) -> str:
    """The `:model_version_id` path segment of the ml_models routes for `owner`."""
    if isinstance(owner, Candidate):
        return f"candidate:{owner.iid}"
    if owner.id is None:
        raise ValueError(f"model version {owner.model}/{owner.version} has no id")
    return str(owner.id)
