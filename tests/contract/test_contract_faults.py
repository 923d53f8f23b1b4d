"""FaultyRegistry (mlregfs/registry/faults.py): an injected fault surfaces as the very error
asked for, on the call asked for and only once; cut transfers move exactly the chunks before
the cut; latency is trio time; every call is counted. (With no fault armed it passes the whole
Registry contract: the `faulty` parameter of test_contract_registry.py.)"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import trio
import trio.testing
from contract_backends import Backend

from mlregfs.errors import (
    Forbidden,
    MlregfsError,
    NotFound,
    RegistryTimeout,
    RegistryUnavailable,
    ServerError,
    to_errno,
)
from mlregfs.registry.base import Registry
from mlregfs.registry.fake import InMemoryRegistry
from mlregfs.registry.faults import OPERATIONS, FaultyRegistry
from mlregfs.registry.types import ModelVersion

DATA = bytes(range(256)) * 8  # 2 KiB


def make() -> tuple[InMemoryRegistry, FaultyRegistry, ModelVersion]:
    fake = InMemoryRegistry()
    v = fake.add_version("m", "1.0.0")
    fake.add_file(v, "w.bin", DATA)
    return fake, FaultyRegistry(fake), v


async def test_is_a_registry() -> None:
    registry: Registry = FaultyRegistry(InMemoryRegistry())  # mypy: satisfies the Protocol
    assert (await registry.project()).path == "test/project"
    assert registry.stats.by_kind == {"project": 1}  # the inner's stats, shared


def test_every_operation_of_the_protocol_with_its_parameters() -> None:
    public = {n for n, f in inspect.getmembers(FaultyRegistry, inspect.iscoroutinefunction)} - {
        "_call"
    }
    assert public == OPERATIONS and "read_range" in OPERATIONS
    for name in OPERATIONS:
        ours = inspect.signature(getattr(FaultyRegistry, name)).parameters.values()
        theirs = inspect.signature(getattr(Registry, name)).parameters.values()
        assert [(p.name, p.kind, p.default) for p in ours] == [
            (p.name, p.kind, p.default) for p in theirs
        ], name


async def test_the_kth_call_fails_once() -> None:
    fake, reg, v = make()
    error = NotFound("gone")
    reg.fail("list_files", error, on_call=2)
    assert len(await reg.list_files(v)) == 1
    with pytest.raises(NotFound) as info:
        await reg.list_files(v)
    assert info.value is error
    assert len(await reg.list_files(v)) == 1
    assert reg.calls["list_files"] == 3
    assert fake.stats.by_kind["list_files"] == 2  # the failed call never reached the fake


async def test_calls_count_from_when_the_fault_is_armed() -> None:
    _, reg, _ = make()
    for _ in range(3):
        await reg.list_models()
    reg.fail("list_models", ServerError("503", status=503))
    with pytest.raises(ServerError):
        await reg.list_models()
    assert reg.calls["list_models"] == 4


@pytest.mark.parametrize(
    "error",
    [NotFound("x"), Forbidden("x"), RegistryTimeout("x"), ServerError("x", status=502)],
    ids=lambda e: type(e).__name__,
)
async def test_an_error_keeps_its_type_and_errno(error: MlregfsError) -> None:
    _, reg, _ = make()
    reg.fail("project", error)
    with pytest.raises(type(error)) as info:
        await reg.project()
    assert to_errno(info.value) == error.errno


async def test_errors_of_the_inner_registry_pass_through_and_count() -> None:
    _, reg, _ = make()
    with pytest.raises(NotFound):
        await reg.get_model("absent")
    await reg.get_model("m")
    assert reg.calls == {"get_model": 2}


def test_unknown_operations_are_refused() -> None:
    _, reg, _ = make()
    with pytest.raises(ValueError, match="list_model"):
        reg.fail("list_model", NotFound("x"))
    with pytest.raises(ValueError):
        reg.delay("read", 1.0)
    with pytest.raises(ValueError):
        reg.fail("project", NotFound("x"), on_call=0)


async def test_a_read_is_cut_at_its_nth_chunk() -> None:
    fake, reg, v = make()
    (f,) = await reg.list_files(v)
    reg.fail_chunk("read_range", 3, RegistryUnavailable("reset"), chunk=100)
    assert bytes(await reg.read_range(v, f, 0, 200)) == DATA[:200]  # 2 chunks: not cut
    into = memoryview(bytearray(1000))
    with pytest.raises(RegistryUnavailable):
        await reg.read_range(v, f, 500, 1500, into=into)
    assert bytes(into[:200]) == DATA[500:700] and not any(into[200:])
    assert fake.stats.bytes_downloaded == 200 + 200
    assert bytes(await reg.read_range(v, f, 500, 1500)) == DATA[500:1500]  # once only


async def test_an_upload_is_cut_at_its_nth_chunk_and_stores_nothing(tmp_path: Path) -> None:
    _, reg, v = make()
    small, src = tmp_path / "small", tmp_path / "src"
    await trio.Path(small).write_bytes(DATA[:10])
    await trio.Path(src).write_bytes(DATA[:11])
    reg.fail_chunk("upload", 2, RegistryUnavailable("reset"), chunk=10)
    await reg.upload(v, "small.bin", small, 10)  # 1 chunk: not cut
    with pytest.raises(RegistryUnavailable):
        await reg.upload(v, "big.bin", src, 11)
    assert {f.path for f in await reg.list_files(v)} == {"w.bin", "small.bin"}
    await reg.upload(v, "big.bin", src, 11)  # once only
    assert {f.path for f in await reg.list_files(v)} == {"w.bin", "small.bin", "big.bin"}


async def test_latency_is_trio_time(autojump_clock: trio.testing.MockClock) -> None:
    _, reg, _ = make()
    reg.delay("list_models", 2.5)

    async def took(op: str) -> float:
        t0 = trio.current_time()
        await getattr(reg, op)()
        return trio.current_time() - t0

    assert await took("list_models") == 2.5
    assert await took("list_candidates") == 0
    reg.delay("*", 1.0)
    assert await took("list_candidates") == 1.0
    assert await took("list_models") == 2.5  # the operation's own delay wins


async def test_a_cut_read_over_every_implementation(backend: Backend) -> None:
    """The cut read path of FaultyRegistry over each backend (a real server included)."""
    reg = backend.registry
    await reg.create_model("m")
    v = await reg.create_version("m", "1.0.0")
    src = backend.source_file(DATA)
    await reg.upload(v, "w.bin", src, len(DATA))
    (f,) = await reg.list_files(v)
    faulty = FaultyRegistry(reg)
    faulty.fail_chunk("read_range", 2, RegistryTimeout("stalled"), chunk=700)
    into = memoryview(bytearray(len(DATA)))
    with pytest.raises(RegistryTimeout):
        await faulty.read_range(v, f, 0, len(DATA), into=into)
    assert bytes(into[:700]) == DATA[:700] and not any(into[700:])
    assert faulty.calls == {"read_range": 1}
