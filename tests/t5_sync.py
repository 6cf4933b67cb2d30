"""Real mounts against a real server: uploads, pulls, `ferry sync`/`status`, offline, conflicts.

Every test mounts one library on two or more devices (each its own cache
dir) and checks convergence by comparing whole trees: names, kinds, sizes,
modes and content hashes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support import drive_status, ferry, wait_for

if TYPE_CHECKING:
    from tests.mounts import DriveFactory, DriveProcess

pytest_plugins = ["tests.mounts"]

pytestmark = pytest.mark.mount


def tree(root: Path) -> dict[str, tuple]:
    """Every entry under `root`: kind, mode, size and content hash (files) or target (symlinks)."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = path.lstat()
            if path.is_symlink():
                out[rel] = ("symlink", os.readlink(path))
            elif path.is_dir():
                out[rel] = ("dir", st.st_mode & 0o7777)
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                out[rel] = ("file", st.st_mode & 0o7777, st.st_size, digest)
    return out


def status(drive: DriveProcess) -> dict:
    return drive_status(drive.mountpoint)


def populate(root: Path) -> None:
    (root / "docs" / "deep").mkdir(parents=True)
    (root / "docs" / "a.txt").write_text("hello from a\n")
    (root / "docs" / "deep" / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (root / "link").symlink_to("docs/a.txt")
    script = root / "run.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o755)


def test_changes_on_one_device_reach_another_after_sync(drive_factory: DriveFactory):
    a, b = drive_factory("a"), drive_factory("b")
    populate(a.mountpoint)
    a.sync()
    assert status(a)["pending_ops"] == 0
    b.sync()
    assert tree(b.mountpoint) == tree(a.mountpoint)

    (a.mountpoint / "docs" / "a.txt").write_text("edited on a\n")
    os.rename(a.mountpoint / "docs" / "deep", a.mountpoint / "moved")
    (a.mountpoint / "run.sh").unlink()
    a.sync()
    b.sync()
    assert tree(b.mountpoint) == tree(a.mountpoint)
    assert (b.mountpoint / "docs" / "a.txt").read_text() == "edited on a\n"


def test_remote_changes_appear_without_any_command(drive_factory: DriveFactory):
    a, b = drive_factory("a"), drive_factory("b")
    (a.mountpoint / "note.txt").write_text("one")
    target = b.mountpoint / "note.txt"
    wait_for(lambda: target.exists() and target.read_text() == "one", 2, "create on b")
    (a.mountpoint / "note.txt").write_text("two, longer")
    wait_for(lambda: target.read_text() == "two, longer", 2, "edit on b")
    os.rename(a.mountpoint / "note.txt", a.mountpoint / "renamed.txt")
    wait_for(lambda: (b.mountpoint / "renamed.txt").exists() and not target.exists(), 2, "rename")
    (a.mountpoint / "renamed.txt").unlink()
    wait_for(lambda: not (b.mountpoint / "renamed.txt").exists(), 2, "delete on b")


def test_offline_writes_converge_when_the_server_returns(drive_factory: DriveFactory, library):
    a, b = drive_factory("a"), drive_factory("b")
    (a.mountpoint / "keep.txt").write_text("before")
    a.sync()
    library.server.stop()
    (a.mountpoint / "offline").mkdir()
    (a.mountpoint / "offline" / "new.txt").write_text("written offline")
    (a.mountpoint / "keep.txt").write_text("changed offline")
    wait_for(lambda: not status(a)["online"], 15, "a notices it is offline")
    assert status(a)["pending_ops"] > 0
    failed = ferry("sync", str(a.mountpoint), "--timeout", "2", check=False)
    assert failed.returncode != 0 and "not in sync" in failed.stderr
    library.server.start()
    a.sync(timeout=60)
    b.sync(timeout=60)
    assert tree(b.mountpoint) == tree(a.mountpoint)
    assert (b.mountpoint / "keep.txt").read_text() == "changed offline"


def test_an_uploaded_file_is_in_the_cache_when_sync_returns_and_reads_offline(
    drive_factory: DriveFactory, library
):
    """The uploader caches new chunks from tasks beside the cutting; the commit waits for them.

    40 MiB is a few 16 MiB cutting stretches and more chunks than the cache queue holds.
    """
    a = drive_factory("a")
    data = os.urandom(40 * 1024 * 1024 + 5)
    (a.mountpoint / "fresh.bin").write_bytes(data)
    a.sync()
    cache = status(a)["cache"]
    assert cache["size"] >= len(data) and cache["chunks"] >= 20, cache
    assert cache["pinned_bytes"] == 0, cache
    library.server.stop()
    wait_for(lambda: not status(a)["online"], 15, "a notices it is offline")
    with open(a.mountpoint / "fresh.bin", "rb") as f:  # not from the kernel's page cache
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    assert (a.mountpoint / "fresh.bin").read_bytes() == data


def test_both_devices_edit_one_file_offline_make_one_conflict_copy(
    drive_factory: DriveFactory, library
):
    a, b = drive_factory("a"), drive_factory("b")
    (a.mountpoint / "report.txt").write_text("base")
    a.sync()
    b.sync()
    library.server.stop()
    (a.mountpoint / "report.txt").write_text("version from a")
    (b.mountpoint / "report.txt").write_text("version from b")
    library.server.start()
    a.sync(timeout=60)
    b.sync(timeout=60)
    a.sync(timeout=60)
    names = sorted(os.listdir(b.mountpoint))
    assert len(names) == 2, names
    copy = [n for n in names if n != "report.txt"][0]
    assert copy.startswith("report (conflict from ") and copy.endswith(").txt")
    contents = {(b.mountpoint / n).read_text() for n in names}
    # Whichever device committed first keeps the name; the other's version is the copy.
    assert contents == {"version from a", "version from b"}, contents
    assert tree(a.mountpoint) == tree(b.mountpoint)
    assert len(status(a)["conflicts"]) + len(status(b)["conflicts"]) == 1


def test_delete_versus_edit_keeps_the_edit(drive_factory: DriveFactory, library):
    a, b = drive_factory("a"), drive_factory("b")
    (a.mountpoint / "precious.txt").write_text("v1")
    a.sync()
    b.sync()
    library.server.stop()
    (a.mountpoint / "precious.txt").unlink()
    (b.mountpoint / "precious.txt").write_text("v2 edited")
    library.server.start()
    b.sync(timeout=60)
    a.sync(timeout=60)
    b.sync(timeout=60)
    assert (a.mountpoint / "precious.txt").read_text() == "v2 edited"
    assert tree(a.mountpoint) == tree(b.mountpoint)


def test_kill_before_upload_then_remount_uploads_all_200_files(
    drive_factory: DriveFactory, tmp_path: Path
):
    a = drive_factory("a", extra_args=("--writeback-delay", "30"))
    expected = {}
    for i in range(200):
        data = f"file {i}\n".encode() * (i + 1)
        (a.mountpoint / f"f{i:03}.txt").write_bytes(data)
        expected[f"f{i:03}.txt"] = data
    assert status(a)["pending_ops"] >= 200
    a.kill()
    a.start()
    a.sync(timeout=120)
    b = drive_factory("b")
    b.sync()
    got = {p.name: p.read_bytes() for p in b.mountpoint.iterdir()}
    assert got == expected


@pytest.mark.parametrize("written_here", [True, False], ids=["written-here", "fetched"])
def test_an_open_reader_keeps_one_version_across_a_remote_edit(
    drive_factory: DriveFactory, written_here: bool
):
    """A handle opened before another device's edit reads the version it opened, to the end
    (never the first half of one version and the rest of the other), whether the file was
    written here (a working copy is open) or only fetched."""
    a, b = drive_factory("a"), drive_factory("b")
    old, new = os.urandom(3 << 20), os.urandom(3 << 20)
    reader_side, writer = a, b
    creator = reader_side if written_here else writer
    (creator.mountpoint / "doc.bin").write_bytes(old)
    creator.sync()
    for device in (a, b):
        device.sync()
        assert (device.mountpoint / "doc.bin").read_bytes() == old
    with open(reader_side.mountpoint / "doc.bin", "rb", buffering=0) as handle:
        assert handle.read(1 << 20) == old[: 1 << 20]
        (writer.mountpoint / "doc.bin").write_bytes(new)
        writer.sync()
        wait_for(
            lambda: (reader_side.mountpoint / "doc.bin").read_bytes() == new,
            10,
            "the edit reaches the reading device",
        )
        rest = handle.read()
    assert rest == old[1 << 20 :]


def test_synced_files_leave_no_working_copy_behind(drive_factory: DriveFactory):
    """A file's working copy goes once its content is on the server: a written file's, and
    the empty one a create starts for a file that was never written."""
    a, b = drive_factory("a"), drive_factory("b")
    (a.mountpoint / "empty.txt").touch()
    (a.mountpoint / "full.txt").write_text("bytes")
    a.sync()
    work = a.cache_dir / "work"
    wait_for(lambda: not any(work.iterdir()), 5, "working copies dropped after the upload")
    b.sync()
    assert (b.mountpoint / "empty.txt").read_bytes() == b""
    assert (b.mountpoint / "full.txt").read_text() == "bytes"
