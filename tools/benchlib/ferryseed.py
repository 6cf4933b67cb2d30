"""Put the benchmark's inputs on a ferry server through its own API, as rclone's are put in the
directory its server serves: both systems start from data already on the server, and the seed
does not depend on the drive's upload path (which the write rows measure separately).

Files are cut with the drive's own chunker (`cache.chunking.Chunker`), so a later edit through
the mount deduplicates against these chunks exactly as it would against chunks it uploaded.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import trio

from remote import protocol
from remote.client import RemoteClient
from remote.server.chunk_dir import DirectoryChunkStore
from remote.server.sqlite_store import SqliteMetadataStore

#: Bytes of chunk data gathered before asking the server which it lacks and sending those.
_BATCH_BYTES = 64 * 1024 * 1024
_PARALLEL_PUTS = 8


class _Uploader:
    """Batches chunks, sends the missing ones several at a time, then commits ops in order."""

    def __init__(self, client: RemoteClient) -> None:
        self.client = client
        self.chunks: dict[str, bytes] = {}
        self.pending = 0
        self.ops: list[dict[str, Any]] = []

    async def add_chunk(self, chunk_hash: str, data: bytes) -> None:
        if chunk_hash not in self.chunks:
            self.chunks[chunk_hash] = data
            self.pending += len(data)
        if self.pending >= _BATCH_BYTES:
            await self.send_chunks()

    async def send_chunks(self) -> None:
        if not self.chunks:
            return
        missing = await self.client.missing_chunks(list(self.chunks))
        limiter = trio.CapacityLimiter(_PARALLEL_PUTS)

        async def put(h: str) -> None:
            async with limiter:
                await self.client.put_chunk(h, self.chunks[h])

        async with trio.open_nursery() as nursery:
            for h in missing:
                nursery.start_soon(put, h)
        self.chunks.clear()
        self.pending = 0

    async def add_op(self, op: dict[str, Any]) -> None:
        self.ops.append(op)
        if len(self.ops) >= protocol.MAX_OPS_PER_COMMIT:
            await self.commit()

    async def commit(self) -> None:
        """Send the chunks first, then the ops that name them (the server checks they exist)."""
        await self.send_chunks()
        if self.ops:
            await self.client.commit(uuid.uuid4().hex, self.ops, device="bench")
            self.ops = []


async def _add_file(up: _Uploader, chunker, path: Path, parent: str, name: str) -> None:
    st, chunks = await trio.to_thread.run_sync(lambda: (path.stat(), list(chunker.cut_file(path))))
    fd = await trio.to_thread.run_sync(os.open, path, os.O_RDONLY)
    try:
        for chunk in chunks:
            data = await trio.to_thread.run_sync(os.pread, fd, chunk.length, chunk.offset)
            await up.add_chunk(chunk.hash, data)
    finally:
        os.close(fd)
    refs = [protocol.ChunkRef(c.hash, c.length) for c in chunks]
    await up.add_op(
        protocol.op_create(
            uuid.uuid4().hex, parent, name, "file", st.st_mode & 0o7777, st.st_mtime_ns, chunks=refs
        )
    )


def _list_dir(path: Path) -> tuple[os.stat_result, list[tuple[Path, os.stat_result, str | None]]]:
    """The directory's own stat and, sorted by name, each child with its lstat and link target."""
    children = []
    for child in sorted(path.iterdir()):
        lst = child.lstat()
        target = os.readlink(child) if child.is_symlink() else None
        children.append((child, lst, target))
    return path.stat(), children


async def _add_tree(up: _Uploader, chunker, source: Path, parent: str) -> None:
    """Create `source` (a directory) under `parent`, with everything in it, parents first."""
    st, children = await trio.to_thread.run_sync(_list_dir, source)
    dir_id = uuid.uuid4().hex
    await up.add_op(
        protocol.op_create(dir_id, parent, source.name, "dir", st.st_mode & 0o7777, st.st_mtime_ns)
    )
    for child, lst, target in children:
        if target is not None:
            await up.add_op(
                protocol.op_create(
                    uuid.uuid4().hex, dir_id, child.name, "symlink", 0o777, lst.st_mtime_ns,
                    target=target,
                )
            )  # fmt: skip
        elif stat.S_ISDIR(lst.st_mode):
            await _add_tree(up, chunker, child, dir_id)
        else:
            await _add_file(up, chunker, child, dir_id, child.name)


def seed_library(
    server_url: str,
    library: str,
    token: str,
    files: list[Path],
    trees: list[Path],
    transport: httpx.AsyncBaseTransport | None = None,
) -> None:
    """Create `files` and `trees` at the root of `library` on the server."""
    from cache.chunking import Chunker

    async def seed() -> None:
        chunker = Chunker()
        async with RemoteClient(
            server_url, library, token, timeout=300, transport=transport
        ) as client:
            up = _Uploader(client)
            for path in files:
                await _add_file(up, chunker, path, protocol.ROOT_ID, path.name)
            for tree in trees:
                await _add_tree(up, chunker, tree, protocol.ROOT_ID)
            await up.commit()

    trio.run(seed)


def seed_many(
    server_url: str,
    library: str,
    token: str,
    dirs: int,
    per_dir: int,
    transport: httpx.AsyncBaseTransport | None = None,
) -> None:
    """Create `dirs` directories of `per_dir` empty files with a few big commits."""

    async def seed() -> None:
        now = time.time_ns()
        async with RemoteClient(
            server_url, library, token, timeout=300, transport=transport
        ) as client:
            up = _Uploader(client)
            for d in range(dirs):
                dir_id = uuid.uuid4().hex
                if len(up.ops) + per_dir + 1 > protocol.MAX_OPS_PER_COMMIT:
                    await up.commit()
                up.ops.append(
                    protocol.op_create(dir_id, protocol.ROOT_ID, f"d{d:04}", "dir", 0o755, now)
                )
                for f in range(per_dir):
                    up.ops.append(
                        protocol.op_create(
                            uuid.uuid4().hex, dir_id, f"f{f:05}.txt", "file", 0o644, now, chunks=[]
                        )
                    )
            await up.commit()

    trio.run(seed)


def seed_store(
    data_dir: Path,
    token: str,
    files: list[Path],
    trees: list[Path],
    many_dirs: int,
    many_per_dir: int,
) -> None:
    """Seed libraries `main` and `many` of a server's DATA_DIR in this process, before it serves.

    The same requests as over the wire (`seed_library`, `seed_many`), sent to
    the server's own ASGI app in-process, with its fsyncs deferred to one
    `sync()` at the end: over HTTP to `ferry serve`, each of the ~5,000 chunks
    of the full data set cost a request and three fsyncs (chunk file, its
    directory, the SQLite commit), and the seed took 180 s of a 15-minute run.
    What the server stores is exactly what the API stores.
    """
    from remote.server.app import FerryApp

    meta = _UnsyncedMetadata(data_dir / "meta.sqlite")
    try:
        app = FerryApp(meta, _UnsyncedChunks(data_dir / "chunks"))
        url = "http://ferry.seed"
        seed_library(url, "main", token, files, trees, transport=httpx.ASGITransport(app=app))
        seed_many(url, "many", token, many_dirs, many_per_dir, httpx.ASGITransport(app=app))
    finally:
        meta.close()
    os.sync()


class _UnsyncedChunks(DirectoryChunkStore):
    """The server's chunk directory, written whole-file-then-rename but without fsyncs."""

    def _write(self, final: Path, key: str, data: bytes) -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp / f"{key}.{uuid.uuid4().hex}"
        tmp.write_bytes(data)
        os.rename(tmp, final)


class _UnsyncedMetadata(SqliteMetadataStore):
    """The server's metadata store with `synchronous=OFF` on every thread's connection."""

    @property
    def _conn(self) -> sqlite3.Connection:
        conn = super()._conn
        if not getattr(self._local, "unsynced", False):
            conn.execute("PRAGMA synchronous=OFF")
            self._local.unsynced = True
        return conn
