"""What the Registry contract tests share: the implementations and the `Backend` record."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from mlregfs.registry.base import Registry
from mlregfs.registry.types import Candidate

IMPLEMENTATIONS = ("fake", "gitlab", "gitlab-redirect", "faulty")
_uploads = itertools.count(1)


@dataclass
class Backend:
    """One implementation under test, and what the Protocol cannot do for a test's setup."""

    name: str
    registry: Registry
    project_path: str
    add_candidate: Callable[[], Awaitable[Candidate]]  # a new candidate (MLflow run)
    tmp: Path

    def source_file(self, data: bytes) -> Path:
        """A file holding `data`, to upload from."""
        path = self.tmp / f"upload-{next(_uploads)}"
        path.write_bytes(data)
        return path


def xfail_on(*names: str, reason: str) -> pytest.MarkDecorator:
    unknown = set(names) - set(IMPLEMENTATIONS)
    assert not unknown, f"unknown implementations {unknown}"
    return pytest.mark.xfail_on(*names, reason=reason)
