"""`mlregfs serve --storage-url`: redirect downloads to an external object store (nginx)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest

from mlregfs.server.storage import BUCKET
from mlregfs.testing import ServerProcess, free_port
from tests.server.helpers import bearer

PAYLOAD = hashlib.sha256(b"seed").digest() * 8192  # 256 KiB, not one repeated byte


def _seed(s: ServerProcess) -> tuple[str, int]:
    s.store.create_project("o/p", "private")
    token = s.store.create_token("o/p", "reporter")
    s.store.create_model("o/p", "m")
    vid = s.store.create_version("o/p", "m", "1.0.0")
    s.store.add_file("o/p", vid, "dir/w.safetensors", PAYLOAD)
    return token, vid


def _blob_rel(s: ServerProcess) -> str:
    """`<project>/<package>/<file id>` of the one blob under DATA/blobs."""
    (blob,) = (p for p in (s.data_dir / "blobs").rglob("*") if p.is_file())
    return blob.relative_to(s.data_dir / "blobs").as_posix()


def test_location_uses_storage_url(tmp_path: Path, client: httpx.Client) -> None:
    base = "https://objects.example.test:9443/some/prefix"
    with ServerProcess(
        tmp_path / "srv", download_mode="redirect", extra_args=["--storage-url", base + "/"]
    ) as s:
        token, vid = _seed(s)
        url = f"{s.api}/projects/o%2Fp/packages/ml_models/{vid}/files/dir/w.safetensors"
        r = client.get(url, headers=bearer(token))
        assert r.status_code == 302
        loc = urlsplit(r.headers["location"])
        # BASE (trailing slash dropped) + /<bucket>/<project>/<package>/<file id>
        tail = _blob_rel(s)
        assert f"{loc.scheme}://{loc.netloc}{loc.path}" == f"{base}/{BUCKET}/{tail}"
        q = dict(parse_qsl(loc.query))
        assert q["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
        assert q["X-Amz-Expires"] == "300" and len(q["X-Amz-Signature"]) == 64
        assert token not in r.headers["location"]
        # HEAD is redirected the same way
        h = client.head(url, headers=bearer(token))
        assert h.status_code == 302
        assert urlsplit(h.headers["location"]).path == loc.path
        # no built-in storage listener in this mode
        assert "(storage https://objects.example.test:9443/some/prefix)" in s.stderr()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--storage-url", "http://127.0.0.1:1"], "needs --download-mode redirect"),
        (
            ["--download-mode", "redirect", "--storage-url", "ftp://h/x"],
            "must be an http(s) URL",
        ),
        (
            ["--download-mode", "redirect", "--storage-url", "http://h/x?a=1"],
            "no query",
        ),
    ],
)
def test_storage_url_refused(tmp_path: Path, args: list[str], message: str) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "mlregfs.server", "serve", "--data", str(tmp_path / "d"), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2
    assert message in p.stderr


def test_help_documents_storage_url() -> None:
    p = subprocess.run(
        [sys.executable, "-m", "mlregfs.server", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0
    assert "--storage-url" in p.stdout and "alias DATA/blobs/" in " ".join(p.stdout.split())


def _nginx_conf(work: Path, port: int, blobs: Path) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    # the `user` directive only matters (and only works) when the master runs as root
    user = "user root;" if os.geteuid() == 0 else ""
    conf = work / "nginx.conf"
    conf.write_text(f"""
daemon off;
{user}
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    sendfile on;
    default_type application/octet-stream;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location /{BUCKET}/ {{ alias {blobs}/; }}
    }}
}}
""")
    return conf


@pytest.fixture
def nginx_srv(tmp_path: Path) -> Iterator[tuple[ServerProcess, str, int]]:
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if nginx is None:
        if os.environ.get("CI"):  # .ci/setup installs it: a skip there would hide a failure
            pytest.fail("nginx not installed in CI (.ci/setup installs nginx-light)")
        pytest.skip("nginx not installed (apt-get install nginx-light)")
    data = tmp_path / "srv"
    port = free_port()
    conf = _nginx_conf(tmp_path / "nginx", port, data / "blobs")
    (data / "blobs").mkdir(parents=True)
    proc = subprocess.Popen(
        [nginx, "-c", str(conf), "-p", str(tmp_path / "nginx"), "-e", "stderr"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                pytest.fail(f"nginx exited {proc.returncode}: {err[-500:]}")
            try:
                httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    pytest.fail("nginx did not come up")
                time.sleep(0.05)
        with ServerProcess(
            data,
            download_mode="redirect",
            extra_args=["--storage-url", f"http://127.0.0.1:{port}"],
        ) as s:
            token, vid = _seed(s)
            yield s, token, vid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_nginx_serves_the_redirect(
    nginx_srv: tuple[ServerProcess, str, int], client: httpx.Client
) -> None:
    s, token, vid = nginx_srv
    url = f"{s.api}/projects/o%2Fp/packages/ml_models/{vid}/files/dir/w.safetensors"
    r = client.get(url, headers=bearer(token))
    assert r.status_code == 302
    loc = r.headers["location"]
    # what a client does: follow the 302 without the token
    body = client.get(loc)
    assert (body.status_code, body.content) == (200, PAYLOAD)
    part = client.get(loc, headers={"Range": "bytes=4096-8191"})
    assert part.status_code == 206
    assert part.headers["content-range"] == f"bytes 4096-8191/{len(PAYLOAD)}"
    assert part.content == PAYLOAD[4096:8192]
    h = client.head(client.head(url, headers=bearer(token)).headers["location"])
    assert (h.status_code, h.headers["content-length"]) == (200, str(len(PAYLOAD)))
    # and curl -L (the object store ignores any Authorization header)
    if shutil.which("curl"):
        out = subprocess.run(
            ["curl", "-sSfL", "-H", f"Authorization: Bearer {token}", url],
            capture_output=True,
            timeout=60,
            check=True,
        ).stdout
        assert out == PAYLOAD
