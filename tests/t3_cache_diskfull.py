"""A full disk while caching: reads still succeed from the network, one log line, nothing corrupt."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cache.store import ChunkCache
from tests.t3_cache_support import FakeRemote, KiB, consistency_problems


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs, unmounted even if the test fails."""
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


async def test_full_disk_still_serves_reads_and_leaves_nothing_corrupt(
    small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The cap is far above the disk's size, so the disk fills before eviction starts.
    cache = ChunkCache.open(small_disk / "cache", capacity=1024**3, memory_bytes=0)
    remote = FakeRemote()
    hashes = [remote.add(1024 * KiB, seed) for seed in range(14)]
    try:
        with caplog.at_level(logging.WARNING, logger="cache.store"):
            for h in hashes:
                assert await cache.get_or_fetch(h, remote.fetch) == remote.chunks[h]
        stored = [h for h in hashes if cache.contains(h)]
        assert 0 < len(stored) < len(hashes), "the disk should have filled part way"
        full = [r for r in caplog.records if "disk is full" in r.getMessage()]
        assert len(full) == 1, [r.getMessage() for r in caplog.records]
        assert str(small_disk / "cache") in full[0].getMessage()
        assert consistency_problems(cache) == []
        for h in stored:
            assert await cache.get(h) == remote.chunks[h]
        # Freeing space lets caching resume.
        cache.evict(stored)
        assert await cache.get_or_fetch(hashes[-1], remote.fetch) == remote.chunks[hashes[-1]]
        assert cache.contains(hashes[-1])
    finally:
        cache.close()
    again = ChunkCache.open(small_disk / "cache", capacity=1024**3)
    try:
        assert consistency_problems(again) == []
    finally:
        again.close()
