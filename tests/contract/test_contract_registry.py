"""One contract for the Registry Protocol (mlregfs/registry/base.py), run against every
implementation (conftest.py: fake, gitlab, faulty). The state each test reads is made through
the Protocol's own writes, so every implementation starts from the same calls."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

import pytest
from contract_backends import Backend

from mlregfs.errors import BadRequest, Conflict, NotFound
from mlregfs.registry.types import Candidate, FileOwner, ModelVersion, RemoteFile

# larger than one trio-native small fetch (64 KiB), not a multiple of anything
BLOB = bytes(range(256)) * 1200 + b"tail"
CONFIG = b'{"hidden_size": 768}\n'
# GitLab checks only the last segment of a path against its file-name regex
# ([A-Za-z0-9._+- ]): spaces and '+' are allowed there, unicode only in directories
UNICODE_PATH = "données été/my model+v2.bin"


@dataclass
class World:
    """What `seed` made: model `bert` with two versions (files on 1.0.0), an empty model
    `team/nested-model` and one candidate with one file."""

    v1: ModelVersion
    rc: ModelVersion
    cand: Candidate


async def upload(b: Backend, owner: FileOwner, path: str, data: bytes) -> None:
    await b.registry.upload(owner, path, b.source_file(data), len(data))


async def files_of(b: Backend, owner: FileOwner) -> dict[str, RemoteFile]:
    return {f.path: f for f in await b.registry.list_files(owner)}


async def seed(b: Backend) -> World:
    reg = b.registry
    await reg.create_model("bert")
    await reg.create_model("team/nested-model")
    v1 = await reg.create_version("bert", "1.0.0")
    rc = await reg.create_version("bert", "1.1.0-rc.1")
    await upload(b, v1, "model.bin", BLOB)
    await upload(b, v1, "conf/my config.json", CONFIG)
    await upload(b, v1, UNICODE_PATH, b"unicode dirs")
    cand = await b.add_candidate()
    await upload(b, cand, "ckpt/step 1.pt", b"candidate bytes")
    return World(v1, rc, cand)


@pytest.fixture
async def world(backend: Backend) -> World:
    return await seed(backend)


# -- project and listings ---------------------------------------------------------------------


async def test_project_info(backend: Backend) -> None:
    info = await backend.registry.project()
    assert info.path == backend.project_path
    assert info.visibility == "private"
    assert info.id is not None


async def test_models_with_their_versions(backend: Backend, world: World) -> None:
    models = {m.name: m for m in await backend.registry.list_models()}
    assert set(models) == {"bert", "team/nested-model"}
    assert {v.version for v in models["bert"].versions} == {"1.0.0", "1.1.0-rc.1"}
    assert all(v.model == "bert" and v.id is not None for v in models["bert"].versions)
    assert models["team/nested-model"].versions == ()
    bert = await backend.registry.get_model("bert")
    assert bert.name == "bert" and bert.id == models["bert"].id
    assert {(v.version, v.id) for v in bert.versions} == {
        ("1.0.0", world.v1.id),
        ("1.1.0-rc.1", world.rc.id),
    }


async def test_candidates_exclude_versions(backend: Backend, world: World) -> None:
    """Every version has a hidden candidate on GitLab; only the seeded one is listed."""
    cands = await backend.registry.list_candidates()
    assert [c.iid for c in cands] == [world.cand.iid]


async def test_run_of_a_candidate(backend: Backend, world: World) -> None:
    assert world.cand.eid is not None
    run = await backend.registry.get_run(world.cand.eid)
    assert run.run_id == world.cand.eid


async def test_files_with_sizes_and_sha256(backend: Backend, world: World) -> None:
    files = await files_of(backend, world.v1)
    expected = {"model.bin": BLOB, "conf/my config.json": CONFIG, UNICODE_PATH: b"unicode dirs"}
    assert {p: (f.size, f.sha256) for p, f in files.items()} == {
        p: (len(d), hashlib.sha256(d).hexdigest()) for p, d in expected.items()
    }
    assert all(f.older_ids == () for f in files.values())
    assert await backend.registry.list_files(world.rc) == []


async def test_files_of_a_candidate(backend: Backend, world: World) -> None:
    (f,) = await backend.registry.list_files(world.cand)
    assert (f.path, f.size) == ("ckpt/step 1.pt", len(b"candidate bytes"))
    data = await backend.registry.read_range(world.cand, f, 0, f.size)
    assert bytes(data) == b"candidate bytes"


# -- read_range -------------------------------------------------------------------------------

RANGES = {
    "start": (0, 100),
    "middle": (70_000, 200_001),
    "end": (len(BLOB) - 4, len(BLOB)),
    "whole": (0, len(BLOB)),
    "one byte at the end": (len(BLOB) - 1, len(BLOB)),
}


@pytest.mark.parametrize("where", RANGES)
async def test_read_range_is_exact(backend: Backend, world: World, where: str) -> None:
    start, end = RANGES[where]
    blob = (await files_of(backend, world.v1))["model.bin"]
    data = await backend.registry.read_range(world.v1, blob, start, end)
    assert bytes(data) == BLOB[start:end]
    into = memoryview(bytearray(end - start))
    filled = await backend.registry.read_range(world.v1, blob, start, end, into=into)
    assert filled is into and bytes(into) == BLOB[start:end]
    if backend.name == "gitlab-redirect":  # the parameter means what it says
        assert backend.registry.stats.by_kind.get("read_storage", 0) >= 2


async def test_read_empty_range(backend: Backend, world: World) -> None:
    blob = (await files_of(backend, world.v1))["model.bin"]
    assert bytes(await backend.registry.read_range(world.v1, blob, 5, 5)) == b""


@pytest.mark.parametrize("past", [1, 4096])
async def test_read_past_eof_raises(backend: Backend, world: World, past: int) -> None:
    blob = (await files_of(backend, world.v1))["model.bin"]
    with pytest.raises(ValueError):
        await backend.registry.read_range(world.v1, blob, blob.size - 10, blob.size + past)


async def test_read_inverted_range_raises(backend: Backend, world: World) -> None:
    blob = (await files_of(backend, world.v1))["model.bin"]
    with pytest.raises(ValueError):
        await backend.registry.read_range(world.v1, blob, 100, 50)


# -- writes -----------------------------------------------------------------------------------


async def test_upload_then_list_then_read_back(backend: Backend, world: World) -> None:
    reg = backend.registry
    v2 = await reg.create_version("bert", "2.0.0")
    await reg.authorize_upload(v2, "weights/w 1.bin")
    assert await reg.list_files(v2) == []  # the preflight stores nothing
    data = bytes(reversed(BLOB))
    await upload(backend, v2, "weights/w 1.bin", data)
    (f,) = await reg.list_files(v2)
    assert (f.path, f.size, f.sha256) == (
        "weights/w 1.bin",
        len(data),
        hashlib.sha256(data).hexdigest(),
    )
    assert bytes(await reg.read_range(v2, f, 0, f.size)) == data
    assert {v.version for v in (await reg.get_model("bert")).versions} == {
        "1.0.0",
        "1.1.0-rc.1",
        "2.0.0",
    }


async def test_upload_again_serves_the_newest_copy(backend: Backend, world: World) -> None:
    await upload(backend, world.v1, "conf/my config.json", b"newer")
    conf = (await files_of(backend, world.v1))["conf/my config.json"]
    assert conf.size == 5 and len(conf.older_ids) == 1 and conf.file_id > conf.older_ids[0]
    assert bytes(await backend.registry.read_range(world.v1, conf, 0, 5)) == b"newer"


async def test_delete_an_older_copy(backend: Backend, world: World) -> None:
    await upload(backend, world.v1, "conf/my config.json", b"newer")
    conf = (await files_of(backend, world.v1))["conf/my config.json"]
    await backend.registry.delete_file(replace(conf, file_id=conf.older_ids[0], older_ids=()))
    after = (await files_of(backend, world.v1))["conf/my config.json"]
    assert (after.file_id, after.size, after.older_ids) == (conf.file_id, 5, ())


async def test_delete_the_newest_copy_reveals_the_older(backend: Backend, world: World) -> None:
    await upload(backend, world.v1, "conf/my config.json", b"newer")
    conf = (await files_of(backend, world.v1))["conf/my config.json"]
    await backend.registry.delete_file(conf)
    after = (await files_of(backend, world.v1)).get("conf/my config.json")
    assert after is not None and after.file_id == conf.older_ids[0] and after.size == len(CONFIG)
    assert bytes(await backend.registry.read_range(world.v1, after, 0, after.size)) == CONFIG


async def test_delete_a_file(backend: Backend, world: World) -> None:
    blob = (await files_of(backend, world.v1))["model.bin"]
    assert await backend.registry.may_delete_files()
    await backend.registry.delete_file(blob)
    assert "model.bin" not in await files_of(backend, world.v1)
    with pytest.raises(NotFound):
        await backend.registry.read_range(world.v1, blob, 0, 10)


async def test_delete_a_version(backend: Backend, world: World) -> None:
    await backend.registry.delete_version(world.v1)
    bert = await backend.registry.get_model("bert")
    assert [v.version for v in bert.versions] == ["1.1.0-rc.1"]


async def test_delete_a_model(backend: Backend, world: World) -> None:
    await backend.registry.delete_model("bert")
    assert [m.name for m in await backend.registry.list_models()] == ["team/nested-model"]
    with pytest.raises(NotFound):
        await backend.registry.get_model("bert")


async def test_create_an_existing_model_conflicts(backend: Backend, world: World) -> None:
    with pytest.raises(Conflict):
        await backend.registry.create_model("bert")


async def test_create_an_existing_version_is_refused(backend: Backend, world: World) -> None:
    """GitLab answers 400 INVALID_PARAMETER_VALUE "Version has already been taken" (not
    RESOURCE_ALREADY_EXISTS, as for a model), so this is BadRequest, not Conflict."""
    with pytest.raises(BadRequest, match="already been taken"):
        await backend.registry.create_version("bert", "1.0.0")
    assert len((await backend.registry.get_model("bert")).versions) == 2


# -- refusals: the same exception type everywhere ---------------------------------------------

Case = Callable[[Backend, World], Awaitable[object]]
ABSENT_RUN = "0123456789abcdef0123456789abcdef"


async def _read_deleted(b: Backend, w: World) -> object:
    blob = (await files_of(b, w.v1))["model.bin"]
    await b.registry.delete_file(blob)
    return await b.registry.read_range(w.v1, blob, 0, 10)


async def _delete_version_twice(b: Backend, w: World) -> None:
    await b.registry.delete_version(w.rc)
    await b.registry.delete_version(w.rc)


NOT_FOUND: dict[str, Case] = {
    "get_model": lambda b, w: b.registry.get_model("absent"),
    "get_model is exact": lambda b, w: b.registry.get_model("ber"),
    "delete_model": lambda b, w: b.registry.delete_model("absent"),
    "create_version of a missing model": lambda b, w: b.registry.create_version("absent", "1.0.0"),
    "get_run": lambda b, w: b.registry.get_run(ABSENT_RUN),
    "upload to a missing version": lambda b, w: upload(
        b, ModelVersion("bert", "9.9.9", 999_999, 0.0), "x.bin", b"x"
    ),
    "upload to a missing candidate": lambda b, w: upload(b, Candidate(999_999, 0.0), "x.bin", b"x"),
    "read a deleted file": _read_deleted,
}


async def _delete_version_of_deleted_model(b: Backend, w: World) -> None:
    await b.registry.delete_model("bert")
    await b.registry.delete_version(w.rc)


NOT_FOUND["delete a deleted version"] = _delete_version_twice
NOT_FOUND["delete a version of a deleted model"] = _delete_version_of_deleted_model


@pytest.mark.parametrize("case", NOT_FOUND)
async def test_not_found(backend: Backend, world: World, case: str) -> None:
    with pytest.raises(NotFound):
        await NOT_FOUND[case](backend, world)


async def test_authorize_checks_role_not_owner(backend: Backend, world: World) -> None:
    missing = Candidate(999_999, 0.0)
    await backend.registry.authorize_upload(missing, "x.bin")
    with pytest.raises(NotFound):
        await upload(backend, missing, "x.bin", b"x")


BAD_NAMES: dict[str, Case] = {
    "model name with a space": lambda b, w: b.registry.create_model("my model"),
    "unicode model name": lambda b, w: b.registry.create_model("modèle"),
    "version not semver": lambda b, w: b.registry.create_version("bert", "v1"),
    "unicode file name": lambda b, w: upload(b, w.v1, "modèle.bin", b"x"),
    "file name with a colon": lambda b, w: upload(b, w.v1, "a:b.bin", b"x"),
}


@pytest.mark.parametrize("case", BAD_NAMES)
async def test_names_gitlab_refuses(backend: Backend, world: World, case: str) -> None:
    with pytest.raises(BadRequest):
        await BAD_NAMES[case](backend, world)


async def test_stats_count_requests(backend: Backend, world: World) -> None:
    before = backend.registry.stats.requests
    await backend.registry.list_models()
    assert backend.registry.stats.requests > before
