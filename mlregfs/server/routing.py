"""The route table and its matching, with Grape's semantics.

Routes match the raw (still percent-encoded) path, as Grape does, so that `acme%2Freg` is one
`:id` segment and a `%2F` inside a file name segment decodes to `/` and fails validation.
HEAD is answered by the GET route; a known path with another verb is 405 with `Allow`.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from mlregfs.server.api.ml_models import ml_models_handler
from mlregfs.server.api.mlflow_artifacts import mlflow_artifacts_download, mlflow_artifacts_list
from mlregfs.server.api.mlflow_registry import (
    mlflow_mv_create,
    mlflow_mv_download_uri,
    mlflow_mv_get,
    mlflow_mv_update,
    mlflow_rm_alias,
    mlflow_rm_create,
    mlflow_rm_delete,
    mlflow_rm_get,
    mlflow_rm_latest,
    mlflow_rm_search,
    mlflow_rm_update,
)
from mlregfs.server.api.mlflow_runs import (
    mlflow_experiments_create,
    mlflow_experiments_delete,
    mlflow_experiments_get,
    mlflow_experiments_get_by_name,
    mlflow_experiments_list,
    mlflow_experiments_search,
    mlflow_experiments_set_tag,
    mlflow_runs_create,
    mlflow_runs_delete,
    mlflow_runs_get,
    mlflow_runs_log_batch,
    mlflow_runs_log_metric,
    mlflow_runs_log_parameter,
    mlflow_runs_search,
    mlflow_runs_set_tag,
    mlflow_runs_update,
)
from mlregfs.server.api.packages import (
    delete_package,
    delete_package_file,
    download_package_file,
    get_package,
    list_package_files,
    list_packages,
)
from mlregfs.server.api.projects import get_project
from mlregfs.server.context import Ctx
from mlregfs.server.http import ApiError, grape_error

Handler = Callable[[Ctx], Awaitable[Any]]


@dataclass
class Route:
    pattern: re.Pattern[str]
    methods: dict[str, Handler]
    auth: str  # "ml_models" | "api" (job tokens allowed) | "api_nojob"
    mlflow: bool = False  # the method name comes from MLFLOW_ROUTES


MLFLOW_ROUTES: dict[tuple[str, str], Handler] = {
    ("GET", "experiments/get"): mlflow_experiments_get,
    ("GET", "experiments/get-by-name"): mlflow_experiments_get_by_name,
    ("GET", "experiments/list"): mlflow_experiments_list,
    ("POST", "experiments/search"): mlflow_experiments_search,
    ("POST", "experiments/create"): mlflow_experiments_create,
    ("POST", "runs/create"): mlflow_runs_create,
    ("GET", "runs/get"): mlflow_runs_get,
    ("POST", "runs/search"): mlflow_runs_search,
    ("POST", "runs/update"): mlflow_runs_update,
    ("POST", "runs/log-metric"): mlflow_runs_log_metric,
    ("POST", "runs/log-parameter"): mlflow_runs_log_parameter,
    ("POST", "runs/set-tag"): mlflow_runs_set_tag,
    ("POST", "runs/log-batch"): mlflow_runs_log_batch,
    ("POST", "runs/delete"): mlflow_runs_delete,
    ("POST", "experiments/delete"): mlflow_experiments_delete,
    ("POST", "experiments/set-experiment-tag"): mlflow_experiments_set_tag,
    ("POST", "registered-models/create"): mlflow_rm_create,
    ("GET", "registered-models/get"): mlflow_rm_get,
    ("PATCH", "registered-models/update"): mlflow_rm_update,
    ("DELETE", "registered-models/delete"): mlflow_rm_delete,
    ("GET", "registered-models/search"): mlflow_rm_search,
    ("POST", "registered-models/get-latest-versions"): mlflow_rm_latest,
    ("GET", "registered-models/alias"): mlflow_rm_alias,
    ("POST", "model-versions/create"): mlflow_mv_create,
    ("GET", "model-versions/get"): mlflow_mv_get,
    ("PATCH", "model-versions/update"): mlflow_mv_update,
    ("GET", "model-versions/get-download-uri"): mlflow_mv_download_uri,
}


_P = r"\A/api/v4/projects/(?P<id>[^/]+)"
_ml = ml_models_handler
ROUTES = [
    Route(re.compile(_P + r"\Z"), {"GET": get_project}, "api_nojob"),
    Route(re.compile(_P + r"/packages\Z"), {"GET": list_packages}, "api"),
    Route(
        re.compile(_P + r"/packages/ml_models/(?P<mv>[^/.?]+)/files/(?P<rest>.*[^/])\Z"),
        {"GET": _ml, "PUT": _ml},
        "ml_models",
    ),
    Route(
        re.compile(_P + r"/packages/(?P<package_id>[^/.?]+)\Z"),
        {"GET": get_package, "DELETE": delete_package},
        "api",
    ),
    Route(
        re.compile(_P + r"/packages/(?P<package_id>[^/.?]+)/package_files\Z"),
        {"GET": list_package_files},
        "api",
    ),
    Route(
        re.compile(_P + r"/packages/(?P<package_id>[^/.?]+)/package_files/(?P<file_id>[^/.?]+)\Z"),
        {"DELETE": delete_package_file},
        "api",
    ),
    Route(
        re.compile(
            _P
            + r"/packages/(?P<package_id>[^/.?]+)/package_files"
            + r"/(?P<file_id>[^/.?]+)/download\Z"
        ),
        {"GET": download_package_file},
        "api",
    ),
    Route(
        re.compile(_P + r"/ml/mlflow/api/2\.0/mlflow-artifacts/artifacts\Z"),
        {"GET": mlflow_artifacts_list},
        "api_nojob",
    ),
    Route(
        re.compile(
            _P
            + r"/ml/mlflow/api/2\.0/mlflow-artifacts/artifacts"
            + r"/(?P<mv>[^/.?]+)/(?P<rest>.+)\Z"
        ),
        {"GET": mlflow_artifacts_download},
        "api_nojob",
    ),
    Route(
        re.compile(_P + r"/ml/mlflow/api/2\.0/mlflow/(?P<method>[a-z\-]+/[a-z\-]+)\Z"),
        {},
        "api_nojob",
        mlflow=True,
    ),
]


def resolve(method: str, raw_path: str) -> tuple[Route, Handler, dict[str, str]]:
    """The route, handler and path params for a request; ApiError 404, 405 or 400 otherwise.

    The first route whose pattern matches decides (as Grape's router does).
    """
    for route in ROUTES:
        m = route.pattern.match(raw_path)
        if m is None:
            continue
        # Grape answers HEAD with the GET route
        verb = "GET" if method == "HEAD" else method
        methods = route.methods
        if route.mlflow:
            name = m.group("method")
            methods = {v: h for (v, n), h in MLFLOW_ROUTES.items() if n == name}
            if not methods:
                raise grape_error("404 Not Found", 404)
        handler = methods.get(verb)
        if handler is None:
            allowed = sorted({*methods, "OPTIONS"} | ({"HEAD"} if "GET" in methods else set()))
            raise ApiError(405, {"error": "405 Not Allowed"}, {"Allow": ", ".join(allowed)})
        groups = m.groupdict()
        # Grape `type: Integer` path params are validated before anything else
        for group, param in (("package_id", "package_id"), ("file_id", "package_file_id")):
            if group in groups and not re.fullmatch(r"[+-]?\d+", unquote(groups[group])):
                raise grape_error(f"{param} is invalid")
        return route, handler, groups
    raise grape_error("404 Not Found", 404)
