"""GitLabRegistry.read_range, redirects to storage, status mapping and retries.

The fake GitLab and its object storage answer on two local origins over real sockets, so every
read here runs the byte transport (registry/http/transport.py), the byte path production
uses, once on each of its two ways
(`byte_path`: trio-native small fetch, worker-thread http.client).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import httpx
import pytest
from registry_fake import JOB_TOKEN, TOKEN, FakeGitLab, Sleeps

from mlregfs.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    ProtocolError,
    RateLimited,
    RegistryError,
    RegistryTimeout,
    RegistryUnavailable,
    ServerError,
    TooLarge,
    Unauthorized,
)
from mlregfs.registry.gitlab import GitLabRegistry, signed_url_lifetime
from mlregfs.registry.retry import RetryPolicy
from mlregfs.registry.types import Candidate, ModelVersion, RemoteFile

pytestmark = pytest.mark.usefixtures("byte_path")
Make = Callable[..., GitLabRegistry]
DATA = bytes(range(256)) * 40  # 10240 bytes, every offset distinguishable
AUTH_HEADERS = ("Authorization", "PRIVATE-TOKEN", "JOB-TOKEN")


async def _setup(
    gitlab: FakeGitLab, reg: GitLabRegistry, path: str = "dir/my model+1.bin"
) -> tuple[ModelVersion, RemoteFile]:
    mv = gitlab.add_version("bert", "1.0.0")
    gitlab.add_file(gitlab.packages[-1], path, DATA)
    owner = ModelVersion("bert", "1.0.0", id=mv, created_at=0)
    (file,) = await reg.list_files(owner)
    return owner, file


def _downloads(gitlab: FakeGitLab) -> list[httpx.Request]:
    return [r for r in gitlab.requests if "/files/" in r.url.path or gitlab.is_storage(r)]


# ---------------------------------------------------------------------------- Range


async def test_206_range_exact_bytes_and_encoded_url(
    gitlab: FakeGitLab, make_registry: Make
) -> None:
    gitlab.download_chunk = 7  # many small chunks into one buffer
    reg = make_registry()
    owner, file = await _setup(gitlab, reg)
    got = await reg.read_range(owner, file, 100, 1100)
    # the receive buffer itself (no bytes() copy of it), as production gets it
    assert got == DATA[100:1100] and isinstance(got, bytes | bytearray)
    req = _downloads(gitlab)[-1]
    assert req.url.raw_path == (
        f"/api/v4/projects/7/packages/ml_models/{owner.id}/files/dir/my%20model%2B1.bin".encode()
    )
    assert req.headers["Range"] == "bytes=100-1099"
    assert req.headers["Authorization"] == f"Bearer {TOKEN}"
    assert "PRIVATE-TOKEN" not in req.headers  # ml_models ignores it (§7)
    assert reg.stats.bytes_downloaded == 1000
    assert reg.stats.by_kind["read"] == 1


async def test_whole_file_and_empty_range(gitlab: FakeGitLab, make_registry: Make) -> None:
    reg = make_registry()
    owner, file = await _setup(gitlab, reg)
    assert await reg.read_range(owner, file, 0, len(DATA)) == DATA
    n = len(gitlab.requests)
    assert await reg.read_range(owner, file, 5, 5) == b""
    assert len(gitlab.requests) == n  # no request for nothing


async def test_invalid_ranges_refused_locally(gitlab: FakeGitLab, make_registry: Make) -> None:
    reg = make_registry()
    owner, file = await _setup(gitlab, reg)
    for start, end in ((5, 4), (-1, 3), (0, len(DATA) + 1)):
        with pytest.raises(ValueError):
            await reg.read_range(owner, file, start, end)


async def test_200_ignoring_range_is_sliced(gitlab: FakeGitLab, make_registry: Make) -> None:
    gitlab.honour_range = False
    gitlab.download_chunk = 1000  # the wanted range starts and ends inside chunks
    reg = make_registry()
    owner, file = await _setup(gitlab, reg)
    assert await reg.read_range(owner, file, 2500, 4321) == DATA[2500:4321]
    # Stopped reading once `end` was reached: 4321 bytes off the socket, not the whole 10240
    # (through MockTransport this was 5 chunks of 1000).
    assert reg.stats.bytes_downloaded == 4321


async def test_short_body_is_retried_like_a_dropped_connection(
    gitlab: FakeGitLab, make_registry: Make
) -> None:
    """Issue 9.7: a body cut short gets the full retry budget (not max_protocol_attempts) and
    does not switch on the fail-fast outage mode: the server did answer."""
    gitlab.short_body = 10
    reg = make_registry()
    owner, file = await _setup(gitlab, reg)
    with pytest.raises(RegistryUnavailable, match="cut short, got 990 of 1000"):
        await reg.read_range(owner, file, 0, 1000)
    assert len(_downloads(gitlab)) == 5
    assert reg.stats.retries == 4 and reg.stats.errors == 1
    gitlab.short_body = 0

    def short(r: httpx.Request) -> httpx.Response:
        return httpx.Response(
            206, headers={"Content-Range": f"bytes 0-99/{len(DATA)}"}, content=DATA[:50]
        )

    gitlab.fail("/files/", short, short, short)  # right after a failure: still 4 attempts
    assert await reg.read_range(owner, file, 0, 100) == DATA[:100]


async def test_short_body_recovers_on_retry(gitlab: FakeGitLab, make_registry: Make) -> None:
    reg = make_registry()
    owner, file = await _setup(gitlab, reg)
    gitlab.fail(
        "/files/",
        lambda r: httpx.Response(
            206, headers={"Content-Range": f"bytes 0-99/{len(DATA)}"}, content=DATA[:50]
        ),
    )
    assert await reg.read_range(owner, file, 0, 100) == DATA[:100]


@pytest.mark.parametrize(
    "content_range",
    ["bytes 0-99/10240", "bytes 10-108/10240", "", "bytes */10240", "items 10-109/10240"],
)
async def test_mismatched_content_range_refused(
    gitlab: FakeGitLab, make_registry: Make, content_range: str
) -> None:
    reg = make_registry(retry=RetryPolicy(max_attempts=1))
    owner, file = await _setup(gitlab, reg)
    gitlab.fail(
        "/files/",
        lambda r: httpx.Response(206, headers={"Content-Range": content_range}, content=b"x" * 100),
    )
    with pytest.raises(ProtocolError, match="Content-Range"):
        await reg.read_range(owner, file, 10, 110)


async def test_size_change_detected_and_not_retried(
    gitlab: FakeGitLab, make_registry: Make
) -> None:
    reg = make_registry()
    owner, file = await _setup(gitlab, reg)
    gitlab.fail(
        "/files/",
        lambda r: httpx.Response(206, headers={"Content-Range": "bytes 0-9/99"}, content=b"0" * 10),
    )
    with pytest.raises(ProtocolError, match="changed on the registry"):
        await reg.read_range(owner, file, 0, 10)
    assert reg.stats.retries == 0


async def test_candidate_read_route(gitlab: FakeGitLab, make_registry: Make) -> None:
    pkg = gitlab.add_package("ml_experiment_1", "candidate_12")
    gitlab.add_file(pkg, "a b/c.bin", DATA)
    reg = make_registry()
    owner = Candidate(iid=12, created_at=0)
    (file,) = await reg.list_files(owner)
    assert await reg.read_range(owner, file, 1, 3) == DATA[1:3]
    assert _downloads(gitlab)[-1].url.raw_path.endswith(
        b"/packages/ml_models/candidate:12/files/a%20b/c.bin"
    )


async def test_packages_only_mode_downloads_by_file_id(
    gitlab: FakeGitLab, make_registry: Make
) -> None:
    gitlab.mlflow_enabled = False
    gitlab.add_version("bert", "1.0.0")
    f = gitlab.add_file(gitlab.packages[-1], "w.bin", DATA)
    reg = make_registry(token=JOB_TOKEN, token_kind="job")
    (model,) = await reg.list_models()
    (version,) = model.versions
    (file,) = await reg.list_files(version)
    assert await reg.read_range(version, file, 0, 64) == DATA[:64]
    req = gitlab.requests[-1]
    want = f"/api/v4/projects/group%2Fproj/packages/{f.package_id}/package_files/{f.id}/download"
    assert req.url.raw_path == want.encode()
    assert req.headers["JOB-TOKEN"] == JOB_TOKEN


# ---------------------------------------------------------------------------- 302 + signed URLs


async def test_redirect_followed_without_any_gitlab_credential(
    gitlab: FakeGitLab, make_registry: Make
) -> None:
    gitlab.redirect = True
    reg = make_registry()
    owner, file = await _setup(gitlab, reg)
    assert await reg.read_range(owner, file, 3, 300) == DATA[3:300]
    gl, storage = _downloads(gitlab)
    assert gl.headers["Authorization"] == f"Bearer {TOKEN}"
    assert gitlab.is_storage(storage) and not gitlab.is_storage(gl)
    assert not any(h in storage.headers for h in AUTH_HEADERS)
    assert storage.headers["Range"] == "bytes=3-299"
    assert reg.stats.by_kind["read_storage"] == 1


async def test_signed_url_reused_then_resigned_after_403(
    gitlab: FakeGitLab, make_registry: Make, sleeps: Sleeps
) -> None:
    gitlab.redirect = True
    reg = make_registry()
    owner, file = await _setup(gitlab, reg)
    await reg.read_range(owner, file, 0, 10)
    await reg.read_range(owner, file, 10, 20)
    assert gitlab.sign_count == 1  # second read went straight to storage
    first_url = str(_downloads(gitlab)[-1].url)
    gitlab.storage_refuse.add(first_url)  # the signature expired early
    assert await reg.read_range(owner, file, 20, 30) == DATA[20:30]
    assert gitlab.sign_count == 2
    kinds = [("st" if gitlab.is_storage(r) else "gl") for r in _downloads(gitlab)]
    assert kinds == ["gl", "st", "st", "st", "gl", "st"]
    assert sleeps.delays == []  # re-signing is immediate, not a backoff retry
    # The cache entry expires with time: after 60 s GitLab is asked again.
    sleeps.now += 61
    await reg.read_range(owner, file, 0, 1)
    assert gitlab.sign_count == 3


async def test_signed_url_short_lifetime_not_cached(
    gitlab: FakeGitLab, make_registry: Make
) -> None:
    gitlab.redirect = True
    gitlab.signed_expires = 3  # below the safety margin
    reg = make_registry()
    owner, file = await _setup(gitlab, reg)
    await reg.read_range(owner, file, 0, 10)
    await reg.read_range(owner, file, 0, 10)
    assert gitlab.sign_count == 2


async def test_fresh_signed_url_refused_is_forbidden(
    gitlab: FakeGitLab, make_registry: Make
) -> None:
    reg = make_registry()
    owner, file = await _setup(gitlab, reg)
    gitlab.fail(
        "/files/",
        lambda r: httpx.Response(302, headers={"Location": f"{gitlab.storage_origin}/bucket/1"}),
    )
    gitlab.storage_refuse.add(f"{gitlab.storage_origin}/bucket/1")
    with pytest.raises(Forbidden, match=r"GET /bucket/1 -> 403"):
        await reg.read_range(owner, file, 0, 10)


def test_signed_url_lifetime_parsing() -> None:
    now = 1_700_000_000.0
    amz = "https://s/b/k?X-Amz-Date=20231114T221320Z&X-Amz-Expires=600&X-Amz-Signature=x"
    assert signed_url_lifetime(amz, now) == pytest.approx(600.0)  # 20231114T221320Z == now
    assert signed_url_lifetime("https://s/b/k?x-goog-expires=90", now) == 90
    assert signed_url_lifetime(f"https://s/b/k?Expires={int(now) + 42}", now) == 42
    assert signed_url_lifetime("https://s/b/k", now) == float("inf")


# ---------------------------------------------------------------------------- status mapping


@pytest.mark.parametrize(
    ("status", "body", "exc"),
    [
        (400, {"message": "400 Bad request - Artifact file is too large"}, TooLarge),
        (400, {"error": "file_name is invalid"}, BadRequest),
        (401, {"message": "401 Unauthorized"}, Unauthorized),
        (403, {"message": "403 Forbidden"}, Forbidden),
        (404, {"message": "404 Not found"}, NotFound),
        (409, {"message": "conflict"}, Conflict),
    ],
)
async def test_status_mapping_without_retry(
    gitlab: FakeGitLab, make_registry: Make, status: int, body: object, exc: type[RegistryError]
) -> None:
    reg = make_registry()
    owner, file = await _setup(gitlab, reg)
    gitlab.fail("/files/", lambda r: httpx.Response(status, json=body))
    with pytest.raises(exc) as info:
        await reg.read_range(owner, file, 0, 10)
    assert info.value.status == status
    assert f"-> {status}" in str(info.value) and "GET /api/v4/projects/7/" in str(info.value)
    assert reg.stats.retries == 0


async def test_error_detail_is_truncated_and_html_summarised(
    gitlab: FakeGitLab, make_registry: Make
) -> None:
    reg = make_registry()
    await reg.project()
    gitlab.fail("/packages$", lambda r: httpx.Response(400, json={"message": "x" * 5000}))
    with pytest.raises(BadRequest) as info:
        await reg.list_files(Candidate(iid=1, created_at=0))
    assert len(str(info.value)) < 300
    gitlab.fail("/packages$", lambda r: httpx.Response(403, text="<html><body>nope</body></html>"))
    with pytest.raises(Forbidden, match=r"\(HTML page\)"):
        await reg.list_files(Candidate(iid=1, created_at=0))


async def test_query_string_never_in_messages(gitlab: FakeGitLab, make_registry: Make) -> None:
    reg = make_registry()
    await reg.project()
    gitlab.fail("/packages$", lambda r: httpx.Response(404, json={"message": "404 Not Found"}))
    with pytest.raises(NotFound) as info:
        await reg.list_files(ModelVersion("bert", "1.0.0", id=1, created_at=0))
    assert "?" not in str(info.value) and "package_name" not in str(info.value)


# ---------------------------------------------------------------------------- retries


def _status(status: int, headers: dict[str, str] | None = None) -> Callable[..., httpx.Response]:
    return lambda r: httpx.Response(status, json={"message": f"{status}"}, headers=headers)


async def test_503_then_success_backs_off(
    gitlab: FakeGitLab, make_registry: Make, sleeps: Sleeps
) -> None:
    gitlab.fail(r"/projects/[^/]+$", _status(503), _status(502))
    reg = make_registry()
    assert (await reg.project()).id == 7
    assert len(sleeps.delays) == 2 and 0 < sleeps.delays[0] < sleeps.delays[1]
    assert reg.stats.retries == 2 and reg.stats.errors == 0 and reg.stats.by_kind["project"] == 3


async def test_503_gives_up_after_max_attempts(
    gitlab: FakeGitLab, make_registry: Make, sleeps: Sleeps
) -> None:
    gitlab.fail(r"/projects/[^/]+$", *[_status(503)] * 10)
    reg = make_registry()
    with pytest.raises(ServerError, match="503"):
        await reg.project()
    assert reg.stats.by_kind["project"] == 5 and len(sleeps.delays) == 4


async def test_429_honours_retry_after(
    gitlab: FakeGitLab, make_registry: Make, sleeps: Sleeps
) -> None:
    gitlab.fail(r"/projects/[^/]+$", _status(429, {"Retry-After": "7"}))
    await make_registry().project()
    assert sleeps.delays == [7.0]


async def test_429_gives_up_at_the_deadline(
    gitlab: FakeGitLab, make_registry: Make, sleeps: Sleeps
) -> None:
    gitlab.fail(r"/projects/[^/]+$", *[_status(429, {"Retry-After": "12"})] * 10)
    reg = make_registry()
    with pytest.raises(RateLimited):
        await reg.project()
    assert sleeps.delays == [12.0, 12.0]  # a third wait would pass the 30 s deadline


async def test_4xx_never_retried(gitlab: FakeGitLab, make_registry: Make, sleeps: Sleeps) -> None:
    gitlab.fail(r"/projects/[^/]+$", _status(400))
    with pytest.raises(BadRequest):
        await make_registry().project()
    assert sleeps.delays == []


async def test_range_read_retried_on_5xx(gitlab: FakeGitLab, make_registry: Make) -> None:
    reg = make_registry()
    owner, file = await _setup(gitlab, reg)
    gitlab.fail("/files/", _status(500), _status(503))
    assert await reg.read_range(owner, file, 0, 10) == DATA[:10]
    assert reg.stats.by_kind["read"] == 3


async def test_connection_error_is_unavailable(sleeps: Sleeps) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    reg = GitLabRegistry(
        "https://gitlab.example/g/p",
        TOKEN,
        transport=httpx.MockTransport(refuse),
        sleep=sleeps.sleep,
        clock=sleeps.clock,
    )
    with pytest.raises(RegistryUnavailable, match="Connection refused") as info:
        await reg.project()
    assert not isinstance(info.value, RegistryTimeout)
    assert reg.stats.requests == 5 and reg.stats.errors == 1
    await reg.aclose()


async def test_timeout_is_registry_timeout(sleeps: Sleeps) -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    reg = GitLabRegistry(
        "https://gitlab.example/g/p",
        TOKEN,
        transport=httpx.MockTransport(slow),
        sleep=sleeps.sleep,
        clock=sleeps.clock,
        timeout=2.5,
        retry=RetryPolicy(max_attempts=2),
    )
    with pytest.raises(RegistryTimeout, match=r"no answer within 2.5 s"):
        await reg.project()
    await reg.aclose()


# ---------------------------------------------------------------------------- secrets


async def test_token_absent_from_errors_logs_and_repr(
    gitlab: FakeGitLab, make_registry: Make, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # A server that echoes the token back must not get it into our messages either.
    echo = lambda r: httpx.Response(500, json={"message": f"bad token {TOKEN}"})  # noqa: E731
    gitlab.fail(r"/projects/[^/]+$", *[echo] * 5)
    reg = make_registry()
    with pytest.raises(ServerError) as info:
        await reg.project()
    texts = [str(info.value), repr(info.value), repr(reg), caplog.text]
    texts += [str(r.url) for r in gitlab.requests]
    assert all(TOKEN not in t for t in texts)
    assert "[token]" in str(info.value)


async def test_known_outage_fails_fast_then_recovers(sleeps: Sleeps) -> None:
    up = False

    def flaky(request: httpx.Request) -> httpx.Response:
        if not up:
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        return httpx.Response(200, json={"id": 7, "path_with_namespace": "g/p"})

    reg = GitLabRegistry(
        "https://gitlab.example/g/p",
        TOKEN,
        transport=httpx.MockTransport(flaky),
        sleep=sleeps.sleep,
        clock=sleeps.clock,
    )
    with pytest.raises(RegistryUnavailable):
        await reg.project()
    assert reg.stats.requests == 5  # the first failure gets the full retry budget
    with pytest.raises(RegistryUnavailable):
        await reg.project()
    assert reg.stats.requests == 6  # inside the outage window: one attempt, no backoff
    sleeps.now += 10  # the window has passed: full budget again, and the server is back
    up = True
    assert (await reg.project()).id == 7
    await reg.aclose()
