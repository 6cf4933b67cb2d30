"""The fast read paths are taken: batched small files, parallel read-ahead, wide kernel read-ahead.

Functional checks, not timings: the server runs in-process (`httpx.ASGITransport`)
behind a transport that records every request, and the drive's reader,
manifest store, chunk cache and small-file prefetcher are wired as the mount
wires them. A slow path shows up as the wrong requests (one per file) or as
fetches that never overlap.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import trio

from cache.store import ChunkCache
from remote import protocol
from remote.client import RemoteClient
from remote.protocol import ROOT_ID, ChunkRef, op_create
from remote.server import admin
from remote.server.app import FerryApp
from remote.server.chunk_dir import DirectoryChunkStore
from remote.server.sqlite_store import SqliteMetadataStore
from vfs import prefetch
from vfs.mirror import ROOT_INODE, Mirror
from vfs.mount import mount_device, raise_read_ahead
from vfs.prefetch import SmallFilePrefetcher
from vfs.reader import ManifestStore, Reader
from vfs.schema import open_db
from vfs.sync.online import Connectivity


@dataclass
class Recorder(httpx.AsyncBaseTransport):
    """Forwards to the app; records (method, last path part) and the most chunk GETs at once."""

    inner: httpx.AsyncBaseTransport
    delay: float = 0.0
    requests: list[tuple[str, str]] = field(default_factory=list)
    chunk_gets: int = 0
    most_chunk_gets: int = 0
    #: The hashes of each chunk batch download.
    batched: list[list[str]] = field(default_factory=list)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        parts = request.url.path.split("/")
        kind = parts[-2] if len(parts[-1]) == 64 else parts[-1]
        self.requests.append((request.method, kind))
        getting_chunk = request.method == "GET" and kind == "chunks"
        if request.method == "POST" and kind == "batch" and parts[-2] == "chunks":
            self.batched.append(json.loads(request.content)["hashes"])
        if getting_chunk:
            self.chunk_gets += 1
            self.most_chunk_gets = max(self.most_chunk_gets, self.chunk_gets)
        try:
            await trio.sleep(self.delay)
            return await self.inner.handle_async_request(request)
        finally:
            if getting_chunk:
                self.chunk_gets -= 1

    def count(self, method: str, kind: str) -> int:
        return self.requests.count((method, kind))


@dataclass
class Drive:
    """The read half of a drive over an in-process server."""

    client: RemoteClient
    recorder: Recorder
    mirror: Mirror
    reader: Reader
    prefetcher: SmallFilePrefetcher
    contents: dict[str, bytes]


@pytest.fixture
def app(tmp_path: Path) -> Iterator[tuple[FerryApp, str]]:
    data = tmp_path / "server"
    token = admin.add_user(data, "alice")
    admin.add_library(data, "docs", "alice")
    meta = SqliteMetadataStore(data / "meta.sqlite")
    try:
        yield FerryApp(meta, DirectoryChunkStore(data / "chunks")), token
    finally:
        meta.close()


async def seed(client: RemoteClient, files: dict[str, list[bytes]]) -> None:
    """Commit one directory `d` holding `files` (name -> its chunks' bytes)."""
    dir_id = uuid.uuid4().hex
    ops = [op_create(dir_id, ROOT_ID, "d", "dir", 0o755, 1)]
    for name, blobs in files.items():
        refs = [ChunkRef(protocol.hash_bytes(b), len(b)) for b in blobs]
        for ref, blob in zip(refs, blobs, strict=True):
            await client.put_chunk(ref.hash, blob)
        ops.append(op_create(uuid.uuid4().hex, dir_id, name, "file", 0o644, 1, chunks=refs))
    await client.commit(uuid.uuid4().hex, ops, device="seed")


@pytest.fixture
async def drive(app: tuple[FerryApp, str], tmp_path: Path) -> AsyncIterator[Drive]:
    ferry_app, token = app
    small = {f"small-{i:02d}.py": [os.urandom(300 + 97 * i)] for i in range(30)}
    big = {"big.bin": [os.urandom(100_000 + i) for i in range(12)]}
    files = {**small, **big}
    recorder = Recorder(httpx.ASGITransport(app=ferry_app))
    async with RemoteClient("http://ferry.test", "docs", token, transport=recorder) as client:
        await seed(client, files)
        mirror = Mirror(open_db(tmp_path / "state.db"))
        mirror.ensure_root()
        for entry in (await client.changes(0)).entries:
            mirror.apply_remote(entry)
        connectivity = Connectivity()
        manifests = ManifestStore(mirror.db, client, connectivity)
        cache = ChunkCache.open(tmp_path / "chunks", capacity=1 << 30)
        reader = Reader(manifests, cache, client, connectivity)
        prefetcher = SmallFilePrefetcher(
            mirror, manifests, cache, client, connectivity, manifests.pending
        )
        reader.prefetcher = prefetcher
        recorder.requests.clear()
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(cache.run)
                await nursery.start(prefetcher.run)
                yield Drive(
                    client,
                    recorder,
                    mirror,
                    reader,
                    prefetcher,
                    {k: b"".join(v) for k, v in files.items()},
                )
                nursery.cancel_scope.cancel()
        finally:
            cache.close()
            mirror.db.close()


def directory_rows(drive: Drive) -> dict[str, object]:
    d = drive.mirror.lookup(ROOT_INODE, "d")
    assert d is not None
    return {row.name: row for row in drive.mirror.children(d.inode)}


async def test_a_cold_copy_of_small_files_takes_batches_not_a_request_per_file(
    drive: Drive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening the first small file fetches the directory's small files in batches; reading
    every one of them afterwards asks the server nothing more."""
    monkeypatch.setattr(prefetch, "BATCH_BYTES", 16384)  # several chunk batches, not one
    rows = directory_rows(drive)
    names = sorted(n for n in rows if n.startswith("small-"))
    for name in names:  # as `cp -r` does: open, read, close, next
        row = rows[name]
        drive.reader.opened(row)  # type: ignore[arg-type]
        data = await drive.reader.read(row.manifest, 0, row.size + 10)  # type: ignore[attr-defined]
        assert data == drive.contents[name]
    rec = drive.recorder
    assert drive.prefetcher.batches == 1
    assert rec.count("POST", "batch") >= 2  # manifests/batch + chunk batches
    assert rec.count("GET", "manifests") == 0
    assert rec.count("GET", "chunks") == 0
    small_bytes = sum(len(drive.contents[n]) for n in names)
    assert len(rec.requests) <= 1 + 2 * small_bytes // 16384 + 1  # groups are at least half full
    assert len(rec.requests) < len(names) // 3


async def test_big_files_are_left_to_read_ahead(drive: Drive) -> None:
    big = directory_rows(drive)["big.bin"]
    small = directory_rows(drive)["small-00.py"]
    assert not drive.prefetcher.wants(big)  # type: ignore[arg-type]
    assert drive.prefetcher.wants(small)  # type: ignore[arg-type]
    drive.reader.opened(small)  # type: ignore[arg-type]
    assert not drive.prefetcher.wants(small)  # type: ignore[arg-type]  # once per directory


async def test_a_sequential_reader_gets_chunks_read_ahead_in_batches(drive: Drive) -> None:
    """Read-ahead asks for several chunks per request (the server pays per request)."""
    drive.recorder.delay = 0.05  # every request takes a while, so read-ahead runs ahead
    row = directory_rows(drive)["big.bin"]
    data = bytearray()
    offset = 0
    while offset < row.size:  # type: ignore[attr-defined]
        data += await drive.reader.read(row.manifest, offset, 131072, sequential=True)  # type: ignore[attr-defined]
        offset += 131072
    assert bytes(data) == drive.contents["big.bin"]
    in_batches = sum(len(b) for b in drive.recorder.batched)
    assert drive.recorder.count("GET", "chunks") + in_batches == 12  # each chunk fetched once
    assert drive.recorder.count("GET", "chunks") + len(drive.recorder.batched) <= 6
    assert max(map(len, drive.recorder.batched)) >= 3


async def test_readers_wait_for_a_batch_instead_of_fetching_twice(drive: Drive) -> None:
    drive.recorder.delay = 0.05
    rows = directory_rows(drive)
    first = rows["small-00.py"]
    drive.reader.opened(first)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        for name in ("small-00.py", "small-01.py", "small-29.py"):
            row = rows[name]
            nursery.start_soon(drive.reader.read, row.manifest, 0, row.size)  # type: ignore[attr-defined]
    assert drive.recorder.count("GET", "manifests") == 0
    assert drive.recorder.count("GET", "chunks") == 0


async def test_manifest_batch_leaves_out_unknown_manifests(drive: Drive) -> None:
    row = directory_rows(drive)["small-03.py"]
    unknown = "ab" * 32
    found = await drive.client.get_manifests([row.manifest, unknown])  # type: ignore[attr-defined]
    assert list(found) == [row.manifest]  # type: ignore[attr-defined]
    assert [c.length for c in found[row.manifest]] == [row.size]  # type: ignore[attr-defined]


def test_read_ahead_knob_is_found_through_mountinfo(tmp_path: Path) -> None:
    """The bdi is named by mountinfo's major:minor (a stat would wait on our own FUSE loop)."""
    where = tmp_path / "my drive"
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
        f"90 22 0:77 / {str(where).replace(' ', chr(92) + '040')} rw - fuse.ferry ferry:d rw\n"
    )
    assert mount_device(where, str(info)) == "0:77"
    assert mount_device(tmp_path / "elsewhere", str(info)) is None


def test_this_mount_gets_a_wide_read_ahead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sysfs = tmp_path / "bdi"
    (sysfs / "0:77").mkdir(parents=True)
    monkeypatch.setattr("vfs.mount.mount_device", lambda mountpoint: "0:77")
    raise_read_ahead(tmp_path / "mnt", str(sysfs))
    assert int((sysfs / "0:77" / "read_ahead_kb").read_text()) >= 1024
