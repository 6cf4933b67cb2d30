"""RemoteClient: every method against the in-process app, the error tree, retries, timeouts.

The app runs in-process through `httpx.ASGITransport` (the wire itself is
covered by t4_server_protocol); retries and failures use `httpx.MockTransport`
and a port nobody listens on.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from remote import protocol
from remote.client import RemoteClient, split_library_url
from remote.errors import (
    CommitConflict,
    Forbidden,
    HashMismatch,
    MissingChunks,
    NotFound,
    PayloadTooLarge,
    ServerRefused,
    ServerUnreachable,
    Unauthorized,
)
from remote.protocol import ROOT_ID, ChunkRef, op_create, op_delete, op_setattr, op_update
from remote.retry import Backoff, retry_after_seconds
from remote.server import admin
from remote.server.app import FerryApp, ServerConfig
from remote.server.chunk_dir import DirectoryChunkStore
from remote.server.sqlite_store import SqliteMetadataStore
from tests.support import free_port
from vfs.sync.online import Connectivity

FAST = Backoff(first=0.001, cap=0.002)


@dataclass
class Setup:
    app: FerryApp
    owner: str
    reader: str
    data_dir: Path

    def client(self, token: str, **kw) -> RemoteClient:
        transport = httpx.ASGITransport(app=self.app)
        return RemoteClient("http://ferry.test", "docs", token, transport=transport, **kw)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    data = tmp_path / "data"
    owner = admin.add_user(data, "alice")
    reader = admin.add_user(data, "bob")
    admin.add_library(data, "docs", "alice")
    admin.share(data, "docs", "bob", "read")
    meta = SqliteMetadataStore(data / "meta.sqlite")
    app = FerryApp(meta, DirectoryChunkStore(data / "chunks"), ServerConfig(max_batch_bytes=1000))
    try:
        yield Setup(app, owner, reader, data)
    finally:
        meta.close()


@pytest.fixture
async def client(setup: Setup) -> AsyncIterator[RemoteClient]:
    async with setup.client(setup.owner) as c:
        yield c


def key() -> str:
    return uuid.uuid4().hex


async def upload(client: RemoteClient, *blobs: bytes) -> list[ChunkRef]:
    refs = [ChunkRef(protocol.hash_bytes(b), len(b)) for b in blobs]
    missing = set(await client.missing_chunks([r.hash for r in refs]))
    for ref, blob in zip(refs, blobs, strict=True):
        if ref.hash in missing:
            await client.put_chunk(ref.hash, blob)
    return refs


def test_split_library_url() -> None:
    assert split_library_url("http://127.0.0.1:8800/docs") == ("http://127.0.0.1:8800", "docs")
    with pytest.raises(ValueError):
        split_library_url("http://127.0.0.1:8800/")


async def test_round_trip_of_every_method(client: RemoteClient) -> None:
    caps = await client.capabilities()
    assert caps["protocol"] == protocol.PROTOCOL_VERSION
    info = await client.library_info()
    assert info["root"] == ROOT_ID and info["role"] == "owner"
    blobs = [b"a" * 600, b"b" * 600, b"c" * 10]
    refs = await upload(client, *blobs)
    assert await client.missing_chunks([r.hash for r in refs]) == []
    file_id = uuid.uuid4().hex
    result = await client.commit(
        key(), [op_create(file_id, ROOT_ID, "f", "file", 0o644, 1, chunks=refs)], device="dev"
    )
    entry = result.entries[0]
    assert result.revision == entry.revision and entry.size == 1210
    assert await client.get_manifest(entry.manifest or "") == refs
    assert await client.get_chunk(refs[0].hash) == blobs[0]
    # max_batch_bytes=1000 forces the client to ask three times
    before = client.stats.requests
    assert await client.get_chunks([r.hash for r in refs]) == blobs
    assert client.stats.requests - before == 2
    page = await client.changes(0)
    assert {e.id for e in page.entries} == {ROOT_ID, file_id} and not page.more
    new = await upload(client, b"new content")
    updated = (
        await client.commit(key(), [op_update(file_id, entry.revision, new, 2)], device="dev")
    ).entries[0]
    versions = await client.versions(file_id)
    assert [v.revision for v in versions] == [updated.revision, entry.revision]
    restored = await client.restore_version(
        file_id, entry.revision, base=updated.revision, key=key(), device="dev"
    )
    assert restored.manifest == entry.manifest
    await client.commit(key(), [op_delete(file_id, restored.revision)], device="dev")
    assert [e.id for e in await client.trash()] == [file_id]
    back = await client.undelete(file_id, key=key(), device="dev")
    assert back.deleted is False and back.name == "f"
    assert client.stats.bytes_sent > 1210 and client.stats.bytes_received > 1210


async def test_long_poll_returns_on_commit(client: RemoteClient, setup: Setup) -> None:
    cursor = (await client.library_info())["revision"]
    pages = []

    async def poll() -> None:
        pages.append(await client.changes(cursor, wait=5))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll)
        await trio.sleep(0.2)
        with trio.fail_after(2):
            op = op_create(uuid.uuid4().hex, ROOT_ID, "d", "dir", 0o755, 1)
            await client.commit(key(), [op], device="dev")
    assert len(pages[0].entries) == 1 and pages[0].cursor == cursor + 1


async def test_refusals_map_to_the_error_tree(client: RemoteClient, setup: Setup) -> None:
    with pytest.raises(CommitConflict) as conflict:
        await client.commit(key(), [op_setattr(ROOT_ID, 99, mode=0o700)], device="dev")
    assert conflict.value.status == 409 and conflict.value.op_index == 0
    assert conflict.value.current is not None and conflict.value.current.id == ROOT_ID
    lacking = ChunkRef(protocol.hash_bytes(b"nope"), 4)
    with pytest.raises(MissingChunks) as missing:
        op = op_create(uuid.uuid4().hex, ROOT_ID, "f", "file", 0o644, 1, chunks=[lacking])
        await client.commit(key(), [op], device="dev")
    assert missing.value.missing == [lacking.hash]
    with pytest.raises(HashMismatch):
        await client.put_chunk(lacking.hash, b"other")
    with pytest.raises(PayloadTooLarge):
        big = b"x" * (protocol.MAX_CHUNK_SIZE + 1)
        await client.put_chunk(protocol.hash_bytes(big), big)
    with pytest.raises(NotFound):
        await client.get_chunk(lacking.hash)
    with pytest.raises(ServerRefused) as bad:
        await client.get_manifest("nothex")
    assert bad.value.status == 400 and bad.value.code == "bad_request"
    async with setup.client("wrong-token") as stranger:
        with pytest.raises(Unauthorized):
            await stranger.library_info()
    async with setup.client(setup.reader) as reader:
        assert (await reader.library_info())["role"] == "read"
        with pytest.raises(Forbidden):
            await reader.put_chunk(protocol.hash_bytes(b"x"), b"x")


async def test_downloaded_bytes_are_verified() -> None:
    good = b"the real chunk"
    h = protocol.hash_bytes(good)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/batch"):
            return httpx.Response(200, content=b"tampered", headers={"X-Ferry-Lengths": "8"})
        return httpx.Response(200, content=b"tampered")

    async with RemoteClient(
        "http://x", "docs", "t", transport=httpx.MockTransport(handler)
    ) as client:
        with pytest.raises(HashMismatch):
            await client.get_chunk(h)
        with pytest.raises(HashMismatch):
            await client.get_chunks([h])


async def test_transient_failures_are_retried() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            raise httpx.ConnectError("refused", request=request)
        if len(calls) == 2:
            return httpx.Response(503, json={"error": "busy", "message": "try later"})
        return httpx.Response(200, json={"protocol": 1})

    async with RemoteClient(
        "http://x", "docs", "t", transport=httpx.MockTransport(handler), backoff=FAST
    ) as client:
        assert await client.capabilities() == {"protocol": 1}
    assert len(calls) == 3 and client.stats.requests == 3


async def test_retry_after_is_waited_out_or_ends_the_request() -> None:
    """A short Retry-After is honoured between retries (not the millisecond backoff); a long
    one ends the request at once, carrying the wait for the drive's probes."""
    calls: list[float] = []
    asked = "1"

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(time.monotonic())
        if len(calls) == 1:
            return httpx.Response(429, headers={"Retry-After": asked}, json={"error": "slow"})
        return httpx.Response(200, json={"protocol": 1})

    async with RemoteClient(
        "http://x", "docs", "t", transport=httpx.MockTransport(handler), backoff=FAST
    ) as client:
        assert await client.capabilities() == {"protocol": 1}
        assert len(calls) == 2 and calls[1] - calls[0] >= 0.95
        calls.clear()
        asked = "120"
        with pytest.raises(ServerUnreachable, match="left alone for 120 s") as info:
            await client.capabilities()
    assert len(calls) == 1 and info.value.retry_after == 120
    connectivity = Connectivity()
    connectivity.report_failure(info.value)
    assert not connectivity.online and connectivity.probe_delay() > 115


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("120", 120.0),
        (" 0 ", 0.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 30.0),
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),  # in the past: no wait
        ("soon", None),
        ("-5", None),
        ("1.5", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_header_forms(header: str | None, seconds: float | None) -> None:
    now = datetime(2015, 10, 21, 7, 27, 30, tzinfo=UTC).timestamp()
    assert retry_after_seconds(header, now=now) == seconds


async def test_a_retried_batch_upload_sends_every_piece_again() -> None:
    """put_chunks streams its chunks as separate body pieces; a retry must not resume mid-way."""
    chunks = [(protocol.hash_bytes(b), b) for b in (b"first", b"", b"second chunk", b"third")]
    bodies: list[bytes] = []

    class ReadsTheStream(httpx.AsyncBaseTransport):
        """Iterates the request body as httpcore does (MockTransport reads a cached copy)."""

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            body = b"".join([bytes(piece) async for piece in request.stream])
            bodies.append(body)
            assert int(request.headers["Content-Length"]) == len(body)
            if len(bodies) == 1:
                return httpx.Response(503, json={"error": "busy", "message": "try later"})
            return httpx.Response(200, json={"received": 4, "stored": 4})

    async with RemoteClient(
        "http://x", "docs", "t", transport=ReadsTheStream(), backoff=FAST
    ) as client:
        await client.put_chunks(chunks)
    whole = b"".join(data for _, data in chunks)
    assert bodies == [whole, whole]
    assert client.stats.bytes_sent > 2 * len(whole)


async def test_commit_retry_after_a_lost_answer_applies_once(setup: Setup) -> None:
    """The first answer is lost on the way back; the retry gets the stored result."""
    inner = httpx.ASGITransport(app=setup.app)
    lost = []

    class LoseFirstAnswer(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            response = await inner.handle_async_request(request)
            if request.url.path.endswith("/commit") and not lost:
                await response.aread()
                lost.append(response)
                raise httpx.ReadError("connection reset", request=request)
            return response

    async with RemoteClient(
        "http://x", "docs", setup.owner, transport=LoseFirstAnswer(), backoff=FAST
    ) as client:
        op = op_create(uuid.uuid4().hex, ROOT_ID, "once", "dir", 0o755, 1)
        result = await client.commit("journal-7", [op], device="dev")
        assert result.revision == 2
        assert (await client.library_info())["revision"] == 2
    assert lost and lost[0].status_code == 200


async def test_unreachable_after_retries() -> None:
    port = free_port()  # nobody listens here
    async with RemoteClient(f"http://127.0.0.1:{port}", "docs", "t", retries=2, backoff=FAST) as c:
        with pytest.raises(ServerUnreachable) as exc:
            await c.library_info()
    assert c.stats.requests == 3 and str(port) in str(exc.value)


async def test_gateway_errors_end_unreachable_but_500_is_refused() -> None:
    statuses = iter([502, 504, 503, 500])

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(next(statuses), text="gateway says no")

    async with RemoteClient(
        "http://x", "docs", "t", retries=2, transport=httpx.MockTransport(handler), backoff=FAST
    ) as client:
        with pytest.raises(ServerUnreachable):
            await client.library_info()
        with pytest.raises(ServerRefused) as refused:
            await client.library_info()
    assert refused.value.status == 500 and not isinstance(refused.value, ServerUnreachable)


async def _answer_slowly(stream: trio.SocketStream) -> None:
    """A one-shot HTTP server that takes 0.6 s to answer any request."""
    await stream.receive_some(65536)
    await trio.sleep(0.6)
    body = b'{"entries": [], "cursor": 0, "more": false}'
    head = f"HTTP/1.1 200 OK\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
    await stream.send_all(head.encode() + body)
    await stream.aclose()


async def test_read_timeout_is_unreachable_but_long_poll_outlives_it() -> None:
    async with trio.open_nursery() as nursery:
        serve = partial(trio.serve_tcp, _answer_slowly, 0, host="127.0.0.1")
        listeners = await nursery.start(serve)
        port = listeners[0].socket.getsockname()[1]
        async with RemoteClient(
            f"http://127.0.0.1:{port}", "docs", "t", timeout=0.2, retries=1, backoff=FAST
        ) as client:
            # A long poll's read timeout is the wait plus the client timeout.
            page = await client.changes(0, wait=0.5)
            assert page.entries == [] and client.stats.requests == 1
            with pytest.raises(ServerUnreachable) as exc:
                await client.library_info()
            assert "ReadTimeout" in str(exc.value) and client.stats.requests == 3
        nursery.cancel_scope.cancel()
