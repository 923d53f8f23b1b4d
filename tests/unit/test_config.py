"""Option parsing and token resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlregfs.config import ConfigError, from_options, parse_size, split_options


def test_sizes() -> None:
    assert parse_size("4096") == 4096
    assert parse_size("512M") == 512 << 20
    assert parse_size("10G") == 10 << 30
    assert parse_size("1GiB") == 1 << 30
    with pytest.raises(ConfigError):
        parse_size("ten")


def test_split_options_escapes_commas() -> None:
    assert split_options(r"a=1,b=x\,y,c") == ["a=1", "b=x,y", "c"]


def test_from_options(tmp_path: Path) -> None:
    tok = tmp_path / "tok"
    tok.write_text("secret-token\n")
    cfg = from_options(
        "http://h/g/p", tmp_path, [f"token_file={tok},cache_size=1G", "debug,_netdev,ro"], env={}
    )
    assert cfg.token == "secret-token" and cfg.token_kind == "personal"
    assert cfg.cache_size == 1 << 30 and cfg.debug
    assert "secret-token" not in repr(cfg)


def test_token_precedence(tmp_path: Path) -> None:
    assert (
        from_options(
            "http://h/g/p", tmp_path, [], env={"GITLAB_TOKEN": "a", "CI_JOB_TOKEN": "b"}
        ).token
        == "a"
    )
    cfg = from_options("http://h/g/p", tmp_path, [], env={"CI_JOB_TOKEN": "b"})
    assert cfg.token == "b" and cfg.token_kind == "job"
    assert from_options("http://h/g/p", tmp_path, [], env={}).token is None


def test_unknown_option_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown mount option 'bogus'"):
        from_options("http://h/g/p", tmp_path, ["bogus=1"], env={})
    with pytest.raises(ConfigError, match="needs a value"):
        from_options("http://h/g/p", tmp_path, ["cache_size"], env={})


def test_ro_flag_makes_a_read_only_mount(tmp_path: Path) -> None:
    assert from_options("http://h/g/p", tmp_path, ["ro,_netdev"], env={}).read_only
    assert not from_options("http://h/g/p", tmp_path, ["rw"], env={}).read_only
