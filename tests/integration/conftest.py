"""Integration fixtures: one real `mlregfs serve` per session, seeded once; real FUSE mounts.

Seeded world (private project acme/registry unless noted):

    llama/1.0.0/config.json, weights/model.safetensors (64 MiB + 1), tokenizer/tok en+1.json,
               dup.txt (uploaded twice: newest wins)
    llama/2.0.0/shards/part-000.bin .. part-149.bin   (>100 files: several pages)
    team/nlp/bert/0.1.0/README.md                     (nested model name)
    bulk-000 .. bulk-119 / 1.0.0 / w.bin               (>100 models)
    candidate <iid> of llama: metrics.json, model/checkpoint.bin
    acme/public: pub-model/1.0.0/hello.txt            (public project)
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mlregfs.testing import Mount, ServerProcess
from tests.integration.helpers import blob


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.fuse)


@pytest.fixture(scope="session", autouse=True)
def _require_fuse() -> None:
    # these tests must run, not skip: a missing FUSE is a broken environment
    assert os.path.exists("/dev/fuse"), "/dev/fuse missing: integration tests need FUSE"
    assert shutil.which("fusermount3"), "fusermount3 missing: apt-get install fuse3"


@dataclass
class World:
    url: str
    private: str  # SOURCE URL of the private project
    public: str
    tokens: dict[
        str, str
    ]  # role -> token ("maintainer", "developer", "reporter", "guest", "outsider", "job")
    files: dict[str, bytes] = field(default_factory=dict)  # path under the mount -> bytes
    candidate_iid: int = 0


BIG = 64 * (1 << 20) + 1


def seed(server: ServerProcess) -> World:
    st = server.store
    priv = "acme/registry"
    st.create_project(priv, "private")
    st.create_project("acme/public", "public")
    tokens = {r: st.create_token(priv, r) for r in ("maintainer", "developer", "reporter", "guest")}
    tokens["outsider"] = st.create_token(priv, "developer", member=False)
    tokens["job"] = st.create_token(priv, "developer", kind="job")
    w = World(server.url, f"{server.url}/{priv}", f"{server.url}/acme/public", tokens)

    def put(project: str, owner: int | str, prefix: str, path: str, data: bytes) -> None:
        st.add_file(project, owner, path, data)
        w.files[f"{prefix}/{path}"] = data

    st.create_model(priv, "llama")
    v1 = st.create_version(priv, "llama", "1.0.0")
    put(priv, v1, "models/llama/1.0.0", "config.json", b'{"hidden_size": 64}\n')
    put(priv, v1, "models/llama/1.0.0", "weights/model.safetensors", blob(1, BIG))
    put(priv, v1, "models/llama/1.0.0", "tokenizer/tok en+1.json", b'{"vocab": ["a b"]}')
    st.add_file(priv, v1, "dup.txt", b"first upload\n")
    put(priv, v1, "models/llama/1.0.0", "dup.txt", b"second, newest upload\n")
    v2 = st.create_version(priv, "llama", "2.0.0")
    for i in range(150):
        put(priv, v2, "models/llama/2.0.0", f"shards/part-{i:03d}.bin", blob(100 + i, 100 + i))
    st.create_model(priv, "clash")
    vc = st.create_version(priv, "clash", "1.0.0")
    put(priv, vc, "models/clash/1.0.0", "from-version.txt", b"version wins\n")
    st.create_model(priv, "clash/1.0.0")
    st.create_version(priv, "clash/1.0.0", "0.0.1")
    st.create_model(priv, "team/nlp/bert")
    vb = st.create_version(priv, "team/nlp/bert", "0.1.0")
    put(priv, vb, "models/team/nlp/bert/0.1.0", "README.md", b"# bert\n")
    for i in range(120):
        st.create_model(priv, f"bulk-{i:03d}")
        vi = st.create_version(priv, f"bulk-{i:03d}", "1.0.0")
        put(priv, vi, f"models/bulk-{i:03d}/1.0.0", "w.bin", blob(1000 + i, 10))
    iid = st.create_candidate(priv, model="llama")
    w.candidate_iid = iid
    put(priv, f"candidate:{iid}", f"candidates/{iid}", "metrics.json", b'{"loss": 0.1}')
    put(priv, f"candidate:{iid}", f"candidates/{iid}", "model/checkpoint.bin", blob(7, 3 << 20))
    st.create_model("acme/public", "pub-model")
    vp = st.create_version("acme/public", "pub-model", "1.0.0")
    st.add_file("acme/public", vp, "hello.txt", b"hello, world\n")
    return w


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path_factory.mktemp("server")) as s:
        yield s


@pytest.fixture(scope="session")
def world(server: ServerProcess) -> World:
    return seed(server)


@pytest.fixture
def mount_factory(tmp_path: Path) -> Iterator[Callable[..., Mount]]:
    """`mount_factory(source, token=..., options=[...])`: a started Mount, stopped afterwards."""
    mounts: list[Mount] = []

    def make(source: str, *, cache: Path | None = None, **kw: object) -> Mount:
        n = len(mounts)
        m = Mount(source, tmp_path / f"mnt{n}", cache or tmp_path / f"cache{n}", **kw)  # type: ignore[arg-type]
        mounts.append(m)
        return m.start()

    yield make
    for m in mounts:
        m.stop()


@pytest.fixture
def mnt(world: World, mount_factory: Callable[..., Mount]) -> Path:
    """The private project mounted with a developer token."""
    return mount_factory(world.private, token=world.tokens["developer"]).path
