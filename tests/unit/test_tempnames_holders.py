"""Temporary-name patterns and the /proc probe behind "one upload per file written"."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from mlregfs.fs.holders import Holders, still_open
from mlregfs.fs.tempnames import is_temp, temp_tool


@pytest.mark.parametrize(
    ("name", "tool"),
    [
        (".config.json.qliaiz", "rsync"),
        (".model-00001-of-00002.safetensors.Ab12Z9", "rsync"),
        (".tmpVhKZax", "tempfile (Rust)"),
        ("tmpab_c9d0x", "tempfile (Python)"),
        ("tmpk2j3h4g5.json", "tempfile (Python)"),
        ("sedAbC123", "sed -i"),
        (".notes.txt.swp", "vim"),
        ("4913", "vim"),
        (".goutputstream-X1Y2Z3", "GIO"),
    ],
)
def test_temporary_names_of_the_tools(name: str, tool: str) -> None:
    assert temp_tool(name) == tool
    assert is_temp(f"sub/dir/{name}")


@pytest.mark.parametrize(
    "name",
    [
        "model.safetensors",
        "config.json",
        ".gitattributes",
        "tokenizer.json",
        "pytorch_model-00001-of-00002.bin",
        "model.safetensors.index.json",
        "tmp",
        "sed.txt",
        "template.json",
        ".tmp",
    ],
)
def test_ordinary_names_are_not_held(name: str) -> None:
    assert temp_tool(name) is None


def test_rsync_staging_directory_is_temporary() -> None:
    assert is_temp(".~tmp~/config.json") and is_temp("sub/.~tmp~/w.bin")
    assert not is_temp("sub/config.json")


def test_python_tempfile_names_match(tmp_path: Path) -> None:
    for _ in range(50):
        fd, path = tempfile.mkstemp(dir=tmp_path)
        os.close(fd)
        assert temp_tool(os.path.basename(path)) == "tempfile (Python)", path


def _dev(path: Path) -> str:
    st = os.stat(path)
    return f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"


def test_still_open_sees_the_process_and_its_children(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"x")
    ino, dev = os.stat(p).st_ino, _dev(p)
    me = os.getpid()
    assert still_open(me, ino, dev) is False
    with open(p, "rb"):  # read-only: not a writer's descriptor
        assert still_open(me, ino, dev) is False
    with open(p, "r+b"):
        assert still_open(me, ino, dev) is True
        assert still_open(me, ino, "0:0") is False  # another filesystem's inode number
        assert still_open(me, ino, dev, "f") is True  # its name: the cheap filter lets it by
        assert still_open(me, ino, dev, "other") is False
    # a child holding it (inherited, as `subprocess` with stdout=f does) counts
    with open(p, "ab") as f:
        child = subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.stdin.read()"],
            stdout=f,
            stdin=subprocess.PIPE,
        )
    try:
        assert still_open(me, ino, dev) is True
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait()
    assert still_open(me, ino, dev) is False
    assert still_open(2**22 + 17, ino, dev) is False  # no such process: it is gone
    assert Holders("/nonexistent-mount").still_open(me, ino) is None  # no such mount
    assert Holders("/").process(me) == me
