"""The wire tuned for throughput (issue 8): wide client reads, kept-alive connections,
batch answers sent piece by piece, cached token and library lookups.

Real `ferry serve` processes where the HTTP stack is the point (big bodies,
keep-alive through a counting proxy); the in-process app where only the
application's behaviour matters.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpcore
import httpx
import trio

from remote import protocol
from remote.client import READ_BYTES, RemoteClient, _WideReadStream
from remote.errors import NotFound
from remote.server import admin
from remote.server.app import FerryApp
from remote.server.asgi import Response
from remote.server.chunk_dir import DirectoryChunkStore
from remote.server.sqlite_store import SqliteMetadataStore
from tests.conftest import Library
from tools.benchlib.proxy import CountingProxy


class _RecordingStream(httpcore.AsyncNetworkStream):
    """A network stream that remembers how many bytes each read asked for."""

    def __init__(self) -> None:
        self.asked: list[int] = []
        self.written: list[bytes] = []

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        self.asked.append(max_bytes)
        return b"x"

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        self.written.append(buffer)

    async def aclose(self) -> None:
        pass


async def test_reads_are_widened_and_writes_pass_through() -> None:
    inner = _RecordingStream()
    stream = _WideReadStream(inner)
    assert await stream.read(65536) == b"x"
    assert await stream.read(READ_BYTES * 2) == b"x"
    await stream.write(b"request")
    assert inner.asked == [READ_BYTES, READ_BYTES * 2]
    assert inner.written == [b"request"]


async def test_big_chunks_cross_the_real_wire_intact_many_in_flight(library: Library) -> None:
    sizes = [protocol.MAX_CHUNK_SIZE, 4 * 1024 * 1024 + 17, 1024 * 1024, 1, 65537, 3 * READ_BYTES]
    blobs = [os.urandom(n) for n in sizes]
    hashes = [protocol.hash_bytes(b) for b in blobs]
    got: dict[str, bytes] = {}
    async with RemoteClient(library.server.url, "docs", library.token) as client:
        async with trio.open_nursery() as nursery:
            for h, b in zip(hashes, blobs, strict=True):
                nursery.start_soon(client.put_chunk, h, b)
        assert await client.missing_chunks(hashes) == []

        async def fetch(h: str) -> None:
            got[h] = await client.get_chunk(h)

        async with trio.open_nursery() as nursery:
            for h in hashes * 2:
                nursery.start_soon(fetch, h)
        batch = await client.get_chunks([hashes[3], *hashes, hashes[3]])
    assert [got[h] for h in hashes] == blobs
    assert batch == [blobs[3], *blobs, blobs[3]]


async def test_one_connection_carries_more_than_a_thousand_requests(library: Library) -> None:
    """hypercorn closes a connection after 1000 requests unless told otherwise."""
    port = int(library.server.url.rsplit(":", 1)[1])
    proxy = CountingProxy(("127.0.0.1", port)).start()
    try:
        url = f"http://127.0.0.1:{proxy.port}"
        async with RemoteClient(url, "docs", library.token) as client:
            data = b"kept alive"
            await client.put_chunk(protocol.hash_bytes(data), data)
            for _ in range(1100):
                await client.capabilities()
            assert await client.missing_chunks([protocol.hash_bytes(data)]) == []
        assert proxy.counters()["connections"] == 1  # chunk GETs would add their own (raw)
    finally:
        proxy.stop()


async def test_batch_answer_goes_out_as_one_message_per_chunk_with_the_total_length() -> None:
    messages: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    parts = [b"a" * 10, b"", b"b" * 5]
    await Response(200, headers=[("x-ferry-lengths", "10,0,5")], parts=parts).send(send)
    start, *bodies = messages
    assert (b"content-length", b"15") in start["headers"]
    assert [m["body"] for m in bodies] == parts
    assert [m.get("more_body", False) for m in bodies] == [True, True, False]
    messages.clear()
    await Response(200, parts=parts).send(send, head=True)
    assert (b"content-length", b"15") in messages[0]["headers"]
    assert [m["body"] for m in messages[1:]] == [b""]


async def test_a_library_or_token_created_while_serving_works_at_once(tmp_path: Path) -> None:
    """Only found tokens and libraries are cached: a miss must not stick."""
    data = tmp_path / "data"
    token = admin.add_user(data, "alice")
    meta = SqliteMetadataStore(data / "meta.sqlite")
    app = FerryApp(meta, DirectoryChunkStore(data / "chunks"))
    transport = httpx.ASGITransport(app=app)
    try:
        async with RemoteClient("http://t", "late", token, transport=transport) as client:
            try:
                await client.library_info()
            except NotFound:
                pass
            else:
                raise AssertionError("a library that does not exist yet answered")
            admin.add_library(data, "late", "alice")
            assert (await client.library_info())["name"] == "late"
        second = admin.add_token(data, "alice")
        async with RemoteClient("http://t", "late", second, transport=transport) as client:
            assert (await client.library_info())["role"] == "owner"
    finally:
        meta.close()
