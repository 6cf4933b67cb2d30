"""Real drive mounts for tests: `ferry mount --foreground` subprocesses that always get cleaned up.

`mount_drive` starts the drive exactly as a user would (so a test can
SIGKILL it) and returns once the mountpoint answers. The `drive` and
`drive_factory` fixtures unmount every drive they made, even when the test
failed, falling back to SIGKILL and `fusermount3 -u -z`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import Library
from tests.support import ferry


@dataclass
class DriveProcess:
    """One running `ferry mount` of a library on `mountpoint`, with its own cache dir (a device)."""

    url: str
    mountpoint: Path
    cache_dir: Path
    token_file: Path
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    def start(self, timeout: float = 30) -> None:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        if self.log_path is None:
            self.log_path = self.cache_dir.parent / f"{self.cache_dir.name}.log"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vfs",
                "mount",
                self.url,
                str(self.mountpoint),
                "--token-file",
                str(self.token_file),
                "--cache-dir",
                str(self.cache_dir),
                "--foreground",
                *self.extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"ferry mount exited {self.proc.returncode}:\n{self.log()}")
            if os.path.ismount(self.mountpoint):
                try:
                    os.readlink(self.mountpoint / ".ferry" / "control")
                    return
                except OSError:
                    pass
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"the drive did not come up within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def unmount(self, timeout: float = 60) -> None:
        """`ferry unmount` (clean: the daemon exits by itself)."""
        if self.proc is None:
            return
        ferry("unmount", str(self.mountpoint), timeout=timeout)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the drive did not exit after unmount:\n{self.log()}") from None
        code, self.proc = self.proc.returncode, None
        assert code == 0, f"the drive exited {code}:\n{self.log()}"

    def kill(self) -> None:
        """SIGKILL the drive, as a crash would, and clear the stale mount it leaves."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None
        subprocess.run(
            ["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True, check=False
        )

    def cleanup(self) -> None:
        """Whatever state the test left: unmount if possible, else kill; never leave a mount."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                subprocess.run(
                    ["fusermount3", "-u", str(self.mountpoint)], capture_output=True, timeout=10
                )
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def sync(self, timeout: float = 60) -> subprocess.CompletedProcess:
        return ferry("sync", str(self.mountpoint), "--timeout", str(timeout), timeout=timeout + 10)


def mount_drive(
    library: Library,
    mountpoint: Path,
    cache_dir: Path,
    *,
    foreground_process: bool = True,
    token: str | None = None,
    extra_args: tuple[str, ...] = ("--writeback-delay", "0.2"),
    server_url: str | None = None,
) -> DriveProcess:
    """Mount `library` on `mountpoint` with its own `cache_dir`; returns once it answers.

    `server_url` reaches the server another way (a fault proxy's URL)."""
    assert foreground_process, "tests always run the drive as a foreground subprocess"
    token_file = cache_dir.parent / f"{cache_dir.name}.token"
    token_file.parent.mkdir(parents=True, exist_ok=True)
    token_file.write_text((token or library.token) + "\n")
    url = f"{server_url}/{library.name}" if server_url else library.url
    drive = DriveProcess(url, mountpoint, cache_dir, token_file, extra_args=extra_args)
    drive.start()
    return drive


DriveFactory = Callable[..., DriveProcess]


@pytest.fixture
def drive_factory(library: Library, tmp_path: Path) -> Iterator[DriveFactory]:
    """Mount more devices: `drive_factory("b")` mounts on tmp/b-mnt with cache tmp/b-cache."""
    made: list[DriveProcess] = []

    def make(name: str = "a", *, token: str | None = None, **kwargs: object) -> DriveProcess:
        drive = mount_drive(
            library, tmp_path / f"{name}-mnt", tmp_path / f"{name}-cache", token=token, **kwargs
        )
        made.append(drive)
        return drive

    try:
        yield make
    finally:
        for drive in made:
            drive.cleanup()


@pytest.fixture
def drive(drive_factory: DriveFactory) -> DriveProcess:
    """One mounted device of the `library` fixture."""
    return drive_factory("a")
