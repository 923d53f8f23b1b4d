"""Models, versions and candidates, by two strategies: the MLflow-compatible API (ids,
descriptions, runs) while it answers, else the packages API (§5, §6), which is all a job token
or an anonymous caller may use. Candidates merge MLflow runs with candidate_N packages."""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, NoReturn, TypeVar

import trio

from mlregfs.errors import Forbidden, NotFound, ProtocolError, Unauthorized
from mlregfs.registry import validate
from mlregfs.registry.gitlab.api import Api, MlflowPart
from mlregfs.registry.gitlab.decode import dicts, drop, error_code, is_semver, timestamp
from mlregfs.registry.gitlab.pages import all_packages, mlflow_pages
from mlregfs.registry.http.errors import status_error
from mlregfs.registry.runs import run_from_mlflow
from mlregfs.registry.types import Candidate, Model, ModelVersion, Run

log = logging.getLogger(__name__)

T = TypeVar("T")

MLFLOW_CONCURRENCY = 8  # runs/search requests in flight while listing candidates

CANDIDATE_VERSION = re.compile(r"\Acandidate_([0-9]+)\Z")
_CANDIDATE_URI = re.compile(r"candidate:([0-9]+)")
_MODEL_ID_IN_SOURCE = re.compile(r"/-/ml/models/([0-9]+)(?:/|$)")


class Listing:
    """list_models, get_model, list_candidates and get_run over one Api."""

    def __init__(self, api: Api) -> None:
        self._api = api

    async def _try_mlflow(self, what: MlflowPart, fetch: Callable[[], Awaitable[T]]) -> T | None:
        """`fetch()` through the MLflow API unless it is known to refuse us; None when it
        does (once refused, it is not asked again this session)."""
        if self._api.mlflow[what] is False:
            return None
        try:
            found = await fetch()
        except (Unauthorized, Forbidden, NotFound) as exc:
            self._api.mlflow_off(what, exc)
            return None
        self._api.mlflow[what] = True
        return found

    # ------------------------------------------------------------------------------ models

    async def list_models(self) -> list[Model]:
        """Every model with all its versions (MLflow search, else the packages API)."""
        models = await self._try_mlflow("models", self._mlflow_list_models)
        if models is not None:
            return models
        return models_from_packages(await all_packages(self._api, "list_models"))

    async def get_model(self, name: str) -> Model:
        """One model by exact name, with all its versions; NotFound if absent."""
        api = self._api
        if api.mlflow["models"] is not False:
            reply = await api.mlflow_json(
                "get_model",
                "GET",
                "registered-models/get",
                params={"name": name},
                passthrough=frozenset({401, 403, 404}),
            )
            if reply.status == 200:
                api.mlflow["models"] = True
                rm = reply.data.get("registered_model") if isinstance(reply.data, dict) else None
                if not isinstance(rm, dict):
                    raise ProtocolError("registered-models/get: answer has no registered_model")
                return checked_model(rm)
            if reply.status == 404 and error_code(reply.data) == "RESOURCE_DOES_NOT_EXIST":
                api.mlflow["models"] = True
                raise status_error(404, f"model {name!r} not found")
            api.mlflow_off("models", f"registered-models/get answered {reply.status}")
        rows = await all_packages(api, "get_model", {"package_name": name})
        # package_name is a fuzzy (substring) search in GitLab (§8.18): compare exactly here.
        exact = [r for r in rows if r.get("name") == name]
        models = models_from_packages(exact)
        if not models:
            raise status_error(404, f"model {name!r} not found")
        return models[0]

    async def _mlflow_list_models(self) -> list[Model]:
        models: list[Model] = []
        async for page in mlflow_pages(
            self._api, "list_models", "GET", "registered-models/search", "registered_models"
        ):
            for rm in page:
                try:
                    models.append(model_from_mlflow(rm))
                except validate.Invalid as exc:
                    drop("model", exc)
        return models

    # ------------------------------------------------------------------------------ candidates

    async def list_candidates(self) -> list[Candidate]:
        """Candidates not promoted to a version: MLflow runs merged with candidate_N packages."""
        runs = await self._try_mlflow("runs", self._mlflow_candidates)
        merged: dict[int, Candidate] = dict(runs or {})
        for row in await all_packages(self._api, "list_candidates"):
            m = CANDIDATE_VERSION.match(str(row.get("version", "")))
            if not m:
                continue
            try:
                iid = validate.ident(m.group(1), "candidate iid")
            except validate.Invalid as exc:
                drop("candidate package", exc)
                continue
            pkg_id = int(row["id"])  # validated by all_packages
            known = merged.get(iid)
            if known is None:
                merged[iid] = Candidate(
                    iid=iid, created_at=timestamp(row.get("created_at")), package_id=pkg_id
                )
            else:
                created = known.created_at or timestamp(row.get("created_at"))
                merged[iid] = replace(known, package_id=pkg_id, created_at=created)
        return [merged[iid] for iid in sorted(merged)]

    async def _mlflow_candidates(self) -> dict[int, Candidate]:
        experiment_ids = await self._mlflow_experiment_ids()
        found: dict[int, Candidate] = {}
        limiter = trio.CapacityLimiter(MLFLOW_CONCURRENCY)

        async def runs_of(experiment_id: str) -> None:
            async with limiter:
                async for page in mlflow_pages(
                    self._api,
                    "list_candidates",
                    "POST",
                    "runs/search",
                    "runs",
                    body={"experiment_ids": [experiment_id]},
                ):
                    for run in page:
                        cand = _candidate_from_run(run)
                        if cand is not None:
                            found[cand.iid] = cand

        await _gather([functools.partial(runs_of, e) for e in experiment_ids])
        return found

    async def _mlflow_experiment_ids(self) -> list[str]:
        ids: list[str] = []
        try:
            async for page in mlflow_pages(
                self._api, "list_candidates", "POST", "experiments/search", "experiments", body={}
            ):
                ids.extend(str(e["experiment_id"]) for e in page if _active(e))
        except (Forbidden, NotFound):
            # POST needs the `api` scope and older servers lack experiments/search; the
            # unpaginated GET experiments/list works with read_api.
            reply = await self._api.mlflow_json("list_candidates", "GET", "experiments/list")
            data = reply.data
            rows = data.get("experiments") if isinstance(data, dict) else None
            ids = [str(e["experiment_id"]) for e in dicts(rows, "experiments") if _active(e)]
        return ids

    async def get_run(self, run_id: str) -> Run:
        """What the run logged (`runs/get`): params, metrics with their history, tags."""
        params = {"run_id": validate.run_id(run_id)}
        reply = await self._api.mlflow_json("get_run", "GET", "runs/get", params=params)
        try:
            return run_from_mlflow(reply.data)
        except validate.Invalid as exc:
            raise ProtocolError(f"registry answered an unusable run: {exc}") from None


# ---------------------------------------------------------------------------------- decoding


def checked_model(rm: dict[str, Any]) -> Model:
    """One model answer that must be usable (get, create): ProtocolError if it is not."""
    try:
        return model_from_mlflow(rm)
    except validate.Invalid as exc:
        raise ProtocolError(f"registry answered an unusable model: {exc}") from None


def model_from_mlflow(rm: dict[str, Any]) -> Model:
    """Model from an MLflow registered model; Invalid if its name is unusable. Versions
    with an invalid id or version string are dropped (logged)."""
    name = validate.model_name(rm.get("name"))
    model_id: int | None = None
    versions: list[ModelVersion] = []
    # GitLab puts ALL versions into latest_versions (§5); `version` is the DB id and the
    # semver is aliases[0] (§6).
    for mv in rm.get("latest_versions") or []:
        if not isinstance(mv, dict):
            continue
        aliases = mv.get("aliases") or []
        alias = aliases[0] if isinstance(aliases, list) and aliases else None
        if alias is None:
            log.debug("model %r: version without a semver alias, skipped", name)
            continue
        try:
            mv_id = validate.ident(mv.get("version"), "model version id")
            semver = validate.semver(alias)
        except validate.Invalid as exc:
            drop(f"version of model {validate.shown(name)}", exc)
            continue
        source = mv.get("source")
        if model_id is None and isinstance(source, str):
            m = _MODEL_ID_IN_SOURCE.search(source)
            model_id = int(m.group(1)) if m and len(m.group(1)) <= 18 else None
        versions.append(
            ModelVersion(
                model=name,
                version=semver,
                id=mv_id,
                created_at=timestamp(mv.get("creation_timestamp")),
                description=validate.optional(validate.text, mv.get("description")),
                run_id=validate.optional(validate.run_id, mv.get("run_id")),
            )
        )
    return Model(
        name=name,
        id=model_id,
        created_at=timestamp(rm.get("creation_timestamp")),
        versions=tuple(versions),
        description=validate.optional(validate.text, rm.get("description")),
    )


def models_from_packages(rows: list[dict[str, Any]]) -> list[Model]:
    """Models as the packages API sees them: no ids, no models without packages."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        name = row.get("name")
        if not isinstance(name, str) or name.startswith("ml_experiment_"):
            continue  # experiment candidates, not a model
        try:
            validate.model_name(name)
        except validate.Invalid as exc:
            drop("model package", exc)
            continue
        by_name.setdefault(name, []).append(row)
    models = []
    for name, pkgs in sorted(by_name.items()):
        # rows come from all_packages: their ids are validated already
        versions = tuple(
            ModelVersion(
                model=name,
                version=str(p["version"]),
                id=None,
                created_at=timestamp(p.get("created_at")),
                package_id=int(p["id"]),
            )
            for p in sorted(pkgs, key=lambda p: int(p["id"]))
            if isinstance(p.get("version"), str) and is_semver(p["version"])
        )
        created = min((timestamp(p.get("created_at")) for p in pkgs), default=0.0)
        models.append(Model(name=name, id=None, created_at=created, versions=versions))
    return models


def _candidate_from_run(run: Any) -> Candidate | None:
    info = run.get("info") if isinstance(run, dict) else None
    if not isinstance(info, dict) or info.get("lifecycle_stage") == "deleted":
        return None
    m = _CANDIDATE_URI.search(str(info.get("artifact_uri") or ""))
    if m is None:
        return None  # promoted to a model version (artifacts under its id), or legacy
    try:
        iid = validate.ident(m.group(1), "candidate iid")
    except validate.Invalid as exc:
        drop("MLflow run", exc)
        return None
    return Candidate(
        iid=iid,
        created_at=timestamp(info.get("start_time")),
        eid=validate.optional(validate.run_id, info.get("run_id")),
        name=validate.optional_text(info.get("run_name")),
    )


def _active(experiment: dict[str, Any]) -> bool:
    return "experiment_id" in experiment and experiment.get("lifecycle_stage") != "deleted"


async def _gather(tasks: list[Callable[[], Awaitable[None]]]) -> None:
    """Run tasks concurrently; re-raise the first failure itself, not an ExceptionGroup."""
    try:
        async with trio.open_nursery() as nursery:
            for task in tasks:
                nursery.start_soon(task)
    except BaseExceptionGroup as group:
        _raise_first(group)


def _raise_first(group: BaseExceptionGroup[BaseException]) -> NoReturn:
    first = group.exceptions[0]
    if isinstance(first, BaseExceptionGroup):
        _raise_first(first)
    raise first
