"""Command line: `mlregfs COMMAND ...`, one argparse subcommand per entry of COMMANDS."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

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


# name -> (usage summary for `mlregfs --help`, runner); runners import lazily so that
# `mlregfs status` does not load pyfuse3 or the server
COMMANDS: dict[str, tuple[str, Callable[[list[str]], int]]] = {
    "mount": ("mount a project's model registry: SOURCE MNT [-f] [-o opts]", cmd_mount),
    "unmount": ("unmount (same as fusermount3 -u): MNT", cmd_unmount),
    "serve": (
        "run the embedded GitLab-compatible registry: [--data DIR] [--init-demo]",
        lambda a: _server("serve_main", a),
    ),
    "admin": (
        "create projects, tokens, models, versions of `serve`",
        lambda a: _server("admin_main", a),
    ),
    "status": ("counters of a running mount: MNT [--json]", lambda a: _status(a)),
    "info": ("what GitLab holds for a mounted path: PATH... [--json]", lambda a: _info(a)),
    "warm": ("fetch files into the cache, verified: PATH... [--pin]", lambda a: _warm(a)),
    "recover": (
        "spooled uploads that did not complete: [list|retry|discard]",
        lambda a: _recover(a),
    ),
    "demo": ("serve sample models, mount them, show them", lambda a: _demo(a)),
}


def parser() -> argparse.ArgumentParser:
    """The top-level parser: one subcommand per entry of COMMANDS (each parses its own args)."""
    p = argparse.ArgumentParser(
        prog="mlregfs",
        description="Mount a GitLab project's ML model registry as directories.",
        epilog="`mlregfs COMMAND --help` shows a command's options.",
    )
    p.add_argument("--version", action="version", version=f"mlregfs {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (summary, _run) in COMMANDS.items():
        sub.add_parser(name, help=summary, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        # --help, --version, no command or an unknown one: argparse prints and exits
        parser().parse_args(argv)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return int(COMMANDS[argv[0]][1](argv[1:]) or 0)


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
