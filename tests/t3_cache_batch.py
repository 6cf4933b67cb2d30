"""A batch download stored in one go (`ChunkCache.put_fetched_many`): verified, capped, indexed."""

from __future__ import annotations

from pathlib import Path

import pytest

from cache.store import ChunkCache, ChunkVerifyError
from tests.t3_cache_support import KiB, blob, chunk_files, consistency_problems


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
