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

import hashlib
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger("mlregfs.writeback")


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
    """One open spooled file. Positional writes; size tracked; hashed when finished."""

    def __init__(self, spool: Spool, entry: JournalEntry, fd: int) -> None:
        self.spool = spool
        self.entry = entry
        self.fd = fd
        self.size = 0
        self.dirty = True  # a new (or truncated) file must be uploaded even if empty
        # sha256 kept while bytes arrive in order (cp, dd): no re-read at close
        self._hasher = hashlib.sha256()
        self._hashed = 0  # -1: given up (out-of-order rewrite)
        self._hash_lock = threading.Lock()

    @property
    def path(self) -> Path:
        return self.spool.data_path(self.entry.id)

    def write(self, off: int, data: bytes) -> int:
        """Write at `off` (run in a worker thread: it touches the disk and hashes)."""
        n = os.pwrite(self.fd, data, off)
        with self._hash_lock:  # the kernel may send several writes of one file at once
            if off == self._hashed:
                self._hasher.update(memoryview(data)[:n])
                self._hashed += n
            elif off < self._hashed:  # hashed bytes were rewritten: hash from disk at close
                self._hashed = -1
        self.size = max(self.size, off + n)
        self.dirty = True
        return n

    def read(self, off: int, size: int) -> bytes:
        return os.pread(self.fd, size, off)

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)
        self.size = size
        self.dirty = True
        with self._hash_lock:
            if size < self._hashed:  # the running hash covers bytes that are gone
                self._hashed = -1

    def finish(self) -> tuple[int, str]:
        """Size and sha256 of the spooled bytes (run in a worker thread).

        No fsync: the journal records size and sha256, and `mlregfs recover` checks the bytes
        against them, so a spool cut short by a power loss is never uploaded."""
        size = os.fstat(self.fd).st_size
        self.size = size
        if self._hashed == size:
            return size, self._hasher.hexdigest()
        h = hashlib.sha256()  # written out of order: hash what is on disk
        off = 0
        while chunk := os.pread(self.fd, 4 << 20, off):
            h.update(chunk)
            off += len(chunk)
        return off, h.hexdigest()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
