"""On-disk block store: fixed-size blocks of remote files, self-validating, LRU-bounded.

Layout: ``<root>/v1/<key[:2]>/<key>/<index>.blk``. Each block file is a header (magic, index,
payload length, crc32 of the payload, digest of the key) followed by the payload, written to a
temp file and renamed into place, so a crash leaves either a whole block or none; a block whose
header or crc does not match is deleted and treated as missing. ``<key>/verified`` marks a
file whose complete bytes matched the registry's sha256.

All methods are synchronous and thread-safe: callers run them in worker threads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("mlregfs.cache")

_MAGIC = b"MLRGFSB1"
_HEADER = struct.Struct("<8sQQI16s")  # magic, index, length, crc32, blake2b(key, 16)
_KEY_OK = frozenset("0123456789abcdefghijklmnopqrstuvwxyz-_.")


@dataclass
class BlockStats:
    hits: int = 0
    misses: int = 0
    stored_bytes: int = 0
    evictions: int = 0
    corrupt: int = 0


def _key_digest(key: str) -> bytes:
    return hashlib.blake2b(key.encode(), digest_size=16).digest()


class BlockStore:
    """Blocks keyed by (file key, block index) under a byte capacity with LRU eviction."""

    def __init__(self, root: Path, capacity: int) -> None:
        self.root = Path(root) / "v1"
        self.capacity = capacity
        self.stats = BlockStats()
        self._lock = threading.Lock()
        self._lru: OrderedDict[tuple[str, int], int] = OrderedDict()  # -> payload size
        self._by_key: dict[str, set[int]] = {}
        self.root.mkdir(parents=True, exist_ok=True)
        self._pins_file = self.root / "pins.json"
        try:
            self.pins: set[str] = set(json.loads(self._pins_file.read_text()))
        except (OSError, ValueError):
            self.pins = set()
        self._scan()

    # -- layout -------------------------------------------------------------------------
    @staticmethod
    def check_key(key: str) -> str:
        if not key or not set(key) <= _KEY_OK or key.startswith("."):
            raise ValueError(f"invalid cache key {key!r}")
        return key

    def _dir(self, key: str) -> Path:
        return self.root / key[:2] / key

    def _path(self, key: str, index: int) -> Path:
        return self._dir(key) / f"{index}.blk"

    def _scan(self) -> None:
        """Rebuild the LRU from disk, oldest access first; drop temp files of a crash."""
        found: list[tuple[float, str, int, int]] = []
        for sub in self.root.iterdir():
            if not sub.is_dir():
                continue
            for kdir in sub.iterdir():
                for f in kdir.iterdir():
                    if f.name.endswith(".tmp"):
                        f.unlink(missing_ok=True)
                        continue
                    if not f.name.endswith(".blk"):
                        continue
                    try:
                        st = f.stat()
                        idx = int(f.name[:-4])
                    except (OSError, ValueError):
                        continue
                    found.append((st.st_mtime, kdir.name, idx, st.st_size - _HEADER.size))
        found.sort()
        with self._lock:
            for _, key, idx, size in found:
                self._remember(key, idx, size)
        self._evict()

    # -- operations ---------------------------------------------------------------------
    def has(self, key: str, index: int) -> bool:
        with self._lock:
            return (key, index) in self._lru

    def count(self, key: str) -> int:
        """How many blocks of `key` are stored."""
        with self._lock:
            return len(self._by_key.get(key, ()))

    def get(self, key: str, index: int) -> bytes | None:
        """The block's payload, or None if absent or corrupt (a corrupt block is deleted)."""
        path = self._path(key, index)
        payload: bytes | None = None
        try:
            with open(path, "rb", buffering=0) as f:
                header = f.read(_HEADER.size)
                if len(header) == _HEADER.size:
                    length = _HEADER.unpack_from(header)[2]
                    buf = bytearray(length)  # one buffer, filled in place: no slicing copy
                    n = f.readinto(buf)
                    if n == length and not f.read(1):
                        payload = self._check(header, buf, key, index)
        except FileNotFoundError:
            with self._lock:
                self.stats.misses += 1
                self._forget(key, index)
            return None
        with self._lock:
            if payload is None:
                self.stats.corrupt += 1
                self.stats.misses += 1
                self._forget(key, index)
            else:
                self.stats.hits += 1
                if (key, index) in self._lru:
                    self._lru.move_to_end((key, index))
        if payload is None:
            log.warning("cache block %s/%d failed its check; discarded", key, index)
            path.unlink(missing_ok=True)
            self.unverify(key)
            return None
        try:  # record the access so LRU order survives a restart
            os.utime(path)
        except OSError:
            pass
        return payload

    @staticmethod
    def _check(header: bytes, payload: bytearray, key: str, index: int) -> bytes | None:
        magic, idx, length, crc, kd = _HEADER.unpack_from(header)
        if (
            magic != _MAGIC
            or idx != index
            or length != len(payload)
            or kd != _key_digest(key)
            or zlib.crc32(payload) != crc
        ):
            return None
        return payload  # type: ignore[return-value]  # bytes-like; never mutated

    def put(self, key: str, index: int, data: bytes | memoryview) -> None:
        """Store a block atomically, then evict least recently used blocks over capacity."""
        self.check_key(key)
        d = self._dir(key)
        d.mkdir(parents=True, exist_ok=True)
        path = self._path(key, index)
        tmp = path.with_name(f"{index}.{threading.get_ident()}.tmp")
        header = _HEADER.pack(_MAGIC, index, len(data), zlib.crc32(data), _key_digest(key))
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(data)
        os.replace(tmp, path)
        with self._lock:
            self._forget(key, index)
            self._remember(key, index, len(data))
        self._evict(protect=key)

    def _remember(self, key: str, index: int, size: int) -> None:
        self._lru[(key, index)] = size
        self._by_key.setdefault(key, set()).add(index)
        self.stats.stored_bytes += size

    def _forget(self, key: str, index: int) -> None:
        size = self._lru.pop((key, index), None)
        if size is not None:
            self.stats.stored_bytes -= size
            idxs = self._by_key.get(key)
            if idxs is not None:
                idxs.discard(index)
                if not idxs:
                    del self._by_key[key]

    def pin(self, key: str, on: bool = True) -> None:
        """Keep (or stop keeping) every block of `key` out of eviction; survives restarts."""
        self.check_key(key)
        with self._lock:
            (self.pins.add if on else self.pins.discard)(key)
            text = json.dumps(sorted(self.pins))
        tmp = self._pins_file.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self._pins_file)

    def pinned_bytes(self) -> int:
        with self._lock:
            return sum(self._lru[(k, i)] for k in self.pins for i in self._by_key.get(k, ()))

    def _evict(self, protect: str | None = None) -> None:
        victims: list[tuple[str, int]] = []
        with self._lock:
            # pinned files are never evicted; the file being written goes last, so one huge
            # file can still stream through a small cache
            for skip in ({protect, *self.pins}, self.pins):
                for k in list(self._lru):
                    if self.stats.stored_bytes <= self.capacity:
                        break
                    if k[0] in skip:
                        continue
                    self._forget(*k)
                    victims.append(k)
            self.stats.evictions += len(victims)
        for key, idx in victims:
            self._path(key, idx).unlink(missing_ok=True)
            self.unverify(key)

    def drop(self, key: str) -> None:
        """Remove every block of `key` (e.g. after a sha256 mismatch)."""
        with self._lock:
            for idx in list(self._by_key.get(key, ())):
                self._forget(key, idx)
        shutil.rmtree(self._dir(key), ignore_errors=True)

    def mark_verified(self, key: str) -> None:
        (self._dir(key) / "verified").touch()

    def unverify(self, key: str) -> None:
        (self._dir(key) / "verified").unlink(missing_ok=True)

    def is_verified(self, key: str) -> bool:
        return (self._dir(key) / "verified").exists()
