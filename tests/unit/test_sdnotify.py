"""sd_notify sends datagrams to $NOTIFY_SOCKET, and nothing without it."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from mlregfs.sdnotify import notify


def test_notify_sends_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert notify("READY=1")
        assert srv.recv(100) == b"READY=1"


def test_notify_without_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
