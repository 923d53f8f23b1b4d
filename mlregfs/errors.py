"""Exception tree of mlregfs, and the one table that maps it to errno.

    MlregfsError                  errno EIO unless a subclass says otherwise
    ├── RegistryError             anything the registry answered or failed to answer
    │   ├── NotFound              ENOENT  (404: project, model, version, candidate, file)
    │   ├── AuthError             EACCES
    │   │   ├── Unauthorized      401: token missing, invalid, expired
    │   │   └── Forbidden         403: authenticated but not allowed
    │   ├── BadRequest            EINVAL  (400: invalid name, parameter)
    │   ├── Conflict              EEXIST  (already exists)
    │   ├── TooLarge              EFBIG   (file over the registry's size limit)
    │   ├── RateLimited           EAGAIN  (429 after retries ran out)
    │   ├── ServerError           EIO     (5xx after retries ran out)
    │   ├── RegistryUnavailable   EIO     (connection refused/reset, DNS, TLS)
    │   │   └── RegistryTimeout   ETIMEDOUT
    │   └── ProtocolError         EIO     (unexpected answer: bad JSON, short body, ...)
    ├── IntegrityError            EIO     (bytes did not match the registry's sha256)
    ├── InvalidPath               EINVAL  / ENAMETOOLONG via subclass
    └── (fs semantics)            NotADirectory ENOTDIR, IsADirectory EISDIR,
                                  ReadOnly EROFS, NotPermitted EPERM, NotEmpty ENOTEMPTY,
                                  Busy EBUSY, Exists EEXIST, Denied EACCES (the mount
                                  refuses what the role cannot finish, e.g. a rename),
                                  Unsupported EINVAL (a flag the mount does not implement),
                                  NoAttribute ENODATA, AttributeTooLarge E2BIG (xattrs)

Messages never contain tokens: the HTTP layer builds them from method, path and status only.
"""

from __future__ import annotations

import errno as _errno


class MlregfsError(Exception):
    """Base of every error mlregfs raises on purpose."""

    errno: int = _errno.EIO


class RegistryError(MlregfsError):
    """The registry refused a request or could not be reached."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class NotFound(RegistryError):
    """The project, model, version, candidate or file does not exist (or is hidden)."""

    errno = _errno.ENOENT


class AuthError(RegistryError):
    """The registry refused our credentials."""

    errno = _errno.EACCES


class Unauthorized(AuthError):
    """401: no token, or the token is invalid, expired or revoked."""


class Forbidden(AuthError):
    """403: the token is valid but lacks the role or scope."""


class BadRequest(RegistryError):
    """400: the registry rejected a parameter (e.g. a file name)."""

    errno = _errno.EINVAL


class Conflict(RegistryError):
    """The object already exists."""

    errno = _errno.EEXIST


class TooLarge(RegistryError):
    """The file exceeds the registry's size limit."""

    errno = _errno.EFBIG


class RateLimited(RegistryError):
    """429 answers outlasted our retry budget."""

    errno = _errno.EAGAIN


class ServerError(RegistryError):
    """5xx answers outlasted our retry budget."""


class RegistryUnavailable(RegistryError):
    """Connection-level failure: refused, reset, DNS, TLS."""


class RegistryTimeout(RegistryUnavailable):
    """The registry did not answer in time."""

    errno = _errno.ETIMEDOUT


class ProtocolError(RegistryError):
    """The registry answered something we cannot interpret."""


class IntegrityError(MlregfsError):
    """Downloaded bytes do not match the registry's sha256."""


class InvalidPath(MlregfsError):
    """A path or name that cannot exist in the registry."""

    errno = _errno.EINVAL


class NameTooLong(InvalidPath):
    """A name longer than the registry allows."""

    errno = _errno.ENAMETOOLONG


class NotADirectory(MlregfsError):
    errno = _errno.ENOTDIR


class IsADirectory(MlregfsError):
    errno = _errno.EISDIR


class ReadOnly(MlregfsError):
    """The mount, or this part of the tree, cannot be written."""

    errno = _errno.EROFS


class NotPermitted(MlregfsError):
    """The operation has no meaning in the registry (rename, link, chmod...)."""

    errno = _errno.EPERM


class NotEmpty(MlregfsError):
    errno = _errno.ENOTEMPTY


class Busy(MlregfsError):
    """The file is being written by another handle."""

    errno = _errno.EBUSY


class Exists(MlregfsError):
    errno = _errno.EEXIST


class Denied(MlregfsError):
    errno = _errno.EACCES


class Unsupported(MlregfsError):
    errno = _errno.EINVAL


class NoAttribute(MlregfsError):
    """An extended attribute the mount does not serve for this entry."""

    errno = _errno.ENODATA


class AttributeTooLarge(MlregfsError):
    """An extended attribute's value is over the kernel's 64 KiB limit."""

    errno = _errno.E2BIG


def to_errno(exc: BaseException) -> int:
    """The errno a caller sees for `exc`; unknown errors are EIO."""
    if isinstance(exc, MlregfsError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    if isinstance(exc, TimeoutError):
        return _errno.ETIMEDOUT
    return _errno.EIO
