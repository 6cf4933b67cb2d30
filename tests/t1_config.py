"""The configuration file: XDG location, sizes, drive tables, refusals, flags over the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from vfs.commands import mount_parser
from vfs.config import ConfigError, config_path, load, parse_size, resolve_mount_args

CONFIG = """
url = "http://127.0.0.1:9/docs"
token_file = "~/tok"
cache_size = "2 GiB"
writeback_delay = 5

[drive.work]
url = "http://127.0.0.1:9/work"
mountpoint = "/mnt/work"
cache_size = 1048576
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG)
    return path


def test_config_path_honours_xdg() -> None:
    assert config_path({"XDG_CONFIG_HOME": "/x/conf"}) == Path("/x/conf/ferry/config.toml")
    assert config_path({"HOME": "/home/u"}) == Path("/home/u/.config/ferry/config.toml")


@pytest.mark.parametrize(
    ("text", "size"),
    [("1048576", 2**20), (7, 7), ("500M", 500 * 2**20), ("20 GiB", 20 * 2**30), ("1.5k", 1536)],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "ten", "5 PB", "-3", -1])
def test_parse_size_refuses(text: str | int) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_load_defaults_and_a_drive_table(config_file: Path) -> None:
    defaults = load(config_file)
    assert defaults["url"] == "http://127.0.0.1:9/docs"
    assert defaults["token_file"] == Path("~/tok").expanduser()
    assert defaults["cache_size"] == 2 * 2**30 and defaults["writeback_delay"] == 5.0
    work = load(config_file, "work")
    assert work["url"] == "http://127.0.0.1:9/work" and work["mountpoint"] == Path("/mnt/work")
    assert work["cache_size"] == 2**20 and work["token_file"] == defaults["token_file"]


def test_missing_file_is_empty_unless_a_drive_is_asked(tmp_path: Path) -> None:
    assert load(tmp_path / "none.toml") == {}
    with pytest.raises(ConfigError, match="no such file"):
        load(tmp_path / "none.toml", "work")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('urll = "x"', "unknown key urll"),
        ('[drive.a]\ncache_dir = "/c"\ncolour = 1', "unknown key drive.a.colour"),
        ('cache_size = "lots"', "cache_size"),
        ("url = [", "config.toml"),
    ],
)
def test_bad_files_are_refused_with_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load(path)
    assert str(path) in str(info.value)


def test_unknown_drive_names_the_known_ones(config_file: Path) -> None:
    with pytest.raises(ConfigError, match=r"no \[drive.home\] table \(drives: work\)"):
        load(config_file, "home")


def test_flags_override_the_file(config_file: Path) -> None:
    args = resolve_mount_args(
        mount_parser(), ["/mnt/d", "--config", str(config_file), "--cache-size", "1G"]
    )
    assert args.url == "http://127.0.0.1:9/docs"  # one positional: the mountpoint
    assert args.mountpoint == Path("/mnt/d")
    assert args.cache_size == 2**30 and args.writeback_delay == 5.0
    work = resolve_mount_args(
        mount_parser(), ["--config", str(config_file), "--drive", "work", "--writeback-delay", "0"]
    )
    assert work.mountpoint == Path("/mnt/work") and work.writeback_delay == 0.0


def test_missing_settings_say_where_to_put_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        resolve_mount_args(mount_parser(), ["--config", str(tmp_path / "none.toml")])
    assert "URL is needed: give it, or set url in" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        resolve_mount_args(
            mount_parser(), ["http://h:1/l", "/mnt", "--config", str(tmp_path / "none.toml")]
        )
    assert "--token-file is needed" in capsys.readouterr().err
