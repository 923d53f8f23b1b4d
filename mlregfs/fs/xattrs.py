"""Read-only extended attributes: what GitLab holds for an entry, where tools look for it.

Names are part of the interface (README "Registry metadata"). `user.gitlab.*` is what the
registry says, `user.mlregfs.*` what this mount knows (its kind, its local cache). Values are
UTF-8 text; maps (params, metrics, tags) are JSON objects with sorted keys.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from mlregfs.errors import AttributeTooLarge, NoAttribute
from mlregfs.registry.types import Candidate, Model, ModelVersion, RemoteFile, Run

PREFIXES = ("user.gitlab.", "user.mlregfs.")  # every name we serve; others cost no I/O
VALUE_MAX = 65536  # XATTR_SIZE_MAX: the kernel refuses longer values
# names answered from the run (`runs/get`), fetched only when one of them is read
RUN_NAMES = (
    "user.gitlab.run.status",
    "user.gitlab.run.params",
    "user.gitlab.run.metrics",
    "user.gitlab.run.tags",
)

Attrs = dict[str, str]


def iso(t: float) -> str | None:
    """Epoch seconds as GitLab writes times (ISO 8601, UTC); None when unknown (0)."""
    if not t:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _attrs(kind: str, gitlab: dict[str, object]) -> Attrs:
    """`user.mlregfs.kind` and the `user.gitlab.<name>` values GitLab gave (None: absent)."""
    out: Attrs = {"user.mlregfs.kind": kind}
    for name, value in gitlab.items():
        if value is not None and value != "":
            out[f"user.gitlab.{name}"] = str(value)
    return out


def _json(value: object) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def file_attrs(f: RemoteFile, cached_bytes: int) -> Attrs:
    out = _attrs(
        "file",
        {
            "sha256": f.sha256,
            "file_id": f.file_id,
            "package_id": f.package_id,
            "created_at": iso(f.created_at),
            "size": f.size,
        },
    )
    out["user.mlregfs.cached_bytes"] = str(min(cached_bytes, f.size))
    return out


def pending_attrs(state: str) -> Attrs:
    """A file written through this mount and not uploaded yet: GitLab holds nothing for it."""
    return {"user.mlregfs.kind": "file", "user.mlregfs.upload": state}


def version_attrs(v: ModelVersion) -> Attrs:
    return _attrs(
        "version",
        {
            "model": v.model,
            "version": v.version,
            "model_version_id": v.id,
            "package_id": v.package_id,
            "description": v.description,
            "created_at": iso(v.created_at),
            "run_id": v.run_id,
        },
    )


def candidate_attrs(c: Candidate) -> Attrs:
    return _attrs(
        "candidate",
        {
            "candidate_iid": c.iid,
            "run_id": c.eid,
            "run.name": c.name,
            "package_id": c.package_id,
            "created_at": iso(c.created_at),
        },
    )


def model_attrs(m: Model | None, aliases: dict[str, str]) -> Attrs:
    """A model directory; `m` None for a directory that only groups longer model names."""
    if m is None:
        return {"user.mlregfs.kind": "namespace"}
    out = _attrs(
        "model",
        {
            "model": m.name,
            "model_id": m.id,
            "description": m.description,
            "created_at": iso(m.created_at),
            "versions": _json(sorted(v.version for v in m.versions)),
        },
    )
    if aliases:
        out["user.mlregfs.aliases"] = _json(aliases)
    return out


def run_attrs(run: Run) -> Attrs:
    out: Attrs = {"user.gitlab.run.status": run.status or "unknown"}
    out["user.gitlab.run.params"] = _json(dict(run.params))
    out["user.gitlab.run.metrics"] = _json(run.latest_metrics())
    out["user.gitlab.run.tags"] = _json(dict(run.tags))
    return out


def value(attrs: Attrs, name: str) -> bytes:
    """The value of `name` as the kernel gets it; NoAttribute / AttributeTooLarge."""
    text = attrs.get(name)
    if text is None:
        raise NoAttribute(f"no attribute {name!r}")
    data = text.encode("utf-8")
    if len(data) > VALUE_MAX:
        raise AttributeTooLarge(f"attribute {name!r} is {len(data)} bytes, over 64 KiB")
    return data
