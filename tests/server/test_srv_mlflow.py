"""MLflow-compatible API subset and mlflow-artifacts, with GitLab's quirks."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.server.helpers import World


@pytest.fixture(scope="module")
def ml(world: World) -> tuple[str, dict[str, str]]:
    base = f"{world.api}/projects/{world.priv.id}/ml/mlflow/api/2.0/mlflow"
    return base, {"PRIVATE-TOKEN": world.priv.tokens["developer"]}


def test_registered_model_lifecycle(
    world: World, client: httpx.Client, ml: tuple[str, dict[str, str]]
) -> None:
    base, h = ml
    t0 = int(time.time())
    r = client.post(f"{base}/registered-models/create", json={"name": "team/flow"}, headers=h)
    assert r.status_code == 200
    rm = r.json()["registered_model"]
    assert rm["name"] == "team/flow" and rm["latest_versions"] == []
    assert abs(rm["creation_timestamp"] - t0) < 60  # seconds, not milliseconds
    r = client.post(f"{base}/registered-models/create", json={"name": "team/flow"}, headers=h)
    assert (r.status_code, r.json()) == (400, {"error_code": "RESOURCE_ALREADY_EXISTS"})
    r = client.post(f"{base}/model-versions/create", json={"name": "team/flow"}, headers=h)
    v1 = r.json()["model_version"]
    assert v1["aliases"] == ["1.0.0"]
    assert v1["version"] != "1.0.0" and int(v1["version"]) >= 1001  # the DB id
    assert (v1["status"], v1["current_stage"], v1["user_id"]) == ("READY", "development", None)
    r = client.post(
        f"{base}/model-versions/create",
        headers=h,
        json={"name": "team/flow", "tags": [{"key": "gitlab.version", "value": "2.5.0"}]},
    )
    v2 = r.json()["model_version"]
    assert v2["aliases"] == ["2.5.0"]
    r = client.post(f"{base}/model-versions/create", json={"name": "team/flow"}, headers=h)
    assert r.json()["model_version"]["aliases"] == ["2.5.1"]  # patch bump of the latest
    r = client.post(
        f"{base}/model-versions/create",
        headers=h,
        json={"name": "team/flow", "tags": [{"key": "gitlab.version", "value": "v1"}]},
    )
    assert r.status_code == 400 and r.json()["error_code"] == "INVALID_PARAMETER_VALUE"
    r = client.get(
        f"{base}/model-versions/get", params={"name": "team/flow", "version": "2.5.0"}, headers=h
    )
    assert r.json()["model_version"]["version"] == v2["version"]
    r = client.get(
        f"{base}/model-versions/get",
        params={"name": "team/flow", "version": v2["version"]},
        headers=h,
    )
    assert (r.status_code, r.json()) == (404, {"error_code": "RESOURCE_DOES_NOT_EXIST"})
    r = client.get(
        f"{base}/model-versions/get-download-uri",
        params={"name": "team/flow", "version": v2["version"]},
        headers=h,
    )
    assert r.json() == {"artifact_uri": f"mlflow-artifacts:/{v2['version']}"}
    r = client.get(
        f"{base}/model-versions/get-download-uri",
        params={"name": "team/flow", "version": "2.5.0"},
        headers=h,
    )
    assert (r.status_code, r.json()) == (400, {"error": "version is invalid"})
    r = client.get(f"{base}/registered-models/get", params={"name": "team/flow"}, headers=h)
    assert [v["aliases"][0] for v in r.json()["registered_model"]["latest_versions"]] == [
        "1.0.0",
        "2.5.0",
        "2.5.1",
    ]
    r = client.post(
        f"{base}/registered-models/get-latest-versions", json={"name": "team/flow"}, headers=h
    )
    assert [v["aliases"] for v in r.json()["model_versions"]] == [["2.5.1"]]
    r = client.get(
        f"{base}/registered-models/alias", params={"name": "team/flow", "alias": "2.5.0"}, headers=h
    )
    assert r.json()["model_version"]["version"] == v2["version"]
    r = client.patch(
        f"{base}/model-versions/update",
        headers=h,
        json={"name": "team/flow", "version": "2.5.0", "description": "new"},
    )
    assert r.json()["model_version"]["description"] == "new"
    r = client.get(f"{base}/registered-models/get", params={"name": "nope"}, headers=h)
    assert (r.status_code, r.json()) == (404, {"error_code": "RESOURCE_DOES_NOT_EXIST"})
    r = client.request(
        "DELETE", f"{base}/registered-models/delete", json={"name": "team/flow"}, headers=h
    )
    assert (r.status_code, r.json()) == (200, {})
    r = client.get(f"{base}/registered-models/get", params={"name": "team/flow"}, headers=h)
    assert r.status_code == 404


def test_search_pagination_and_filter(
    world: World, client: httpx.Client, ml: tuple[str, dict[str, str]]
) -> None:
    base, h = ml
    for i in range(5):
        client.post(f"{base}/registered-models/create", json={"name": f"srch-{i}"}, headers=h)
    names: list[str] = []
    token = None
    pages = 0
    while True:
        params = {"max_results": "2", "filter": "name='srch-'"}
        if token:
            params["page_token"] = token
        body = client.get(f"{base}/registered-models/search", params=params, headers=h).json()
        names += [m["name"] for m in body["registered_models"]]
        token = body["next_page_token"]
        pages += 1
        if token is None:
            break
    assert names == [f"srch-{i}" for i in range(5)] and pages == 3
    assert "next_page_token" in body and body["next_page_token"] is None
    r = client.get(f"{base}/registered-models/search", params={"filter": "name = 'x'"}, headers=h)
    assert r.status_code == 400 and r.json()["error_code"] == "INVALID_PARAMETER_VALUE"


def test_experiments_and_runs(
    world: World, client: httpx.Client, ml: tuple[str, dict[str, str]]
) -> None:
    base, h = ml
    r = client.post(f"{base}/experiments/create", json={"name": "exp-a"}, headers=h)
    eid = r.json()["experiment_id"]
    assert isinstance(eid, str)
    r = client.post(f"{base}/experiments/create", json={"name": "exp-a"}, headers=h)
    assert (r.status_code, r.json()) == (400, {"error_code": "RESOURCE_ALREADY_EXISTS"})
    e = client.get(f"{base}/experiments/get", params={"experiment_id": eid}, headers=h).json()
    assert e["experiment"] == {
        "experiment_id": eid,
        "name": "exp-a",
        "lifecycle_stage": "active",
        "artifact_location": "not_implemented",
        "tags": [],
    }
    r = client.get(
        f"{base}/experiments/get-by-name", params={"experiment_name": "[model]m"}, headers=h
    )
    assert r.json()["experiment"]["name"] == "[model]m"
    names = [
        x["name"] for x in client.get(f"{base}/experiments/list", headers=h).json()["experiments"]
    ]
    assert "exp-a" in names and "[model]m" in names
    r = client.post(
        f"{base}/runs/create",
        json={"experiment_id": eid, "start_time": 1700000000123, "run_name": "r1"},
        headers=h,
    )
    info = r.json()["run"]["info"]
    iid = world.server.store.candidate(world.priv.id, eid=info["run_id"])["iid"]  # type: ignore[index]
    assert info["artifact_uri"].endswith(
        f"/api/v4/projects/{world.priv.id}/packages/ml_models/candidate:{iid}/files/"
    )
    assert (info["status"], info["start_time"], info["run_name"]) == (
        "RUNNING",
        1700000000123,
        "r1",
    )
    r = client.get(f"{base}/runs/get", params={"run_id": info["run_id"]}, headers=h)
    assert r.json()["run"]["info"]["run_id"] == info["run_id"]
    r = client.post(
        f"{base}/runs/update",
        json={"run_id": info["run_id"], "status": "FINISHED", "end_time": 1700000009999},
        headers=h,
    )
    assert r.json()["run_info"]["status"] == "FINISHED"
    runs = client.post(f"{base}/runs/search", json={"experiment_ids": [eid]}, headers=h).json()
    assert [x["info"]["run_id"] for x in runs["runs"]] == [info["run_id"]]
    assert runs["next_page_token"] is None
    r = client.get(
        f"{base}/runs/get", params={"run_id": "00000000-0000-0000-0000-000000000000"}, headers=h
    )
    assert (r.status_code, r.json()) == (404, {"error_code": "RESOURCE_DOES_NOT_EXIST"})
    # a version's hidden candidate points its artifact_uri at the version's files
    mexp = client.get(
        f"{base}/experiments/get-by-name", params={"experiment_name": "[model]m"}, headers=h
    ).json()["experiment"]["experiment_id"]
    runs = client.post(f"{base}/runs/search", json={"experiment_ids": [mexp]}, headers=h).json()
    uris = [x["info"]["artifact_uri"] for x in runs["runs"]]
    assert any(u.endswith(f"/ml_models/{world.priv.version_id}/files/") for u in uris)


def test_auth_quirks(world: World, client: httpx.Client, ml: tuple[str, dict[str, str]]) -> None:
    base, _ = ml
    url = f"{base}/registered-models/search"
    r = client.get(url, headers={"JOB-TOKEN": world.priv.tokens["job"]})
    assert (r.status_code, r.json()) == (401, {"message": "401 Unauthorized"})
    r = client.get(url, headers={"Authorization": f"Bearer {world.priv.tokens['job']}"})
    assert r.status_code == 401
    assert client.get(url).status_code == 401  # anonymous
    r = client.get(url, headers={"Authorization": f"Bearer {world.priv.tokens['guest']}"})
    assert r.status_code == 200
    # write without permission: 401, not 403
    r = client.post(
        f"{base}/registered-models/create",
        json={"name": "nope"},
        headers={"PRIVATE-TOKEN": world.priv.tokens["reporter"]},
    )
    assert (r.status_code, r.json()) == (401, {"message": "401 Unauthorized"})
    r = client.get(url, headers={"PRIVATE-TOKEN": world.priv.tokens["outsider"]})
    assert (r.status_code, r.json()) == (404, {"message": "404 Project Not Found"})
    # POST read endpoints need the api scope
    r = client.post(
        f"{base}/runs/search",
        json={"experiment_ids": ["1"]},
        headers={"PRIVATE-TOKEN": world.priv.tokens["read_api"]},
    )
    assert r.status_code == 403 and r.json()["error"] == "insufficient_scope"
    r = client.get(f"{base}/model-versions/delete", headers=ml[1])
    assert (r.status_code, r.json()) == (404, {"error": "404 Not Found"})


def test_mlflow_artifacts(
    world: World, client: httpx.Client, ml: tuple[str, dict[str, str]]
) -> None:
    base, h = ml
    art = base.replace("/mlflow/api/2.0/mlflow", "/mlflow/api/2.0/mlflow-artifacts/artifacts")
    p = world.priv
    st = world.server.store
    vid = st.create_version(p.id, "m", "5.0.0")
    st.add_file(p.id, vid, "dir/w.bin", b"weights")
    st.add_file(p.id, vid, "sp ace.txt", b"space")
    r = client.get(art, params={"path": str(vid)}, headers=h)
    assert r.json() == {
        "files": [
            {"path": "dir%2Fw.bin", "file_size": 7, "is_dir": False},
            {"path": "sp%20ace.txt", "file_size": 5, "is_dir": False},
        ]
    }
    assert client.get(art, params={"path": f"{vid}/dir"}, headers=h).json() == {"files": []}
    r = client.get(art, params={"path": "999999"}, headers=h)
    assert r.status_code == 404
    assert client.get(f"{art}/{vid}/dir/w.bin", headers=h).content == b"weights"
    # CGI.escape turns the space into '+', which never matches the stored %20
    assert client.get(f"{art}/{vid}/sp%20ace.txt", headers=h).status_code == 404
