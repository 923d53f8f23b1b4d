"""Fixtures for the GitLabRegistry tests: a fake GitLab on two local origins (GitLab and
object storage, real sockets), instant sleeps, a registry factory, a byte-path switch."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from registry_fake import TOKEN, FakeGitLab, Sleeps
from wire import WireServer

from mlregfs.registry.gitlab import GitLabRegistry
from mlregfs.registry.http import transport
from mlregfs.registry.retry import RetryPolicy


@pytest.fixture
def gitlab() -> Iterator[FakeGitLab]:
    fake = FakeGitLab()
    lock = threading.Lock()
    with WireServer(fake.handle, lock) as api, WireServer(fake.handle, lock) as storage:
        fake.origin, fake.storage_origin = api.url, storage.url
        fake.wires = [api, storage]
        yield fake


@pytest.fixture(params=["trio", "thread"])
def byte_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on both ways the byte transport (registry/http/transport.py) carries a
    range: the trio-native small-fetch path and the worker-thread http.client path (every
    range counts as large)."""
    if request.param == "thread":
        monkeypatch.setattr(transport, "SMALL_FETCH", 0)
    return str(request.param)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
async def make_registry(
    gitlab: FakeGitLab, sleeps: Sleeps
) -> AsyncIterator[Callable[..., GitLabRegistry]]:
    made: list[GitLabRegistry] = []

    def make(
        source: str | None = None,
        token: str | None = TOKEN,
        *,
        retry: RetryPolicy | None = None,
        **kwargs: Any,
    ) -> GitLabRegistry:
        reg = GitLabRegistry(
            source or gitlab.source,
            token,
            retry=retry,
            sleep=sleeps.sleep,
            clock=sleeps.clock,
            **kwargs,
        )
        made.append(reg)
        return reg

    yield make
    for reg in made:
        await reg.aclose()
