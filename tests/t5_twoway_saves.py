"""Atomic saves through a real mount: editors' save sequences continue one file's history.

Each test saves a file several times the way an editor does and then asks
the server: exactly one live entry at the name, the same id as before the
first save, a version list that grew by one per save, and the last content
on a second device.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.t5_sync import status, tree
from tests.t5_twoway_support import server_tree, versions

if TYPE_CHECKING:
    from tests.conftest import Library
    from tests.mounts import DriveFactory

pytest_plugins = ["tests.mounts"]

pytestmark = pytest.mark.mount


def save_vim_style(path: Path, data: bytes) -> None:
    """Write a temp file beside the original, fsync, rename it over the original."""
    tmp = path.with_name(f".{path.name}.swp-new")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, path.stat().st_mode & 0o7777)
    os.rename(tmp, path)


def save_backup_style(path: Path, data: bytes) -> None:
    """Move the original to name~, write a new file at the name, delete name~ (LibreOffice, vim's
    backupcopy=no)."""
    backup = path.with_name(path.name + "~")
    os.rename(path, backup)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, backup.stat().st_mode & 0o7777)
    backup.unlink()


@pytest.mark.parametrize("save", [save_vim_style, save_backup_style], ids=["vim", "backup"])
def test_each_save_is_a_new_version_of_the_same_entry(
    drive_factory: DriveFactory, library: Library, save
):
    a = drive_factory("a")
    doc = a.mountpoint / "notes" / "plan.txt"
    doc.parent.mkdir()
    doc.write_bytes(b"first draft\n")
    a.sync()
    entry_id = server_tree(library)["notes/plan.txt"].id
    assert len(versions(library, entry_id)) == 1

    for i in range(3):
        save(doc, f"draft {i + 2}\n".encode() * (i + 2))
        a.sync()
        entries = server_tree(library)
        assert sorted(entries) == ["", "notes", "notes/plan.txt"], sorted(entries)
        assert entries["notes/plan.txt"].id == entry_id
        assert len(versions(library, entry_id)) == i + 2
    assert doc.read_bytes() == b"draft 4\n" * 4
    assert status(a)["pending_ops"] == 0

    b = drive_factory("b")
    b.sync()
    assert tree(b.mountpoint) == tree(a.mountpoint)
    assert os.listdir(a.mountpoint / "notes") == ["plan.txt"]


def test_quick_saves_within_the_writeback_delay_fold_into_one_version(
    drive_factory: DriveFactory, library: Library
):
    a = drive_factory("a", extra_args=("--writeback-delay", "3"))
    doc = a.mountpoint / "quick.txt"
    doc.write_bytes(b"v1")
    a.sync()
    entry_id = server_tree(library)["quick.txt"].id
    save_vim_style(doc, b"v2")
    save_backup_style(doc, b"v3, longer")
    save_vim_style(doc, b"v4")
    assert doc.read_bytes() == b"v4"
    a.sync()
    entries = server_tree(library)
    assert sorted(entries) == ["", "quick.txt"]
    assert entries["quick.txt"].id == entry_id
    assert [v.size for v in versions(library, entry_id)] == [2, 2]


def test_a_reader_of_the_replaced_file_keeps_the_old_content(
    drive_factory: DriveFactory, library: Library
):
    a = drive_factory("a")
    doc = a.mountpoint / "open.txt"
    doc.write_bytes(b"old content " * 1000)
    a.sync()
    with open(doc, "rb") as reader:
        assert reader.read(4) == b"old "
        save_vim_style(doc, b"new content")
        assert reader.read() == (b"old content " * 1000)[4:]
    assert doc.read_bytes() == b"new content"
    a.sync()
    entry_id = server_tree(library)["open.txt"].id
    assert len(versions(library, entry_id)) == 2


def test_saved_content_survives_a_kill_right_after_the_save(
    drive_factory: DriveFactory, library: Library
):
    a = drive_factory("a", extra_args=("--writeback-delay", "30"))
    doc = a.mountpoint / "crash.txt"
    doc.write_bytes(b"before")
    a.sync()
    entry_id = server_tree(library)["crash.txt"].id
    save_vim_style(doc, b"after the save")
    save_backup_style(doc, b"after the second save")
    a.kill()
    a.start()
    assert doc.read_bytes() == b"after the second save"
    a.sync()
    entries = server_tree(library)
    assert sorted(entries) == ["", "crash.txt"]
    assert entries["crash.txt"].id == entry_id
    assert len(versions(library, entry_id)) == 2
