"""`mlregfs recover`: list, retry or discard spooled files whose upload did not complete."""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

import trio

from mlregfs.config import ConfigError, default_cache_dir, resolve_token
from mlregfs.errors import MlregfsError, NotFound
from mlregfs.registry.base import Registry
from mlregfs.registry.types import Candidate, FileOwner
from mlregfs.writeback import JournalEntry, Spool


def _describe(e: JournalEntry, spool: Spool) -> str:
    state = "incomplete (never closed)" if e.state == "writing" else e.state
    lines = [
        f"{e.id}  {state}  {e.target}",
        f"    source {e.source}  size {e.size}  sha256 {e.sha256 or '-'}",
        f"    bytes  {spool.data_path(e.id)}",
    ]
    if e.error:
        lines.append(f"    error  {e.error}")
    return "\n".join(lines)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


async def _owner(registry: Registry, e: JournalEntry) -> FileOwner:
    if e.owner[0] == "c":
        return Candidate(int(e.owner[1]), 0.0)
    model = await registry.get_model(e.owner[1])
    for v in model.versions:
        if v.version == e.owner[2]:
            return v
    raise NotFound(f"model version {e.owner[1]}/{e.owner[2]} no longer exists")


async def _retry(entries: list[JournalEntry], spool: Spool, token: str | None, kind: str) -> int:
    from mlregfs.registry.gitlab import GitLabRegistry

    failures = 0
    for e in entries:
        data = spool.data_path(e.id)
        if e.sha256 is None or _sha256(data) != e.sha256:
            print(f"{e.id}: spooled bytes do not match the journal; not uploaded", file=sys.stderr)
            failures += 1
            continue
        registry = GitLabRegistry(
            e.source, token, token_kind="job" if kind == "job" else "personal"
        )
        try:
            owner = await _owner(registry, e)
            await registry.upload(owner, e.path, data, e.size)
        except MlregfsError as err:
            e.error = str(err)
            e.state = "failed"
            spool.save(e)
            print(f"{e.id}: upload of {e.target} failed again: {err}", file=sys.stderr)
            failures += 1
        else:
            spool.remove(e)
            print(f"{e.id}: uploaded {e.target} ({e.size} bytes)")
        finally:
            await registry.aclose()
    return 1 if failures else 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="mlregfs recover",
        description="Spooled files whose upload failed, or was cut off by a crash, are kept in"
        " <cache_dir>/spool. List them, upload them again, or discard them.",
    )
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    p.add_argument("--token-file", type=Path, default=None)
    sub = p.add_subparsers(dest="cmd")
    sub.add_parser("list", help="show what is kept (default)")
    r = sub.add_parser("retry", help="upload again (all, or the given ids)")
    r.add_argument("ids", nargs="*")
    d = sub.add_parser("discard", help="delete the kept bytes of the given ids")
    d.add_argument("ids", nargs="*")
    d.add_argument("--all", action="store_true")
    args = p.parse_args(argv)
    root = args.cache_dir / "spool"
    if not root.is_dir():
        print(f"nothing to recover: {root} does not exist")
        return 0
    spool = Spool(root)
    entries = spool.leftovers()
    if args.cmd in (None, "list"):
        if not entries:
            print("nothing to recover")
        for e in entries:
            print(_describe(e, spool))
        return 0
    chosen = [e for e in entries if not args.ids or e.id in args.ids]
    missing = set(args.ids) - {e.id for e in chosen}
    if missing:
        print(f"unknown or still active id(s): {', '.join(sorted(missing))}", file=sys.stderr)
        return 2
    if args.cmd == "discard":
        if not args.ids and not args.all:
            print("name the ids to discard, or --all", file=sys.stderr)
            return 2
        for e in chosen:
            spool.remove(e)
            print(f"{e.id}: discarded {e.target}")
        return 0
    incomplete = [e for e in chosen if e.state == "writing"]
    for e in incomplete:
        print(
            f"{e.id}: {e.target} was never closed by its writer; not uploaded (discard it)",
            file=sys.stderr,
        )
    try:
        token, kind = resolve_token(args.token_file, dict(os.environ))
    except ConfigError as err:
        print(f"mlregfs recover: {err}", file=sys.stderr)
        return 2
    todo = [e for e in chosen if e.state != "writing"]
    code = trio.run(_retry, todo, spool, token, kind)
    return 1 if code or incomplete else 0
