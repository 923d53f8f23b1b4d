"""GitLabRegistry against a hostile or broken registry (issue 9 items 3-7).

MockTransport tests for validation and page bounds; a real `mlregfs serve` behind
tests/hostile.py for deadlines, abandoned threads and poisoned keep-alive connections, each
run on both ways the byte transport (registry/http/transport.py) carries a range
(`byte_path`: trio-native, worker thread).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from registry_fake import SOURCE, TOKEN, FakeGitLab, Sleeps

from mlregfs.cache.meta import MetadataCache
from mlregfs.errors import ProtocolError, RegistryTimeout
from mlregfs.registry import validate
from mlregfs.registry.gitlab import GitLabRegistry
from mlregfs.registry.gitlab.pages import MAX_PAGES
from mlregfs.registry.retry import RetryPolicy
from mlregfs.registry.types import ModelVersion, RemoteFile
from mlregfs.testing import ServerProcess
from tests.hostile import HostileProxy

Make = Callable[..., GitLabRegistry]
GOOD = "ab" * 32


# --------------------------------------------------------------------------- validate


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), ("", None), (GOOD, GOOD), (GOOD.upper(), GOOD)],
)
def test_sha256_accepted_and_lowercased(value: Any, expected: str | None) -> None:
    assert validate.sha256(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "../../x",
        "/etc",
        "ab" * 31,
        "ab" * 33,
        "g" * 64,
        " " + "a" * 63,
        12,
        ["a" * 64],
        "a" * 64 + "\n",
    ],
)
def test_sha256_refused(value: Any) -> None:
    with pytest.raises(validate.Invalid):
        validate.sha256(value)


@pytest.mark.parametrize("value", [-1, 1 << 53, True, False, 1.0, "12", None, math.inf])
def test_size_refused(value: Any) -> None:
    with pytest.raises(validate.Invalid):
        validate.size(value)


def test_size_and_ident_accepted() -> None:
    assert validate.size(0) == 0 and validate.size((1 << 53) - 1) == (1 << 53) - 1
    assert validate.ident(7) == 7 and validate.ident("42") == 42


@pytest.mark.parametrize("value", [0, -3, True, "0x1", "", "1e3", "²", 1 << 63, 2.0, None])
def test_ident_refused(value: Any) -> None:
    with pytest.raises(validate.Invalid):
        validate.ident(value)


@pytest.mark.parametrize(
    "value",
    ["", ".", "..", "a/b", "a\x00b", "a\nb", "esc\x1b[31m", "del\x7f", "c1\x85", "c1\x9b",
     "x" * 256, "é" * 128, "\udcff", 5],
)  # fmt: skip
def test_name_refused(value: Any) -> None:
    with pytest.raises(validate.Invalid):
        validate.name(value)


def test_name_accepted_and_shown_escaped() -> None:
    assert validate.name("model v2+1 (ü).bin") == "model v2+1 (ü).bin"
    assert validate.name("é" * 127) == "é" * 127  # 254 bytes
    text = validate.shown("a\x1b[2J" + "x" * 500)
    assert "\x1b" not in text and len(text) <= validate.REPR_CHARS


@pytest.mark.parametrize("value", ["1.0", "v1.0.0", "1.0.0/..", "1.0.0\n", "01.0.0", None])
def test_semver_refused(value: Any) -> None:
    with pytest.raises(validate.Invalid):
        validate.semver(value)


@pytest.mark.parametrize(
    "value",
    [
        "file:///etc/passwd",
        "ftp://h/x",
        "http:///x",
        "https://u:p@h/x",
        "http://h/a b",
        "http://[zz/",  # urlsplit itself raises ValueError: still Invalid, never a crash
    ],
)
def test_url_refused(value: str) -> None:
    with pytest.raises(validate.Invalid):
        validate.url(value)


# --------------------------------------------------------------------------- listings


def _rows(pkg: int, rows: list[dict[str, Any]]) -> Callable[[httpx.Request], httpx.Response]:
    def answer(request: httpx.Request) -> httpx.Response:
        full = [
            {"id": 1000 + i, "package_id": pkg, "size": 1, "file_sha256": GOOD, **r}
            for i, r in enumerate(rows)
        ]
        return httpx.Response(200, json=full, headers={"X-Next-Page": ""})

    return answer


async def test_invalid_file_rows_are_dropped_not_used(
    gitlab: FakeGitLab, make_registry: Make, caplog: pytest.LogCaptureFixture
) -> None:
    """Item 3: only entries whose every value is valid are listed; the rest is logged."""
    mv = gitlab.add_version("bert", "1.0.0")
    pkg = gitlab.packages[-1]
    bad: list[dict[str, Any]] = [
        {"file_name": "abs.bin", "file_sha256": "/tmp/victim"},
        {"file_name": "rel.bin", "file_sha256": "../../x"},
        {"file_name": "short.bin", "file_sha256": "abc"},
        {"file_name": "neg.bin", "size": -1},
        {"file_name": "bool.bin", "size": True},
        {"file_name": "huge.bin", "size": 1 << 53},
        {"file_name": "str.bin", "size": "12"},
        {"file_name": "zero-id.bin", "id": 0},
        {"file_name": "bool-id.bin", "id": True},
        {"file_name": "pkg.bin", "package_id": -4},
        {"file_name": "..%2Fescape.bin"},
        {"file_name": "a%2F..%2Fb.bin"},
        {"file_name": "nl%0A.bin"},
        {"file_name": "esc\x1b[31m.bin"},
        {"file_name": "c1%C2%9B.bin"},
        {"file_name": "x" * 256},
        {"file_name": 7},
    ]
    good: list[dict[str, Any]] = [
        {"file_name": "upper.bin", "file_sha256": GOOD.upper()},
        {"file_name": "null.bin", "file_sha256": None},
        {"file_name": "dir%2Fok.bin", "created_at": 1e308},
    ]
    gitlab.fail("/package_files", _rows(pkg.id, bad + good))
    owner = ModelVersion("bert", "1.0.0", id=mv, created_at=0)
    files = {f.path: f for f in await make_registry().list_files(owner)}
    assert sorted(files) == ["dir/ok.bin", "null.bin", "upper.bin"]
    assert files["upper.bin"].sha256 == GOOD and files["null.bin"].sha256 is None
    assert files["dir/ok.bin"].created_at == 0.0  # an unusable time is "unknown"
    dropped = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert len(dropped) == len(bad)
    assert all("\x1b" not in r.getMessage() and "\n" not in r.getMessage() for r in dropped)


async def test_newest_copy_invalid_drops_the_name(gitlab: FakeGitLab, make_registry: Make) -> None:
    """An invalid newest copy is not replaced by an older copy's metadata."""
    mv = gitlab.add_version("bert", "1.0.0")
    rows = [{"file_name": "w.bin", "id": 5}, {"file_name": "w.bin", "id": 6, "file_sha256": "zz"}]
    gitlab.fail("/package_files", _rows(gitlab.packages[-1].id, rows))
    owner = ModelVersion("bert", "1.0.0", id=mv, created_at=0)
    assert await make_registry().list_files(owner) == []


async def test_invalid_models_versions_and_candidates_are_dropped(
    gitlab: FakeGitLab, make_registry: Make
) -> None:
    def search(request: httpx.Request) -> httpx.Response:
        def model(name: Any, *versions: tuple[Any, Any]) -> dict[str, Any]:
            latest = [{"version": i, "aliases": [v]} for i, v in versions]
            return {"name": name, "latest_versions": latest}

        models = [
            model("ok", ("1", "1.0.0"), ("0", "2.0.0"), ("3", "../.."), ("4", "1.0.0\n")),
            model("team/nested", ("5", "0.1.0")),
            model("bad\x1bname", ("6", "1.0.0")),
            model("a//b", ("7", "1.0.0")),
            model("../up", ("8", "1.0.0")),
            model(None, ("9", "1.0.0")),
        ]
        return httpx.Response(200, json={"registered_models": models, "next_page_token": None})

    gitlab.fail("registered-models/search", search)
    models = {m.name: m for m in await make_registry().list_models()}
    assert sorted(models) == ["ok", "team/nested"]
    assert [(v.version, v.id) for v in models["ok"].versions] == [("1.0.0", 1)]


async def test_version_metadata_and_runs_are_checked(
    gitlab: FakeGitLab, make_registry: Make, caplog: pytest.LogCaptureFixture
) -> None:
    """Descriptions and run ids shown in xattrs are untrusted: escapes and odd ids are dropped;
    a runs/get answer keeps only the entries that can be shown."""
    run = "0f3c9a8e-6f1d-4a43-9b7e-2d5c8f1e0a11"

    def search(request: httpx.Request) -> httpx.Response:
        versions = [
            {"version": "1", "aliases": ["1.0.0"], "description": "ok\nline", "run_id": run},
            {
                "version": "2",
                "aliases": ["2.0.0"],
                "description": "\x1b]0;pwn\x07",
                "run_id": "../x",
            },
            {"version": "3", "aliases": ["3.0.0"], "description": 7, "run_id": ["a"]},
        ]
        rm = {"name": "m", "description": "d" * 70000, "latest_versions": versions}
        return httpx.Response(200, json={"registered_models": [rm], "next_page_token": None})

    gitlab.fail("registered-models/search", search)
    reg = make_registry()
    [m] = await reg.list_models()
    assert m.description is None  # over 64 KiB
    got = [(v.version, v.description, v.run_id) for v in m.versions]
    assert got == [("1.0.0", "ok\nline", run), ("2.0.0", None, None), ("3.0.0", None, None)]

    def runs_get(request: httpx.Request) -> httpx.Response:
        assert request.url.params["run_id"] == run
        data = {
            "params": [{"key": "lr", "value": "0.1"}, {"key": "\x1b[2J", "value": "x"}],
            "metrics": [{"key": "loss", "value": "NaN"}, {"key": "acc", "value": 0.5, "step": 2}],
        }
        info = {"run_id": run, "status": "FINISHED", "experiment_id": "1"}
        return httpx.Response(200, json={"run": {"info": info, "data": data}})

    gitlab.fail("runs/get", runs_get)
    got_run = await reg.get_run(run)
    assert got_run.params == (("lr", "0.1"),)
    assert got_run.latest_metrics() == {"acc": 0.5}
    gitlab.fail("runs/get", lambda r: httpx.Response(200, json={"run": {"info": {"run_id": 5}}}))
    with pytest.raises(ProtocolError):
        await reg.get_run(run)
    assert all("\x1b" not in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- pagination


def _endless(total_pages: str | None = None, repeat: bool = False) -> Any:
    def answer(request: httpx.Request) -> httpx.Response:
        page = int(request.url.params.get("page", "1"))
        n = 1 if repeat else page
        rows = [
            {"id": n * 1000 + i, "package_id": 1, "file_name": f"f{n}-{i}", "size": 1}
            for i in range(100)
        ]
        headers = {"X-Next-Page": str(page + 1)}
        if total_pages is not None:
            headers["X-Total-Pages"] = total_pages
        return httpx.Response(200, json=rows, headers=headers)

    return answer


async def _list_endless(gitlab: FakeGitLab, reg: GitLabRegistry, answer: Any) -> int:
    mv = gitlab.add_version("bert", "1.0.0")
    gitlab.fail("/package_files", *([answer] * 5000))
    owner = ModelVersion("bert", "1.0.0", id=mv, created_at=0)
    with pytest.raises(ProtocolError):
        await reg.list_files(owner)
    return sum(1 for r in gitlab.requests if r.url.path.endswith("/package_files"))


async def test_endless_offset_pages_stop_at_the_page_cap(
    gitlab: FakeGitLab, make_registry: Make
) -> None:
    """Item 6: a server that always announces another page: at most MAX_PAGES requests."""
    sent = await _list_endless(gitlab, make_registry(), _endless())
    assert sent == MAX_PAGES <= 1000


async def test_first_total_pages_is_believed_up_to_the_cap(
    gitlab: FakeGitLab, make_registry: Make
) -> None:
    # one page of slack for rows added while we list
    assert await _list_endless(gitlab, make_registry(), _endless(total_pages="3")) == 4


async def test_first_total_pages_over_the_cap_fails_at_once(
    gitlab: FakeGitLab, make_registry: Make
) -> None:
    assert await _list_endless(gitlab, make_registry(), _endless(total_pages="999999")) == 1


async def test_repeating_page_is_an_error(gitlab: FakeGitLab, make_registry: Make) -> None:
    assert await _list_endless(gitlab, make_registry(), _endless(repeat=True)) == 2


async def test_empty_page_ends_the_listing(gitlab: FakeGitLab, make_registry: Make) -> None:
    mv = gitlab.add_version("bert", "1.0.0")

    def answer(request: httpx.Request) -> httpx.Response:
        page = int(request.url.params.get("page", "1"))
        rows = [{"id": 7, "package_id": 1, "file_name": "only", "size": 1}] if page == 1 else []
        return httpx.Response(200, json=rows, headers={"X-Next-Page": str(page + 1)})

    gitlab.fail("/package_files", answer, answer, answer)
    owner = ModelVersion("bert", "1.0.0", id=mv, created_at=0)
    assert [f.path for f in await make_registry().list_files(owner)] == ["only"]


async def test_listing_deadline(gitlab: FakeGitLab, sleeps: Sleeps) -> None:
    """The whole listing is bounded in time, not only its pages."""
    ticks = iter(range(0, 10**6, 7))  # each clock read: 7 s later
    reg = GitLabRegistry(
        SOURCE,
        TOKEN,
        transport=gitlab.transport(),
        sleep=sleeps.sleep,
        clock=lambda: float(next(ticks)),
        listing_deadline=60.0,
    )
    try:
        sent = await _list_endless(gitlab, reg, _endless())
    finally:
        await reg.aclose()
    assert sent < 10


async def test_endless_mlflow_tokens_are_bounded(gitlab: FakeGitLab, make_registry: Make) -> None:
    counter = iter(range(10**6))

    def answer(request: httpx.Request) -> httpx.Response:
        n = next(counter)
        models = [{"name": f"m{n}", "latest_versions": []}]
        return httpx.Response(200, json={"registered_models": models, "next_page_token": f"t{n}"})

    gitlab.fail("registered-models/search", *([answer] * 5000))
    with pytest.raises(ProtocolError):
        await make_registry().list_models()
    sent = sum(1 for r in gitlab.requests if "registered-models/search" in r.url.path)
    assert sent <= MAX_PAGES


# --------------------------------------------------------------------------- real server


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with ServerProcess(tmp_path_factory.mktemp("hostile-srv")) as srv:
        st = srv.store
        st.create_project("t/p", "private")
        token = st.create_token("t/p", "developer")
        st.create_model("t/p", "m")
        v = st.create_version("t/p", "m", "1.0.0")
        data = bytes(range(256)) * 64
        st.add_file("t/p", v, "w.bin", data)
        yield {"server": srv, "token": token, "data": data}


@pytest.fixture
def proxy(served: dict[str, Any]) -> Iterator[HostileProxy]:
    with HostileProxy(served["server"].url) as p:
        p.drip_limit = 30
        yield p


async def _until(cond: Callable[[], bool]) -> None:
    """Poll a condition the proxy's threads change (no trio.Event can cross over)."""
    while not cond():  # noqa: ASYNC110
        await trio.sleep(0.05)


async def _file(reg: GitLabRegistry) -> tuple[ModelVersion, RemoteFile]:
    (model,) = await reg.list_models()
    owner = model.versions[0]
    (f,) = await reg.list_files(owner)
    return owner, f


def _registry(proxy: HostileProxy, served: dict[str, Any], **kw: Any) -> GitLabRegistry:
    return GitLabRegistry(f"{proxy.url}/t/p", served["token"], **kw)


@pytest.mark.usefixtures("byte_path")
async def test_dripping_body_is_cut_at_the_total_deadline(
    proxy: HostileProxy, served: dict[str, Any]
) -> None:
    """Item 5: `timeout` bounds a whole request; the operation ends by `retry_deadline`."""
    # a byte a second never trips a 2 s per-read socket timeout: only a total deadline helps
    async with _registry(proxy, served, timeout=2.0, retry=RetryPolicy(deadline=4.5)) as reg:
        owner, f = await _file(reg)
        proxy.drip = lambda path: path.endswith("/w.bin")
        t0 = time.monotonic()
        with pytest.raises(RegistryTimeout):
            await reg.read_range(owner, f, 0, f.size)
        assert time.monotonic() - t0 < 9
        assert proxy.faults["drip"] >= 2  # retried within the deadline


async def test_dripping_listing_is_cut_at_the_total_deadline(
    proxy: HostileProxy, served: dict[str, Any]
) -> None:
    async with _registry(proxy, served, timeout=2.0, retry=RetryPolicy(deadline=4.5)) as reg:
        await reg.project()
        proxy.drip = lambda path: path.endswith("registered-models/search")
        t0 = time.monotonic()
        with pytest.raises(RegistryTimeout):
            await reg.list_models()
        assert time.monotonic() - t0 < 9


@pytest.mark.usefixtures("byte_path")
async def test_cancelled_read_abandons_its_thread_and_aclose_cuts_it(
    proxy: HostileProxy, served: dict[str, Any]
) -> None:
    """A caller that goes away (unmount) is not held by a worker thread in a socket read,
    and the abandoned thread's connection is cut so it ends too."""
    reg = _registry(proxy, served, timeout=60.0, retry=RetryPolicy(deadline=120))
    owner, f = await _file(reg)
    proxy.drip = lambda path: path.endswith("/w.bin")
    with trio.move_on_after(20) as outer:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reg.read_range, owner, f, 0, f.size)
            await _until(lambda: proxy.faults["drip"] >= 1)
            t0 = time.monotonic()
            nursery.cancel_scope.cancel()
    assert not outer.cancelled_caught, "the read ignored its cancellation"
    assert time.monotonic() - t0 < 2
    await reg.aclose()
    with trio.fail_after(15):
        await _until(lambda: proxy.faults["drip_cut"] >= 1)  # the proxy saw it go away


@pytest.mark.usefixtures("byte_path")
@pytest.mark.parametrize("fault", ["bad_content_range", "gzip"])
async def test_broken_answer_does_not_poison_the_next_request(
    proxy: HostileProxy, served: dict[str, Any], fault: str
) -> None:
    """Item 7: after a refused answer the connection is discarded; the next request on the
    same worker thread gets a clean connection (no ResponseNotReady)."""
    async with _registry(proxy, served, retry=RetryPolicy(max_attempts=1)) as reg:
        owner, f = await _file(reg)
        setattr(proxy, fault, 1)
        with pytest.raises(ProtocolError):
            await reg.read_range(owner, f, 0, 100)
        for _ in range(3):
            assert await reg.read_range(owner, f, 100, 200) == served["data"][100:200]
        assert proxy.faults[fault] == 1


@pytest.mark.usefixtures("byte_path")
async def test_truncated_bodies_use_the_full_retry_budget(
    proxy: HostileProxy, served: dict[str, Any]
) -> None:
    """Item 7: at a 30 % truncation rate every read still succeeds (8 attempts each) and the
    registry is never taken for down (which would cut the next reads to one attempt)."""
    retry = RetryPolicy(max_attempts=8, base_delay=0.01, deadline=60)
    async with _registry(proxy, served, retry=retry) as reg:
        owner, f = await _file(reg)
        proxy.truncate_rate = 0.3
        for i in range(20):
            start = i * 100
            got = await reg.read_range(owner, f, start, start + 4000)
            assert got == served["data"][start : start + 4000]
        assert proxy.faults["truncate"] >= 5


# --------------------------------------------------------------------------- single flight


async def test_listing_fetch_stops_with_its_caller_and_waiters_fetch_anew() -> None:
    """Item 6: a listing fetch runs in its caller's task, so it stops when that caller goes
    away; a waiter then fetches itself instead of taking "None" for the answer."""
    meta = MetadataCache()
    started = trio.Event()
    calls: list[str] = []

    async def stalled() -> str:
        calls.append("stalled")
        started.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def fresh() -> str:
        calls.append("fresh")
        return "models"

    got: list[str] = []
    first = trio.CancelScope()

    async def caller() -> None:
        with first:
            await meta.get("models", stalled, 10.0)

    async def waiter() -> None:
        got.append(await meta.get("models", fresh, 10.0))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller)
            await started.wait()
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            first.cancel()
    assert got == ["models"] and calls == ["stalled", "fresh"]
