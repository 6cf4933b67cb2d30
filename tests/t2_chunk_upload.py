"""`POST chunks/upload` in-process: many chunks per request, all verified before any is stored.

The app runs through `httpx.ASGITransport` on a fresh store per test, and the
real `RemoteClient.put_chunks` is used where the client's encoding matters.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from remote import protocol
from remote.client import RemoteClient
from remote.server import admin
from remote.server.app import FerryApp, ServerConfig
from remote.server.chunk_dir import DirectoryChunkStore
from remote.server.sqlite_store import SqliteMetadataStore


@pytest.fixture
def app(tmp_path: Path) -> Iterator[tuple[FerryApp, dict[str, str], Path]]:
    data = tmp_path / "data"
    token = admin.add_user(data, "alice")
    admin.add_library(data, "docs", "alice")
    reader = admin.add_user(data, "bob")
    admin.share(data, "docs", "bob", "read")
    meta = SqliteMetadataStore(data / "meta.sqlite")
    tokens = {"alice": token, "bob": reader}
    yield FerryApp(meta, DirectoryChunkStore(data / "chunks"), ServerConfig()), tokens, data
    meta.close()


def http(app: FerryApp, token: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://t",
        headers={"Authorization": f"Bearer {token}"},
    )


def upload_headers(chunks: list[tuple[str, bytes]]) -> dict[str, str]:
    return {
        "X-Ferry-Hashes": ",".join(h for h, _ in chunks),
        "X-Ferry-Lengths": ",".join(str(len(d)) for _, d in chunks),
    }


def blobs(*sizes: int) -> list[tuple[str, bytes]]:
    out = []
    for size in sizes:
        data = os.urandom(size)
        out.append((protocol.hash_bytes(data), data))
    return out


async def missing(client: httpx.AsyncClient, chunks: list[tuple[str, bytes]]) -> list[str]:
    answer = await client.post(
        "/v1/libraries/docs/chunks/missing", json={"hashes": [h for h, _ in chunks]}
    )
    return answer.json()["missing"]


async def test_client_uploads_many_chunks_in_one_request(app) -> None:
    ferry, tokens, data = app
    chunks = blobs(1, 5000, 300_000, 2 * 1024 * 1024)
    transport = httpx.ASGITransport(app=ferry)
    async with RemoteClient("http://t", "docs", tokens["alice"], transport=transport) as client:
        before = client.stats.requests
        await client.put_chunks(chunks + chunks[:1])  # a repeat in the batch is harmless
        assert client.stats.requests - before == 1
        assert await client.missing_chunks([h for h, _ in chunks]) == []
        for chunk_hash, payload in chunks:
            assert await client.get_chunk(chunk_hash) == payload
    assert not any((data / "chunks" / "tmp").iterdir()), "temporary files left behind"


async def test_one_bad_chunk_refuses_the_whole_batch(app) -> None:
    ferry, tokens, _ = app
    chunks = blobs(1000, 2000, 3000)
    damaged = [chunks[0], (chunks[1][0], b"x" + chunks[1][1][1:]), chunks[2]]
    async with http(ferry, tokens["alice"]) as client:
        answer = await client.post(
            "/v1/libraries/docs/chunks/upload",
            content=b"".join(d for _, d in damaged),
            headers=upload_headers(damaged),
        )
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"] == "hash_mismatch"
        assert await missing(client, chunks) == [h for h, _ in chunks]


@pytest.mark.parametrize(
    ("change", "status", "code"),
    [
        ("short body", 400, "bad_request"),
        ("lengths missing", 400, "bad_request"),
        ("bad hash", 400, "bad_request"),
        ("empty chunk", 400, "empty_chunk"),
        ("too many chunks", 413, "too_many_hashes"),
        ("chunk too big", 413, "payload_too_large"),
    ],
)
async def test_malformed_uploads_are_refused_and_store_nothing(app, change, status, code) -> None:
    ferry, tokens, data = app
    chunks = blobs(100, 200)
    headers = upload_headers(chunks)
    body = b"".join(d for _, d in chunks)
    if change == "short body":
        body = body[:-1]
    elif change == "lengths missing":
        del headers["X-Ferry-Lengths"]
    elif change == "bad hash":
        headers["X-Ferry-Hashes"] = "zz," + chunks[1][0]
    elif change == "empty chunk":
        headers["X-Ferry-Lengths"] = "0,300"
    elif change == "too many chunks":
        many = [chunks[0]] * (protocol.MAX_UPLOAD_CHUNKS + 1)
        headers, body = upload_headers(many), chunks[0][1] * len(many)
    elif change == "chunk too big":
        headers["X-Ferry-Lengths"] = f"{protocol.MAX_CHUNK_SIZE + 1},200"
    async with http(ferry, tokens["alice"]) as client:
        answer = await client.post(
            "/v1/libraries/docs/chunks/upload", content=body, headers=headers
        )
        assert (answer.status_code, answer.json()["error"]) == (status, code), answer.text
        assert await missing(client, chunks) == [h for h, _ in chunks]
    assert not any((data / "chunks" / "tmp").iterdir())


async def test_a_reader_cannot_upload(app) -> None:
    ferry, tokens, _ = app
    chunks = blobs(100)
    async with http(ferry, tokens["bob"]) as client:
        answer = await client.post(
            "/v1/libraries/docs/chunks/upload",
            content=chunks[0][1],
            headers=upload_headers(chunks),
        )
        assert answer.status_code == 403
    async with http(ferry, tokens["alice"]) as client:
        assert await missing(client, chunks) == [chunks[0][0]]
