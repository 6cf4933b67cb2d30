"""Seeing and steering a real mount: file states, pins, evict, versions, restore, trash, status.

Every check goes through the filesystem (files opened under `.ferry/versions/`),
the control socket found through `.ferry/control` (what `ferry ls` asks) or the
`ferry` command line, against a real server.
"""

from __future__ import annotations

import errno
import json
import os
import pty
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support import drive_status, ferry, wait_for
from vfs.sync.control import file_states

if TYPE_CHECKING:
    from tests.conftest import Library
    from tests.mounts import DriveFactory, DriveProcess

pytest_plugins = ["tests.mounts"]

pytestmark = pytest.mark.mount

MiB = 1024 * 1024


def state(path: Path) -> str:
    known = file_states([path])[0]
    assert known is not None, f"{path} is not in the drive"
    return known[0]


def revision(path: Path) -> int:
    known = file_states([path])[0]
    assert known is not None, f"{path} is not in the drive"
    return known[1]


def status(drive: DriveProcess) -> dict:
    return drive_status(drive.mountpoint)


def settle(*drives: DriveProcess) -> None:
    """Every drive has uploaded its changes and pulled everyone else's."""
    for _ in range(2):
        for drive in drives:
            drive.sync()


def test_states_pin_evict_and_pins_survive_remount(drive_factory: DriveFactory) -> None:
    a = drive_factory("a")
    big = os.urandom(6 * MiB)
    (a.mountpoint / "big.bin").write_bytes(big)
    (a.mountpoint / "album").mkdir()
    (a.mountpoint / "album" / "one.jpg").write_bytes(os.urandom(300_000))
    assert state(a.mountpoint / "big.bin") == "pending-upload"
    assert revision(a.mountpoint / "big.bin") == 0
    a.sync()
    assert state(a.mountpoint / "big.bin") == "cached"  # the upload put its chunks in the cache
    assert revision(a.mountpoint / "big.bin") > 0

    b = drive_factory("b")
    big_b = b.mountpoint / "big.bin"
    assert state(big_b) == "online-only"
    with open(big_b, "rb") as f:  # one read in the middle: not sequential, no read-ahead
        assert os.pread(f.fileno(), 4096, 3 * MiB) == big[3 * MiB : 3 * MiB + 4096]
    assert state(big_b) == "partial"
    assert big_b.read_bytes() == big
    assert state(big_b) == "cached"

    listing = ferry("ls", str(b.mountpoint)).stdout
    assert any(
        line.split()[0] == "cached" and line.endswith("big.bin") for line in listing.splitlines()
    )

    album = b.mountpoint / "album"
    assert state(album / "one.jpg") == "online-only"
    ferry("pin", str(album))
    assert state(album / "one.jpg") == "pinned"
    assert state(album) == "pinned"

    # A file added later under the pinned folder (on another device) is pinned on arrival.
    later = os.urandom(200_000)
    (a.mountpoint / "album" / "two.jpg").write_bytes(later)
    settle(a, b)
    wait_for(lambda: state(album / "two.jpg") == "pinned", what="two.jpg pinned on b")
    pins = status(b)["pins"]
    assert [(p["path"], p["files"], p["bytes"], p["local_bytes"]) for p in pins] == [
        ("album", 2, 500_000, 500_000)
    ]

    # Pinned content survives eviction and a remount.
    evicted = ferry("evict", str(b.mountpoint)).stdout
    assert "kept album/one.jpg" in evicted
    assert state(big_b) == "online-only"
    assert state(album / "one.jpg") == "pinned"
    b.unmount()
    b.start()
    assert state(album / "two.jpg") == "pinned"
    assert status(b)["pins"][0]["path"] == "album"

    unpinned = ferry("unpin", str(album / "one.jpg"), check=False)
    assert unpinned.returncode == 1 and "pinned through a folder" in unpinned.stderr
    ferry("unpin", str(album))
    assert state(album / "one.jpg") == "cached"
    ferry("evict", str(album))
    assert state(album / "one.jpg") == "online-only"
    assert (album / "two.jpg").read_bytes() == later
    assert status(b)["pins"] == []


def test_versions_restore_and_the_versions_tree(drive: DriveProcess) -> None:
    notes = drive.mountpoint / "docs" / "notes.txt"
    notes.parent.mkdir()
    contents = [b"first draft\n", b"second draft, longer\n", b"third\n"]
    for content in contents:
        notes.write_bytes(content)  # O_TRUNC right after a sync: no empty version in between
        drive.sync()
    listed = json.loads(ferry("versions", str(notes), "--json").stdout)
    assert [v["size"] for v in listed] == [len(c) for c in reversed(contents)]
    revisions = [v["revision"] for v in listed]
    assert revisions == sorted(revisions, reverse=True)
    assert revisions[0] == revision(notes)

    tree = drive.mountpoint / ".ferry" / "versions" / "docs" / "notes.txt"
    assert ".ferry" not in os.listdir(drive.mountpoint)  # hidden, but reachable
    names = sorted(os.listdir(tree))
    assert names == sorted(f"notes.r{r}.txt" for r in revisions)
    for r, content in zip(revisions, reversed(contents), strict=True):
        assert (tree / f"notes.r{r}.txt").read_bytes() == content
    with pytest.raises(OSError) as refused:
        open(tree / f"notes.r{revisions[-1]}.txt", "wb")
    assert refused.value.errno in (errno.EROFS, errno.EACCES)
    with pytest.raises(OSError) as refused:
        (drive.mountpoint / ".ferry" / "versions" / "new").mkdir()
    assert refused.value.errno in (errno.EROFS, errno.EACCES)

    out = ferry("restore", str(notes), "--version", str(revisions[-1])).stdout
    assert f"restored {notes} to version {revisions[-1]}" in out
    assert notes.read_bytes() == contents[0]
    after = json.loads(ferry("versions", str(notes), "--json").stdout)
    assert len(after) == 4 and after[1]["revision"] == revisions[0]  # the old current is kept
    wait_for(lambda: len(os.listdir(tree)) == 4, what="the restored version in .ferry/versions")

    human = ferry("versions", str(notes)).stdout.splitlines()
    assert human[0].split() == ["REV", "COMMITTED", "SIZE", "BY"]
    assert human[1].endswith("(current)") and len(human) == 5

    notes.rename(notes.with_name("minutes.md"))
    moved = drive.mountpoint / ".ferry" / "versions" / "docs" / "minutes.md"
    assert sorted(os.listdir(moved))[0].startswith("minutes.r")
    assert (moved / f"minutes.r{revisions[1]}.md").read_bytes() == contents[1]
    old_name = drive.mountpoint / ".ferry" / "versions" / "docs" / "notes.txt"
    wait_for(lambda: not old_name.exists(), 5, "the old name gone (kernel caches it for 1 s)")


def test_trash_and_undelete(drive: DriveProcess) -> None:
    report = drive.mountpoint / "report.txt"
    report.write_bytes(b"quarterly numbers\n")
    drive.sync()
    report.unlink()
    drive.sync()
    entries = json.loads(ferry("trash", str(drive.mountpoint), "--json").stdout)
    assert [e["path"] for e in entries] == ["report.txt"]
    assert "report.txt" in ferry("trash", str(drive.mountpoint)).stdout

    missing = ferry("undelete", str(drive.mountpoint / "nothing.txt"), check=False)
    assert missing.returncode == 1 and "not in the trash" in missing.stderr
    ferry("undelete", str(report))
    assert report.read_bytes() == b"quarterly numbers\n"
    assert state(report) == "cached"
    assert json.loads(ferry("trash", str(drive.mountpoint), "--json").stdout) == []


def test_status_shows_pins_rates_and_stays_quiet_off_a_terminal(drive: DriveProcess) -> None:
    (drive.mountpoint / "a.txt").write_bytes(b"x" * 1000)
    (drive.mountpoint / "keep").mkdir()
    drive.sync()
    pinned = ferry("pin", str(drive.mountpoint / "keep"))
    assert pinned.stdout == "" and pinned.stderr == ""  # not a terminal: no progress bar
    synced = ferry("sync", str(drive.mountpoint))
    assert synced.stdout == "" and synced.stderr == ""
    info = status(drive)
    for key in ("online", "since", "pending_ops", "pending_bytes", "cache", "conflicts"):
        assert key in info
    assert info["pins"] == [{"path": "keep", "files": 0, "bytes": 0, "local_bytes": 0}]
    assert info["upload_rate"] >= 0 and info["download_rate"] >= 0
    human = ferry("status", str(drive.mountpoint)).stdout
    assert "pinned: keep" in human and "transfers:" in human
    not_drive = ferry("pin", "/tmp", check=False)
    assert not_drive.returncode == 1 and "not inside a mounted ferry drive" in not_drive.stderr


def run_on_terminal(*args: str) -> str:
    """Run `ferry ARGS` with stdout on a pseudo-terminal; return what it drew."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vfs", *args], stdout=slave, stderr=subprocess.PIPE
        )
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    finally:
        os.close(master)
    return b"".join(chunks).decode(errors="replace")


def test_pin_draws_progress_on_a_terminal_and_pinned_files_read_offline(
    library: Library, drive_factory: DriveFactory
) -> None:
    a = drive_factory("a")
    (a.mountpoint / "trip").mkdir()
    photos = {f"p{i}.jpg": os.urandom(400_000) for i in range(3)}
    for name, data in photos.items():
        (a.mountpoint / "trip" / name).write_bytes(data)
    (a.mountpoint / "other.bin").write_bytes(os.urandom(1000))
    drawn = run_on_terminal("sync", str(a.mountpoint))
    assert "syncing" in drawn or drawn == ""  # nothing pending by then is fine too

    b = drive_factory("b")
    drawn = run_on_terminal("pin", str(b.mountpoint / "trip"))
    assert "pinning" in drawn and "100%" in drawn
    assert "3 files, 1.1 MiB kept offline" in drawn

    library.server.kill()
    for name, data in photos.items():
        assert (b.mountpoint / "trip" / name).read_bytes() == data
    with pytest.raises(OSError) as info:
        (b.mountpoint / "other.bin").read_bytes()
    assert info.value.errno == errno.EIO
    assert state(b.mountpoint / "trip" / "p0.jpg") == "pinned"
    assert state(b.mountpoint / "other.bin") == "online-only"
    offline = ferry("pin", str(b.mountpoint / "other.bin"), check=False)
    assert offline.returncode == 1 and "the drive is offline" in offline.stderr
    assert status(b)["pins"][-1]["path"] == "other.bin"  # kept, to download once online


def test_a_library_entry_cannot_take_the_name_dot_ferry(drive: DriveProcess) -> None:
    with pytest.raises(OSError) as info:
        (drive.mountpoint / ".ferry").mkdir()
    assert info.value.errno == errno.EEXIST
    (drive.mountpoint / "x").write_text("x")
    with pytest.raises(OSError) as info:
        os.rename(drive.mountpoint / "x", drive.mountpoint / ".ferry")
    assert info.value.errno in (errno.EEXIST, errno.EISDIR, errno.EROFS)
    (drive.mountpoint / "sub").mkdir()
    (drive.mountpoint / "sub" / ".ferry").write_text("fine below the root")
