"""The server crash matrix: SIGKILL mid-chunk-upload, mid-commit and mid-long-poll.

Each crash point is a precise moment, not a random one: a chunk upload held
with part of its body sent (or all of it, killed while the server hashes and
writes it), a large batch commit killed at several delays after it was sent,
long polls waiting when the server dies. After every restart:

* no chunk file under its real name has bytes that do not match the name
  (checked on disk before the restart cleans `chunks/tmp/`, and after);
* `chunks/tmp/` is empty and `ferry admin --data DIR check` passes;
* a commit is all or nothing, an acknowledged one is present, and retrying
  it with the same idempotency key applies it exactly once.

`t4_server_crash` covers random kills under concurrent writers; this module
aims at the moments in between. Run with `-s` to see the crash points tried.
"""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from remote import protocol
from remote.client import RemoteClient
from remote.protocol import ROOT_ID, op_create
from remote.retry import Backoff
from tests.support import ServerProcess, ferry
from tests.t4_server_helpers import Api, new_id

pytestmark = pytest.mark.slow

#: Crash points tried and survived, by kind; printed at the end of the module (-s).
SURVIVED: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    yield
    print(f"\nserver crash points survived: {sum(SURVIVED.values())} {dict(SURVIVED)}")


def chunk_files_match_their_names(server: ServerProcess) -> int:
    """Hash every chunk file under a real name; return how many there are."""
    root = server.data_dir / "chunks"
    count = 0
    for dirpath, _, names in os.walk(root):
        if Path(dirpath) == root / "tmp":
            continue
        for name in names:
            data = Path(dirpath, name).read_bytes()
            assert protocol.hash_bytes(data) == name, f"chunk file {name} holds other bytes"
            count += 1
    return count


def restart_and_check(server: ServerProcess, kind: str) -> None:
    """After a SIGKILL: verify the files on disk, restart, verify the store as a whole."""
    assert server.proc is None, "kill the server first"
    chunk_files_match_their_names(server)
    server.start()
    tmp = server.data_dir / "chunks" / "tmp"
    assert not os.listdir(tmp), f"temporary chunk files survived the restart: {os.listdir(tmp)}"
    result = ferry("admin", "--data", str(server.data_dir), "check", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    SURVIVED[kind] += 1


def live_ids(api: Api) -> set[str]:
    """Ids of every entry in the library's feed, paging through all of it."""
    ids: set[str] = set()
    cursor, more = 0, True
    while more:
        page = api.feed(cursor)
        ids.update(e["id"] for e in page["entries"] if not e["deleted"])
        cursor, more = page["cursor"], page["more"]
    return ids


def raw_request(server: ServerProcess, api: Api, method: str, path: str, body: bytes) -> bytes:
    """The bytes of one HTTP/1.1 request with the api's token."""
    head = (
        f"{method} {api.lib}{path} HTTP/1.1\r\nHost: crash\r\n"
        f"Authorization: Bearer {api.token}\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


def answer_if_any(sock: socket.socket) -> bytes:
    """Whatever the server answered before it died (b'' if nothing)."""
    sock.settimeout(0.5)
    data = b""
    try:
        while piece := sock.recv(65536):
            data += piece
    except OSError:
        pass
    return data


# --- mid-chunk-upload --------------------------------------------------------------------------

UPLOAD_POINTS = [
    ("headers only", 0.0, 0.0),
    ("half the body", 0.5, 0.0),
    ("all but one byte", -1, 0.0),
    ("whole body, killed at once", 1.0, 0.0),
    ("whole body, killed after 10 ms", 1.0, 0.01),
    ("whole body, killed after 40 ms", 1.0, 0.04),
    ("whole body, killed after 150 ms", 1.0, 0.15),
]


def test_sigkill_mid_chunk_upload(crashing: tuple[ServerProcess, Api]) -> None:
    server, api = crashing
    kept = api.mkfile("kept.bin", os.urandom(200_000))
    for label, fraction, delay in UPLOAD_POINTS:
        data = os.urandom(protocol.MAX_CHUNK_SIZE)
        chunk = protocol.hash_bytes(data)
        request = raw_request(server, api, "PUT", f"/chunks/{chunk}", data)
        body_start = len(request) - len(data)
        sent = len(data) - 1 if fraction == -1 else int(len(data) * fraction)
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(request[: body_start + sent])
            time.sleep(0.05 if sent < len(data) else delay)  # let the server take what was sent
            server.kill()
            answer = answer_if_any(sock)
        restart_and_check(server, "mid-chunk-upload")
        missing = api.post("/chunks/missing", {"hashes": [chunk]}).json()["missing"]
        if answer.startswith(b"HTTP/1.1 200"):
            assert missing == [], f"{label}: an acknowledged chunk is gone"
        if missing:
            assert sent == len(data) or not answer, label
        else:
            assert api.get(f"/chunks/{chunk}").content == data, f"{label}: wrong bytes"
        api.put_chunk(data)  # the client's retry
        assert api.get(f"/chunks/{chunk}").content == data, f"{label}: retry failed"
    assert api.entry(kept["id"]) == kept


# --- mid-commit ---------------------------------------------------------------------------------

COMMIT_OPS = 1000
#: Kill delays as fractions of how long the same commit takes on this machine:
#: before it is read, while it is parsed and applied, around its COMMIT, after it.
COMMIT_FRACTIONS = [0.0, 0.3, 0.6, 0.9, 1.1, 3.0]


def big_batch(api: Api, chunk: protocol.ChunkRef) -> list[dict]:
    """Directories with files in them: each op needs the ones before it (parents first)."""
    ops: list[dict] = []
    while len(ops) < COMMIT_OPS:
        folder = new_id()
        ops.append(op_create(folder, ROOT_ID, f"d-{folder}", "dir", 0o755, 1))
        for i in range(9):
            ops.append(
                op_create(new_id(), folder, f"f{i}.bin", "file", 0o644, i + 1, chunks=[chunk])
            )
    return ops[:COMMIT_OPS]


def test_sigkill_mid_commit_is_all_or_nothing_and_retried_once(
    crashing: tuple[ServerProcess, Api],
) -> None:
    server, api = crashing
    chunk = api.put_chunk(os.urandom(100_000))
    started = time.monotonic()
    assert api.commit(*big_batch(api, chunk)).status_code == 200
    duration = time.monotonic() - started
    outcomes: Counter[str] = Counter()
    for delay in [duration * f for f in COMMIT_FRACTIONS]:
        ops = big_batch(api, chunk)
        ids = {op["id"] for op in ops}
        key = new_id()
        body = protocol_body(key, ops)
        before = api.snapshot()[0]
        request = raw_request(server, api, "POST", "/commit", body)
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(request)
            time.sleep(delay)
            server.kill()
            answer = answer_if_any(sock)
        restart_and_check(server, "mid-commit")
        revision = api.snapshot()[0]
        present = ids & live_ids(api)
        assert present in (set(), ids), f"kill after {delay}s: {len(present)} of {len(ids)} applied"
        assert revision == before + (len(ops) if present else 0)
        if answer.startswith(b"HTTP/1.1 200"):
            assert present, f"kill after {delay}s: an acknowledged commit is gone"
        outcomes["applied before the kill" if present else "not applied"] += 1
        retried = api.post("/commit", None, content=body, headers=JSON)
        assert retried.status_code == 200, retried.text
        again = api.post("/commit", None, content=body, headers=JSON)
        assert again.json() == retried.json()
        assert api.snapshot()[0] == before + len(ops), f"kill after {delay}s: applied twice"
        assert ids <= live_ids(api)
    print(f"\nmid-commit kills ({duration:.2f} s per commit): {dict(outcomes)}")


JSON = {"content-type": "application/json"}


def protocol_body(key: str, ops: list[dict]) -> bytes:
    import json

    return json.dumps({"key": key, "device": "crash-test", "ops": ops}).encode()


async def test_sigkill_during_client_retries_applies_the_commit_once(
    crashing: tuple[ServerProcess, Api],
) -> None:
    """RemoteClient's own retry loop carries a commit across a kill and a restart."""
    server, api = crashing
    chunk = api.put_chunk(os.urandom(50_000))
    for delay in (0.05, 0.3):
        ops = big_batch(api, chunk)
        before = api.snapshot()[0]
        async with RemoteClient(
            server.url, api.library, api.token, retries=40, timeout=10, backoff=Backoff(0.05, 0.3)
        ) as client:
            async with trio.open_nursery() as nursery:

                async def crash_and_restart(delay: float) -> None:
                    await trio.sleep(delay)
                    server.kill()
                    SURVIVED["commit across a restart"] += 1
                    await trio.to_thread.run_sync(server.start)

                nursery.start_soon(crash_and_restart, delay)
                result = await client.commit(new_id(), ops, device="crash-test")
        assert result.revision == before + len(ops)
        assert api.snapshot()[0] == before + len(ops), "the commit applied twice or not at all"
        restart_check_running(server)


def restart_check_running(server: ServerProcess) -> None:
    result = ferry("admin", "--data", str(server.data_dir), "check", check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# --- mid-long-poll ------------------------------------------------------------------------------


async def test_sigkill_mid_long_poll(crashing: tuple[ServerProcess, Api]) -> None:
    """Long polls waiting when the server dies come back through the retry and see the change."""
    server, api = crashing
    cursor = api.snapshot()[0]
    seen: list[list[str]] = []

    async def poll(client: RemoteClient) -> None:
        page = await client.changes(cursor, wait=20)
        while not page.entries:
            page = await client.changes(page.cursor, wait=20)
        seen.append([e.name for e in page.entries])

    async with RemoteClient(
        server.url, api.library, api.token, retries=40, timeout=5, backoff=Backoff(0.05, 0.3)
    ) as client:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(poll, client)
                await trio.sleep(0.5)
                server.kill()
                await trio.to_thread.run_sync(restart_and_check, server, "mid-long-poll")
                await trio.sleep(0.3)
                await trio.to_thread.run_sync(api.mkdir, "after-the-crash")
    assert seen == [["after-the-crash"]] * 3
