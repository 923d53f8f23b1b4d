"""Damaged or foreign local state: the catalog, pins and block tree are checked at start, and
what is unreadable or of the wrong shape is logged, set aside and rebuilt; files are private."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mlregfs import logs, status
from mlregfs.cache.blocks import BlockStore
from mlregfs.config import Config, from_options
from mlregfs.errors import RegistryUnavailable
from mlregfs.mount import prepare_cache_dir
from mlregfs.registry.catalog import CatalogRegistry
from mlregfs.registry.fake import InMemoryRegistry

OTHER_UID = 54321  # a uid no account uses: a second local user, without creating one


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def _aside(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.damaged-*"))


# -- catalog --------------------------------------------------------------------------------
CATALOG_SHAPES = {
    "list": b"[]",
    "files-list": b'{"files": []}',
    "garbage": b"\x00\xff{not json",
    "number": b"5",
    "models-not-list": b'{"models": {"a": 1}, "project": "x", "candidates": 3}',
}


def _files_part(root: Path) -> Path:
    [part] = (root / "files").glob("*.json")
    return part


@pytest.mark.parametrize("content", CATALOG_SHAPES.values(), ids=CATALOG_SHAPES.keys())
@pytest.mark.parametrize("part", ["models.json", "project.json", "candidates.json"])
async def test_damaged_catalog_is_set_aside_and_rebuilt(
    tmp_path: Path, content: bytes, part: str, caplog: pytest.LogCaptureFixture
) -> None:
    reg = InMemoryRegistry()
    v = reg.add_version("m", "1.0.0")
    reg.add_file(v, "a.bin", b"abc")
    root = tmp_path / "catalog" / "c"
    root.mkdir(parents=True)
    path = root / part
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING):
        cat = CatalogRegistry(reg, root)
    assert len(_aside(path)) == 1 and _aside(path)[0].read_bytes() == content
    assert str(path) in caplog.text
    await cat.project()
    models = await cat.list_models()
    files = await cat.list_files(models[0].versions[0])
    assert [f.path for f in files] == ["a.bin"]
    reg.down = True
    again = CatalogRegistry(reg, root)  # the rebuilt catalog is whole again
    assert await again.list_models() == models
    assert await again.list_files(models[0].versions[0]) == files
    assert len(_aside(path)) == 1


@pytest.mark.parametrize("content", CATALOG_SHAPES.values(), ids=CATALOG_SHAPES.keys())
async def test_damaged_files_part_is_set_aside_when_needed(tmp_path: Path, content: bytes) -> None:
    reg = InMemoryRegistry()
    v = reg.add_version("m", "1.0.0")
    reg.add_file(v, "a.bin", b"abc")
    root = tmp_path / "c"
    cat = CatalogRegistry(reg, root)
    await cat.list_files(v)
    part = _files_part(root)
    part.write_bytes(content)
    reg.down = True
    with pytest.raises(RegistryUnavailable):  # read on demand: damaged, so no answer
        await CatalogRegistry(reg, root).list_files(v)
    assert len(_aside(part)) == 1


async def test_catalog_part_that_is_a_directory(tmp_path: Path) -> None:
    reg = InMemoryRegistry()
    reg.add_version("m", "1.0.0")
    root = tmp_path / "c"
    (root / "models.json" / "inner").mkdir(parents=True)
    cat = CatalogRegistry(reg, root)
    await cat.list_models()
    assert (root / "models.json").is_file()
    assert json.loads((root / "models.json").read_text())["models"]
    assert (_aside(root / "models.json")[0] / "inner").is_dir()


async def test_catalog_directory_that_is_a_file(tmp_path: Path) -> None:
    reg = InMemoryRegistry()
    reg.add_version("m", "1.0.0")
    (tmp_path / "catalog").write_text("stray")
    root = tmp_path / "catalog" / "c"
    cat = CatalogRegistry(reg, root)
    await cat.list_models()
    assert (root / "models.json").is_file()
    assert _aside(tmp_path / "catalog")[0].read_text() == "stray"


async def test_malformed_entries_are_dropped_not_the_catalog(tmp_path: Path) -> None:
    reg = InMemoryRegistry()
    v = reg.add_version("m", "1.0.0")
    reg.add_file(v, "a.bin", b"abc")
    reg.add_candidate(4)
    root = tmp_path / "c"
    cat = CatalogRegistry(reg, root)
    await cat.project()
    models = await cat.list_models()
    files = await cat.list_files(models[0].versions[0])
    await cat.list_candidates()
    mpath, cpath, fpath = root / "models.json", root / "candidates.json", _files_part(root)
    data = json.loads(mpath.read_text())
    data["models"].append({"name": 5})
    data["models"].append("junk")
    data["models"][0]["versions"].append({"version": None})
    # held to the registry's own rules (registry/validate.py): no control characters, semver
    data["models"].append({**data["models"][0], "name": "evil\nname"})
    data["models"][0]["versions"].append({**data["models"][0]["versions"][0], "version": "v1"})
    mpath.write_text(json.dumps(data))
    cands = json.loads(cpath.read_text())
    cands["candidates"].append({"iid": "x"})
    cpath.write_text(json.dumps(cands))
    fdata = json.loads(fpath.read_text())
    [key] = fdata["files"]
    rows = fdata["files"][key]
    rows.append({"path": "b.bin", "size": -1})
    rows.append({**rows[0], "sha256": "../../etc"})
    rows.append({**rows[0], "path": "../escape"})
    rows.append({**rows[0], "path": "esc\x1b[31m.bin"})
    fpath.write_text(json.dumps(fdata))
    reg.down = True
    fresh = CatalogRegistry(reg, root)
    assert await fresh.list_models() == models
    assert await fresh.list_files(models[0].versions[0]) == files
    assert [c.iid for c in await fresh.list_candidates()] == [4]
    for p in (mpath, cpath, fpath):
        assert len(_aside(p)) == 1  # the original is kept for inspection, once
    CatalogRegistry(reg, root)
    assert len(_aside(mpath)) == 1


async def test_outage_with_an_emptied_catalog_is_an_outage(tmp_path: Path) -> None:
    reg = InMemoryRegistry()
    v = reg.add_version("m", "1.0.0")
    root = tmp_path / "c"
    root.mkdir()
    (root / "project.json").write_text('{"files": [], "project": 7}')
    reg.down = True
    cat = CatalogRegistry(reg, root)
    with pytest.raises(RegistryUnavailable):
        await cat.project()
    with pytest.raises(RegistryUnavailable):
        await cat.list_files(v)


async def test_catalog_is_private(tmp_path: Path) -> None:
    reg = InMemoryRegistry()
    reg.add_version("m", "1.0.0")
    root = tmp_path / "catalog" / "c"
    root.mkdir(parents=True, mode=0o755)
    os.chmod(tmp_path / "catalog", 0o755)
    os.chmod(root, 0o755)
    (root / "models.json").write_text("{}")
    os.chmod(root / "models.json", 0o644)
    old = os.umask(0o022)
    try:
        cat = CatalogRegistry(reg, root)
        await cat.list_models()
        await cat.list_files(reg._models["m"].versions[0])
    finally:
        os.umask(old)
    for d in (tmp_path / "catalog", root, root / "files"):
        assert _mode(d) == 0o700
    assert _mode(root / "models.json") == 0o600
    assert _mode(_files_part(root)) == 0o600


async def test_a_catalog_of_an_older_version_is_split_into_parts(tmp_path: Path) -> None:
    reg = InMemoryRegistry()
    v = reg.add_version("m", "1.0.0")
    reg.add_file(v, "a.bin", b"abc")
    root = tmp_path / "catalog" / "c"
    cat = CatalogRegistry(reg, root)
    await cat.project()
    models = await cat.list_models()
    files = await cat.list_files(v)
    legacy = {
        "project": json.loads((root / "project.json").read_text())["project"],
        "models": json.loads((root / "models.json").read_text())["models"],
        "files": json.loads(_files_part(root).read_text())["files"],
        "saved_at": 1.0,
    }
    for p in [*root.rglob("*.json")]:
        p.unlink()
    old = tmp_path / "catalog" / "c.json"
    old.write_text(json.dumps(legacy))
    reg.down = True
    fresh = CatalogRegistry(reg, root)  # offline start right after an upgrade
    assert not old.exists()
    assert await fresh.list_models() == models
    assert await fresh.list_files(v) == files


async def test_an_unchanged_listing_is_not_rewritten(tmp_path: Path) -> None:
    reg = InMemoryRegistry()
    v = reg.add_version("m", "1.0.0")
    reg.add_file(v, "a.bin", b"abc")
    root = tmp_path / "c"
    cat = CatalogRegistry(reg, root)
    await cat.list_models()
    await cat.list_files(v)
    before = {p: os.stat(p).st_ino for p in root.rglob("*.json")}
    os.utime(root / "models.json", (1, 1))
    await cat.list_models()
    await cat.list_files(v)
    assert {p: os.stat(p).st_ino for p in root.rglob("*.json")} == before  # not replaced
    saved = cat.saved_at("models")
    assert saved is not None and saved > 1  # but marked as confirmed now
    reg.add_file(v, "b.bin", b"new")
    await cat.list_files(v)
    assert os.stat(_files_part(root)).st_ino != before[_files_part(root)]


# -- pins -----------------------------------------------------------------------------------
PIN_SHAPES = {
    "number": b"5",
    "object": b"{}",
    "garbage": b"\xff\xfe[",
    "bad-keys": b'["../x", 3, "ok-key"]',
}


@pytest.mark.parametrize("content", PIN_SHAPES.values(), ids=PIN_SHAPES.keys())
def test_damaged_pins_are_set_aside(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "v2").mkdir()
    pins = tmp_path / "v2" / "pins.json"
    pins.write_bytes(content)
    with caplog.at_level(logging.WARNING):
        store = BlockStore(tmp_path, 1 << 20)
    assert str(pins) in caplog.text
    assert store.pins <= {"ok-key"}
    kept = list((tmp_path / "damaged").glob("pins.json.damaged-*"))
    assert [p.read_bytes() for p in kept] == [content]
    store.pin("k1")
    assert BlockStore(tmp_path, 1 << 20).pins == store.pins | {"k1"}


def test_pins_that_are_a_directory(tmp_path: Path) -> None:
    (tmp_path / "v2" / "pins.json").mkdir(parents=True)
    store = BlockStore(tmp_path, 1 << 20)
    store.pin("k1")
    assert BlockStore(tmp_path, 1 << 20).pins == {"k1"}


# -- block tree -----------------------------------------------------------------------------
def _with_block(tmp_path: Path, key: str = "abkey") -> tuple[BlockStore, Path]:
    store = BlockStore(tmp_path, 1 << 20)
    store.put(key, 0, b"x" * 100)
    kdir = tmp_path / "v2" / key[:2] / key
    (kdir / "verified").write_text("{}")  # a marker (its content is checked elsewhere)
    return store, kdir


def test_stray_entries_in_the_block_tree(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, kdir = _with_block(tmp_path)
    v2 = tmp_path / "v2"
    (v2 / "junk").write_text("stray file at the top")
    (v2 / "zz").write_text("a file where a directory belongs")
    (v2 / "ab" / "stray.txt").write_text("a file where a key directory belongs")
    (v2 / "ab" / ".hidden").mkdir()
    (kdir / "notes.txt").write_text("x")
    (kdir / "x.blk").write_text("non-numeric")
    (kdir / "7.blk").mkdir()  # a directory named like a block
    (kdir / "8.blk").symlink_to("/etc/hostname")
    (kdir / "9.blk").write_bytes(b"short")
    with caplog.at_level(logging.WARNING):
        store = BlockStore(tmp_path, 1 << 20)
    assert store.count("abkey") == 1
    assert store.stats.stored_bytes == 100
    assert bytes(store.get("abkey", 0) or b"") == b"x" * 100
    for name in ("junk", "zz"):
        assert not (v2 / name).exists()
    for p in ("ab/stray.txt", "ab/.hidden"):
        assert not (v2 / p).exists()
    assert sorted(f.name for f in kdir.iterdir()) == ["0.blk", "verified"]
    kept = list((tmp_path / "damaged").iterdir())
    assert len(kept) >= 7  # set aside, not deleted (the short block is simply dropped)
    assert "junk" in caplog.text and "7.blk" in caplog.text
    assert Path("/etc/hostname").exists()
    BlockStore(tmp_path, 1 << 20)  # a second start finds nothing to set aside
    assert len(list((tmp_path / "damaged").iterdir())) == len(kept)


def test_key_directory_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "v2" / "ab").mkdir(parents=True)
    (tmp_path / "v2" / "ab" / "abkey").write_text("x")
    store = BlockStore(tmp_path, 1 << 20)
    store.put("abkey", 0, b"y" * 10)
    assert bytes(store.get("abkey", 0) or b"") == b"y" * 10


def test_verified_marker_that_is_a_directory(tmp_path: Path) -> None:
    store, kdir = _with_block(tmp_path)
    (kdir / "verified").unlink()
    (kdir / "verified").mkdir()
    store = BlockStore(tmp_path, 1 << 20)
    assert not store.is_verified("abkey")
    assert bytes(store.get("abkey", 0) or b"") == b"x" * 100


def test_block_that_becomes_a_directory_is_a_miss(tmp_path: Path) -> None:
    store, kdir = _with_block(tmp_path)
    (kdir / "0.blk").unlink()
    (kdir / "0.blk").mkdir()
    assert store.get("abkey", 0) is None  # not EISDIR
    store.put("abkey", 0, b"z" * 5)
    assert bytes(store.get("abkey", 0) or b"") == b"z" * 5


def test_blocks_path_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "blocks").write_text("stray")
    store = BlockStore(tmp_path / "blocks", 1 << 20)
    store.put("abkey", 0, b"q")
    assert _aside(tmp_path / "blocks")[0].read_text() == "stray"


def test_layout_directory_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "v2").write_text("stray")
    store = BlockStore(tmp_path, 1 << 20)
    store.put("abkey", 0, b"q")
    assert bytes(store.get("abkey", 0) or b"") == b"q"


def test_block_tree_is_private(tmp_path: Path) -> None:
    (tmp_path / "v2" / "ab").mkdir(parents=True, mode=0o755)
    os.chmod(tmp_path / "v2", 0o755)
    os.chmod(tmp_path / "v2" / "ab", 0o755)
    old = os.umask(0o022)
    try:
        store = BlockStore(tmp_path, 1 << 20)
        store.put("cdkey", 0, b"x")
        store.pin("cdkey")
    finally:
        os.umask(old)
    for p in (tmp_path, tmp_path / "v2", tmp_path / "v2" / "ab", tmp_path / "v2" / "cd"):
        assert _mode(p) == 0o700, p
    assert _mode(tmp_path / "v2" / "cd" / "cdkey") == 0o700
    assert _mode(tmp_path / "v2" / "pins.json") == 0o600


# -- log, status and metrics files ----------------------------------------------------------
def test_log_file_is_private(tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "m.log"
    old = os.umask(0o022)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.setup(log_file=log_file)
        logging.getLogger("t").warning("hello")
    finally:
        os.umask(old)
        for h in root.handlers:
            h.close()
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    assert _mode(log_file) == 0o600
    assert "hello" in log_file.read_text()


def test_existing_log_file_is_tightened(tmp_path: Path) -> None:
    log_file = tmp_path / "m.log"
    log_file.write_text("old\n")
    os.chmod(log_file, 0o644)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.setup(log_file=log_file)
    finally:
        for h in root.handlers:
            h.close()
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    assert _mode(log_file) == 0o600


def test_state_and_metrics_files_are_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(status, "state_dir", lambda: tmp_path / "state")
    rep = status.Reporter(tmp_path / "mnt", tmp_path / "metrics.prom", None)
    old = os.umask(0o022)
    try:
        rep.write({"mountpoint": "/m"})
    finally:
        os.umask(old)
    assert _mode(tmp_path / "state") == 0o700
    assert _mode(rep.path) == 0o600
    assert _mode(tmp_path / "metrics.prom") == 0o600


def test_metrics_mode_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlregfs.config import from_options

    cfg = from_options("https://h/a/b", tmp_path, ["metrics=/x.prom,metrics_mode=644"], env={})
    assert cfg.metrics_mode == 0o644
    monkeypatch.setattr(status, "state_dir", lambda: tmp_path / "state")
    rep = status.Reporter(tmp_path / "mnt", tmp_path / "m.prom", None, metrics_mode=0o644)
    rep.write({"mountpoint": "/m"})
    assert _mode(tmp_path / "m.prom") == 0o644


def test_metrics_write_does_not_follow_a_planted_symlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(status, "state_dir", lambda: tmp_path / "state")
    victim = tmp_path / "victim"
    victim.write_text("precious")
    metrics = tmp_path / "m.prom"
    metrics.symlink_to(victim)
    status.Reporter(tmp_path / "mnt", metrics, None).write({"mountpoint": "/m"})
    assert victim.read_text() == "precious"
    assert metrics.is_file() and not metrics.is_symlink()


# -- the status directory of a user without XDG_RUNTIME_DIR ---------------------------------
_AS_OTHER = """
import os, sys
from pathlib import Path
from mlregfs import status  # imported as root: this interpreter lives under /root
os.setgroups([]); os.setgid({uid}); os.setuid({uid})
os.environ.pop("XDG_RUNTIME_DIR", None)
rep = status.Reporter(Path(sys.argv[1]), None, None)
rep.write({{"mountpoint": "/m"}})
if not rep.path.exists():
    sys.exit(3)
print(rep.path)
"""


def _run_as_other(mnt: Path) -> subprocess.CompletedProcess[str]:
    code = _AS_OTHER.format(uid=OTHER_UID)
    return subprocess.run(
        [sys.executable, "-c", code, str(mnt)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parents[2],
    )


@pytest.fixture
def tmp_state() -> object:
    """/tmp/mlregfs-<OTHER_UID>, removed before and after."""
    import shutil

    path = Path(f"/tmp/mlregfs-{OTHER_UID}")

    def clean() -> None:
        for p in (path, path.with_name(f"{path.name}-victim")):
            if p.is_symlink() or p.is_file():
                p.unlink()
            elif p.exists():
                shutil.rmtree(p)

    clean()
    yield path
    clean()


def test_status_dir_is_created_private(tmp_state: Path, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("this test needs root to act as a second user")
    r = _run_as_other(tmp_path / "mnt")
    assert r.returncode == 0, r.stdout + r.stderr
    assert tmp_state.is_dir() and not tmp_state.is_symlink()
    assert _mode(tmp_state) == 0o700 and os.lstat(tmp_state).st_uid == OTHER_UID
    assert _mode(Path(r.stdout.strip())) == 0o600


def test_status_dir_planted_as_symlink_is_refused(tmp_state: Path, tmp_path: Path) -> None:
    target = tmp_state.with_name(f"{tmp_state.name}-victim")  # reachable for the victim
    target.mkdir()
    os.chown(target, OTHER_UID, OTHER_UID)
    tmp_state.symlink_to(target)  # planted by someone else (root here)
    r = _run_as_other(tmp_path / "mnt")
    assert r.returncode == 3, r.stdout + r.stderr
    assert "refusing status directory" in r.stderr
    assert list(target.iterdir()) == []


def test_status_dir_owned_by_someone_else_is_refused(tmp_state: Path, tmp_path: Path) -> None:
    tmp_state.mkdir(mode=0o777)
    os.chmod(tmp_state, 0o777)  # pre-created by another user, writable for the victim
    r = _run_as_other(tmp_path / "mnt")
    assert r.returncode == 3, r.stdout + r.stderr
    assert "owned by uid 0" in r.stderr
    assert list(tmp_state.iterdir()) == []


def test_buffered_block_files_are_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        store = BlockStore(tmp_path, 1 << 20)
        store.direct = False  # the fallback when the filesystem refuses O_DIRECT
        store.put("efkey", 0, b"x" * 10)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "v2" / "ef" / "efkey" / "0.blk") == 0o600


def test_log_file_is_never_written_through_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    link = tmp_path / "m.log"
    link.symlink_to(victim)
    with pytest.raises(OSError):
        logs.setup(log_file=link)
    assert victim.read_text() == "keep\n"


def _cfg(cache_dir: Path) -> Config:
    return from_options(
        "https://gitlab.example.com/g/p", cache_dir.parent / "mnt", [f"cache_dir={cache_dir}"]
    )


def test_cache_dir_of_ours_is_tightened(tmp_path: Path) -> None:
    """An existing cache_dir that mlregfs made (or an empty one) becomes 0700."""
    d = tmp_path / "cache"
    (d / "blocks").mkdir(parents=True)
    d.chmod(0o755)
    prepare_cache_dir(_cfg(d))
    assert _mode(d) == 0o700
    fresh = tmp_path / "fresh" / "cache"
    prepare_cache_dir(_cfg(fresh))
    assert _mode(fresh) == 0o700


def test_shared_cache_dir_keeps_its_mode(tmp_path: Path) -> None:
    """A directory the user also keeps other files in is not closed behind their back."""
    d = tmp_path / "work"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    d.chmod(0o755)
    prepare_cache_dir(_cfg(d))
    assert _mode(d) == 0o755
