"""Local state on disk: private directories and files, and damaged entries set aside.

Everything the daemon keeps (catalog, blocks, pins, log, status) may hold names, sizes and
sha256 of a private project: directories are 0700 and files 0600 whatever the umask, and
looser modes found at start are tightened. Anything unreadable or of the wrong shape is
renamed out of the way (`<name>.damaged-<time>`), logged once, and rebuilt: damaged local
state never stops a mount, and nothing is deleted that a person might want to inspect.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import stat
import time
from pathlib import Path

log = logging.getLogger("mlregfs.localstate")

DIR_MODE = 0o700
FILE_MODE = 0o600


def set_aside(path: Path, why: object, into: Path | None = None) -> Path | None:
    """Rename `path` to `<name>.damaged-<time>` (in `into` if given) and log it once.

    Returns the new path, or None if even the rename failed (then it is only logged)."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    where = into if into is not None else path.parent
    target = where / f"{path.name}.damaged-{stamp}-{secrets.token_hex(2)}"
    try:
        if into is not None:
            private_dir(into)
        os.replace(path, target)
    except OSError as e:
        log.warning("damaged local state %s (%s); cannot set it aside: %s", path, why, e)
        return None
    log.warning("damaged local state %s (%s): set aside as %s", path, why, target)
    return target


def private_dir(path: Path, *, repair: bool = False) -> Path:
    """Create `path` (and missing parents) 0700, or tighten an existing directory to 0700.

    With `repair`, something that is not a directory at `path` is set aside first (only for
    paths inside our own cache directory); otherwise it raises NotADirectoryError."""
    path = Path(path)
    try:
        st: os.stat_result | None = os.stat(path)  # a symlinked cache_dir is the user's choice
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISDIR(st.st_mode):
        if not repair:
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))
        set_aside(path, "not a directory")
        st = None
    if st is None:
        if path.parent != path and not path.parent.is_dir():
            private_dir(path.parent)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, DIR_MODE)  # the umask may only have removed bits: chmod below
        st = os.stat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))
    tighten(path, DIR_MODE, st)
    return path


def tighten(path: Path, mode: int, st: os.stat_result | None = None) -> None:
    """chmod `path` to exactly `mode`; loosening found on an existing entry is logged."""
    try:
        have = stat.S_IMODE((st or os.stat(path)).st_mode)
        if have != mode:
            os.chmod(path, mode)
            if have & ~mode:
                log.info("made %s private (mode %o, was %o)", path, mode, have)
    except OSError as e:
        log.warning("cannot make %s private: %s", path, e)


def write_private(
    path: Path, data: bytes | str, mode: int = FILE_MODE, *, fsync: bool = False
) -> None:
    """Replace `path` atomically with a new file of `mode` (its bytes fsynced first with
    `fsync`).

    The temp file is created with O_EXCL|O_NOFOLLOW under a random name and renamed over
    `path`: a symlink planted at either name is never written through."""
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask applied to os.open's mode
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view) :]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
