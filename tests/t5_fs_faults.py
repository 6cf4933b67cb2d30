"""Faults and the command line around the filesystem: a full cache disk, daemon mode, fstab."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.conftest import Library
from tests.support import ferry
from vfs.sync.control import ask

if TYPE_CHECKING:
    from tests.mounts import DriveFactory

pytest_plugins = ["tests.mounts"]
pytestmark = pytest.mark.mount


def running(pid: int) -> bool:
    """True if `pid` is alive and not a zombie (the daemon's parent exited; nobody may reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 48 MiB tmpfs, so that the cache disk can fill up."""
    disk = tmp_path / "small-disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_full_cache_disk_gives_enospc_and_loses_nothing(
    drive_factory: DriveFactory, small_disk: Path
) -> None:
    drive = drive_factory("a", extra_args=("--cache-size", str(8 << 20), "--writeback-delay", "30"))
    drive.cleanup()  # remount with the cache dir on the small disk
    drive.cache_dir = small_disk / "cache"
    drive.start()
    root = drive.mountpoint
    (root / "precious").write_bytes(b"p" * 100_000)
    block = os.urandom(1 << 20)
    with pytest.raises(OSError) as info:
        with open(root / "huge", "wb") as f:
            for _ in range(100):
                f.write(block)
                f.flush()
            os.fsync(f.fileno())
    assert info.value.errno == errno.ENOSPC
    assert (root / "precious").read_bytes() == b"p" * 100_000
    os.unlink(root / "huge")
    (root / "after").write_text("room again")
    assert (root / "after").read_text() == "room again"
    drive.unmount()
    drive.start()
    assert (root / "precious").read_bytes() == b"p" * 100_000
    assert sorted(os.listdir(root)) == ["after", "precious"]


def test_daemon_mount_and_unmount(library: Library, tmp_path: Path) -> None:
    mountpoint, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    mountpoint.mkdir()
    token_file = tmp_path / "token"
    token_file.write_text(library.token)
    try:
        ferry(
            "mount",
            library.url,
            str(mountpoint),
            "--token-file",
            str(token_file),
            "--cache-dir",
            str(cache_dir),
        )
        assert os.path.ismount(mountpoint), "ferry mount returns once the drive is usable"
        (mountpoint / "hello").write_text("daemon")
        pid = int(ask(mountpoint, {"cmd": "status"}, 10)["status"]["pid"])
        ferry("unmount", str(mountpoint))
        assert not os.path.ismount(mountpoint)
        assert not running(pid), "ferry unmount waits for the daemon to exit"
        assert "mounted" in (cache_dir / "mount.log").read_text()
        done = subprocess.run(
            [sys.executable, "-c", "from vfs.cli import mount_helper_main; mount_helper_main()",
             library.url, str(mountpoint), "-o", f"rw,token_file={token_file},cache_dir={cache_dir}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert (mountpoint / "hello").read_text() == "daemon"
        ferry("unmount", str(mountpoint))
    finally:
        subprocess.run(
            ["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True, check=False
        )


def test_daemon_mount_reports_why_it_failed(library: Library, tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    token_file = tmp_path / "token"
    token_file.write_text("not-a-valid-token")
    out = ferry(
        "mount",
        library.url,
        str(mountpoint),
        "--token-file",
        str(token_file),
        "--cache-dir",
        str(tmp_path / "cache"),
        check=False,
    )
    assert out.returncode != 0
    assert "refused" in out.stderr or "401" in out.stderr, out.stderr
    assert not os.path.ismount(mountpoint)
