"""MLflow tracking writes (log-metric, log-parameter, set-tag, log-batch, runs/delete,
experiments/delete, set-experiment-tag) with the real MLflow client and raw HTTP, answered as
GitLab's `lib/api/ml/mlflow/{runs,experiments}.rb` do."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException, RestException
from mlflow.tracking import MlflowClient

from tests.server.helpers import World

MLFLOW = "ml/mlflow/api/2.0/mlflow"


@pytest.fixture
def tracking(world: World, monkeypatch: pytest.MonkeyPatch) -> Iterator[MlflowClient]:
    """The real client against `mlregfs serve`, as a user sets it up (environment)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"{world.api}/projects/{world.priv.id}/ml/mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", world.priv.tokens["developer"])
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    yield MlflowClient()


def _ms() -> int:
    return int(time.time() * 1000)


def test_fluent_training_script(world: World, tracking: MlflowClient) -> None:
    """set_experiment, start_run, log_param(s), log_metric(s), set_tag, end_run: all stored
    and shown by get_run (each metric's last logged value)."""
    import mlflow

    mlflow.set_tracking_uri(f"{world.api}/projects/{world.priv.id}/ml/mlflow")
    mlflow.set_experiment("fluent")
    with mlflow.start_run(run_name="fit") as run:
        mlflow.log_param("lr", 0.01)
        mlflow.log_params({"epochs": 3, "opt": "adam"})
        for step, loss in enumerate([0.9, 0.4, 0.2]):
            mlflow.log_metric("loss", loss, step=step)
        mlflow.log_metrics({"acc": 0.8, "f1": 0.7})
        mlflow.set_tag("team", "vision")
    got = tracking.get_run(run.info.run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "fit"
    assert got.data.params == {"lr": "0.01", "epochs": "3", "opt": "adam"}
    assert got.data.metrics == {"loss": 0.2, "acc": 0.8, "f1": 0.7}
    assert got.data.tags["team"] == "vision"


def test_client_writes_and_batch(tracking: MlflowClient) -> None:
    exp = tracking.create_experiment(f"batch-{time.time_ns()}")
    run = tracking.create_run(exp)
    rid = run.info.run_id
    tracking.log_param(rid, "a", "1")
    tracking.log_metric(rid, "m", 1.5, timestamp=_ms(), step=4)
    tracking.set_tag(rid, "t", "x")
    tracking.log_batch(
        rid,
        metrics=[Metric("m", 2.5, _ms(), 5), Metric("n", 1.0, _ms(), 0)],
        params=[Param("a", "dup ignored"), Param("b", "2")],
        tags=[RunTag("t", "dup ignored"), RunTag("u", "y")],
    )
    data = tracking.get_run(rid).data
    assert data.params == {"a": "1", "b": "2"}  # a batch skips duplicates
    assert data.metrics == {"m": 2.5, "n": 1.0}
    assert (data.tags["t"], data.tags["u"]) == ("x", "y")
    # a second log_param of the same key is refused (GitLab: the unique index)
    with pytest.raises(MlflowException) as e:
        tracking.log_param(rid, "a", "other")
    assert e.value.error_code == "INVALID_PARAMETER_VALUE"
    with pytest.raises(MlflowException) as e:
        tracking.set_tag(rid, "t", "again")
    assert e.value.error_code == "INVALID_PARAMETER_VALUE" and "already taken" in e.value.message
    tracking.delete_run(rid)
    with pytest.raises(RestException) as e:
        tracking.get_run(rid)
    assert e.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    tracking.delete_experiment(exp)
    with pytest.raises(RestException):
        tracking.get_experiment(exp)


def _post(
    client: httpx.Client, world: World, method: str, body: object, role: str
) -> httpx.Response:
    url = f"{world.api}/projects/{world.priv.id}/{MLFLOW}/{method}"
    return client.post(url, json=body, headers={"PRIVATE-TOKEN": world.priv.tokens[role]})


def test_error_shapes(world: World, client: httpx.Client, tracking: MlflowClient) -> None:
    exp = tracking.create_experiment(f"errors-{time.time_ns()}")
    rid = tracking.create_run(exp).info.run_id
    missing = "00000000-0000-0000-0000-000000000000"
    cases: list[tuple[str, object, str, int, dict[str, object]]] = [
        # unknown run: RESOURCE_DOES_NOT_EXIST
        ("runs/log-metric", {"run_id": missing, "key": "k", "value": 1, "timestamp": 1},
         "developer", 404, {"error_code": "RESOURCE_DOES_NOT_EXIST"}),
        # Grape's own validation: {"error": "... is missing|invalid"}
        ("runs/log-metric", {"run_id": rid, "key": "k", "value": 1}, "developer", 400,
         {"error": "timestamp is missing"}),
        ("runs/log-metric", {"run_id": rid, "key": "k", "value": "x", "timestamp": 1},
         "developer", 400, {"error": "value is invalid"}),
        ("runs/log-batch", {"run_id": rid, "metrics": [{"key": "k", "value": 1}]}, "developer",
         400, {"error": "metrics[0][timestamp] is missing"}),
        ("runs/log-batch", {"run_id": rid, "params": [{"key": ["a"], "value": "v"}]},
         "developer", 400, {"error": "params[0][key] is invalid"}),
        ("runs/set-tag", {"run_id": rid, "key": "k", "value": {"x": 1}}, "developer", 400,
         {"error": "value is invalid"}),
        # ActiveRecord validations: INVALID_PARAMETER_VALUE with the message
        ("runs/log-parameter", {"run_id": rid, "key": "p", "value": "v" * 251}, "developer", 400,
         {"error_code": "INVALID_PARAMETER_VALUE",
          "message": "Validation failed: Value is too long (maximum is 250 characters)"}),
        ("runs/log-parameter", {"run_id": rid, "key": "p", "value": ""}, "developer", 400,
         {"error_code": "INVALID_PARAMETER_VALUE",
          "message": "Validation failed: Value can't be blank"}),
        # writes need the Developer role: 401, not 403
        ("runs/set-tag", {"run_id": rid, "key": "k", "value": "v"}, "reporter", 401,
         {"message": "401 Unauthorized"}),
        ("runs/delete", {"run_id": rid}, "reporter", 401, {"message": "401 Unauthorized"}),
        # the role is checked before the params (Grape's `before` filter)
        ("runs/log-metric", {"run_id": rid}, "reporter", 401, {"message": "401 Unauthorized"}),
        # POST needs the api scope
        ("runs/log-batch", {"run_id": rid}, "read_api", 403, {"error": "insufficient_scope"}),
        ("experiments/delete", {"experiment_id": "999999"}, "developer", 404,
         {"error_code": "RESOURCE_DOES_NOT_EXIST"}),
    ]  # fmt: skip
    for method, body, role, status, expected in cases:
        r = _post(client, world, method, body, role)
        got = r.json()
        assert r.status_code == status, (method, body, r.text)
        assert {k: got.get(k) for k in expected} == expected, (method, body, r.text)
    # NaN is not JSON to GitLab (Ruby's parser)
    url = f"{world.api}/projects/{world.priv.id}/{MLFLOW}/runs/log-metric"
    r = client.post(
        url,
        content=f'{{"run_id": "{rid}", "key": "k", "value": NaN, "timestamp": 1}}',
        headers={
            "PRIVATE-TOKEN": world.priv.tokens["developer"],
            "Content-Type": "application/json",
        },
    )
    assert r.status_code == 400
    # a model's experiment cannot be deleted: render_api_error!
    model = tracking.create_registered_model(f"exp-of-model-{time.time_ns()}")
    e = tracking.get_experiment_by_name(f"[model]{model.name}")
    assert e is not None
    r = _post(client, world, "experiments/delete", {"experiment_id": e.experiment_id}, "developer")
    assert (r.status_code, r.json()) == (
        400,
        {"message": "Cannot delete an experiment associated to a model"},
    )


def test_metric_history_is_not_served(world: World, client: httpx.Client) -> None:
    """GitLab's entrypoint does not mount `metrics/get-history` (lib/api/ml/mlflow/metrics.rb
    exists, unmounted): a plain 404."""
    r = client.get(
        f"{world.api}/projects/{world.priv.id}/{MLFLOW}/metrics/get-history",
        params={"run_id": "x", "metric_key": "m"},
        headers={"PRIVATE-TOKEN": world.priv.tokens["developer"]},
    )
    assert (r.status_code, r.json()) == (404, {"error": "404 Not Found"})


def test_experiment_tag(world: World, client: httpx.Client, tracking: MlflowClient) -> None:
    exp = tracking.create_experiment(f"tagged-{time.time_ns()}")
    tracking.set_experiment_tag(exp, "owner", "ml-team")
    assert tracking.get_experiment(exp).tags == {"owner": "ml-team"}
    r = _post(
        client,
        world,
        "experiments/set-experiment-tag",
        {"experiment_id": exp, "key": "owner", "value": "again"},
        "developer",
    )
    assert r.status_code == 400 and r.json()["error_code"] == "INVALID_PARAMETER_VALUE"
