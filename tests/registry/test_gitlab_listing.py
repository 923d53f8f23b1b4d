"""GitLabRegistry metadata calls: project, models, candidates, files; uploads over a socket."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from registry_fake import JOB_TOKEN, PROJECT_ID, TOKEN, FakeFile, FakeGitLab
from wire import WireServer

from mlregfs.errors import Forbidden, NotFound, TooLarge, Unauthorized
from mlregfs.registry.base import Registry
from mlregfs.registry.gitlab import GitLabRegistry, decode_file_name
from mlregfs.registry.types import Candidate, ModelVersion

Make = Callable[..., GitLabRegistry]


def _refuse(request: httpx.Request) -> httpx.Response:
    return httpx.Response(403, json={"error": "insufficient_scope"})


def test_satisfies_the_registry_protocol() -> None:
    reg: Registry = GitLabRegistry("https://h/g/p")  # mypy checks the assignment
    assert isinstance(reg.stats.by_kind, dict)


# ---------------------------------------------------------------------------- project


async def test_project_resolves_path_and_then_uses_the_numeric_id(
    gitlab: FakeGitLab, make_registry: Make
) -> None:
    reg = make_registry()
    info = await reg.project()
    assert (info.id, info.path, info.visibility) == (PROJECT_ID, "group/proj", "private")
    assert gitlab.requests[0].url.raw_path == b"/api/v4/projects/group%2Fproj"
    assert gitlab.requests[0].headers["PRIVATE-TOKEN"] == TOKEN
    assert "Authorization" not in gitlab.requests[0].headers
    await reg.list_models()
    assert gitlab.requests[-1].url.path.startswith(f"/api/v4/projects/{PROJECT_ID}/")
    assert reg.stats.by_kind["project"] == 1  # resolved once per session


async def test_relative_root_found_by_trying_splits(
    gitlab: FakeGitLab, make_registry: Make
) -> None:
    seen: list[bytes] = []

    def relative_root(request: httpx.Request) -> httpx.Response:
        path = request.url.raw_path.decode()
        seen.append(request.url.raw_path)
        if path.startswith("/gitlab/api/v4/"):
            request.url = request.url.copy_with(raw_path=path[len("/gitlab") :].encode())
            return gitlab.handle(request)
        return httpx.Response(404, json={"message": "404 Project Not Found"})

    reg = GitLabRegistry(
        "https://gitlab.example/gitlab/group/proj",
        TOKEN,
        transport=httpx.MockTransport(relative_root),
    )
    info = await reg.project()
    assert info.id == PROJECT_ID
    assert seen == [
        b"/api/v4/projects/gitlab%2Fgroup%2Fproj",
        b"/gitlab/api/v4/projects/group%2Fproj",
    ]
    await reg.list_models()
    assert seen[-1].startswith(b"/gitlab/api/v4/projects/7/")
    await reg.aclose()


async def test_unknown_project_is_notfound_with_a_clear_message(
    gitlab: FakeGitLab, make_registry: Make
) -> None:
    reg = make_registry(f"{gitlab.origin}/group/other")
    with pytest.raises(NotFound, match=r"group/other not found .* not visible with this token"):
        await reg.project()


async def test_bad_token_is_unauthorized_and_never_echoed(
    gitlab: FakeGitLab, make_registry: Make
) -> None:
    reg = make_registry(token="glpat-WRONG-secret")
    with pytest.raises(Unauthorized, match="token refused") as info:
        await reg.project()
    assert "WRONG" not in str(info.value)
    assert "WRONG" not in repr(reg)


async def test_403_on_project_is_forbidden(gitlab: FakeGitLab, make_registry: Make) -> None:
    gitlab.fail(r"/projects/[^/]+$", _refuse)
    with pytest.raises(Forbidden):
        await make_registry().project()


async def test_anonymous_public_project(gitlab: FakeGitLab, make_registry: Make) -> None:
    gitlab.visibility = "public"
    gitlab.add_version("m", "1.0.0")
    reg = make_registry(token=None)
    assert (await reg.project()).visibility == "public"
    models = await reg.list_models()
    assert [m.name for m in models] == ["m"]
    assert not any("mlflow" in p for p in gitlab.paths())  # MLflow always 401s for anonymous
    for r in gitlab.requests:
        assert not {"PRIVATE-TOKEN", "JOB-TOKEN", "Authorization"} & set(r.headers)


async def test_job_token_probes_packages_when_project_entity_refused(
    gitlab: FakeGitLab, make_registry: Make
) -> None:
    gitlab.add_version("m", "1.0.0")
    reg = make_registry(token=JOB_TOKEN, token_kind="job")
    info = await reg.project()
    assert info.id is None and info.path == "group/proj"
    probe = gitlab.requests[1]
    assert probe.url.raw_path == b"/api/v4/projects/group%2Fproj/packages?per_page=1"
    assert probe.url.params["per_page"] == "1"
    assert probe.headers["JOB-TOKEN"] == JOB_TOKEN
    assert "PRIVATE-TOKEN" not in probe.headers
    # Packages-only strategy from the start: MLflow refuses job tokens.
    models = await reg.list_models()
    assert models[0].versions[0].id is None
    assert not any("mlflow" in p for p in gitlab.paths())
    assert all(r.url.raw_path.startswith(b"/api/v4/projects/group%2Fproj") for r in gitlab.requests)


# ---------------------------------------------------------------------------- models


async def test_list_models_via_mlflow_across_pages(gitlab: FakeGitLab, make_registry: Make) -> None:
    gitlab.mlflow_page_size = 40  # force several keyset pages
    for i in range(105):
        gitlab.add_model(f"model-{i:03d}")
    gitlab.add_version("model-000", "1.0.0")
    mv = gitlab.add_version("model-000", "1.1.0-rc.1+build.5")
    models = await make_registry().list_models()
    assert len(models) == 105
    assert len({m.name for m in models}) == 105
    m0 = next(m for m in models if m.name == "model-000")
    assert m0.id == gitlab.models["model-000"]  # parsed from the version's web URL
    assert [(v.version, v.id) for v in m0.versions] == [
        ("1.0.0", mv - 2),
        ("1.1.0-rc.1+build.5", mv),
    ]
    assert m0.versions[1].created_at == 1_700_000_000 + mv  # seconds, not ms
    searches = [r for r in gitlab.requests if r.url.path.endswith("registered-models/search")]
    assert len(searches) == 3
    assert searches[0].url.params["max_results"] == "1000"
    assert "page_token" not in searches[0].url.params
    assert searches[1].url.params["page_token"] == "40"


async def test_mlflow_version_is_kept_only_with_an_id_and_a_semver_alias(
    gitlab: FakeGitLab, make_registry: Make
) -> None:
    def odd(request: httpx.Request) -> httpx.Response:
        versions = [
            {"version": "5", "aliases": ["not-semver"], "creation_timestamp": 1},
            {"version": "7", "aliases": ["2.0.0-rc.1"], "creation_timestamp": 1},
            {"version": "6", "aliases": [], "creation_timestamp": 1},
            {"version": "x", "aliases": ["1.0.0"]},
            None,
        ]
        return httpx.Response(
            200,
            json={
                "registered_models": [
                    {"name": "m", "creation_timestamp": 1, "latest_versions": versions}
                ],
                "next_page_token": None,
            },
        )

    gitlab.fail("registered-models/search", odd)
    models = await make_registry().list_models()
    assert [v.version for v in models[0].versions] == ["2.0.0-rc.1"]  # issue 9.3


async def test_mlflow_refused_falls_back_to_packages_once_per_session(
    gitlab: FakeGitLab, make_registry: Make
) -> None:
    gitlab.mlflow_enabled = False
    gitlab.add_version("bert", "1.0.0")
    gitlab.add_version("bert", "1.2.0")
    gitlab.add_package("bert", "candidate_3")
    gitlab.add_package("ml_experiment_1", "candidate_4")
    gitlab.add_package("only-candidates", "candidate_5")
    reg = make_registry()
    for _ in range(2):
        models = await reg.list_models()
        assert [m.name for m in models] == ["bert", "only-candidates"]
        assert [v.version for v in models[0].versions] == ["1.0.0", "1.2.0"]
        assert all(v.id is None and v.package_id for v in models[0].versions)
        assert models[1].versions == ()
    assert sum("mlflow" in p for p in gitlab.paths()) == 1


async def test_packages_listing_follows_pages(gitlab: FakeGitLab, make_registry: Make) -> None:
    gitlab.mlflow_enabled = False
    for i in range(230):
        gitlab.add_package(f"m{i:03d}", "1.0.0")
    models = await make_registry().list_models()
    assert len(models) == 230
    pages = [r.url.params["page"] for r in gitlab.requests if r.url.path.endswith("/packages")]
    assert pages == ["1", "2", "3"]
    assert all(
        r.url.params["per_page"] == "100" and r.url.params["package_type"] == "ml_model"
        for r in gitlab.requests
        if r.url.path.endswith("/packages")
    )


async def test_get_model_exact_via_mlflow(gitlab: FakeGitLab, make_registry: Make) -> None:
    gitlab.add_version("team/bert", "2.0.0")
    reg = make_registry()
    model = await reg.get_model("team/bert")
    assert model.name == "team/bert" and model.versions[0].version == "2.0.0"
    with pytest.raises(NotFound, match="'bert' not found"):
        await reg.get_model("bert")
    # A RESOURCE_DOES_NOT_EXIST answer is a real miss, not a reason to abandon MLflow.
    assert not any(r.url.path.endswith("/packages") for r in gitlab.requests)


async def test_get_model_fallback_filters_fuzzy_package_search(
    gitlab: FakeGitLab, make_registry: Make
) -> None:
    gitlab.mlflow_enabled = False
    gitlab.add_version("bert", "1.0.0")
    gitlab.add_version("bert-large", "9.0.0")
    gitlab.add_version("distilbert", "3.0.0")
    reg = make_registry()
    model = await reg.get_model("bert")
    assert model.name == "bert"
    assert [v.version for v in model.versions] == ["1.0.0"]
    search = [r for r in gitlab.requests if r.url.path.endswith("/packages")][-1]
    assert search.url.params["package_name"] == "bert"
    with pytest.raises(NotFound):
        await reg.get_model("ber")


# ---------------------------------------------------------------------------- candidates


def _run(
    iid: int | None, *, mv: int | None = None, name: str = "run", start: int = 0
) -> dict[str, Any]:
    uri = (
        f"https://gitlab.example/api/v4/projects/7/packages/ml_models/candidate:{iid}/files/"
        if iid is not None
        else f"https://gitlab.example/api/v4/projects/7/packages/ml_models/{mv}/files/"
    )
    return {
        "info": {
            "run_id": f"uuid-{iid or mv}",
            "run_name": name,
            "start_time": start,
            "artifact_uri": uri,
            "lifecycle_stage": "active",
        },
        "data": {},
    }


async def test_candidates_via_mlflow_merged_with_packages(
    gitlab: FakeGitLab, make_registry: Make
) -> None:
    gitlab.mlflow_page_size = 2
    gitlab.runs = {
        "1": [_run(1, start=1_700_000_000_123), _run(2), _run(None, mv=55), _run(3)],
        "2": [_run(9, name="newer")],
        "3": [],
    }
    pkg2 = gitlab.add_package("ml_experiment_1", "candidate_2")
    pkg7 = gitlab.add_package("bert", "candidate_7")  # package but no run seen
    gitlab.add_package("bert", "1.0.0")
    cands = await make_registry().list_candidates()
    assert [c.iid for c in cands] == [1, 2, 3, 7, 9]
    by = {c.iid: c for c in cands}
    assert by[1].created_at == pytest.approx(1_700_000_000.123)  # ms -> s
    assert by[1].eid == "uuid-1" and by[1].package_id is None
    assert by[2].package_id == pkg2.id and by[2].created_at > 0  # start_time 0 -> package time
    assert by[7].package_id == pkg7.id and by[7].eid is None
    assert by[9].name == "newer"
    runs = [r for r in gitlab.requests if r.url.path.endswith("runs/search")]
    assert len(runs) == 2 + 1 + 1  # experiment 1 spans two pages
    exps = [r for r in gitlab.requests if r.url.path.endswith("experiments/search")]
    assert len(exps) == 2


async def test_candidates_fall_back_to_packages_when_runs_refused(
    gitlab: FakeGitLab, make_registry: Make
) -> None:
    gitlab.fail("experiments/search", _refuse)
    gitlab.fail("experiments/list", _refuse)
    gitlab.add_package("bert", "candidate_4")
    reg = make_registry()
    assert [c.iid for c in await reg.list_candidates()] == [4]
    assert [c.iid for c in await reg.list_candidates()] == [4]
    assert sum("mlflow" in p for p in gitlab.paths()) == 2  # not asked again


async def test_candidates_use_experiments_list_when_search_is_missing(
    gitlab: FakeGitLab, make_registry: Make
) -> None:
    gitlab.runs = {"1": [_run(5)]}
    gitlab.fail(
        "experiments/search", lambda r: httpx.Response(404, json={"error": "404 Not Found"})
    )
    gitlab.fail(
        "experiments/list",
        lambda r: httpx.Response(200, json={"experiments": [{"experiment_id": "1", "name": "e"}]}),
    )
    assert [c.iid for c in await make_registry().list_candidates()] == [5]


# ---------------------------------------------------------------------------- files


async def test_list_files_pages_decodes_and_dedupes(
    gitlab: FakeGitLab, make_registry: Make
) -> None:
    mv = gitlab.add_version("bert", "1.0.0")
    pkg = gitlab.packages[-1]
    for i in range(150):
        gitlab.add_file(pkg, f"shards/part-{i:03d}.bin", b"x" * i)
    first = gitlab.add_file(pkg, "conf/my config+v2.json", b"old")
    gitlab.add_file(pkg, "README.md", b"r")
    second = gitlab.add_file(pkg, "conf/my config+v2.json", b"newer")
    reg = make_registry()
    owner = ModelVersion("bert", "1.0.0", id=mv, created_at=0)
    files = await reg.list_files(owner)
    assert len(files) == 152
    conf = next(f for f in files if f.path.startswith("conf/"))
    assert conf.path == "conf/my config+v2.json"
    assert (conf.file_id, conf.older_ids, conf.size) == (second.id, (first.id,), 5)
    assert conf.sha256 == hashlib.sha256(second.data).hexdigest() and conf.package_id == pkg.id
    assert conf.created_at > 1_700_000_000
    assert first.file_name == "conf%2Fmy%20config%2Bv2.json"
    lookups = [r for r in gitlab.requests if r.url.path.endswith("/packages")]
    assert lookups[0].url.params["package_name"] == "bert"
    assert lookups[0].url.params["package_version"] == "1.0.0"
    listing = [r for r in gitlab.requests if r.url.path.endswith("/package_files")]
    assert [r.url.params["page"] for r in listing] == ["1", "2"]
    assert listing[0].url.params["order_by"] == "id" and listing[0].url.params["sort"] == "asc"
    # The package id is remembered: a second listing skips the lookup.
    before = len(lookups)
    await reg.list_files(owner)
    assert len([r for r in gitlab.requests if r.url.path.endswith("/packages")]) == before


async def test_list_files_exact_name_match_for_fuzzy_lookup(
    gitlab: FakeGitLab, make_registry: Make
) -> None:
    gitlab.add_version("bert-large", "1.0.0")
    gitlab.add_file(gitlab.packages[-1], "wrong.bin", b"no")
    mv = gitlab.add_version("bert", "1.0.0")
    gitlab.add_file(gitlab.packages[-1], "right.bin", b"yes")
    files = await make_registry().list_files(ModelVersion("bert", "1.0.0", id=mv, created_at=0))
    assert [f.path for f in files] == ["right.bin"]


async def test_list_files_without_package_is_empty(gitlab: FakeGitLab, make_registry: Make) -> None:
    mv = gitlab.add_version("bert", "1.0.0", package=False)
    reg = make_registry()
    assert await reg.list_files(ModelVersion("bert", "1.0.0", id=mv, created_at=0)) == []
    assert await reg.list_files(Candidate(iid=42, created_at=0)) == []


async def test_list_files_of_candidate_by_package_version(
    gitlab: FakeGitLab, make_registry: Make
) -> None:
    pkg = gitlab.add_package("ml_experiment_3", "candidate_12")
    gitlab.add_file(pkg, "model.pkl", b"abc")
    files = await make_registry().list_files(Candidate(iid=12, created_at=0))
    assert [(f.path, f.package_id) for f in files] == [("model.pkl", pkg.id)]
    lookup = next(r for r in gitlab.requests if r.url.path.endswith("/packages"))
    assert lookup.url.params["package_version"] == "candidate_12"
    assert "package_name" not in lookup.url.params


async def test_a_sweep_lists_all_packages_once(
    gitlab: FakeGitLab, make_registry: Make, sleeps: Any
) -> None:
    """`ls -lR`: after a few package lookups in a row, one listing of all packages (a page per
    100) answers the rest, so each version costs its package_files request only."""
    owners = []
    for i in range(250):
        mv = gitlab.add_version(f"m{i:03d}", "1.0.0")
        gitlab.add_file(gitlab.packages[-1], "w.bin", bytes([i]))
        owners.append(ModelVersion(f"m{i:03d}", "1.0.0", id=mv, created_at=0))
    cand = gitlab.add_package("ml_experiment_1", "candidate_7")
    gitlab.add_file(cand, "c.bin", b"c")
    reg = make_registry()
    for i, owner in enumerate(owners):
        [f] = await reg.list_files(owner)
        assert f.path == "w.bin" and f.size == 1 and f.package_id == gitlab.packages[i].id
    assert [f.path for f in await reg.list_files(Candidate(iid=7, created_at=0))] == ["c.bin"]
    lookups = [r for r in gitlab.requests if r.url.path.endswith("/packages")]
    targeted = [r for r in lookups if "package_version" in r.url.params]
    assert len(targeted) == 2  # before the sweep was recognised
    assert len(lookups) - len(targeted) == 3  # 251 packages: three pages, once
    files = [r for r in gitlab.requests if r.url.path.endswith("/package_files")]
    assert len(files) == 251
    # a version published after the index was made is still found (targeted query)
    mv = gitlab.add_version("late", "1.0.0")
    gitlab.add_file(gitlab.packages[-1], "x.bin", b"x")
    assert [f.path for f in await reg.list_files(ModelVersion("late", "1.0.0", mv, 0))] == ["x.bin"]
    # a package deleted since the index: looked up again, not listed through mlflow-artifacts
    sleeps.now += 31  # the index is rebuilt for the next sweep
    for owner in owners[:3]:
        await reg.list_files(owner)
    gone = gitlab.packages[10]
    gitlab.packages.remove(gone)
    assert await reg.list_files(owners[10]) == []


async def test_list_files_uses_known_package_id(gitlab: FakeGitLab, make_registry: Make) -> None:
    pkg = gitlab.add_package("bert", "1.0.0")
    gitlab.add_file(pkg, "a.bin", b"a")
    owner = ModelVersion("bert", "1.0.0", id=None, created_at=0, package_id=pkg.id)
    files = await make_registry().list_files(owner)
    assert [f.path for f in files] == ["a.bin"]
    assert not any(r.url.path.endswith("/packages") for r in gitlab.requests)


async def test_hidden_package_listed_through_mlflow_artifacts(
    gitlab: FakeGitLab, make_registry: Make
) -> None:
    mv = gitlab.add_version("bert", "1.0.0", package=False)
    pkg = gitlab.add_package("bert", "1.0.0", hidden=True)
    gitlab.add_file(pkg, "dir/w eights.bin", b"12345")
    files = await make_registry().list_files(ModelVersion("bert", "1.0.0", id=mv, created_at=0))
    assert [(f.path, f.size, f.sha256, f.file_id, f.package_id) for f in files] == [
        ("dir/w eights.bin", 5, None, 0, pkg.id)
    ]
    statuses = [
        r.url.params.get("status") for r in gitlab.requests if r.url.path.endswith("/packages")
    ]
    assert statuses == [None, "hidden"]
    art = gitlab.requests[-1]
    assert art.url.path.endswith("/mlflow-artifacts/artifacts") and art.url.params["path"] == str(
        mv
    )


async def test_hidden_package_with_job_token_is_empty(
    gitlab: FakeGitLab, make_registry: Make
) -> None:
    mv = gitlab.add_version("bert", "1.0.0", package=False)
    gitlab.add_file(gitlab.add_package("bert", "1.0.0", hidden=True), "a", b"a")
    reg = make_registry(token=JOB_TOKEN, token_kind="job")
    assert await reg.list_files(ModelVersion("bert", "1.0.0", id=mv, created_at=0)) == []


async def test_unsafe_stored_names_are_skipped(gitlab: FakeGitLab, make_registry: Make) -> None:
    pkg = gitlab.add_package("ml_experiment_1", "candidate_1")
    for stored in (
        "..%2Fetc%2Fpasswd",
        "a%2F%2Fb",
        "a%2F.%2Fb",
        "nul%00x",
        "%2Fabs",
        "bad%FF",
        "ok%2Fdeep%2Ffile.txt",
    ):
        gitlab.files.append(FakeFile(gitlab.new_id(), pkg.id, stored, b"z"))
    files = await make_registry().list_files(Candidate(iid=1, created_at=0))
    assert [f.path for f in files] == ["ok/deep/file.txt"]


@pytest.mark.parametrize(
    ("stored", "path"),
    [
        ("my_dir%2Fmodel.bin", "my_dir/model.bin"),
        ("Mo_de-l%20v12.md5", "Mo_de-l v12.md5"),
        ("a%2Bb+c", "a+b+c"),  # a raw `+` is a plus, not a space
        ("caf%C3%A9.txt", "café.txt"),
        ("..", None),
        ("x%2F..%2Fy", None),
        ("", None),
    ],
)
def test_decode_file_name(stored: str, path: str | None) -> None:
    assert decode_file_name(stored) == path


async def test_upload_is_one_raw_body_put_with_bearer(tmp_path: Path) -> None:
    """Authorize preflight and upload: raw body, Content-Length, only the Bearer header."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        seen.append(request)
        if request.method == "GET":  # the project lookup
            return httpx.Response(200, json={"id": 7, "path_with_namespace": "g/p"})
        if request.url.path.endswith("/authorize"):
            return httpx.Response(200, json={"TempPath": "/tmp"})
        return httpx.Response(201, json={"message": "201 Created"})

    src = tmp_path / "payload"
    src.write_bytes(b"x" * 3_000_000)
    with WireServer(handler) as server:
        reg = GitLabRegistry(f"{server.url}/g/p", TOKEN)
        mv = ModelVersion("m", "1.0.0", id=1001, created_at=0)
        await reg.authorize_upload(mv, "dir/a b+.bin")
        await reg.upload(mv, "dir/a b+.bin", src, 3_000_000)
        await reg.aclose()
    assert reg._api.bytes.sent["upload"] == 1  # the production byte path, over a socket
    auth, put = seen[-2], seen[-1]
    assert auth.method == put.method == "PUT"
    assert auth.url.raw_path.decode() == (
        "/api/v4/projects/7/packages/ml_models/1001/files/dir/a%20b%2B.bin/authorize"
    )
    assert put.headers["Content-Length"] == "3000000" and put.content == src.read_bytes()
    assert put.headers["Authorization"] == f"Bearer {TOKEN}" and "PRIVATE-TOKEN" not in put.headers
    assert reg.stats.bytes_uploaded == 3_000_000


async def test_upload_failure_maps_to_errors(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":  # the project lookup
            return httpx.Response(200, json={"id": 7, "path_with_namespace": "g/p"})
        request.read()
        return httpx.Response(400, json={"message": "400 Bad request - Artifact file is too large"})

    src = tmp_path / "payload"
    src.write_bytes(b"x")
    with WireServer(handler) as server:
        reg = GitLabRegistry(f"{server.url}/g/p", TOKEN)
        with pytest.raises(TooLarge):
            await reg.upload(ModelVersion("m", "1.0.0", id=1, created_at=0), "a", src, 1)
        with pytest.raises(Forbidden, match="job tokens"):  # no version id: clear refusal
            await reg.upload(ModelVersion("m", "1.0.0", id=None, created_at=0), "a", src, 1)
        await reg.aclose()
