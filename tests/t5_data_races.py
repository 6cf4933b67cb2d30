"""Bytes written while an upload runs are never lost or replaced by bytes nobody wrote.

Each test writes through a real mount with `--writeback-delay 0`, so the
uploader starts on the first journaled op -- usually the `create` of a file
that is still open and being written -- and then checks the invariant from
both ends: the mount reads back exactly what was written, and after the
writer closed and `ferry sync` returned the server holds exactly that too.

The races are made deterministic by waiting, with the file still open, until
the drive reports the create committed (revision > 0 in `ferry ls`): from that
moment the uploader has applied the server's answer, so whatever it did to
the working copy has happened before the test writes on.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

from cache.chunking import Chunker, to_refs
from remote import protocol
from remote.client import RemoteClient
from tests.conftest import Library
from tests.t5_twoway_support import server_tree
from vfs.sync.control import ask, file_states

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


def change_on_another_device(library: Library, path: str, data: bytes) -> None:
    """Commit new content for the file at `path` through the client API, as another device."""
    entry = server_tree(library)[path]

    async def commit() -> None:
        chunks = Chunker().cut(data)
        async with RemoteClient(library.server.url, library.name, library.token) as client:
            for chunk in chunks:
                await client.put_chunk(chunk.hash, data[chunk.offset : chunk.offset + chunk.length])
            op = protocol.op_update(entry.id, entry.revision, to_refs(chunks), time.time_ns())
            await client.commit(uuid.uuid4().hex, [op], device="elsewhere")

    trio.run(commit)


def revision(path: Path) -> int:
    known = file_states([path])[0]
    assert known is not None, f"{path} is not in the drive"
    return known[1]


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


def ferry_sync(drive: DriveProcess, timeout: float = 60) -> dict[str, object]:
    """`ferry sync` through the control socket from this process.

    Not a `ferry sync` child process: forking copies the writer's descriptor and
    closing the copy sends the kernel's FLUSH, which journals the unflushed bytes
    these tests need to keep unflushed.
    """
    return ask(drive.mountpoint, {"cmd": "sync", "timeout": timeout}, timeout + 15)


@contextmanager
def syncing(drive: DriveProcess) -> Iterator[None]:
    """Run `ferry sync` over and over in the background (a user impatient for the upload)."""
    stop = threading.Event()
    failures: list[object] = []

    def loop() -> None:
        while not stop.is_set():
            answer = ferry_sync(drive, 30)
            if not answer.get("ok"):
                failures.append(answer)

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


def test_a_conflict_met_while_the_file_is_being_written_keeps_every_byte_in_the_copy(
    drive_factory: DriveFactory, library: Library
) -> None:
    """Another device changed the file; here it is still open and written when the upload
    meets the conflict. Theirs keeps the name; the copy holds all we wrote, later bytes too."""
    drive = drive_factory("a", extra_args=("--writeback-delay", "3"))
    path = drive.mountpoint / "notes.bin"
    mine = bytearray(os.urandom(200_000))
    path.write_bytes(mine)
    drive.sync()
    theirs = os.urandom(150_000)
    fd = os.open(path, os.O_RDWR)
    answers: list[dict[str, object]] = []
    sync = threading.Thread(target=lambda: answers.append(ferry_sync(drive)), daemon=True)
    try:
        for offset, size, flush in [(0, 1000, True), (50_000, 3000, False)]:
            piece = os.urandom(size)
            os.pwrite(fd, piece, offset)
            mine[offset : offset + size] = piece
            if flush:  # journaled: waits out the write-back delay, long enough for theirs
                os.fsync(fd)
                change_on_another_device(library, "notes.bin", theirs)
        sync.start()
        # The upload meets the conflict now. Give a wrong resolution time to show.
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and not any(
            "conflict" in name for name in os.listdir(drive.mountpoint)
        ):
            time.sleep(0.05)
        piece = os.urandom(7000)
        os.pwrite(fd, piece, 196_000)
        mine[196_000:] = piece
    finally:
        os.close(fd)
        if sync.is_alive() or answers:
            sync.join(90)
    assert answers and answers[0].get("ok"), answers
    drive.sync()
    on_server = server_tree(library)
    copies = [name for name in on_server if name.startswith("notes (conflict")]
    assert len(copies) == 1, sorted(on_server)
    assert_same(server_content(library, "notes.bin"), theirs, "theirs on the server")
    assert_same(server_content(library, copies[0]), bytes(mine), "the conflict copy on the server")
    assert_same(path.read_bytes(), theirs, "theirs on the mount")
    assert_same((drive.mountpoint / copies[0]).read_bytes(), bytes(mine), "the copy on the mount")
