"""The upload lifecycle: one state table, journal files read back safely, `recover` that never
uploads twice, orphaned and lost spool data, private spool modes. No kernel."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from pathlib import Path

import pytest

from mlregfs import recover
from mlregfs.registry.fake import InMemoryRegistry
from mlregfs.spool import (
    TRANSITIONS,
    IllegalTransition,
    JournalEntry,
    Spool,
    UploadState,
)

S = UploadState
DEAD_PID = 2**22 + 17  # above the default pid_max: never a live process


def test_every_state_has_a_row_and_every_legal_transition_works() -> None:
    assert set(TRANSITIONS) == set(UploadState)
    for frm, tos in TRANSITIONS.items():
        for to in tos:
            e = JournalEntry("a" * 32, "src", ["c", "1"], "f", state=frm)
            e.move(to)
            assert e.state is to


def test_every_illegal_transition_raises() -> None:
    illegal = [(f, t) for f in UploadState for t in UploadState if t not in TRANSITIONS[f]]
    # the ones that mattered: nothing skips the PUT, nothing leaves UPLOADED but a new write
    assert (S.WRITING, S.UPLOADING) in illegal and (S.UPLOADED, S.UPLOADING) in illegal
    assert (S.UPLOADED, S.FAILED) in illegal and (S.WRITING, S.UPLOADED) in illegal
    for frm, to in illegal:
        e = JournalEntry("a" * 32, "src", ["c", "1"], "f", state=frm)
        with pytest.raises(IllegalTransition):
            e.move(to)
        assert e.state is frm


def _journal(spool: Spool, entry_id: str, data: bytes | None = b"bytes", **kw: object) -> dict:
    raw: dict[str, object] = {
        "id": entry_id,
        "source": "http://registry.invalid/g/p",
        "owner": ["v", "llama", "1.0.0"],
        "path": "w.bin",
        "state": "failed",
        "size": len(data or b""),
        "sha256": hashlib.sha256(data or b"").hexdigest(),
        "error": None,
        "pid": DEAD_PID,
        "created": time.time() - 60,
        "updated": time.time() - 60,
    }
    raw.update(kw)
    (spool.root / f"{entry_id}.json").write_text(json.dumps(raw))
    if data is not None:
        spool.data_path(entry_id).write_bytes(data)
    return raw


def test_old_journal_states_are_read_safely(tmp_path: Path) -> None:
    """An entry left in `uploaded` (the old, undeclared state) was uploaded: it is cleaned at
    start and never counted as "not uploaded"; an unknown state is an orphan, not a crash."""
    spool = Spool(tmp_path / "spool")
    _journal(spool, "1" * 32, state="uploaded")
    _journal(spool, "2" * 32, state="uploading")
    _journal(spool, "3" * 32, state="banana")
    _journal(spool, "4" * 32, state="writing")
    entries, orphans = spool.scan()
    assert {e.id: e.state for e in entries} == {
        "1" * 32: S.UPLOADED,
        "2" * 32: S.UPLOADING,
        "4" * 32: S.WRITING,
    }
    assert [(o.id, o.size) for o in orphans] == [("3" * 32, 5)]
    assert "unknown state 'banana'" in orphans[0].reason
    assert {e.id for e in spool.leftovers()} == {"2" * 32, "4" * 32}  # what needs a human
    Spool(spool.root)  # the next start
    assert not spool.data_path("1" * 32).exists()
    assert {e.id for e in spool.entries()} == {"2" * 32, "4" * 32}


@pytest.mark.parametrize(
    "garble",
    [
        "{not json",
        "[]",
        json.dumps({"id": "5" * 32, "state": "failed"}),  # fields missing
        None,  # a data file and no journal at all
    ],
)
def test_recover_lists_and_discards_orphaned_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], garble: str | None
) -> None:
    spool = Spool(tmp_path / "spool")
    spool.data_path("5" * 32).write_bytes(b"x" * 1234)
    if garble is not None:
        (spool.root / f"{'5' * 32}.json").write_text(garble)
    assert recover.main(["--cache-dir", str(tmp_path), "list"]) == 0
    out = capsys.readouterr().out
    assert "5" * 32 in out and "orphaned" in out and "size 1234" in out
    if garble is None:
        assert "orphaned data, no journal" in out
    assert recover.main(["--cache-dir", str(tmp_path), "retry"]) == 1  # nothing to upload it as
    assert "discard it" in capsys.readouterr().err
    assert recover.main(["--cache-dir", str(tmp_path), "discard", "5" * 32]) == 0
    assert list(spool.root.iterdir()) == []
    assert recover.main(["--cache-dir", str(tmp_path), "list"]) == 0
    assert "nothing to recover" in capsys.readouterr().out


def test_recover_retry_with_missing_data_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spool = Spool(tmp_path / "spool")
    _journal(spool, "6" * 32, data=None)
    reg = InMemoryRegistry()
    reg.add_version("llama", "1.0.0")
    assert recover.main(["--cache-dir", str(tmp_path), "list"]) == 0
    assert "LOST" in capsys.readouterr().out
    code = recover.main(["--cache-dir", str(tmp_path), "retry"], make_registry=lambda s: reg)
    assert code == 1
    err = capsys.readouterr().err
    assert "is lost" in err and "missing" in err and "Traceback" not in err
    assert reg.stats.by_kind.get("upload", 0) == 0
    assert recover.main(["--cache-dir", str(tmp_path), "discard", "6" * 32]) == 0
    assert list(spool.root.iterdir()) == []


def _retry(tmp_path: Path, reg: InMemoryRegistry, *args: str) -> int:
    return recover.main(["--cache-dir", str(tmp_path), "retry", *args], make_registry=lambda s: reg)


def test_interrupted_upload_already_stored_is_not_uploaded_again(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    data = os.urandom(3000)
    _journal(spool, "7" * 32, data, state="uploading")
    reg = InMemoryRegistry()
    v = reg.add_version("llama", "1.0.0")
    reg.add_file(v, "w.bin", data)  # the cut-off PUT had been stored after all
    assert _retry(tmp_path, reg) == 0
    assert reg.stats.by_kind.get("upload", 0) == 0
    assert list(spool.root.iterdir()) == []


def test_interrupted_upload_not_stored_is_uploaded_once(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    data = os.urandom(3000)
    _journal(spool, "8" * 32, data, state="uploading")
    reg = InMemoryRegistry()
    v = reg.add_version("llama", "1.0.0")
    assert _retry(tmp_path, reg) == 0
    assert reg.stats.by_kind["upload"] == 1
    (f,) = reg._files[("v", "llama", "1.0.0")].values()
    assert f[1] == data
    assert _retry(tmp_path, reg) == 0  # a second retry finds nothing to do
    assert reg.stats.by_kind["upload"] == 1
    assert list(spool.root.iterdir()) == [] and v


def test_old_bytes_never_go_over_a_newer_copy_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spool = Spool(tmp_path / "spool")
    old = b"old bytes"
    _journal(spool, "9" * 32, old, state="failed")
    reg = InMemoryRegistry()
    v = reg.add_version("llama", "1.0.0")
    reg.add_file(v, "w.bin", b"newer bytes, written since")
    assert _retry(tmp_path, reg) == 1
    assert "newer" in capsys.readouterr().err
    assert reg.stats.by_kind.get("upload", 0) == 0
    assert [e.id for e in spool.leftovers()] == ["9" * 32]  # kept for a human
    assert _retry(tmp_path, reg, "--force") == 0
    assert reg._files[("v", "llama", "1.0.0")]["w.bin"][1] == old
    assert list(spool.root.iterdir()) == []


def test_uploaded_entries_are_only_cleaned_up(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    _journal(spool, "a" * 32, b"done", state="uploaded")
    reg = InMemoryRegistry()
    reg.add_version("llama", "1.0.0")
    assert _retry(tmp_path, reg) == 0
    assert not reg.stats.by_kind  # not even a question to the registry
    assert reg.stats.by_kind.get("upload", 0) == 0
    assert list(spool.root.iterdir()) == []


def test_spool_is_private_and_looser_modes_are_tightened(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    spool = Spool(root)
    sf = spool.new("src", ("c", "1"), "f.bin")
    sf.close()
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    for p in root.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    os.chmod(root, 0o755)
    for p in root.iterdir():
        os.chmod(p, 0o644)
    Spool(root)  # the next start
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in root.iterdir())


def test_journal_temp_files_are_private_ignored_and_discarded(tmp_path: Path) -> None:
    """Journal entries are written by localstate.write_private (O_EXCL|O_NOFOLLOW, random
    temp name): a symlink at the old per-thread temp name is never written through, and a
    temp file left by a crash is not an entry and goes with `discard`."""
    import threading

    spool = Spool(tmp_path / "spool")
    eid = "7" * 32
    victim = tmp_path / "victim"
    victim.write_text("keep")
    planted = spool.root / f"{eid}.json.{os.getpid()}-{threading.get_ident()}.tmp"
    planted.symlink_to(victim)
    entry = JournalEntry(eid, "src", ["c", "1"], "f.bin")
    spool.save(entry)
    assert victim.read_text() == "keep"
    assert JournalEntry.parse(eid, spool._journal_path(eid).read_text()).id == eid
    planted.unlink()
    leftover = spool.root / f".{eid}.json.{os.getpid()}.abcd1234.tmp"
    leftover.write_text("{")
    assert [e.id for e in spool.scan()[0]] == [eid] and spool.scan()[1] == []
    spool.discard(eid)
    assert list(spool.root.iterdir()) == []


def test_recover_never_touches_an_entry_a_running_daemon_holds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Even a failed one: its writer may still close the file and the daemon upload it."""
    spool = Spool(tmp_path / "spool")
    _journal(spool, "4" * 32, b"held", pid=os.getpid())  # an old journal: no pid_start
    reg = InMemoryRegistry()
    reg.add_version("llama", "1.0.0")
    assert recover.main(["--cache-dir", str(tmp_path), "list"]) == 0
    assert f"in use by the running mount pid {os.getpid()}" in capsys.readouterr().out
    assert _retry(tmp_path, reg) == 0
    assert _retry(tmp_path, reg, "4" * 32) == 2  # still active
    assert reg.stats.by_kind.get("upload", 0) == 0
    assert spool.data_path("4" * 32).read_bytes() == b"held"


def test_a_reused_pid_is_not_a_live_daemon(tmp_path: Path) -> None:
    """In a container the daemon has the same pid after every restart: the journal keeps the
    process start time too, and an entry of an earlier process with our pid is orphaned."""
    from mlregfs.spool import proc_start

    mine = JournalEntry("5" * 32, "src", ["c", "1"], "f")
    assert mine.pid == os.getpid() and mine.pid_start == proc_start(os.getpid())
    assert mine.held_by_live_daemon()
    spool = Spool(tmp_path / "spool")
    start = proc_start(os.getpid())
    assert start is not None
    _journal(spool, "6" * 32, pid=os.getpid(), pid_start=start - 1, state="ready")
    (e,) = spool.entries()
    assert not e.held_by_live_daemon() and e.orphaned()
    _journal(spool, "6" * 32, pid=0, state="ready")  # released by its daemon
    (e,) = spool.entries()
    assert e.orphaned()


def test_journal_saves_never_land_out_of_order(tmp_path: Path) -> None:
    """Saves run in worker threads: an older snapshot that finishes last is dropped."""
    spool = Spool(tmp_path / "spool")
    sf = spool.new("src", ("c", "1"), "f.bin")
    e = sf.entry
    e.move(S.READY)
    e.move(S.UPLOADING)
    e.move(S.UPLOADED)
    older = spool.snapshot(e)
    e.move(S.WRITING)
    newer = spool.snapshot(e)
    spool.write(newer)
    spool.write(older)
    (on_disk,) = spool.entries()
    assert on_disk.state is S.WRITING
    spool.remove(e)
    spool.write(spool.snapshot(e))  # a save still on its way after the removal
    assert list(spool.root.iterdir()) == []
    sf.close()


def test_a_candidate_id_must_be_digits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spool = Spool(tmp_path / "spool")
    _journal(spool, "9" * 32, owner=["c", "x"])
    reg = InMemoryRegistry()
    assert _retry(tmp_path, reg) == 1  # orphaned data, not a traceback
    assert "unreadable journal" in capsys.readouterr().err
    assert reg.stats.by_kind.get("upload", 0) == 0


def test_an_old_journal_without_start_time_falls_back_to_the_pid(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    _journal(spool, "3" * 32, pid=os.getpid(), state="ready")
    (e,) = spool.entries()
    assert e.pid_start is None and e.held_by_live_daemon()
    _journal(spool, "3" * 32, pid=DEAD_PID, state="ready")
    (e,) = spool.entries()
    assert e.pid_start is None and not e.held_by_live_daemon()


def test_a_closed_but_unhashed_entry_is_hashed_and_uploaded(tmp_path: Path) -> None:
    """READY with no sha256: closed by its writer, its hashing cut off; retry hashes it (the
    recorded size must match: a spool cut short is never uploaded)."""
    spool = Spool(tmp_path / "spool")
    data = os.urandom(3000)
    _journal(spool, "9" * 32, data, state="ready", sha256=None, pid=0)
    _journal(spool, "a" * 32, data[:100], state="ready", sha256=None, size=3000, pid=0)
    reg = InMemoryRegistry()
    reg.add_version("llama", "1.0.0")
    assert _retry(tmp_path, reg, "9" * 32) == 0
    (f,) = reg._files[("v", "llama", "1.0.0")].values()
    assert f[1] == data
    assert _retry(tmp_path, reg, "a" * 32) == 1  # shorter than journaled: not uploaded
    assert reg.stats.by_kind["upload"] == 1


def test_a_held_temporary_file_is_not_uploaded_unless_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Semantics 41: a temporary name never renamed stays out of the registry: `retry` leaves
    it (exit 1: something is left for a human) unless its id is named."""
    spool = Spool(tmp_path / "spool")
    data = b"half a checkpoint"
    _journal(spool, "c" * 32, data, state="ready", path=".tmpVhKZax", held=True)
    reg = InMemoryRegistry()
    reg.add_version("llama", "1.0.0")
    assert recover.main(["--cache-dir", str(tmp_path), "list"]) == 0
    assert "held: a temporary name" in capsys.readouterr().out
    assert _retry(tmp_path, reg) == 1
    assert "temporary name" in capsys.readouterr().err
    assert reg.stats.by_kind.get("upload", 0) == 0
    assert _retry(tmp_path, reg, "c" * 32) == 0  # named: uploaded as asked
    assert reg._files[("v", "llama", "1.0.0")][".tmpVhKZax"][1] == data
    assert list(spool.root.iterdir()) == []
