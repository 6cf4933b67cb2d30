"""Two devices (two mounts, own cache dirs) see each other's filesystem operations after `ferry sync`."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.mounts import DriveFactory

pytest_plugins = ["tests.mounts"]
pytestmark = pytest.mark.mount


def snapshot(root: Path) -> dict[str, tuple]:
    """Everything a user can observe of a tree: kind, mode, mtime, size, content or target."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_mtime_ns, path.read_bytes())
    return out


def test_every_operation_reaches_the_other_device(drive_factory: DriveFactory) -> None:
    a, b = drive_factory("a"), drive_factory("b")
    ra, rb = a.mountpoint, b.mountpoint
    (ra / "docs" / "old").mkdir(parents=True)
    (ra / "docs" / "report.txt").write_bytes(os.urandom(3_000_000))
    (ra / "docs" / "notes.txt").write_text("draft")
    (ra / "docs" / "notes.tmp").write_text("final")
    os.rename(ra / "docs" / "notes.tmp", ra / "docs" / "notes.txt")  # atomic save
    os.symlink("docs/notes.txt", ra / "latest")
    os.chmod(ra / "docs" / "report.txt", 0o600)
    os.utime(ra / "docs" / "notes.txt", ns=(1, 1_234_567_890_123_456_789))
    fd = os.open(ra / "sparse", os.O_CREAT | os.O_WRONLY, 0o644)
    os.pwrite(fd, b"end", 2_000_000)
    os.close(fd)
    (ra / "gone").write_text("x")
    os.unlink(ra / "gone")
    os.rename(ra / "docs" / "old", ra / "archive")
    a.sync()
    b.sync()
    assert snapshot(rb) == snapshot(ra)
    assert (rb / "docs" / "notes.txt").read_text() == "final"

    with open(rb / "docs" / "report.txt", "r+b") as f:  # a small edit inside a big file
        f.seek(1_000_000)
        f.write(b"EDITED")
    os.truncate(rb / "sparse", 10)
    os.rename(rb / "archive", rb / "docs" / "archive")
    os.rmdir(rb / "docs" / "archive")
    os.unlink(rb / "latest")
    b.sync()
    a.sync()
    assert snapshot(ra) == snapshot(rb)
    assert (ra / "docs" / "report.txt").read_bytes()[1_000_000:1_000_006] == b"EDITED"
    assert sorted(os.listdir(ra)) == ["docs", "sparse"]


def test_open_reader_keeps_its_version_while_another_device_replaces_the_file(
    drive_factory: DriveFactory,
) -> None:
    a, b = drive_factory("a"), drive_factory("b")
    (a.mountpoint / "doc").write_bytes(b"one" * 100_000)
    a.sync()
    b.sync()
    with open(b.mountpoint / "doc", "rb") as reader:
        assert reader.read(3) == b"one"
        (a.mountpoint / "doc").write_bytes(b"two" * 200_000)
        a.sync()
        b.sync()
        assert reader.read() == (b"one" * 100_000)[3:], "an open handle keeps the version it opened"
    assert (b.mountpoint / "doc").read_bytes() == b"two" * 200_000, "new opens see the new version"


def test_edits_on_top_of_server_content(drive_factory: DriveFactory) -> None:
    """Partial writes and truncations of a synced file mix local bytes with server chunks."""
    a = drive_factory("a")
    path = a.mountpoint / "big"
    expected = bytearray(os.urandom(3_000_000))
    path.write_bytes(expected)
    a.sync()
    with open(path, "r+b") as f:
        f.seek(1_500_000)
        f.write(b"middle")
    expected[1_500_000:1_500_006] = b"middle"
    os.truncate(path, 2_000_000)
    os.truncate(path, 2_500_000)
    del expected[2_000_000:]
    expected += b"\0" * 500_000
    assert path.read_bytes() == expected
    a.unmount()
    a.start()
    assert path.read_bytes() == expected
    a.sync()
    b = drive_factory("b")
    b.sync()
    assert (b.mountpoint / "big").read_bytes() == expected


def test_file_held_open_here_follows_a_newer_version_from_another_device(
    drive_factory: DriveFactory,
) -> None:
    a, b = drive_factory("a"), drive_factory("b")
    with open(a.mountpoint / "shared", "w+b") as held:
        held.write(b"from a")
        held.flush()
        os.fsync(held.fileno())
        a.sync()
        b.sync()
        assert (b.mountpoint / "shared").read_bytes() == b"from a"
        (b.mountpoint / "shared").write_bytes(b"from b, longer")
        b.sync()
        a.sync()
        assert (a.mountpoint / "shared").read_bytes() == b"from b, longer"
        assert os.pread(held.fileno(), 100, 0) == b"from b, longer"
