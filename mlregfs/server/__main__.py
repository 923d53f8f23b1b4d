"""`python -m mlregfs.server serve|admin ...`: the server CLI without the main mlregfs CLI."""

from __future__ import annotations

import sys

from mlregfs.server.cli import admin_main, serve_main


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("serve", "admin"):
        print("usage: python -m mlregfs.server {serve,admin} ...", file=sys.stderr)
        return 2
    return serve_main(argv[1:]) if argv[0] == "serve" else admin_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
