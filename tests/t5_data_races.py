"""Bytes written while an upload runs are never lost or replaced by bytes nobody wrote.

Each test writes through a real mount with `--writeback-delay 0`, so the
uploader starts on the first journaled op -- usually the `create` of a file
that is still open and being written -- and then checks the invariant from
both ends: the mount reads back exactly what was written, and after the
writer closed and `ferry sync` returned the server holds exactly that too.

The races are made deterministic by waiting, with the file still open, until
the drive reports the create committed (`user.ferry.revision` > 0): from that
moment the uploader has applied the server's answer, so whatever it did to
the working copy has happened before the test writes on.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

from remote.client import RemoteClient
from tests.conftest import Library
from tests.t5_twoway_support import server_tree

if TYPE_CHECKING:
    from tests.mounts import DriveFactory, DriveProcess

pytest_plugins = ["tests.mounts"]
pytestmark = pytest.mark.mount

EAGER = ("--writeback-delay", "0")


def server_content(library: Library, path: str) -> bytes:
    """The bytes the server holds for the file at `path` (relative to the library root)."""
    entry = server_tree(library)[path]
    assert entry.manifest is not None or entry.size == 0, entry

    async def fetch() -> bytes:
        if entry.manifest is None:
            return b""
        async with RemoteClient(library.server.url, library.name, library.token) as client:
            chunks = await client.get_manifest(entry.manifest)
            return b"".join(await client.get_chunks([c.hash for c in chunks]))

    data = trio.run(fetch)
    assert len(data) == entry.size, (path, len(data), entry.size)
    return data


def revision(path: Path) -> int:
    return int(os.getxattr(path, "user.ferry.revision"))


def wait_committed(path: Path, timeout: float = 20.0) -> None:
    """Return once the server has acknowledged the file's create (the file may be open)."""
    deadline = time.monotonic() + timeout
    while revision(path) == 0:
        if time.monotonic() > deadline:
            raise AssertionError(f"{path.name} was not uploaded within {timeout}s")
        time.sleep(0.02)


def first_difference(got: bytes, want: bytes) -> str:
    """A short description of where two contents part (assert messages of MiBs help nobody)."""
    if len(got) != len(want):
        return f"length {len(got)} != {len(want)}"
    at = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
    zeros = got[at : at + 4096] == bytes(len(got[at : at + 4096]))
    return f"first difference at byte {at}{' (zeros where data was written)' if zeros else ''}"


def assert_same(got: bytes, want: bytes, where: str) -> None:
    assert got == want, f"{where}: {first_difference(got, want)}"


@contextmanager
def syncing(drive: DriveProcess) -> Iterator[None]:
    """Run `ferry sync` over and over in the background (a user impatient for the upload)."""
    stop = threading.Event()
    failures: list[str] = []

    def loop() -> None:
        while not stop.is_set():
            done = subprocess.run(
                [sys.executable, "-m", "vfs", "sync", str(drive.mountpoint), "--timeout", "30"],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            if done.returncode != 0:
                failures.append(done.stderr)

    thread = threading.Thread(target=loop, name="ferry-sync-loop", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(90)
    assert not failures, failures[0]


def test_writes_to_a_file_whose_create_committed_while_open_are_kept(
    drive_factory: DriveFactory, library: Library
) -> None:
    """The fuzzer's data loss: a sparse write, the create uploads, more writes; all kept."""
    drive = drive_factory("a", extra_args=EAGER)
    path = drive.mountpoint / "c"
    head, tail = os.urandom(1921), os.urandom(70_000)
    want = bytes(102_423) + head + bytes(5000) + tail
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        assert os.pwrite(fd, head, 102_423) == len(head)
        wait_committed(path)
        assert os.pwrite(fd, tail, len(want) - len(tail)) == len(tail)
    finally:
        os.close(fd)
    assert_same(path.read_bytes(), want, "the mount")
    drive.sync()
    assert_same(server_content(library, "c"), want, "the server")
    assert_same(path.read_bytes(), want, "the mount after sync")


def test_a_file_closed_right_after_its_create_committed_keeps_its_bytes(
    drive_factory: DriveFactory, library: Library
) -> None:
    """tar's pattern: create, write, the create uploads, close, set the mtime."""
    drive = drive_factory("a", extra_args=EAGER)
    path = drive.mountpoint / "data.bin"
    want = os.urandom(3 * 1024 * 1024 + 17)
    with open(path, "wb") as f:
        f.write(want)
        f.flush()  # to the drive, but not closed: nothing journaled beyond the create
        wait_committed(path)
    os.utime(path, ns=(10**18, 10**18))
    assert_same(path.read_bytes(), want, "the mount")
    drive.sync()
    assert_same(server_content(library, "data.bin"), want, "the server")


def test_a_large_file_written_slowly_while_ferry_sync_loops_reaches_the_server_intact(
    drive_factory: DriveFactory, library: Library
) -> None:
    """The delta engineer's report: a slow writer, uploads starting mid-write, holes never sent."""
    drive = drive_factory("a", extra_args=EAGER)
    path = drive.mountpoint / "big.bin"
    piece = 256 * 1024
    want = os.urandom(24 * 1024 * 1024)
    with syncing(drive):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            for offset in range(0, len(want), piece):
                os.pwrite(fd, want[offset : offset + piece], offset)
                if offset == 4 * piece:
                    wait_committed(path)  # at least one upload began mid-write
                if offset and offset % (32 * piece) == 0:
                    os.fsync(fd)  # journaled writes mid-stream, uploads of partial content
                time.sleep(0.002)
        finally:
            os.close(fd)
    drive.sync()
    assert_same(server_content(library, "big.bin"), want, "the server")
    assert_same(path.read_bytes(), want, "the mount")
