"""SIGKILL of the server while it stores a batch upload (`chunks/upload`).

A batch is written, fsynced as a whole, renamed and only then recorded, so a
kill at any moment may leave some of its chunks on disk under their names
(complete: fsynced before the rename) but none recorded without its bytes.
After every restart the checks of `t6_server_crash` hold (every chunk file
matches its name, `chunks/tmp/` is empty, `ferry admin check` passes); an
acknowledged batch is wholly present; the client's retry of the same batch
stores it whole. `FERRY_UPLOAD_CRASH_ALL=1` tries more kill moments.
"""

from __future__ import annotations

import os
import socket
import time

import pytest

from remote import protocol
from tests.support import ServerProcess
from tests.t4_server_helpers import Api
from tests.t6_server_crash import answer_if_any, restart_and_check

pytestmark = pytest.mark.slow

#: Seconds between the last byte of the batch and the kill: while it is read, hashed,
#: written, fsynced and recorded. Each costs a restart and an `admin check` (~10 s on a
#: loaded machine), so two run by default; FERRY_UPLOAD_CRASH_ALL=1 runs all of them.
KILL_DELAYS = (
    [0.0, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3]
    if os.environ.get("FERRY_UPLOAD_CRASH_ALL")
    else [0.02, 0.15]
)
CHUNKS = 12
CHUNK_BYTES = 512 * 1024


def upload_request(api: Api, chunks: list[tuple[str, bytes]]) -> bytes:
    body = b"".join(data for _, data in chunks)
    head = (
        f"POST {api.lib}/chunks/upload HTTP/1.1\r\nHost: crash\r\n"
        f"Authorization: Bearer {api.token}\r\nContent-Length: {len(body)}\r\n"
        f"X-Ferry-Hashes: {','.join(h for h, _ in chunks)}\r\n"
        f"X-Ferry-Lengths: {','.join(str(len(d)) for _, d in chunks)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


def test_sigkill_mid_batch_upload(crashing: tuple[ServerProcess, Api]) -> None:
    server, api = crashing
    for delay in KILL_DELAYS:
        chunks = []
        for _ in range(CHUNKS):
            data = os.urandom(CHUNK_BYTES)
            chunks.append((protocol.hash_bytes(data), data))
        hashes = [h for h, _ in chunks]
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(upload_request(api, chunks))
            time.sleep(delay)
            server.kill()
            answer = answer_if_any(sock)
        restart_and_check(server, "mid-batch-upload")
        missing = api.post("/chunks/missing", {"hashes": hashes}).json()["missing"]
        if answer.startswith(b"HTTP/1.1 200"):
            assert missing == [], f"killed after {delay}s: acknowledged chunks are gone"
        for chunk_hash, data in chunks:
            if chunk_hash not in missing:
                assert api.get(f"/chunks/{chunk_hash}").content == data
        # The client's retry: the whole batch again, on a fresh connection.
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
            sock.sendall(upload_request(api, chunks))
            assert sock.makefile("rb").readline().startswith(b"HTTP/1.1 200")
        assert api.post("/chunks/missing", {"hashes": hashes}).json()["missing"] == []
        for chunk_hash, data in chunks:
            assert api.get(f"/chunks/{chunk_hash}").content == data
