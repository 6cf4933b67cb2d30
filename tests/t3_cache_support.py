"""Helpers shared by the chunk cache tests: blobs with their names, a counting fake remote."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from cache.check import verify
from cache.chunking import hash_chunk
from cache.store import ChunkCache

KiB = 1024


def blob(size: int, seed: int) -> tuple[str, bytes]:
    """Random bytes and their chunk name."""
    data = random.Random(seed).randbytes(size)
    return hash_chunk(data), data


class FakeRemote:
    """A chunk server that counts requests, sleeps `latency` per request and can be told to fail."""

    def __init__(self, latency: float = 0.0) -> None:
        self.chunks: dict[str, bytes] = {}
        self.latency = latency
        self.calls: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.error: Exception | None = None
        self.corrupt = False
        #: Batch requests (`fetch_many`), and the chunks it sends damaged.
        self.batches: list[list[str]] = []
        self.damaged: set[str] = set()

    def add(self, size: int, seed: int) -> str:
        chunk_hash, data = blob(size, seed)
        self.chunks[chunk_hash] = data
        return chunk_hash

    async def fetch(self, chunk_hash: str) -> bytes:
        self.calls.append(chunk_hash)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await trio.sleep(self.latency)
            if self.error is not None:
                raise self.error
            data = self.chunks[chunk_hash]
            return data[:-1] + b"!" if self.corrupt else data
        finally:
            self.in_flight -= 1

    async def fetch_many(self, hashes: Sequence[str]) -> list[bytes]:
        """One request for several chunks (a batch download); `batches` records each."""
        self.batches.append(list(hashes))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await trio.sleep(self.latency)
            if self.error is not None:
                raise self.error
            return [
                self.chunks[h][:-1] + b"!" if h in self.damaged else self.chunks[h] for h in hashes
            ]
        finally:
            self.in_flight -= 1


def consistency_problems(cache: ChunkCache) -> list[str]:
    """The slow oracle: index against files, every file rehashed."""
    cache._flush_access()
    return verify(cache._index, cache._files)


@asynccontextmanager
async def running(cache: ChunkCache) -> AsyncIterator[ChunkCache]:
    """The cache with its background tasks running, stopped on exit."""
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        yield cache
        nursery.cancel_scope.cancel()


def chunk_files(directory: Path) -> set[str]:
    return {p.name for p in (directory / "chunks").glob("*/*")}
