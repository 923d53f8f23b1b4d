"""The retry loop around one operation: the pure policy of registry/retry.py applied with a
clock, a sleep and jitter, plus what the policy cannot know (a 401 retried once with a
re-read token, the fail-fast outage window, the operation's total deadline)."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TypeVar

import trio

from mlregfs.errors import Unauthorized
from mlregfs.registry.base import RegistryStats
from mlregfs.registry.http.errors import Failure, operation_timeout
from mlregfs.registry.retry import ErrorKind, RetryPolicy, kind_of, retry_delay

log = logging.getLogger(__name__)

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]
Clock = Callable[[], float]

# After a connection-level failure, operations started within this many seconds make a single
# attempt: while the registry is known to be down, a burst of kernel reads must not each pay
# the whole backoff sequence (24 reads x 3 s = EIO after more than a minute).
OUTAGE_WINDOW = 5.0


class Retrying:
    """Runs attempts under one RetryPolicy; `refresh` re-reads the token after a 401 and
    says whether it changed (then the attempt is repeated once, outside the policy)."""

    def __init__(
        self,
        policy: RetryPolicy,
        stats: RegistryStats,
        *,
        sleep: Sleep,
        clock: Clock,
        refresh: Callable[[], bool] | None = None,
    ) -> None:
        self.policy = policy
        self._stats = stats
        self._sleep, self._clock = sleep, clock
        self._refresh = refresh
        self._down_since: float | None = None  # clock time of the last connection failure

    async def __call__(
        self, attempt: Callable[[], Awaitable[T]], where: str, *, extra: float = 0.0
    ) -> T:
        """Run `attempt` until it succeeds or the retry policy gives up.

        The whole operation is bounded by the policy's deadline (plus `extra`, the transfer
        allowance of an upload): no attempt starts or continues past it. A deadline of 0 means
        one attempt, bounded by the per-request timeout only.
        """
        started = self._clock()
        policy = self.policy
        if extra:
            policy = replace(policy, deadline=policy.deadline + extra)
        if self._down_since is not None and started - self._down_since < OUTAGE_WINDOW:
            policy = replace(policy, max_attempts=1)  # known outage: fail fast
        number = 0
        refreshed = False
        last: Failure | None = None
        while True:
            number += 1
            left = policy.deadline - (self._clock() - started)
            if number > 1 and left <= 0 and last is not None:
                self._stats.errors += 1
                raise last.error from last.__cause__
            try:
                with trio.move_on_after(left if policy.deadline > 0 else math.inf):
                    result = await attempt()
                    self._down_since = None
                    return result
                raise operation_timeout(where, policy.deadline)
            except Failure as failure:
                last = failure
                if (
                    isinstance(failure.error, Unauthorized)
                    and self._refresh is not None
                    and not refreshed
                ):
                    refreshed = True
                    if self._refresh():
                        continue
                kind = kind_of(failure.error) if failure.retryable else ErrorKind.FATAL
                if failure.outage and kind in (ErrorKind.CONNECT, ErrorKind.TIMEOUT):
                    self._down_since = self._clock()
                delay = retry_delay(
                    policy,
                    attempt=number,
                    kind=kind,
                    elapsed=self._clock() - started,
                    retry_after=failure.retry_after,
                    jitter=random.random(),
                )
                if delay is None:
                    self._stats.errors += 1
                    raise failure.error from failure.__cause__
                self._stats.retries += 1
                log.debug("%s; retry %d in %.2f s", failure.error, number, delay)
                await self._sleep(delay)
