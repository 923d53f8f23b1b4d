"""Running it as a service: warm-up with pins under eviction pressure, status and metrics."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from mlregfs.testing import ServerProcess
from tests.integration.helpers import clean_env, sha


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mlregfs", *args],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _drop_page_cache() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def test_warm_pin_status_metrics(tmp_path: Path, mount_factory) -> None:
    with ServerProcess(tmp_path / "srv") as srv:
        st = srv.store
        st.create_project("x/y", "public")
        st.create_model("x/y", "m")
        v = st.create_version("x/y", "m", "1.0.0")
        keep = bytes(range(256)) * (1 << 15)  # 8 MiB: two blocks
        st.add_file("x/y", v, "keep/model.bin", keep)
        for i in range(6):
            st.add_file("x/y", v, f"other/{i}.bin", bytes([i]) * (8 << 20))
        metrics = tmp_path / "metrics.prom"
        m = mount_factory(
            f"{srv.url}/x/y", options=[f"cache_size=16M,block_size=4M,metrics={metrics}"]
        )
        r = _cli("warm", "--pin", "-q", str(m.path / "models/m/1.0.0/keep"))
        assert r.returncode == 0, r.stderr
        # eviction pressure: 48 MiB through a 16 MiB cache
        for i in range(6):
            data = (m.path / f"models/m/1.0.0/other/{i}.bin").read_bytes()
            assert data == bytes([i]) * (8 << 20)
        _drop_page_cache()
        srv.reset_stats()
        assert sha((m.path / "models/m/1.0.0/keep/model.bin").read_bytes()) == sha(keep)
        assert srv.stats()["bytes_served"] == 0  # pinned: still on local disk
        time.sleep(2.5)  # the daemon rewrites its status every 2 s
        r = _cli("status", str(m.path))
        assert r.returncode == 0, r.stderr
        assert "hit ratio" in r.stdout and "8.0 MiB pinned" in r.stdout, r.stdout
        snap = json.loads(_cli("status", "--json", str(m.path)).stdout)
        assert snap["cache"]["pinned_bytes"] == 8 << 20
        assert snap["cache"]["stored_bytes"] <= 16 << 20
        assert snap["cache"]["evictions"] > 0 and snap["cache"]["hits"] > 0
        families = {
            f.name: f for f in text_string_to_metric_families(metrics.read_text())
        }  # the reference parser: the file is valid Prometheus text
        assert families["mlregfs_cache_hits"].type == "counter"
        [pinned] = families["mlregfs_cache_pinned_bytes"].samples
        assert pinned.labels == {"mountpoint": str(m.path)} and pinned.value == 8 << 20


def test_warm_fails_on_a_corrupt_file(tmp_path: Path, mount_factory) -> None:
    """`mlregfs warm` exits non-zero when a file's bytes do not match its sha256."""
    with ServerProcess(tmp_path / "srv") as srv:
        st = srv.store
        st.create_project("x/y", "public")
        st.create_model("x/y", "m")
        v = st.create_version("x/y", "m", "1.0.0")
        st.add_file("x/y", v, "good.bin", b"g" * 1000)
        st.add_file("x/y", v, "bad.bin", b"real bytes")
        (blob,) = [
            p
            for p in Path(srv.data_dir).rglob("*")
            if p.is_file() and p.stat().st_size == 10 and p.read_bytes() == b"real bytes"
        ]
        blob.write_bytes(b"fake bytes")
        m = mount_factory(f"{srv.url}/x/y")
        r = _cli("warm", str(m.path / "models/m/1.0.0"))
        assert r.returncode == 1
        assert "bad.bin" in r.stderr and "good.bin" not in r.stderr
        assert "1 of 2 files cached" in r.stderr


def test_status_without_daemon(tmp_path: Path) -> None:
    r = _cli("status", str(tmp_path))
    assert r.returncode == 1 and "no mlregfs daemon" in r.stderr
