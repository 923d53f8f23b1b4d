"""Shared helpers of the registry-server conformance tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import quote

from mlregfs.testing import ServerProcess

MAX_FILE_SIZE = 1 << 20  # small limit so the size test is cheap


@dataclass
class Proj:
    """One seeded project: ids, tokens per role, one model with one version."""

    path: str
    id: int
    version_id: int
    package_id: int
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return quote(self.path, safe="")


@dataclass
class World:
    server: ServerProcess
    priv: Proj
    pub: Proj

    @property
    def api(self) -> str:
        return self.server.api


def _seed(server: ServerProcess, path: str, visibility: str) -> Proj:
    st = server.store
    pid = st.create_project(path, visibility)
    st.create_model(pid, "m")
    vid = st.create_version(pid, "m", "1.0.0")
    pkg = st.version(pid, vid)
    assert pkg is not None
    proj = Proj(path, pid, vid, int(pkg["package_id"]))
    for role in ("guest", "reporter", "developer", "maintainer"):
        proj.tokens[role] = st.create_token(pid, role)
    proj.tokens["outsider"] = st.create_token(pid, "developer", member=False)
    proj.tokens["job"] = st.create_token(pid, "developer", kind="job")
    proj.tokens["read_api"] = st.create_token(pid, "developer", scopes=("read_api",))
    st.add_file(pid, vid, "hello.txt", b"hello\n")
    return proj


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def files_url(w: World, proj: Proj, owner: int | str, path: str) -> str:
    return f"{w.api}/projects/{proj.ref}/packages/ml_models/{owner}/files/{path}"
