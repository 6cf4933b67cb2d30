"""`ferry up` / `ferry down`: the README's first command, run as a newcomer would.

HOME points at a temporary directory so the default XDG paths are the test's
own; the server listens on a free port. The drive is unmounted and the server
stopped even when an assertion fails.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx

from tests.support import ferry, free_port


def _environment(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    env["HOME"] = str(home)
    return env


def _force_cleanup(mountpoint: Path, home: Path) -> None:
    if os.path.ismount(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
    pid_file = home / ".local/share/ferry/server.pid"
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text()), 9)
        except (ProcessLookupError, ValueError):
            pass


def test_up_gives_a_working_drive_and_down_stops_it(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = _environment(home)
    mountpoint = home / "Drive"
    listen = f"127.0.0.1:{free_port()}"
    try:
        out = ferry("up", str(mountpoint), "--listen", listen, env=env).stdout
        assert "server running" in out and "your drive is at" in out
        token_file = home / ".config/ferry/token"
        assert token_file.stat().st_mode & 0o777 == 0o600

        (mountpoint / "notes.txt").write_text("written through ferry up\n")
        ferry("sync", str(mountpoint), "--timeout", "30", env=env)

        # The content is on the server, read back through the protocol with the saved token.
        token = token_file.read_text().strip()
        headers = {"Authorization": f"Bearer {token}"}
        feed = httpx.get(
            f"http://{listen}/v1/libraries/drive/changes", params={"cursor": 0}, headers=headers
        ).json()
        assert "notes.txt" in {e["name"] for e in feed["entries"] if not e["deleted"]}

        # Running `up` again reuses the server, the account and the data.
        ferry("down", str(mountpoint), env=env)
        assert not os.path.ismount(mountpoint)
        out = ferry("up", str(mountpoint), "--listen", listen, env=env).stdout
        assert "created user" not in out
        assert (mountpoint / "notes.txt").read_text() == "written through ferry up\n"
    finally:
        try:
            ferry("down", str(mountpoint), env=env, check=False)
        finally:
            _force_cleanup(mountpoint, home)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://{listen}/v1/capabilities", timeout=1)
        except httpx.TransportError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("ferry down left the server running")
