"""Two-way sync scenarios the randomized test (`t5_twoway_random.py`) found, reduced.

Each test replays, with two real mounts and a fault proxy, the few steps of a
failing random walk that matter, and names the seed that found it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from tests.t5_twoway_random import settle
from tests.t5_twoway_scenarios import ProxiedDrive, proxied_factory  # noqa: F401 (a fixture)

if TYPE_CHECKING:
    from tests.conftest import Library

pytest_plugins = ["tests.mounts"]

pytestmark = pytest.mark.mount


def test_rename_then_delete_offline_of_a_file_edited_elsewhere_keeps_the_edit(
    proxied_factory: Callable[[str], ProxiedDrive],  # noqa: F811
    library: Library,
):
    """Offline, B renames a file, creates another, deletes the renamed one; A edits it.

    The rename reaches the server against a stale revision while the entry is
    gone here. Seed 6 at 120 steps: the uploader re-sent it forever (`ferry
    sync` never finished). The delete must meet A's edit as a conflict, and the
    edit wins.
    """
    a, b = proxied_factory("a"), proxied_factory("b")
    (a.mountpoint / "notes.txt").write_bytes(b"first version\n")
    a.sync()
    b.sync()

    b.go_offline()
    os.rename(b.mountpoint / "notes.txt", b.mountpoint / "renamed.txt")
    (b.mountpoint / "other.txt").write_bytes(b"made on b after the rename\n")
    (b.mountpoint / "renamed.txt").unlink()
    (a.mountpoint / "notes.txt").write_bytes(b"edited on a\n")
    a.sync()
    b.go_online()
    b.sync(timeout=30)

    final = settle([a.drive, b.drive], library)
    assert sorted(final) == ["notes.txt", "other.txt"], sorted(final)
    assert (b.mountpoint / "notes.txt").read_bytes() == b"edited on a\n"
    assert (a.mountpoint / "other.txt").read_bytes() == b"made on b after the rename\n"


def test_rename_offline_onto_a_name_taken_elsewhere_then_delete_converges(
    proxied_factory: Callable[[str], ProxiedDrive],  # noqa: F811
    library: Library,
):
    """Offline, B renames a file to a name A then creates, creates another, deletes the renamed one.

    The rename meets A's new entry at its target name while the entry is gone
    here: there is nothing left to move aside, and the delete that follows
    still removes the file (A did not change it).
    """
    a, b = proxied_factory("a"), proxied_factory("b")
    (a.mountpoint / "notes.txt").write_bytes(b"first version\n")
    a.sync()
    b.sync()
    # B's own commit: its uploader knows the file's revision even once the file is gone.
    (b.mountpoint / "notes.txt").write_bytes(b"second version, from b\n")
    b.sync()

    b.go_offline()
    os.rename(b.mountpoint / "notes.txt", b.mountpoint / "taken.txt")
    (b.mountpoint / "other.txt").write_bytes(b"made on b after the rename\n")
    (b.mountpoint / "taken.txt").unlink()
    (a.mountpoint / "taken.txt").write_bytes(b"made on a\n")
    a.sync()
    b.go_online()
    b.sync(timeout=30)

    final = settle([a.drive, b.drive], library)
    assert sorted(final) == ["other.txt", "taken.txt"], sorted(final)
    assert (b.mountpoint / "taken.txt").read_bytes() == b"made on a\n"


def test_folder_made_and_removed_offline_on_a_name_taken_elsewhere_converges(
    proxied_factory: Callable[[str], ProxiedDrive],  # noqa: F811
    library: Library,
):
    """Offline, A makes a folder, writes a file in it, moves the file out, removes the folder;
    B made a folder of the same name meanwhile.

    The folder's create is still sent (the file's create names it as parent)
    while it is gone here. Seed 16 at 200 steps: the uploader was refused
    ("the name is taken") and retried forever.
    """
    a, b = proxied_factory("a"), proxied_factory("b")
    a.go_offline()
    (b.mountpoint / "box").mkdir()
    b.sync()
    (a.mountpoint / "box").mkdir()
    (a.mountpoint / "box" / "f.txt").write_bytes(b"written in a's box\n")
    (a.mountpoint / "other").mkdir()
    os.rename(a.mountpoint / "box" / "f.txt", a.mountpoint / "f.txt")
    (a.mountpoint / "box").rmdir()
    a.go_online()
    a.sync(timeout=30)

    final = settle([a.drive, b.drive], library)
    assert sorted(final) == ["box", "f.txt", "other"], sorted(final)
    assert (b.mountpoint / "f.txt").read_bytes() == b"written in a's box\n"


def test_edit_here_of_a_file_renamed_elsewhere_onto_a_name_made_here_keeps_all_once(
    proxied_factory: Callable[[str], ProxiedDrive],  # noqa: F811
    library: Library,
):
    """B renames a.txt to b.txt and edits it; offline, A edits a.txt, then creates its own b.txt.

    A's edit meets B's as a conflict; the server's entry then wants the name
    b.txt, which A's new file holds here. Seed 17 at 200 steps: taking it failed
    after the conflict copy was committed, so every retry committed one more copy.
    """
    a, b = proxied_factory("a"), proxied_factory("b")
    (a.mountpoint / "a.txt").write_bytes(b"first version\n")
    a.sync()
    b.sync()

    a.go_offline()
    os.rename(b.mountpoint / "a.txt", b.mountpoint / "b.txt")
    (b.mountpoint / "b.txt").write_bytes(b"edited on b\n")
    b.sync()
    (a.mountpoint / "a.txt").write_bytes(b"edited on a\n")
    (a.mountpoint / "b.txt").write_bytes(b"new on a\n")
    a.go_online()
    a.sync(timeout=30)

    final = settle([a.drive, b.drive], library)
    assert len(final) == 3 and "b.txt" in final, sorted(final)
    assert (a.mountpoint / "b.txt").read_bytes() == b"edited on b\n"
    contents = sorted((b.mountpoint / p).read_bytes() for p in final)
    assert contents == [b"edited on a\n", b"edited on b\n", b"new on a\n"], sorted(final)


def test_folders_moved_into_each_other_on_two_devices_converge(
    proxied_factory: Callable[[str], ProxiedDrive],  # noqa: F811
    library: Library,
):
    """A moves d1 into d2 while B, offline, moves d2 into d1. Seed 18 at 200 steps."""
    a, b = proxied_factory("a"), proxied_factory("b")
    (a.mountpoint / "d1").mkdir()
    (a.mountpoint / "d2").mkdir()
    (a.mountpoint / "d2" / "f.txt").write_bytes(b"in d2\n")
    a.sync()
    b.sync()

    b.go_offline()
    os.rename(b.mountpoint / "d2", b.mountpoint / "d1" / "d2")
    os.rename(a.mountpoint / "d1", a.mountpoint / "d2" / "d1")
    a.sync()
    b.go_online()
    b.sync(timeout=20)

    final = settle([a.drive, b.drive], library)
    # The move that reached the server first wins; the other is put back, not retried forever.
    assert sorted(final) == ["d2", "d2/d1", "d2/f.txt"], sorted(final)
    assert (b.mountpoint / "d2" / "f.txt").read_bytes() == b"in d2\n"
