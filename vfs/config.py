"""The configuration file, `$XDG_CONFIG_HOME/ferry/config.toml` (default `~/.config/ferry/`).

It names what `ferry mount` would otherwise need on its command line, so a
drive mounts with `ferry mount` alone (or `ferry mount --drive work`, or from
an fstab line or a systemd unit). Top-level keys are defaults for every drive;
a `[drive.NAME]` table overrides them for one drive. Command-line flags
override both.

    url = "https://files.example.org/docs"     # the library
    token_file = "~/.config/ferry/token"
    mountpoint = "~/Drive"
    cache_size = "20 GiB"                        # bytes, or a number with K/M/G/T(iB)
    writeback_delay = 2.0                        # seconds before local changes upload
    ca_file = "~/.config/ferry/ca.pem"           # verify an https:// server with this CA
    allow_other = false                          # let other local users into the drive
    insecure_http = false                        # token over http:// to another host
    xattrs = false                               # user.ferry.state/.revision xattrs

    [drive.work]
    url = "https://files.example.org/work"
    mountpoint = "~/Work"

Unknown keys are refused with the file and key named, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import argparse
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: Keys a drive may set, and how to turn the file's value into the argparse value.
KEYS = (
    "url",
    "mountpoint",
    "token_file",
    "cache_dir",
    "cache_size",
    "writeback_delay",
    "allow_other",
    "insecure_http",
    "xattrs",
    "ca_file",
)
PATH_KEYS = ("mountpoint", "token_file", "cache_dir", "ca_file")
#: Keys that are true or false (TOML booleans only: "false" as a string would read as true).
BOOL_KEYS = ("allow_other", "insecure_http", "xattrs")
DEFAULT_WRITEBACK_DELAY = 2.0

_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


class ConfigError(Exception):
    """The configuration file cannot be used; the message names the file and the problem."""


def config_path(env: Mapping[str, str] | None = None) -> Path:
    """Where the configuration file is looked for (XDG base directory rules)."""
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME", "~")) / ".config")
    return Path(base).expanduser() / "ferry" / "config.toml"


def parse_size(text: str | int) -> int:
    """'20 GiB', '500M', '1048576' or an int -> bytes."""
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size {text} is negative")
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtKMGT]?)(?:i?[bB])?\s*", str(text))
    if not match:
        raise ValueError(f"{text!r} is not a size (examples: 1048576, 500M, 20 GiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def load(path: Path, drive: str | None = None) -> dict[str, Any]:
    """The settings for `drive` (or the defaults) from `path`; {} when the file does not exist."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if drive is not None:
            raise ConfigError(f"{path}: no such file, so there is no drive {drive!r}") from None
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    tables = data.pop("drive", {})
    if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
        raise ConfigError(f"{path}: `drive` must hold tables, as in [drive.NAME]")
    settings = _check(path, data, "")
    drives = {name: _check(path, table, f"drive.{name}.") for name, table in tables.items()}
    if drive is not None:
        if drive not in drives:
            known = ", ".join(sorted(drives)) or "none"
            raise ConfigError(f"{path}: no [drive.{drive}] table (drives: {known})")
        settings.update(drives[drive])
    return settings


def _check(path: Path, table: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for key, value in table.items():
        if key not in KEYS:
            raise ConfigError(f"{path}: unknown key {prefix}{key} (known: {', '.join(KEYS)})")
        try:
            if key in PATH_KEYS:
                settings[key] = Path(str(value)).expanduser()
            elif key == "cache_size":
                settings[key] = parse_size(value)
            elif key == "writeback_delay":
                settings[key] = float(value)
            elif key in BOOL_KEYS:
                if not isinstance(value, bool):
                    raise ValueError(f"must be true or false, not {value!r}")
                settings[key] = value
            else:
                settings[key] = str(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{path}: {prefix}{key}: {exc}") from exc
    return settings


def resolve_mount_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse `ferry mount` arguments and fill what they leave out from the configuration file.

    With one positional argument and a configured URL, the argument is the mountpoint.
    """
    args = parser.parse_args(argv)
    if args.url is not None and args.mountpoint is None and "://" not in args.url:
        args.url, args.mountpoint = None, Path(args.url)
    path = args.config or config_path()
    try:
        settings = load(path, args.drive)
    except ConfigError as exc:
        parser.error(str(exc))
    for key in KEYS:
        if getattr(args, key, None) is None and key in settings:
            setattr(args, key, settings[key])
    if args.writeback_delay is None:
        args.writeback_delay = DEFAULT_WRITEBACK_DELAY
    for key in BOOL_KEYS:
        setattr(args, key, bool(getattr(args, key, None)))
    for key, flag in (("url", "URL"), ("mountpoint", "MOUNTPOINT"), ("token_file", "--token-file")):
        if getattr(args, key) is None:
            parser.error(f"{flag} is needed: give it, or set {key} in {path}")
    return args
