"""Semver alias links and registry metadata (xattrs), driven without a kernel."""

from __future__ import annotations

import json
import os

import pytest
import trio
import trio.testing

from mlregfs.cache.blocks import BlockStore
from mlregfs.cache.meta import MetadataCache
from mlregfs.cache.reader import DataCache
from mlregfs.errors import (
    AttributeTooLarge,
    NoAttribute,
    NotPermitted,
    RegistryUnavailable,
)
from mlregfs.fs.aliases import semver_aliases
from mlregfs.fs.core import RECHECK_AFTER, ROOT_INO, Filesystem
from mlregfs.fs.tree import model_dir_entries
from mlregfs.registry import validate
from mlregfs.registry.fake import InMemoryRegistry
from mlregfs.registry.runs import run_from_mlflow
from mlregfs.registry.types import Metric, Model, ModelVersion, Run
from mlregfs.spool import Spool

BS = 64 << 10
RUN = "0f3c9a8e-6f1d-4a43-9b7e-2d5c8f1e0a11"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def reg() -> InMemoryRegistry:
    r = InMemoryRegistry()
    for v in ("1.0.0", "1.2.0", "10.1.3", "10.2.0-alpha", "2.0.0-rc.1"):
        r.add_version("resnet", v)
    bert = r.add_version("bert", "0.1.0", description="first\nline two", run_id=RUN)
    r.add_file(bert, "w.bin", os.urandom(3 * BS + 5))
    r.runs[RUN] = Run(
        RUN,
        "FINISHED",
        "4",
        "train-1",
        1.0,
        2.0,
        params=(("lr", "0.01"), ("epochs", "3")),
        metrics=(
            Metric("loss", 0.9, 0, 10.0),
            Metric("loss", 0.2, 2, 12.0),
            Metric("loss", 0.5, 1, 13.0),
            Metric("acc", 0.7, 0, 10.0),
        ),
        tags=(("mlflow.source.name", "train.py"),),
    )
    r.add_version("nested", "1.0.0")
    r.add_version("nested/latest", "0.0.1")  # a real entry named like a link wins
    r.add_version("nested/1", "0.0.1")
    return r


@pytest.fixture
def fs(reg: InMemoryRegistry, clock: Clock, tmp_path) -> Filesystem:
    data = DataCache(BlockStore(tmp_path / "blocks", 64 * BS), block_size=BS, readahead=0)
    spool = Spool(tmp_path / "spool")
    return Filesystem(reg, data, source_id="test", meta=MetadataCache(clock=clock), spool=spool)


async def walk(fs: Filesystem, path: str) -> int:
    ino = ROOT_INO
    for part in [p for p in path.split("/") if p]:
        ino = (await fs.lookup(ino, part)).ino
    return ino


# -- aliases (README Semantics 47) ---------------------------------------------------------
def test_aliases_pick_the_highest_release_of_each_range() -> None:
    got = semver_aliases(["1.0.0", "1.2.0", "9.0.0", "10.1.3", "10.2.0-alpha", "2.0.0-rc.1"])
    assert got == {
        "latest": "10.1.3",  # 10 > 9 numerically, the prerelease 10.2.0-alpha is skipped
        "1": "1.2.0",
        "1.0": "1.0.0",
        "1.2": "1.2.0",
        "9": "9.0.0",
        "9.0": "9.0.0",
        "10": "10.1.3",
        "10.1": "10.1.3",
    }  # no "2", "10.2": those ranges hold only prereleases
    assert semver_aliases(["1.0.0-rc.1"]) == {}
    assert semver_aliases([]) == {}


def test_build_metadata_does_not_order_and_the_answer_is_stable() -> None:
    a = semver_aliases(["1.0.0+b2", "1.0.0+b1", "0.9.0"])
    assert a == semver_aliases(["0.9.0", "1.0.0+b1", "1.0.0+b2"])
    assert a["latest"] in ("1.0.0+b1", "1.0.0+b2")


def test_real_entries_win_over_links() -> None:
    models = {
        "m": Model("m", 1, 0.0, (ModelVersion("m", "1.0.0", 2, 0.0),)),
        "m/latest": Model("m/latest", 3, 0.0, (ModelVersion("m/latest", "0.1.0", 4, 0.0),)),
    }
    e = model_dir_entries(models, "m")
    assert e is not None
    assert e.subdirs == {"latest"}
    assert e.aliases == {"1": "1.0.0", "1.0": "1.0.0"}


async def test_links_resolve_relative_and_follow_new_releases(
    fs: Filesystem, reg: InMemoryRegistry, clock: Clock
) -> None:
    resnet = await walk(fs, "models/resnet")
    names = [n for n, _ in await fs.readdir(resnet)]
    assert names == [
        "1", "1.0", "1.0.0", "1.2", "1.2.0", "10", "10.1", "10.1.3", "10.2.0-alpha",
        "2.0.0-rc.1", "latest",
    ]  # fmt: skip
    latest = await fs.lookup(resnet, "latest")
    assert not latest.is_dir and latest.link == "10.1.3" and latest.size == len("10.1.3")
    assert latest.mode(True) & 0o170000 == 0o120000  # S_IFLNK
    assert await fs.readlink(latest.ino) == "10.1.3"
    assert await fs.readlink((await fs.lookup(resnet, "1")).ino) == "1.2.0"
    # a new patch: a direct lookup sees it once the listing is RECHECK_AFTER old
    reg.add_version("resnet", "10.1.4")
    clock.now += 1
    assert (await fs.lookup(resnet, "10")).link == "10.1.3"  # listing 1 s old: kept
    clock.now += 2
    listings = reg.stats.by_kind["list_models"]
    assert (await fs.lookup(resnet, "10")).link == "10.1.4"
    assert await fs.readlink(latest.ino) == "10.1.4"
    # one request for that model, not the whole listing; at most one per RECHECK_AFTER
    assert reg.stats.by_kind["list_models"] == listings
    assert reg.stats.by_kind["get_model"] == 1
    await fs.lookup(resnet, "latest")
    assert reg.stats.by_kind["get_model"] == 1
    # during an outage the links keep their last known target
    reg.add_version("resnet", "10.1.5")
    reg.down = True
    clock.now += 3
    assert (await fs.lookup(resnet, "latest")).link == "10.1.4"
    reg.down = False
    clock.now += 12  # past the back-off (outage grace, then RECHECK_AFTER)
    assert (await fs.lookup(resnet, "latest")).link == "10.1.5"
    # links are the mount's: not removable, not renamable, not openable
    with pytest.raises(NotPermitted):
        await fs.unlink(resnet, "latest")
    version = await walk(fs, "models/resnet/1.0.0")
    with pytest.raises(NotPermitted):
        await fs.rename(resnet, "latest", version, "x")
    with pytest.raises(NotPermitted):
        await fs.open(latest.ino, os.O_RDONLY)


async def test_nested_models_named_like_links_win(fs: Filesystem) -> None:
    nested = await walk(fs, "models/nested")
    kids = {n: a for n, a in await fs.readdir(nested)}
    assert set(kids) == {"1", "1.0", "1.0.0", "latest"}
    assert kids["latest"].is_dir and kids["latest"].link is None
    assert kids["1"].is_dir and kids["1"].link is None
    assert kids["1.0"].link == "1.0.0"


# -- xattrs (README "Registry metadata") -----------------------------------------------------
async def test_file_xattrs_and_cached_bytes(fs: Filesystem, reg: InMemoryRegistry) -> None:
    ino = await walk(fs, "models/bert/0.1.0/w.bin")
    names = await fs.xattr_names(ino)
    assert names == sorted(
        [
            "user.gitlab.created_at",
            "user.gitlab.file_id",
            "user.gitlab.package_id",
            "user.gitlab.sha256",
            "user.gitlab.size",
            "user.mlregfs.cached_bytes",
            "user.mlregfs.kind",
        ]
    )
    f = next(iter(reg._files[("v", "bert", "0.1.0")].values()))[0]
    assert f.sha256 is not None
    assert await fs.getxattr(ino, "user.gitlab.sha256") == f.sha256.encode()
    assert await fs.getxattr(ino, "user.gitlab.file_id") == str(f.file_id).encode()
    assert (await fs.getxattr(ino, "user.gitlab.created_at")).endswith(b"Z")
    assert await fs.getxattr(ino, "user.mlregfs.cached_bytes") == b"0"
    opened = await fs.open(ino, os.O_RDONLY)
    await fs.read(opened.fh, 0, 3 * BS + 5)
    await fs.release(opened.fh)
    assert await fs.getxattr(ino, "user.mlregfs.cached_bytes") == str(3 * BS + 5).encode()


async def test_a_file_being_written_says_so(fs: Filesystem) -> None:
    version = await walk(fs, "models/bert/0.1.0")
    opened, attr = await fs.create(version, "new.txt", os.O_WRONLY | os.O_CREAT)
    await fs.write(opened.fh, 0, b"abc")
    assert await fs.getxattr(attr.ino, "user.mlregfs.upload") == b"pending"
    with pytest.raises(NoAttribute):  # GitLab holds nothing for it yet
        await fs.getxattr(attr.ino, "user.gitlab.sha256")
    await fs.flush(opened.fh)
    await fs.release(opened.fh)
    assert len(await fs.getxattr(attr.ino, "user.gitlab.sha256")) == 64


async def test_unserved_names_cost_nothing(fs: Filesystem, reg: InMemoryRegistry) -> None:
    ino = await walk(fs, "models/bert/0.1.0/w.bin")
    version = await walk(fs, "models/bert/0.1.0")
    before = reg.stats.requests
    reg.down = True  # not even an outage makes security.capability wait
    for name in ("security.capability", "user.xdg.origin.url", "trusted.x"):
        with pytest.raises(NoAttribute):
            await fs.getxattr(ino, name)
    fs.meta.invalidate()  # not even when a listing would have to be fetched
    with pytest.raises(NoAttribute):
        await fs.getxattr(version, "user.xdg.tags")
    assert reg.stats.requests == before
    reg.down = False
    with pytest.raises(NoAttribute):
        await fs.getxattr(ino, "user.gitlab.nope")


async def test_version_xattrs_with_the_run(fs: Filesystem, reg: InMemoryRegistry) -> None:
    ino = await walk(fs, "models/bert/0.1.0")
    names = await fs.xattr_names(ino)
    assert "user.gitlab.run.metrics" in names and "user.gitlab.run.params" in names
    assert reg.stats.by_kind.get("get_run") is None  # listing names fetches no run
    v = reg._models["bert"].versions[0]
    assert await fs.getxattr(ino, "user.gitlab.model_version_id") == str(v.id).encode()
    assert await fs.getxattr(ino, "user.gitlab.run_id") == RUN.encode()
    assert await fs.getxattr(ino, "user.gitlab.description") == b"first\nline two"
    assert await fs.getxattr(ino, "user.mlregfs.kind") == b"version"
    # the latest value of each metric: highest step wins over the newest timestamp
    metrics = json.loads(await fs.getxattr(ino, "user.gitlab.run.metrics"))
    assert metrics == {"acc": 0.7, "loss": 0.2}
    params = json.loads(await fs.getxattr(ino, "user.gitlab.run.params"))
    assert params == {"epochs": "3", "lr": "0.01"}
    assert await fs.getxattr(ino, "user.gitlab.run.status") == b"FINISHED"
    assert reg.stats.by_kind["get_run"] == 1  # cached like a listing
    # a deleted run has nothing to show; an outage is an error, not an empty answer
    del reg.runs[RUN]
    fs.meta.invalidate()
    with pytest.raises(NoAttribute):
        await fs.getxattr(ino, "user.gitlab.run.params")


async def test_run_outage_is_loud(fs: Filesystem, reg: InMemoryRegistry) -> None:
    ino = await walk(fs, "models/bert/0.1.0")
    await fs.getxattr(ino, "user.gitlab.run_id")  # listing cached
    reg.fail_next["get_run"] = RegistryUnavailable("down")
    with pytest.raises(RegistryUnavailable):
        await fs.getxattr(ino, "user.gitlab.run.metrics")


async def test_model_and_other_dirs(fs: Filesystem) -> None:
    ino = await walk(fs, "models/resnet")
    assert await fs.getxattr(ino, "user.mlregfs.kind") == b"model"
    assert json.loads(await fs.getxattr(ino, "user.mlregfs.aliases"))["latest"] == "10.1.3"
    versions = json.loads(await fs.getxattr(ino, "user.gitlab.versions"))
    assert "10.2.0-alpha" in versions
    assert await fs.getxattr(await walk(fs, "models"), "user.mlregfs.kind") == b"models"
    assert await fs.getxattr(ROOT_INO, "user.mlregfs.kind") == b"root"


async def test_oversized_value_is_e2big(fs: Filesystem, reg: InMemoryRegistry) -> None:
    reg.runs[RUN] = Run(RUN, "RUNNING", None, None, 0, 0, params=(("p", "x" * 70000),))
    ino = await walk(fs, "models/bert/0.1.0")
    with pytest.raises(AttributeTooLarge):
        await fs.getxattr(ino, "user.gitlab.run.params")


# -- runs/get answers are untrusted input ----------------------------------------------------
def test_run_from_mlflow_drops_what_cannot_be_shown() -> None:
    data = {
        "run": {
            "info": {
                "run_id": RUN,
                "status": "FINISHED",
                "experiment_id": "3",
                "start_time": 9.5e12,
            },
            "data": {
                "params": [
                    {"key": "ok", "value": "1"},
                    {"key": "esc\x1b[31m", "value": "x"},
                    {"key": "big", "value": "v" * 10000},
                    "junk",
                ],
                "metrics": [
                    {"key": "loss", "value": 0.5, "step": "3", "timestamp": 1700000000000},
                    {"key": "nan", "value": float("nan"), "step": 0},
                    {"key": "bool", "value": True},
                ],
                "tags": [{"key": "t", "value": None}],
            },
        }
    }
    run = run_from_mlflow(data)
    assert run.params == (("ok", "1"),)
    assert run.metrics == (Metric("loss", 0.5, 3, 1700000000.0),)
    assert run.tags == (("t", ""),)
    assert run.experiment_id == "3" and run.start_time == 0.0  # 9.5e12 ms is past MAX_TIME
    bads: list[object] = [{"run": {"info": {"run_id": "../x"}}}, {"run": {}}, [], None]
    for bad in bads:
        with pytest.raises(validate.Invalid):
            run_from_mlflow(bad)


class _StalledModel(InMemoryRegistry):
    """get_model never answers (a registry that accepts and stalls)."""

    async def get_model(self, name: str) -> Model:
        self.stats.count("get_model")
        await trio.sleep_forever()
        raise AssertionError


async def test_alias_lookup_does_not_wait_out_a_stalled_registry(
    clock: Clock, tmp_path, autojump_clock: trio.testing.MockClock
) -> None:
    reg = _StalledModel()
    reg.add_version("m", "1.0.0")
    data = DataCache(BlockStore(tmp_path / "blocks", 64 * BS), block_size=BS, readahead=0)
    fs = Filesystem(reg, data, source_id="test", meta=MetadataCache(clock=clock))
    m = await walk(fs, "models/m")
    clock.now += 3
    started = trio.current_time()
    assert (await fs.lookup(m, "latest")).link == "1.0.0"  # the last known target
    assert trio.current_time() - started == pytest.approx(RECHECK_AFTER)
    clock.now += 3
    await fs.lookup(m, "latest")  # backing off: no second wait
    assert reg.stats.by_kind["get_model"] == 1
