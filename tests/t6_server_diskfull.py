"""A full server disk: DATA_DIR on a 24 MiB tmpfs that fills up.

Uploads that do not fit must be refused as `507 insufficient_storage` with a
JSON body (never a 500), the refused request must change nothing, what was
committed before must still download byte for byte, `ferry admin check` must
pass, and once space is freed the very same requests must succeed -- in
particular the metadata database must not be left stuck in a half-done write
transaction after SQLite reported the disk full.

Needs root (to mount a tmpfs); skipped otherwise.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from remote import protocol
from remote.protocol import ROOT_ID, op_create
from tests.support import ServerProcess, ferry
from tests.t4_server_helpers import Api, make_library, new_id

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")

TMPFS_SIZE = "24m"
CHUNK_BYTES = 4 * 1024 * 1024


@pytest.fixture
def small_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A `ferry serve` whose DATA_DIR is a 24 MiB tmpfs (its log stays outside)."""
    data = tmp_path / "data"
    data.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(data)], check=True
    )
    server = ServerProcess(data)
    try:
        server.start()
        yield server
    finally:
        server.kill()
        subprocess.run(["umount", "-l", str(data)], check=False)
    assert "internal_error" not in server.log() and "Traceback" not in server.log(), server.log()


def fill(path: Path) -> int:
    """Write zeros to `path` until the filesystem is full; return the bytes written."""
    written = 0
    block = b"\0" * (256 * 1024)
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                written += f.write(block)
            except OSError:
                break
        # Whatever partial block fits, one byte at a time would be slow; 4 KiB is close enough.
        small = b"\0" * 4096
        while True:
            try:
                written += f.write(small)
            except OSError:
                return written


def assert_full_refusal(response, before: tuple, api: Api) -> None:
    assert response.status_code == 507, response.text
    body = response.json()
    assert body["error"] == "insufficient_storage", body
    assert "disk space" in body["message"]
    assert api.snapshot() == before


def assert_store_consistent(server: ServerProcess) -> None:
    tmp = server.data_dir / "chunks" / "tmp"
    assert not os.listdir(tmp), f"temporary chunk files left behind: {os.listdir(tmp)}"
    result = ferry("admin", "--data", str(server.data_dir), "check", check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_full_disk_refuses_uploads_and_commits_then_recovers(small_server: ServerProcess) -> None:
    api = make_library(small_server)
    try:
        _full_disk_scenario(small_server, api)
    finally:
        api.close()


def _full_disk_scenario(server: ServerProcess, api: Api) -> None:
    saved = {f"kept{i}.bin": os.urandom(300_000) for i in range(3)}
    entries = {name: api.mkfile(name, data) for name, data in saved.items()}

    # 1. Chunk uploads until the chunk directory has no room: the first that
    #    does not fit is a clean 507 and nothing of it stays on disk.
    stored = 0
    while True:
        data = os.urandom(CHUNK_BYTES)
        before = api.snapshot()
        h = protocol.hash_bytes(data)
        r = api.http.put(f"{api.lib}/chunks/{h}", content=data)
        if r.status_code != 200:
            assert_full_refusal(r, before, api)
            assert api.post("/chunks/missing", {"hashes": [h]}).json()["missing"] == [h]
            break
        stored += 1
        assert stored < 10, "a 24 MiB filesystem took 40 MiB of chunks"
    assert stored >= 2, "the tmpfs filled before any chunk fit"

    # 2. Squeeze out the last free bytes: now even the metadata database cannot
    #    grow, so a big commit of new directories is refused and rolled back.
    filler = server.data_dir / "filler"
    fill(filler)
    ops = [op_create(new_id(), ROOT_ID, f"d{i:05d}", "dir", 0o755, 1) for i in range(3000)]
    key = new_id()
    before = api.snapshot()
    assert_full_refusal(api.commit(*ops, key=key), before, api)
    small = b"tiny chunk"
    r = api.http.put(f"{api.lib}/chunks/{protocol.hash_bytes(small)}", content=small)
    assert_full_refusal(r, before, api)

    # 3. Committed data is intact and readable while the disk is full.
    for name, entry in entries.items():
        refs = api.get(f"/manifests/{entry['manifest']}").json()["chunks"]
        content = b"".join(api.get(f"/chunks/{h}").content for h, _ in refs)
        assert content == saved[name], f"{name} changed while the disk was full"
    assert_store_consistent(server)

    # 4. Space returns: the refused commit (same key) and upload go through,
    #    and a second commit proves no connection kept a write transaction open.
    filler.unlink()
    r = api.commit(*ops, key=key)
    assert r.status_code == 200, r.text
    assert api.snapshot()[0] == before[0] + len(ops)
    api.put_chunk(small)
    api.mkfile("after.txt", b"written after the disk had room again")
    assert api.commit(*ops, key=key).json() == r.json(), "the retried commit applied twice"
    assert_store_consistent(server)
