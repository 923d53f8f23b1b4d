"""The one outage policy: when the registry was just found unreachable, stop asking it.

Only `CatalogRegistry` answers from what it knows during an outage; this says for how long
after a failed fetch it does so without asking again (each ask would wait out the client's
retries and deadline). The client's retry loop keeps its own fail-fast window for requests
that must go out (reads, uploads): one attempt instead of several.
"""

from __future__ import annotations

import time
from collections.abc import Callable

OUTAGE_GRACE = 10.0  # seconds after a failed fetch during which known answers are given at once


class Outage:
    """Tracks whether the registry is known to be down (within `grace` of a failed fetch)."""

    def __init__(
        self, grace: float = OUTAGE_GRACE, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.grace = grace
        self._clock = clock
        self._until = float("-inf")

    def failed(self) -> None:
        """A fetch found the registry unreachable (or 5xx)."""
        self._until = self._clock() + self.grace

    def answered(self) -> None:
        """A fetch got an answer: the registry is up."""
        self._until = float("-inf")

    def down(self) -> bool:
        return self._clock() < self._until
