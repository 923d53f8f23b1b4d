"""Does a process (or one of its children) still hold a file of this mount open?

FUSE sends FLUSH at every close(2) of a descriptor, duplicates included, and pyfuse3 does not
pass the closing process to `flush`. A shell's `> f`, `dd of=` and every fork+exec close a
copy of the writer's descriptor before or while it writes, so uploading at each flush would
store partial or empty copies. The writer's own descriptors tell: /proc/<pid>/fdinfo/<fd>
names the inode and the mount of each (no request to the mount itself, whatever the pid or
mount namespace), and the writer's children (inherited descriptors) are in
/proc/<pid>/task/<tid>/children.
"""

from __future__ import annotations

import logging
import os
import re

log = logging.getLogger("mlregfs.fs")

_MAX_PROCS = 256  # a writer with more descendants than this is not searched further


def _fdinfo(pid: int, fd: str) -> tuple[int, int] | None:
    """(mnt_id, ino) of one descriptor open for writing, or None if it is gone or read-only
    (a writer that also reads the file back must still get its upload's error at close)."""
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as f:
            text = f.read(4096)
    except OSError:
        return None
    mnt = ino = -1
    for line in text.splitlines():
        if line.startswith(b"flags:") and int(line.split()[1], 8) & os.O_ACCMODE == os.O_RDONLY:
            return None
        if line.startswith(b"mnt_id:"):
            mnt = int(line.split()[1])
        elif line.startswith(b"ino:"):
            ino = int(line.split()[1])
    return (mnt, ino) if mnt >= 0 and ino >= 0 else None


def _mount_devs(pid: int) -> dict[int, str]:
    """mnt_id -> "major:minor" as process `pid` sees its mounts."""
    devs: dict[int, str] = {}
    with open(f"/proc/{pid}/mountinfo", "rb") as f:
        for line in f:
            parts = line.split(maxsplit=3)
            if len(parts) >= 3:
                devs[int(parts[0])] = parts[2].decode()
    return devs


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                kids += [int(k) for k in f.read().split()]
        except OSError:
            continue
    return kids


def _named(pid: int, fd: str, name: str | None) -> bool:
    """Might descriptor `fd` be the file called `name`? Its link's last segment is the same
    in every mount namespace; one readlink is cheaper than reading fdinfo (3 calls), and a
    server holds hundreds of sockets and other files."""
    if name is None:
        return True
    try:
        link = os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return False
    last = link.rpartition("/")[2]
    return last == name or last == f"{name} (deleted)"


def still_open(pid: int, ino: int, dev: str, name: str | None = None) -> bool | None:
    """True if `pid` or a descendant holds a descriptor of inode `ino` on the filesystem with
    device `dev` ("major:minor"); False if not; None if that cannot be known (no such
    process, another user's process, no /proc). `name`: the file's name, to skip other
    descriptors cheaply."""
    if pid <= 0:
        return None
    todo, seen = [pid], set[int]()
    while todo and len(seen) < _MAX_PROCS:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            fds = os.listdir(f"/proc/{p}/fd")
        except FileNotFoundError:
            if p == pid:
                return False  # the writer is gone (it exited: its last close)
            continue
        except OSError:
            if p == pid:
                return None  # not ours to look at
            continue
        devs: dict[int, str] | None = None
        for fd in fds:
            if not _named(p, fd, name):
                continue
            info = _fdinfo(p, fd)
            if info is None or info[1] != ino:
                continue
            if devs is None:
                try:
                    devs = _mount_devs(p)
                except OSError:
                    return None
            if devs.get(info[0]) == dev:
                return True
        todo += _children(p)
    return False


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_dev(mountpoint: str) -> str | None:
    """ "major:minor" of the FUSE filesystem mounted at `mountpoint` (as this process sees it)."""
    found = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                head, _, tail = line.partition(" - ")
                parts = head.split()
                if len(parts) >= 5 and _unescape(parts[4]) == mountpoint:
                    if tail.split(" ", 1)[0].startswith("fuse"):
                        found = parts[2]
    except OSError:
        return None
    return found


class Holders:
    """`still_open` for the files of the mount at `mountpoint` (its device is read once the
    mount exists)."""

    def __init__(self, mountpoint: str) -> None:
        self.mountpoint = mountpoint  # as /proc/self/mountinfo shows it: symlinks resolved
        self._dev: str | None = None
        self._warned = False

    def process(self, pid: int) -> int:
        """The process (thread group) of thread `pid`: the opener's thread may end before the
        process that holds the descriptor does. 0 if unknown."""
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Tgid:"):
                        return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            pass
        return 0

    def still_open(self, pid: int, ino: int, name: str | None = None) -> bool | None:
        if self._dev is None:
            self._dev = mount_dev(self.mountpoint)
            if self._dev is None:
                if not self._warned:
                    self._warned = True
                    log.warning(
                        "%s is not in /proc/self/mountinfo: a close uploads when bytes were"
                        " written since the last upload (README Semantics 42)",
                        self.mountpoint,
                    )
                return None
        return still_open(pid, ino, self._dev, name)
