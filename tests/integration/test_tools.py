"""Real tools writing into a real mount: safetensors, transformers, rsync, sed -i, shells, dd,
renames, crashes and fresh lookups. Every case is checked through the registry's own store
(names, number of copies, bytes), not only through the mount."""

from __future__ import annotations

import ctypes
import errno
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

import httpx
import pytest

from mlregfs.testing import ServerProcess
from tests.integration.helpers import Mount, blob, clean_env, recover, sha, unmount

PROJECT = "team/tools"


@dataclass
class TWorld:
    server: ServerProcess
    source: str
    tokens: dict[str, str]


@pytest.fixture(scope="module")
def tw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TWorld]:
    with ServerProcess(tmp_path_factory.mktemp("tserver")) as srv:
        st = srv.store
        st.create_project(PROJECT, "private")
        tokens = {r: st.create_token(PROJECT, r) for r in ("developer", "maintainer")}
        st.create_model(PROJECT, "m")
        yield TWorld(srv, f"{srv.url}/{PROJECT}", tokens)


def new_version(tw: TWorld, semver: str) -> int:
    return tw.server.store.create_version(PROJECT, "m", semver)


def copies(tw: TWorld, semver: str) -> dict[str, list[tuple[int, str]]]:
    """Registry view: name -> (size, sha256 of the stored blob) of every copy, oldest first."""
    st = tw.server.store
    pid = st.project(PROJECT)["id"]  # type: ignore[index]
    mrow = st.model(pid, "m")
    assert mrow is not None
    v = st.version_by_semver(int(mrow["id"]), semver)
    assert v is not None and v["package_id"] is not None
    out: dict[str, list[tuple[int, str]]] = {}
    for f in st.files(int(v["package_id"])):
        stored = st.blob_path(f).read_bytes()
        assert (len(stored), sha(stored)) == (int(f["size"]), f["file_sha256"])
        out.setdefault(unquote(f["file_name"]), []).append((len(stored), f["file_sha256"]))
    return out


def row_counts(tw: TWorld, semver: str) -> dict[str, int]:
    return {name: len(rows) for name, rows in copies(tw, semver).items()}


def assert_registry(
    tw: TWorld, semver: str, expected: dict[str, bytes], n: dict[str, int] | None = None
) -> None:
    """Exactly these names, `n[name]` copies each (default one), the newest with these bytes."""
    reg = copies(tw, semver)
    assert set(reg) == set(expected), f"registry has {sorted(reg)}"
    for name, data in expected.items():
        assert len(reg[name]) == (n or {}).get(name, 1), (name, reg[name])
        assert reg[name][-1] == (len(data), sha(data)), name


def mount(tw: TWorld, tmp: Path, role: str, *opts: str, cache: Path | None = None) -> Mount:
    return Mount(
        tw.source,
        tmp / f"mnt-{role}",
        cache or tmp / f"cache-{role}",
        token=tw.tokens[role],
        options=list(opts),
    ).start()


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def tree(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under a local directory."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def listed(root: Path) -> set[str]:
    """Every file the mount lists under `root` (relative paths)."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir()}


# ---------------------------------------------------------------- safetensors and transformers


def test_safetensors_save_file(tw: TWorld, tmp_path: Path) -> None:
    """Semantics 40 and 41. A file that is not uploaded yet can be renamed, and its upload goes
    to the new name; `.tmpXXXXXX` (Rust's `tempfile`: safetensors) is held: safetensors
    `save_file` leaves exactly its final name in the registry."""
    import numpy as np
    from safetensors import safe_open
    from safetensors.numpy import save_file

    new_version(tw, "1.0.0")
    rng = np.random.default_rng(1)
    tensors: dict[str, np.ndarray] = {
        "embed.weight": rng.standard_normal((64, 32)).astype(np.float32),
        "layer.0.bias": rng.standard_normal(32).astype(np.float32),
        "ids": np.arange(1000, dtype=np.int64),
    }
    save_file(tensors, str(tmp_path / "local.safetensors"))
    local = (tmp_path / "local.safetensors").read_bytes()
    m = mount(tw, tmp_path, "developer")
    try:
        v = m.path / "models/m/1.0.0"
        save_file(tensors, str(v / "x.safetensors"))
        assert_registry(tw, "1.0.0", {"x.safetensors": local})
        assert os.listdir(v) == ["x.safetensors"]
        with safe_open(str(v / "x.safetensors"), framework="np") as f:
            assert sorted(f.keys()) == sorted(tensors)
            for k, t in tensors.items():
                assert np.array_equal(f.get_tensor(k), t), k
    finally:
        m.stop()
    assert_registry(tw, "1.0.0", {"x.safetensors": local})


_TRANSFORMERS = """
import os, sys
import torch
from transformers import AutoModel, BertConfig, BertModel

def build():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64)
    return BertModel(cfg)

local, unsharded, sharded = sys.argv[1:4]
model = build()
for root in (local, None):
    model.save_pretrained(os.path.join(root, "u") if root else unsharded)
    model.save_pretrained(os.path.join(root, "s") if root else sharded, max_shard_size="20KB")
want = model.state_dict()
for path in (unsharded, sharded):
    got = AutoModel.from_pretrained(path).state_dict()
    assert sorted(got) == sorted(want), (path, sorted(got))
    for k in want:
        assert torch.equal(got[k], want[k]), (path, k)
print("loaded ok")
"""


def test_transformers_save_pretrained(tw: TWorld, tmp_path: Path) -> None:
    """Semantics 40. Transformers `save_pretrained` (sharded too) leaves exactly its final
    names in the registry, the bytes of the same save into a local directory; the saved model
    loads back through the mount."""
    new_version(tw, "2.0.0")
    new_version(tw, "2.1.0")
    local = tmp_path / "local"
    local.mkdir()
    m = mount(tw, tmp_path, "developer")
    try:
        v = m.path / "models/m"
        # torch and transformers stay out of the pytest process: slow to import, heavy
        r = subprocess.run(
            [sys.executable, "-c", _TRANSFORMERS, str(local), str(v / "2.0.0"), str(v / "2.1.0")],
            capture_output=True,
            text=True,
            timeout=300,
            env=clean_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="0"),
        )
        assert r.returncode == 0 and "loaded ok" in r.stdout, r.stderr[-3000:]
        unsharded, sharded = tree(local / "u"), tree(local / "s")
        assert set(unsharded) == {"config.json", "model.safetensors"}
        assert len(sharded) == 9 and "model.safetensors.index.json" in sharded
        assert sum(n.endswith("-of-00007.safetensors") for n in sharded) == 7
        assert_registry(tw, "2.0.0", unsharded)
        assert_registry(tw, "2.1.0", sharded)
        assert listed(v / "2.0.0") == set(unsharded)
        assert listed(v / "2.1.0") == set(sharded)
    finally:
        m.stop()


# ---------------------------------------------------------------- rsync and sed -i


def _rsync(src: Path, dst: Path, *flags: str) -> None:
    r = subprocess.run(
        ["rsync", "-a", *flags, f"{src}/", f"{dst}/"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr


def test_rsync_runs_reruns_edits_and_remounts(tw: TWorld, tmp_path: Path) -> None:
    """Semantics 40, 41, 43 and 44. `.<name>.XXXXXX` (rsync) is held and renamed onto the final
    name, so `rsync` leaves exactly its final names in the registry. Opening an existing file
    for writing without `O_TRUNC` (`rsync --inplace`) first copies its current bytes into the
    spool; the edited file is uploaded at close as a new copy, as an overwrite (21). When the
    bytes a close or rename would upload are the bytes the registry already serves under that
    name, nothing is uploaded: re-running `rsync -a` (after a remount too) adds no copy."""
    new_version(tw, "3.0.0")
    src = tmp_path / "src"
    (src / "sub/deep").mkdir(parents=True)
    (src / "config.json").write_bytes(b'{"hidden": 32}\n')
    (src / "model.bin").write_bytes(blob(3, 200_000))
    (src / "sub/tok.json").write_bytes(b'{"vocab": ["a", "b"]}\n')
    (src / "sub/deep/notes.txt").write_bytes(b"notes\n")
    m = mount(tw, tmp_path, "developer")
    try:
        v = m.path / "models/m/3.0.0"
        _rsync(src, v)  # first run
        assert_registry(tw, "3.0.0", tree(src))
        assert listed(v) == set(tree(src))  # no .name.XXXXXX left
        before = row_counts(tw, "3.0.0")
        _rsync(src, v)  # unchanged: every file looks changed to rsync (no stored mtimes)
        assert row_counts(tw, "3.0.0") == before
        # another size: rsync's quick check compares size and mtime, and the mount's mtime is
        # the upload time, which an edit in the same second could equal
        (src / "config.json").write_bytes(b'{"hidden": 640}\n')
        _rsync(src, v)  # one file edited: only it gets a new copy; a developer keeps the old
        assert_registry(tw, "3.0.0", tree(src), {"config.json": 2})
        assert (v / "config.json").read_bytes() == b'{"hidden": 640}\n'
        assert listed(v) == set(tree(src))
    finally:
        m.stop()
    m = mount(tw, tmp_path, "developer")  # the same cache, as a user would remount
    try:
        v = m.path / "models/m/3.0.0"
        _rsync(src, v)
        assert_registry(tw, "3.0.0", tree(src), {"config.json": 2})
        edited = bytearray((src / "model.bin").read_bytes())
        edited[1000:1004] = b"EDIT"
        (src / "model.bin").write_bytes(bytes(edited))
        _rsync(src, v, "--inplace")  # in-place open without O_TRUNC: the new bytes, once
        assert_registry(tw, "3.0.0", tree(src), {"config.json": 2, "model.bin": 2})
        assert (v / "model.bin").read_bytes() == bytes(edited)
        _rsync(src, v, "--inplace")  # unchanged: nothing
        assert_registry(tw, "3.0.0", tree(src), {"config.json": 2, "model.bin": 2})
    finally:
        m.stop()
    m = mount(tw, tmp_path, "maintainer")
    try:
        v = m.path / "models/m/3.0.0"
        (src / "sub/tok.json").write_bytes(b'{"vocab": ["a", "b", "c"]}\n')
        _rsync(src, v)  # a maintainer's overwrite deletes the older copy
        assert_registry(tw, "3.0.0", tree(src), {"config.json": 2, "model.bin": 2})
        assert listed(v) == set(tree(src))
    finally:
        m.stop()


def test_sed_in_place(tw: TWorld, tmp_path: Path) -> None:
    """Semantics 40 and 41. `sedXXXXXX` (GNU `sed -i`) is held and renamed onto the file:
    `sed -i` leaves exactly its final name in the registry; renaming onto an existing file
    replaces it as an overwrite does (21: a Developer's older copies are kept, a Maintainer's
    deleted)."""
    new_version(tw, "4.0.0")

    def sed(script: str, f: Path) -> None:
        r = subprocess.run(["sed", "-i", script, str(f)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr

    m = mount(tw, tmp_path, "developer")
    try:
        f = m.path / "models/m/4.0.0/f.txt"
        f.write_bytes(b"banana\n")
        sed("s/a/b/", f)
        assert_registry(tw, "4.0.0", {"f.txt": b"bbnana\n"}, {"f.txt": 2})
        assert f.read_bytes() == b"bbnana\n"
        assert os.listdir(f.parent) == ["f.txt"]
    finally:
        m.stop()
    m = mount(tw, tmp_path, "maintainer")
    try:
        f = m.path / "models/m/4.0.0/f.txt"
        sed("s/n/N/", f)
        assert_registry(tw, "4.0.0", {"f.txt": b"bbNana\n"})
        assert f.read_bytes() == b"bbNana\n"
        assert os.listdir(f.parent) == ["f.txt"]
    finally:
        m.stop()


# ---------------------------------------------------------------- one upload per file written


def test_shell_redirection_dd_and_children_upload_once(tw: TWorld, tmp_path: Path) -> None:
    """Semantics 42. A file is uploaded by the `close()` that ends its writing. Closing a
    duplicated descriptor (shell redirection `echo hi > f`, `cmd > f`, `dd of=f`), or a child's
    copy (`fork`, `exec`, `subprocess` with `stdout=f`), uploads nothing; the final `close()`
    uploads once."""
    new_version(tw, "5.0.0")
    src = tmp_path / "dd-src.bin"
    src.write_bytes(blob(5, (1 << 20) + 123))
    m = mount(tw, tmp_path, "developer")
    want: dict[str, bytes] = {}
    try:
        v = m.path / "models/m/5.0.0"

        def sh(script: str) -> None:
            subprocess.run(["bash", "-c", script], cwd=v, check=True, timeout=30)

        sh("echo hi > f")
        want["f"] = b"hi\n"
        sh("{ echo a; sleep 0.2; echo b; } > g")
        want["g"] = b"a\nb\n"
        subprocess.run(
            ["dd", f"if={src}", f"of={v / 'd.bin'}", "bs=64k", "status=none"], check=True
        )
        want["d.bin"] = src.read_bytes()
        sh("exec 3>h; echo x >&3; echo y >&3; exec 3>&-")
        want["h"] = b"x\ny\n"
        assert_registry(tw, "5.0.0", want)

        # the parent closes its copy first; the child's is the last one
        with open(v / "child.txt", "wb") as f:
            p = subprocess.Popen(["sh", "-c", "echo child"], stdout=f)
        assert p.wait(30) == 0
        want["child.txt"] = b"child\n"
        wait_for(lambda: "child.txt" in copies(tw, "5.0.0"), "child.txt never uploaded")
        assert_registry(tw, "5.0.0", want)

        # fork + exec while writing: the exec closes the inherited (CLOEXEC) descriptor
        half = blob(6, 300_000)
        with open(v / "forked.bin", "wb") as f:
            f.write(half)
            f.flush()
            subprocess.run(["true"], check=True)
            f.write(half[::-1])
        want["forked.bin"] = half + half[::-1]
        assert_registry(tw, "5.0.0", want)
        for name, data in want.items():
            assert (v / name).read_bytes() == data, name
    finally:
        m.stop()
    assert_registry(tw, "5.0.0", want)  # nothing more at release or unmount


def test_append_in_place_edit_and_unchanged_bytes(tw: TWorld, tmp_path: Path) -> None:
    """Semantics 43 and 44. Opening an existing file with `O_APPEND` (`>>`) or for writing
    without `O_TRUNC` (`open(..., "r+")`) first copies its current bytes into the spool; the
    edited file is uploaded at close as a new copy. When the bytes a close would upload are
    the bytes the registry already serves under that name, nothing is uploaded."""
    new_version(tw, "6.0.0")
    same = tmp_path / "same.txt"
    m = mount(tw, tmp_path, "developer")
    try:
        p = m.path / "models/m/6.0.0/a.txt"
        p.write_bytes(b"line one\n")
        assert_registry(tw, "6.0.0", {"a.txt": b"line one\n"})
        subprocess.run(["bash", "-c", f"echo more >> '{p}'"], check=True)
        assert_registry(tw, "6.0.0", {"a.txt": b"line one\nmore\n"}, {"a.txt": 2})
        with open(p, "r+b") as f:
            f.seek(5)
            f.write(b"ONE")
        edited = b"line ONE\nmore\n"
        assert_registry(tw, "6.0.0", {"a.txt": edited}, {"a.txt": 3})
        assert p.read_bytes() == edited
        with open(p, "r+b"):
            pass  # nothing written: no copy
        assert_registry(tw, "6.0.0", {"a.txt": edited}, {"a.txt": 3})
        same.write_bytes(edited)
        subprocess.run(["cp", str(same), str(p)], check=True)  # O_TRUNC, identical bytes
        assert_registry(tw, "6.0.0", {"a.txt": edited}, {"a.txt": 3})
        assert p.read_bytes() == edited
    finally:
        m.stop()
    assert_registry(tw, "6.0.0", {"a.txt": edited}, {"a.txt": 3})


# ---------------------------------------------------------------- renames


_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100


def renameat2(old: Path, new: Path, flags: int) -> int:
    """0 or the errno of renameat2(2)."""
    r = _libc.renameat2(_AT_FDCWD, os.fsencode(old), _AT_FDCWD, os.fsencode(new), flags)
    return 0 if r == 0 else ctypes.get_errno()


def xwrite(path: Path, data: bytes) -> None:
    """Create `path` exclusively (O_EXCL), as mkstemp and every temporary-file maker does."""
    with open(path, "xb") as f:
        f.write(data)


def test_renames(tw: TWorld, tmp_path: Path) -> None:
    """Semantics 40, 41 and 45. A file that is not uploaded yet can be renamed inside and
    between version directories and its upload goes to the new name; a temporary name
    (`tmpXXXXXXXX`, `.<name>.XXXXXX`), created exclusively, is held, listed and never
    uploaded; removing it uploads nothing; a name that only looks temporary is uploaded.
    Renaming onto an existing file replaces it as an overwrite does.
    `rename(RENAME_NOREPLACE)` onto an existing name fails with `EEXIST`, `RENAME_EXCHANGE`
    with `EINVAL`. A rename that commits fails with the upload's errno (the file keeps its
    old name). With the Maintainer role renaming an uploaded file uploads a copy under the new
    name, then deletes every copy under the old name; without it `EACCES` and nothing changes.
    Renaming a directory: `EPERM` (22)."""
    new_version(tw, "7.0.0")
    new_version(tw, "7.1.0")
    gone_id = new_version(tw, "7.2.0")
    new_version(tw, "7.3.0")
    dev = mount(tw, tmp_path, "developer")
    mnt = mount(tw, tmp_path, "maintainer")
    try:
        v = dev.path / "models/m/7.0.0"
        with tempfile.NamedTemporaryFile(dir=v, delete=False) as t:
            t.write(b"via tempfile")
        assert re.fullmatch(r"tmp[a-z0-9_]{8}", Path(t.name).name)
        os.replace(t.name, v / "final.bin")
        want = {"final.bin": b"via tempfile"}
        assert_registry(tw, "7.0.0", want)

        held = v / ".x.abc123"
        with open(held, "xb") as f:  # created exclusively, as mkstemp does
            f.write(b"held bytes")
        assert ".x.abc123" in os.listdir(v) and held.read_bytes() == b"held bytes"
        assert_registry(tw, "7.0.0", want)
        os.unlink(held)
        assert ".x.abc123" not in os.listdir(v)
        assert_registry(tw, "7.0.0", want)
        (v / "tmp_results.json").write_bytes(b"{}")  # only looks temporary: written as cp does
        want["tmp_results.json"] = b"{}"
        assert_registry(tw, "7.0.0", want)

        # onto an existing uploaded file with other bytes: a new copy (a developer keeps the old)
        (v / "target.txt").write_bytes(b"old")
        with open(v / ".target.txt.Ab12Cd", "xb") as f:
            f.write(b"new bytes")
        os.rename(v / ".target.txt.Ab12Cd", v / "target.txt")
        want["target.txt"] = b"new bytes"
        assert_registry(tw, "7.0.0", want, {"target.txt": 2})
        assert (v / "target.txt").read_bytes() == b"new bytes"

        # between versions
        xwrite(v / ".moved.bin.Qw12Er", b"moved")
        os.rename(v / ".moved.bin.Qw12Er", dev.path / "models/m/7.1.0/moved.bin")
        assert_registry(tw, "7.1.0", {"moved.bin": b"moved"})
        assert_registry(tw, "7.0.0", want, {"target.txt": 2})

        xwrite(v / ".nr.txt.Zx98Cv", b"not replacing")
        assert renameat2(v / ".nr.txt.Zx98Cv", v / "final.bin", 1) == errno.EEXIST
        assert renameat2(v / ".nr.txt.Zx98Cv", v / "final.bin", 2) == errno.EINVAL
        os.unlink(v / ".nr.txt.Zx98Cv")
        assert_registry(tw, "7.0.0", want, {"target.txt": 2})

        with pytest.raises(PermissionError) as denied:  # uploaded file, developer: EACCES
            os.rename(v / "final.bin", v / "renamed.bin")
        assert denied.value.errno == errno.EACCES
        assert_registry(tw, "7.0.0", want, {"target.txt": 2})
        assert "final.bin" in os.listdir(v) and "renamed.bin" not in os.listdir(v)

        (v / "dir/in.txt").parent.mkdir()
        (v / "dir/in.txt").write_bytes(b"in a directory")
        want["dir/in.txt"] = b"in a directory"
        with pytest.raises(OSError) as ei:
            os.rename(v / "dir", v / "dir2")
        assert ei.value.errno == errno.EPERM
        assert_registry(tw, "7.0.0", want, {"target.txt": 2})

        # the upload a rename commits fails: the caller gets its errno, the name stays
        g = dev.path / "models/m/7.2.0"
        xwrite(g / ".late.bin.Mn34Bv", b"too late")
        st = tw.server.store
        st.delete_version(st.project(PROJECT)["id"], gone_id)  # type: ignore[index]
        with pytest.raises(OSError) as ei:
            os.rename(g / ".late.bin.Mn34Bv", g / "late.bin")
        assert ei.value.errno in (errno.ENOENT, errno.EACCES), ei.value
        assert ".late.bin.Mn34Bv" in os.listdir(g)

        # a maintainer's rename of an uploaded file: a copy under the new name, the old gone
        w = mnt.path / "models/m/7.3.0"
        (w / "old-name.txt").write_bytes(b"renamed by a maintainer")
        os.rename(w / "old-name.txt", w / "new-name.txt")
        assert_registry(tw, "7.3.0", {"new-name.txt": b"renamed by a maintainer"})
        assert os.listdir(w) == ["new-name.txt"]
        assert (w / "new-name.txt").read_bytes() == b"renamed by a maintainer"
    finally:
        dev.stop()
        mnt.stop()
    assert_registry(tw, "7.0.0", want, {"target.txt": 2})


# ---------------------------------------------------------------- crash, then recover


def _line(listing: str, target: str) -> str:
    lines = [ln for ln in listing.splitlines() if ln.rstrip().endswith(target)]
    assert len(lines) == 1, listing
    return lines[0]


def test_crash_with_held_and_open_files_thenrecover(tw: TWorld, tmp_path: Path) -> None:
    """Semantics 41 and 20. A held file is never uploaded under its temporary name: when the
    daemon dies it stays in the spool as `held`, `mlregfs recover list` shows it, `retry`
    leaves it alone unless its id is named, `discard` removes it. A file whose writer still
    had it open is listed as incomplete and not uploaded."""
    new_version(tw, "8.0.0")
    token = tw.tokens["developer"]
    m = mount(tw, tmp_path, "developer")
    v = m.path / "models/m/8.0.0"
    with open(v / ".held.bin.Xy12Ab", "xb") as f:  # created exclusively, as mkstemp does
        f.write(b"held at the crash")
    shell = subprocess.Popen(
        ["bash", "-c", "exec 3>open.txt; echo x >&3; echo ready; read line"],
        cwd=v,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert shell.stdin is not None and shell.stdout is not None
    killed = False
    try:
        assert shell.stdout.readline() == "ready\n"
        assert m.proc is not None
        m.proc.send_signal(signal.SIGKILL)  # the shell still holds fd 3
        m.proc.wait()
        killed = True
    finally:
        shell.stdin.close()
        shell.wait(30)
        if killed:
            unmount(m.path)
            m.proc = None
        else:
            m.stop()
    m2 = mount(tw, tmp_path, "developer", cache=m.cache_dir)
    m2.stop()
    assert copies(tw, "8.0.0") == {}  # nothing uploaded by the remount either
    listing = recover(m.cache_dir, token, "list").stdout
    held = _line(listing, "models/m/8.0.0/.held.bin.Xy12Ab")
    assert "held" in held and "running mount" not in held, listing
    incomplete = _line(listing, "models/m/8.0.0/open.txt")
    assert "incomplete" in incomplete, listing
    r = recover(m.cache_dir, token, "retry")
    assert "uploaded" not in r.stdout, r
    assert copies(tw, "8.0.0") == {}
    r = recover(m.cache_dir, token, "discard", held.split()[0])
    assert r.returncode == 0, r.stderr
    listing = recover(m.cache_dir, token, "list").stdout
    assert ".held.bin.Xy12Ab" not in listing and "open.txt" in listing
    assert copies(tw, "8.0.0") == {}


# ---------------------------------------------------------------- fresh lookups


def test_fresh_lookups(tw: TWorld, tmp_path: Path) -> None:
    """Semantics 46. Looking up a name that a cached listing does not have (a version or a
    file) fetches that listing again if it is older than 2 s, so what was published elsewhere
    opens by its path within seconds whatever `listing_ttl` and `file_ttl` say."""
    st = tw.server.store
    vid = new_version(tw, "9.0.0")
    st.add_file(PROJECT, vid, "a.txt", b"a")
    m = mount(tw, tmp_path, "developer")  # default TTLs (file_ttl 5m)
    try:
        models = m.path / "models/m"
        assert os.listdir(models / "9.0.0") == ["a.txt"]
        r = httpx.put(
            f"{tw.server.api}/projects/{quote(PROJECT, safe='')}/packages/ml_models/{vid}"
            "/files/published.txt",
            content=b"published elsewhere",
            headers={"Authorization": f"Bearer {tw.tokens['developer']}"},
            timeout=20,
        )
        assert r.status_code == 201, r.text
        assert _open_within(models / "9.0.0/published.txt", 5) == b"published elsewhere"
        os.listdir(models / "9.0.0")  # ls keeps the TTLs: either answer is right

        assert "9.1.0" not in os.listdir(models)
        vid2 = new_version(tw, "9.1.0")
        st.add_file(PROJECT, vid2, "w.bin", b"new version")
        assert _open_within(models / "9.1.0/w.bin", 5) == b"new version"
    finally:
        m.stop()


def _open_within(path: Path, seconds: float) -> bytes:
    deadline = time.monotonic() + seconds
    while True:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            assert time.monotonic() < deadline, f"{path} still ENOENT after {seconds} s"
            time.sleep(0.1)
