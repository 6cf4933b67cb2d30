"""Fetching missing chunks: one download for many readers, errors, verification, read-ahead."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from cache.store import ChunkCache, ChunkVerifyError
from tests.t3_cache_support import FakeRemote, KiB, consistency_problems, running


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[ChunkCache]:
    c = ChunkCache.open(tmp_path / "cache", capacity=256 * 1024 * KiB)
    try:
        yield c
        assert consistency_problems(c) == []
    finally:
        c.close()


async def test_many_readers_of_a_missing_chunk_share_one_download(
    cache: ChunkCache, autojump_clock: trio.testing.MockClock
) -> None:
    remote = FakeRemote(latency=1.0)
    h = remote.add(300 * KiB, 1)
    results: list[bytes] = []

    async def reader() -> None:
        results.append(await cache.get_or_fetch(h, remote.fetch))

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(reader)
    assert remote.calls == [h]
    assert results == [remote.chunks[h]] * 20
    assert await cache.get_or_fetch(h, remote.fetch) == remote.chunks[h]
    assert remote.calls == [h]
    stats = cache.statistics()
    assert (stats.hits, stats.misses, stats.bytes_fetched) == (1, 20, 300 * KiB)


async def test_a_cached_chunk_never_calls_fetch(cache: ChunkCache) -> None:
    remote = FakeRemote()
    h = remote.add(10 * KiB, 2)
    await cache.put(h, remote.chunks[h])
    remote.error = ConnectionError("offline")
    assert await cache.get_or_fetch(h, remote.fetch) == remote.chunks[h]
    assert remote.calls == []


async def test_fetch_error_reaches_every_waiter_once_then_retries(
    cache: ChunkCache, autojump_clock: trio.testing.MockClock
) -> None:
    remote = FakeRemote(latency=1.0)
    h = remote.add(10 * KiB, 3)
    remote.error = ConnectionError("server unreachable")
    errors: list[BaseException] = []

    async def reader() -> None:
        try:
            await cache.get_or_fetch(h, remote.fetch)
        except ConnectionError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(reader)
    assert len(errors) == 5 and len(remote.calls) == 1
    remote.error = None
    assert await cache.get_or_fetch(h, remote.fetch) == remote.chunks[h]
    assert len(remote.calls) == 2


async def test_cancelled_leader_hands_the_fetch_to_a_waiter(
    cache: ChunkCache, autojump_clock: trio.testing.MockClock
) -> None:
    remote = FakeRemote(latency=1.0)
    h = remote.add(10 * KiB, 4)
    got: list[bytes] = []

    async def waiter() -> None:
        got.append(await cache.get_or_fetch(h, remote.fetch))

    async with trio.open_nursery() as nursery:
        with trio.move_on_after(0.5):
            leader = trio.CancelScope()
            nursery.start_soon(cancellable_reader, cache, h, remote, leader)
            await trio.sleep(0.1)
            nursery.start_soon(waiter)
            await trio.sleep(0.1)
            leader.cancel()
    assert got == [remote.chunks[h]]
    assert len(remote.calls) == 2


async def cancellable_reader(
    cache: ChunkCache, h: str, remote: FakeRemote, scope: trio.CancelScope
) -> None:
    with scope:
        await cache.get_or_fetch(h, remote.fetch)


async def test_fetched_bytes_that_do_not_match_are_refused(cache: ChunkCache) -> None:
    remote = FakeRemote()
    h = remote.add(100 * KiB, 5)
    remote.corrupt = True
    with pytest.raises(ChunkVerifyError, match=h):
        await cache.get_or_fetch(h, remote.fetch)
    assert not cache.contains(h)


async def test_read_ahead_fetches_in_a_bounded_window(
    cache: ChunkCache, autojump_clock: trio.testing.MockClock
) -> None:
    remote = FakeRemote(latency=0.1)
    hashes = [remote.add(64 * KiB, seed) for seed in range(40)]
    async with running(cache):
        cache.prefetch(hashes, remote.fetch)
        cache.prefetch(hashes, remote.fetch)
        await cache.wait_read_ahead_idle()
    assert all(cache.contains(h) for h in hashes)
    assert sorted(remote.calls) == sorted(hashes)
    assert remote.max_in_flight == 8
    assert cache.statistics().misses == 0


async def test_readers_join_read_ahead_instead_of_fetching_again(
    cache: ChunkCache, autojump_clock: trio.testing.MockClock
) -> None:
    remote = FakeRemote(latency=1.0)
    hashes = [remote.add(32 * KiB, seed) for seed in range(8)]
    async with running(cache):
        cache.prefetch(hashes, remote.fetch)
        await trio.sleep(0.1)
        for h in hashes:
            assert await cache.get_or_fetch(h, remote.fetch) == remote.chunks[h]
    assert len(remote.calls) == len(hashes)


async def test_sequential_cold_read_with_read_ahead_is_not_round_trip_bound(
    cache: ChunkCache,
) -> None:
    """32 chunks at 0.1 s per request: one at a time takes 3.2 s; a window of 8 about 0.4 s.

    Real time, not autojump: the worker threads that write chunks would let a
    mock clock jump to unrelated timers.
    """
    remote = FakeRemote(latency=0.1)
    hashes = [remote.add(16 * KiB, seed) for seed in range(32)]
    async with running(cache):
        start = trio.current_time()
        for i, h in enumerate(hashes):
            cache.prefetch(hashes[i + 1 : i + 9], remote.fetch)
            await cache.get_or_fetch(h, remote.fetch)
        elapsed = trio.current_time() - start
    assert len(remote.calls) == 32
    assert elapsed < 1.6, f"cold sequential read took {elapsed:.2f} s of simulated latency"


async def test_fetch_missing_makes_a_pinned_file_local(
    cache: ChunkCache, autojump_clock: trio.testing.MockClock
) -> None:
    remote = FakeRemote(latency=0.1)
    hashes = [remote.add(16 * KiB, seed) for seed in range(20)]
    await cache.put(hashes[0], remote.chunks[hashes[0]])
    cache.pin(hashes, "pin:folder")
    await cache.fetch_missing(hashes + hashes[:3], remote.fetch, limit=4)
    assert all(cache.contains(h) for h in hashes)
    assert sorted(remote.calls) == sorted(hashes[1:])
    assert remote.max_in_flight == 4
    assert cache.statistics().pinned_bytes == 20 * 16 * KiB
