"""Command line: `mlregfs mount|unmount|serve|admin|status|info|warm|recover|demo`."""

from __future__ import annotations

import argparse
import logging
import sys

from mlregfs import __version__


def _mount_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlregfs mount",
        description="Mount a GitLab project's model registry. SOURCE is a project URL "
        "(https://HOST/NAMESPACE/PROJECT) or https://HOST/api/v4/projects/ID.",
    )
    p.add_argument("source")
    p.add_argument("mountpoint")
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    p.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPT[,OPT=VAL]",
        help="mount options (see README): token_file, cache_dir, cache_size, ...",
    )
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    return p


def cmd_mount(argv: list[str]) -> int:
    from mlregfs.config import ConfigError, from_options
    from mlregfs.mount import MountError, run_daemon, run_foreground

    args = _mount_parser().parse_args(argv)
    try:
        cfg = from_options(args.source, args.mountpoint, args.options, foreground=args.foreground)
        if args.foreground:
            return run_foreground(cfg, args.ready_fd)
        passthrough = [a for a in argv if not a.startswith("--ready-fd")]
        return run_daemon(cfg, passthrough)
    except (ConfigError, MountError) as e:
        print(f"mlregfs mount: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # starting the daemon itself failed (pipe, exec, fork)
        print(f"mlregfs mount: cannot start the daemon: {e}", file=sys.stderr)
        return 1


def cmd_unmount(argv: list[str]) -> int:
    import subprocess

    p = argparse.ArgumentParser(prog="mlregfs unmount")
    p.add_argument("mountpoint")
    args = p.parse_args(argv)
    return subprocess.call(["fusermount3", "-u", args.mountpoint])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {
        "mount": cmd_mount,
        "unmount": cmd_unmount,
        "serve": lambda a: _server("serve_main", a),
        "admin": lambda a: _server("admin_main", a),
        "demo": lambda a: _demo(a),
        "recover": lambda a: _recover(a),
        "status": lambda a: _status(a),
        "warm": lambda a: _warm(a),
        "info": lambda a: _info(a),
    }
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        if argv and argv[0] == "--version":
            print(f"mlregfs {__version__}")
            return 0
        print(
            "usage: mlregfs {mount,unmount,serve,admin,demo} ...\n\n"
            "  mount SOURCE MNT [-f] [-o opts]   mount a project's model registry\n"
            "  unmount MNT                       unmount (same as fusermount3 -u)\n"
            "  serve [--data DIR] [--init-demo]  run the embedded GitLab-compatible registry\n"
            "  admin ...                         create projects, tokens, models, versions\n"
            "  status MNT [--json]               counters of a running mount\n"
            "  info PATH... [--json]             what GitLab holds for a mounted path\n"
            "  warm PATH... [--pin]              fetch files into the cache, verified\n"
            "  recover [list|retry|discard]      spooled uploads that did not complete\n"
            "  demo                              serve sample models, mount them, show them",
            file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout,
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return int(commands[argv[0]](argv[1:]) or 0)


def _server(name: str, argv: list[str]) -> int:
    from mlregfs.server import cli as server_cli

    return int(getattr(server_cli, name)(argv) or 0)


def _status(argv: list[str]) -> int:
    from mlregfs.status import main as status_main

    return status_main(argv)


def _info(argv: list[str]) -> int:
    from mlregfs.info import main as info_main

    return info_main(argv)


def _warm(argv: list[str]) -> int:
    from mlregfs.warm import main as warm_main

    return warm_main(argv)


def _recover(argv: list[str]) -> int:
    from mlregfs.recover import main as recover_main

    return recover_main(argv)


def _demo(argv: list[str]) -> int:
    from mlregfs.demo import run_demo

    return run_demo(argv)
