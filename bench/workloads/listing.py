"""Workload 8: `ls -lR` of a large tree: HTTP requests per model+version, and the time against
the same requests sent back to back by one curl."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from bench.harness import Bench
from bench.report import Row
from bench.util import drop_caches, log, med, run, timed

TREE_PROJECT = "bench/tree"


def measure(b: Bench) -> None:
    cfg = b.cfg
    st = b.srv.store
    log(f"8 seeding {cfg.models} models x {cfg.versions} versions x {cfg.files} files")
    t0 = time.perf_counter()
    st.create_project(TREE_PROJECT, "public")
    for i in range(cfg.models):
        name = f"model-{i:04d}"
        st.create_model(TREE_PROJECT, name)
        for v in range(cfg.versions):
            vid = st.create_version(TREE_PROJECT, name, f"1.{v}.0")
            for k in range(cfg.files):
                st.add_file(TREE_PROJECT, vid, f"file-{k}.json", f"{name} {v} {k}\n".encode())
    log(f"   seeded in {time.perf_counter() - t0:.0f} s")
    url = f"{b.srv.url}/{TREE_PROJECT}"
    units = cfg.models + cfg.models * cfg.versions
    replay = listing_replay(b, cfg.models * cfg.versions)
    runs = []
    for r in range(cfg.runs):
        log(f"8 ls -lR, run {r + 1}/{cfg.runs}")
        cache = b.mnts.new_dir("cache")
        m = b.mnts.mlregfs(url, cache, cfg.mount_opts)
        with b.mnts.mounted(m):
            d: dict[str, Any] = {}
            drop_caches()
            for phase in ("cold", "warm"):
                b.srv.reset_stats()
                t0 = time.perf_counter()
                out = run(["ls", "-lR", str(m.path / "models")], timeout=900).stdout
                d[f"{phase}_s"] = time.perf_counter() - t0
                s = b.srv.stats()
                d[f"{phase}_requests"] = s["requests"]
                d[f"{phase}_by_route"] = s["by_route"]
                d[f"{phase}_entries"] = sum(1 for x in out.splitlines() if x.startswith("-"))
            b.note_hwm("8 listing", m)
        shutil.rmtree(cache)
        expected = cfg.models * cfg.versions * cfg.files
        if d["cold_entries"] != expected:
            raise RuntimeError(f"ls -lR saw {d['cold_entries']} files, expected {expected}")
        d["cold_requests_per_unit"] = d["cold_requests"] / units
        # the reference: the same kinds and number of requests, back to back, one curl
        # process with keep-alive (what the listing costs at the server's own speed)
        b.srv.reset_stats()
        d["curl_s"] = timed(["curl", "-sS", "--fail-early", "-K", str(replay)], timeout=900)
        d["curl_requests"] = b.srv.stats()["requests"]
        d["cold_vs_curl"] = d["cold_s"] / d["curl_s"]
        log(
            "   cold {cold_s:.2f} s {cold_requests} req; warm {warm_s:.2f} s "
            "{warm_requests} req; curl {curl_requests} req back to back {curl_s:.2f} s".format(**d)
        )
        runs.append(d)
    b.raw["listing"] = {
        "models": cfg.models,
        "versions": cfg.models * cfg.versions,
        "files": cfg.models * cfg.versions * cfg.files,
        "runs": runs,
    }
    tree = f"{cfg.models}x{cfg.versions}x{cfg.files}"
    b.rows += [
        Row("8", f"ls -lR {tree} cold: HTTP req per model+version",
            f"{med([x['cold_s'] for x in runs]):.2f} s, "
            f"{med([x['cold_requests'] for x in runs]):.0f} req",
            f"{units} models+versions", med([x["cold_requests_per_unit"] for x in runs]), "",
            "<=", 1.2, unit="req"),  # issue 13: at most 1.2 per model and version
        Row("8", f"ls -lR {tree} cold: time vs its requests back to back (curl -K)",
            f"{med([x['cold_s'] for x in runs]):.2f} s",
            f"curl {med([x['curl_s'] for x in runs]):.2f} s, "
            f"{med([x['curl_requests'] for x in runs]):.0f} req",
            med([x["cold_vs_curl"] for x in runs]), "", "<=", 2.0),
        Row("8", f"ls -lR {tree} warm: HTTP requests",
            f"{med([x['warm_s'] for x in runs]):.2f} s, "
            f"{med([x['warm_requests'] for x in runs]):.0f} req",
            "—", med([x["warm_requests"] for x in runs]), "", "<=", 0, unit="req"),
    ]  # fmt: skip


def listing_replay(b: Bench, versions: int) -> Path:
    """A curl config with the requests a cold `ls -lR` of the tree sends: the model
    listing, every page of the package listing, and each package's files."""
    st = b.srv.store
    project = st.project(TREE_PROJECT)
    assert project is not None
    api = f"{b.srv.url}/api/v4/projects/{project['id']}"
    pkgs = st.all("SELECT id FROM packages WHERE project_id=? ORDER BY id", (project["id"],))
    urls = [f"{api}/ml/mlflow/api/2.0/mlflow/registered-models/search?max_results=1000"]
    urls += [
        f"{api}/packages?package_type=ml_model&per_page=100&page={n + 1}"
        for n in range(-(-len(pkgs) // 100))
    ]
    urls += [
        f"{api}/packages/{p['id']}/package_files?per_page=100&order_by=id&sort=asc"
        for p in pkgs[:versions]
    ]
    path = b.mnts.new_dir("replay") / "listing.curl"
    path.write_text("".join(f'url = "{u}"\noutput = /dev/null\n' for u in urls))
    return path
