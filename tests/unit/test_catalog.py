"""CatalogRegistry answers listings from disk during an outage, never over a real answer."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlregfs.errors import NotFound, RegistryUnavailable
from mlregfs.registry.catalog import CatalogRegistry
from mlregfs.registry.fake import InMemoryRegistry
from mlregfs.registry.outage import Outage
from mlregfs.registry.types import Run


async def test_outage_answers_from_a_new_process_catalog(tmp_path: Path) -> None:
    reg = InMemoryRegistry()
    v = reg.add_version("team/m", "1.0.0")
    reg.add_file(v, "a/b.bin", b"x")
    reg.add_candidate(4)
    path = tmp_path / "catalog.json"
    cat = CatalogRegistry(reg, path)
    await cat.project()
    models = await cat.list_models()
    files = await cat.list_files(models[0].versions[0])
    cands = await cat.list_candidates()
    reg.down = True
    fresh = CatalogRegistry(reg, path)  # as after a reboot
    assert await fresh.project() == await cat.project()
    assert await fresh.list_models() == models
    assert await fresh.list_files(models[0].versions[0]) == files
    assert await fresh.list_candidates() == cands
    assert fresh.offline_answers == 4
    with pytest.raises(RegistryUnavailable):  # never seen: no answer to give
        await fresh.list_files(reg.add_version("other", "1.0.0"))


async def test_real_answers_are_not_masked(tmp_path: Path) -> None:
    reg = InMemoryRegistry()
    cat = CatalogRegistry(reg, tmp_path / "c.json")
    reg.add_version("m", "1.0.0")
    await cat.list_models()
    with pytest.raises(NotFound):
        await cat.get_model("gone")


async def test_an_outage_is_not_asked_again_within_its_grace(tmp_path: Path) -> None:
    """The one outage policy: after a failed fetch, known listings are answered at once for
    `grace` seconds (no new attempt waits out the retries); unknown ones still fail, and a
    real answer (404) is never masked once the registry answers again."""
    now = [0.0]
    reg = InMemoryRegistry()
    v = reg.add_version("m", "1.0.0")
    reg.add_file(v, "w.bin", b"x")
    outage = Outage(grace=10.0, clock=lambda: now[0])
    cat = CatalogRegistry(reg, tmp_path / "c", outage=outage)
    models = await cat.list_models()
    reg.down = True
    assert await cat.list_models() == models  # outage: the last known answer
    assert cat.offline_answers == 1 and outage.down()
    reg.down = False  # back, but not asked again within the grace
    before = reg.stats.by_kind.get("list_models", 0)
    assert await cat.list_models() == models
    assert reg.stats.by_kind.get("list_models", 0) == before and cat.offline_answers == 2
    with pytest.raises(NotFound):  # nothing known of it: asked, and the answer is real
        await cat.get_model("gone")
    now[0] = 11.0
    assert not outage.down()
    await cat.list_models()  # asked again after the grace
    assert reg.stats.by_kind.get("list_models", 0) == before + 1


async def test_runs_are_answered_from_memory_during_an_outage(tmp_path: Path) -> None:
    reg = InMemoryRegistry()
    reg.runs["a" * 32] = Run("a" * 32, "FINISHED", "1", "train", 1.0, 2.0, (("lr", "0.1"),))
    cat = CatalogRegistry(reg, tmp_path / "c")
    run = await cat.get_run("a" * 32)
    reg.down = True
    assert await cat.get_run("a" * 32) == run
    with pytest.raises(RegistryUnavailable):
        await cat.get_run("b" * 32)
