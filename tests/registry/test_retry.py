"""The retry policy as a pure function: attempts, deadline, backoff, jitter, Retry-After."""

from __future__ import annotations

from email.utils import formatdate

import pytest

from mlregfs.errors import (
    BadRequest,
    NotFound,
    ProtocolError,
    RateLimited,
    RegistryTimeout,
    RegistryUnavailable,
    ServerError,
    Unauthorized,
)
from mlregfs.registry.retry import (
    ErrorKind,
    RetryPolicy,
    kind_of,
    parse_retry_after,
    retry_delay,
)

POLICY = RetryPolicy(max_attempts=5, base_delay=1.0, max_delay=4.0, deadline=30.0)


def delay(attempt: int, kind: ErrorKind = ErrorKind.SERVER, **kw: float) -> float | None:
    return retry_delay(POLICY, attempt=attempt, kind=kind, elapsed=kw.pop("elapsed", 0.0), **kw)


def test_backoff_doubles_and_is_capped() -> None:
    # jitter=1.0 gives the full step: 1, 2, 4, 4 (cap).
    assert [delay(n, jitter=1.0) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 4.0]


def test_equal_jitter_keeps_at_least_half_the_step() -> None:
    assert delay(3, jitter=0.0) == 2.0
    assert delay(3, jitter=0.5) == 3.0


def test_gives_up_after_max_attempts() -> None:
    assert delay(4) is not None
    assert delay(5) is None


def test_gives_up_when_the_wait_would_pass_the_deadline() -> None:
    assert delay(2, jitter=1.0, elapsed=27.0) == 2.0
    assert delay(2, jitter=1.0, elapsed=28.5) is None


@pytest.mark.parametrize("kind", [ErrorKind.CONNECT, ErrorKind.TIMEOUT, ErrorKind.RATE_LIMITED])
def test_transient_kinds_are_retried(kind: ErrorKind) -> None:
    assert delay(1, kind) is not None


def test_fatal_is_never_retried() -> None:
    assert delay(1, ErrorKind.FATAL) is None


def test_protocol_errors_are_retried_once() -> None:
    assert delay(1, ErrorKind.PROTOCOL) is not None
    assert delay(2, ErrorKind.PROTOCOL) is None


def test_retry_after_is_honoured_and_capped() -> None:
    policy = RetryPolicy(max_retry_after=10.0, deadline=100.0)
    kw = {"attempt": 1, "kind": ErrorKind.RATE_LIMITED, "elapsed": 0.0}
    assert retry_delay(policy, retry_after=7.0, **kw) == 7.0  # type: ignore[arg-type]
    assert retry_delay(policy, retry_after=3600.0, **kw) == 10.0  # type: ignore[arg-type]


def test_retry_after_beyond_the_deadline_gives_up_at_once() -> None:
    policy = RetryPolicy(max_retry_after=60.0, deadline=30.0)
    got = retry_delay(policy, attempt=1, kind=ErrorKind.RATE_LIMITED, elapsed=0, retry_after=45)
    assert got is None


def test_single_attempt_policy_never_retries() -> None:
    assert (
        retry_delay(RetryPolicy(max_attempts=1), attempt=1, kind=ErrorKind.SERVER, elapsed=0)
        is None
    )


def test_invalid_policies_refused() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(deadline=-1)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (RegistryTimeout("t"), ErrorKind.TIMEOUT),
        (RegistryUnavailable("c"), ErrorKind.CONNECT),
        (ServerError("s"), ErrorKind.SERVER),
        (RateLimited("r"), ErrorKind.RATE_LIMITED),
        (ProtocolError("p"), ErrorKind.PROTOCOL),
        (NotFound("n"), ErrorKind.FATAL),
        (Unauthorized("u"), ErrorKind.FATAL),
        (BadRequest("b"), ErrorKind.FATAL),
        (ValueError("v"), ErrorKind.FATAL),
    ],
)
def test_kind_of(exc: BaseException, kind: ErrorKind) -> None:
    assert kind_of(exc) is kind


def test_parse_retry_after_seconds_and_dates() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after(" 1.5 ", now) == 1.5
    assert parse_retry_after("-3", now) == 0.0
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now) == pytest.approx(30.0)
    assert parse_retry_after(formatdate(now - 30, usegmt=True), now) == 0.0
    for junk in (None, "", "soon", "nan", "inf"):
        assert parse_retry_after(junk, now) is None
