"""`mlregfs info PATH [--json]`: what GitLab holds for a mounted file, version, model or
candidate, read from the mount's extended attributes (README "Registry metadata")."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from typing import Any

KIND = "user.mlregfs.kind"
JSON_VALUED = (
    "user.gitlab.run.params",
    "user.gitlab.run.metrics",
    "user.gitlab.run.tags",
    "user.gitlab.versions",
    "user.mlregfs.aliases",
)
INT_VALUED = (
    "user.gitlab.file_id",
    "user.gitlab.package_id",
    "user.gitlab.model_version_id",
    "user.gitlab.model_id",
    "user.gitlab.candidate_iid",
    "user.gitlab.size",
    "user.mlregfs.cached_bytes",
)


class NotOnMount(Exception):
    """PATH is not inside an mlregfs mount."""


def attributes(path: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The mount's xattrs of `path` (following links), decoded; and the names that failed."""
    try:
        names = os.listxattr(path)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.ENODATA):
            raise NotOnMount(path) from None
        raise
    if KIND not in names:
        raise NotOnMount(path)
    values: dict[str, Any] = {}
    failed: dict[str, str] = {}
    for name in sorted(n for n in names if n.startswith(("user.gitlab.", "user.mlregfs."))):
        try:
            text = os.getxattr(path, name).decode("utf-8", "replace")
        except OSError as e:
            if e.errno != errno.ENODATA:  # listed, then gone: not worth a word
                failed[name] = os.strerror(e.errno or errno.EIO)
            continue
        values[name] = _decode(name, text)
    return values, failed


def _decode(name: str, text: str) -> Any:
    if name in JSON_VALUED:
        try:
            return json.loads(text)
        except ValueError:
            return text
    if name in INT_VALUED and text.isdigit():
        return int(text)
    return text


def _files(top: str) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Every file under a version or candidate directory, with its registry facts."""
    out: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    for root, dirs, files in os.walk(top, onerror=None):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, top)
            try:
                attrs, bad = attributes(full)
                size = os.stat(full).st_size
            except (OSError, NotOnMount) as e:
                failed[rel] = str(e)
                continue
            failed.update({f"{rel}: {k}": v for k, v in bad.items()})
            out.append(
                {
                    "path": rel,
                    "size": size,
                    "sha256": attrs.get("user.gitlab.sha256"),
                    "cached_bytes": attrs.get("user.mlregfs.cached_bytes", 0),
                    "upload": attrs.get("user.mlregfs.upload"),
                }
            )
    return out, failed


def describe(path: str) -> dict[str, Any]:
    """The report `info` prints: kind, attributes, files (for versions, candidates, dirs)."""
    attrs, failed = attributes(path)
    report: dict[str, Any] = {"path": path, "kind": attrs.get(KIND)}
    if os.path.islink(path):
        report["link"] = os.readlink(path)
    report["attributes"] = attrs
    if report["kind"] in ("version", "candidate", "directory"):
        files, bad = _files(path)
        failed.update(bad)
        size = sum(f["size"] for f in files)
        cached = sum(min(f["cached_bytes"], f["size"]) for f in files)
        report["files"] = files
        report["total"] = {"files": len(files), "size": size, "cached_bytes": cached}
    if failed:
        report["errors"] = failed
    return report


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)


def _share(part: int, whole: int) -> str:
    return f"{100 * part // whole}%" if whole else "100%"


def render(report: dict[str, Any]) -> str:
    lines = [f"{report['path']}: {report['kind']}"]
    if "link" in report:
        lines[0] += f" (link to {report['link']})"
    for name, value in report["attributes"].items():
        if name == KIND:
            continue
        short = name.removeprefix("user.gitlab.").removeprefix("user.")
        shown = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        shown = shown.replace("\n", "\n" + " " * 22)
        lines.append(f"  {short:<19} {shown}")
    if "total" in report:
        t = report["total"]
        lines.append(
            f"files: {t['files']}, {_human(t['size'])}, "
            f"{_share(t['cached_bytes'], t['size'])} cached"
        )
        for f in report["files"]:
            sha = f["sha256"] or f"({f['upload'] or 'no sha256'})"
            lines.append(
                f"  {sha:<64}  {_human(f['size']):>10}  "
                f"{_share(min(f['cached_bytes'], f['size']), f['size']):>4}  {f['path']}"
            )
    for name, why in report.get("errors", {}).items():
        lines.append(f"error: {name}: {why}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="mlregfs info",
        description="Show what GitLab holds for a file, version, model or candidate of a "
        "mount: ids, sha256, description, the run's params and metrics, cached share.",
    )
    p.add_argument("path", nargs="+")
    p.add_argument("--json", action="store_true", help="one JSON object per PATH")
    args = p.parse_args(argv)
    status = 0
    for path in args.path:
        try:
            report = describe(path)
        except NotOnMount:
            print(f"mlregfs info: {path}: not on an mlregfs mount", file=sys.stderr)
            status = 1
            continue
        except OSError as e:
            print(f"mlregfs info: {path}: {os.strerror(e.errno or errno.EIO)}", file=sys.stderr)
            status = 1
            continue
        if report.get("errors"):
            status = 1
        print(json.dumps(report, sort_keys=True) if args.json else render(report))
    return status
