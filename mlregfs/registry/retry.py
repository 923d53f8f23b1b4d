"""Retry and backoff policy as pure functions: no clock, no randomness, no I/O of their own.

The HTTP client asks `retry_delay()` after every failed attempt and either sleeps for the answer
or gives up. Time and jitter are passed in, so the policy is tested without waiting.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime

from mlregfs.errors import (
    ProtocolError,
    RateLimited,
    RegistryTimeout,
    RegistryUnavailable,
    ServerError,
)


class ErrorKind(enum.Enum):
    """What went wrong, as far as retrying is concerned."""

    CONNECT = "connect"  # refused, reset, DNS, TLS: nothing (or not all) reached the server
    TIMEOUT = "timeout"
    SERVER = "server"  # 5xx
    RATE_LIMITED = "rate_limited"  # 429
    PROTOCOL = "protocol"  # short body, bad JSON: maybe a proxy hiccup, worth one more try
    FATAL = "fatal"  # 4xx other than 429, or anything we do not understand


@dataclass(frozen=True)
class RetryPolicy:
    """Bounds on retrying one operation (all times in seconds)."""

    max_attempts: int = 5  # attempts in total, the first one included
    base_delay: float = 0.25  # backoff before the 2nd attempt; doubles each time
    max_delay: float = 8.0  # cap of one computed backoff step
    deadline: float = 30.0  # total time an operation may spend, retries included
    max_retry_after: float = 30.0  # cap on a server's Retry-After
    max_protocol_attempts: int = 2  # a malformed answer is retried once, not max_attempts times

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if min(self.base_delay, self.max_delay, self.deadline, self.max_retry_after) < 0:
            raise ValueError("retry delays and deadline must not be negative")


NO_RETRY = RetryPolicy(max_attempts=1)


def kind_of(exc: BaseException) -> ErrorKind:
    """Classify an mlregfs error (RegistryTimeout before its base RegistryUnavailable)."""
    if isinstance(exc, RegistryTimeout):
        return ErrorKind.TIMEOUT
    if isinstance(exc, RegistryUnavailable):
        return ErrorKind.CONNECT
    if isinstance(exc, ServerError):
        return ErrorKind.SERVER
    if isinstance(exc, RateLimited):
        return ErrorKind.RATE_LIMITED
    if isinstance(exc, ProtocolError):
        return ErrorKind.PROTOCOL
    return ErrorKind.FATAL


def retry_delay(
    policy: RetryPolicy,
    *,
    attempt: int,
    kind: ErrorKind,
    elapsed: float,
    retry_after: float | None = None,
    jitter: float = 0.5,
) -> float | None:
    """Seconds to wait before the next attempt, or None to give up.

    `attempt` is the 1-based number of the attempt that just failed, `elapsed` the time since
    the first attempt started, `jitter` a number in [0, 1) (random in production).
    """
    if kind is ErrorKind.FATAL:
        return None
    limit = policy.max_attempts
    if kind is ErrorKind.PROTOCOL:
        limit = min(limit, policy.max_protocol_attempts)
    if attempt >= limit:
        return None
    if retry_after is not None and kind in (ErrorKind.RATE_LIMITED, ErrorKind.SERVER):
        # The server said when; believe it (capped) rather than guessing.
        delay = min(max(retry_after, 0.0), policy.max_retry_after)
    else:
        step = min(policy.max_delay, policy.base_delay * (2 ** (attempt - 1)))
        # "Equal jitter": at least half the step, so retries never bunch at zero delay.
        delay = step / 2 + step / 2 * min(max(jitter, 0.0), 1.0)
    if elapsed + delay > policy.deadline:
        return None
    return delay


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date); `now` is epoch seconds."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return max(seconds, 0.0) if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" parses as naive; HTTP-dates are GMT by definition
        when = when.replace(tzinfo=UTC)
    return max(when.timestamp() - now, 0.0)
