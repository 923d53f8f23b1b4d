"""Write staging: spool files on local disk and a crash-safe journal of what they are for.

Every file written through the mount is first spooled to ``<cache_dir>/spool/<id>.data`` with a
journal entry ``<id>.json`` (target, size, sha256, state, error). The entry is rewritten
atomically at each state change:

    writing ──close/fsync──> uploading ──201──> (entry and spool deleted)
                                 │
                                 └─ error ──> failed   (kept: `mlregfs recover` retries or discards)

An entry left in ``writing`` or ``uploading`` by a daemon that no longer runs (crash, kill -9)
is treated as failed by the next mount and by `mlregfs recover`: nothing is deleted silently.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mlregfs import directio

log = logging.getLogger("mlregfs.writeback")

_STAGE = 1 << 20  # FUSE writes are at most 1 MiB (max_write)
_STAGING = directio.StagingPool(keep=4)
_AHEAD_MAX = 32 << 20  # out-of-order bytes held for the running sha256 before giving up


@dataclass
class JournalEntry:
    """What a spooled file is for and how far its upload got."""

    id: str
    source: str  # SOURCE of the mount, without credentials
    owner: list[str]  # ["v", model, version] or ["c", iid]
    path: str  # path inside the version or candidate
    state: str = "writing"  # writing | uploading | failed
    size: int = 0
    sha256: str | None = None
    error: str | None = None
    pid: int = field(default_factory=os.getpid)
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)

    @property
    def target(self) -> str:
        if self.owner[0] == "c":
            return f"candidates/{self.owner[1]}/{self.path}"
        return f"models/{self.owner[1]}/{self.owner[2]}/{self.path}"

    def orphaned(self) -> bool:
        """Left behind by a daemon that is gone (crash or kill)."""
        if self.state == "failed":
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return self.pid != os.getpid() and not _is_mlregfs(self.pid)


def _is_mlregfs(pid: int) -> bool:
    try:
        return b"mlregfs" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


class Spool:
    """The spool directory: data files plus their journal entries."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def data_path(self, entry_id: str) -> Path:
        return self.root / f"{entry_id}.data"

    def _journal_path(self, entry_id: str) -> Path:
        return self.root / f"{entry_id}.json"

    def new(self, source: str, owner: tuple[str, ...], path: str) -> SpoolFile:
        entry = JournalEntry(uuid.uuid4().hex, source, list(owner), path)
        fd = os.open(self.data_path(entry.id), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self.save(entry)
        return SpoolFile(self, entry, fd)

    def save(self, entry: JournalEntry) -> None:
        """Rewrite a journal entry atomically (temp file, fsync, rename)."""
        entry.updated = time.time()
        path = self._journal_path(entry.id)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(asdict(entry), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def remove(self, entry: JournalEntry) -> None:
        self.data_path(entry.id).unlink(missing_ok=True)
        self._journal_path(entry.id).unlink(missing_ok=True)

    def entries(self) -> list[JournalEntry]:
        out = []
        for p in sorted(self.root.glob("*.json")):
            try:
                out.append(JournalEntry(**json.loads(p.read_text())))
            except (OSError, ValueError, TypeError) as e:
                log.warning("unreadable journal entry %s: %s", p, e)
        return out

    def leftovers(self) -> list[JournalEntry]:
        """Entries that need a human or `mlregfs recover`: failed, or orphaned by a crash."""
        return [e for e in self.entries() if e.orphaned()]


class SpoolFile:
    """One open spooled file. Positional writes; size tracked; hashed while bytes arrive."""

    def __init__(self, spool: Spool, entry: JournalEntry, fd: int) -> None:
        self.spool = spool
        self.entry = entry
        self.fd = fd
        self.size = 0
        self.dirty = True  # a new (or truncated) file must be uploaded even if empty
        # sha256 kept while bytes arrive (cp, dd): no re-read at close. The kernel sends
        # several writes at once and they can land out of order: those wait in `_ahead`.
        self._hasher = hashlib.sha256()
        self._hashed = 0  # -1: given up (a rewrite, or too much out of order)
        self._ahead: dict[int, bytes] = {}
        self._ahead_bytes = 0
        self._hash_lock = threading.Lock()
        # Whole aligned pages are written with O_DIRECT (see directio: page-cache writes
        # are the dearest part of a write on our VMs); the rest through `fd`.
        self._dfd = -1
        if directio.O_DIRECT:
            try:
                self._dfd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC | directio.O_DIRECT)
            except OSError:
                self._dfd = -1

    @property
    def path(self) -> Path:
        return self.spool.data_path(self.entry.id)

    def write(self, off: int, data: bytes) -> int:
        """Write at `off` (run in a worker thread: it touches the disk and hashes)."""
        n = self._pwrite(off, data)
        self._hash(off, data, n)
        self.note_write(off, n)
        return n

    # The queued path (fs.writer) does the three steps of `write` separately: the disk write
    # and the hash in parallel, the size at once.
    def note_write(self, off: int, n: int) -> None:
        self.size = max(self.size, off + n)
        self.dirty = True

    def put(self, off: int, data: bytes) -> None:
        """Write all of `data` at `off` (worker thread)."""
        done = 0
        while done < len(data):
            n = self._pwrite(off + done, data[done:] if done else data)
            if n <= 0:
                raise OSError(errno.EIO, f"spool write made no progress at {off + done}")
            done += n

    def hash_chunk(self, off: int, data: bytes) -> None:
        """Feed `data` at `off` to the running sha256 (worker thread)."""
        self._hash(off, data, len(data))

    def _pwrite(self, off: int, data: bytes) -> int:
        if (
            self._dfd >= 0
            and off % directio.ALIGN == 0
            and len(data) % directio.ALIGN == 0
            and 0 < len(data) <= _STAGE
        ):
            buf = _STAGING.take(len(data))
            try:
                buf[: len(data)] = data
                return os.pwrite(self._dfd, memoryview(buf)[: len(data)], off)
            except OSError as e:
                if not directio.unsupported(e):
                    raise
                log.info("spool %s: no O_DIRECT (%s); writing buffered", self.path, e)
                os.close(self._dfd)
                self._dfd = -1
            finally:
                _STAGING.give(buf)
        return os.pwrite(self.fd, data, off)

    def _hash(self, off: int, data: bytes, n: int) -> None:
        with self._hash_lock:  # the kernel may send several writes of one file at once
            if self._hashed < 0:
                return
            if off < self._hashed:  # hashed bytes were rewritten: hash from disk at close
                self._give_up()
                return
            if off > self._hashed:
                if self._ahead_bytes + n > _AHEAD_MAX or off in self._ahead:
                    self._give_up()
                    return
                self._ahead[off] = data[:n] if n < len(data) else data
                self._ahead_bytes += n
                return
            self._hasher.update(memoryview(data)[:n])
            self._hashed += n
            while self._hashed in self._ahead:
                chunk = self._ahead.pop(self._hashed)
                self._ahead_bytes -= len(chunk)
                self._hasher.update(chunk)
                self._hashed += len(chunk)

    def _give_up(self) -> None:
        self._hashed = -1
        self._ahead.clear()
        self._ahead_bytes = 0

    def read(self, off: int, size: int) -> bytes:
        return os.pread(self.fd, size, off)

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)
        self.size = size
        self.dirty = True
        with self._hash_lock:
            if size < self._hashed or any(off + len(c) > size for off, c in self._ahead.items()):
                self._give_up()  # the running hash covers bytes that are gone

    def finish(self) -> tuple[int, str]:
        """Size and sha256 of the spooled bytes (run in a worker thread).

        No fsync: the journal records size and sha256, and `mlregfs recover` checks the bytes
        against them, so a spool cut short by a power loss is never uploaded."""
        size = os.fstat(self.fd).st_size
        self.size = size
        with self._hash_lock:
            if self._hashed == size and not self._ahead:
                return size, self._hasher.hexdigest()
        h = hashlib.sha256()  # written out of order: hash what is on disk
        off = 0
        while chunk := os.pread(self.fd, 4 << 20, off):
            h.update(chunk)
            off += len(chunk)
        return off, h.hexdigest()

    def close(self) -> None:
        if self._dfd >= 0:
            os.close(self._dfd)
            self._dfd = -1
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
