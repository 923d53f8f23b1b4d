"""MLflow runs as the registry describes them: `runs/get` answers checked into `Run`.

Every field is untrusted input shown to people and scripts (xattrs, `mlregfs info`): text with
terminal escapes, non-finite numbers and oversized values are dropped, entry by entry.
"""

from __future__ import annotations

import logging
from typing import Any

from mlregfs.registry import validate
from mlregfs.registry.types import Metric, Run

log = logging.getLogger("mlregfs.registry")

KEY_MAX = 1024  # bytes of a param, metric or tag key (MLflow allows 250; GitLab 255)
VALUE_MAX = 8192  # bytes of a param or tag value (MLflow 6000; GitLab 5000 for params)
MAX_ENTRIES = 10_000  # of each kind per run: a run that logged more is cut (logged)


def _seconds(value: Any) -> float:
    """MLflow times are epoch milliseconds; 0 when absent or unusable."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    try:
        return validate.timestamp(value / 1000.0 if value > 1e11 else float(value))
    except validate.Invalid:
        return 0.0


def _pairs(items: Any, what: str) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    for item in items if isinstance(items, list) else ():
        if not isinstance(item, dict):
            continue
        try:
            key = validate.text(item.get("key"), f"{what} key", KEY_MAX)
            value = item.get("value")
            value = "" if value is None else validate.text(value, f"{what} value", VALUE_MAX)
        except validate.Invalid as exc:
            log.warning("run %s dropped: %s", what, exc)
            continue
        if key:
            out.append((key, value))
    if len(out) > MAX_ENTRIES:
        log.warning("run %ss: %d entries, only the first %d kept", what, len(out), MAX_ENTRIES)
    return tuple(out[:MAX_ENTRIES])


def _metrics(items: Any) -> tuple[Metric, ...]:
    out: list[Metric] = []
    for item in items if isinstance(items, list) else ():
        if not isinstance(item, dict):
            continue
        try:
            key = validate.text(item.get("key"), "metric key", KEY_MAX)
            value = validate.number(item.get("value"))
        except validate.Invalid as exc:
            log.warning("run metric dropped: %s", exc)
            continue
        step = item.get("step")
        if isinstance(step, str) and step.lstrip("-").isdigit():
            step = int(step)
        if isinstance(step, bool) or not isinstance(step, int) or abs(step) >= 1 << 63:
            step = 0
        if key:
            out.append(Metric(key, value, step, _seconds(item.get("timestamp"))))
    if len(out) > MAX_ENTRIES:
        log.warning("run metrics: %d values, only the last %d kept", len(out), MAX_ENTRIES)
    return tuple(out[-MAX_ENTRIES:])


def run_from_mlflow(data: Any) -> Run:
    """The `run` of a `runs/get` answer; Invalid if it has no usable run id."""
    run = data.get("run") if isinstance(data, dict) else None
    info = run.get("info") if isinstance(run, dict) else None
    if not isinstance(info, dict):
        raise validate.Invalid("runs/get answered without run.info")
    body = run.get("data") if isinstance(run, dict) else None
    body = body if isinstance(body, dict) else {}
    experiment = info.get("experiment_id")
    return Run(
        run_id=validate.run_id(info.get("run_id") or info.get("run_uuid")),
        status=validate.optional(lambda v: validate.text(v, "status", 64), info.get("status")),
        experiment_id=validate.optional(
            lambda v: str(validate.ident(v, "experiment id")), experiment
        ),
        name=validate.optional_text(info.get("run_name")),
        start_time=_seconds(info.get("start_time")),
        end_time=_seconds(info.get("end_time")),
        params=_pairs(body.get("params"), "param"),
        metrics=_metrics(body.get("metrics")),
        tags=_pairs(body.get("tags"), "tag"),
    )
