"""Garbage collection of chunks nothing refers to any more.

Chunks stay referenced as long as some entry or version of their library
names a manifest that lists them; the trash keeps a deleted file's versions
until its retention ends (`purge_trash`). What becomes garbage: the content
of purged files, chunks uploaded for a commit that never came (a client
crashed or lost the race), and chunk files whose row was never written (a
crash between the file and its row). `collect_garbage` forgets the first two
in the metadata (`MetadataStore.drop_unreferenced`), then deletes every chunk
file no library records.

Only chunks older than `grace` seconds are collected: a client uploads a
file's chunks first and commits after, and a chunk it was told the server
already has may be the very one being collected. If that still happens (a
commit more than `grace` after its upload), the commit is refused as
missing chunks and the client uploads them again (vfs/sync/push.py).

Uploads and the collector exclude each other through `StoreGate`: an upload
writes the file before its row, and the file may be a leftover the collector
is about to delete; with the gate, the collector sees either no new row and
no upload in progress, or the row. Commits wait too (the app's write lock):
a commit checks its chunks before it records the manifest that keeps them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from remote.server.storage import ChunkStore, MetadataStore

log = logging.getLogger(__name__)

#: Default age below which nothing is collected (seconds).
DEFAULT_GRACE = 6 * 3600.0


class StoreGate:
    """Uploads store side by side; a collection runs alone, after those in progress."""

    def __init__(self) -> None:
        self._collecting = trio.Lock()
        self._storing = 0
        self._idle = trio.Event()
        self._idle.set()

    @asynccontextmanager
    async def storing(self) -> AsyncIterator[None]:
        async with self._collecting:  # waits while a collection runs
            self._storing += 1
            self._idle = trio.Event()
        try:
            yield
        finally:
            self._storing -= 1
            if not self._storing:
                self._idle.set()

    @asynccontextmanager
    async def collecting(self) -> AsyncIterator[None]:
        async with self._collecting:
            while self._storing:
                await self._idle.wait()
            yield


@dataclass(frozen=True, slots=True)
class Collected:
    """What one collection freed."""

    chunks: int
    bytes: int


async def collect_garbage(
    meta: MetadataStore,
    chunks: ChunkStore,
    gate: StoreGate,
    commits: trio.Lock,
    grace: float = DEFAULT_GRACE,
) -> Collected:
    """Drop unreferenced manifests and chunks older than `grace` seconds; delete their files.

    `commits` is the lock commits hold while they check and record."""
    before = time.time() - grace
    # Listing the files is the long part; uploads and commits go on meanwhile (a file
    # listed here is deleted below only if still unrecorded once they are held off).
    candidates = set(await trio.to_thread.run_sync(lambda: list(chunks.keys_older_than(before))))
    async with commits, gate.collecting():

        def collect() -> Collected:
            for library in meta.all_libraries():
                candidates.update(meta.drop_unreferenced(library, before))
            deleted = freed = 0
            for key in candidates - meta.recorded_chunks():
                try:
                    size = chunks.size(key)
                except FileNotFoundError:
                    continue  # a row without its file (`ferry admin check` reports those)
                chunks.delete(key)
                deleted, freed = deleted + 1, freed + size
            return Collected(deleted, freed)

        return await trio.to_thread.run_sync(collect)
