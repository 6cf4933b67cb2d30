"""`ferry up MOUNTPOINT`: a working drive on a fresh machine with no configuration.

It starts a local sync server on default paths (unless one already answers
there), creates a user and a library the first time, keeps the user's token in
a private file, and mounts the library. Running it again reuses all of that,
so it is also the everyday "bring my drive back" command. `ferry down` undoes
it: unmounts the drive and stops the server that `up` started.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from remote.private_dirs import make_private_dir

DEFAULT_LISTEN = "127.0.0.1:8800"
DEFAULT_USER = "me"
DEFAULT_LIBRARY = "drive"


@dataclass(frozen=True)
class UpPaths:
    """Where `ferry up` keeps the server's data and the user's token (XDG dirs honoured)."""

    data_dir: Path
    token_file: Path
    server_log: Path
    server_pid: Path

    @classmethod
    def default(cls) -> UpPaths:
        home = Path.home()
        data_home = Path(os.environ.get("XDG_DATA_HOME") or home / ".local" / "share")
        config_home = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
        base = data_home / "ferry"
        return cls(
            data_dir=base / "server",
            token_file=config_home / "ferry" / "token",
            server_log=base / "server.log",
            server_pid=base / "server.pid",
        )


def server_answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/v1/capabilities", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def start_server(paths: UpPaths, listen: str, timeout: float = 30) -> None:
    """Start `ferry serve` detached from this terminal and wait until it answers."""
    url = f"http://{listen}"
    make_private_dir(paths.server_log.parent)
    with open(paths.server_log, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vfs", "serve", str(paths.data_dir), "--listen", listen],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    paths.server_pid.write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(
                f"ferry up: the server exited with status {proc.returncode}; see {paths.server_log}"
            )
        if server_answers(url):
            return
        time.sleep(0.1)
    raise SystemExit(
        f"ferry up: the server did not answer on {url} within {timeout:.0f}s; see {paths.server_log}"
    )


def ensure_account(paths: UpPaths) -> None:
    """Create the default user and library once, keeping the token in a 0600 file."""
    if paths.token_file.exists():
        return
    from remote.server import admin

    token = admin.add_user(paths.data_dir, DEFAULT_USER)
    admin.add_library(paths.data_dir, DEFAULT_LIBRARY, DEFAULT_USER)
    make_private_dir(paths.token_file.parent)
    fd = os.open(paths.token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    print(
        f"ferry up: created user {DEFAULT_USER!r} and library {DEFAULT_LIBRARY!r}; token in {paths.token_file}"
    )


def up_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="ferry up",
        description="Start a local server (if none runs) and mount its library, with no configuration.",
    )
    parser.add_argument("mountpoint", type=Path, help="where the drive appears, e.g. ~/Drive")
    parser.add_argument(
        "--listen", default=DEFAULT_LISTEN, help=f"server address (default {DEFAULT_LISTEN})"
    )
    parser.add_argument(
        "--foreground", action="store_true", help="keep the drive in the foreground"
    )
    parser.add_argument(
        "--allow-other", action="store_true", help="let other local users into the drive"
    )
    parser.add_argument(
        "--insecure-http",
        action="store_true",
        help="allow plain http:// when --listen is not a loopback address",
    )
    args = parser.parse_args(argv)

    paths = UpPaths.default()
    url = f"http://{args.listen}"
    make_private_dir(paths.data_dir)
    if server_answers(url):
        print(f"ferry up: using the server already answering on {url}")
        ensure_account(paths)
    else:
        start_server(paths, args.listen)
        print(
            f"ferry up: server running on {url} (data in {paths.data_dir}, log {paths.server_log})"
        )
        ensure_account(paths)

    args.mountpoint.mkdir(parents=True, exist_ok=True)
    from vfs.commands import mount_main

    mount_args = [
        f"{url}/{DEFAULT_LIBRARY}",
        str(args.mountpoint),
        "--token-file",
        str(paths.token_file),
    ]
    if args.foreground:
        mount_args.append("--foreground")
    if args.allow_other:
        mount_args.append("--allow-other")
    if args.insecure_http:
        mount_args.append("--insecure-http")
    status = mount_main(mount_args)
    if status == 0 and not args.foreground:
        print(
            f"ferry up: your drive is at {args.mountpoint}; `ferry status {args.mountpoint}` shows its state"
        )
    return status


def down_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="ferry down",
        description="Unmount a drive started by `ferry up` and stop its local server.",
    )
    parser.add_argument("mountpoint", type=Path)
    args = parser.parse_args(argv)
    from vfs.commands import unmount_main

    status = unmount_main([str(args.mountpoint)])
    paths = UpPaths.default()
    try:
        pid = int(paths.server_pid.read_text())
    except (FileNotFoundError, ValueError):
        print("ferry down: no server started by `ferry up` is recorded; left any server alone")
        return status
    try:
        os.kill(pid, signal.SIGTERM)
        print(f"ferry down: stopped the server (pid {pid})")
    except ProcessLookupError:
        print(f"ferry down: the server (pid {pid}) had already stopped")
    paths.server_pid.unlink(missing_ok=True)
    return status
