"""Test helpers: a real `ferry serve` process on 127.0.0.1 and admin calls against its store.

The server runs as a subprocess exactly as a user would start it, so protocol
and drive tests exercise the real HTTP stack. `kill()` is SIGKILL, for crash tests.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ferry(
    *args: str, check: bool = True, timeout: float = 60, **kwargs
) -> subprocess.CompletedProcess:
    """Run the `ferry` command line (as `python -m vfs`) and return the completed process."""
    proc = subprocess.run(
        [sys.executable, "-m", "vfs", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"ferry {' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


@dataclass
class ServerProcess:
    data_dir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    #: More `ferry serve` options (TLS, the auth-failure limit).
    args: tuple[str, ...] = ()
    scheme: str = "http"
    #: How the readiness probe verifies an https:// server (an `ssl.SSLContext` for a test CA).
    verify: Any = True

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20) -> None:
        self.log_path = self.data_dir.parent / f"server-{self.port}.log"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vfs",
                "serve",
                str(self.data_dir),
                "--listen",
                f"127.0.0.1:{self.port}",
                *self.args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"ferry serve exited {self.proc.returncode}:\n{self.log()}")
            try:
                answer = httpx.get(f"{self.url}/v1/capabilities", timeout=1, verify=self.verify)
                if answer.status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"ferry serve did not answer within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def stop(self) -> None:
        """Stop gracefully (SIGTERM), falling back to SIGKILL."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL the server, as a crash would."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def admin(self, *args: str) -> str:
        return ferry("admin", "--data", str(self.data_dir), *args).stdout

    def add_user(self, name: str) -> str:
        """Create a user and return its token (the last line `ferry admin add-user` prints)."""
        return self.admin("add-user", name).strip().splitlines()[-1].strip()


def wait_for(
    predicate: Callable[[], object], timeout: float = 15.0, what: str = "condition"
) -> None:
    """Poll `predicate` until it is true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout}s")


def drive_status(mountpoint: Path) -> dict:
    """`ferry status MOUNTPOINT --json`, parsed."""
    return json.loads(ferry("status", str(mountpoint), "--json").stdout)
