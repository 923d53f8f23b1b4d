"""Semver alias links of a model directory: `latest`, `<major>`, `<major>.<minor>`.

GitLab's docs say a patch bump is a safe update and a minor bump is compatible, but neither
GitLab nor MLflow resolves a range; a link per range lets a deployment point at "the newest
2.3.x" by path. Only releases count: a prerelease is never what a range resolves to.
"""

from __future__ import annotations

from collections.abc import Iterable

import semver

LATEST = "latest"


def _key(v: semver.Version, text: str) -> tuple[semver.Version, str]:
    # build metadata does not order versions (semver §10): among equals the name decides,
    # so the answer never depends on the registry's listing order
    return (v.replace(build=None), text)


def semver_aliases(versions: Iterable[str]) -> dict[str, str]:
    """Link name -> the version it resolves to, for the release versions among `versions`."""
    best: dict[str, tuple[semver.Version, str]] = {}
    for text in versions:
        try:
            v = semver.Version.parse(text)
        except ValueError:
            continue
        if v.prerelease:
            continue
        key = _key(v, text)
        for name in (LATEST, str(v.major), f"{v.major}.{v.minor}"):
            seen = best.get(name)
            if seen is None or key > seen:
                best[name] = key
    return {name: key[1] for name, key in best.items()}
