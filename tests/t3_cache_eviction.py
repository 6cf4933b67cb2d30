"""The size cap, LRU eviction order, pins (user and dirty) and explicit evict."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from cache.store import ChunkCache
from tests.t3_cache_support import (
    FakeRemote,
    KiB,
    blob,
    chunk_files,
    consistency_problems,
    running,
)

CHUNK = 100 * KiB


def make(tmp_path: Path, chunks: int) -> ChunkCache:
    return ChunkCache.open(tmp_path / "c", capacity=chunks * CHUNK, memory_bytes=0)


@pytest.fixture
def small(tmp_path: Path) -> Iterator[ChunkCache]:
    """A cache with room for exactly three 100 KiB chunks."""
    cache = make(tmp_path, 3)
    try:
        yield cache
        assert consistency_problems(cache) == []
    finally:
        cache.close()


async def put_blob(cache: ChunkCache, seed: int, size: int = CHUNK) -> str:
    h, data = blob(size, seed)
    await cache.put(h, data)
    return h


async def test_least_recently_used_chunk_goes_first(small: ChunkCache) -> None:
    a, b, c = [await put_blob(small, seed) for seed in (1, 2, 3)]
    assert await small.get(a) is not None
    d = await put_blob(small, 4)
    assert [small.contains(h) for h in (a, b, c, d)] == [True, False, True, True]
    assert b not in chunk_files(small.directory)
    await small.get(c)
    await small.get(a)
    e = await put_blob(small, 5)
    assert [small.contains(h) for h in (a, c, d, e)] == [True, True, False, True]
    assert small.statistics().bytes_evicted == 2 * CHUNK


async def test_lru_order_survives_reopen(tmp_path: Path) -> None:
    cache = make(tmp_path, 3)
    a, b, c = [await put_blob(cache, seed) for seed in (1, 2, 3)]
    await cache.get(a)
    cache.close()
    cache = make(tmp_path, 3)
    try:
        await put_blob(cache, 4)
        assert not cache.contains(b) and cache.contains(a) and cache.contains(c)
    finally:
        cache.close()


async def test_total_size_never_exceeds_the_cap(tmp_path: Path) -> None:
    cache = ChunkCache.open(tmp_path / "c", capacity=1000 * KiB)
    rng = random.Random(7)
    try:
        async with running(cache):
            for seed in range(60):
                await put_blob(cache, seed, size=rng.randrange(10 * KiB, 300 * KiB))
                stats = cache.statistics()
                assert stats.size <= stats.capacity
        on_disk = sum(p.stat().st_size for p in (cache.directory / "chunks").glob("*/*"))
        assert on_disk == cache.statistics().size
        assert consistency_problems(cache) == []
    finally:
        cache.close()


async def test_parallel_fetches_stay_under_the_cap(tmp_path: Path) -> None:
    cache = make(tmp_path, 4)
    remote = FakeRemote(latency=0.01)
    hashes = [remote.add(CHUNK, seed) for seed in range(30)]
    try:
        async with running(cache):
            cache.prefetch(hashes, remote.fetch)
            for h in hashes:
                assert await cache.get_or_fetch(h, remote.fetch) == remote.chunks[h]
                assert cache.statistics().size <= cache.capacity
        assert remote.max_in_flight > 1
        assert cache.statistics().size <= cache.capacity
    finally:
        cache.close()


async def test_pinned_and_dirty_chunks_are_never_evicted(small: ChunkCache) -> None:
    a, b = await put_blob(small, 1), await put_blob(small, 2)
    small.pin([a], "pin:file1")
    small.pin([b], "dirty:file2")
    for seed in range(3, 10):
        await put_blob(small, seed)
    assert small.contains(a) and small.contains(b)
    assert small.statistics().pinned_bytes == 2 * CHUNK
    assert small.statistics().size <= small.capacity


async def test_unpin_makes_chunks_evictable_again(small: ChunkCache) -> None:
    a = await put_blob(small, 1)
    small.pin([a], "pin:x")
    small.pin([a], "pin:y")
    small.unpin("pin:x")
    assert small.evict([a]) == 0, "still pinned by pin:y"
    small.unpin("pin:y", [a])
    assert small.statistics().pinned_bytes == 0
    assert small.evict([a]) == CHUNK
    assert not small.contains(a)
    assert a not in chunk_files(small.directory)


async def test_pin_recorded_before_the_chunk_arrives_holds(small: ChunkCache) -> None:
    h, data = blob(CHUNK, 1)
    small.pin([h], "pin:later")
    await small.put(h, data)
    for seed in range(2, 8):
        await put_blob(small, seed)
    assert small.contains(h)


async def test_evict_frees_a_files_chunks_but_not_dirty_ones(small: ChunkCache) -> None:
    a, b, c = [await put_blob(small, seed) for seed in (1, 2, 3)]
    small.pin([c], "dirty:f")
    assert small.evict([a, b, c, "ff" * 32]) == 2 * CHUNK
    assert [small.contains(h) for h in (a, b, c)] == [False, False, True]
    assert chunk_files(small.directory) == {c}
    assert small.statistics().size == CHUNK


async def test_when_pins_fill_the_cap_new_chunks_are_served_but_not_stored(
    small: ChunkCache, caplog: pytest.LogCaptureFixture
) -> None:
    pinned = [await put_blob(small, seed) for seed in (1, 2, 3)]
    small.pin(pinned, "pin:all")
    remote = FakeRemote()
    extra = [remote.add(CHUNK, seed) for seed in (10, 11)]
    for h in extra:
        assert await small.get_or_fetch(h, remote.fetch) == remote.chunks[h]
    assert chunk_files(small.directory) == set(pinned)
    assert small.statistics().size == small.capacity
    warnings = [r for r in caplog.records if "full of pinned" in r.getMessage()]
    assert len(warnings) == 1
    small.unpin("pin:all")
    assert await small.get_or_fetch(extra[0], remote.fetch) == remote.chunks[extra[0]]
    assert small.contains(extra[0])


async def test_eviction_in_the_background_leaves_no_files_behind(tmp_path: Path) -> None:
    cache = make(tmp_path, 2)
    try:
        async with running(cache):
            hashes = [await put_blob(cache, seed) for seed in range(8)]
        assert chunk_files(cache.directory) == set(hashes[-2:])
        assert cache.statistics().bytes_evicted == 6 * CHUNK
    finally:
        cache.close()
