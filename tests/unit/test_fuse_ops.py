"""The pyfuse3 adapter without a kernel: it forwards, fills entries, and maps errors to errno."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pyfuse3
import pytest

from mlregfs.cache.blocks import BlockStore
from mlregfs.cache.reader import DataCache
from mlregfs.fs.core import ROOT_INO, Filesystem
from mlregfs.fuse_ops import Operations
from mlregfs.registry.fake import InMemoryRegistry
from mlregfs.spool import Spool

BS = 64 << 10
CTX = SimpleNamespace(pid=0, uid=0, gid=0, umask=0o022)


def _ops(tmp_path: Path, *, writable: bool = False) -> tuple[Operations, InMemoryRegistry]:
    reg = InMemoryRegistry()
    v = reg.add_version("llama", "1.0.0")
    reg.add_file(v, "config.json", b'{"a": 1}')
    data = DataCache(BlockStore(tmp_path / "blocks", 64 * BS), block_size=BS, readahead=0)
    spool = Spool(tmp_path / "spool") if writable else None
    fs = Filesystem(reg, data, source_id="test", spool=spool)
    return Operations(fs, uid=1000, gid=1000), reg


async def _walk(ops: Operations, *names: str) -> pyfuse3.EntryAttributes:
    ino = ROOT_INO
    e = await ops.getattr(ino, CTX)
    for name in names:
        e = await ops.lookup(ino, name.encode(), CTX)
        ino = e.st_ino
    return e


async def test_entries_carry_the_cores_attributes(tmp_path: Path) -> None:
    ops, _ = _ops(tmp_path)
    f = await _walk(ops, "models", "llama", "1.0.0", "config.json")
    assert stat.S_ISREG(f.st_mode) and stat.S_IMODE(f.st_mode) == 0o444  # read-only mount
    assert (f.st_size, f.st_uid, f.st_gid, f.st_nlink) == (8, 1000, 1000, 1)
    assert f.st_blksize == 1 << 20 and f.entry_timeout == f.attr_timeout > 0
    d = await _walk(ops, "models", "llama")
    assert stat.S_ISDIR(d.st_mode) and stat.S_IMODE(d.st_mode) == 0o555
    link = await ops.lookup(d.st_ino, b"latest", CTX)
    assert stat.S_ISLNK(link.st_mode) and await ops.readlink(link.st_ino, CTX) == b"1.0.0"


async def test_writable_mount_modes_follow_the_umask(tmp_path: Path) -> None:
    ops, _ = _ops(tmp_path, writable=True)
    f = await _walk(ops, "models", "llama", "1.0.0", "config.json")
    assert stat.S_IMODE(f.st_mode) == 0o644


async def test_core_errors_become_their_errno_and_are_counted(tmp_path: Path) -> None:
    ops, reg = _ops(tmp_path)
    models = await _walk(ops, "models")
    with pytest.raises(pyfuse3.FUSEError) as ei:
        await ops.lookup(models.st_ino, b"nope", CTX)
    assert ei.value.errno == errno.ENOENT
    version = await _walk(ops, "models", "llama", "1.0.0")
    reg.down = True  # its files were never listed: an outage is not "no such file"
    with pytest.raises(pyfuse3.FUSEError) as ei:
        await ops.lookup(version.st_ino, b"config.json", CTX)
    assert ei.value.errno not in (0, errno.ENOENT)
    assert ops.failures["lookup"] == 2


async def test_lookup_counts_are_returned_by_forget(tmp_path: Path) -> None:
    ops, _ = _ops(tmp_path)
    f = await _walk(ops, "models", "llama", "1.0.0", "config.json")
    await ops.lookup((await _walk(ops, "models", "llama", "1.0.0")).st_ino, b"config.json", CTX)
    assert f.st_ino in ops.fs.inodes._node_of
    await ops.forget([(f.st_ino, 1)])
    assert f.st_ino in ops.fs.inodes._node_of  # one reference left
    await ops.forget([(f.st_ino, 1)])
    assert f.st_ino not in ops.fs.inodes._node_of
    await ops.forget([(f.st_ino, 1), (987654, 3)])  # unknown inodes: no error, no reply


async def test_opendir_holds_its_entries_until_releasedir(tmp_path: Path) -> None:
    ops, _ = _ops(tmp_path)
    v = await _walk(ops, "models", "llama", "1.0.0")
    dh = await ops.opendir(v.st_ino, CTX)
    (name, attr), *_ = ops._dirs[dh]
    assert name == "config.json"
    ops.fs.forget(attr.ino, 0)  # the kernel holds no reference: the listing still does
    assert attr.ino in ops.fs.inodes._node_of
    await ops.releasedir(dh)
    assert attr.ino not in ops.fs.inodes._node_of


async def test_xattrs_outside_user_are_answered_without_the_core(tmp_path: Path) -> None:
    ops, reg = _ops(tmp_path)
    f = await _walk(ops, "models", "llama", "1.0.0", "config.json")
    before = reg.stats.requests
    reg.down = True  # a call into the core would fail differently
    for name in (b"security.capability", b"security.selinux", b"system.posix_acl_access"):
        with pytest.raises(pyfuse3.FUSEError) as ei:
            await ops.getxattr(f.st_ino, name, CTX)
        assert ei.value.errno == pyfuse3.ENOATTR
    assert reg.stats.requests == before
    reg.down = False
    assert len(await ops.getxattr(f.st_ino, b"user.gitlab.sha256", CTX)) == 64
    assert b"user.gitlab.sha256" in await ops.listxattr(f.st_ino, CTX)
    with pytest.raises(pyfuse3.FUSEError) as ei:
        await ops.setxattr(f.st_ino, b"user.gitlab.sha256", b"0" * 64, CTX)
    assert ei.value.errno == errno.ENOTSUP


async def test_statfs_and_access_are_the_cores_answers(tmp_path: Path) -> None:
    ro, _ = _ops(tmp_path / "ro")
    st = await ro.statfs(CTX)
    assert st.f_bsize == 4096 and st.f_blocks == 64 * BS // 4096
    assert st.f_bfree == st.f_bavail == 0 and st.f_files == len(ro.fs.inodes) >= 1
    with pytest.raises(pyfuse3.FUSEError) as ei:
        await ro.access(ROOT_INO, os.W_OK, CTX)
    assert ei.value.errno == errno.EROFS
    assert await ro.access(ROOT_INO, os.R_OK, CTX)
    rw, _ = _ops(tmp_path / "rw", writable=True)
    st = await rw.statfs(CTX)
    assert st.f_bfree == st.f_blocks and await rw.access(ROOT_INO, os.W_OK, CTX)


async def test_links_devices_and_symlinks_are_refused(tmp_path: Path) -> None:
    ops, _ = _ops(tmp_path, writable=True)
    v = await _walk(ops, "models", "llama", "1.0.0")
    for call in (
        ops.link(v.st_ino, v.st_ino, b"x", CTX),
        ops.symlink(v.st_ino, b"x", b"target", CTX),
        ops.mknod(v.st_ino, b"x", stat.S_IFIFO | 0o644, 0, CTX),
    ):
        with pytest.raises(pyfuse3.FUSEError) as ei:
            await call
        assert ei.value.errno == errno.EPERM
