"""Temporary-file names of the tools that write a file and then rename it onto its real name.

A file with such a name is held at close instead of uploaded (README Semantics 41): GitLab
cannot rename a package file and only a Maintainer can delete one, so a temporary name that
reached the registry would stay there. The patterns are each tool's own, not guesses:
"""

from __future__ import annotations

import re

TEMP_NAMES: tuple[tuple[str, re.Pattern[str]], ...] = (
    # rsync: receiver.c get_tmpname(), "." + name + "." + mkstemp's XXXXXX
    ("rsync", re.compile(r"\A\..+\.[A-Za-z0-9]{6}\Z", re.S)),
    # Rust's tempfile crate (safetensors, hf-xet, transformers through safetensors): ".tmp" + 6
    ("tempfile (Rust)", re.compile(r"\A\.tmp[A-Za-z0-9]{6}\Z")),
    # Python's tempfile: "tmp" + 8 of [a-z0-9_], then the caller's suffix, if any
    ("tempfile (Python)", re.compile(r"\Atmp[a-z0-9_]{8}(?:\.[A-Za-z0-9._-]+)?\Z")),
    # GNU sed -i: ck_mkstemp(..., "sed", ...)
    ("sed -i", re.compile(r"\Ased[A-Za-z0-9]{6}\Z")),
    # vim: swap files next to the file, and the file it writes to test the directory
    ("vim", re.compile(r"\A(?:\..+\.sw[a-p]|4913)\Z", re.S)),
    # GIO (gedit and GNOME tools) safe saves
    ("GIO", re.compile(r"\A\.goutputstream-[A-Za-z0-9]{6}\Z")),
)


def temp_tool(name: str) -> str | None:
    """The tool whose temporary-file pattern `name` (a last path segment) matches, or None."""
    for tool, pattern in TEMP_NAMES:
        if pattern.match(name):
            return tool
    return None


# rsync --delay-updates (and --partial-dir's default) keeps finished files here until the end
TEMP_DIRS = frozenset({".~tmp~"})


def is_temp(path: str) -> bool:
    """Is `path` temporary: its last segment a temporary-file name, or inside a directory
    where a tool stages files before renaming them into place?"""
    *dirs, name = path.split("/")
    return temp_tool(name) is not None or any(d in TEMP_DIRS for d in dirs)
