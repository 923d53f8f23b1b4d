"""Metadata cache: TTL'd listings with single-flight fetches.

Outages are not its business: the catalog (`registry/catalog.py`) answers listings from what
it knows while the registry is down (`registry/outage.py`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

import trio
from cachetools import TTLCache

log = logging.getLogger("mlregfs.cache")
T = TypeVar("T")


class MetadataCache:
    """`get(key, fetch, ttl)`: cached value if fresh, else one fetch shared by all callers;
    a failed fetch raises to every caller waiting for it."""

    def __init__(self, maxsize: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._fresh: dict[float, TTLCache[Hashable, Any]] = {}
        self._maxsize = maxsize
        self._inflight: dict[Hashable, _Flight] = {}
        self._fetched: dict[Hashable, float] = {}  # when each key's value was fetched
        self._rechecked: dict[Hashable, float] = {}  # when a missed lookup last refetched it
        self.hits = 0
        self.misses = 0

    def _bucket(self, ttl: float) -> TTLCache[Hashable, Any]:
        b = self._fresh.get(ttl)
        if b is None:
            b = self._fresh[ttl] = TTLCache(self._maxsize, ttl, timer=self._clock)
        return b

    def recheck(self, key: Hashable, min_age: float) -> bool:
        """A lookup did not find a name in `key`'s value: if that value is older than
        `min_age`, and `key` was not rechecked within `min_age`, forget its freshness so the
        next `get` fetches it again. True if so. Listings keep their TTLs otherwise."""
        now = self._clock()
        fetched = self._fetched.get(key)
        if fetched is None or now - fetched < min_age:
            return False  # fresh enough
        if now - self._rechecked.get(key, float("-inf")) < min_age:
            return False
        self._rechecked[key] = now
        self.invalidate(key)
        return True

    def cached(self, key: Hashable, ttl: float) -> bool:
        """Is a fresh value of `key` known, or being fetched (a `get` would not fetch)?"""
        return key in self._bucket(ttl) or key in self._inflight

    def now(self) -> float:
        return self._clock()

    def fetched_at(self, key: Hashable) -> float:
        """When `key`'s value was last fetched (or put); -inf if never."""
        return self._fetched.get(key, float("-inf"))

    def invalidate(self, key: Hashable | None = None) -> None:
        """Forget freshness of one key (or all)."""
        for b in self._fresh.values():
            if key is None:
                b.clear()
            else:
                b.pop(key, None)

    async def get(self, key: Hashable, fetch: Callable[[], Awaitable[T]], ttl: float) -> T:
        """The fetch runs in the first caller's task: if that caller goes away (cancelled),
        the fetch stops with it and the next waiter, if any, fetches anew."""
        bucket = self._bucket(ttl)
        while True:
            if key in bucket:
                self.hits += 1
                return bucket[key]
            flight = self._inflight.get(key)
            if flight is None:
                break
            await flight.done.wait()  # someone is fetching already: share their answer
            if not flight.abandoned:
                return flight.result()
        self.misses += 1
        flight = self._inflight[key] = _Flight()
        try:
            val = await fetch()
            bucket[key] = val
            self._fetched[key] = self._clock()
            flight.value = val
            return val
        except Exception as e:
            flight.error = e
            raise
        except BaseException:
            flight.abandoned = True  # cancelled: waiters must not take "None" for an answer
            raise
        finally:
            del self._inflight[key]
            flight.done.set()


class _Flight:
    """One fetch in progress; waiters keep a reference and read its outcome."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.value: Any = None
        self.error: Exception | None = None
        self.abandoned = False

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value
