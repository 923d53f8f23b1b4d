"""Log formatting: secrets masked, journald priorities under systemd."""

from __future__ import annotations

import logging

from mlregfs.logs import JournalFormatter, RedactSecrets


def test_secrets_are_masked() -> None:
    rec = logging.LogRecord("x", logging.INFO, __file__, 1, "token is %s", ("glpat-SECRET1",), None)
    assert RedactSecrets(["glpat-SECRET1"]).filter(rec)
    assert rec.getMessage() == "token is [MASKED]"


def test_journal_priorities() -> None:
    f = JournalFormatter("%(message)s")
    rec = logging.LogRecord("x", logging.WARNING, __file__, 1, "a\nb", None, None)
    assert f.format(rec) == "<4>a\n<4>b"
    rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "boom", None, None)
    assert f.format(rec) == "<3>boom"
