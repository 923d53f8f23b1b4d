"""Logging setup: one line per event, levels, and a filter that masks secrets."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from mlregfs.localstate import FILE_MODE, private_dir


class RedactSecrets(logging.Filter):
    """Defence in depth: replace any known secret in a formatted record with '[MASKED]'."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s and len(s) >= 4]

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        msg = record.getMessage()
        if any(s in msg for s in self.secrets):
            for s in self.secrets:
                msg = msg.replace(s, "[MASKED]")
            record.msg, record.args = msg, None
        return True


class JournalFormatter(logging.Formatter):
    """`<N>` syslog-priority prefixes, which journald turns into log levels."""

    PRIORITY = {
        logging.DEBUG: 7,
        logging.INFO: 6,
        logging.WARNING: 4,
        logging.ERROR: 3,
        logging.CRITICAL: 2,
    }

    def format(self, record: logging.LogRecord) -> str:
        prio = self.PRIORITY.get(record.levelno, 6)
        return "\n".join(f"<{prio}>{line}" for line in super().format(record).splitlines())


def _private_log(log_file: Path) -> None:
    """Create the log file 0600 (it names models and files of a private project), or make an
    existing one so; a missing parent directory is created 0700."""
    if not log_file.parent.exists():
        private_dir(log_file.parent)
    # never through a symlink: a log_file in a shared directory could be redirected by
    # another user to a file of ours (ELOOP is reported as a start error)
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(log_file, flags, FILE_MODE)
    try:
        if os.fstat(fd).st_mode & 0o777 != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)


def setup(
    *, debug: bool = False, log_file: Path | None = None, secrets: list[str] | None = None
) -> None:
    """Configure the root logger for the mount daemon (stderr, or `log_file` if given)."""
    handler: logging.Handler
    if log_file is not None:
        _private_log(log_file)
        handler = logging.FileHandler(log_file)
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    else:
        handler = logging.StreamHandler(sys.stderr)
        # journald adds its own timestamps; keep lines short and greppable
        fmt = "%(levelname)s %(name)s: %(message)s"
    # under systemd (stderr connected to the journal) levels travel as <N> prefixes
    journal = log_file is None and bool(os.environ.get("JOURNAL_STREAM"))
    handler.setFormatter(
        JournalFormatter("%(name)s: %(message)s") if journal else logging.Formatter(fmt)
    )
    handler.addFilter(RedactSecrets(secrets or []))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    # httpx logs every URL at INFO, and signed storage URLs carry short-lived credentials:
    # keep it quiet even with -o debug (our client logs requests without query strings)
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("pyfuse3").setLevel(logging.DEBUG if debug else logging.WARNING)
