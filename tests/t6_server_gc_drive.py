"""A drive whose uploaded chunks the server collected before its commit arrived uploads them
again (remote/server/collector.py: a commit later than the grace gets 422 missing_chunks)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import Library
from tests.support import ServerProcess, wait_for
from tools.faultproxy import FaultProxy

pytestmark = pytest.mark.mount

COMMIT = r"^POST /v1/libraries/[^/]+/commit "
GRACE_HOURS = 2 / 3600  # two seconds


def test_chunks_collected_before_their_commit_are_uploaded_again(tmp_path: Path) -> None:
    from tests.mounts import mount_drive  # a plugin module (see pytest_plugins elsewhere)

    server = ServerProcess(
        tmp_path / "server-data",
        args=("--gc-grace-hours", f"{GRACE_HOURS}", "--maintenance-interval", "0.3"),
    )
    server.start()
    proxy = FaultProxy(("127.0.0.1", server.port))
    proxy.start()
    drives = []
    try:
        token = server.add_user("alice")
        server.admin("add-library", "docs", "--owner", "alice")
        library = Library(server, "docs", "alice", token)
        a = mount_drive(library, tmp_path / "a-mnt", tmp_path / "a-cache", server_url=proxy.url)
        drives.append(a)
        b = mount_drive(library, tmp_path / "b-mnt", tmp_path / "b-cache")
        drives.append(b)
        held = proxy.hold(COMMIT)
        data = os.urandom(3 * 1024 * 1024 + 7)
        (a.mountpoint / "late.bin").write_bytes(data)
        assert held.wait(30), "A never sent its commit"
        wait_for(
            lambda: "deleted" in server.log() and "chunk(s) nothing refers to" in server.log(),
            30,
            "the server to collect the chunks of the held commit",
        )
        held.release()
        a.sync(timeout=60)
        b.sync(timeout=60)
        assert (b.mountpoint / "late.bin").read_bytes() == data
        assert "missing_chunks" in a.log(), "the first commit was refused for its chunks"
    finally:
        for drive in drives:
            drive.cleanup()
        proxy.stop()
        server.stop()
    from remote.server import admin

    assert admin.check(tmp_path / "server-data") == []
