"""BlockStore: atomic, self-validating, LRU-bounded blocks on disk."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from mlregfs.buffers import POOL
from mlregfs.cache.blocks import BlockStore


def test_roundtrip_and_persistence(tmp_path: Path) -> None:
    s = BlockStore(tmp_path, 1 << 20)
    s.put("abc", 0, b"x" * 1000)
    assert s.get("abc", 0) == b"x" * 1000
    s2 = BlockStore(tmp_path, 1 << 20)  # a new process finds it again
    assert s2.has("abc", 0) and s2.get("abc", 0) == b"x" * 1000
    assert s2.stats.stored_bytes == 1000


def test_corrupt_block_is_discarded(tmp_path: Path) -> None:
    s = BlockStore(tmp_path, 1 << 20)
    s.put("abc", 3, b"hello world")
    p = next(tmp_path.rglob("3.blk"))
    raw = bytearray(p.read_bytes())
    raw[-1] ^= 1
    p.write_bytes(bytes(raw))
    assert s.get("abc", 3) is None
    assert not p.exists() and not s.has("abc", 3)
    assert s.stats.corrupt == 1


def test_lru_eviction_respects_capacity(tmp_path: Path) -> None:
    s = BlockStore(tmp_path, 3000)
    for i in range(3):
        s.put("k1", i, b"a" * 1000)
    s.get("k1", 0)  # most recently used now
    s.put("k2", 0, b"b" * 1000)
    assert s.stats.stored_bytes <= 3000
    assert s.has("k1", 0) and not s.has("k1", 1) and s.has("k2", 0)


def test_verified_marker_dropped_with_blocks(tmp_path: Path) -> None:
    s = BlockStore(tmp_path, 1 << 20)
    s.put("abc", 0, b"1")
    s.mark_verified("abc", 1 << 20, [s.digest(b"1")], size=1)
    assert s.is_verified("abc")
    s.drop("abc")
    assert not s.is_verified("abc") and s.count("abc") == 0


def test_pinned_blocks_survive_eviction_and_restart(tmp_path: Path) -> None:
    s = BlockStore(tmp_path, 3000)
    s.pin("keep")
    for i in range(2):
        s.put("keep", i, b"k" * 1000)
    for i in range(5):
        s.put("other", i, b"o" * 1000)
    assert s.has("keep", 0) and s.has("keep", 1)
    assert s.stats.stored_bytes <= 3000
    s2 = BlockStore(tmp_path, 3000)
    assert "keep" in s2.pins and s2.pinned_bytes() == 2000
    s2.pin("keep", False)
    for i in range(3):
        s2.put("more", i, b"m" * 1000)
    assert not s2.has("keep", 0)


def _store(tmp_path: Path, direct: bool) -> BlockStore:
    s = BlockStore(tmp_path, 1 << 30)
    s.direct = s.direct and direct
    return s


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "buffered"])
@pytest.mark.parametrize("size", [1, 4095, 4096, 3 * 4096 + 17, 1 << 20])
def test_roundtrip_of_aligned_and_odd_sizes(tmp_path: Path, direct: bool, size: int) -> None:
    """Whole blocks take the O_DIRECT path, odd tails the staging path; both read back
    exactly, also by a store using the other mode (the file format is the same)."""
    data = os.urandom(size)
    s = _store(tmp_path, direct)
    s.put("k", 0, data)
    aligned = mmap.mmap(-1, 1 << 20)
    aligned[:] = os.urandom(1 << 20)
    s.put("k", 1, aligned)  # a pooled block buffer: written without a copy
    for reader in (s, _store(tmp_path, not direct)):
        got = reader.get("k", 0)
        assert got is not None and bytes(got) == data
        got1 = reader.get("k", 1)
        assert got1 is not None and bytes(got1) == bytes(aligned)
    blk = next(tmp_path.rglob("0.blk"))
    assert blk.stat().st_size == 4096 + size  # header page + payload, no padding left


def test_pooled_block_buffer_is_filled_in_place(tmp_path: Path) -> None:
    POOL.configure(1 << 16, 64)
    try:
        s = BlockStore(tmp_path, 1 << 30)
        data = os.urandom(1 << 16)
        s.put("k", 0, data)
        got = s.get("k", 0)
        assert isinstance(got, mmap.mmap) and bytes(got) == data
    finally:
        POOL.configure(0, 1)


def test_corruption_is_caught_on_the_direct_path(tmp_path: Path) -> None:
    s = BlockStore(tmp_path, 1 << 30)
    s.put("abc", 0, os.urandom(8192))
    p = next(tmp_path.rglob("0.blk"))
    raw = bytearray(p.read_bytes())
    raw[5000] ^= 1
    p.write_bytes(bytes(raw))
    assert s.get("abc", 0) is None and not p.exists()


def test_blocks_of_the_old_layout_are_dropped(tmp_path: Path) -> None:
    old = tmp_path / "v1" / "ab" / "abc"
    old.mkdir(parents=True)
    (old / "0.blk").write_bytes(b"x" * 100)
    s = BlockStore(tmp_path, 1 << 30)
    assert not (tmp_path / "v1").exists() and s.stats.stored_bytes == 0


def test_verified_marker_lists_block_digests_privately(tmp_path: Path) -> None:
    s = BlockStore(tmp_path, 1 << 20)
    s.put("abc", 0, b"one")
    s.put("abc", 1, b"two")
    digests = [s.digest(b"one"), s.digest(b"two")]
    s.mark_verified("abc", 4096, digests, size=6)
    marker = s.root / "ab" / "abc" / "verified"
    assert marker.stat().st_mode & 0o777 == 0o600
    assert (s.root / "seed").stat().st_mode & 0o777 == 0o600
    assert s.verified_digests("abc", 4096) == digests
    assert s.verified_digests("abc", 8192) is None  # another block size: another layout
    assert BlockStore(tmp_path, 1 << 20).verified_digests("abc", 4096) == digests  # restart
    assert s.get("abc", 1, digests[1]) == b"two"
    marker.write_bytes(b"")  # a marker of the old layout, or damaged: not verified
    assert not s.is_verified("abc")


def test_digests_are_keyed_by_a_secret_of_this_cache(tmp_path: Path) -> None:
    a = BlockStore(tmp_path / "a", 1 << 20)
    b = BlockStore(tmp_path / "b", 1 << 20)
    assert a.digest(b"block") != b.digest(b"block")
    a.put("k", 0, b"x")
    a.mark_verified("k", 4096, [a.digest(b"x")], size=1)
    (a.root / "seed").write_bytes(b"short")  # damaged: a new seed, and no marker holds
    assert not BlockStore(tmp_path / "a", 1 << 20).is_verified("k")


def test_block_with_rewritten_checksum_fails_its_digest(tmp_path: Path) -> None:
    import struct

    import xxhash

    s = BlockStore(tmp_path, 1 << 20)
    s.put("abc", 0, b"hello world")
    s.mark_verified("abc", 4096, [s.digest(b"hello world")], size=11)
    p = next(tmp_path.rglob("0.blk"))
    raw = bytearray(p.read_bytes())
    raw[-1] ^= 1
    struct.pack_into("<Q", raw, 24, xxhash.xxh3_64_intdigest(bytes(raw[4096:])))
    p.write_bytes(bytes(raw))
    assert s.get("abc", 0) == b"hello worle"  # its own header cannot tell
    assert s.get("abc", 0, s.digest(b"hello world")) is None  # the marker's digest can
    assert not p.exists() and not s.has("abc", 0) and not s.is_verified("abc")


@pytest.mark.parametrize("key", ["../x", "/tmp", "a/b", "..", ".hidden", "", "AB"])
def test_no_key_reaches_outside_the_cache(tmp_path: Path, key: str) -> None:
    outside = tmp_path / "x"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    s = BlockStore(tmp_path / "cache", 1 << 20)
    for call in (
        lambda: s.drop(key),
        lambda: s.mark_verified(key, 4096, ["0"], size=1),
        lambda: s.unverify(key),
        lambda: s.is_verified(key),
        lambda: s.get(key, 0),
        lambda: s.has(key, 0),
        lambda: s.put(key, 0, b"x"),
        lambda: s.pin(key),
    ):
        with pytest.raises(ValueError):
            call()
    assert (outside / "keep").read_text() == "keep"


def test_verified_marker_records_the_size_and_is_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        s = BlockStore(tmp_path, 1 << 20)
        s.mark_verified("xyz", 4096, [s.digest(b"abc")], size=3)
    finally:
        os.umask(old)
    assert (s.root / "xy").stat().st_mode & 0o777 == 0o700
    assert (s.root / "xy" / "xyz").stat().st_mode & 0o777 == 0o700
    assert s.verified_digests("xyz", 4096, size=3) == [s.digest(b"abc")]
    assert s.verified_digests("xyz", 4096, size=4) is None  # another size: not this file
    assert s.is_verified("xyz", size=3) and not s.is_verified("xyz", size=4)
