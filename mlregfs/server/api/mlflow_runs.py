"""The MLflow tracking API: experiments and runs (metrics, params, tags)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from starlette.responses import Response

from mlregfs.server.api.mlflow import (
    keyset,
    max_results,
    mlflow_access,
    mlflow_params,
    mlflow_write,
    require_params,
    tag_list,
)
from mlregfs.server.context import Ctx
from mlregfs.server.http import API, grape_error, json_response, message, mlflow_error, not_exist
from mlregfs.server.store import CANDIDATE_PREFIX, ConflictError, Row, StoreError


def _experiment_entity(e: Row) -> dict[str, Any]:
    return {
        "experiment_id": str(e["iid"]),
        "name": e["name"],
        "lifecycle_stage": "active",
        "artifact_location": "not_implemented",
        "tags": json.loads(e["tags"]),
    }


def _run_entity(ctx: Ctx, c: Row) -> dict[str, Any]:
    project = ctx.project()
    exp = ctx.store.experiment(int(project["id"]), id=c["experiment_id"])
    owner = str(c["model_version_id"]) if c["model_version_id"] else f"{CANDIDATE_PREFIX}{c['iid']}"
    info: dict[str, Any] = {
        "run_id": c["eid"],
        "run_uuid": c["eid"],
        "experiment_id": str(exp["iid"]) if exp else "",
        "start_time": c["start_time"] or 0,
    }
    if c["end_time"] is not None:
        info["end_time"] = c["end_time"]
    if c["name"] is not None:
        info["run_name"] = c["name"]
    info.update(
        {
            "status": str(c["status"]).upper(),
            "artifact_uri": f"{ctx.base_url()}{API}/projects/{project['id']}"
            f"/packages/ml_models/{owner}/files/",
            "lifecycle_stage": "active",
            "user_id": str(c["user_id"]) if c["user_id"] is not None else "",
        }
    )
    # GitLab's Run entity: each metric's last logged value, the params, the tags (metadata)
    metrics = [_metric_entity(m) for m in ctx.store.latest_metrics(int(c["id"]))]
    params = [{"key": p["name"], "value": p["value"]} for p in ctx.store.params(int(c["id"]))]
    return {
        "info": info,
        "data": {"metrics": metrics, "params": params, "tags": json.loads(c["tags"])},
    }


def _metric_entity(m: Row) -> dict[str, Any]:
    """`Entities::Ml::Mlflow::Metric`: key, value, timestamp (tracked_at), step unless nil."""
    out: dict[str, Any] = {"key": m["name"], "value": m["value"], "timestamp": m["tracked_at"]}
    if m["step"] is not None:
        out["step"] = m["step"]
    return out


def _experiment(ctx: Ctx, project: Row, iid: int | None) -> Row:
    """The project's experiment with that iid, else RESOURCE_DOES_NOT_EXIST."""
    e = ctx.store.experiment(int(project["id"]), iid=iid) if iid is not None else None
    if e is None:
        raise not_exist()
    return e


def _int_or_none(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


async def mlflow_experiments_get(ctx: Ctx) -> Response:
    project = mlflow_access(ctx, registry=False)
    p = await mlflow_params(ctx)
    require_params(p, "experiment_id")
    iid = _int_or_none(p["experiment_id"])
    e = _experiment(ctx, project, iid)
    return json_response({"experiment": _experiment_entity(e)})


async def mlflow_experiments_get_by_name(ctx: Ctx) -> Response:
    project = mlflow_access(ctx, registry=False)
    p = await mlflow_params(ctx)
    require_params(p, "experiment_name")
    e = ctx.store.experiment(int(project["id"]), name=str(p["experiment_name"]))
    if e is None:
        raise not_exist()
    return json_response({"experiment": _experiment_entity(e)})


async def mlflow_experiments_list(ctx: Ctx) -> Response:
    project = mlflow_access(ctx, registry=False)
    rows = ctx.store.experiments(int(project["id"]))
    return json_response({"experiments": [_experiment_entity(e) for e in rows]})


async def mlflow_experiments_search(ctx: Ctx) -> Response:
    project = mlflow_access(ctx, registry=False)
    p = await mlflow_params(ctx)
    rows = ctx.store.experiments(int(project["id"]))
    order = p.get("order_by")
    order_s = (order[0] if isinstance(order, list) and order else order) or "id ASC"
    col, _, direction = str(order_s).partition(" ")
    keyf: Callable[[Row], Any] = {
        "name": lambda r: r["name"],
        "created_at": lambda r: r["created_at"],
        "updated_at": lambda r: r["updated_at"],
    }.get(col, lambda r: r["id"])
    page, token = keyset(
        rows, keyf, direction.strip().upper() == "DESC", p.get("page_token"), max_results(p)
    )
    return json_response(
        {"experiments": [_experiment_entity(e) for e in page], "next_page_token": token}
    )


async def mlflow_experiments_create(ctx: Ctx) -> Response:
    project = mlflow_access(ctx, registry=False)
    p = await mlflow_params(ctx)
    require_params(p, "name")
    mlflow_write(ctx, project)
    try:
        e = ctx.store.create_experiment(
            int(project["id"]),
            str(p["name"]),
            user_id=ctx.user_id(),
            tags=tag_list(p.get("tags")),
        )
    except ConflictError:
        raise mlflow_error("RESOURCE_ALREADY_EXISTS") from None
    return json_response({"experiment_id": str(e["iid"])})


async def mlflow_runs_create(ctx: Ctx) -> Response:
    project = mlflow_access(ctx, registry=False)
    p = await mlflow_params(ctx)
    mlflow_write(ctx, project)
    iid = _int_or_none(p.get("experiment_id"))
    if p.get("experiment_id") is not None and iid is None:
        raise grape_error("experiment_id is invalid")
    e = _experiment(ctx, project, iid)
    cand_iid = ctx.store.create_candidate(
        int(project["id"]),
        experiment=int(e["iid"]),
        name=p.get("run_name"),
        start_time=_int_or_none(p.get("start_time")),
        user_id=ctx.user_id(),
        tags=tag_list(p.get("tags")),
    )
    c = ctx.store.candidate(int(project["id"]), iid=cand_iid)
    assert c is not None
    return json_response({"run": _run_entity(ctx, c)})


def _find_run(ctx: Ctx, project: Row, p: dict[str, Any]) -> Row:
    rid = p.get("run_id") or p.get("run_uuid")
    if not rid:
        raise grape_error("run_id is missing")
    c = ctx.store.candidate(int(project["id"]), eid=str(rid))
    if c is None:
        raise not_exist()
    return c


async def mlflow_runs_get(ctx: Ctx) -> Response:
    project = mlflow_access(ctx, registry=False)
    c = _find_run(ctx, project, await mlflow_params(ctx))
    return json_response({"run": _run_entity(ctx, c)})


async def mlflow_runs_search(ctx: Ctx) -> Response:
    project = mlflow_access(ctx, registry=False)
    p = await mlflow_params(ctx)
    ids = p.get("experiment_ids")
    first = ids[0] if isinstance(ids, list) and ids else None
    iid = _int_or_none(first)
    e = _experiment(ctx, project, iid)
    rows = ctx.store.experiment_candidates(int(e["id"]))
    order = p.get("order_by")
    order_s = (order[0] if isinstance(order, list) and order else order) or "created_at DESC"
    col, _, direction = str(order_s).partition(" ")
    keyf: Callable[[Row], Any] = (
        (lambda r: r["name"] or "") if col == "name" else (lambda r: r["created_at"])
    )
    page, token = keyset(
        rows, keyf, direction.strip().upper() != "ASC", p.get("page_token"), max_results(p)
    )
    return json_response({"runs": [_run_entity(ctx, c) for c in page], "next_page_token": token})


def _grape_float(p: dict[str, Any], name: str) -> float:
    v = p.get(name)
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise grape_error(f"{name} is invalid")
    try:
        f = float(v)
    except ValueError:
        raise grape_error(f"{name} is invalid") from None
    if not math.isfinite(f):  # Ruby's Float() refuses "NaN" and "Infinity"
        raise grape_error(f"{name} is invalid")
    return f


def _grape_str(p: dict[str, Any], name: str, shown: str | None = None) -> str:
    """Grape `type: String`: numbers are coerced, arrays and hashes are "<name> is invalid"."""
    v = p.get(name)
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    raise grape_error(f"{shown or name} is invalid")


def _grape_int(p: dict[str, Any], name: str, *, required: bool) -> int | None:
    v = p.get(name)
    if v is None:
        if required:
            raise grape_error(f"{name} is missing")
        return None
    if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
        raise grape_error(f"{name} is invalid")
    try:
        return int(v)
    except (TypeError, ValueError):
        raise grape_error(f"{name} is invalid") from None


def _record(name: str, value: str, *, value_max: int, what: str = "Value") -> None:
    """ActiveRecord validations of a param or tag (presence, lengths), answered as the
    entrypoint's `rescue_from ActiveRecord::ActiveRecordError`: INVALID_PARAMETER_VALUE."""
    problems = []
    if not name.strip():
        problems.append("Name can't be blank")
    if len(name) > 250:
        problems.append("Name is too long (maximum is 250 characters)")
    if not value.strip():
        problems.append(f"{what} can't be blank")
    if len(value) > value_max:
        problems.append(f"{what} is too long (maximum is {value_max} characters)")
    if problems:
        raise mlflow_error(
            "INVALID_PARAMETER_VALUE", 400, "Validation failed: " + ", ".join(problems)
        )


async def _run_write(ctx: Ctx, *required: str) -> tuple[Row, dict[str, Any]]:
    """The checks every run write starts with: access, params, the run, the write role."""
    project = mlflow_access(ctx, registry=False)
    p = await mlflow_params(ctx)
    mlflow_write(ctx, project)  # Grape's `before` runs ahead of the params' validation
    require_params(p, "run_id", *required)
    return _find_run(ctx, project, p), p


async def mlflow_runs_log_metric(ctx: Ctx) -> Response:
    c, p = await _run_write(ctx, "key", "value")
    value = _grape_float(p, "value")
    ts = _grape_int(p, "timestamp", required=True)
    step = _grape_int(p, "step", required=False)
    key = _grape_str(p, "key")
    _record(key, "-", value_max=250)  # CandidateMetric: the name's rules only
    ctx.store.add_metrics(int(c["id"]), [(key, value, int(ts or 0), step)])
    return json_response({})


def _key_value(p: dict[str, Any], *, value_max: int) -> tuple[str, str]:
    """A param's or tag's `key` and `value`: present, Strings, valid as the record checks."""
    _required_key(p, "value")
    key, value = _grape_str(p, "key"), _grape_str(p, "value")
    _record(key, value, value_max=value_max)
    return key, value


def _unique_write(write: Callable[[], None]) -> Response:
    """A write a second value of the same name refuses: the unique index's
    ActiveRecord::RecordNotUnique (or the validation's "already taken") is
    INVALID_PARAMETER_VALUE."""
    try:
        write()
    except ConflictError as e:
        raise mlflow_error("INVALID_PARAMETER_VALUE", 400, str(e)) from None
    return json_response({})


async def mlflow_runs_log_parameter(ctx: Ctx) -> Response:
    c, p = await _run_write(ctx, "key")
    key, value = _key_value(p, value_max=250)
    params = [(key, value)]
    return _unique_write(lambda: ctx.store.add_params(int(c["id"]), params, skip_duplicates=False))


async def mlflow_runs_set_tag(ctx: Ctx) -> Response:
    c, p = await _run_write(ctx, "key")
    key, value = _key_value(p, value_max=5000)
    tags = [(key, value)]
    return _unique_write(lambda: ctx.store.add_tags(int(c["id"]), tags, skip_duplicates=False))


async def mlflow_runs_log_batch(ctx: Ctx) -> Response:
    """Metrics, params and tags at once; validation errors block the whole batch, duplicate
    params and tags are skipped (`insert_all`)."""
    c, p = await _run_write(ctx)
    metrics: list[tuple[str, float, int, int | None]] = []
    for i, m in enumerate(_batch_items(p, "metrics")):
        for field_name in ("key", "value", "timestamp"):
            if m.get(field_name) is None:
                raise grape_error(f"metrics[{i}][{field_name}] is missing")
        value = _grape_float(m, "value")
        ts = _grape_int(m, "timestamp", required=True)
        key = _grape_str(m, "key", f"metrics[{i}][key]")
        metrics.append((key, value, int(ts or 0), _grape_int(m, "step", required=False)))
    params = []
    for i, q in enumerate(_batch_items(p, "params")):
        for field_name in ("key", "value"):
            if q.get(field_name) is None:
                raise grape_error(f"params[{i}][{field_name}] is missing")
        params.append(
            (
                _grape_str(q, "key", f"params[{i}][key]"),
                _grape_str(q, "value", f"params[{i}][value]"),
            )
        )
    tags = [(t["key"], t["value"]) for t in tag_list(p.get("tags"))]
    cand = int(c["id"])
    ctx.store.add_metrics(cand, metrics)
    ctx.store.add_params(cand, params, skip_duplicates=True)
    ctx.store.add_tags(cand, tags, skip_duplicates=True)
    return json_response({})


def _batch_items(p: dict[str, Any], name: str) -> list[dict[str, Any]]:
    items = p.get(name)
    if items is None:
        return []
    if not isinstance(items, list) or not all(isinstance(x, dict) for x in items):
        raise grape_error(f"{name} is invalid")
    return items


def _required_key(p: dict[str, Any], name: str) -> None:
    """Grape `requires`: the key must be there (an empty string passes to the model)."""
    if p.get(name) is None:
        raise grape_error(f"{name} is missing")


async def mlflow_runs_delete(ctx: Ctx) -> Response:
    c, _ = await _run_write(ctx)
    ctx.store.delete_candidate(int(c["id"]))
    return json_response({})


async def _experiment_write(ctx: Ctx, *required: str) -> tuple[Row, dict[str, Any]]:
    project = mlflow_access(ctx, registry=False)
    p = await mlflow_params(ctx)
    mlflow_write(ctx, project)
    require_params(p, "experiment_id", *required)
    iid = _int_or_none(p["experiment_id"])
    e = _experiment(ctx, project, iid)
    return e, p


async def mlflow_experiments_delete(ctx: Ctx) -> Response:
    e, _ = await _experiment_write(ctx)
    try:
        ctx.store.delete_experiment(int(e["id"]))
    except StoreError as err:  # a model's experiment: render_api_error!(message, 400)
        raise message(400, str(err)) from None
    return json_response({})


async def mlflow_experiments_set_tag(ctx: Ctx) -> Response:
    e, p = await _experiment_write(ctx, "key")
    key, value = _key_value(p, value_max=5000)
    return _unique_write(lambda: ctx.store.set_experiment_tag(int(e["id"]), key, value))


async def mlflow_runs_update(ctx: Ctx) -> Response:
    project = mlflow_access(ctx, registry=False)
    p = await mlflow_params(ctx)
    c = _find_run(ctx, project, p)
    mlflow_write(ctx, project)
    fields: dict[str, Any] = {}
    if p.get("status"):
        st = str(p["status"]).lower()
        if st not in ("running", "scheduled", "finished", "failed", "killed"):
            raise grape_error("status does not have a valid value")
        fields["status"] = st
    if p.get("end_time") is not None:
        fields["end_time"] = _int_or_none(p["end_time"])
    if p.get("run_name"):
        fields["name"] = str(p["run_name"])
    ctx.store.update_candidate(int(c["id"]), **fields)
    c = ctx.store.candidate(int(project["id"]), iid=c["iid"]) or c
    return json_response({"run_info": _run_entity(ctx, c)["info"]})
