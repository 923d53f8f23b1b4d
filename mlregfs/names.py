"""GitLab's naming rules as the client applies them, before anything is sent (one copy).

The embedded server keeps its own, independent copy (`server/validation.py`): it is the
reference the client is tested against.
"""

from __future__ import annotations

import re

import semver

from mlregfs.errors import InvalidPath, NameTooLong
from mlregfs.registry.validate import NAME_MAX

# GitLab's ml_model_file_name_regex for the last path segment (reference §8.4)
FILE_NAME_RE = re.compile(r"\A[A-Za-z0-9._+\- ]+\Z")
# GitLab's package_name_regex (model names), reference §2
MODEL_NAME_RE = re.compile(
    r"\A@?(?>(?:[\w\-.+]*/)*(?:[\w\-.]+))@?(?>(?:[\w\-.+]*/)*(?:[\w\-.]*))\Z",
    re.ASCII,  # Ruby's \w: no letters outside ASCII (GitLab refuses `modèle`)
)
# a directory name that is meant as a version: starts with a digit, or v + digit
VERSION_LIKE_RE = re.compile(r"\A[vV]?\d")


def check_file_name(name: str) -> None:
    """Refuse, before any byte is written, a name GitLab's file-name regex would reject."""
    if len(name.encode()) > NAME_MAX:
        raise NameTooLong(f"file name longer than {NAME_MAX} bytes")
    if name in (".", "..") or not FILE_NAME_RE.match(name):
        raise InvalidPath(
            f"file name {name!r} refused: GitLab accepts only letters, digits, '.', '_', '-',"
            " '+' and space"
        )


def check_semver(name: str) -> None:
    """Versions are strict semver (no leading 'v', three numbers), as GitLab requires."""
    try:
        semver.Version.parse(name)
    except ValueError:
        raise InvalidPath(
            f"version {name!r} refused: not strict semver MAJOR.MINOR.PATCH[-pre][+build]"
        ) from None


def check_model_name(full: str) -> None:
    """Refuse a model name GitLab's package name rules would reject."""
    if len(full) > 255 or not MODEL_NAME_RE.match(full):
        raise InvalidPath(f"model name {full!r} refused by GitLab's package name rules")
