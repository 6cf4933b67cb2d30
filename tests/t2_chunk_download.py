"""Chunk bodies over the raw HTTP/1.1 path (remote/chunk_download.py), against real sockets.

A small scripted HTTP server on 127.0.0.1 answers each request with what the
test chose (right bytes, wrong bytes, a cut-off body, an error status, a
closed connection), so every way the raw path can fail is exercised on the
wire, including the fall-back to httpx and the hash check that keeps wrong
bytes from any reader. One test runs against a real `ferry serve`.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from cache.store import ChunkCache, ChunkVerifyError
from remote import protocol
from remote.client import RemoteClient
from remote.errors import HashMismatch, NotFound, ServerUnreachable
from remote.retry import Backoff
from tests.conftest import Library

FAST = Backoff(first=0.01, cap=0.02)
DATA = os.urandom(300_000)
HASH = protocol.hash_bytes(DATA)

#: One scripted answer: the bytes to send, then whether to close the connection.
Answer = Callable[[str], tuple[bytes, bool]]


def ok(body: bytes, *, close: bool = False, lengths: list[int] | None = None) -> tuple[bytes, bool]:
    head = f"HTTP/1.1 200 \r\ncontent-length: {len(body)}\r\ncontent-type: application/octet-stream\r\n"
    if lengths is not None:
        head += f"x-ferry-lengths: {','.join(map(str, lengths))}\r\n"
    if close:
        head += "connection: close\r\n"
    return head.encode() + b"\r\n" + body, close


@dataclass
class Scripted:
    """The server's state: what to answer, what it was asked, how many connections it saw."""

    answer: Answer
    paths: list[str] = field(default_factory=list)
    #: The request bodies, in order (empty for GETs).
    bodies: list[bytes] = field(default_factory=list)
    connections: int = 0
    port: int = 0
    #: Close every connection after this many answers (a server's keep-alive limit).
    close_after: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        buffer = b""
        answered = 0
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode()
                self.paths.append(path)
                length = int(_header(head, b"content-length") or 0)
                while len(buffer) < length:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buffer += data
                self.bodies.append(buffer[:length])
                buffer = buffer[length:]
                reply, close = self.answer(path)
                await stream.send_all(reply)
                answered += 1
                if close or (self.close_after is not None and answered >= self.close_after):
                    return
        except trio.BrokenResourceError:
            return
        finally:
            await stream.aclose()


def _header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


@pytest.fixture
async def scripted(nursery: trio.Nursery) -> AsyncIterator[Scripted]:
    server = Scripted(lambda path: ok(DATA))
    listeners = await nursery.start(partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1"))
    server.port = listeners[0].socket.getsockname()[1]
    yield server
    nursery.cancel_scope.cancel()


def client_for(server: Scripted) -> RemoteClient:
    return RemoteClient(server.url, "docs", "tok", backoff=FAST, retries=1, timeout=5)


async def test_bodies_arrive_whole_over_one_kept_alive_connection(scripted: Scripted) -> None:
    async with client_for(scripted) as client:
        for _ in range(5):
            assert await client.get_chunk(HASH) == DATA
        assert client._raw is not None and client._raw.requests == 5
    assert scripted.connections == 1
    assert scripted.paths == [f"/v1/libraries/docs/chunks/{HASH}"] * 5


async def test_wrong_bytes_never_reach_a_reader(scripted: Scripted, tmp_path: Path) -> None:
    scripted.answer = lambda path: ok(DATA[:-1] + b"!")
    cache = ChunkCache.open(tmp_path / "cache", capacity=1 << 30)
    try:
        async with client_for(scripted) as client:
            with pytest.raises(HashMismatch):
                await client.get_chunk(HASH)
            with pytest.raises(ChunkVerifyError):
                await cache.get_or_fetch(HASH, client.download_chunk)
        assert not cache.contains(HASH)
    finally:
        cache.close()


async def test_a_cut_off_body_is_asked_again_and_ends_unreachable(scripted: Scripted) -> None:
    scripted.answer = lambda path: (ok(DATA)[0][:-1000], True)
    async with client_for(scripted) as client:
        with pytest.raises(ServerUnreachable):
            await client.download_chunk(HASH)
    # the raw try, then httpx's first attempt and its one retry
    assert len(scripted.paths) == 3


async def test_an_error_status_is_answered_through_httpx(scripted: Scripted) -> None:
    body = b'{"error":"no_such_chunk","message":"library docs has no such chunk"}'
    head = f"HTTP/1.1 404 \r\ncontent-length: {len(body)}\r\ncontent-type: application/json\r\n\r\n"
    scripted.answer = lambda path: (head.encode() + body, False)
    async with client_for(scripted) as client:
        with pytest.raises(NotFound):
            await client.download_chunk(HASH)
    assert len(scripted.paths) == 2  # raw, then httpx (which maps the error)


async def test_a_connection_the_server_closed_is_replaced(scripted: Scripted) -> None:
    scripted.close_after = 1  # the server drops every connection after one answer, silently
    async with client_for(scripted) as client:
        for _ in range(3):
            assert await client.download_chunk(HASH) == DATA
        assert client._raw is not None and client._raw.requests == 5  # 3 + 2 stale tries
    assert scripted.connections == 3  # no request went through httpx


async def test_connection_close_is_honoured(scripted: Scripted) -> None:
    scripted.answer = lambda path: ok(DATA, close=True)
    async with client_for(scripted) as client:
        for _ in range(3):
            assert await client.download_chunk(HASH) == DATA
        assert client._raw is not None and client._raw.requests == 3
    assert scripted.connections == 3


async def test_real_server_chunks_come_over_the_raw_path(library: Library) -> None:
    blobs = [os.urandom(n) for n in (1, 65537, 1024 * 1024, protocol.MAX_CHUNK_SIZE)]
    hashes = [protocol.hash_bytes(b) for b in blobs]
    async with RemoteClient(library.server.url, "docs", library.token) as client:
        for h, b in zip(hashes, blobs, strict=True):
            await client.put_chunk(h, b)
        got = [await client.get_chunk(h) for h in hashes]
        assert client._raw is not None and client._raw.requests == len(hashes)
        with pytest.raises(NotFound):
            await client.get_chunk(protocol.hash_bytes(b"never uploaded"))
    assert got == blobs


# --- batches of chunks (`download_chunks`: read-ahead) -------------------------------------

BLOBS = [os.urandom(n) for n in (70_000, 1, 250_000)]
HASHES = [protocol.hash_bytes(b) for b in BLOBS]
BATCH_PATH = "/v1/libraries/docs/chunks/batch"


def batch(blobs: list[bytes]) -> tuple[bytes, bool]:
    return ok(b"".join(blobs), lengths=[len(b) for b in blobs])


async def test_a_batch_comes_over_the_raw_path_split_into_its_chunks(scripted: Scripted) -> None:
    scripted.answer = lambda path: batch(BLOBS)
    async with client_for(scripted) as client:
        for _ in range(2):
            assert await client.download_chunks(HASHES) == BLOBS
        assert client._raw is not None and client._raw.requests == 2
    assert scripted.connections == 1 and scripted.paths == [BATCH_PATH] * 2
    assert json.loads(scripted.bodies[0]) == {"hashes": HASHES}


async def test_a_prefix_answer_is_followed_by_a_request_for_the_rest(scripted: Scripted) -> None:
    answers = iter([batch(BLOBS[:2]), batch(BLOBS[2:])])
    scripted.answer = lambda path: next(answers)
    async with client_for(scripted) as client:
        assert await client.download_chunks(HASHES) == BLOBS
    assert [json.loads(b)["hashes"] for b in scripted.bodies] == [HASHES, HASHES[2:]]


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param(lambda: (batch(BLOBS)[0][:-1000], True), id="cut"),
        pytest.param(lambda: ok(b"".join(BLOBS), lengths=[70_000, 250_002]), id="bad-lengths"),
        pytest.param(lambda: ok(b"".join(BLOBS)), id="no-lengths"),
    ],
)
async def test_a_broken_batch_answer_is_asked_again_through_httpx(
    scripted: Scripted, broken: Callable[[], tuple[bytes, bool]]
) -> None:
    answers = iter([broken(), batch(BLOBS)])
    scripted.answer = lambda path: next(answers)
    async with client_for(scripted) as client:
        assert await client.download_chunks(HASHES) == BLOBS
    assert scripted.paths == [BATCH_PATH] * 2  # raw, then httpx


async def test_a_damaged_chunk_in_a_read_ahead_batch_reaches_no_reader(
    scripted: Scripted, tmp_path: Path
) -> None:
    """The reader waiting for the damaged chunk gets ChunkVerifyError (EIO), the others
    their bytes; the damaged one is not cached, and asking again fetches it again."""
    damaged = [BLOBS[0], BLOBS[1], BLOBS[2][:-1] + b"!"]
    scripted.answer = lambda path: batch(damaged) if path == BATCH_PATH else ok(BLOBS[2])
    cache = ChunkCache.open(tmp_path / "cache", capacity=1 << 30)
    got: dict[str, bytes | BaseException] = {}

    async def reader(h: str) -> None:
        try:
            got[h] = await cache.get_or_fetch(h, client.download_chunk)
        except ChunkVerifyError as exc:
            got[h] = exc

    try:
        async with client_for(scripted) as client, trio.open_nursery() as nursery:
            await nursery.start(cache.run)
            cache.prefetch_batches(
                [(h, len(b)) for h, b in zip(HASHES, BLOBS, strict=True)], client.download_chunks
            )
            await trio.testing.wait_all_tasks_blocked()
            async with trio.open_nursery() as readers:
                for h in HASHES:
                    readers.start_soon(reader, h)
            assert not cache.contains(HASHES[2])
            assert await cache.get_or_fetch(HASHES[2], client.download_chunk) == BLOBS[2]
            nursery.cancel_scope.cancel()
        assert isinstance(got[HASHES[2]], ChunkVerifyError)
        assert [got[h] for h in HASHES[:2]] == BLOBS[:2]
        assert scripted.paths == [BATCH_PATH, f"/v1/libraries/docs/chunks/{HASHES[2]}"]
    finally:
        cache.close()


async def test_real_server_batches_come_over_the_raw_path(library: Library) -> None:
    blobs = [os.urandom(n) for n in (1, 65537, 1024 * 1024, 3 * 1024 * 1024)]
    hashes = [protocol.hash_bytes(b) for b in blobs]
    async with RemoteClient(library.server.url, "docs", library.token) as client:
        await client.put_chunks(list(zip(hashes, blobs, strict=True)))
        got = await client.download_chunks([*hashes, hashes[0]])
        assert client._raw is not None and client._raw.requests == 1
        with pytest.raises(NotFound):
            await client.download_chunks([hashes[0], protocol.hash_bytes(b"never uploaded")])
    assert got == [*blobs, blobs[0]]
