"""`mlregfs recover`: list, retry or discard spooled files whose upload did not complete.

Never uploads a file twice: before any upload it asks the registry whether a copy with the
same path and sha256 is already stored (an upload cut off by a kill or an unmount may have
completed), and it refuses to put older bytes over a newer, different copy unless `--force`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

import trio

from mlregfs.config import ConfigError, default_cache_dir, resolve_token
from mlregfs.errors import MlregfsError, NotFound
from mlregfs.registry.base import Registry
from mlregfs.registry.types import Candidate, FileOwner
from mlregfs.spool import JournalEntry, Orphan, Spool, UploadState

S = UploadState
RegistryFactory = Callable[[str], Registry]  # SOURCE -> a registry client for it

_LABEL = {
    S.WRITING: "incomplete (never closed)",
    S.READY: "not uploaded",
    S.UPLOADING: "interrupted (upload cut off: retry first asks the registry if it was stored)",
    S.UPLOADED: "uploaded (nothing to do: retry cleans it up)",
    S.FAILED: "failed",
}


def _describe(e: JournalEntry, spool: Spool) -> str:
    data = spool.data_path(e.id)
    state = _LABEL[e.state]
    if e.state is S.READY and e.sha256 is None:
        state = "not uploaded (closed; its sha256 is computed by retry)"
    if e.held and e.state is not S.UPLOADED:
        state = (
            "held: a temporary name, never renamed; not uploaded (discard it, or name its id"
            " to retry to upload it under this name)"
        )
    if e.state is not S.UPLOADED and not data.exists():
        state = f"LOST (its data file is missing; was {e.state.value})"
    lines = [
        f"{e.id}  {state}  {e.target}",
        f"    source {e.source}  size {e.size}  sha256 {e.sha256 or '-'}",
        f"    bytes  {data}",
    ]
    if e.error:
        lines.append(f"    error  {e.error}")
    return "\n".join(lines)


def _describe_orphan(o: Orphan, spool: Spool) -> str:
    what = "orphaned data, no journal" if o.reason == "no journal" else f"orphaned: {o.reason}"
    return f"{o.id}  {what}  size {o.size}\n    bytes  {spool.data_path(o.id)}"


def _sha256(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


async def _owner(registry: Registry, e: JournalEntry) -> FileOwner:
    if e.owner[0] == "c":
        return Candidate(int(e.owner[1]), 0.0)
    model = await registry.get_model(e.owner[1])
    for v in model.versions:
        if v.version == e.owner[2]:
            return v
    raise NotFound(f"model version {e.owner[1]}/{e.owner[2]} no longer exists")


async def _stored(registry: Registry, owner: FileOwner, e: JournalEntry) -> str | None:
    """ "same" if the registry holds these bytes at this path, "newer" if a different copy
    made after the entry, else None."""
    for f in await registry.list_files(owner):
        if f.path != e.path:
            continue
        if f.sha256 is not None and f.sha256.lower() == e.sha256:
            return "same"
        if f.created_at > e.created:
            return "newer"
    return None


def _gitlab(token: str | None, kind: str) -> RegistryFactory:
    from mlregfs.registry.gitlab import GitLabRegistry

    def make(source: str) -> Registry:
        return GitLabRegistry(source, token, token_kind="job" if kind == "job" else "personal")

    return make


async def _retry(
    entries: list[JournalEntry], spool: Spool, make_registry: RegistryFactory, force: bool
) -> int:
    """Upload each entry at most once; 1 if any is left for a human, else 0."""
    failures = 0

    def fail(e: JournalEntry, message: str) -> None:
        nonlocal failures
        failures += 1
        print(f"{e.id}: {message}", file=sys.stderr)

    for e in entries:
        if e.state is S.UPLOADED:
            spool.remove(e)
            print(f"{e.id}: {e.target} was already uploaded; cleaned up")
            continue
        data = spool.data_path(e.id)
        try:
            size, digest = await trio.to_thread.run_sync(_sha256, data)
        except FileNotFoundError:
            fail(e, f"{e.target} is lost: its spooled bytes {data} are missing (discard it)")
            continue
        except OSError as err:
            fail(e, f"cannot read the spooled bytes {data}: {err.strerror}; not uploaded")
            continue
        if e.state is S.READY and e.sha256 is None and size == e.size:
            e.sha256 = digest  # closed by its writer, not hashed (cut off): hashed now
        if e.sha256 is None or (size, digest) != (e.size, e.sha256):
            fail(e, "spooled bytes do not match the journal; not uploaded")
            continue
        registry = make_registry(e.source)
        try:
            owner = await _owner(registry, e)
            found = await _stored(registry, owner, e)
            if found == "same":
                spool.remove(e)
                print(f"{e.id}: {e.target} is already in the registry (same sha256); not uploaded")
                continue
            if found == "newer" and not force:
                fail(
                    e,
                    f"the registry holds a newer, different {e.target}; not putting these older"
                    " bytes over it (retry --force to upload anyway, or discard)",
                )
                continue
            if e.state is not S.READY:
                e.move(S.READY)
            e.move(S.UPLOADING)
            e.error = None
            spool.save(e)
            await registry.upload(owner, e.path, data, e.size)
            e.move(S.UPLOADED)
            spool.save(e)
            spool.remove(e)
            print(f"{e.id}: uploaded {e.target} ({e.size} bytes)")
        except (MlregfsError, OSError) as err:
            if e.state is S.UPLOADING:
                e.move(S.FAILED)
            e.error = str(err)
            spool.save(e)
            fail(e, f"upload of {e.target} failed again: {err}")
        finally:
            await registry.aclose()
    return 1 if failures else 0


def main(argv: list[str], make_registry: RegistryFactory | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mlregfs recover",
        description="Spooled files whose upload failed, or was cut off by a crash or an unmount,"
        " are kept in <cache_dir>/spool. List them, upload them again, or discard them.",
    )
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    p.add_argument("--token-file", type=Path, default=None)
    sub = p.add_subparsers(dest="cmd")
    sub.add_parser("list", help="show what is kept (default)")
    r = sub.add_parser("retry", help="upload again (all, or the given ids)")
    r.add_argument("ids", nargs="*")
    r.add_argument(
        "--force",
        action="store_true",
        help="upload even when the registry holds a newer, different copy",
    )
    d = sub.add_parser("discard", help="delete the kept bytes of the given ids")
    d.add_argument("ids", nargs="*")
    d.add_argument("--all", action="store_true")
    args = p.parse_args(argv)
    root = args.cache_dir / "spool"
    if not root.is_dir():
        print(f"nothing to recover: {root} does not exist")
        return 0
    spool = Spool(root, tidy=False)
    all_entries, orphans = spool.scan()
    # a running daemon's entries are its own (even failed ones: its writer may still close
    # the file and the daemon upload it); it releases those it gives up on at close
    entries = [e for e in all_entries if e.orphaned()]
    held = [e for e in all_entries if not e.orphaned()]
    if args.cmd in (None, "list"):
        if not entries and not orphans:
            print("nothing to recover")
        for e in entries:
            print(_describe(e, spool))
        for e in held:
            print(f"{e.id}  in use by the running mount pid {e.pid}  {e.target}")
        for o in orphans:
            print(_describe_orphan(o, spool))
        return 0
    ids = set(args.ids)
    chosen = [e for e in entries if not ids or e.id in ids]
    chosen_orphans = [o for o in orphans if not ids or o.id in ids]
    missing = ids - {e.id for e in chosen} - {o.id for o in chosen_orphans}
    if missing:
        print(f"unknown or still active id(s): {', '.join(sorted(missing))}", file=sys.stderr)
        return 2
    if args.cmd == "discard":
        if not ids and not args.all:
            print("name the ids to discard, or --all", file=sys.stderr)
            return 2
        for e in chosen:
            spool.remove(e)
            print(f"{e.id}: discarded {e.target}")
        for o in chosen_orphans:
            spool.discard(o.id)
            print(f"{o.id}: discarded orphaned data ({o.size} bytes)")
        return 0
    for o in chosen_orphans:
        print(
            f"{o.id}: orphaned data ({o.reason}): nothing says where it belongs; not uploaded"
            " (discard it)",
            file=sys.stderr,
        )
    incomplete = [e for e in chosen if e.state is S.WRITING]
    for e in incomplete:
        print(
            f"{e.id}: {e.target} was never closed by its writer; not uploaded (discard it)",
            file=sys.stderr,
        )
    # a temporary name never renamed (rsync's, safetensors'): junk in the registry unless
    # someone says otherwise by naming its id
    temporary = [e for e in chosen if e.held and e.state is not S.UPLOADED and e.id not in ids]
    for e in temporary:
        print(
            f"{e.id}: {e.target} has a temporary name and was never renamed; not uploaded"
            " (discard it, or name its id to upload it anyway)",
            file=sys.stderr,
        )
    todo = [e for e in chosen if e.state is not S.WRITING and e not in temporary]
    if make_registry is None and any(e.state is not S.UPLOADED for e in todo):
        try:
            token, kind = resolve_token(args.token_file, dict(os.environ))
        except ConfigError as err:
            print(f"mlregfs recover: {err}", file=sys.stderr)
            return 2
        make_registry = _gitlab(token, kind)
    code = trio.run(_retry, todo, spool, make_registry or _gitlab(None, "personal"), args.force)
    return 1 if code or incomplete or temporary or chosen_orphans else 0
