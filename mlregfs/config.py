"""Mount configuration: `-o a=b,c` parsing, validation, defaults. No I/O beyond reading env."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from mlregfs.cache.prefetch import PREFETCH_POLICIES
from mlregfs.registry.source import candidates

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class ConfigError(ValueError):
    """An option is unknown or has an invalid value."""


def parse_size(text: str) -> int:
    """'512M', '10G', '4096', '1.5GiB' -> bytes (binary units)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ConfigError(f"invalid size {text!r} (examples: 4096, 512M, 10G)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_duration(text: str) -> float:
    """'30', '30s', '5m', '1h' -> seconds."""
    m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$", text)
    if not m:
        raise ConfigError(f"invalid duration {text!r} (examples: 30, 30s, 5m, 1h)")
    factor = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
    return float(m.group(1)) * factor


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mlregfs"


@dataclass(frozen=True)
class Config:
    """Everything a mount needs. Built by `from_options`; immutable afterwards."""

    source: str
    mountpoint: Path
    token: str | None = field(default=None, repr=False)  # never printed
    token_kind: str = "personal"  # "personal" | "job"
    token_file: Path | None = None
    cache_dir: Path = field(default_factory=default_cache_dir)
    cache_size: int = 10 << 30
    block_size: int = 8 << 20
    readahead_blocks: int = 4
    memory_cache: int | None = None  # memory cache cap (default: all of memory_limit)
    memory_limit: int = 192 << 20  # every block buffer: memory cache, downloads, hashing
    prefetch: str = "weights"  # which files are fetched whole when opened (PREFETCH_POLICIES)
    listing_ttl: float = 30.0  # models, versions, candidates, candidate files
    file_ttl: float = 300.0  # files of a model version (immutable in practice)
    timeout: float = 30.0  # total per HTTP request: connect, headers, body (+size/256K/s uploads)
    retry_deadline: float = 30.0  # total time one operation may take, all attempts included
    read_only: bool = False
    uid: int | None = None  # owner shown for every file (default: the mounting user)
    gid: int | None = None
    umask: int = 0o022
    drain_timeout: float = 300.0  # how long unmount waits for uploads in flight
    temp_files: str = "hold"  # "hold": temporary names upload once renamed; "upload": at close
    allow_other: bool = False
    debug: bool = False
    foreground: bool = False
    log_file: Path | None = None
    metrics: Path | None = None  # Prometheus textfile, rewritten every few seconds
    metrics_mode: int = 0o600  # private by default: it names the project (see README)
    fsname: str = "mlregfs"

    @property
    def max_blocks_cached(self) -> int:
        return max(1, self.cache_size // self.block_size)


# option name -> (Config field, parser). Flags without value map to True.
def _octal(text: str) -> int:
    return int(text, 8)


_VALUE_OPTIONS = {
    "token_file": ("token_file", Path),
    "cache_dir": ("cache_dir", Path),
    "cache_size": ("cache_size", parse_size),
    "block_size": ("block_size", parse_size),
    "readahead": ("readahead_blocks", int),
    "memory_cache": ("memory_cache", parse_size),
    "memory_limit": ("memory_limit", parse_size),
    "prefetch": ("prefetch", str),
    "listing_ttl": ("listing_ttl", parse_duration),
    "file_ttl": ("file_ttl", parse_duration),
    "timeout": ("timeout", parse_duration),
    "retry_deadline": ("retry_deadline", parse_duration),
    "log_file": ("log_file", Path),
    "metrics": ("metrics", Path),
    "metrics_mode": ("metrics_mode", _octal),
    "drain_timeout": ("drain_timeout", parse_duration),
    "temp_files": ("temp_files", str),
    "uid": ("uid", int),
    "gid": ("gid", int),
    "umask": ("umask", _octal),
    "fsname": ("fsname", str),
}
_FLAG_OPTIONS = {"allow_other": "allow_other", "debug": "debug", "ro": "read_only"}
# accepted for mount(8)/fstab compatibility and ignored
_IGNORED = {
    "rw",
    "defaults",
    "noauto",
    "auto",
    "user",
    "nouser",
    "_netdev",
    "nofail",
    "noatime",
    "atime",
    "nodev",
    "nosuid",
    "exec",
    "noexec",
    "suid",
    "dev",
}


def split_options(text: str) -> list[str]:
    """Split a `-o` string on commas. A backslash keeps the next character literally (`\\,`);
    libmount's `"quoted,values"` work too (the quotes are removed)."""
    parts: list[str] = []
    cur: list[str] = []
    quoted = esc = False
    for ch in text:
        if esc:
            cur.append(ch)
            esc = False
        elif ch == "\\":
            esc = True
        elif ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if quoted:
        raise ConfigError(f"unbalanced quote in options {text!r}")
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def parse_options(opts: list[str]) -> dict[str, object]:
    """`["cache_size=1G", "debug"]` -> Config keyword arguments. Unknown options raise."""
    out: dict[str, object] = {}
    for item in opts:
        for opt in split_options(item):
            key, sep, value = opt.partition("=")
            if key in _VALUE_OPTIONS:
                if not sep or not value:
                    raise ConfigError(f"option {key} needs a value ({key}=...)")
                name, conv = _VALUE_OPTIONS[key]
                try:
                    out[name] = conv(value)  # type: ignore[operator]
                except ConfigError:
                    raise
                except ValueError as e:
                    raise ConfigError(f"invalid value for {key}: {value!r}") from e
            elif key in _FLAG_OPTIONS and not sep:
                out[_FLAG_OPTIONS[key]] = True
            elif key in _IGNORED:
                continue
            else:
                raise ConfigError(f"unknown mount option {key!r}")
    return out


def resolve_token(token_file: Path | None, env: dict[str, str]) -> tuple[str | None, str]:
    """Token and its kind: `-o token_file`, else GITLAB_TOKEN, else CI_JOB_TOKEN, else none."""
    if token_file is not None:
        try:
            text = token_file.read_text().strip()
        except OSError as e:
            raise ConfigError(f"cannot read token_file {token_file}: {e.strerror}") from e
        if not text:
            raise ConfigError(f"token_file {token_file} is empty")
        return text, "personal"
    if env.get("GITLAB_TOKEN"):
        return env["GITLAB_TOKEN"].strip(), "personal"
    if env.get("CI_JOB_TOKEN"):
        return env["CI_JOB_TOKEN"].strip(), "job"
    return None, "personal"


def from_options(
    source: str,
    mountpoint: str | Path,
    options: list[str],
    *,
    foreground: bool = False,
    env: dict[str, str] | None = None,
) -> Config:
    """Build and validate a Config from the command line."""
    kw = parse_options(options)
    token, kind = resolve_token(kw.get("token_file"), dict(os.environ) if env is None else env)  # type: ignore[arg-type]
    cfg = Config(
        source=source,
        mountpoint=Path(mountpoint).absolute(),
        token=token,
        token_kind=kind,
        foreground=foreground,
        **kw,  # type: ignore[arg-type]
    )
    if cfg.block_size < 64 << 10 or cfg.block_size > 64 << 20:
        raise ConfigError("block_size must be between 64K and 64M")
    if cfg.cache_size < cfg.block_size * 4:
        raise ConfigError("cache_size must hold at least 4 blocks")
    if not 0 <= cfg.umask <= 0o777:
        raise ConfigError("umask must be an octal number between 000 and 777")
    if not 0 <= cfg.metrics_mode <= 0o666:
        raise ConfigError("metrics_mode must be an octal file mode between 000 and 666")
    try:
        candidates(cfg.source)  # a bad SOURCE is a one-line error before anything starts
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.drain_timeout < 0:
        raise ConfigError("drain_timeout must not be negative")
    if cfg.readahead_blocks < 0 or cfg.readahead_blocks > 64:
        raise ConfigError("readahead must be between 0 and 64 blocks")
    if cfg.memory_limit < 4 * cfg.block_size:
        raise ConfigError("memory_limit must hold at least 4 blocks")
    if cfg.temp_files not in ("hold", "upload"):
        raise ConfigError("temp_files must be 'hold' or 'upload'")
    if cfg.prefetch not in PREFETCH_POLICIES:
        raise ConfigError(f"prefetch must be one of: {', '.join(PREFETCH_POLICIES)}")
    return cfg
