"""The metrics textfile is valid Prometheus text, checked with prometheus_client's parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from mlregfs.status import METRICS, prometheus


def test_every_counter_parses_with_escaped_labels() -> None:
    snap = {
        "mountpoint": '/mnt/odd "name"\\with\nnewline',
        "cache": {"hits": 3, "stored_bytes": 10, "hit_ratio": 0.75},
        "uploads": {"unchanged": 2},
        "fuse_failures": {"read": 2, "lookup": 1},
    }
    families = {f.name: f for f in text_string_to_metric_families(prometheus(snap))}
    assert set(families) == {"mlregfs_" + n.replace(".", "_") for n in METRICS} | {
        "mlregfs_fuse_failures"
    }
    hits = families["mlregfs_cache_hits"]
    assert hits.type == "counter"
    [sample] = hits.samples
    assert sample.name == "mlregfs_cache_hits_total"  # counters end in _total
    assert sample.labels == {"mountpoint": snap["mountpoint"]} and sample.value == 3
    assert families["mlregfs_cache_hit_ratio"].samples[0].value == 0.75
    ops = {s.labels["op"]: s.value for s in families["mlregfs_fuse_failures"].samples}
    assert ops == {"read": 2, "lookup": 1}
