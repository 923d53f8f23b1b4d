"""`mlregfs serve` (run the embedded registry) and `mlregfs admin` (seed and inspect it)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from mlregfs.server.storage import BUCKET
from mlregfs.server.store import ROLES, Store, StoreError


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return Path(base) / "mlregfs" / "server"


def _size(text: str) -> int:
    """Bytes from "10737418240", "10G", "512M", "64k"."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = 1
    for suffix, m in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("T", 1 << 40)):
        if t.endswith(suffix):
            t, mult = t[:-1], m
            break
    try:
        value = int(float(t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("size must not be negative")
    return value


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted connections only for
    # sockets created with that protocol; without it every small keep-alive response waits
    # ~40 ms for the client's delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    # SO_REUSEADDR: a restart on the same port must not wait for TIME_WAIT to drain
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(512)
    sock.setblocking(False)
    return sock


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _storage_url(text: str, mode: str) -> str:
    """The --storage-url base, checked; without a trailing slash."""
    if mode != "redirect":
        raise ValueError("--storage-url needs --download-mode redirect")
    u = urlsplit(text)
    if u.scheme not in ("http", "https") or not u.netloc:
        raise ValueError(f"--storage-url must be an http(s) URL, got {text!r}")
    if u.query or u.fragment or u.username or u.password:
        raise ValueError("--storage-url takes no query, fragment or credentials")
    return text.rstrip("/")


def serve_main(argv: list[str]) -> int:
    """Entry point of `mlregfs serve`."""
    p = argparse.ArgumentParser(
        prog="mlregfs serve",
        description="Run the embedded GitLab-compatible ML model registry (SQLite + blob dir).",
    )
    p.add_argument(
        "--data", type=Path, default=None, help=f"data directory (default {default_data_dir()})"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8929, help="port (default 8929; 0 picks a free one)")
    p.add_argument(
        "--storage-port",
        type=int,
        default=0,
        help="port of the signed-URL storage listener in redirect mode (default: free)",
    )
    p.add_argument(
        "--download-mode",
        choices=("local", "redirect"),
        default="local",
        help="local: serve bytes directly; redirect: 302 to signed storage URLs",
    )
    p.add_argument(
        "--storage-url",
        default=None,
        metavar="BASE",
        help="redirect mode only: downloads go to an external object store instead of the "
        f"built-in listener; the 302 Location becomes BASE/{BUCKET}/<project>/<package>/<file>"
        "?X-Amz-... (the same signed query, which the external server need not check), e.g. "
        f"nginx with 'location /{BUCKET}/ {{ alias DATA/blobs/; }}' and sendfile on",
    )
    p.add_argument(
        "--url-expires", type=int, default=300, help="lifetime of signed URLs in seconds"
    )
    p.add_argument(
        "--max-file-size",
        type=_size,
        default=10 * (1 << 30),
        help="largest accepted upload (default 10G, GitLab's ml_model_max_file_size)",
    )
    p.add_argument("--latency-ms", type=float, default=0.0, help="delay every API response")
    p.add_argument("--init-demo", action="store_true", help="seed the demo project if missing")
    p.add_argument(
        "--port-file", type=Path, default=None, help="write the bound port here once ready"
    )
    args = p.parse_args(argv)
    if args.storage_url is not None:
        try:
            args.storage_url = _storage_url(args.storage_url, args.download_mode)
        except ValueError as e:
            p.error(str(e))

    data = args.data or default_data_dir()
    try:
        store = Store(data)
        if args.init_demo:
            from mlregfs.server.demo import seed_demo

            if seed_demo(store):
                print(
                    "mlregfs serve: seeded demo project demo/models "
                    f"(token in {data / 'demo-token'})",
                    file=sys.stderr,
                )
    except (OSError, StoreError) as e:
        print(f"mlregfs serve: {e}", file=sys.stderr)
        return 1
    try:
        return asyncio.run(_serve(store, args))
    except KeyboardInterrupt:
        return 0
    except OSError as e:
        print(f"mlregfs serve: cannot listen: {e}", file=sys.stderr)
        return 1


async def _serve(store: Store, args: argparse.Namespace) -> int:
    import uvicorn

    from mlregfs.server.app import Settings, Stats, build_apps

    class Server(uvicorn.Server):
        # signals are handled once for both listeners below
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

        def install_signal_handlers(self) -> None:
            pass

    settings = Settings(
        download_mode=args.download_mode,
        max_file_size=args.max_file_size,
        latency_ms=args.latency_ms,
        url_expires=args.url_expires,
        storage_url=args.storage_url,
    )
    stats = Stats()
    main_app, storage_app = build_apps(store, settings, stats)
    main_sock = _bind(args.host, args.port)
    socks = [(main_app, main_sock)]
    if args.download_mode == "redirect" and not args.storage_url:
        storage_sock = _bind(args.host, args.storage_port)
        settings.storage_port = storage_sock.getsockname()[1]
        socks.append((storage_app, storage_sock))
    servers = []
    for app, _sock in socks:
        config = uvicorn.Config(
            app,
            lifespan="off",
            log_level="warning",
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=3,
            timeout_keep_alive=30,
        )
        servers.append(Server(config))
    loop = asyncio.get_running_loop()
    stop_count = 0

    def stop() -> None:
        nonlocal stop_count
        stop_count += 1
        for s in servers:
            s.should_exit = True
            if stop_count > 1:
                s.force_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    tasks = [
        asyncio.create_task(s.serve(sockets=[sock]))
        for s, (_, sock) in zip(servers, socks, strict=True)
    ]
    while not all(s.started for s in servers):
        if any(t.done() for t in tasks):
            break
        await asyncio.sleep(0.01)
    if all(s.started for s in servers):
        port = main_sock.getsockname()[1]
        host = _url_host(args.host)
        line = f"mlregfs serve: listening on http://{host}:{port}"
        if settings.storage_port:
            line += f" (storage http://{host}:{settings.storage_port})"
        elif settings.storage_url:
            line += f" (storage {settings.storage_url})"
        print(line, file=sys.stderr, flush=True)
        if args.port_file:
            tmp = Path(str(args.port_file) + ".tmp")
            tmp.write_text(f"{port}\n")  # noqa: ASYNC240 (tiny, once)
            os.replace(tmp, args.port_file)  # readers never see a half-written file
    await asyncio.gather(*tasks, return_exceptions=True)
    for s in servers:
        if not s.started:
            return 1
    return 0


# ---------------------------------------------------------------------------------- admin


def _action(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    what: str,
    what_help: str,
    action: str,
    action_help: str,
    *positionals: str,
) -> argparse.ArgumentParser:
    """`mlregfs admin WHAT ACTION POSITIONALS...`: the parser of that action."""
    actions = sub.add_parser(what, help=what_help).add_subparsers(dest="action", required=True)
    p = actions.add_parser(action, help=action_help)
    for name in positionals:
        p.add_argument(name)
    return p


def admin_main(argv: list[str]) -> int:
    """Entry point of `mlregfs admin`."""
    p = argparse.ArgumentParser(
        prog="mlregfs admin", description="Seed and inspect the embedded registry."
    )
    p.add_argument(
        "--data", type=Path, default=None, help=f"data directory (default {default_data_dir()})"
    )
    sub = p.add_subparsers(dest="what", required=True)

    pc = _action(sub, "project", "projects", "create", "create a project")
    pc.add_argument("path", help="namespace/project")
    pc.add_argument("--public", action="store_true", help="public (default private)")

    tc = _action(sub, "token", "access tokens", "create", "create a token; prints only the token")
    tc.add_argument("project")
    tc.add_argument("--role", required=True, choices=sorted(ROLES, key=ROLES.__getitem__))
    tc.add_argument("--job", action="store_true", help="a CI job token instead of a personal one")
    tc.add_argument("--scopes", default="api", help="comma-separated: api,read_api (default api)")
    tc.add_argument("--non-member", action="store_true", help="do not add the bot user as a member")

    _action(sub, "model", "models", "create", "create a model", "project", "name")
    _action(
        sub, "version", "model versions", "create", "create a version; prints its id",
        "project", "model", "semver",
    )  # fmt: skip
    cc = _action(
        sub, "candidate", "candidates (runs)", "create", "create a candidate; prints its iid",
        "project",
    )  # fmt: skip
    g = cc.add_mutually_exclusive_group()
    g.add_argument("--model", help="in this model's default experiment")
    g.add_argument("--experiment", help="in this experiment (created if missing)")

    fa = _action(
        sub, "file", "package files", "add", "upload a local file; prints the package file id",
        "project",
    )  # fmt: skip
    fa.add_argument("owner", help="model version id or candidate:<iid>")
    fa.add_argument("path", help="relative path inside the version, e.g. dir/model.bin")
    fa.add_argument("source", type=Path, help="local file to upload")

    ls = sub.add_parser("list", help="summary of a project")
    ls.add_argument("project")

    args = p.parse_args(argv)
    try:
        store = Store(args.data or default_data_dir())
        out = _admin(store, args)
    except StoreError as e:
        print(f"mlregfs admin: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"mlregfs admin: {e}", file=sys.stderr)
        return 1
    if out is not None:
        print(out)
    return 0


def _admin(store: Store, args: argparse.Namespace) -> str | None:
    if args.what == "project":
        pid = store.create_project(args.path, "public" if args.public else "private")
        return str(pid)
    if args.what == "token":
        scopes = tuple(s.strip() for s in args.scopes.split(",") if s.strip())
        return store.create_token(
            args.project,
            args.role,
            kind="job" if args.job else "personal",
            scopes=scopes,
            member=not args.non_member,
        )
    if args.what == "model":
        return str(store.create_model(args.project, args.name))
    if args.what == "version":
        return str(store.create_version(args.project, args.model, args.semver))
    if args.what == "candidate":
        return str(
            store.create_candidate(args.project, model=args.model, experiment=args.experiment)
        )
    if args.what == "file":
        return str(store.add_file(args.project, args.owner, args.path, args.source))
    if args.what == "list":
        return store.summary(args.project)
    raise StoreError(f"unknown command {args.what}")
