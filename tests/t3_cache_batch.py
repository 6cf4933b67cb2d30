"""Batch downloads: stored in one go (`ChunkCache.put_fetched_many`): verified, capped, indexed;
and read-ahead fetched several chunks per request (`ChunkCache.prefetch_batches`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from cache import store
from cache.store import ChunkCache, ChunkVerifyError
from tests.t3_cache_support import (
    FakeRemote,
    KiB,
    blob,
    chunk_files,
    consistency_problems,
    running,
)


async def test_a_batch_is_stored_and_survives_reopen(tmp_path: Path) -> None:
    chunks = [blob(40 * KiB + i, i) for i in range(20)]
    cache = ChunkCache.open(tmp_path / "c", capacity=64 * 1024 * KiB)
    await cache.put_fetched_many(chunks)
    assert consistency_problems(cache) == []
    cache.close()
    cache = ChunkCache.open(tmp_path / "c", capacity=64 * 1024 * KiB, memory_bytes=0)
    try:
        for h, data in chunks:
            assert await cache.get(h) == data
        assert cache.statistics().chunks == 20
    finally:
        cache.close()


async def test_wrong_bytes_in_a_batch_are_refused_and_the_rest_kept(tmp_path: Path) -> None:
    good = [blob(10 * KiB, i) for i in range(3)]
    bad_hash, bad_data = blob(10 * KiB, 99)
    cache = ChunkCache.open(tmp_path / "c", capacity=64 * 1024 * KiB)
    try:
        with pytest.raises(ChunkVerifyError, match=bad_hash):
            await cache.put_fetched_many([good[0], (bad_hash, bad_data[:-1] + b"!"), *good[1:]])
        assert all(cache.contains(h) for h, _ in good)
        assert not cache.contains(bad_hash)
        assert bad_hash not in chunk_files(tmp_path / "c")
        assert consistency_problems(cache) == []
    finally:
        cache.close()


async def test_a_batch_evicts_to_stay_under_the_cap(tmp_path: Path) -> None:
    cap = 400 * KiB
    cache = ChunkCache.open(tmp_path / "c", capacity=cap, memory_bytes=0)
    try:
        for round_ in range(3):
            await cache.put_fetched_many([blob(100 * KiB, 10 * round_ + i) for i in range(3)])
            assert cache.statistics().size <= cap
        assert consistency_problems(cache) == []
    finally:
        cache.close()


# --- read-ahead in batches (`prefetch_batches`) ------------------------------------------


async def test_a_sequential_reader_is_read_ahead_in_few_large_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """64 chunks read in order, each read moving an 8-chunk window on by one: the window
    goes out in batches of 2-4 chunks (not one request per chunk as it slides), and every
    chunk is downloaded exactly once. Real time: the cache writes in worker threads.

    A read that hits memory does not yield, so the loop checkpoints as the FUSE
    request loop does between reads: else it could pass a batch that is queued but
    whose worker has not yet run, and fetch that chunk alone."""
    monkeypatch.setattr(store, "READ_AHEAD_BATCH_BYTES", 256 * KiB)
    monkeypatch.setattr(store, "READ_AHEAD_BATCH_MIN", 128 * KiB)
    remote = FakeRemote(latency=0.02)
    refs = [(remote.add(64 * KiB, seed), 64 * KiB) for seed in range(64)]
    cache = ChunkCache.open(tmp_path / "c", capacity=64 * 1024 * KiB)
    try:
        async with running(cache):
            for i, (h, _) in enumerate(refs):
                cache.prefetch_batches(refs[i + 1 : i + 9], remote.fetch_many)
                assert await cache.get_or_fetch(h, remote.fetch) == remote.chunks[h]
                await trio.lowlevel.checkpoint()  # as between two FUSE requests
        downloaded = remote.calls + [h for batch in remote.batches for h in batch]
        assert sorted(downloaded) == sorted(h for h, _ in refs)
        assert remote.calls[0] == refs[0][0] and len(remote.calls) <= 2, remote.calls
        assert all(len(batch) <= 4 for batch in remote.batches)
        assert len(remote.batches) <= 63 // 2, [len(b) for b in remote.batches]
        assert consistency_problems(cache) == []
    finally:
        cache.close()


async def wait_in_flight(cache: ChunkCache, chunk_hash: str) -> None:
    """Until the fetch of `chunk_hash` has started (every task waits on a sleep or a flight)."""
    await trio.testing.wait_all_tasks_blocked()
    assert chunk_hash in cache._inflight


async def test_a_damaged_chunk_in_a_batch_fails_only_its_readers(tmp_path: Path) -> None:
    """Readers waiting for a batch: the one whose chunk arrived damaged gets ChunkVerifyError
    (EIO in the drive), the others their bytes; the damaged bytes are not stored."""
    remote = FakeRemote(latency=0.2)
    refs = [(remote.add(64 * KiB, seed), 64 * KiB) for seed in range(4)]
    bad = refs[2][0]
    remote.damaged.add(bad)
    cache = ChunkCache.open(tmp_path / "c", capacity=64 * 1024 * KiB)
    try:
        async with running(cache):
            cache.prefetch_batches(refs, remote.fetch_many)
            await wait_in_flight(cache, refs[-1][0])
            got: dict[str, bytes | BaseException] = {}

            async def reader(h: str) -> None:
                try:
                    got[h] = await cache.get_or_fetch(h, remote.fetch)
                except ChunkVerifyError as exc:
                    got[h] = exc

            async with trio.open_nursery() as readers:
                for h, _ in refs:
                    readers.start_soon(reader, h)
            await cache.wait_read_ahead_idle()
        assert isinstance(got.pop(bad), ChunkVerifyError)
        assert got == {h: remote.chunks[h] for h, _ in refs if h != bad}
        assert remote.batches == [[h for h, _ in refs]] and remote.calls == []
        assert not cache.contains(bad) and bad not in chunk_files(tmp_path / "c")
        assert all(cache.contains(h) for h, _ in refs if h != bad)
        assert consistency_problems(cache) == []
    finally:
        cache.close()


async def test_a_failed_batch_fails_its_waiting_readers_once_then_they_fetch_again(
    tmp_path: Path,
) -> None:
    """The readers that waited for the batch get its error (offline: EIO at once, not a
    second timeout); the next read asks again on its own."""
    remote = FakeRemote(latency=0.2)
    refs = [(remote.add(32 * KiB, seed), 32 * KiB) for seed in range(3)]
    remote.error = ConnectionError("server unreachable")
    cache = ChunkCache.open(tmp_path / "c", capacity=64 * 1024 * KiB)
    try:
        async with running(cache):
            cache.prefetch_batches(refs, remote.fetch_many)
            await wait_in_flight(cache, refs[0][0])
            with pytest.raises(ConnectionError):
                await cache.get_or_fetch(refs[0][0], remote.fetch)
            await cache.wait_read_ahead_idle()
            remote.error = None
            assert await cache.get_or_fetch(refs[0][0], remote.fetch) == remote.chunks[refs[0][0]]
        assert len(remote.batches) == 1 and remote.calls == [refs[0][0]]
    finally:
        cache.close()


async def test_a_chunk_a_reader_is_already_fetching_is_left_out_of_a_batch(
    tmp_path: Path,
) -> None:
    remote = FakeRemote(latency=0.2)
    refs = [(remote.add(32 * KiB, seed), 32 * KiB) for seed in range(3)]
    cache = ChunkCache.open(tmp_path / "c", capacity=64 * 1024 * KiB)
    try:
        async with running(cache), trio.open_nursery() as nursery:
            nursery.start_soon(cache.get_or_fetch, refs[1][0], remote.fetch)
            await wait_in_flight(cache, refs[1][0])
            cache.prefetch_batches(refs, remote.fetch_many)
            await cache.wait_read_ahead_idle()
        assert remote.calls == [refs[1][0]]
        assert remote.batches == [[refs[0][0], refs[2][0]]]
        assert all(cache.contains(h) for h, _ in refs)
    finally:
        cache.close()
