"""Fixtures for the GitLabRegistry tests: a fake GitLab, instant sleeps, a registry factory."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from registry_fake import SOURCE, TOKEN, FakeGitLab, Sleeps

from mlregfs.registry.gitlab import GitLabRegistry
from mlregfs.registry.retry import RetryPolicy


@pytest.fixture
def gitlab() -> FakeGitLab:
    return FakeGitLab()


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
async def make_registry(
    gitlab: FakeGitLab, sleeps: Sleeps
) -> AsyncIterator[Callable[..., GitLabRegistry]]:
    made: list[GitLabRegistry] = []

    def make(
        source: str = SOURCE,
        token: str | None = TOKEN,
        *,
        retry: RetryPolicy | None = None,
        **kwargs: Any,
    ) -> GitLabRegistry:
        reg = GitLabRegistry(
            source,
            token,
            retry=retry,
            transport=gitlab.transport(),
            sleep=sleeps.sleep,
            clock=sleeps.clock,
            **kwargs,
        )
        made.append(reg)
        return reg

    yield make
    for reg in made:
        await reg.aclose()
