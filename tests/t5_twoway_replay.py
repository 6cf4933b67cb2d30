"""Replaying an offline journal through a real mount, with the client killed in the middle.

The journal holds more operations than one commit batch, so replay takes
several commits; the drive is SIGKILLed after some (not all) of them are on
the server, restarted, and must finish: every file exactly once, every byte
intact, renames and directory moves made offline applied in order.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import pytest

from tests.t5_sync import status, tree, wait_for
from tests.t5_twoway_support import server_tree

if TYPE_CHECKING:
    from tests.conftest import Library
    from tests.mounts import DriveFactory

pytest_plugins = ["tests.mounts"]

pytestmark = [pytest.mark.mount, pytest.mark.slow]

#: More journal rows than one commit batch (vfs.sync.push.BATCH_OPS = 500).
FILES = 700


def test_client_killed_during_replay_finishes_after_restart(
    drive_factory: DriveFactory, library: Library
):
    a = drive_factory("a")
    (a.mountpoint / "keep").mkdir()
    (a.mountpoint / "keep" / "old.txt").write_text("on the server before")
    a.sync()
    library.server.stop()

    expected: dict[str, bytes] = {"keep/old.txt": b"on the server before"}
    (a.mountpoint / "inbox").mkdir()
    for i in range(FILES):
        data = f"offline file {i}\n".encode() * (1 + i % 7)
        (a.mountpoint / "inbox" / f"f{i:04}.txt").write_bytes(data)
        expected[f"inbox/f{i:04}.txt"] = data
    # A rename chain and a directory move, made offline.
    chain = ["old", "one", "two", "three"]
    for src, dst in zip(chain, chain[1:], strict=False):
        os.rename(a.mountpoint / "keep" / f"{src}.txt", a.mountpoint / "keep" / f"{dst}.txt")
    expected["keep/three.txt"] = expected.pop("keep/old.txt")
    os.rename(a.mountpoint / "keep", a.mountpoint / "inbox" / "kept")
    expected = {
        (f"inbox/kept/{k[5:]}" if k.startswith("keep/") else k): v for k, v in expected.items()
    }
    total = status(a)["pending_ops"]
    assert total > 500

    library.server.start()
    wait_for(lambda: status(a)["pending_ops"] < total, 60, "a first batch is acknowledged")
    left = status(a)["pending_ops"]
    a.kill()
    assert left > 0, "the whole journal was replayed before the kill; the test proves nothing"
    a.start()
    time.sleep(0.3)
    a.kill()  # and once more, early in the second replay
    a.start()
    a.sync(timeout=120)

    on_server = {p for p, e in server_tree(library).items() if e.kind == "file"}
    assert on_server == set(expected)
    b = drive_factory("b")
    b.sync()
    got = {k: v for k, v in tree(b.mountpoint).items() if v[0] == "file"}
    assert set(got) == set(expected)
    for path, data in expected.items():
        assert (b.mountpoint / path).read_bytes() == data, path
    assert tree(a.mountpoint) == tree(b.mountpoint)
