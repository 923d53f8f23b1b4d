"""Package file downloads as GitLab presents them: streamed from disk, or a signed redirect."""

from __future__ import annotations

import re
from typing import Any

from starlette.responses import Response

from mlregfs.server.context import Ctx
from mlregfs.server.serving import serve_file
from mlregfs.server.store import Row


def present_file(ctx: Ctx, f: Row, pkg: Row) -> Any:
    """`present_package_file!`: touch last_downloaded_at, then serve or redirect."""
    store = ctx.store
    store.touch_downloaded(int(pkg["id"]))
    settings = ctx.app.settings
    if settings.download_mode == "redirect":
        if settings.storage_url:
            base = settings.storage_url
        else:
            host = ctx.request.url.hostname or "127.0.0.1"
            if ":" in host:
                host = f"[{host}]"
            base = f"{ctx.request.url.scheme}://{host}:{settings.storage_port}"
        method = "HEAD" if ctx.request.method == "HEAD" else "GET"
        url = ctx.app.signer.sign(base, f["blob"], method)
        body = f"This resource has been moved temporarily to {url}."
        return Response(body, status_code=302, headers={"Location": url}, media_type="text/plain")
    name = f["file_name"]
    rfc5987 = "".join(
        c if re.match(r"[A-Za-z0-9!#$&+.^_`|~-]", c) else "".join(f"%{b:02X}" for b in c.encode())
        for c in name
    )
    headers = {
        "Content-Disposition": f"attachment; filename=\"{name}\"; filename*=UTF-8''{rfc5987}",
        "Content-Transfer-Encoding": "binary",
        "Content-Type": "application/octet-stream",
    }
    return serve_file(ctx.request, store.blob_path(f), size=int(f["size"]), headers=headers)
