"""GitLabRegistry against the real embedded registry server (mlregfs.testing)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from mlregfs import testing
from mlregfs.errors import NotFound, Unauthorized
from mlregfs.registry.gitlab import GitLabRegistry
from mlregfs.registry.types import Candidate, ModelVersion

PROJECT = "team/vision"
BLOB = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4 bytes


class World:
    """One running server with a populated project and the tokens to read it."""

    def __init__(self, server: Any) -> None:
        self.server = server
        store = server.store
        store.create_project(PROJECT, "private")
        store.create_project("team/public-one", "public")
        self.token = store.create_token(PROJECT, "developer")
        self.job_token = store.create_token(PROJECT, "developer", kind="job")
        store.create_model(PROJECT, "bert")
        store.create_model(PROJECT, "bert-large")
        store.create_model(PROJECT, "team/nested")
        self.v1 = store.create_version(PROJECT, "bert", "1.0.0")
        self.v2 = store.create_version(PROJECT, "bert", "1.1.0-rc.1")
        self.large = store.create_version(PROJECT, "bert-large", "1.0.0")
        store.add_file(PROJECT, self.v1, "model.bin", BLOB)
        store.add_file(PROJECT, self.v1, "conf/my config+v2.json", b"old")
        store.add_file(PROJECT, self.v1, "conf/my config+v2.json", b"newer")
        store.add_file(PROJECT, self.large, "large-only.bin", b"L")
        self.cand = store.create_candidate(PROJECT, model="bert")
        store.add_file(PROJECT, f"candidate:{self.cand}", "ckpt/step 1.pt", b"candidate bytes")

    def source(self) -> str:
        return f"{self.server.url.rstrip('/')}/{PROJECT}"


def _start(tmp_path: Path, mode: str) -> Iterator[World]:
    with testing.ServerProcess(tmp_path / f"data-{mode}", download_mode=mode) as server:
        yield World(server)


@pytest.fixture(params=["local", "redirect"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    yield from _start(tmp_path, request.param)


@pytest.fixture
def local_world(tmp_path: Path) -> Iterator[World]:
    yield from _start(tmp_path, "local")


@pytest.fixture
async def registry(world: World) -> AsyncIterator[GitLabRegistry]:
    reg = GitLabRegistry(world.source(), world.token, retry=None)
    yield reg
    await reg.aclose()


async def test_project_by_path_and_by_api_url(local_world: World) -> None:
    async with GitLabRegistry(local_world.source(), local_world.token) as reg:
        info = await reg.project()
    assert info.path == PROJECT and info.visibility == "private" and info.id is not None
    api = f"{local_world.server.url.rstrip('/')}/api/v4/projects/{info.id}"
    async with GitLabRegistry(api, local_world.token) as reg:
        assert (await reg.project()).id == info.id


async def test_bad_token_and_anonymous_private(local_world: World) -> None:
    async with GitLabRegistry(local_world.source(), "glpat-not-a-real-token") as reg:
        with pytest.raises(Unauthorized) as info:
            await reg.project()
        assert "not-a-real" not in str(info.value)
    async with GitLabRegistry(local_world.source(), None) as reg:
        with pytest.raises(NotFound):
            await reg.project()


async def test_models_and_versions(registry: GitLabRegistry, world: World) -> None:
    models = {m.name: m for m in await registry.list_models()}
    assert set(models) == {"bert", "bert-large", "team/nested"}
    assert [(v.version, v.id) for v in models["bert"].versions] == [
        ("1.0.0", world.v1),
        ("1.1.0-rc.1", world.v2),
    ]
    assert models["team/nested"].versions == ()
    bert = await registry.get_model("bert")
    assert [v.version for v in bert.versions] == ["1.0.0", "1.1.0-rc.1"]
    with pytest.raises(NotFound):
        await registry.get_model("ber")


async def test_files_decoded_and_deduplicated(registry: GitLabRegistry, world: World) -> None:
    owner = ModelVersion("bert", "1.0.0", id=world.v1, created_at=0)
    files = {f.path: f for f in await registry.list_files(owner)}
    assert set(files) == {"model.bin", "conf/my config+v2.json"}
    conf = files["conf/my config+v2.json"]
    assert conf.size == len(b"newer") and len(conf.older_ids) == 1
    assert conf.file_id > conf.older_ids[0]
    assert files["model.bin"].sha256 == hashlib.sha256(BLOB).hexdigest()
    assert await registry.read_range(owner, conf, 0, conf.size) == b"newer"


async def test_read_ranges(registry: GitLabRegistry, world: World) -> None:
    owner = ModelVersion("bert", "1.0.0", id=world.v1, created_at=0)
    (blob,) = [f for f in await registry.list_files(owner) if f.path == "model.bin"]
    assert blob.size == len(BLOB)
    assert await registry.read_range(owner, blob, 0, blob.size) == BLOB
    assert await registry.read_range(owner, blob, 1000, 300_000) == BLOB[1000:300_000]
    assert await registry.read_range(owner, blob, blob.size - 3, blob.size) == BLOB[-3:]
    assert registry.stats.bytes_downloaded >= blob.size + 299_000 + 3


async def test_candidates(registry: GitLabRegistry, world: World) -> None:
    cands = {c.iid: c for c in await registry.list_candidates()}
    assert world.cand in cands
    cand = cands[world.cand]
    assert cand.package_id is not None
    (f,) = await registry.list_files(cand)
    assert f.path == "ckpt/step 1.pt"
    assert await registry.read_range(cand, f, 0, f.size) == b"candidate bytes"
    assert await registry.list_files(Candidate(iid=9999, created_at=0)) == []


async def test_job_token_uses_packages_only(world: World) -> None:
    async with GitLabRegistry(world.source(), world.job_token, token_kind="job") as reg:
        await reg.project()
        models = {m.name: m for m in await reg.list_models()}
        assert {"bert", "bert-large"} <= set(models)
        version = next(v for v in models["bert"].versions if v.version == "1.0.0")
        assert version.id is None and version.package_id is not None  # packages API only
        files = {f.path: f for f in await reg.list_files(version)}
        blob = files["model.bin"]
        assert await reg.read_range(version, blob, 10, 20) == BLOB[10:20]


async def test_many_models_and_files_paginate(local_world: World) -> None:
    store = local_world.server.store
    for i in range(105):
        store.create_model(PROJECT, f"bulk-{i:03d}")
    v = store.create_version(PROJECT, "bulk-000", "0.1.0")
    for i in range(130):
        store.add_file(PROJECT, v, f"shards/{i:03d}.bin", bytes([i]))
    async with GitLabRegistry(local_world.source(), local_world.token) as reg:
        names = {m.name for m in await reg.list_models()}
        assert len([n for n in names if n.startswith("bulk-")]) == 105
        files = await reg.list_files(ModelVersion("bulk-000", "0.1.0", id=v, created_at=0))
        assert len(files) == 130
        assert reg.stats.by_kind["list_files"] >= 3  # lookup + two package_files pages


async def test_hidden_package_listed_via_mlflow_artifacts(world: World) -> None:
    store = world.server.store
    v = store.create_version(PROJECT, "bert", "3.0.0")
    store.add_file(PROJECT, v, "sub dir/h.bin", b"hidden bytes", status="hidden")
    owner = ModelVersion("bert", "3.0.0", id=v, created_at=0)
    async with GitLabRegistry(world.source(), world.token) as reg:
        (f,) = await reg.list_files(owner)
        assert (f.path, f.size, f.sha256, f.file_id) == ("sub dir/h.bin", 12, None, 0)
        assert await reg.read_range(owner, f, 7, 12) == b"bytes"


async def test_signed_url_reused_and_resigned_when_storage_refuses(tmp_path: Path) -> None:
    with testing.ServerProcess(tmp_path / "data", download_mode="redirect") as server:
        w = World(server)
        owner = ModelVersion("bert", "1.0.0", id=w.v1, created_at=0)
        async with GitLabRegistry(w.source(), w.token) as reg:
            (blob,) = [f for f in await reg.list_files(owner) if f.path == "model.bin"]
            assert await reg.read_range(owner, blob, 0, 10) == BLOB[:10]
            assert await reg.read_range(owner, blob, 10, 20) == BLOB[10:20]
            assert (reg.stats.by_kind["read"], reg.stats.by_kind["read_storage"]) == (1, 2)
            # Spoil the cached signature: the real storage listener answers 403 and the
            # client must go back to GitLab for a fresh URL, without a backoff retry.
            ((key, (url, expiry)),) = reg._transfer.signed.items()
            spoiled = url.replace("X-Amz-Signature=", "X-Amz-Signature=0")
            reg._transfer.signed[key] = (spoiled, expiry)
            assert await reg.read_range(owner, blob, 20, 30) == BLOB[20:30]
            assert (reg.stats.by_kind["read"], reg.stats.by_kind["read_storage"]) == (2, 4)
            assert reg.stats.retries == 0
