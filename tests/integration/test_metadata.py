"""Semver alias links, registry metadata in xattrs and `mlregfs info`, on a real mount
(README Semantics 47-49)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlregfs.testing import ServerProcess
from tests.integration.helpers import Mount, blob, clean_env, sha

PROJECT = "acme/deploy"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    with ServerProcess(tmp_path_factory.mktemp("meta-server")) as s:
        st = s.store
        st.create_project(PROJECT, "private")
        token = st.create_token(PROJECT, "developer")
        st.create_model(PROJECT, "resnet")
        for v in ("1.0.0", "1.2.0", "10.1.3", "10.2.0-alpha"):
            vid = st.create_version(PROJECT, "resnet", v, description=f"resnet {v}")
            st.add_file(PROJECT, vid, "w.bin", blob(hash(v) & 0xFFFF, 4096))
        st.create_model(PROJECT, "resnet/1")  # a nested model named like a link
        st.create_version(PROJECT, "resnet/1", "0.0.1")
        st.create_model(PROJECT, "beta")
        st.create_version(PROJECT, "beta", "2.0.0-rc.1")  # prereleases only: no link
        yield s, token


@pytest.fixture
def mount(served: tuple[ServerProcess, str], tmp_path: Path) -> Iterator[Mount]:
    s, token = served
    # long TTLs: what moves the links below is the direct lookup, not an expiry
    opts = ["listing_ttl=5m", "file_ttl=5m"]
    with Mount(f"{s.url}/{PROJECT}", tmp_path / "mnt", tmp_path / "cache", token=token,
               options=opts) as m:  # fmt: skip
        yield m


def _until(check, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False


def test_47_alias_links(served: tuple[ServerProcess, str], mount: Mount) -> None:
    """Semver alias links. Each model directory holds `latest`, `<major>` and `<major>.<minor>`:
    symbolic links to the highest release (no prerelease) in that range, relative (`readlink`
    prints the version). No link where a range holds only prereleases; a real entry (a version
    or nested model) wins over a link. A direct lookup sees a new release within seconds; a
    process that opened files through a link keeps reading the version it resolved."""
    s, _ = served
    model = mount.path / "models/resnet"
    assert sorted(os.listdir(model)) == [
        "1", "1.0", "1.0.0", "1.2", "1.2.0", "10", "10.1", "10.1.3", "10.2.0-alpha", "latest",
    ]  # fmt: skip
    links = {n: os.readlink(model / n) for n in os.listdir(model) if (model / n).is_symlink()}
    assert links == {"latest": "10.1.3", "10": "10.1.3", "10.1": "10.1.3", "1.0": "1.0.0",
                     "1.2": "1.2.0"}  # fmt: skip
    assert (model / "1").is_dir() and not (model / "1").is_symlink()  # the nested model wins
    assert "0.0.1" in os.listdir(model / "1")
    assert os.listdir(mount.path / "models/beta") == ["2.0.0-rc.1"]
    # `ls -l` shows links; reads go through them to the version's bytes
    out = subprocess.run(["ls", "-l", str(model)], capture_output=True, text=True, check=True)
    assert "latest -> 10.1.3" in out.stdout
    old = (model / "10.1.3/w.bin").read_bytes()
    with open(model / "latest/w.bin", "rb") as held:
        assert held.read() == old
        # a new patch release: the link moves within seconds although listing_ttl is 5m
        vid = s.store.create_version(PROJECT, "resnet", "10.1.4")
        new = blob(4242, 8192)
        s.store.add_file(PROJECT, vid, "w.bin", new)
        assert _until(lambda: os.readlink(model / "latest") == "10.1.4")
        assert os.readlink(model / "10") == "10.1.4" and os.readlink(model / "10.1") == "10.1.4"
        assert (model / "latest/w.bin").read_bytes() == new
        held.seek(0)
        assert held.read() == old  # the open file stays on the version it resolved
    # the links are the mount's: rm and mv are refused, the versions stay
    with pytest.raises(PermissionError):
        os.unlink(model / "latest")
    with pytest.raises(PermissionError):
        os.rename(model / "latest", model / "10.1.4/x")
    with pytest.raises(FileExistsError):
        os.mkdir(model / "latest")
    assert os.readlink(model / "latest") == "10.1.4"


def _xattrs(path: Path) -> dict[str, str]:
    return {n: os.getxattr(path, n).decode() for n in os.listxattr(path)}


def test_48_registry_metadata_in_xattrs(served: tuple[ServerProcess, str], mount: Mount) -> None:
    """Registry metadata. Files, versions, models and candidates carry read-only extended
    attributes: `user.gitlab.*` is what GitLab holds, `user.mlregfs.*` what the mount knows."""
    s, _ = served
    f = mount.path / "models/resnet/1.2.0/w.bin"
    package_id = int(os.getxattr(f.parent, "user.gitlab.package_id"))
    [row] = [r for r in s.store.files(package_id) if r["file_name"] == "w.bin"]
    a = _xattrs(f)
    assert a["user.gitlab.sha256"] == row["file_sha256"]
    assert a["user.gitlab.file_id"] == str(row["id"])
    assert a["user.gitlab.created_at"].endswith("Z")
    assert a["user.mlregfs.kind"] == "file"
    assert a["user.mlregfs.cached_bytes"] == "0"
    data = f.read_bytes()
    assert sha(data) == row["file_sha256"]
    assert os.getxattr(f, "user.mlregfs.cached_bytes") == str(len(data)).encode()
    # getfattr, the tool people use, sees the same
    out = subprocess.run(
        ["getfattr", "-d", "-m", "-", str(f)], capture_output=True, text=True, check=True
    )
    assert f'user.gitlab.sha256="{row["file_sha256"]}"' in out.stdout
    v = _xattrs(mount.path / "models/resnet/1.2.0")
    assert v["user.mlregfs.kind"] == "version"
    assert v["user.gitlab.description"] == "resnet 1.2.0"
    assert v["user.gitlab.version"] == "1.2.0"
    assert int(v["user.gitlab.model_version_id"]) > 0 and int(v["user.gitlab.package_id"]) > 0
    m = _xattrs(mount.path / "models/resnet")
    assert m["user.mlregfs.kind"] == "model"
    assert json.loads(m["user.mlregfs.aliases"])["1.2"] == "1.2.0"
    assert "10.2.0-alpha" in json.loads(m["user.gitlab.versions"])
    assert _xattrs(mount.path / "models")["user.mlregfs.kind"] == "models"
    # read-only, and names we do not serve answer at once
    with pytest.raises(OSError) as e:
        os.setxattr(f, "user.gitlab.sha256", b"0" * 64)
    assert e.value.errno == errno.ENOTSUP
    with pytest.raises(OSError) as e:
        os.getxattr(f, "security.capability")
    assert e.value.errno == errno.ENODATA


def _info(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mlregfs", "info", *args],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )


def test_49_mlregfs_info(mount: Mount, tmp_path: Path) -> None:
    """`mlregfs info PATH [--json]` shows the same for a file, version, model or candidate, plus
    each file's sha256, size and cached share."""
    version = mount.path / "models/resnet/1.0.0"
    (version / "w.bin").read_bytes()
    r = _info("--json", str(version))
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["kind"] == "version"
    assert report["attributes"]["user.gitlab.version"] == "1.0.0"
    [f] = report["files"]
    assert f["path"] == "w.bin" and f["size"] == 4096 and f["cached_bytes"] == 4096
    assert f["sha256"] == sha((version / "w.bin").read_bytes())
    assert report["total"] == {"files": 1, "size": 4096, "cached_bytes": 4096}
    (mount.path / "models/resnet/latest/w.bin").read_bytes()
    human = _info(str(mount.path / "models/resnet/latest"))
    assert human.returncode == 0, human.stderr
    assert "version (link to 10.1" in human.stdout and "100%" in human.stdout
    bad = _info(str(tmp_path))
    assert bad.returncode == 1 and "not on an mlregfs mount" in bad.stderr


TRAIN = r"""
import sys
import mlflow
from mlflow.tracking import MlflowClient

weights, version_weights = sys.argv[1], sys.argv[2]
mlflow.set_experiment("train")
with mlflow.start_run(run_name="train-1") as run:
    mlflow.log_params({"lr": "0.01", "epochs": 3})
    for step, loss in enumerate([0.9, 0.5, 0.2]):
        mlflow.log_metric("loss", loss, step=step)
    mlflow.log_metric("acc", 0.75)
    mlflow.set_tag("team", "vision")
    mlflow.log_artifact(weights)
client = MlflowClient()
client.create_registered_model("classifier", description="cats and dogs")
mv = client.create_model_version(
    "classifier", source="unused", tags={"gitlab.version": "1.0.0"}, description="first"
)
client.log_batch(
    mv.run_id,
    metrics=[mlflow.entities.Metric("f1", 0.81, 0, 0)],
    params=[mlflow.entities.Param("arch", "resnet18")],
)
client.log_param(mv.run_id, "batch", "64")
client.log_metric(mv.run_id, "f1", 0.88, step=1)
client.log_artifact(mv.run_id, version_weights)
print(run.info.run_id, mv.run_id)  # the last line
"""


def test_48_run_metadata_from_the_mlflow_client(
    served: tuple[ServerProcess, str], mount: Mount, tmp_path: Path
) -> None:
    """Registry metadata: a run logged with the MLflow client shows its params and metrics on
    its candidate and on the version made from a run, through xattrs and `mlregfs info`."""
    s, token = served
    pid = s.store.project(PROJECT)["id"]  # type: ignore[index]
    weights, version_weights = tmp_path / "weights.bin", tmp_path / "model.bin"
    weights.write_bytes(blob(1, 70_000))
    version_weights.write_bytes(blob(2, 90_000))
    env = clean_env(
        MLFLOW_TRACKING_URI=f"{s.url}/api/v4/projects/{pid}/ml/mlflow",
        MLFLOW_TRACKING_TOKEN=token,
    )
    r = subprocess.run(
        [sys.executable, "-c", TRAIN, str(weights), str(version_weights)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    train_run, version_run = r.stdout.strip().splitlines()[-1].split()
    version = mount.path / "models/classifier/1.0.0"
    assert _until(lambda: version.is_dir())
    assert (version / "model.bin").read_bytes() == version_weights.read_bytes()
    a = _xattrs(version)
    assert a["user.gitlab.run_id"] == version_run
    assert a["user.gitlab.description"] == "first"
    assert json.loads(a["user.gitlab.run.params"]) == {"arch": "resnet18", "batch": "64"}
    assert json.loads(a["user.gitlab.run.metrics"]) == {"f1": 0.88}
    assert _xattrs(mount.path / "models/classifier")["user.gitlab.description"] == "cats and dogs"
    # the training run is a candidate: its artifact and what it logged
    cands = mount.path / "candidates"
    [cand] = [
        c for c in os.listdir(cands)
        if os.getxattr(cands / c, "user.gitlab.run_id").decode() == train_run
    ]  # fmt: skip
    c = _xattrs(cands / cand)
    assert (cands / cand / "weights.bin").read_bytes() == weights.read_bytes()
    assert json.loads(c["user.gitlab.run.params"]) == {"epochs": "3", "lr": "0.01"}
    assert json.loads(c["user.gitlab.run.metrics"]) == {"acc": 0.75, "loss": 0.2}
    assert json.loads(c["user.gitlab.run.tags"])["team"] == "vision"
    assert c["user.gitlab.run.name"] == "train-1"
    info = _info("--json", str(version))
    assert info.returncode == 0, info.stderr
    report = json.loads(info.stdout)
    assert report["attributes"]["user.gitlab.run.metrics"] == {"f1": 0.88}
    assert report["files"][0]["sha256"] == sha(version_weights.read_bytes())
