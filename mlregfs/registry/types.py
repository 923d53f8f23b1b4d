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
    description: str | None = None
    run_id: str | None = None  # the MLflow run (candidate eid) the version was made from


@dataclass(frozen=True)
class Model:
    """A registered model and all of its versions."""

    name: str  # may contain "/"
    id: int | None
    created_at: float
    versions: tuple[ModelVersion, ...] = ()
    description: str | None = None


@dataclass(frozen=True)
class Candidate:
    """A candidate (MLflow run) whose artifacts live in its own `candidate_<iid>` package."""

    iid: int
    created_at: float
    eid: str | None = None  # MLflow run_id (UUID)
    name: str | None = None
    package_id: int | None = None


FileOwner = ModelVersion | Candidate

# The one encoding of an owner of files, wherever it is kept (inode nodes, the upload
# journal, the catalog, the fake): ("v", model, version) or ("c", iid).
OwnerKey = tuple[str, ...]


def owner_key(owner: FileOwner) -> OwnerKey:
    if isinstance(owner, Candidate):
        return ("c", str(owner.iid))
    return ("v", owner.model, owner.version)


def owner_path(key: OwnerKey | list[str]) -> str:
    """Where the owner is in the mount: `models/<model>/<version>` or `candidates/<iid>`."""
    if key[0] == "c":
        return f"candidates/{key[1]}"
    return f"models/{key[1]}/{key[2]}"


@dataclass(frozen=True)
class Metric:
    """One logged value of a run's metric."""

    key: str
    value: float
    step: int
    timestamp: float  # epoch seconds


@dataclass(frozen=True)
class Run:
    """An MLflow run (a GitLab candidate) as `runs/get` shows it: what it logged."""

    run_id: str
    status: str | None
    experiment_id: str | None
    name: str | None
    start_time: float
    end_time: float
    params: tuple[tuple[str, str], ...] = ()
    metrics: tuple[Metric, ...] = ()  # every logged value (GitLab sends the history)
    tags: tuple[tuple[str, str], ...] = ()

    def latest_metrics(self) -> dict[str, float]:
        """Each metric's value at its highest step (the newest among equal steps)."""
        best: dict[str, Metric] = {}
        for m in self.metrics:
            seen = best.get(m.key)
            if seen is None or (m.step, m.timestamp) >= (seen.step, seen.timestamp):
                best[m.key] = m
        return {k: best[k].value for k in sorted(best)}


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
