"""Redirect mode, stats, restart, admin CLI and demo seed."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
import pytest

from mlregfs.server.storage import Signer
from mlregfs.testing import ServerProcess
from tests.server.helpers import World, bearer, files_url


@pytest.fixture(scope="module")
def redirect_srv(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ServerProcess, str, int]]:
    with ServerProcess(tmp_path_factory.mktemp("redir"), download_mode="redirect") as s:
        s.store.create_project("r/p", "private")
        token = s.store.create_token("r/p", "reporter")
        s.store.create_model("r/p", "m")
        vid = s.store.create_version("r/p", "m", "1.0.0")
        s.store.add_file("r/p", vid, "w.bin", bytes(range(256)) * 4)
        yield s, token, vid


def test_redirect_download(
    redirect_srv: tuple[ServerProcess, str, int], client: httpx.Client
) -> None:
    s, token, vid = redirect_srv
    url = f"{s.api}/projects/r%2Fp/packages/ml_models/{vid}/files/w.bin"
    r = client.get(url, headers=bearer(token))
    assert r.status_code == 302
    loc = r.headers["location"]
    assert r.text == f"This resource has been moved temporarily to {loc}."
    q = dict(parse_qsl(urlsplit(loc).query))
    assert q["X-Amz-Expires"] == "300" and "X-Amz-Signature" in q
    assert urlsplit(loc).port != s.port
    # the storage listener refuses the GitLab token
    r2 = client.get(loc, headers=bearer(token))
    assert r2.status_code == 400
    assert (
        "<Code>InvalidArgument</Code>" in r2.text and "Only one auth mechanism allowed" in r2.text
    )
    assert token not in r2.text
    r2 = client.get(loc)
    assert (r2.status_code, r2.content) == (200, bytes(range(256)) * 4)
    r2 = client.get(loc, headers={"Range": "bytes=256-259"})
    assert (r2.status_code, r2.headers["content-range"], r2.content) == (
        206,
        "bytes 256-259/1024",
        b"\x00\x01\x02\x03",
    )
    # tampered, unsigned, expired
    bad = loc.replace(q["X-Amz-Signature"], "0" * 64)
    assert client.get(bad).status_code == 403
    assert "<Code>AccessDenied</Code>" in client.get(bad).text
    assert client.get(loc.split("?")[0]).status_code == 403
    signer = Signer(s.store.signing_key())
    base = f"{urlsplit(loc).scheme}://{urlsplit(loc).netloc}"
    blob = s.store.newest_file(int(s.store.version(1, vid)["package_id"]), "w.bin")  # type: ignore[index]
    assert blob is not None
    old = signer.sign(base, blob["blob"], now=1_000_000_000)
    r3 = client.get(old)
    assert r3.status_code == 403 and "Request has expired" in r3.text
    # HEAD is redirected to a HEAD-signed URL; a GET-signed URL refuses HEAD
    r4 = client.head(url, headers=bearer(token))
    assert r4.status_code == 302
    h = client.head(r4.headers["location"])
    assert (h.status_code, h.headers["content-length"]) == (200, "1024")
    assert client.head(loc).status_code == 403
    # package-file download by id redirects too
    pkg = s.store.version(1, vid)["package_id"]  # type: ignore[index]
    r5 = client.get(
        f"{s.api}/projects/1/packages/{pkg}/package_files/{blob['id']}/download",
        headers={"PRIVATE-TOKEN": token},
    )
    assert r5.status_code == 302
    assert client.get(r5.headers["location"]).content == bytes(range(256)) * 4
    # a path outside the bucket is refused even when "signed"
    forged = urlencode({**q})
    assert client.get(f"{base}/etc/passwd?{forged}").status_code == 403


def test_stats_count_requests_and_bytes(world: World, client: httpx.Client) -> None:
    p = world.pub
    world.server.reset_stats()
    assert world.server.stats() == {"requests": 0, "bytes_served": 0, "by_route": {}}
    data = client.get(files_url(world, p, p.version_id, "hello.txt")).content
    client.get(f"{world.api}/projects/{p.id}")
    st = world.server.stats()
    assert st["requests"] == 2
    assert st["by_route"] == {"ml_models": 1, "project": 1}
    assert st["bytes_served"] >= len(data) + 100
    world.server.reset_stats()
    client.get(files_url(world, p, p.version_id, "hello.txt"), headers={"Range": "bytes=0-1"})
    assert world.server.stats()["bytes_served"] == 2


def test_restart_keeps_port_and_data(tmp_path: Path, client: httpx.Client) -> None:
    s = ServerProcess(tmp_path / "srv").start()
    try:
        s.store.create_project("a/b", "public")
        port = s.port
        s.restart()
        assert s.port == port
        assert client.get(f"{s.api}/projects/a%2Fb").status_code == 200
        assert s.stop() == 0  # graceful SIGTERM
    finally:
        s.kill()


def _admin(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    return subprocess.run(
        [sys.executable, "-m", "mlregfs.server", "admin", "--data", str(data), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_admin_cli(tmp_path: Path) -> None:
    d = tmp_path / "data"
    assert _admin(d, "project", "create", "g/p", "--public").returncode == 0
    tok = _admin(d, "token", "create", "g/p", "--role", "developer", "--scopes", "api,read_api")
    assert tok.returncode == 0 and tok.stdout.strip().startswith("glpat-")
    assert len(tok.stdout.strip().splitlines()) == 1
    job = _admin(d, "token", "create", "g/p", "--role", "developer", "--job")
    assert job.stdout.strip().startswith("glcbt-")
    assert _admin(d, "model", "create", "g/p", "team/x").returncode == 0
    v = _admin(d, "version", "create", "g/p", "team/x", "1.2.3")
    assert v.returncode == 0 and int(v.stdout) >= 1001
    bad = _admin(d, "version", "create", "g/p", "team/x", "v1.0")
    assert bad.returncode != 0 and "semantic versioning" in bad.stderr
    c = _admin(d, "candidate", "create", "g/p", "--model", "team/x")
    assert c.returncode == 0 and int(c.stdout) == 2  # iid 1 is the version's hidden candidate
    out = _admin(d, "list", "g/p")
    assert "model team/x" in out.stdout and "version 1.2.3" in out.stdout
    assert _admin(d, "list", "nope/nope").returncode != 0
    assert _admin(d, "model", "create", "g/p", "bad name").returncode != 0


def test_demo_seed(tmp_path: Path, client: httpx.Client) -> None:
    with ServerProcess(tmp_path / "demo", extra_args=["--init-demo"]) as s:
        tok_file = tmp_path / "demo" / "demo-token"
        assert oct(tok_file.stat().st_mode & 0o777) == "0o600"
        token = tok_file.read_text().strip()
        base = f"{s.api}/projects/demo%2Fmodels/ml/mlflow/api/2.0/mlflow"
        r = client.get(f"{base}/registered-models/search", headers={"PRIVATE-TOKEN": token})
        models = {
            m["name"]: [v["aliases"][0] for v in m["latest_versions"]]
            for m in r.json()["registered_models"]
        }
        assert models == {
            "llama-tiny": ["1.0.0", "1.1.0", "2.0.0-rc.1"],
            "team/bert-small": ["0.1.0"],
            "vision/resnet50": ["3.2.1"],
        }
        vid = s.store.version_by_semver(s.store.model(1, "llama-tiny")["id"], "1.0.0")["id"]  # type: ignore[index]
        st = client.get(
            f"{s.api}/projects/demo%2Fmodels/packages/ml_models/{vid}/files/model.safetensors"
        ).content
        n = int.from_bytes(st[:8], "little")
        header = json.loads(st[8 : 8 + n])
        end = max(t["data_offsets"][1] for k, t in header.items() if k != "__metadata__")
        assert len(st) == 8 + n + end
        sha = hashlib.sha256(st).hexdigest()
    with ServerProcess(tmp_path / "demo2", extra_args=["--init-demo"]) as s2:
        vid2 = s2.store.version_by_semver(s2.store.model(1, "llama-tiny")["id"], "1.0.0")["id"]  # type: ignore[index]
        st2 = client.get(
            f"{s2.api}/projects/demo%2Fmodels/packages/ml_models/{vid2}/files/model.safetensors"
        )
        assert hashlib.sha256(st2.content).hexdigest() == sha  # deterministic
        s2.restart()  # idempotent: seeding again is a no-op
        assert len(s2.store.all("SELECT * FROM models")) == 3
