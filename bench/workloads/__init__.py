"""The workloads, one module per family: each is `measure(bench)`, adding rows to bench.rows.

STEPS lists them in the order they run, with the row numbers (README) each one produces.
"""

from __future__ import annotations

from collections.abc import Callable

from bench.harness import Bench
from bench.workloads import (
    listing,
    loaders,
    peers,
    random_reads,
    rss,
    sequential,
    shards,
    upload,
)

# 9 runs after the other mlregfs workloads: its second row is the peak over all of them
STEPS: list[tuple[frozenset[int], str, Callable[[Bench], None]]] = [
    (frozenset({1, 4, 6}), "sequential", sequential.measure),
    (frozenset({2}), "loaders", loaders.measure),
    (frozenset({3}), "random", random_reads.measure),
    (frozenset({5}), "shards", shards.measure),
    (frozenset({7}), "upload", upload.measure),
    (frozenset({8}), "listing", listing.measure),
    (frozenset({9}), "rss", rss.measure),
    (frozenset({10}), "peers", peers.measure),
]
