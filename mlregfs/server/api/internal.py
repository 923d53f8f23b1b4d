"""mlregfs's own endpoints under `/-/mlregfs/` (not GitLab's): request stats and health."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from mlregfs.server.http import Stats, json_response


def internal(request: Request, stats: Stats) -> Response:
    """GET stats, POST stats/reset (tests and the bench count requests), health."""
    p = request.url.path
    if p == "/-/mlregfs/stats" and request.method == "GET":
        return json_response(stats.as_dict())
    if p == "/-/mlregfs/stats/reset" and request.method == "POST":
        stats.reset()
        return json_response({"ok": True})
    if p == "/-/mlregfs/health":
        return json_response({"status": "ok"})
    return json_response({"error": "404 Not Found"}, 404)
