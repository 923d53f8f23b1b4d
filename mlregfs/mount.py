"""Mount lifecycle: check, connect, pyfuse3.init/main/close, signals, readiness, daemonizing."""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyfuse3
import trio

from mlregfs import logs, sdnotify
from mlregfs.assemble import assemble, public_source, snapshot
from mlregfs.config import Config
from mlregfs.errors import NotFound, RegistryError, RegistryUnavailable, Unauthorized
from mlregfs.fs.core import Filesystem
from mlregfs.localstate import private_dir
from mlregfs.registry.catalog import CatalogRegistry
from mlregfs.registry.gitlab import GitLabRegistry
from mlregfs.spool import Spool
from mlregfs.status import Reporter

log = logging.getLogger("mlregfs.mount")


class MountError(Exception):
    """The mount could not start; the message is for the user."""


def check_mountpoint(mp: Path) -> None:
    """Refuse a missing, non-directory or already mounted mount point; clean a stale one."""
    try:
        os.statvfs(mp)  # unlike stat, never answered from the kernel's attribute cache
        st = os.stat(mp)
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise MountError(f"mount point {mp}: {e.strerror}") from None
        # "Transport endpoint is not connected": a daemon died and left its mount behind
        try:
            r = subprocess.run(["fusermount3", "-uz", str(mp)], capture_output=True, text=True)
            failed = r.stderr.strip() if r.returncode else ""
        except OSError as err:  # fusermount3 missing
            failed = str(err)
        if failed:
            raise MountError(
                f"{mp} is a stale mount (daemon gone) and 'fusermount3 -uz' failed: {failed}"
            ) from None
        log.warning("cleaned a stale mount at %s (its daemon had died)", mp)
        st = os.stat(mp)
    if not os.path.isdir(mp) or not (st.st_mode & 0o040000):
        raise MountError(f"mount point {mp} is not a directory")
    if os.path.ismount(mp):
        raise MountError(f"mount point {mp} is busy (something is already mounted there)")


_OURS = ("blocks", "catalog", "spool", "mlregfs.log")


def prepare_cache_dir(cfg: Config) -> None:
    """Create cache_dir 0700, or make an existing one of ours so (it holds names, sizes and
    sha256 of a private project); MountError if that is impossible.

    An existing directory that also holds other things (`cache_dir=$HOME/work`) keeps its
    mode: everything mlregfs puts there is private on its own (0700 subdirectories, 0600
    files), and silently closing a user's shared directory would be a surprise."""
    d = cfg.cache_dir
    try:
        if d.is_dir() and not _ours(d):
            log.info("cache_dir %s holds other files: its own mode is left as it is", d)
            return
        private_dir(d)
    except OSError as e:
        raise MountError(f"cache_dir {d}: {e.strerror or e}") from None


def _ours(d: Path) -> bool:
    """Empty, or holding only what mlregfs keeps there."""
    names = {p.name for p in d.iterdir()}
    if not names:
        return True
    return bool(names & set(_OURS)) and all(
        n in _OURS or n.startswith(".") or ".damaged-" in n for n in names
    )


def _unexpected(e: BaseException, cfg: Config) -> str:
    """One line for an error nobody anticipated (secret-free; trio's groups unwrapped)."""
    while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    text = explain(e, cfg) if isinstance(e, RegistryError) else f"{type(e).__name__}: {e}"
    if cfg.token:
        text = text.replace(cfg.token, "[MASKED]")
    return " ".join(text.split())  # one line, whatever the exception said


def explain(e: BaseException, cfg: Config) -> str:
    """A one-line, secret-free reason for a failed start."""
    src = public_source(cfg.source)
    if isinstance(e, Unauthorized):
        how = (
            "token_file"
            if cfg.token_file
            else ("CI_JOB_TOKEN" if cfg.token_kind == "job" else "GITLAB_TOKEN")
        )
        if cfg.token is None:
            return f"{src}: the registry requires a token (set GITLAB_TOKEN or -o token_file=PATH)"
        return f"{src}: token refused (401); check {how}"
    if isinstance(e, NotFound):
        who = "this token" if cfg.token else "no token"
        return f"{src}: project not found, or not visible with {who}"
    if isinstance(e, RegistryUnavailable):
        return f"{src}: registry unreachable: {e}"
    if isinstance(e, RegistryError):
        return f"{src}: {e}"
    return str(e)


class TokenFile:
    """The token file, re-read when it changes (rotated CI/deploy tokens) or on a 401."""

    def __init__(self, path: Path, token: str | None) -> None:
        self.path = path
        self.token = token
        self._mtime = self._stat()
        mode = self._mode()
        if mode is not None and mode & 0o077:
            log.warning(
                "token file %s is readable by others (mode %o): chmod 600 it", path, mode & 0o777
            )

    def _stat(self) -> float | None:
        try:
            return os.stat(self.path).st_mtime
        except OSError:
            return None

    def _mode(self) -> int | None:
        try:
            return os.stat(self.path).st_mode
        except OSError:
            return None

    def read(self) -> str | None:
        """The current token (the old one if the file is unreadable or empty)."""
        try:
            text = self.path.read_text().strip()
        except OSError as e:
            log.warning("cannot re-read token file %s: %s", self.path, e.strerror)
            return self.token
        if text and text != self.token:
            log.info("token file %s changed: using the new token", self.path)
            self.token = text
        self._mtime = self._stat()
        return self.token

    def changed(self) -> bool:
        return self._stat() != self._mtime


def build_registry(cfg: Config, token_file: TokenFile | None = None) -> GitLabRegistry:
    from mlregfs.registry.retry import RetryPolicy

    return GitLabRegistry(
        cfg.source,
        cfg.token,
        token_kind="job" if cfg.token_kind == "job" else "personal",
        timeout=cfg.timeout,
        retry=RetryPolicy(deadline=cfg.retry_deadline),
        token_refresh=token_file.read if token_file else None,
    )


async def watch_token(token_file: TokenFile, registry: GitLabRegistry, every: float = 5) -> None:
    while True:
        await trio.sleep(every)
        if await trio.to_thread.run_sync(token_file.changed):
            token = await trio.to_thread.run_sync(token_file.read)
            registry.set_token(token)


def fuse_options(cfg: Config) -> set[str]:
    opts = set(pyfuse3.default_options)
    opts |= {f"fsname={cfg.fsname}", "subtype=mlregfs", "noatime", "nodev", "nosuid"}
    if cfg.read_only:
        opts.add("ro")
    if cfg.allow_other:
        opts.add("allow_other")
    if cfg.debug:
        opts.add("debug")
    return opts


async def serve(cfg: Config, ready: ReadySignal) -> None:
    """Connect, mount, serve until unmounted or signalled, then unmount."""
    catalog_name = hashlib.sha256(public_source(cfg.source).encode()).hexdigest()[:32]
    prepare_cache_dir(cfg)
    token_file = TokenFile(cfg.token_file, cfg.token) if cfg.token_file else None
    client = build_registry(cfg, token_file)
    registry = CatalogRegistry(client, cfg.cache_dir / "catalog" / catalog_name)
    try:
        project = await registry.project()
    except RegistryError as e:
        await registry.aclose()
        raise MountError(explain(e, cfg)) from None
    if registry.offline_answers:
        log.warning(
            "starting OFFLINE: %s is unreachable; serving the versions and files known"
            " from the last catalog, reads of uncached files fail with EIO",
            public_source(cfg.source),
        )
    log.info(
        "project %s (id %s, %s) at %s",
        project.path,
        project.id,
        project.visibility,
        public_source(cfg.source),
    )
    d = await assemble(cfg, client, registry)
    data, spool, fs, ops = d.data, d.spool, d.fs, d.ops
    reporter = Reporter(
        cfg.mountpoint, cfg.metrics, functools.partial(snapshot, d), metrics_mode=cfg.metrics_mode
    )
    check_mountpoint(cfg.mountpoint)
    try:
        pyfuse3.init(ops, str(cfg.mountpoint), fuse_options(cfg))
    except RuntimeError as e:
        await registry.aclose()
        raise MountError(f"cannot mount {cfg.mountpoint}: {e} (is /dev/fuse available?)") from None
    try:
        fuse_loop = trio.CancelScope()  # cancelled by _on_signals if requests outlive the stop
        async with trio.open_nursery() as nursery:
            data.start(nursery)
            fs.start(nursery)
            nursery.start_soon(_on_signals, fs, cfg.drain_timeout, fuse_loop)
            if token_file is not None:
                nursery.start_soon(watch_token, token_file, client)
            nursery.start_soon(_report, reporter, spool)
            readahead_kb = min(cfg.block_size * max(cfg.readahead_blocks, 1), 64 << 20) >> 10
            nursery.start_soon(_announce_ready, cfg.mountpoint, ready, readahead_kb)
            with fuse_loop:
                await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        held = fs.release_held()
        if held:
            log.warning(
                "%d file(s) with a temporary name were never renamed and are not uploaded (%s);"
                " they are kept for 'mlregfs recover --cache-dir %s'",
                len(held),
                ", ".join(held[:5]),
                cfg.cache_dir,
            )
        ops.close_session()  # no page invalidation may run into a closed session
        # unmounting an already unmounted session (fusermount3 -u) is harmless
        pyfuse3.close(unmount=True)
        with contextlib.suppress(OSError):
            # the last numbers (the metrics textfile stays for the collector)
            reporter.write(reporter.collect(len(spool.leftovers()) if spool else 0))
            reporter.remove()
        await registry.aclose()
        log.info("unmounted %s", cfg.mountpoint)


async def _report(reporter: Reporter, spool: Spool | None, every: float = 2.0) -> None:
    while True:
        try:
            kept = len(await trio.to_thread.run_sync(spool.leftovers)) if spool else 0
            # the snapshot reads live counters: take it on the trio thread, write it off it
            snap = reporter.collect(kept)
            await trio.to_thread.run_sync(reporter.write, snap)
        except Exception as e:  # status reporting must never take the mount down
            log.warning("cannot write status/metrics: %s", e)
        await trio.sleep(every)


STOP_GRACE = 5.0  # after the drain, how long requests still running may take to answer


async def _on_signals(fs: Filesystem, drain_timeout: float, fuse_loop: trio.CancelScope) -> None:
    """SIGTERM/SIGINT: wait up to drain_timeout for uploads, then stop within STOP_GRACE."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for sig in signals:
            if sig == signal.SIGHUP:
                continue  # reserved for reloads; never die on a closed terminal
            log.info("signal %s: unmounting", signal.Signals(sig).name)
            sdnotify.notify("STOPPING=1\nSTATUS=waiting for uploads in flight")
            if not await fs.uploader.drain(drain_timeout):
                log.error(
                    "uploads still running after drain_timeout (%gs): abandoned; their spool"
                    " files are kept for 'mlregfs recover' (it asks the registry before"
                    " sending them again)",
                    drain_timeout,
                )
            pyfuse3.terminate()  # no new request; main() returns once the running ones answer
            break
        # (still receiving: another signal now neither kills the daemon nor starts over)
        await trio.sleep(STOP_GRACE)
        log.warning("requests still running %gs after the drain: cancelling them", STOP_GRACE)
        fuse_loop.cancel()


async def _announce_ready(mp: Path, ready: ReadySignal, readahead_kb: int) -> None:
    # a stat through the kernel proves the loop answers requests
    st = await trio.to_thread.run_sync(os.stat, mp)
    if os.geteuid() == 0:
        await trio.to_thread.run_sync(tune_kernel, os.minor(st.st_dev), readahead_kb)
    log.info("mounted at %s", mp)
    ready.ok()
    sdnotify.notify(f"READY=1\nSTATUS=mounted at {mp}")


def tune_kernel(minor: int, readahead_kb: int) -> None:
    """Root only: larger kernel readahead and more background requests for this mount.

    pyfuse3 cannot set max_readahead/max_background at INIT, and the defaults (128 KiB, 12)
    leave a sequential reader latency-bound (fuse-ceiling.md §1.2, §4)."""
    done = []
    bdi = Path(f"/sys/class/bdi/0:{minor}/read_ahead_kb")
    try:
        bdi.write_text(str(readahead_kb))
        done.append(f"read_ahead_kb={readahead_kb}")
    except OSError as e:
        log.debug("cannot set %s: %s", bdi, e)
    conn = Path(f"/sys/fs/fuse/connections/{minor}")
    if not conn.exists() and Path("/sys/fs/fuse/connections").is_dir():
        try:
            subprocess.run(
                ["mount", "-t", "fusectl", "none", "/sys/fs/fuse/connections"],
                capture_output=True,
                check=False,
            )
        except OSError as e:  # no mount(8): keep the defaults
            log.debug("cannot mount fusectl: %s", e)
    for name, value in (("max_background", 64), ("congestion_threshold", 48)):
        try:
            (conn / name).write_text(str(value))
            done.append(f"{name}={value}")
        except OSError as e:
            log.debug("cannot set %s/%s: %s", conn, name, e)
    if done:
        log.info("kernel tuning for this mount (running as root): %s", ", ".join(done))


class ReadySignal:
    """Tells a waiting parent process (via a pipe fd) that the mount is up, or why not."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        self.answered = False  # READY or ERROR sent (or would have been, without a pipe)

    def _send(self, text: str) -> None:
        if self.answered:
            return
        self.answered = True
        if self.fd is None:
            return
        try:
            os.write(self.fd, text.encode())
            os.close(self.fd)
        except OSError:
            pass
        self.fd = None

    def ok(self) -> None:
        self._send("READY\n")

    def fail(self, message: str) -> None:
        self._send(f"ERROR {message}\n")


def bound_malloc() -> None:
    """Keep RSS near what is really in use (glibc only; a no-op elsewhere).

    Blocks are 8 MiB buffers allocated and freed on several threads. With glibc's defaults
    the mmap threshold grows after the first free (so later blocks come from per-thread
    arenas) and freed arena memory is kept: peak RSS drifts far above the live data.
    A fixed 2 MiB threshold returns every block to the kernel when freed (blocks are
    recycled through `buffers.POOL` instead), and two arenas bound fragmentation. 2, not 1:
    pyfuse3 hands each 1 MiB FUSE write over as a fresh 1 MiB bytes object, and those must
    come from reused heap memory, not fresh mmaps (~0.8 s CPU/GiB of page faults here)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_arena_max, m_mmap_threshold = -8, -3
        libc.mallopt(m_mmap_threshold, 2 << 20)
        libc.mallopt(m_arena_max, 2)
    except (OSError, AttributeError):
        pass


def run_foreground(cfg: Config, ready_fd: int | None = None) -> int:
    """Mount and serve in this process. Returns the exit status."""
    bound_malloc()
    log_file = cfg.log_file if cfg.log_file else None
    ready = ReadySignal(ready_fd)
    try:
        logs.setup(debug=cfg.debug, log_file=log_file, secrets=[cfg.token] if cfg.token else [])
    except OSError as e:
        ready.fail(f"cannot open log_file {log_file}: {e.strerror or e}")
        raise MountError(f"cannot open log_file {log_file}: {e.strerror or e}") from None
    try:
        check_mountpoint(cfg.mountpoint)
        trio.run(serve, cfg, ready)
    except MountError as e:
        log.error("%s", e)
        ready.fail(str(e))
        return 1
    except KeyboardInterrupt:
        return 0
    except Exception as e:  # any other failure: its reason, in the log and to `mlregfs mount`
        reason = _unexpected(e, cfg)
        if ready.answered:
            log.error("mount failed: %s", reason, exc_info=True)
        else:
            log.error("cannot start: %s", reason)
            log.debug("cannot start", exc_info=True)
        ready.fail(f"cannot start: {reason}")
        return 1
    return 0


def run_daemon(cfg: Config, argv: list[str]) -> int:
    """Start the mount in a detached child and return once it is ready (or failed)."""
    check_mountpoint(cfg.mountpoint)
    prepare_cache_dir(cfg)  # also where the log goes: its errors are the caller's to see
    r, w = os.pipe()
    log_file = cfg.log_file or (cfg.cache_dir / "mlregfs.log")
    # -P: never import a stray ./mlregfs from the caller's directory
    cmd = [sys.executable, "-P", "-m", "mlregfs", "mount", *argv, "-f", f"--ready-fd={w}"]
    if cfg.log_file is None:
        cmd += ["-o", f"log_file={log_file}"]
    proc = subprocess.Popen(
        cmd,
        pass_fds=(w,),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # survives the shell that started it
    )
    os.close(w)
    with os.fdopen(r) as pipe:
        answer = pipe.read().strip()
    if answer == "READY":
        return 0
    if answer.startswith("ERROR "):
        raise MountError(answer[6:])
    code = proc.poll()
    raise MountError(f"mount daemon exited before it was ready (status {code}); see {log_file}")
