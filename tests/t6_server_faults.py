"""`RemoteClient` through the fault proxy: bounded waits, retries, and never wrong bytes.

Each network fault of issue 9 is injected between the client and a real
`ferry serve`: connection resets, a black hole (no answer at all), responses
cut halfway (clean close and reset), latency with jitter and a bandwidth cap.
The client must either get the right answer (chunk downloads are verified
against their hash) or raise `ServerUnreachable` within the time its timeout
and retry settings allow -- never hang, never return other bytes -- and work
again as soon as the fault is cleared.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import trio

from remote import protocol
from remote.client import RemoteClient
from remote.errors import ServerUnreachable
from remote.protocol import ROOT_ID, ChunkRef, op_create
from remote.retry import Backoff
from tests.conftest import Library
from tools.faultproxy import FaultProxy

CHUNKS = [os.urandom(1_000_000) for _ in range(3)]
TIMEOUT = 1.0
RETRIES = 2
BACKOFF = Backoff(0.2, 0.2)
#: The most a failing request may take: every attempt times out, plus the backoff sleeps.
WORST_CASE = (RETRIES + 1) * TIMEOUT + RETRIES * BACKOFF.cap + 1.0


@pytest.fixture
def proxy(library: Library) -> Iterator[FaultProxy]:
    with FaultProxy(("127.0.0.1", library.server.port)) as proxy:
        yield proxy


@pytest.fixture
async def client(library: Library, proxy: FaultProxy) -> AsyncIterator[RemoteClient]:
    async with RemoteClient(
        proxy.url, library.name, library.token, timeout=TIMEOUT, retries=RETRIES, backoff=BACKOFF
    ) as client:
        for data in CHUNKS:
            await client.put_chunk(protocol.hash_bytes(data), data)
        yield client


def hashes() -> list[str]:
    return [protocol.hash_bytes(data) for data in CHUNKS]


async def assert_works(client: RemoteClient) -> None:
    """After a fault is cleared: downloads are right again."""
    with trio.fail_after(10):
        assert await client.get_chunks(hashes()) == CHUNKS
        assert await client.get_chunk(hashes()[0]) == CHUNKS[0]


async def test_reset_mid_download_is_retried_and_the_bytes_are_right(
    client: RemoteClient, proxy: FaultProxy
) -> None:
    proxy.set(bandwidth=2_000_000)  # ~1.5 s for the batch: time to reset it halfway
    with trio.fail_after(WORST_CASE + 3):
        async with trio.open_nursery() as nursery:
            got: list[list[bytes]] = []

            async def download() -> None:
                got.append(await client.get_chunks(hashes()))

            nursery.start_soon(download)
            await trio.sleep(0.4)
            await trio.to_thread.run_sync(proxy.reset_all)
    assert got == [CHUNKS]
    assert proxy.counters()["connections"] >= 2, "the reset did not force a second connection"


async def test_refused_and_reset_ends_unreachable_within_bounds(
    client: RemoteClient, proxy: FaultProxy
) -> None:
    proxy.set(refuse=True)
    await trio.to_thread.run_sync(proxy.reset_all)
    started = time.monotonic()
    with pytest.raises(ServerUnreachable):
        await client.get_chunk(hashes()[0])
    assert time.monotonic() - started < WORST_CASE
    proxy.clear()
    await assert_works(client)


async def test_black_hole_is_bounded_by_the_timeout(
    client: RemoteClient, proxy: FaultProxy
) -> None:
    proxy.set(blackhole=True)
    for call, raw_first in (
        (lambda: client.get_chunk(hashes()[0]), True),
        (lambda: client.missing_chunks(hashes()), False),
        (lambda: client.put_chunk(hashes()[1], CHUNKS[1]), False),
    ):
        # A chunk GET tries the raw path once (remote/chunk_download.py), one timeout more.
        extra = TIMEOUT if raw_first else 0.0
        started = time.monotonic()
        with pytest.raises(ServerUnreachable):
            await call()
        elapsed = time.monotonic() - started
        assert (RETRIES + 1) * TIMEOUT * 0.9 <= elapsed < WORST_CASE + extra, elapsed
    # A long poll may wait `wait` plus the timeout per attempt, and no longer.
    started = time.monotonic()
    with pytest.raises(ServerUnreachable):
        await client.changes(0, wait=0.5)
    assert time.monotonic() - started < WORST_CASE + (RETRIES + 1) * 0.5
    proxy.clear()
    await assert_works(client)


@pytest.mark.parametrize("with_reset", [False, True])
async def test_a_response_cut_halfway_never_yields_wrong_bytes(
    client: RemoteClient, proxy: FaultProxy, with_reset: bool
) -> None:
    """While every response is cut: ServerUnreachable. Cleared during the backoff: the right bytes."""
    chunk = hashes()[0]
    proxy.set(cut_after=len(CHUNKS[0]) // 2, cut_with_reset=with_reset)
    for call in (lambda: client.get_chunk(chunk), lambda: client.get_chunks(hashes())):
        started = time.monotonic()
        with pytest.raises(ServerUnreachable):
            await call()
        assert time.monotonic() - started < WORST_CASE
    proxy.set(cut_after=len(CHUNKS[0]) // 2, cut_with_reset=with_reset)
    with trio.fail_after(WORST_CASE):
        async with trio.open_nursery() as nursery:
            got: list[bytes] = []

            async def download() -> None:
                got.append(await client.get_chunk(chunk))

            nursery.start_soon(download)
            await trio.sleep(BACKOFF.first / 4)  # the first attempt was cut by now
            proxy.clear()
    assert got == [CHUNKS[0]]
    assert proxy.counters()["connections"] >= 2


async def test_latency_jitter_and_a_bandwidth_cap_change_nothing_but_time(
    client: RemoteClient, proxy: FaultProxy, library: Library
) -> None:
    proxy.set(latency=0.03, jitter=0.02, bandwidth=4_000_000)
    async with RemoteClient(
        proxy.url, library.name, library.token, timeout=10, retries=RETRIES, backoff=BACKOFF
    ) as patient:
        blobs = [os.urandom(300_000) for _ in range(4)]
        refs = [ChunkRef(protocol.hash_bytes(b), len(b)) for b in blobs]
        with trio.fail_after(30):
            missing = set(await patient.missing_chunks([r.hash for r in refs]))
            for ref, blob in zip(refs, blobs, strict=True):
                if ref.hash in missing:
                    await patient.put_chunk(ref.hash, blob)
            op = op_create(os.urandom(16).hex(), ROOT_ID, "slow.bin", "file", 0o644, 1, chunks=refs)
            result = await patient.commit(os.urandom(16).hex(), [op], device="slow")
            manifest = await patient.get_manifest(result.entries[0].manifest or "")
            assert manifest == refs
            assert b"".join(await patient.get_chunks([r.hash for r in manifest])) == b"".join(blobs)
            assert await patient.missing_chunks([r.hash for r in refs]) == []
