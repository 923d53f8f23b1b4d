"""What the listings share to read GitLab and MLflow JSON: lenient timestamps, shape checks,
owner keys and the log line for an entry left out because the registry sent a bad value."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from mlregfs.errors import ProtocolError
from mlregfs.registry import validate
from mlregfs.registry.types import Candidate, FileOwner

log = logging.getLogger(__name__)

# True when a text is a version GitLab accepts for a model version (no leading `v`, §2)
is_semver = validate.check(validate.semver)


def drop(what: str, exc: validate.Invalid) -> None:
    """Log an entry left out of a listing because the registry sent an invalid value."""
    log.warning("registry listing: %s dropped: %s", what, exc)


def timestamp(value: Any) -> float:
    """GitLab/MLflow time -> epoch seconds. Numbers over 1e11 are milliseconds (MLflow runs).

    A time we cannot use (absent, unparsable, not finite, out of range) is 0, "unknown": a
    timestamp never names anything, so it does not cost the entry its place in the listing.
    """
    try:
        return validate.timestamp(_seconds(value))
    except (ValueError, OverflowError, OSError) as exc:  # validate.Invalid is a ValueError
        log.warning("registry listing: timestamp %s ignored: %s", validate.shown(value), exc)
        return 0.0


def _seconds(value: Any) -> float:
    if value is None or isinstance(value, bool):
        return 0.0
    if isinstance(value, int | float):
        return value / 1000.0 if value > 1e11 else float(value)
    if isinstance(value, str) and value:
        if value.isascii() and value.isdigit():
            return _seconds(int(value))
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            return 0.0
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return when.timestamp()
    return 0.0


def dicts(data: Any, what: str) -> list[dict[str, Any]]:
    if data is None:
        return []
    if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
        raise ProtocolError(f"{what}: expected a JSON list of objects")
    return data


def dict_at(data: Any, key: str) -> dict[str, Any]:
    value = data.get(key) if isinstance(data, dict) else None
    if not isinstance(value, dict):
        raise ProtocolError(f"expected a JSON object with {key!r}")
    return value


def error_code(data: Any) -> str | None:
    return data.get("error_code") if isinstance(data, dict) else None


def owner_key(owner: FileOwner) -> tuple[str, str]:
    if isinstance(owner, Candidate):
        return ("candidate", str(owner.iid))
    return (owner.model, owner.version)


def owner_label(owner: FileOwner) -> str:
    if isinstance(owner, Candidate):
        return f"candidate {owner.iid}"
    return f"{owner.model}/{owner.version}"
