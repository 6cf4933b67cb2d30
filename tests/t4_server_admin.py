"""`ferry admin`: accounts, libraries, shares and the store check, through the real CLI."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import trio

from remote import protocol
from remote.protocol import ROOT_ID, ChunkRef, op_create
from tests.support import ServerProcess, ferry
from tests.t4_server_helpers import Api, new_id


def admin(data: Path, *args: str, check: bool = True):
    return ferry("admin", "--data", str(data), *args, check=check)


def test_accounts_libraries_and_shares(tmp_path: Path) -> None:
    data = tmp_path / "data"
    out = admin(data, "add-user", "alice").stdout.strip().splitlines()
    token = out[-1]
    assert len(token) >= 40 and token not in (data / "meta.sqlite").read_bytes().decode("latin-1")
    dup = admin(data, "add-user", "alice", check=False)
    assert dup.returncode == 1 and "already exists" in dup.stderr
    bad = admin(data, "add-user", "../evil", check=False)
    assert bad.returncode == 1 and "name" in bad.stderr
    assert not (tmp_path / "evil").exists()
    missing_owner = admin(data, "add-library", "docs", "--owner", "nobody", check=False)
    assert missing_owner.returncode == 1 and "nobody" in missing_owner.stderr
    admin(data, "add-library", "docs", "--owner", "alice")
    assert admin(data, "add-library", "docs", "--owner", "alice", check=False).returncode == 1
    bob = admin(data, "add-user", "bob").stdout.strip().splitlines()[-1]
    assert admin(data, "share", "docs", "bob", "--role", "admin", check=False).returncode != 0
    assert admin(data, "share", "nope", "bob", "--role", "read", check=False).returncode == 1
    admin(data, "share", "docs", "bob", "--role", "read")
    second = admin(data, "add-token", "bob").stdout.strip().splitlines()[-1]
    server = ServerProcess(data)
    server.start()
    try:
        for t, role in [(token, "owner"), (bob, "read"), (second, "read")]:
            r = httpx.get(
                f"{server.url}/v1/libraries/docs", headers={"Authorization": f"Bearer {t}"}
            )
            assert r.json()["role"] == role
    finally:
        server.stop()
    assert admin(data, "check").stdout.strip().endswith("consistent")


def test_check_names_each_problem(library) -> None:
    server = library.server
    api = Api(server, library.name, library.token)
    data = b"some file content"
    ref = api.put_chunk(data)
    api.ok(op_create(new_id(), ROOT_ID, "f", "file", 0o644, 1, chunks=[ref]))
    other = api.put_chunk(b"other content")
    api.ok(op_create(new_id(), ROOT_ID, "g", "file", 0o644, 1, chunks=[other]))
    api.close()
    server.stop()
    assert admin(server.data_dir, "check").returncode == 0
    chunk_dir = server.data_dir / "chunks"
    (chunk_dir / ref.hash[:2] / ref.hash[2:4] / ref.hash).write_bytes(b"bit rot")
    (chunk_dir / other.hash[:2] / other.hash[2:4] / other.hash).unlink()
    result = admin(server.data_dir, "check", check=False)
    assert result.returncode == 1
    assert f"chunk {ref.hash} does not match" in result.stdout
    assert f"chunk {other.hash} is recorded but its file is missing" in result.stdout
    assert protocol.manifest_hash([ChunkRef(ref.hash, len(data))]) not in result.stderr


async def test_sigterm_answers_long_polls_and_exits_cleanly(library) -> None:
    server = library.server
    proc = server.proc
    assert proc is not None
    url = f"{server.url}/v1/libraries/{library.name}/changes"
    headers = {"Authorization": f"Bearer {library.token}"}
    async with httpx.AsyncClient(headers=headers, timeout=70) as http:
        answers = []

        async def poll() -> None:
            answers.append(await http.get(url, params={"cursor": 1, "wait": 60}))

        with trio.fail_after(5):  # far less than the 60 s the poll asked to wait
            async with trio.open_nursery() as nursery:
                nursery.start_soon(poll)
                await trio.sleep(0.5)
                proc.send_signal(signal.SIGTERM)
    assert answers[0].json() == {"entries": [], "cursor": 1, "more": False}
    assert await trio.to_thread.run_sync(proc.wait, 10) == 0
    assert "ferry server stopped" in server.log()
