"""Two-way sync scenarios through real mounts: a folder deleted under offline work, three devices.

- A folder deleted on device B while device A, cut off from the server by a
  fault proxy, created files in it: after sync both devices have the folder
  back with A's files, whichever device reaches the server first.
- Three mounts of one library, each editing, renaming, deleting and (two of
  them, offline) changing the same file, converge with each other and the
  server, with the conflicting version kept as a conflict copy.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.t5_sync import status, tree, wait_for
from tests.t5_twoway_random import CONFLICT, server_view, settle
from tools.faultproxy import FaultProxy

if TYPE_CHECKING:
    from tests.conftest import Library
    from tests.mounts import DriveFactory, DriveProcess

pytest_plugins = ["tests.mounts"]

pytestmark = pytest.mark.mount


@dataclass
class ProxiedDrive:
    """A device that reaches the server through its own fault proxy, so it alone can go offline."""

    drive: DriveProcess
    proxy: FaultProxy

    @property
    def mountpoint(self) -> Path:
        return self.drive.mountpoint

    def sync(self, timeout: float = 60) -> None:
        self.drive.sync(timeout=timeout)

    def go_offline(self) -> None:
        self.proxy.set(refuse=True)
        self.proxy.reset_all()
        wait_for(lambda: not status(self.drive)["online"], 20, f"{self.mountpoint} goes offline")

    def go_online(self) -> None:
        self.proxy.clear()


@pytest.fixture
def proxied_factory(library: Library, tmp_path: Path) -> Iterator[Callable[[str], ProxiedDrive]]:
    """Mount devices behind fault proxies; every drive and proxy is stopped after the test."""
    from tests.mounts import mount_drive  # registered as a plugin first (pytest_plugins)

    made: list[ProxiedDrive] = []
    proxies: list[FaultProxy] = []

    def make(name: str) -> ProxiedDrive:
        proxy = FaultProxy(("127.0.0.1", library.server.port))
        proxies.append(proxy)
        proxy.start()
        drive = mount_drive(
            library, tmp_path / f"{name}-mnt", tmp_path / f"{name}-cache", server_url=proxy.url
        )
        made.append(ProxiedDrive(drive, proxy))
        return made[-1]

    try:
        yield make
    finally:
        for device in made:
            device.drive.cleanup()
        for proxy in proxies:
            proxy.stop()


@pytest.mark.parametrize("first", ["b", "a"], ids=["delete-reaches-server-first", "adds-first"])
def test_folder_deleted_on_b_comes_back_with_files_a_added_offline(
    proxied_factory: Callable[[str], ProxiedDrive], library: Library, first: str
):
    a, b = proxied_factory("a"), proxied_factory("b")
    folder = a.mountpoint / "project"
    (folder / "sub").mkdir(parents=True)
    (folder / "old.txt").write_bytes(b"there before")
    (folder / "sub" / "old2.txt").write_bytes(b"also there before")
    a.sync()
    b.sync()
    assert tree(b.mountpoint) == tree(a.mountpoint)

    a.go_offline()
    added = {
        "project/new.txt": b"added on a offline\n" * 100,
        "project/sub/new2.txt": os.urandom(200_000),
        "project/fresh/new3.txt": b"in a folder made offline",
    }
    (a.mountpoint / "project" / "fresh").mkdir()
    for rel, data in added.items():
        (a.mountpoint / rel).write_bytes(data)
    if first == "a":
        b.go_offline()
    shutil.rmtree(b.mountpoint / "project")
    if first == "b":
        b.sync()
        assert "project" not in server_view(library)
        a.go_online()
    else:
        a.go_online()
        a.sync(timeout=90)
        b.go_online()

    final = settle([a.drive, b.drive], library)
    for rel, data in added.items():
        assert (a.mountpoint / rel).read_bytes() == data, rel
        assert (b.mountpoint / rel).read_bytes() == data, rel
    assert final["project"][0] == "dir"
    # What A did not touch, B's delete removes: only A's additions bring the folder back.
    assert "project/old.txt" not in final, sorted(final)


def test_three_devices_converge_after_edits_on_each(drive_factory: DriveFactory, library: Library):
    a, b, c = drive_factory("a"), drive_factory("b"), drive_factory("c")
    (a.mountpoint / "shared").mkdir()
    (a.mountpoint / "shared" / "plan.txt").write_bytes(b"base plan\n")
    (a.mountpoint / "shared" / "old.txt").write_bytes(b"to be renamed\n")
    (a.mountpoint / "shared" / "gone.txt").write_bytes(b"to be deleted\n")
    a.sync()
    for d in (b, c):
        d.sync()
        assert tree(d.mountpoint) == tree(a.mountpoint)

    # Online edits on each device, different files.
    (a.mountpoint / "from-a.txt").write_bytes(b"a was here\n")
    os.rename(b.mountpoint / "shared" / "old.txt", b.mountpoint / "renamed-by-b.txt")
    (c.mountpoint / "shared" / "gone.txt").unlink()
    (c.mountpoint / "c-dir").mkdir()
    (c.mountpoint / "c-dir" / "from-c.bin").write_bytes(os.urandom(1_300_000))
    # Offline, two devices change the same file; the third appends to another.
    for d in (a, b, c):
        d.sync()
    library.server.stop()
    (a.mountpoint / "shared" / "plan.txt").write_bytes(b"plan as a sees it\n")
    (b.mountpoint / "shared" / "plan.txt").write_bytes(b"plan as b sees it, longer\n")
    with open(c.mountpoint / "from-a.txt", "ab") as f:
        f.write(b"c added a line\n")
    library.server.start()

    final = settle([a, b, c], library)
    files = {p: v for p, v in final.items() if v[0] == "file"}
    assert (a.mountpoint / "renamed-by-b.txt").read_bytes() == b"to be renamed\n"
    assert "shared/gone.txt" not in final and "shared/old.txt" not in final
    assert (b.mountpoint / "from-a.txt").read_bytes() == b"a was here\nc added a line\n"
    assert (a.mountpoint / "c-dir" / "from-c.bin").stat().st_size == 1_300_000
    plans = sorted(p for p in files if p.startswith("shared/plan"))
    assert len(plans) == 2 and "shared/plan.txt" in plans, plans
    copy = plans[0] if plans[1] == "shared/plan.txt" else plans[1]
    assert CONFLICT.match(copy.rsplit("/", 1)[1]), copy
    contents = {(c.mountpoint / p).read_bytes() for p in plans}
    assert contents == {b"plan as a sees it\n", b"plan as b sees it, longer\n"}


@pytest.mark.parametrize("change", ["rename", "chmod"])
def test_content_edited_on_both_after_a_rename_or_chmod_here_keeps_both(
    proxied_factory: Callable[[str], ProxiedDrive], library: Library, change: str
):
    """A renames (or chmods) a file and then edits it offline while B edits it too.

    A's rename reaches the server against a stale revision and is re-sent on the
    current one; A's content must still meet B's as a conflict, not overwrite it.
    """
    a, b = proxied_factory("a"), proxied_factory("b")
    (a.mountpoint / "notes.txt").write_bytes(b"first version\n")
    a.sync()
    b.sync()

    a.go_offline()
    name = "notes.txt"
    if change == "rename":
        os.rename(a.mountpoint / "notes.txt", a.mountpoint / "renamed.txt")
        name = "renamed.txt"
    else:
        os.chmod(a.mountpoint / "notes.txt", 0o600)
    (a.mountpoint / name).write_bytes(b"edited on a, offline\n")
    (b.mountpoint / "notes.txt").write_bytes(b"edited on b, online, longer\n")
    b.sync()
    a.go_online()

    final = settle([a.drive, b.drive], library)
    files = {p: v for p, v in final.items() if v[0] == "file"}
    contents = {(b.mountpoint / p).read_bytes() for p in files}
    assert contents == {b"edited on a, offline\n", b"edited on b, online, longer\n"}, files
    copies = [p for p in files if CONFLICT.match(p)]
    assert len(copies) == 1 and len(files) == 2, sorted(files)
    assert (a.mountpoint / copies[0]).read_bytes() == b"edited on a, offline\n"
    if change == "rename":
        assert (a.mountpoint / "renamed.txt").read_bytes() == b"edited on b, online, longer\n"
    else:
        assert final["notes.txt"][1] & 0o777 == 0o600


def test_rename_chains_and_folder_moves_made_offline_converge(
    proxied_factory: Callable[[str], ProxiedDrive], library: Library
):
    """Offline on A: a file renamed three times, a folder moved into another and then
    renamed, a file moved out of it, a rename swap through a temporary name; B edits
    files inside the moving folder meanwhile. Every edit ends up in the moved place."""
    a, b = proxied_factory("a"), proxied_factory("b")
    root = a.mountpoint
    (root / "src" / "lib").mkdir(parents=True)
    (root / "dest").mkdir()
    (root / "src" / "lib" / "core.py").write_bytes(b"core v1\n")
    (root / "src" / "lib" / "util.py").write_bytes(b"util v1\n")
    (root / "one.txt").write_bytes(b"one\n")
    (root / "left").write_bytes(b"left side\n")
    (root / "right").write_bytes(b"right side\n")
    a.sync()
    b.sync()

    a.go_offline()
    os.rename(root / "one.txt", root / "two.txt")
    os.rename(root / "two.txt", root / "dest" / "three.txt")
    os.rename(root / "dest" / "three.txt", root / "dest" / "four.txt")
    os.rename(root / "src" / "lib", root / "dest" / "lib")
    os.rename(root / "dest" / "lib", root / "dest" / "library")
    os.rename(root / "dest" / "library" / "util.py", root / "util.py")
    os.rename(root / "left", root / "swap.tmp")
    os.rename(root / "right", root / "left")
    os.rename(root / "swap.tmp", root / "right")
    os.rmdir(root / "src")
    (b.mountpoint / "src" / "lib" / "core.py").write_bytes(b"core v2 from b\n")
    (b.mountpoint / "src" / "lib" / "new.py").write_bytes(b"added by b\n")
    b.sync()
    a.go_online()

    final = settle([a.drive, b.drive], library)
    files = {p for p, v in final.items() if v[0] == "file"}
    assert files >= {"dest/four.txt", "dest/library/core.py", "util.py", "left", "right"}, files
    assert "one.txt" not in final and "dest/library/util.py" not in final
    assert (b.mountpoint / "dest" / "four.txt").read_bytes() == b"one\n"
    assert (b.mountpoint / "dest" / "library" / "core.py").read_bytes() == b"core v2 from b\n"
    assert (b.mountpoint / "dest" / "library" / "new.py").read_bytes() == b"added by b\n"
    assert (b.mountpoint / "util.py").read_bytes() == b"util v1\n"
    assert (b.mountpoint / "left").read_bytes() == b"right side\n"
    assert (b.mountpoint / "right").read_bytes() == b"left side\n"
    assert not [p for p in final if CONFLICT.match(p.rsplit("/", 1)[-1])], sorted(final)
