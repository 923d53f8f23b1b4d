"""`mount.mlregfs`: the mount(8) helper that makes fstab lines and systemd .mount units work.

mount(8) runs ``/sbin/mount.mlregfs SOURCE MNT [-sfnv] [-N NS] [-o OPTS] [-t TYPE]``. This module
turns that into ``python -m mlregfs mount SOURCE MNT -o KEPT`` and execs it; `mlregfs mount`
daemonizes and returns once the mount answers, so mount(8)'s exit status is the real outcome.

Stdlib only and nothing heavy imported: it runs at boot for every mlregfs fstab line.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field

# Words of mount(8), fstab, libmount and systemd that mean nothing to a FUSE daemon. libmount
# already strips some (noauto, x-*, comment=) but adds others (nosuid,nodev,noexec for `user`).
_DROP = frozenset(
    {
        "defaults", "rw", "auto", "noauto", "_netdev", "nofail",
        "user", "users", "nouser", "owner", "group",
        "exec", "noexec", "suid", "nosuid", "dev", "nodev",
        "sync", "async", "dirsync", "atime", "noatime", "diratime", "nodiratime",
        "relatime", "norelatime", "strictatime", "nostrictatime", "lazytime", "nolazytime",
        "iversion", "noiversion", "mand", "nomand", "symfollow", "nosymfollow",
        "silent", "loud",
    }
)  # fmt: skip
_DROP_PREFIXES = ("x-", "comment=", "user=", "helper=")
# Passed through although mlregfs may not know them yet (the mount side adds them).
_PASSTHROUGH = frozenset({"uid", "gid", "umask"})
# Path-valued options: made absolute because the mount runs with cwd "/".
_PATH_OPTIONS = frozenset({"token_file", "cache_dir", "log_file"})


class UsageError(ValueError):
    """The helper was called with arguments it cannot honour."""


@dataclass
class Request:
    """What mount(8) asked for, after parsing."""

    source: str
    mountpoint: str
    options: list[str] = field(default_factory=list)  # kept options, unescaped
    dropped: list[str] = field(default_factory=list)
    fake: bool = False
    verbose: bool = False
    sloppy: bool = False
    namespace: str | None = None


def split_mount_options(text: str) -> list[str]:
    """Split an `-o` string as mlregfs does (config.split_options: `\\,` and `"quoted"`)."""
    from mlregfs.config import ConfigError, split_options  # stdlib-only module: cheap

    try:
        return split_options(text)
    except ConfigError as e:
        raise UsageError(str(e)) from None


def join_options(options: list[str]) -> str:
    """Inverse of mlregfs.config.split_options: escape backslashes and commas, join with ','."""
    return ",".join(o.replace("\\", "\\\\").replace(",", "\\,") for o in options)


def _known_to_mlregfs(key: str) -> bool:
    # imported lazily: only sloppy mode needs it, and config is stdlib-only anyway
    from mlregfs import config

    return key in config._VALUE_OPTIONS or key in config._FLAG_OPTIONS or key in config._IGNORED


def _filter(options: list[str], sloppy: bool) -> tuple[list[str], list[str]]:
    kept: list[str] = []
    dropped: list[str] = []
    for opt in options:
        key, sep, value = opt.partition("=")
        if key == "token":
            # a token in argv would show in `ps` and in mount's error messages
            raise UsageError("token= is not accepted: use token_file=PATH (its first line)")
        if key == "remount":
            raise UsageError("remount is not supported: unmount and mount again")
        if opt in _DROP or opt.startswith(_DROP_PREFIXES):
            dropped.append(opt)
        elif sloppy and key not in _PASSTHROUGH and not _known_to_mlregfs(key):
            dropped.append(opt)  # -s: tolerate options we do not understand
        else:
            if key in _PATH_OPTIONS and sep and value:
                opt = f"{key}={os.path.abspath(value)}"
            kept.append(opt)
    return kept, dropped


def parse(argv: list[str]) -> Request:
    """Parse mount(8)'s helper arguments (`argv` without the program name)."""
    positional: list[str] = []
    raw_opts: list[str] = []
    flags: set[str] = set()
    namespace: str | None = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            positional += argv[i:]
            break
        if not arg.startswith("-") or arg == "-":
            positional.append(arg)
            continue
        # short options, possibly bundled (-sfnv) or with an attached value (-oro, -tmlregfs)
        j = 1
        while j < len(arg):
            ch = arg[j]
            j += 1
            if ch in "sfnvhi":
                flags.add(ch)
            elif ch in "otN":
                value = arg[j:]
                if not value:
                    if i >= len(argv):
                        raise UsageError(f"option -{ch} needs a value")
                    value = argv[i]
                    i += 1
                if ch == "o":
                    raw_opts.append(value)
                elif ch == "N":
                    namespace = value
                # -t TYPE: mount(8) already chose this helper from the type
                break
            else:
                raise UsageError(f"unknown option -{ch}")
    if "h" in flags:
        raise UsageError("help")
    if len(positional) != 2:
        raise UsageError("expected SOURCE and MOUNTPOINT")
    sloppy = "s" in flags
    options = [o for text in raw_opts for o in split_mount_options(text)]
    kept, dropped = _filter(options, sloppy)
    return Request(
        source=positional[0],
        mountpoint=os.path.abspath(positional[1]),
        options=kept,
        dropped=dropped,
        fake="f" in flags,
        verbose="v" in flags,
        sloppy=sloppy,
        namespace=namespace,
    )


def command(req: Request) -> list[str]:
    """The `mlregfs mount` command line for a parsed request."""
    # -P: never import a stray ./mlregfs from the caller's directory (we run as root)
    cmd = [sys.executable, "-P", "-m", "mlregfs", "mount", req.source, req.mountpoint]
    if req.options:
        cmd += ["-o", join_options(req.options)]
    if req.namespace:
        # mount -N: the mount must be made in that mount namespace
        nsenter = shutil.which("nsenter") or "nsenter"
        cmd = [nsenter, f"--mount={req.namespace}", "--", *cmd]
    return cmd


def translate(argv: list[str]) -> list[str]:
    """mount(8) helper arguments -> the command that performs the mount."""
    return command(parse(argv))


USAGE = (
    "usage: mount.mlregfs SOURCE MOUNTPOINT [-sfnv] [-o OPTIONS]\n"
    "  called by mount(8) for fstab lines of type mlregfs, e.g.\n"
    "  https://gitlab.example.com/group/project /mnt/models mlregfs "
    "_netdev,nofail,token_file=/etc/mlregfs/token 0 0\n"
    "  -s sloppy (drop unknown options)  -f fake (print, do not mount)  -n (ignored)  -v verbose"
)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `mount.mlregfs`: exec `mlregfs mount` (or print it with -f)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        req = parse(argv)
    except UsageError as e:
        if str(e) == "help":
            print(USAGE)
            return 0
        print(f"mount.mlregfs: {e} (see mount.mlregfs -h)", file=sys.stderr)
        return 1  # mount(8): incorrect invocation
    cmd = command(req)
    if req.verbose or req.fake:
        if req.dropped:
            print(f"mount.mlregfs: ignoring options: {','.join(req.dropped)}")
        print("mount.mlregfs: " + " ".join(_quote(a) for a in cmd), flush=True)
    if req.fake:
        return 0
    # "/" so the daemon pins no directory and relative imports cannot hijack it
    os.chdir("/")
    try:
        os.execvp(cmd[0], cmd)
    except OSError as e:
        print(f"mount.mlregfs: cannot run {cmd[0]}: {e.strerror}", file=sys.stderr)
    return 32  # mount(8): mount failure


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


if __name__ == "__main__":
    raise SystemExit(main())
