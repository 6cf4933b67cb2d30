"""The chunk cache's storage: durability, damage detection, the directory and index checks at open."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from cache.files import ChunkFiles
from cache.store import CacheError, ChunkCache, ChunkVerifyError, GiB, default_capacity
from tests.t3_cache_support import FakeRemote, KiB, blob, chunk_files, consistency_problems

CAP = 64 * 1024 * KiB


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[ChunkCache]:
    c = ChunkCache.open(tmp_path / "cache", capacity=CAP)
    try:
        yield c
        assert consistency_problems(c) == []
    finally:
        c.close()


async def test_put_then_get_survives_reopen(tmp_path: Path) -> None:
    h, data = blob(300 * KiB, 1)
    cache = ChunkCache.open(tmp_path / "c", capacity=CAP)
    await cache.put(h, data)
    assert cache.contains(h)
    assert await cache.get(h) == data
    cache.close()
    again = ChunkCache.open(tmp_path / "c", capacity=CAP, memory_bytes=0)
    try:
        assert await again.get(h) == data
        assert again.statistics().chunks == 1
        assert again.statistics().size == len(data)
        assert consistency_problems(again) == []
    finally:
        again.close()


async def test_get_of_unknown_chunk_is_none_and_counts_a_miss(cache: ChunkCache) -> None:
    assert await cache.get("ab" * 32) is None
    assert cache.statistics().misses == 1


async def test_put_refuses_bytes_that_do_not_match(cache: ChunkCache) -> None:
    h, data = blob(10 * KiB, 2)
    with pytest.raises(ChunkVerifyError, match=h):
        await cache.put(h, data + b"x")
    assert not cache.contains(h)
    assert chunk_files(cache.directory) == set()


@pytest.mark.parametrize("damage", ["truncate", "flip"])
async def test_damaged_chunk_file_is_dropped_not_served(tmp_path: Path, damage: str) -> None:
    cache = ChunkCache.open(tmp_path / "c", capacity=CAP, memory_bytes=0)
    try:
        h, data = blob(200 * KiB, 3)
        await cache.put(h, data)
        path = ChunkFiles(cache.directory).path(h)
        if damage == "truncate":
            path.write_bytes(data[:1000])
        else:
            path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
        assert await cache.get(h) is None
        assert not cache.contains(h)
        assert not path.exists()
        remote = FakeRemote()
        remote.chunks[h] = data
        assert await cache.get_or_fetch(h, remote.fetch) == data
        assert remote.calls == [h]
        assert await cache.get(h) == data
        assert consistency_problems(cache) == []
    finally:
        cache.close()


async def test_truncated_file_is_detected_at_open(tmp_path: Path) -> None:
    cache = ChunkCache.open(tmp_path / "c", capacity=CAP)
    h, data = blob(100 * KiB, 4)
    await cache.put(h, data)
    cache.close()
    ChunkFiles(tmp_path / "c").path(h).write_bytes(data[:10])
    again = ChunkCache.open(tmp_path / "c", capacity=CAP)
    try:
        assert not again.contains(h)
        assert again.statistics().size == 0
        assert consistency_problems(again) == []
    finally:
        again.close()


async def test_crash_leftovers_are_cleaned_and_complete_files_adopted(tmp_path: Path) -> None:
    cache = ChunkCache.open(tmp_path / "c", capacity=CAP)
    cache.close()
    files = ChunkFiles(tmp_path / "c")
    # A write interrupted before its rename, and one renamed just before the row was added.
    (files.tmp / "deadbeef.partial").write_bytes(b"half a chunk")
    h, data = blob(50 * KiB, 5)
    files.write(h, data)
    again = ChunkCache.open(tmp_path / "c", capacity=CAP)
    try:
        assert list(files.tmp.iterdir()) == []
        assert again.contains(h)
        assert await again.get(h) == data
        assert again.statistics().size == len(data)
    finally:
        again.close()


async def test_garbage_index_is_rebuilt_from_the_chunk_files(tmp_path: Path) -> None:
    cache = ChunkCache.open(tmp_path / "c", capacity=CAP)
    h, data = blob(64 * KiB, 6)
    await cache.put(h, data)
    cache.close()
    (tmp_path / "c" / "index.sqlite3").write_bytes(b"this is not a database" * 100)
    for suffix in ("-wal", "-shm"):
        (tmp_path / "c" / f"index.sqlite3{suffix}").unlink(missing_ok=True)
    again = ChunkCache.open(tmp_path / "c", capacity=CAP)
    try:
        assert await again.get(h) == data
        assert consistency_problems(again) == []
    finally:
        again.close()


async def test_index_of_another_version_is_rebuilt_keeping_pins(tmp_path: Path) -> None:
    cache = ChunkCache.open(tmp_path / "c", capacity=CAP)
    h, data = blob(64 * KiB, 7)
    await cache.put(h, data)
    cache.pin([h], "dirty:1")
    cache.close()
    db = sqlite3.connect(tmp_path / "c" / "index.sqlite3")
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    again = ChunkCache.open(tmp_path / "c", capacity=CAP)
    try:
        assert again.contains(h)
        assert again.statistics().pinned_bytes == len(data)
        assert again.evict([h]) == 0
    finally:
        again.close()


def test_foreign_sqlite_file_as_index_is_rebuilt(tmp_path: Path) -> None:
    ChunkCache.open(tmp_path / "c", capacity=CAP).close()
    (tmp_path / "c" / "index.sqlite3").unlink()
    db = sqlite3.connect(tmp_path / "c" / "index.sqlite3")
    db.execute("CREATE TABLE other (x)")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    again = ChunkCache.open(tmp_path / "c", capacity=CAP)
    try:
        assert again.statistics().chunks == 0
    finally:
        again.close()


def test_non_empty_foreign_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("precious")
    with pytest.raises(CacheError, match="not a ferry chunk cache"):
        ChunkCache.open(tmp_path / "home", capacity=CAP)
    assert (tmp_path / "home" / "thesis.tex").read_text() == "precious"


def test_cache_of_another_layout_is_refused(tmp_path: Path) -> None:
    ChunkCache.open(tmp_path / "c", capacity=CAP).close()
    (tmp_path / "c" / "FERRY-CACHE").write_text("ferry chunk cache, layout 7\n")
    with pytest.raises(CacheError, match="different cache layout"):
        ChunkCache.open(tmp_path / "c", capacity=CAP)


def test_unusable_directory_is_a_cache_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(CacheError, match="file"):
        ChunkCache.open(tmp_path / "file" / "cache", capacity=CAP)


def test_default_capacity_is_a_tenth_of_free_space_but_at_least_1_gib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rule exactly, on a disk whose free space holds still (the real one never does)."""
    asked: list[Path] = []
    free = {"bytes": 0}

    def disk_usage(path: Path) -> shutil._ntuple_diskusage:
        asked.append(Path(path))
        return shutil._ntuple_diskusage(100 * GiB, 100 * GiB - free["bytes"], free["bytes"])

    monkeypatch.setattr("cache.store.shutil.disk_usage", disk_usage)
    for free["bytes"], expected in [
        (80 * GiB + 7, 8 * GiB),  # a tenth, rounded down
        (20 * GiB + 10, 2 * GiB + 1),
        (10 * GiB + 9, GiB),  # the tenth and the floor meet
        (3 * GiB, GiB),  # the floor
        (0, GiB),
    ]:
        assert default_capacity(tmp_path / "not" / "yet") == expected, free
    assert set(asked) == {tmp_path}, "the nearest existing directory is the one measured"


def test_default_capacity_follows_the_real_disk(tmp_path: Path) -> None:
    """On the real disk, other processes write meanwhile: the answer lies between readings."""
    slack = 256 * 1024 * 1024  # other writers between the readings (CI runs many at once)
    before = shutil.disk_usage(tmp_path).free
    capacity = default_capacity(tmp_path / "not" / "yet")
    after = shutil.disk_usage(tmp_path).free
    low, high = min(before, after) - slack, max(before, after) + slack
    assert max(GiB, low // 10) <= capacity <= max(GiB, high // 10), (before, capacity, after)


def test_a_cache_directory_in_use_is_refused_until_closed(tmp_path: Path) -> None:
    first = ChunkCache.open(tmp_path / "c", capacity=CAP)
    with pytest.raises(CacheError, match="in use by another ferry process"):
        ChunkCache.open(tmp_path / "c", capacity=CAP)
    first.close()
    ChunkCache.open(tmp_path / "c", capacity=CAP).close()
