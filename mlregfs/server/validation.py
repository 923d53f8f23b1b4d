"""GitLab's validation regexes and name encodings, transcribed from `lib/gitlab/regex*.rb`."""

from __future__ import annotations

import re

# Gitlab::Regex::Packages.package_name_regex (== ml_model_name_regex). Ruby's \w is ASCII-only;
# Python 3.11 supports the atomic groups `(?>...)` used there.
PACKAGE_NAME_RE = re.compile(
    r"\A\@?(?>(([\w\-\.\+]*)\/)*([\w\-\.]+))@?(?>(([\w\-\.\+]*)\/)*([\w\-\.]*))\Z", re.ASCII
)

_SEMVER_MMP = r"(?P<major>0|[1-9]\d*)\.(?P<minor>0|[1-9]\d*)\.(?P<patch>0|[1-9]\d*)"
_SEMVER_PRE_BUILD = (
    r"(?:-(?P<prerelease>(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)"
    r"(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+(?P<build>[0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?"
)
# Gitlab::Regex.semver_regex
SEMVER_RE = re.compile(r"\A" + _SEMVER_MMP + _SEMVER_PRE_BUILD + r"\Z", re.ASCII)

# Gitlab::Regex.ml_model_file_name_regex
FILE_NAME_RE = re.compile(r"\A[A-Za-z0-9\.\_\-\+ ]+\Z")

# Gitlab::Regex.ml_model_version_name_regex = Regexp.union(semver_regex, /candidate_\d+/)
CANDIDATE_PACKAGE_RE = re.compile(r"candidate_\d+")

SEMVER_RULE = (
    "MAJOR.MINOR.PATCH with optional -prerelease and +build, numbers without leading "
    "zeros and no leading 'v' (GitLab's semver_regex), e.g. 1.0.0 or 2.1.0-rc.1"
)
MODEL_NAME_RULE = (
    "letters, digits, '_', '-', '.', segments separated by '/', optional leading '@' "
    "(GitLab's package_name_regex), at most 255 characters"
)

# Ruby's URI.encode_www_form_component leaves only these bytes unencoded;
# URI.encode_uri_component is the same except that space becomes %20, not '+'.
_WWW_FORM_SAFE = frozenset(b"*-._0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
# CGI.escape (used by the mlflow-artifacts download lookup): unreserved = a-zA-Z0-9_.-~,
# space becomes '+'.
_CGI_SAFE = frozenset(b"-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def encode_uri_component(s: str) -> str:
    """Ruby `URI.encode_uri_component`: GitLab's stored ml_model `file_name`."""
    return "".join(chr(b) if b in _WWW_FORM_SAFE else f"%{b:02X}" for b in s.encode("utf-8"))


def cgi_escape(s: str) -> str:
    """Ruby `CGI.escape` (space as '+', '~' kept, '*' encoded)."""
    out = []
    for b in s.encode("utf-8"):
        if b == 0x20:
            out.append("+")
        elif b in _CGI_SAFE:
            out.append(chr(b))
        else:
            out.append(f"%{b:02X}")
    return "".join(out)


def valid_model_name(name: str) -> bool:
    return len(name) <= 255 and PACKAGE_NAME_RE.match(name) is not None


def parse_semver(version: str) -> tuple[int, int, int, str | None] | None:
    """(major, minor, patch, prerelease) when `version` is strict semver, else None."""
    if len(version) > 255:
        return None
    m = SEMVER_RE.match(version)
    if not m:
        return None
    return int(m["major"]), int(m["minor"]), int(m["patch"]), m["prerelease"]


def valid_file_name(name: str) -> bool:
    return FILE_NAME_RE.match(name) is not None


def ar_integer(value: str) -> int | None:
    """ActiveRecord's integer cast of a string: "5abc" -> 5, "abc" -> None."""
    m = re.match(r"\s*([+-]?\d+)", value)
    return int(m.group(1)) if m else None
