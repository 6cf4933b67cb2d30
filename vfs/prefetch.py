"""Batch fetches of a directory's small files, started when the first of them is opened.

A cold `cp -r` of a tree of small files would otherwise cost two round trips
per file (its manifest, then its one chunk), each a full HTTP request on both
sides. When a small file whose content is not local is opened, its
directory's small clean files are fetched together instead: their manifests
in one `manifests/batch` request, then their missing chunks in
`chunks/batch` requests of at most BATCH_BYTES each, stored in the chunk
cache in the order the directory lists them (the order `cp` reads them).

Readers join a batch rather than racing it: `request()` registers the
manifests and chunks it is about to fetch in `Pending` before it returns
(no await in between), and the reader waits on those events before it would
fetch one of them itself. Every event is set when its batch ends, fetched or
not, so a failed batch only means the reader fetches the thing on its own.
Each directory is batched at most once per mount: read-ahead is advice.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from remote.errors import RemoteError
from vfs.reader import Pending

if TYPE_CHECKING:
    from cache.store import ChunkCache
    from remote.client import RemoteClient
    from vfs.mirror import Mirror, MirrorRow
    from vfs.reader import ManifestStore
    from vfs.sync.online import Connectivity

log = logging.getLogger(__name__)

#: Files up to this size count as small (one chunk or a few).
SMALL_FILE_BYTES = 1024 * 1024
#: At most this many bytes of one directory's small files are fetched ahead.
DIRECTORY_BYTES = 64 * 1024 * 1024
#: At most this many files of one directory are fetched ahead.
DIRECTORY_FILES = 2000
#: Bytes asked for in one chunks/batch request (small, so the first files arrive early).
BATCH_BYTES = 4 * 1024 * 1024
#: Directories waiting for the worker; beyond this new requests are dropped.
QUEUE = 16


@dataclass
class DirectoryBatch:
    """The small files of one directory to fetch, and the manifests registered as pending."""

    directory: int
    manifests: list[str]
    unknown: list[str] = field(default_factory=list)


class SmallFilePrefetcher:
    """Fetches a directory's small files in batches; `run()` is its worker in the mount's nursery."""

    def __init__(
        self,
        mirror: Mirror,
        manifests: ManifestStore,
        cache: ChunkCache,
        client: RemoteClient,
        connectivity: Connectivity,
        pending: Pending,
    ) -> None:
        self.mirror = mirror
        self.manifests = manifests
        self.cache = cache
        self.client = client
        self.connectivity = connectivity
        self.pending = pending
        self._done: set[int] = set()
        self._send, self._receive = trio.open_memory_channel[DirectoryBatch](QUEUE)
        self._running = False
        self.batches = 0

    def wants(self, row: MirrorRow) -> bool:
        """Whether opening `row` should batch its directory (small, clean, not batched yet)."""
        return (
            self._running
            and row.parent is not None
            and row.parent not in self._done
            and 0 < row.size <= SMALL_FILE_BYTES
            and not row.dirty
            and self.connectivity.online
        )

    def request(self, directory: int) -> None:
        """Queue a batch of `directory`'s small files; never blocks, registers pending manifests."""
        self._done.add(directory)
        manifests = [row.manifest for row in self._small_files(directory) if row.manifest]
        batch = DirectoryBatch(directory, list(dict.fromkeys(manifests)))
        batch.unknown = [
            m for m in batch.manifests if m not in self.pending.manifests and not self._known(m)
        ]
        try:
            self._send.send_nowait(batch)
        except trio.WouldBlock:
            log.debug("small-file read-ahead queue full; not batching directory %d", directory)
            return
        for manifest in batch.unknown:
            self.pending.manifests[manifest] = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._running = True
        task_status.started()
        try:
            async for batch in self._receive:
                try:
                    await self._fetch(batch)
                except (RemoteError, OSError, ValueError) as exc:
                    log.info(
                        "batch read-ahead of %d small files in %r failed (%s); they are fetched"
                        " one by one as they are read",
                        len(batch.manifests),
                        self._path(batch.directory),
                        exc,
                    )
        finally:
            self._running = False

    # --- internals --------------------------------------------------------------------

    def _small_files(self, directory: int) -> Iterator[MirrorRow]:
        count = total = 0
        after = 0
        while rows := self.mirror.children(directory, after=after):
            for row in rows:
                after = row.inode
                if row.kind != "file" or row.dirty or not 0 < row.size <= SMALL_FILE_BYTES:
                    continue
                count, total = count + 1, total + row.size
                if count > DIRECTORY_FILES or total > DIRECTORY_BYTES:
                    return
                yield row

    def _known(self, manifest: str) -> bool:
        return self.manifests.cached(manifest) is not None

    def _path(self, directory: int) -> str:
        try:
            return self.mirror.path_of(directory)
        except LookupError:
            return f"inode {directory}"

    async def _fetch(self, batch: DirectoryBatch) -> None:
        self.batches += 1
        try:
            if batch.unknown:
                self.manifests.remember_many(await self.client.get_manifests(batch.unknown))
        finally:
            self.pending.release_manifests(batch.unknown)
        wanted: list[tuple[str, int]] = []
        for manifest in batch.manifests:
            for chunk in self.manifests.cached(manifest) or []:
                if chunk.hash in self.pending.chunks or self.cache.contains(chunk.hash):
                    continue
                self.pending.chunks[chunk.hash] = trio.Event()
                wanted.append((chunk.hash, chunk.length))
        try:
            for group in _groups(wanted, BATCH_BYTES):
                fetched = await self.client.get_chunks(group)
                await self.cache.put_fetched_many(list(zip(group, fetched, strict=True)))
                self.pending.release_chunks(group)
        finally:
            self.pending.release_chunks([h for h, _ in wanted])


def _groups(chunks: list[tuple[str, int]], limit: int) -> Iterator[list[str]]:
    """Hashes in consecutive groups of at most `limit` bytes (at least one each)."""
    group: list[str] = []
    size = 0
    for chunk_hash, length in chunks:
        if group and size + length > limit:
            yield group
            group, size = [], 0
        group.append(chunk_hash)
        size += length
    if group:
        yield group
