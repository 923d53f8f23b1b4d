"""`mlregfs serve` as a real subprocess on a free port, for tests, the bench and the demo.

with ServerProcess(tmp_path / "srv") as srv:
    srv.store.create_project("x/y", "public")
    httpx.get(f"{srv.api}/projects/x%2Fy")
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlregfs.server.store import Store
from mlregfs.testing.mount import read_log, wait_or_kill
from mlregfs.testing.ports import free_port

__all__ = ["ServerProcess", "free_port"]

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
# stdlib HTTP, not httpx: the layering test confines httpx to the client and the server, and a
# proxy from the environment must never sit between us and 127.0.0.1
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _request(url: str, *, method: str = "GET", timeout: float = 10) -> bytes:
    """The body of a 2xx answer; urllib.error.HTTPError (an OSError) for any other status."""
    with _HTTP.open(urllib.request.Request(url, method=method), timeout=timeout) as r:
        body: bytes = r.read()
        return body


class ServerProcess:
    """`python -m mlregfs.server serve --port 0 ...` with start/stop/restart and stats."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        download_mode: str = "local",
        extra_args: Sequence[str] = (),
        startup_timeout: float = 15.0,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.download_mode = download_mode
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._store: Store | None = None
        self._log: Any = None
        self._log_path: Path | None = None

    def start(self, port: int = 0) -> ServerProcess:
        """Launch and wait (bounded) until the server answers."""
        if self.proc is not None:
            raise RuntimeError("server already running")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd, port_file = tempfile.mkstemp(prefix="mlregfs-port-")
        os.close(fd)
        os.unlink(port_file)
        log_fd, log_name = tempfile.mkstemp(prefix="mlregfs-serve-", suffix=".log")
        self._log_path = Path(log_name)
        self._log = os.fdopen(log_fd, "wb")
        argv = [
            sys.executable,
            "-m",
            "mlregfs.server",
            "serve",
            "--data",
            str(self.data_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--port-file",
            port_file,
            "--download-mode",
            self.download_mode,
            *self.extra_args,
        ]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + self.startup_timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    code = self.proc.returncode
                    self._cleanup()
                    raise RuntimeError(f"mlregfs serve exited with {code}: {self.stderr()}")
                if os.path.exists(port_file):
                    with contextlib.suppress(ValueError, OSError):
                        self.port = int(Path(port_file).read_text().strip())
                        if self._answers():
                            return self
                time.sleep(0.02)
            self.kill()
            raise RuntimeError(
                f"mlregfs serve not ready after {self.startup_timeout}s: {self.stderr()}"
            )
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(port_file)

    def _answers(self) -> bool:
        try:
            _request(f"{self.url}/-/mlregfs/health", timeout=2)
        except OSError:  # refused, reset, timed out, or an HTTP error status
            return False
        return True

    def stderr(self) -> str:
        """What the server wrote to stdout/stderr so far."""
        return read_log(self._log_path)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not exit in time. Returns the exit status."""
        if self.proc is None:
            return None
        code: int | None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            code = wait_or_kill(self.proc, timeout)
        else:
            code = self.proc.returncode
        self._cleanup()
        return code

    def kill(self) -> None:
        """SIGKILL: an abrupt crash."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self) -> ServerProcess:
        """Stop (if running) and start again on the same port with the same data."""
        port = self.port or 0
        self.stop()
        deadline = time.monotonic() + 10
        while True:  # the old socket may linger for a moment
            try:
                return self.start(port)
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def __enter__(self) -> ServerProcess:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the server and close the seeding Store."""
        self.stop()
        if self._store is not None:
            self._store.close()
            self._store = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("server not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def api(self) -> str:
        return self.url + "/api/v4"

    @property
    def store(self) -> Store:
        """A Store on the server's data dir, for seeding (SQLite WAL makes this safe)."""
        if self._store is None:
            self._store = Store(self.data_dir)
        return self._store

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(_request(f"{self.url}/-/mlregfs/stats"))
        return data

    def reset_stats(self) -> None:
        _request(f"{self.url}/-/mlregfs/stats/reset", method="POST")
