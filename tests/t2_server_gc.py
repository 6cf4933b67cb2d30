"""The server's garbage collection of chunks (remote/server/collector.py), in process and live.

What must go: a purged file's content, uploads whose commit never came,
chunk files without a row. What must stay: everything a live entry, a
version (history, the trash) or another library still names, and anything
younger than the grace period.
"""

from __future__ import annotations

import os
import sqlite3
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from remote import protocol
from remote.client import RemoteClient
from remote.protocol import ROOT_ID, ChunkRef, op_create, op_delete, op_update
from remote.server import admin
from remote.server.app import FerryApp, ServerConfig
from remote.server.chunk_dir import DirectoryChunkStore
from remote.server.collector import StoreGate
from remote.server.sqlite_store import SqliteMetadataStore
from tests.support import ServerProcess, wait_for


@dataclass
class Server:
    app: FerryApp
    token: str
    data: Path
    chunks: DirectoryChunkStore

    def client(self, library: str = "docs") -> RemoteClient:
        transport = httpx.ASGITransport(app=self.app)
        return RemoteClient("http://ferry.test", library, self.token, transport=transport)


def make_server(tmp_path: Path, grace: float) -> Iterator[Server]:
    data = tmp_path / "data"
    token = admin.add_user(data, "alice")
    admin.add_library(data, "docs", "alice")
    admin.add_library(data, "other", "alice")
    meta = SqliteMetadataStore(data / "meta.sqlite")
    chunks = DirectoryChunkStore(data / "chunks")
    app = FerryApp(meta, chunks, ServerConfig(trash_retention=0.2, gc_grace=grace))
    try:
        yield Server(app, token, data, chunks)
    finally:
        meta.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    yield from make_server(tmp_path, grace=0)


async def put(client: RemoteClient, *blobs: bytes) -> list[ChunkRef]:
    refs = [ChunkRef(protocol.hash_bytes(b), len(b)) for b in blobs]
    await client.put_chunks([(r.hash, b) for r, b in zip(refs, blobs, strict=True)])
    return refs


async def create(client: RemoteClient, name: str, refs: list[ChunkRef]) -> tuple[str, int]:
    entry_id = uuid.uuid4().hex
    op = op_create(entry_id, ROOT_ID, name, "file", 0o644, 1, chunks=refs)
    result = await client.commit(uuid.uuid4().hex, [op], device="d")
    return entry_id, result.entries[0].revision


def blob(tag: str) -> bytes:
    return tag.encode() * 1000


async def test_only_what_nothing_names_is_collected(server: Server) -> None:
    async with server.client() as docs, server.client("other") as other:
        kept, shared, old, gone, abandoned = (blob(t) for t in "KSOGA")
        k_refs = await put(docs, kept, shared)
        k_id, k_rev = await create(docs, "kept", await put(docs, old, shared))
        await docs.commit(uuid.uuid4().hex, [op_update(k_id, k_rev, k_refs, 2)], device="d")
        g_id, g_rev = await create(docs, "gone", await put(docs, gone, shared))
        (a_ref,) = await put(docs, abandoned)
        await create(other, "elsewhere", await put(other, gone))  # the same bytes, elsewhere
        h = {name: protocol.hash_bytes(b) for name, b in zip("KSOGA", (kept, shared, old, gone, abandoned), strict=True)}  # fmt: skip

        freed = await server.app.collect_garbage()
        assert (freed.chunks, freed.bytes) == (1, len(abandoned))
        assert await docs.missing_chunks(list(h.values())) == [h["A"]]
        assert not server.chunks.has(h["A"])

        await docs.commit(uuid.uuid4().hex, [op_delete(g_id, g_rev)], device="d")
        assert (await server.app.collect_garbage()).chunks == 0, "the trash keeps its content"
        await trio.sleep(0.3)
        assert await server.app.purge_trash() == 1
        assert (await server.app.collect_garbage()).chunks == 0, "'other' still holds G's bytes"
        assert await docs.missing_chunks(list(h.values())) == [h["G"], h["A"]]
        for name in "KSO":  # the live file, its old version, a chunk both files had
            assert await docs.get_chunk(h[name]) == {"K": kept, "S": shared, "O": old}[name]
        assert await other.get_chunk(h["G"]) == gone
    assert admin.check(server.data) == []


async def test_a_chunk_file_without_a_row_is_collected(server: Server) -> None:
    stray = blob("X")
    key = protocol.hash_bytes(stray)
    server.chunks.put(key, stray)  # a crash between the file and its row
    assert (await server.app.collect_garbage()).chunks == 1
    assert not server.chunks.has(key)


async def test_nothing_younger_than_the_grace_is_collected(tmp_path: Path) -> None:
    for server in make_server(tmp_path, grace=3600):
        async with server.client() as docs:
            (ref,) = await put(docs, blob("A"))
            server.chunks.put(protocol.hash_bytes(blob("X")), blob("X"))
            assert (await server.app.collect_garbage()).chunks == 0
            assert await docs.missing_chunks([ref.hash]) == []
            await create(docs, "late", [ref])  # the commit that was still on its way
        assert admin.check(server.data) == []


async def test_uploads_and_a_collection_take_turns() -> None:
    gate = StoreGate()
    order: list[str] = []
    async with trio.open_nursery() as nursery:
        async with gate.storing():

            async def collect() -> None:
                async with gate.collecting():
                    order.append("collect")
                    await trio.sleep(0.05)
                    order.append("collected")

            async def store() -> None:
                async with gate.storing():
                    order.append("second store")

            nursery.start_soon(collect)
            await trio.sleep(0.05)
            nursery.start_soon(store)
            await trio.sleep(0.05)
            order.append("first store done")
    assert order == ["first store done", "collect", "collected", "second store"]


def test_a_version_1_database_gets_added_at(tmp_path: Path) -> None:
    data = tmp_path / "data"
    admin.add_user(data, "alice")
    admin.add_library(data, "docs", "alice")
    path = data / "meta.sqlite"
    with sqlite3.connect(path) as db:  # what schema 1 had
        db.execute("INSERT INTO library_chunks (library_id, hash, size) VALUES (1, 'ab', 2)")
        db.execute("ALTER TABLE library_chunks DROP COLUMN added_at")
        db.execute("PRAGMA user_version=1")
    before = time.time()
    meta = SqliteMetadataStore(path)
    try:
        (added,) = meta._conn.execute("SELECT added_at FROM library_chunks").fetchone()
        assert added >= before, "chunks from before the upgrade count as new"
        assert meta._conn.execute("PRAGMA user_version").fetchone()[0] == 2
    finally:
        meta.close()


def test_a_live_server_collects_on_its_own(tmp_path: Path) -> None:
    server = ServerProcess(
        tmp_path / "data", args=("--gc-grace-hours", "0", "--maintenance-interval", "0.2")
    )
    server.start()
    try:
        token = server.add_user("alice")
        server.admin("add-library", "docs", "--owner", "alice")
        data = os.urandom(100_000)
        key = protocol.hash_bytes(data)

        async def upload() -> None:
            async with RemoteClient(server.url, "docs", token) as client:
                await client.put_chunks([(key, data)])

        trio.run(upload)
        chunk_file = server.data_dir / "chunks" / key[:2] / key[2:4] / key
        wait_for(lambda: not chunk_file.exists(), 10, "the abandoned upload to be collected")
        wait_for(lambda: "deleted 1 chunk(s)" in server.log(), 5, "the collection to be logged")
    finally:
        server.stop()
