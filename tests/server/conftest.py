"""Fixtures for the registry-server conformance tests: real `mlregfs serve` processes."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from mlregfs.testing import ServerProcess
from tests.server.helpers import MAX_FILE_SIZE, World, _seed


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data = tmp_path_factory.mktemp("srv")
    with ServerProcess(data, extra_args=["--max-file-size", str(MAX_FILE_SIZE)]) as s:
        yield s


@pytest.fixture(scope="session")
def world(server: ServerProcess) -> World:
    return World(server, _seed(server, "acme/priv", "private"), _seed(server, "acme/pub", "public"))


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=20) as c:
        yield c
