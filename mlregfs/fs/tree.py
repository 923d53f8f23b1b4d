"""Pure path model: which names a directory holds, built from registry listings."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from mlregfs.fs.aliases import semver_aliases
from mlregfs.registry.types import Model, RemoteFile
from mlregfs.registry.validate import NAME_MAX, has_control

log = logging.getLogger("mlregfs.fs")


def usable_name(name: str) -> bool:
    """Can `name` be one directory entry the mount shows?

    Besides Linux's rules, names with C0/C1 control characters or DEL are refused (terminal
    escapes and newlines in `ls`); GitLab refuses them on upload, so only a broken or hostile
    registry sends them. The registry client drops them already: this is defence in depth.
    """
    return (
        bool(name)
        and name not in (".", "..")
        and "/" not in name
        and not has_control(name)
        and len(name.encode("utf-8", "surrogateescape")) <= NAME_MAX
    )


@dataclass(frozen=True)
class ModelDirEntries:
    """Children of `models/<prefix>`: version directories and deeper model-name segments."""

    versions: dict[str, object]  # semver -> ModelVersion
    subdirs: frozenset[str]  # next segments of longer model names
    aliases: dict[str, str]  # semver alias link -> the version it points to


def model_dir_entries(models: dict[str, Model], prefix: str) -> ModelDirEntries | None:
    """Entries of `models/<prefix>` (prefix "" is `models/` itself); None if no such dir.

    A model's versions and the next segment of longer names share one directory. When a
    version and a nested model segment have the same name (model `a` version `1.0.0` and model
    `a/1.0.0`), the version wins and the nested model is hidden (logged). Semver alias links
    (`latest`, `1`, `1.2`) fill the names neither takes.
    """
    versions: dict[str, object] = {}
    model = models.get(prefix) if prefix else None
    if model is not None:
        for v in model.versions:
            if usable_name(v.version):
                versions[v.version] = v
    subdirs: set[str] = set()
    start = prefix + "/" if prefix else ""
    for name in models:
        if not name.startswith(start) or name == prefix:
            continue
        seg = name[len(start) :].split("/", 1)[0]
        if not usable_name(seg):
            continue
        if seg in versions:
            log.warning("model %r is hidden: %r is also a version of model %r", name, seg, prefix)
            continue
        subdirs.add(seg)
    if model is None and not subdirs and prefix:
        return None
    # a real entry wins over a link of the same name (a nested model `resnet/latest`)
    aliases = {
        name: target
        for name, target in semver_aliases(versions).items()
        if name not in versions and name not in subdirs
    }
    return ModelDirEntries(versions, frozenset(subdirs), aliases)


@dataclass
class FileDir:
    """One directory of a version's or candidate's file tree."""

    files: dict[str, RemoteFile] = field(default_factory=dict)
    dirs: dict[str, FileDir] = field(default_factory=dict)
    mtime: float = 0.0


def build_file_tree(files: Iterable[RemoteFile]) -> dict[str, FileDir]:
    """Map of directory path ("" = top) -> FileDir, from decoded file paths.

    Directories exist only through their files. A name that is both a file and a directory
    (`a` and `a/b` in one version) is shown as the directory; the file is hidden (logged).
    """
    root = FileDir()
    for f in sorted(files, key=lambda f: f.path):
        parts = f.path.split("/")
        if not all(usable_name(p) for p in parts):
            log.warning("skipping registry file with unusable path %r", f.path)
            continue
        d = root
        for p in parts[:-1]:
            d.mtime = max(d.mtime, f.created_at)
            if p in d.files:
                log.warning("file %r hidden by a directory of the same name", p)
                del d.files[p]
            d = d.dirs.setdefault(p, FileDir())
        d.mtime = max(d.mtime, f.created_at)
        if parts[-1] in d.dirs:
            log.warning("file %r hidden by a directory of the same name", f.path)
            continue
        d.files[parts[-1]] = f
    out: dict[str, FileDir] = {}

    def walk(path: str, d: FileDir) -> None:
        out[path] = d
        for name, sub in d.dirs.items():
            walk(f"{path}/{name}" if path else name, sub)

    walk("", root)
    return out
