"""The one byte transport (mlregfs/registry/http/): the code production runs, tested over real
sockets."""

from __future__ import annotations

import base64
import http.client
import importlib
import inspect
import pkgutil
import shutil
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from registry_fake import TOKEN, FakeGitLab, Sleeps
from wire import WireServer

from mlregfs.errors import RegistryUnavailable
from mlregfs.registry import gitlab as gitlab_package
from mlregfs.registry.gitlab import GitLabRegistry
from mlregfs.registry.http import transport
from mlregfs.registry.retry import RetryPolicy
from mlregfs.registry.types import ModelVersion, RemoteFile

Make = Callable[..., GitLabRegistry]
DATA = bytes(range(256)) * 512  # 128 KiB: room for small and large ranges


async def _setup(gitlab: FakeGitLab, reg: GitLabRegistry) -> tuple[ModelVersion, RemoteFile]:
    mv = gitlab.add_version("bert", "1.0.0")
    gitlab.add_file(gitlab.packages[-1], "w.bin", DATA)
    owner = ModelVersion("bert", "1.0.0", id=mv, created_at=0)
    (file,) = await reg.list_files(owner)
    return owner, file


# ---------------------------------------------------------------------------- one seam


def test_the_registry_has_no_byte_path_of_its_own() -> None:
    """Issue 10: tests and production run the same byte code. The httpx byte branch that only
    tests used is gone; httpx carries JSON only."""
    for name in ("_stream_range_get", "_read_body", "_blocking_reads", "_blocking_range_get"):
        assert not hasattr(GitLabRegistry, name), name
    for info in pkgutil.iter_modules(gitlab_package.__path__, "mlregfs.registry.gitlab."):
        source = inspect.getsource(importlib.import_module(info.name))
        assert "self._client.stream(" not in source and "content=chunks()" not in source


async def test_each_read_goes_through_transfer_on_the_path_its_size_picks(
    gitlab: FakeGitLab, make_registry: Make
) -> None:
    reg = make_registry()
    owner, file = await _setup(gitlab, reg)
    assert await reg.read_range(owner, file, 10, 4106) == DATA[10:4106]
    assert reg._api.bytes.sent == {"small": 1}
    big = transport.SMALL_FETCH + 1
    assert await reg.read_range(owner, file, 5, 5 + big) == DATA[5 : 5 + big]
    assert reg._api.bytes.sent == {"small": 1, "thread": 1}


async def test_an_injected_transport_carries_json_not_bytes(
    gitlab: FakeGitLab, sleeps: Sleeps
) -> None:
    """A MockTransport given to the registry answers its API calls; its bytes still go over
    the socket, through the byte transport."""
    async with GitLabRegistry(
        gitlab.source, TOKEN, transport=gitlab.transport(), sleep=sleeps.sleep, clock=sleeps.clock
    ) as reg:
        owner, file = await _setup(gitlab, reg)
        before = sum(w.connections for w in gitlab.wires)
        assert before == 0  # listing went through the MockTransport
        assert await reg.read_range(owner, file, 0, 100) == DATA[:100]
        assert reg._api.bytes.sent["small"] == 1
        assert sum(w.connections for w in gitlab.wires) == 1


# ---------------------------------------------------------------------------- trio-native path


async def test_small_reads_reuse_one_keep_alive_connection(
    gitlab: FakeGitLab, make_registry: Make
) -> None:
    reg = make_registry()
    owner, file = await _setup(gitlab, reg)
    before = gitlab.wires[0].connections
    for i in range(20):
        start = i * 4096
        assert await reg.read_range(owner, file, start, start + 4096) == DATA[start : start + 4096]
    assert gitlab.wires[0].connections - before == 1
    assert reg._api.bytes.sent["small"] == 20
    assert reg._api.bytes.lean._live  # pooled, idle
    await reg.aclose()
    assert not reg._api.bytes.lean._live


@pytest.mark.usefixtures("byte_path")
async def test_idle_connection_closed_by_the_server_is_replaced_without_a_retry(
    gitlab: FakeGitLab, make_registry: Make, sleeps: Sleeps
) -> None:
    reg = make_registry()
    owner, file = await _setup(gitlab, reg)
    gitlab.wires[0].close_each = True  # every pooled connection is dead when reused
    for i in range(4):
        assert await reg.read_range(owner, file, i, i + 1000) == DATA[i : i + 1000]
    assert reg.stats.retries == 0 and reg.stats.errors == 0 and sleeps.delays == []


async def test_a_200_ignoring_range_falls_back_to_the_thread_path(
    gitlab: FakeGitLab, make_registry: Make
) -> None:
    gitlab.honour_range = False
    reg = make_registry()
    owner, file = await _setup(gitlab, reg)
    assert await reg.read_range(owner, file, 3000, 7000) == DATA[3000:7000]
    assert reg._api.bytes.sent == {"small": 1, "thread": 1}
    assert reg.stats.retries == 0


@pytest.mark.usefixtures("byte_path")
async def test_into_receives_the_bytes(gitlab: FakeGitLab, make_registry: Make) -> None:
    reg = make_registry()
    owner, file = await _setup(gitlab, reg)
    buf = bytearray(5000)
    view = memoryview(buf)
    got = await reg.read_range(owner, file, 100, 5100, into=view)
    assert got is view and buf == DATA[100:5100]
    gitlab.redirect = True  # also through a redirect to storage
    buf[:] = bytes(5000)
    assert await reg.read_range(owner, file, 200, 5200, into=view) is view
    assert buf == DATA[200:5200]
    with pytest.raises(ValueError, match="into"):
        await reg.read_range(owner, file, 0, 10, into=memoryview(bytearray(3)))


@pytest.mark.usefixtures("byte_path")
async def test_oversized_headers_are_refused_and_the_connection_dropped(
    gitlab: FakeGitLab, make_registry: Make
) -> None:
    reg = make_registry(retry=RetryPolicy(max_attempts=1))
    owner, file = await _setup(gitlab, reg)

    def big(request: httpx.Request) -> httpx.Response:
        headers = {"Content-Range": f"bytes 0-9/{len(DATA)}", "X-Junk": "j" * (70 << 10)}
        return httpx.Response(206, headers=headers, content=DATA[:10])

    gitlab.fail("/files/", big)
    with pytest.raises(RegistryUnavailable) as info:
        await reg.read_range(owner, file, 0, 10)
    assert "jjj" not in str(info.value)
    assert await reg.read_range(owner, file, 0, 10) == DATA[:10]


@pytest.mark.usefixtures("byte_path")
async def test_a_refused_connection_is_unavailable_and_named(
    gitlab: FakeGitLab, make_registry: Make
) -> None:
    reg = make_registry(retry=RetryPolicy(max_attempts=2))
    owner, file = await _setup(gitlab, reg)
    dead = "http://127.0.0.1:1/bucket/1?X-Amz-Signature=SECRET"
    gitlab.fail("/files/", *[lambda r: httpx.Response(302, headers={"Location": dead})] * 2)
    with pytest.raises(RegistryUnavailable, match="Connection refused") as info:
        await reg.read_range(owner, file, 0, 10)
    assert "SECRET" not in str(info.value) and reg.stats.retries == 1


# ---------------------------------------------------------------------------- proxies


class ForwardProxy:
    """A plain HTTP forward proxy (absolute-form targets) that records what it forwarded."""

    def __init__(self) -> None:
        self.targets: list[str] = []
        self.auth: list[str | None] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _proxy_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.02,), daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def __enter__(self) -> ForwardProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


def _proxy_handler(proxy: ForwardProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            proxy.targets.append(self.path)
            proxy.auth.append(self.headers.get("Proxy-Authorization"))
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            skip = {"proxy-authorization", "proxy-connection", "connection", "keep-alive"}
            headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
            conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=30)
            try:
                target = parts.path + (f"?{parts.query}" if parts.query else "")
                conn.request(self.command, target, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            finally:
                conn.close()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_PUT = do_POST = do_DELETE = do_GET

    return Handler


@pytest.fixture
def forward_proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[ForwardProxy]:
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    for name in ("NO_PROXY", "no_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    with ForwardProxy() as proxy:
        monkeypatch.setenv("http_proxy", f"http://u:p%40ss@127.0.0.1:{proxy.port}")
        yield proxy


async def test_http_proxy_carries_the_byte_path_and_no_proxy_bypasses_it(
    gitlab: FakeGitLab, make_registry: Make, forward_proxy: ForwardProxy, monkeypatch: Any
) -> None:
    gitlab.redirect = True
    reg = make_registry()
    owner, file = await _setup(gitlab, reg)
    assert await reg.read_range(owner, file, 0, 100) == DATA[:100]
    downloads = [t for t in forward_proxy.targets if "/files/" in t or "/bucket/" in t]
    assert [urlsplit(t).scheme for t in downloads] == ["http", "http"]  # absolute form
    assert downloads[1].startswith(gitlab.storage_origin)
    basic = "Basic " + base64.b64encode(b"u:p@ss").decode()
    assert forward_proxy.auth[-1] == basic

    monkeypatch.setenv("no_proxy", "127.0.0.1")
    seen = len(forward_proxy.targets)
    direct = make_registry()
    owner, file = await _setup(gitlab, direct)
    assert await direct.read_range(owner, file, 0, 100) == DATA[:100]
    assert len(forward_proxy.targets) == seen
    assert direct._api.bytes.sent["small"] >= 1


# ---------------------------------------------------------------------------- TLS


@pytest.fixture
def tls_cert(tmp_path: Any) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (cert, key paths)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", key, "-out", cert, "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.mark.usefixtures("byte_path")
async def test_https_origins(
    tls_cert: tuple[str, str], sleeps: Sleeps, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GitLab is https: the trio.SSLStream path and http.client's, verified against a CA
    given through SSL_CERT_FILE (as the system store would be); a redirect to storage."""
    cert, key = tls_cert
    monkeypatch.setenv("SSL_CERT_FILE", cert)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    fake = FakeGitLab(redirect=True)
    lock = threading.Lock()
    with WireServer(fake.handle, lock, tls) as api, WireServer(fake.handle, lock, tls) as st:
        fake.origin, fake.storage_origin = api.url, st.url
        assert fake.origin.startswith("https://")
        async with GitLabRegistry(
            fake.source, TOKEN, transport=fake.transport(), sleep=sleeps.sleep, clock=sleeps.clock
        ) as reg:
            owner, file = await _setup(fake, reg)
            for start in (0, 4096, 8192):
                got = await reg.read_range(owner, file, start, start + 4096)
                assert got == DATA[start : start + 4096]
            assert fake.sign_count == 1 and reg.stats.retries == 0
