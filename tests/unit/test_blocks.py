"""BlockStore: atomic, self-validating, LRU-bounded blocks on disk."""

from __future__ import annotations

from pathlib import Path

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
    s.mark_verified("abc")
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
