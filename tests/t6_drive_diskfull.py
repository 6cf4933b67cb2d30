"""The drive's cache disk fills up while it has work to do, then gets room back without a remount.

`tests/t5_fs_faults.py` checks that a writer on a full cache disk gets ENOSPC
and that closed data survives a remount. This goes further, on one mounted
drive whose cache directory lives on a small tmpfs that a ballast file fills:

- files closed before the disk filled, not yet uploaded, still reach the
  server while the disk is full (`ferry sync` succeeds);
- files whose content is cached read back right while the disk is full;
- a writer gets ENOSPC, and the bytes of that file never reach the server
  half-done: every version the server holds of it is a state the file had
  at a close here;
- when room returns (the tmpfs grows with `mount -o remount,size=`, or the
  ballast shrinks) the same mount takes writes again, and after `ferry sync`
  the server has exactly the drive's tree.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support import drive_status
from tests.t5_twoway_random import server_view, settle
from tests.t5_twoway_support import server_tree, versions

if TYPE_CHECKING:
    from tests.conftest import Library
    from tests.mounts import DriveFactory

pytest_plugins = ["tests.mounts"]
pytestmark = pytest.mark.mount

DISK_MIB = 48
BLOCK = 1 << 20


@pytest.fixture
def cache_disk(tmp_path: Path) -> Iterator[Path]:
    """A small tmpfs; device `a`'s cache dir (tmp/a-cache) is a link to a directory on it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_MIB}m", "tmpfs", str(disk)], check=True
    )
    try:
        (disk / "cache").mkdir()
        (tmp_path / "a-cache").symlink_to(disk / "cache")
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Write a ballast file on `disk` until it is full, then free `leave` bytes; return its path."""
    ballast = disk / "ballast"
    block = b"\0" * BLOCK
    with open(ballast, "wb") as f:
        try:
            while True:
                f.write(block)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    # The buffered tail that did not fit is dropped; fill the last bytes one page at a time.
    with open(ballast, "ab", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    assert os.statvfs(disk).f_bavail == 0
    os.truncate(ballast, ballast.stat().st_size - leave)
    return ballast


def write_until_full(path: Path, blocks: list[bytes]) -> list[int]:
    """Write `blocks` to `path` until ENOSPC; return the sizes at which the file was closed."""
    closed = []
    try:
        with open(path, "wb") as f:
            for block in blocks:
                f.write(block)
                f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, f"writing {path.name} on a full disk: {exc!r}"
    else:
        raise AssertionError(f"{len(blocks)} MiB fitted on a full cache disk")
    closed.append(path.stat().st_size)
    return closed


def test_full_cache_disk_keeps_uploading_serves_cached_reads_and_recovers_in_place(
    drive_factory: DriveFactory, library: Library, cache_disk: Path
) -> None:
    drive = drive_factory("a", extra_args=("--cache-size", str(8 << 20), "--writeback-delay", "30"))
    root = drive.mountpoint
    started = time.monotonic()

    def stage(what: str) -> None:
        print(f"{time.monotonic() - started:6.1f} s  {what}")

    cached = os.urandom(3 * BLOCK + 5)
    (root / "cached.bin").write_bytes(cached)
    drive.sync()
    assert (root / "cached.bin").read_bytes() == cached
    closed = {f"closed-{n}.bin": os.urandom(200_000 + n) for n in range(4)}
    for name, data in closed.items():
        (root / name).write_bytes(data)
    assert drive_status(root)["pending_ops"] > 0, "closed files should wait to upload"
    stage("closed files written")
    ballast = fill(cache_disk, leave=6 * BLOCK)
    stage("disk filled")

    # While the disk is full: reads of cached content, then uploads of closed files.
    assert (root / "cached.bin").read_bytes() == cached
    blocks = [os.urandom(BLOCK) for _ in range(16)]
    stream = b"".join(blocks)
    sizes = write_until_full(root / "huge.bin", blocks)
    stage(f"huge.bin stopped at {sizes[0]} B")
    drive.sync(timeout=60)
    stage("synced while full")
    on_server = server_view(library)
    for name in closed:
        assert name in on_server, f"{name} (closed before the disk filled) not uploaded"
    assert (root / "cached.bin").read_bytes() == cached

    # Room comes back without a remount: the tmpfs grows, then the ballast goes.
    subprocess.run(["mount", "-o", f"remount,size={DISK_MIB * 2}m", str(cache_disk)], check=True)
    more = os.urandom(5 * BLOCK)
    (root / "after-grow.bin").write_bytes(more)
    ballast.unlink()
    (root / "after-ballast.bin").write_bytes(more[::-1])
    with open(root / "huge.bin", "ab") as f:
        f.write(b"tail")
    sizes.append(sizes[-1] + 4)
    stage("written after room returned")
    final = settle([drive], library)
    stage("settled")

    # Everything reached the server; huge.bin only ever as it was at a close.
    local = {p: v for p, v in final.items()}
    assert local["after-grow.bin"][2] == len(more)
    assert local["huge.bin"][2] == sizes[-1]
    assert (root / "huge.bin").read_bytes() == stream[: sizes[0]] + b"tail"
    entry = server_tree(library)["huge.bin"]
    for version in versions(library, entry.id):
        assert version.size in sizes, (
            f"the server holds huge.bin at {version.size} B, never a closed size ({sizes})"
        )
    print(
        f"full disk: huge.bin stopped at {sizes[0]} B of {len(stream)}; "
        f"{len(closed)} closed files uploaded while full; {len(final)} entries on the server"
    )
