"""Write staging: spool files on local disk, a crash-safe journal, and the upload lifecycle.

Every file written through the mount is first spooled to ``<cache_dir>/spool/<id>.data`` with a
journal entry ``<id>.json`` (target, size, sha256, state, error), rewritten atomically (temp
file, fsync, rename) at the state changes a crash must see. The lifecycle is `UploadState`;
`TRANSITIONS` is the one table of allowed changes, used by the filesystem core and by
`mlregfs recover` alike (an illegal change is a bug and raises `IllegalTransition`):

    WRITING ──close/fsync──> READY ──PUT sent──> UPLOADING ──201──> UPLOADED ──> (removed)
       ^                       │ │                   │  │              ^
       │                       │ └──── unchanged: the registry serves these bytes already
       │                       └──────> FAILED <─────┘  └── daemon gone: interrupted, ambiguous
       └── written again after an fsync (UPLOADED, FAILED, READY; UPLOADING once its PUT
           has ended without an answer)

An entry belongs to the daemon that made it while that process runs (pid and its start time
in the journal); the daemon gives up an entry it keeps (pid 0) when the file's last handle is
closed. Only then, or once its daemon is gone, may `mlregfs recover` touch it. Saves are
serialized where the entry changes and numbered: an older one never lands over a newer one.

A file with a temporary name (rsync's, safetensors', `sed -i`'s) is `held`: closed (READY) but
uploaded only once it is renamed; an entry still held when its daemon went is never uploaded
by `recover retry` unless its id is named.

An entry found by a later process (its daemon is gone) means: WRITING - never closed (discard
only); READY or FAILED - not stored (READY without a sha256: closed by its writer but not
hashed, e.g. its hashing cut off at unmount; `recover` hashes it); UPLOADING - the PUT was cut
off and may or may not have been stored, so `recover` asks the registry before sending it
again; UPLOADED - done (removed at the next start). The spool directory is 0700 and every
file in it 0600.
"""

from __future__ import annotations

import enum
import errno
import glob
import hashlib
import itertools
import json
import logging
import math
import os
import re
import stat
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlregfs import directio
from mlregfs.errors import MlregfsError
from mlregfs.localstate import FILE_MODE, private_dir, tighten, write_private
from mlregfs.registry.types import OwnerKey, owner_path

log = logging.getLogger("mlregfs.spool")

_STAGE = 1 << 20  # FUSE writes are at most 1 MiB (max_write)
_STAGING = directio.StagingPool(keep=4)
_AHEAD_MAX = 32 << 20  # out-of-order bytes held for the running sha256 before giving up


class UploadState(enum.StrEnum):
    """Where a spooled file is in its life. The values are what the journal stores."""

    WRITING = "writing"  # open: bytes still arriving
    READY = "ready"  # closed: size and sha256 recorded (sha256 None: not hashed), no PUT sent
    UPLOADING = "uploading"  # a PUT may be on its way (found later: interrupted, ambiguous)
    UPLOADED = "uploaded"  # the registry answered 201
    FAILED = "failed"  # the registry refused or could not be reached: not stored


S = UploadState
TRANSITIONS: dict[UploadState, frozenset[UploadState]] = {
    S.WRITING: frozenset({S.READY}),
    # UPLOADED: the registry already serves these bytes under this name (nothing is sent)
    S.READY: frozenset({S.UPLOADING, S.FAILED, S.WRITING, S.UPLOADED}),
    # READY: `recover` found no copy of an interrupted PUT in the registry
    # WRITING: written again after a PUT whose outcome is unknown (timed out; the daemon asks
    # the registry before it sends those bytes again). Never while a PUT is in flight: the
    # core answers such a write EBUSY.
    S.UPLOADING: frozenset({S.UPLOADED, S.FAILED, S.READY, S.WRITING}),
    S.UPLOADED: frozenset({S.WRITING}),  # written again after an fsync
    S.FAILED: frozenset({S.READY, S.WRITING}),
}


class IllegalTransition(RuntimeError):
    """A state change the lifecycle does not allow: a bug, never an I/O condition."""


class UploadInterrupted(MlregfsError):
    """The mount shut down (drain_timeout passed) while the upload was running: EIO."""


class GarbledEntry(ValueError):
    """A journal file that is not a valid entry (truncated, edited, unknown state)."""


_WRITTEN_MAX = 16384  # journal sequence numbers remembered per spool

_SHA_RE = re.compile(r"\A[0-9a-f]{64}\Z")


@dataclass
class JournalEntry:
    """What a spooled file is for and how far its upload got."""

    id: str
    source: str  # SOURCE of the mount, without credentials
    owner: list[str]  # ["v", model, version] or ["c", iid]
    path: str  # path inside the version or candidate
    state: UploadState = UploadState.WRITING
    size: int = 0
    sha256: str | None = None
    error: str | None = None
    pid: int = field(default_factory=os.getpid)  # 0: released by its daemon (recover's now)
    # the daemon's start time (field 22 of /proc/<pid>/stat): a pid alone is reused, e.g. a
    # container's daemon has the same pid after every restart. None in old journals.
    pid_start: int | None = field(default_factory=lambda: proc_start(os.getpid()))
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    held: bool = False  # a temporary name: uploaded only once renamed (README Semantics 41)

    @property
    def target(self) -> str:
        return f"{owner_path(self.owner)}/{self.path}"

    def can(self, to: UploadState) -> bool:
        return to in TRANSITIONS[self.state]

    def move(self, to: UploadState) -> None:
        """Change state as `TRANSITIONS` allows; anything else is a bug."""
        if not self.can(to):
            raise IllegalTransition(f"upload {self.id}: {self.state.value} -> {to.value}")
        self.state = to

    @classmethod
    def parse(cls, entry_id: str, text: str) -> JournalEntry:
        """Validate a journal file's text (it is read back from disk: check every field)."""
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise GarbledEntry(f"not JSON: {e}") from None
        if not isinstance(raw, dict):
            raise GarbledEntry("not a JSON object")
        try:
            state = UploadState(str(raw.get("state")))
        except ValueError:
            raise GarbledEntry(f"unknown state {raw.get('state')!r}") from None
        owner = raw.get("owner")
        ok = (
            raw.get("id") == entry_id
            and isinstance(raw.get("source"), str)
            and _owner_ok(owner)
            and isinstance(raw.get("path"), str)
            and raw["path"] != ""
            and _is_int(raw.get("size"))
            and raw["size"] >= 0
            and (raw.get("sha256") is None or _SHA_RE.match(str(raw["sha256"])) is not None)
            and (raw.get("error") is None or isinstance(raw["error"], str))
            and _is_int(raw.get("pid"))
            and raw["pid"] >= 0
            and (raw.get("pid_start") is None or _is_int(raw["pid_start"]))
            and all(isinstance(raw.get(k), int | float) for k in ("created", "updated"))
            and isinstance(raw.get("held", False), bool)
        )
        if not ok:
            raise GarbledEntry("missing or invalid fields")
        fields: dict[str, Any] = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        fields["state"] = state
        fields.setdefault("pid_start", None)  # an old journal: liveness by pid alone
        return cls(**fields)

    def held_by_live_daemon(self) -> bool:
        """Its daemon still runs (that daemon owns the entry; nobody else may touch it)."""
        if self.pid <= 0:
            return False  # released: the daemon gave up on it
        if self.pid_start is not None:
            return proc_start(self.pid) == self.pid_start
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return self.pid == os.getpid() or _is_mlregfs(self.pid)

    def orphaned(self) -> bool:
        """`mlregfs recover` may take it: its daemon is gone or released it. An entry a live
        daemon holds (even FAILED: the writer may close it and the daemon upload it) is never
        touched by anyone else."""
        return not self.held_by_live_daemon()


def _owner_ok(owner: object) -> bool:
    """["v", model, version] or ["c", iid], all strings; an iid is decimal digits."""
    if not isinstance(owner, list) or not all(isinstance(o, str) for o in owner):
        return False
    if len(owner) != {"v": 3, "c": 2}.get(owner[0] if owner else "", -1):
        return False
    return owner[0] != "c" or _IID_RE.match(owner[1]) is not None


_IID_RE = re.compile(r"\A[0-9]{1,18}\Z")


def proc_start(pid: int) -> int | None:
    """Start time of process `pid` in clock ticks since boot (field 22 of /proc/<pid>/stat),
    or None if there is no such process (or no /proc)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_bytes()
        return int(text[text.rindex(b")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_mlregfs(pid: int) -> bool:
    try:
        return b"mlregfs" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@dataclass(frozen=True)
class Orphan:
    """A spool data file without a usable journal entry (nothing says where it belongs)."""

    id: str
    size: int
    reason: str  # "no journal" or why the journal is unreadable


@dataclass(frozen=True)
class Snapshot:
    """A journal entry serialized at one moment, with its place in the order of saves."""

    id: str
    seq: int
    text: str


class Spool:
    """The spool directory: data files plus their journal entries."""

    def __init__(self, root: Path, *, tidy: bool = True) -> None:
        self.root = Path(root)
        # journal saves run in worker threads and may finish in any order: each carries a
        # sequence number taken when its snapshot was made, and an older one never replaces
        # a newer one (checked and written under the entry's lock)
        self._seq = itertools.count(1)
        self._locks_lock = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._written: dict[str, float] = {}  # entry id -> newest seq on disk (inf: removed)
        private_dir(self.root)
        if tidy:
            self.tidy()

    def tidy(self) -> None:
        """At start: tighten modes (0700 dir, 0600 files) and drop entries already uploaded."""
        private_dir(self.root)
        for p in self.root.iterdir():
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                tighten(p, FILE_MODE, st)
        entries, _ = self.scan()
        for e in entries:
            if e.state is UploadState.UPLOADED and not e.held_by_live_daemon():
                log.info("%s was uploaded before its daemon stopped: spool removed", e.target)
                self.remove(e)

    def data_path(self, entry_id: str) -> Path:
        return self.root / f"{entry_id}.data"

    def _journal_path(self, entry_id: str) -> Path:
        return self.root / f"{entry_id}.json"

    def new(self, source: str, owner: OwnerKey, path: str) -> SpoolFile:
        entry = JournalEntry(uuid.uuid4().hex, source, list(owner), path)
        # journal first: a data file without a journal is then always an orphan
        self.save(entry)
        try:
            fd = os.open(self.data_path(entry.id), os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE)
        except OSError:
            self._journal_path(entry.id).unlink(missing_ok=True)
            raise
        return SpoolFile(self, entry, fd)

    def snapshot(self, entry: JournalEntry) -> Snapshot:
        """The entry as it is now, to `write` later (take it where the entry is changed: the
        trio thread of the daemon)."""
        entry.updated = time.time()
        return Snapshot(entry.id, next(self._seq), json.dumps(asdict(entry)))

    def save(self, entry: JournalEntry) -> None:
        """Rewrite a journal entry atomically (temp file, fsync, rename); mode 0600."""
        self.write(self.snapshot(entry))

    def _lock(self, entry_id: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(entry_id, threading.Lock())

    def write(self, snap: Snapshot) -> None:
        """Write a snapshot unless a newer one of the same entry is already on disk, or the
        entry was removed (any thread)."""
        with self._lock(snap.id):
            if self._written.get(snap.id, 0) >= snap.seq:
                return
            write_private(self._journal_path(snap.id), snap.text, fsync=True)
            self._written[snap.id] = snap.seq

    def remove(self, entry: JournalEntry) -> None:
        with self._lock(entry.id):
            self._written[entry.id] = math.inf  # a save still on its way is dropped
            if len(self._written) > _WRITTEN_MAX:  # oldest first: long settled
                del self._written[next(iter(self._written))]
            self.data_path(entry.id).unlink(missing_ok=True)
            self._journal_path(entry.id).unlink(missing_ok=True)
        with self._locks_lock:
            self._locks.pop(entry.id, None)

    def discard(self, entry_id: str) -> None:
        """Delete whatever is kept under `entry_id` (data, journal, or both)."""
        if not entry_id or "/" in entry_id or entry_id.startswith("."):
            raise ValueError(f"not a spool id: {entry_id!r}")
        for p in (self.data_path(entry_id), self._journal_path(entry_id)):
            p.unlink(missing_ok=True)
        name = glob.escape(entry_id)
        # write_private's temp files, and those of versions before it
        for pattern in (f".{name}.json.*.tmp", f"{name}.json.*.tmp"):
            for p in self.root.glob(pattern):
                p.unlink(missing_ok=True)

    def scan(self) -> tuple[list[JournalEntry], list[Orphan]]:
        """Valid journal entries, and data files that no valid entry accounts for."""
        entries: list[JournalEntry] = []
        orphans: list[Orphan] = []
        bad: dict[str, str] = {}
        for p in sorted(self.root.glob("*.json")):
            try:
                entries.append(JournalEntry.parse(p.stem, p.read_text(errors="replace")))
            except FileNotFoundError:
                continue  # removed meanwhile (its upload finished)
            except (OSError, GarbledEntry) as e:
                log.debug("unreadable journal entry %s: %s", p, e)
                bad[p.stem] = f"unreadable journal ({e})"
        known = {e.id for e in entries}
        for p in sorted(self.root.glob("*.data")):
            if p.stem in known:
                continue
            try:
                size = p.stat().st_size
            except FileNotFoundError:
                continue
            orphans.append(Orphan(p.stem, size, bad.pop(p.stem, "no journal")))
        orphans += [Orphan(i, 0, f"{why}, no data") for i, why in bad.items()]
        return entries, orphans

    def entries(self) -> list[JournalEntry]:
        return self.scan()[0]

    def leftovers(self) -> list[JournalEntry]:
        """Entries that need `mlregfs recover`: failed, or not uploaded when their daemon went."""
        return [
            e
            for e in self.entries()
            if (e.state is UploadState.FAILED or e.orphaned())
            and e.state is not UploadState.UPLOADED
        ]


class SpoolFile:
    """One open spooled file. Positional writes; size tracked; hashed while bytes arrive."""

    def __init__(self, spool: Spool, entry: JournalEntry, fd: int) -> None:
        self.spool = spool
        self.entry = entry
        self.fd = fd
        self.size = 0
        self.dirty = True  # a new (or truncated) file must be uploaded even if empty
        # bumped by every write and truncate (before and after the bytes change): an upload
        # compares it around `finish` and the PUT, so bytes changed meanwhile are never
        # journaled as uploaded
        self.gen = 0
        self.abandoned = False  # set at shutdown: a running `finish` stops between chunks
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
        self.gen += 1
        n = self._pwrite(off, data)
        self._hash(off, data, n)
        self.note_write(off, n)
        return n

    # The queued path (fs.writer) does the three steps of `write` separately: the disk write
    # and the hash in parallel, the size at once.
    def note_write(self, off: int, n: int) -> None:
        self.size = max(self.size, off + n)
        self.dirty = True
        self.gen += 1

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
        self.gen += 1
        os.ftruncate(self.fd, size)
        self.size = size
        self.dirty = True
        self.gen += 1
        with self._hash_lock:
            if size < self._hashed or any(off + len(c) > size for off, c in self._ahead.items()):
                self._give_up()  # the running hash covers bytes that are gone

    def hashed(self) -> tuple[int, str] | None:
        """Size and sha256 if the bytes were hashed as they arrived (no reading: any thread)."""
        size = os.fstat(self.fd).st_size
        with self._hash_lock:
            if self._hashed == size and not self._ahead:
                self.size = size
                return size, self._hasher.copy().hexdigest()
        return None

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
        fd = os.dup(self.fd)  # abandoned at shutdown, this may outlive `close`
        try:
            while chunk := os.pread(fd, 4 << 20, off):
                if self.abandoned:
                    raise UploadInterrupted(f"hashing {self.path} abandoned at shutdown")
                h.update(chunk)
                off += len(chunk)
        finally:
            os.close(fd)
        return off, h.hexdigest()

    def close(self) -> None:
        if self._dfd >= 0:
            os.close(self._dfd)
            self._dfd = -1
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
