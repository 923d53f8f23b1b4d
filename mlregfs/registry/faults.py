"""FaultyRegistry: a `Registry` around another that fails and slows down on request (as
mountpoint-s3's failure_client.rs), for tests of what callers do when the registry misbehaves.

    reg = FaultyRegistry(InMemoryRegistry())
    reg.fail("list_files", NotFound("gone"), on_call=2)   # the 2nd list_files from now
    reg.fail_chunk("read_range", 3, RegistryUnavailable("reset"), chunk=1 << 20)
    reg.delay("read_range", 0.5)                           # every read sleeps 0.5 s first
    assert reg.calls["list_files"] == 0
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Literal, ParamSpec, TypeVar

import trio

from mlregfs.buffers import Buffer
from mlregfs.errors import MlregfsError
from mlregfs.registry import types as t
from mlregfs.registry.base import Into, Registry

P = ParamSpec("P")
T = TypeVar("T")
Transfer = Literal["read_range", "upload"]

# the operations that can be failed, delayed and counted: every method of the Protocol
OPERATIONS = frozenset(
    name for name, _ in inspect.getmembers(Registry, inspect.isfunction) if not name.startswith("_")
)


class FaultyRegistry:
    """Passes every call to `inner`, after counting it, sleeping and raising what was asked."""

    def __init__(self, inner: Registry) -> None:
        self.inner = inner
        self.stats = inner.stats
        self.calls: Counter[str] = Counter()  # operation -> calls so far (failed ones too)
        self._fail: dict[str, dict[int, MlregfsError]] = {}  # op -> call number -> error
        self._chunk: dict[str, tuple[int, int, MlregfsError]] = {}  # op -> (n, chunk, error)
        self._delay: dict[str, float] = {}

    @staticmethod
    def _known(op: str) -> str:
        if op not in OPERATIONS:  # a typo would make the fault never fire
            raise ValueError(f"unknown registry operation {op!r}")
        return op

    def fail(self, op: str, error: MlregfsError, *, on_call: int = 1) -> None:
        """Raise `error` on the `on_call`-th call of `op` from now on (once)."""
        if on_call < 1:
            raise ValueError("on_call counts from 1")
        self._fail.setdefault(self._known(op), {})[self.calls[op] + on_call] = error

    def fail_chunk(
        self, op: Transfer, n: int, error: MlregfsError, *, chunk: int = 1 << 20
    ) -> None:
        """Cut the next transfer of `op` that reaches its `n`-th `chunk`-byte piece: the first
        n-1 pieces move (a read fills that much of `into`; an upload stores nothing, as a
        body cut short does), then `error`. Shorter transfers pass and leave it armed."""
        if n < 1 or chunk < 1:
            raise ValueError("n and chunk count from 1")
        self._chunk[self._known(op)] = (n, chunk, error)

    def delay(self, op: str, seconds: float) -> None:
        """Sleep `seconds` (trio time) before every call of `op`; "*" for every operation."""
        self._delay[op if op == "*" else self._known(op)] = seconds

    def _cut(self, op: Transfer, size: int) -> tuple[int, MlregfsError] | None:
        """(bytes that move before the error, error) if this transfer is to be cut."""
        armed = self._chunk.get(op)
        if armed is None or size <= (armed[0] - 1) * armed[1]:
            return None
        del self._chunk[op]
        return (armed[0] - 1) * armed[1], armed[2]

    async def _call(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        op = getattr(fn, "__name__", "")
        self.calls[op] += 1
        seconds = self._delay.get(op, self._delay.get("*", 0.0))
        if seconds > 0:
            await trio.sleep(seconds)
        error = self._fail.get(op, {}).pop(self.calls[op], None)
        if error is not None:
            raise error
        return await fn(*args, **kwargs)

    # -- Registry -------------------------------------------------------------------------

    async def project(self) -> t.ProjectInfo:
        return await self._call(self.inner.project)

    async def list_models(self) -> list[t.Model]:
        return await self._call(self.inner.list_models)

    async def get_model(self, name: str) -> t.Model:
        return await self._call(self.inner.get_model, name)

    async def list_candidates(self) -> list[t.Candidate]:
        return await self._call(self.inner.list_candidates)

    async def list_files(self, owner: t.FileOwner) -> list[t.RemoteFile]:
        return await self._call(self.inner.list_files, owner)

    async def get_run(self, run_id: str) -> t.Run:
        return await self._call(self.inner.get_run, run_id)

    async def read_range(
        self, owner: t.FileOwner, file: t.RemoteFile, start: int, end: int, *, into: Into = None
    ) -> Buffer:
        async def read_range(
            owner: t.FileOwner, file: t.RemoteFile, start: int, end: int, into: Into
        ) -> Buffer:
            cut = self._cut("read_range", end - start)
            if cut is None:
                return await self.inner.read_range(owner, file, start, end, into=into)
            moved, error = cut
            part = None if into is None else into[:moved]
            await self.inner.read_range(owner, file, start, start + moved, into=part)
            raise error

        return await self._call(read_range, owner, file, start, end, into)

    async def authorize_upload(self, owner: t.FileOwner, path: str) -> None:
        await self._call(self.inner.authorize_upload, owner, path)

    async def upload(self, owner: t.FileOwner, path: str, source: Path, size: int) -> None:
        async def upload(owner: t.FileOwner, path: str, source: Path, size: int) -> None:
            cut = self._cut("upload", size)
            if cut is not None:
                raise cut[1]
            await self.inner.upload(owner, path, source, size)

        await self._call(upload, owner, path, source, size)

    async def delete_file(self, file: t.RemoteFile) -> None:
        await self._call(self.inner.delete_file, file)

    async def may_delete_files(self) -> bool:
        return await self._call(self.inner.may_delete_files)

    async def create_model(self, name: str) -> t.Model:
        return await self._call(self.inner.create_model, name)

    async def create_version(self, model: str, version: str) -> t.ModelVersion:
        return await self._call(self.inner.create_version, model, version)

    async def delete_version(self, version: t.ModelVersion) -> None:
        await self._call(self.inner.delete_version, version)

    async def delete_model(self, name: str) -> None:
        await self._call(self.inner.delete_model, name)

    async def aclose(self) -> None:
        await self._call(self.inner.aclose)


def _is_a_registry(inner: Registry) -> Registry:
    return FaultyRegistry(inner)  # mypy checks that FaultyRegistry satisfies the Protocol
