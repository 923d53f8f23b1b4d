"""CatalogRegistry answers listings from disk during an outage, never over a real answer."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlregfs.errors import NotFound, RegistryUnavailable
from mlregfs.registry.catalog import CatalogRegistry
from mlregfs.registry.fake import InMemoryRegistry


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
