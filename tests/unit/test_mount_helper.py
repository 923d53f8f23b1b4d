"""mount.mlregfs: mount(8) helper arguments -> `mlregfs mount` command line (no mounting here)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mlregfs.config import parse_options, split_options
from mlregfs.mount_helper import UsageError, join_options, main, parse, translate

SRC = "https://gitlab.example.com/group/project"
BASE = [sys.executable, "-P", "-m", "mlregfs", "mount", SRC, "/mnt/models"]


def opts_of(cmd: list[str]) -> list[str]:
    """The options the command hands to mlregfs, split the way mlregfs splits them."""
    assert cmd[: len(BASE)] == BASE
    rest = cmd[len(BASE) :]
    if not rest:
        return []
    assert rest[0] == "-o" and len(rest) == 2
    return split_options(rest[1])


def test_plain_mount() -> None:
    assert translate([SRC, "/mnt/models"]) == BASE


def test_fstab_words_are_dropped_mlregfs_options_kept() -> None:
    # what libmount passes for an fstab line with _netdev,nofail,user (it adds noexec,...)
    cmd = translate(
        [
            SRC,
            "/mnt/models",
            "-o",
            "rw,noexec,nosuid,nodev,_netdev,nofail,user,token_file=/etc/mlregfs/token,"
            "cache_dir=/var/cache/mlregfs,defaults,auto,noauto,users,nouser,exec,suid,dev,"
            "sync,async,noatime,relatime,x-systemd.automount,x-systemd.idle-timeout=60,"
            "comment=systemd.automount,user=alice,cache_size=20G,debug",
        ]
    )
    assert opts_of(cmd) == [
        "token_file=/etc/mlregfs/token",
        "cache_dir=/var/cache/mlregfs",
        "cache_size=20G",
        "debug",
    ]


def test_ro_and_flags_are_kept() -> None:
    assert opts_of(translate([SRC, "/mnt/models", "-o", "ro,allow_other"])) == [
        "ro",
        "allow_other",
    ]


def test_uid_gid_umask_pass_through() -> None:
    cmd = translate([SRC, "/mnt/models", "-o", "uid=1000,gid=1000,umask=022"])
    assert opts_of(cmd) == ["uid=1000", "gid=1000", "umask=022"]


def test_repeated_and_attached_o_are_merged() -> None:
    cmd = translate([SRC, "/mnt/models", "-o", "ro", "-ocache_size=1G", "-o", "_netdev,debug"])
    assert opts_of(cmd) == ["ro", "cache_size=1G", "debug"]


def test_options_before_positionals_and_t_and_n() -> None:
    cmd = translate(["-n", "-t", "mlregfs", "-o", "ro", SRC, "/mnt/models"])
    assert opts_of(cmd) == ["ro"]
    assert translate(["-tmlregfs", SRC, "/mnt/models", "-sn"]) == BASE


def test_escaped_comma_survives_to_mlregfs() -> None:
    # `\,` (mlregfs's escape) and libmount's "quoted,value" both keep the comma in the value
    cmd = translate([SRC, "/mnt/models", "-o", r'token_file=/etc/a\,b,cache_dir="/var/c,d",ro'])
    assert opts_of(cmd) == ["token_file=/etc/a,b", "cache_dir=/var/c,d", "ro"]
    assert str(parse_options(cmd[-1:])["token_file"]) == "/etc/a,b"


def test_backslash_round_trip() -> None:
    values = ["a=x\\y", "b=p,q", "c=\\,"]
    assert split_options(join_options(values)) == values


def test_relative_paths_become_absolute(tmp_path, monkeypatch) -> None:
    # the mount runs with cwd "/", so relative paths must be resolved against the caller's cwd
    monkeypatch.chdir(tmp_path)
    cmd = translate([SRC, "mnt", "-o", "cache_dir=c,token_file=t,log_file=l,fsname=x"])
    assert cmd[6] == str(tmp_path / "mnt")
    assert split_options(cmd[-1]) == [
        f"cache_dir={tmp_path / 'c'}",
        f"token_file={tmp_path / 't'}",
        f"log_file={tmp_path / 'l'}",
        "fsname=x",
    ]


def test_unknown_options_reach_mlregfs_unless_sloppy() -> None:
    assert opts_of(translate([SRC, "/mnt/models", "-o", "bogus=1,ro"])) == ["bogus=1", "ro"]
    assert opts_of(translate(["-s", SRC, "/mnt/models", "-o", "bogus=1,ro,uid=5"])) == [
        "ro",
        "uid=5",
    ]


def test_token_in_options_is_refused() -> None:
    with pytest.raises(UsageError, match="token_file"):
        parse([SRC, "/mnt/models", "-o", "token=glpat-secret"])


def test_remount_is_refused() -> None:
    with pytest.raises(UsageError, match="remount"):
        parse([SRC, "/mnt/models", "-o", "remount,ro"])


@pytest.mark.parametrize(
    "argv",
    [[], [SRC], [SRC, "/a", "/b"], [SRC, "/mnt/models", "-o"], [SRC, "/mnt/models", "-x"]],
)
def test_bad_invocations(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        parse(argv)


def test_namespace_goes_through_nsenter() -> None:
    cmd = translate(["-N", "/proc/123/ns/mnt", SRC, "/mnt/models"])
    assert cmd[0].endswith("nsenter")
    assert cmd[1:3] == ["--mount=/proc/123/ns/mnt", "--"]
    assert cmd[3:] == BASE


def test_flags_are_recorded() -> None:
    req = parse(["-sfnv", SRC, "/mnt/models"])
    assert (req.sloppy, req.fake, req.verbose) == (True, True, True)


def test_fake_mode_prints_and_does_not_exec(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-f", SRC, "/mnt/models", "-o", "_netdev,ro"]) == 0
    out = capsys.readouterr().out
    assert "ignoring options: _netdev" in out
    assert f"-m mlregfs mount {SRC} /mnt/models -o ro" in out


def test_usage_error_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([SRC, "/mnt/models", "-o", "token=glpat-secret"]) == 1
    err = capsys.readouterr().err
    assert "token_file" in err and "glpat-secret" not in err


def test_module_entry_point_fake_mode() -> None:
    # `python -m mlregfs.mount_helper` is what /sbin/mount.mlregfs runs without the console script
    r = subprocess.run(
        [sys.executable, "-m", "mlregfs.mount_helper", SRC, "/mnt/models", "-fv", "-o", "ro"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    assert "mlregfs mount" in r.stdout


def test_helper_does_not_import_heavy_modules() -> None:
    code = (
        "import sys, mlregfs.mount_helper as h; h.translate(['-s', 'x', '/m', '-o', 'ro']);"
        "print(sorted(m for m in ('trio', 'pyfuse3', 'httpx') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.stdout.strip() == "[]", r.stderr
