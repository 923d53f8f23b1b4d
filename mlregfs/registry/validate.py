"""Checks for every value that enters mlregfs from the registry: all of it is untrusted input.

Each check returns the normalised value or raises `Invalid`; callers drop the entry that holds
an invalid value (with a warning naming it by a truncated `repr`), so nothing the registry says
is ever used as a local path, a cache key or a directory entry unchecked.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

NAME_MAX = 255  # bytes of one path component (Linux)
MAX_SIZE = 1 << 53  # exclusive: exact in a JSON double, and far above any registry limit
MAX_ID = 1 << 63  # exclusive: a signed 64-bit database id
MAX_TIME = 9e9  # exclusive, epoch seconds: nanoseconds must fit st_mtime_ns (int64)
REPR_CHARS = 80

_SHA256 = re.compile(r"\A[0-9a-fA-F]{64}\Z")
_DIGITS = re.compile(r"\A[0-9]{1,19}\Z")
# C0 controls, DEL and C1 controls: terminal escapes, newlines in `ls`; GitLab refuses them
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
# semver.org's reference regex; GitLab's semver_regex accepts the same language
_SEMVER = re.compile(
    r"\A(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?\Z",
    re.ASCII,
)


class Invalid(ValueError):
    """A registry value that must not be used; the message names it by a truncated repr."""


def check(rule: Callable[[Any], Any]) -> Callable[[Any], bool]:
    """A rule of this module as a predicate: True when `rule` accepts the value."""

    def ok(value: Any) -> bool:
        try:
            rule(value)
        except Invalid:
            return False
        return True

    return ok


def shown(value: Any) -> str:
    """`repr` of an untrusted value for a log line: escaped (no control characters), short."""
    text = repr(value)
    return text if len(text) <= REPR_CHARS else text[: REPR_CHARS - 3] + "..."


def sha256(value: Any) -> str | None:
    """64 hex digits, lowercased; None when the registry knows no checksum (null or "")."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or _SHA256.match(value) is None:
        raise Invalid(f"file_sha256 {shown(value)} is not 64 hex digits")
    return value.lower()


def size(value: Any) -> int:
    """A byte count: an int (not a bool) in [0, 2**53)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_SIZE:
        raise Invalid(f"size {shown(value)} is not an integer in [0, 2**53)")
    return value


def ident(value: Any, what: str = "id") -> int:
    """A positive database id: an int, or a decimal string (MLflow sends ids as strings)."""
    if isinstance(value, str) and _DIGITS.match(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < MAX_ID:
        raise Invalid(f"{what} {shown(value)} is not a positive integer")
    return value


def timestamp(value: float) -> float:
    """A finite epoch time the filesystem can show; anything else is "unknown" (0)."""
    if not math.isfinite(value) or not 0 <= value < MAX_TIME:
        raise Invalid(f"timestamp {shown(value)} is out of range")
    return value


def has_control(text: str) -> bool:
    """True if `text` holds a C0 control, DEL or a C1 control."""
    return _CONTROL.search(text) is not None


def name(value: Any, what: str = "name") -> str:
    """One usable path component: not empty, `.` or `..`, no `/`, no control, <= 255 bytes."""
    if not isinstance(value, str):
        raise Invalid(f"{what} {shown(value)} is not a string")
    if value in ("", ".", ".."):
        raise Invalid(f"{what} {shown(value)} is not a usable file name")
    if "/" in value:
        raise Invalid(f"{what} {shown(value)} contains '/'")
    if has_control(value):
        raise Invalid(f"{what} {shown(value)} contains a control character")
    try:
        encoded = value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        raise Invalid(f"{what} {shown(value)} is not valid UTF-8") from None
    if len(encoded) > NAME_MAX:
        raise Invalid(f"{what} {shown(value)} is longer than {NAME_MAX} bytes")
    return value


def rel_path(value: Any, what: str = "path") -> str:
    """A relative path of usable components ("dir/model.bin"): no empty segment, no `..`."""
    if not isinstance(value, str):
        raise Invalid(f"{what} {shown(value)} is not a string")
    for seg in value.split("/"):
        try:
            name(seg)
        except Invalid:
            raise Invalid(f"{what} {shown(value)}: segment {shown(seg)} is unusable") from None
    return value


def model_name(value: Any) -> str:
    """A model name: one or more usable components joined by `/` (nested directories)."""
    return rel_path(value, "model name")


def semver(value: Any) -> str:
    """A model version: a semver string (which is always a usable path component)."""
    if not isinstance(value, str) or _SEMVER.match(value) is None or len(value) > NAME_MAX:
        raise Invalid(f"version {shown(value)} is not semver")
    return value


def optional_text(value: Any) -> str | None:
    """Free text we only display (a run name): None when absent or unsafe to show."""
    if not isinstance(value, str) or not value or has_control(value) or len(value) > 1024:
        return None
    return value


_RUN_ID = re.compile(r"\A[0-9A-Za-z-]{1,64}\Z")
_TEXT_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # all but tab and newline
TEXT_MAX = 65536


def text(value: Any, what: str = "text", limit: int = TEXT_MAX) -> str:
    """Free text we show (a description, a param value): tabs and newlines allowed, no other
    control character (terminal escapes), at most `limit` bytes of UTF-8."""
    if not isinstance(value, str):
        raise Invalid(f"{what} {shown(value)} is not a string")
    if _TEXT_CONTROL.search(value):
        raise Invalid(f"{what} {shown(value)} contains a control character")
    try:
        encoded = value.encode("utf-8")
    except UnicodeEncodeError:
        raise Invalid(f"{what} {shown(value)} is not valid UTF-8") from None
    if len(encoded) > limit:
        raise Invalid(f"{what} {shown(value)} is longer than {limit} bytes")
    return value


def optional(rule: Callable[[Any], Any], value: Any) -> Any:
    """`rule(value)`, or None when the value is absent ("" or null) or fails the rule."""
    if value is None or value == "":
        return None
    try:
        return rule(value)
    except Invalid:
        return None


def run_id(value: Any) -> str:
    """An MLflow run id (GitLab's candidate eid, a UUID): letters, digits and dashes."""
    if not isinstance(value, str) or _RUN_ID.match(value) is None:
        raise Invalid(f"run id {shown(value)} is not a run id")
    return value


def number(value: Any) -> float:
    """A finite metric value (JSON number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise Invalid(f"value {shown(value)} is not a finite number")
    return float(value)


def url(value: str) -> str:
    """A URL the registry told us to fetch (a redirect): http(s) with a host, nothing odd."""
    try:
        parts = urlsplit(value)
        host = parts.hostname
    except ValueError:  # e.g. "http://[zz/": not a URL at all
        raise Invalid(f"URL {shown(value)} cannot be parsed") from None
    if parts.scheme.lower() not in ("http", "https") or not host:
        raise Invalid(f"URL with scheme {shown(parts.scheme)} or no host is not followed")
    if has_control(value) or " " in value or parts.username is not None:
        raise Invalid("URL with control characters, spaces or credentials is not followed")
    return value
