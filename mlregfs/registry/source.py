"""Parse a SOURCE URL into the (API base, project ref) splits worth trying. Pure, no I/O.

Accepted forms:

    https://HOST[/relative_root]/NAMESPACE[/SUBGROUP...]/PROJECT
    https://HOST[/relative_root]/api/v4/projects/ID[/anything]   (ID numeric or URL-encoded path)

Tolerated noise: a trailing `/`, `.git`, a `/-/...` web suffix (`/-/ml/models`), a query or a
fragment. A path URL does not say where a relative root (`/gitlab`) ends and the namespace
begins, so `candidates()` returns every split, shortest root first; the client keeps the first
one whose `GET /projects/:ref` is not a 404.
"""

from __future__ import annotations

import re
from typing import NamedTuple
from urllib.parse import quote, unquote, urlsplit

_API_MARKER = ("api", "v4", "projects")
_NUMERIC = re.compile(r"\A[0-9]+\Z")
# A project or group path segment as GitLab allows it (letters, digits, `_`, `-`, `.`).
_SEGMENT = re.compile(r"\A[A-Za-z0-9_.\-]+\Z")


class SourceSplit(NamedTuple):
    """One way to read SOURCE: the `/api/v4` base URL and the `:id` route segment."""

    api_base: str  # "https://host/gitlab/api/v4", no trailing slash
    project_ref: str  # "42" or "group%2Fsub%2Fproj" (already URL-encoded)


def candidates(source: str) -> list[SourceSplit]:
    """Every plausible (api_base, project_ref) split of `source`, most likely first.

    Raises ValueError with a message that says what is wrong; the message never repeats
    credentials embedded in the URL.
    """
    text = source.strip()
    if not text:
        raise ValueError("SOURCE is empty; expected https://HOST/NAMESPACE/PROJECT")
    parts = urlsplit(text)
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError(
            f"SOURCE must start with https:// or http:// (got scheme {parts.scheme or 'none'!r})"
        )
    if parts.username is not None or parts.password is not None:
        # Do not echo the URL: the userinfo is probably a token.
        raise ValueError("SOURCE must not contain credentials; pass the token separately")
    if not parts.hostname:
        raise ValueError("SOURCE has no host; expected https://HOST/NAMESPACE/PROJECT")
    origin = f"{parts.scheme.lower()}://{parts.netloc}"

    # Split on raw "/" before decoding, so an encoded id like group%2Fproj stays one segment.
    segments = [s for s in parts.path.split("/") if s != ""]
    if "-" in segments:  # web UI suffix: /group/proj/-/ml/models/3
        segments = segments[: segments.index("-")]
    if segments and segments[-1].endswith(".git"):
        segments[-1] = segments[-1][: -len(".git")]
        if not segments[-1]:
            segments.pop()

    api_at = _find_api_marker(segments)
    if api_at is not None:
        return [_api_split(origin, segments, api_at, source)]
    return _path_splits(origin, segments)


def _find_api_marker(segments: list[str]) -> int | None:
    """Index of "api" in a `.../api/v4/projects/...` path, or None."""
    n = len(_API_MARKER)
    for i in range(len(segments) - n + 1):
        if tuple(s.lower() for s in segments[i : i + n]) == _API_MARKER:
            return i
    return None


def _api_split(origin: str, segments: list[str], api_at: int, source: str) -> SourceSplit:
    root = segments[:api_at]
    rest = segments[api_at + len(_API_MARKER) :]
    if not rest:
        raise ValueError("SOURCE ends at /api/v4/projects; add the project ID or encoded path")
    raw_id = rest[0]
    if _NUMERIC.match(raw_id):
        ref = raw_id
    else:
        path = unquote(raw_id)
        parts = path.split("/")
        if len(parts) < 2:
            raise ValueError(
                f"SOURCE project id {raw_id!r} is neither numeric nor a URL-encoded "
                "NAMESPACE%2FPROJECT path"
            )
        _check_segments(parts)
        ref = quote(path, safe="")
    # Anything after the id (e.g. /ml/mlflow of an MLflow tracking URI) is ignored on purpose.
    return SourceSplit(_api_base(origin, [unquote(s) for s in root]), ref)


def _path_splits(origin: str, segments: list[str]) -> list[SourceSplit]:
    decoded = [unquote(s) for s in segments]
    if not decoded:
        raise ValueError("SOURCE has no project path; expected https://HOST/NAMESPACE/PROJECT")
    if len(decoded) == 1:
        raise ValueError(
            f"SOURCE path /{decoded[0]} names a group or user, not a project; "
            "expected https://HOST/NAMESPACE/PROJECT"
        )
    _check_segments(decoded)
    splits = []
    # A project path needs at least NAMESPACE/PROJECT, so the root may take all but two segments.
    for cut in range(len(decoded) - 1):
        root, project = decoded[:cut], decoded[cut:]
        splits.append(SourceSplit(_api_base(origin, root), quote("/".join(project), safe="")))
    return splits


def _check_segments(segments: list[str]) -> None:
    for seg in segments:
        if seg in (".", "..") or not _SEGMENT.match(seg):
            raise ValueError(f"SOURCE path segment {seg!r} cannot be part of a GitLab project path")


def _api_base(origin: str, root: list[str]) -> str:
    prefix = "".join("/" + quote(s, safe="") for s in root)
    return f"{origin}{prefix}/api/v4"
