"""The implementations the Registry contract runs against, as one parametrized `backend`:

- fake:   InMemoryRegistry
- gitlab: GitLabRegistry against a real `mlregfs serve` (one process per session, one new
          project and Maintainer token per test) that serves file bytes itself
- gitlab-redirect: the same, the server redirecting downloads to its signed storage URLs
- faulty: FaultyRegistry around an InMemoryRegistry, with no faults armed

A test that one implementation legitimately fails is marked `@xfail_on("fake", reason=...)`:
strict xfail on those parameters only, so the day the implementation catches up, it fails.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import pytest
from contract_backends import IMPLEMENTATIONS, Backend

from mlregfs.registry.base import Registry
from mlregfs.registry.fake import InMemoryRegistry
from mlregfs.registry.faults import FaultyRegistry
from mlregfs.registry.gitlab import GitLabRegistry
from mlregfs.registry.types import Candidate, Run
from mlregfs.testing import ServerProcess

_projects = itertools.count(1)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "xfail_on(*names, reason): strict xfail on those implementations only"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        mark = item.get_closest_marker("xfail_on")
        callspec = getattr(item, "callspec", None)
        if mark is None or callspec is None:
            continue
        if callspec.params.get("backend") in mark.args:
            item.add_marker(pytest.mark.xfail(strict=True, reason=mark.kwargs["reason"]))


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], ServerProcess]]:
    """`mlregfs serve` by download mode, started on first use (once per session)."""
    running: dict[str, ServerProcess] = {}
    with ExitStack() as stack:

        def get(mode: str) -> ServerProcess:
            if mode not in running:
                data = tmp_path_factory.mktemp(f"contract-srv-{mode}")
                running[mode] = stack.enter_context(ServerProcess(data, download_mode=mode))
            return running[mode]

        yield get


def _fake_backend(name: str, fake: InMemoryRegistry, registry: Registry, tmp: Path) -> Backend:
    iids = itertools.count(1)

    async def add_candidate() -> Candidate:
        iid = next(iids)
        eid = f"{iid:032x}"
        fake.runs[eid] = Run(eid, "FINISHED", "1", f"run {iid}", 0.0, 0.0)
        return replace(fake.add_candidate(iid), eid=eid)

    return Backend(name, registry, "test/project", add_candidate, tmp)


@pytest.fixture(params=IMPLEMENTATIONS)
async def backend(
    request: pytest.FixtureRequest, tmp_path: Path, servers: Callable[[str], ServerProcess]
) -> AsyncIterator[Backend]:
    if request.param == "fake":
        fake = InMemoryRegistry()
        yield _fake_backend("fake", fake, fake, tmp_path)
    elif request.param == "faulty":
        fake = InMemoryRegistry()
        yield _fake_backend("faulty", fake, FaultyRegistry(fake), tmp_path)
    else:
        server = servers("redirect" if request.param == "gitlab-redirect" else "local")
        path = f"contract/p{next(_projects)}"
        store = server.store
        pid = store.create_project(path, "private")
        token = store.create_token(path, "maintainer")

        async def add_candidate() -> Candidate:
            iid = store.create_candidate(path)
            row = store.candidate(pid, iid=iid)
            assert row is not None
            return Candidate(iid, 0.0, eid=str(row["eid"]))

        registry = GitLabRegistry(f"{server.url}/{path}", token)
        try:
            yield Backend(request.param, registry, path, add_candidate, tmp_path)
        finally:
            await registry.aclose()
