"""ChunkCache: the local store of file content for a mounted drive.

A chunk is looked up in a small in-memory LRU of verified bytes, then in the
index and its file (read and re-hashed in a worker thread, so a damaged file
is dropped and fetched again rather than served). A missing chunk is fetched
through a callable the caller hands in, exactly once however many tasks want
it (`cache.inflight`), verified, written durably (`cache.files`) and indexed
(`cache.index`).

Concurrency (one trio thread; the index is only touched from it):

* Nothing here holds a lock across an await. Index statements are short and
  synchronous; file reads, writes with fsync, hashing of big buffers and
  unlinks go to `trio.to_thread`.
* The size cap is enforced when a chunk is about to be written and again
  when its row is added: `_make_room` picks least-recently-used unpinned
  chunks in SQL and deletes their rows at once (so they stop counting and stop
  being found), and the background unlinker task removes their files. Bytes
  being written are reserved first, so parallel writes evict for each other:
  the indexed size is back at or under the cap as soon as each write lands,
  unless pinned chunks alone exceed it (then unpinned chunks are not stored
  and a warning says why). Readers never wait for eviction; a reader that
  looked a chunk up just before its row was dropped either still reads the
  file or sees it gone and treats it as a miss.
* A write of a chunk whose file is queued for unlinking first takes it off the
  queue, or waits for the unlink batch that holds it, so an old unlink never
  removes a fresh file.
* Last-access times are an in-memory sequence flushed in batches (every few
  seconds and before eviction picks victims), not an UPDATE per read.

The background work (unlinker, read-ahead workers, access flushes) runs in
`run()`, which the drive starts in its nursery.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio
from cachetools import LRUCache

from cache.check import reconcile
from cache.chunking import hash_chunk
from cache.files import (
    INDEX_NAME,
    LAYOUT,
    LOCK_NAME,
    MARKER_NAME,
    MARKER_TEXT,
    ChunkFiles,
    is_disk_full,
)
from cache.index import ChunkIndex, IndexDamaged, salvage_pins
from cache.inflight import InFlight

log = logging.getLogger(__name__)

#: Downloads a chunk's bytes by hash; the cache verifies them, so a fetch need not.
Fetch = Callable[[str], Awaitable[bytes | bytearray]]
#: Downloads several chunks' bytes in one request, in the order asked; unverified, like Fetch.
FetchMany = Callable[[Sequence[str]], Awaitable[Sequence[bytes | bytearray]]]
#: One queued read-ahead job: the hashes it will fetch, and the job.
_ReadAhead = tuple[tuple[str, ...], Callable[[], Awaitable[None]]]

GiB = 1024**3
#: Chunks fetched in parallel by read-ahead (the window of `prefetch`).
PREFETCH_WINDOW = 8
#: Read-ahead requests waiting for a worker; beyond this `prefetch` drops them.
PREFETCH_QUEUE = 256
#: Most bytes of one batched read-ahead request (`prefetch_batches`). The server pays
#: about 1.4 ms of CPU per request whatever its size, so a cold sequential read of
#: ~1 MiB chunks costs it about half as much in 4 MiB requests.
READ_AHEAD_BATCH_BYTES = 4 * 1024 * 1024
#: A smaller batch waits (while the window still has chunks on their way) to grow.
READ_AHEAD_BATCH_MIN = READ_AHEAD_BATCH_BYTES
#: Bytes of recently read chunks kept in memory, so many small FUSE reads of one chunk hit RAM.
MEMORY_CACHE_BYTES = 64 * 1024 * 1024
#: Seconds between flushes of last-access times to the index.
ACCESS_FLUSH_SECONDS = 2.0
#: Buffers at least this big are hashed in a worker thread.
_THREAD_HASH_MIN = 64 * 1024


class CacheError(Exception):
    """A cache directory that cannot be used; the message says which and why."""


class ChunkVerifyError(ValueError):
    """Bytes offered for a chunk (fetched or put) do not hash to the chunk's name."""


@dataclass
class CacheStats:
    """Counters since open (hits..bytes_evicted) and the current state (size..pinned_bytes)."""

    hits: int
    misses: int
    bytes_fetched: int
    bytes_evicted: int
    size: int
    capacity: int
    chunks: int
    pinned_bytes: int


def default_capacity(directory: Path) -> int:
    """10% of the free space of the disk that holds `directory`, but at least 1 GiB."""
    probe = Path(directory).absolute()
    while not probe.exists():
        probe = probe.parent
    return max(GiB, shutil.disk_usage(probe).free // 10)


class ChunkCache:
    """Chunk files with a SQLite index, a size cap, LRU eviction, pins and single-flight fetches."""

    def __init__(
        self, files: ChunkFiles, index: ChunkIndex, capacity: int, memory_bytes: int
    ) -> None:
        self.directory = files.directory
        self.capacity = capacity
        self._files = files
        self._index = index
        self._count, self._size = index.totals()
        self._reserved = 0
        self._access = index.max_access()
        self._pending_access: dict[str, int] = {}
        self._memory: LRUCache[str, bytes | bytearray] = LRUCache(
            maxsize=memory_bytes, getsizeof=len
        )
        self._inflight = InFlight()
        self._prefetch_send, self._prefetch_recv = trio.open_memory_channel[_ReadAhead](
            PREFETCH_QUEUE
        )
        self._queued: set[str] = set()
        self._read_ahead_busy = 0
        self._read_ahead_idle = trio.Event()
        self._read_ahead_idle.set()
        self._doomed: set[str] = set()
        self._doomed_added = trio.Event()
        self._unlinking: frozenset[str] = frozenset()
        self._unlinked = trio.Event()
        self._running = False
        self._warned: set[str] = set()
        self._hits = self._misses = self._bytes_fetched = self._bytes_evicted = 0
        self._lock: int | None = None

    # --- lifecycle ------------------------------------------------------------

    @classmethod
    def open(
        cls, directory: Path, *, capacity: int, memory_bytes: int = MEMORY_CACHE_BYTES
    ) -> ChunkCache:
        """Create or open the cache in `directory`; raise CacheError if it cannot be used.

        A directory of another cache layout or a non-empty directory that is
        not a cache is refused; a damaged or other-version index is rebuilt
        from the chunk files (pins that can still be read are kept).
        """
        directory = Path(directory)
        if capacity <= 0:
            raise CacheError(f"cache size must be positive, got {capacity}")
        lock = None
        try:
            _claim_directory(directory)
            lock = _lock_directory(directory)
            files = ChunkFiles(directory)
            files.create_layout()
            index = _open_index(directory / INDEX_NAME)
        except OSError as exc:
            if lock is not None:
                os.close(lock)
            raise CacheError(f"cannot use cache directory {directory}: {exc}") from exc
        except CacheError:
            if lock is not None:
                os.close(lock)
            raise
        fixed = reconcile(index, files)
        if fixed.dropped_rows or fixed.adopted_files or fixed.removed_files:
            log.info("chunk cache %s repaired at open: %s", directory, fixed)
        cache = cls(files, index, capacity, memory_bytes)
        cache._lock = lock
        cache._make_room(0)
        cache._unlink_now()
        return cache

    def close(self) -> None:
        """Flush access times, finish pending unlinks and close the index."""
        self._flush_access()
        self._unlink_now()
        self._index.close()
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background work: unlinking evicted files, read-ahead workers, access flushes."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._unlink_loop, name="cache unlinker")
                nursery.start_soon(self._flush_loop, name="cache access flusher")
                for i in range(PREFETCH_WINDOW):
                    nursery.start_soon(self._prefetch_worker, name=f"cache read-ahead {i}")
                self._running = True
                self._doomed_added.set()
                task_status.started()
        finally:
            self._running = False
            self._flush_access()

    # --- reading --------------------------------------------------------------

    def contains(self, chunk_hash: str) -> bool:
        """Whether the chunk can be read right now without the network."""
        return chunk_hash in self._memory or self._index.size_of(chunk_hash) is not None

    async def get(self, chunk_hash: str) -> bytes | bytearray | None:
        """The chunk's verified bytes from memory or disk, or None; never touches the network."""
        data = await self._read_local(chunk_hash)
        if data is None:
            self._misses += 1
        else:
            self._hits += 1
        return data

    async def get_or_fetch(self, chunk_hash: str, fetch: Fetch) -> bytes | bytearray:
        """The chunk's bytes: local if possible, else from one shared call of `fetch(chunk_hash)`.

        The fetched bytes are verified (ChunkVerifyError if they do not match)
        and stored; failing to store them (a full disk) is logged, not raised.
        Exceptions of `fetch` reach every task waiting on that fetch.
        """
        while chunk_hash not in self._inflight:
            data = await self._read_local(chunk_hash)
            if data is not None:
                self._hits += 1
                return data
            # No await between this check and joining or starting the flight below.
            if chunk_hash in self._inflight or not self.contains(chunk_hash):
                break
        self._misses += 1
        return await self._inflight.run(
            chunk_hash, partial(self._fetch_and_store, chunk_hash, fetch)
        )

    def prefetch(self, hashes: Sequence[str], fetch: Fetch) -> None:
        """Queue background fetches of those chunks that are neither cached nor on their way.

        Never blocks: at most PREFETCH_WINDOW fetches run at once, and when the
        queue is full the rest of `hashes` is dropped (read-ahead is advice).
        Does nothing unless `run()` is running.
        """
        if not self._running:
            return
        for chunk_hash in hashes:
            if not self._wanted(chunk_hash):
                continue
            if not self._queue_read_ahead(
                (chunk_hash,), partial(self._read_ahead, chunk_hash, fetch)
            ):
                log.debug("read-ahead queue full; dropping %d chunk requests", len(hashes))
                return

    def prefetch_batches(self, chunks: Sequence[tuple[str, int]], fetch_many: FetchMany) -> None:
        """Like `prefetch` for a sequential reader's window of (hash, length): several per request.

        Uncached chunks go out in batches of consecutive ones up to
        READ_AHEAD_BATCH_BYTES. While part of the window is still on its way,
        a last batch smaller than READ_AHEAD_BATCH_MIN (or half the window) is
        held back: the reader asks again as it moves on and the tail grows, so
        a window that slides one chunk at a time is still fetched in large
        requests. A reader that needs a chunk of a batch waits for that batch
        (the chunk is in flight).
        """
        if not self._running:
            return
        fresh: dict[str, int] = {}
        coming = False
        for chunk_hash, length in chunks:
            if chunk_hash in self._queued or chunk_hash in self._inflight:
                coming = True
            elif chunk_hash not in fresh and not self.contains(chunk_hash):
                fresh[chunk_hash] = length
        # half the window at most, or a window of small chunks would never fill a batch
        enough = min(READ_AHEAD_BATCH_MIN, sum(length for _, length in chunks) // 2)
        batch: list[str] = []
        size = 0
        for chunk_hash, length in fresh.items():
            if batch and size + length > READ_AHEAD_BATCH_BYTES:
                if not self._queue_batch(batch, fetch_many):
                    return
                batch, size = [], 0
            batch.append(chunk_hash)
            size += length
        if batch and (size >= enough or not coming):
            self._queue_batch(batch, fetch_many)

    def _queue_batch(self, batch: list[str], fetch_many: FetchMany) -> bool:
        hashes = tuple(batch)
        if self._queue_read_ahead(hashes, partial(self._read_ahead_batch, hashes, fetch_many)):
            return True
        log.debug("read-ahead queue full; dropping a batch of %d chunks", len(hashes))
        return False

    async def wait_read_ahead_idle(self) -> None:
        """Return once every queued read-ahead fetch has finished (for tests and benchmarks)."""
        await self._read_ahead_idle.wait()

    async def fetch_missing(
        self, hashes: Iterable[str], fetch: Fetch, *, limit: int = PREFETCH_WINDOW
    ) -> None:
        """Make every one of `hashes` local (for pinning), `limit` fetches at a time; errors propagate."""
        missing = [h for h in dict.fromkeys(hashes) if not self.contains(h)]
        limiter = trio.CapacityLimiter(limit)

        async def one(chunk_hash: str) -> None:
            async with limiter:
                await self.get_or_fetch(chunk_hash, fetch)

        async with trio.open_nursery() as nursery:
            for chunk_hash in missing:
                nursery.start_soon(one, chunk_hash)

    # --- writing --------------------------------------------------------------

    async def put(
        self,
        chunk_hash: str,
        data: bytes | memoryview,
        *,
        hashed: bool = False,
        durable: bool = True,
    ) -> None:
        """Store bytes under their hash (verified first; ChunkVerifyError if they do not match).

        `hashed`: the caller just computed `chunk_hash` from these very bytes (the
        uploader's chunker), so they are not hashed again. `durable=False`: no
        fsync, for bytes whose durable copy lives elsewhere (a working copy);
        a torn file after a power cut fails the hash check on read and is dropped.
        Errors of the disk (OSError, ENOSPC included) propagate; nothing
        partial is left under the chunk's name.
        """
        if not hashed:
            await self._verify(chunk_hash, data, "offered")
        await self._store(chunk_hash, bytes(data), raise_errors=True, durable=durable)

    async def put_fetched(self, chunk_hash: str, data: bytes) -> None:
        """Store bytes fetched from the server in bulk (a batch download): verified, not fsynced.

        A chunk that does not match raises ChunkVerifyError; a full disk is
        logged, not raised (the bytes can be fetched again).
        """
        await self._verify(chunk_hash, data, "fetched")
        self._bytes_fetched += len(data)
        try:
            await self._store(chunk_hash, bytes(data), raise_errors=False, durable=False)
        except sqlite3.Error as exc:
            self._warn_store_failure(chunk_hash, exc)

    async def put_fetched_many(self, chunks: Sequence[tuple[str, bytes | bytearray]]) -> None:
        """`put_fetched` for a whole batch download, hashed and written in one worker-thread call.

        Two thread rounds per chunk (hash, write) became the pace of a cold
        `cp -r` of small files on a busy machine, where each round waits for
        a core; one round per batch does not. Chunks that match are stored
        even when one does not, which then raises ChunkVerifyError; a full
        disk is logged, not raised.
        """
        fresh: list[tuple[str, bytes | bytearray]] = []
        for chunk_hash, data in chunks:
            if self._index.size_of(chunk_hash) is not None or chunk_hash in self._unlinking:
                await self.put_fetched(chunk_hash, data)  # rare: known, or its old file going
            else:
                fresh.append((chunk_hash, data))
        total = sum(len(data) for _, data in fresh)
        if not fresh or self._make_room(total):
            for chunk_hash, data in fresh:  # over the cap with pins: the careful path decides
                await self.put_fetched(chunk_hash, data)
            return
        for chunk_hash, _ in fresh:
            self._doomed.discard(chunk_hash)
        self._reserved += total
        try:
            written, bad, error = await trio.to_thread.run_sync(self._verify_and_write, fresh)
        finally:
            self._reserved -= total
        for chunk_hash, data in written:
            self._bytes_fetched += len(data)
            self._remember(chunk_hash, data)
            if self._index.size_of(chunk_hash) is None:
                self._index.add(chunk_hash, len(data), self._next_access())
                self._size += len(data)
                self._count += 1
        self._make_room(0)
        if error is not None:
            self._warn_store_failure(error[0], error[1])
        if bad:
            raise ChunkVerifyError(
                f"{len(bad)} of {len(chunks)} fetched chunks do not match their hashes"
                f" (first {bad[0]}); not storing them"
            )

    def _verify_and_write(
        self, chunks: list[tuple[str, bytes | bytearray]]
    ) -> tuple[list[tuple[str, bytes | bytearray]], list[str], tuple[str, OSError] | None]:
        """In a worker thread: (chunks written, hashes that did not match, first write error)."""
        written, bad = [], []
        for chunk_hash, data in chunks:
            if hash_chunk(data) != chunk_hash:
                bad.append(chunk_hash)
                continue
            try:
                self._files.write(chunk_hash, data, durable=False)
            except OSError as exc:
                return written, bad, (chunk_hash, exc)
            written.append((chunk_hash, data))
        return written, bad, None

    # --- pins and eviction ----------------------------------------------------

    def pin(self, hashes: Iterable[str], owner: str) -> None:
        """Keep these chunks for `owner` ('pin:<id>' or 'dirty:<id>'); holds for chunks yet to arrive."""
        self._index.pin(owner, hashes)

    def unpin(self, owner: str, hashes: Iterable[str] | None = None) -> None:
        """Drop `owner`'s pins on `hashes` (all of its pins if None); chunks become evictable."""
        self._index.unpin(owner, hashes)
        self._make_room(0)

    def evict(self, hashes: Iterable[str]) -> int:
        """Drop these chunks now unless pinned; returns the bytes freed."""
        victims = []
        for chunk_hash in dict.fromkeys(hashes):
            if self._index.is_pinned(chunk_hash):
                continue
            self._memory.pop(chunk_hash, None)
            size = self._index.size_of(chunk_hash)
            if size is not None:
                victims.append((chunk_hash, size))
        return self._drop(victims)

    def statistics(self) -> CacheStats:
        return CacheStats(
            hits=self._hits,
            misses=self._misses,
            bytes_fetched=self._bytes_fetched,
            bytes_evicted=self._bytes_evicted,
            size=self._size,
            capacity=self.capacity,
            chunks=self._count,
            pinned_bytes=self._index.pinned_bytes(),
        )

    # --- internals: reading ---------------------------------------------------

    async def _read_local(self, chunk_hash: str) -> bytes | bytearray | None:
        data = self._memory.get(chunk_hash)
        if data is not None:
            self._touch(chunk_hash)
            return data
        if self._index.size_of(chunk_hash) is None:
            return None
        data, damage = await trio.to_thread.run_sync(self._read_verified, chunk_hash)
        if self._index.size_of(chunk_hash) is None:
            return data  # evicted while we read; the bytes are still right
        if data is None:
            if damage:
                log.warning(
                    "chunk file %s %s; dropped it, it will be fetched again",
                    self._files.path(chunk_hash),
                    damage,
                )
            self._forget(chunk_hash)
            return None
        self._remember(chunk_hash, data)
        self._touch(chunk_hash)
        return data

    def _read_verified(self, chunk_hash: str) -> tuple[bytes | None, str | None]:
        """In a worker thread: (bytes, None), or (None, what is wrong) if missing or damaged."""
        data = self._files.read(chunk_hash)
        if data is None:
            return None, "disappeared"
        if hash_chunk(data) != chunk_hash:
            return None, f"does not match its hash ({len(data)} bytes; truncated or damaged)"
        return data, None

    async def _fetch_and_store(self, chunk_hash: str, fetch: Fetch) -> bytes | bytearray:
        # A bytearray download buffer is kept as it is, not copied: nothing else holds it
        # and nothing writes to it.
        data = await fetch(chunk_hash)
        try:
            # hashed and written in one worker-thread round (see put_fetched_many)
            await self.put_fetched_many([(chunk_hash, data)])
        except sqlite3.Error as exc:
            # The index could not record the chunk (its disk filled up too); the
            # file, if written, is adopted or removed by the next open's reconcile.
            self._warn_store_failure(chunk_hash, exc)
        return data

    async def _verify(
        self, chunk_hash: str, data: bytes | bytearray | memoryview, what: str
    ) -> None:
        if len(data) >= _THREAD_HASH_MIN:
            actual = await trio.to_thread.run_sync(hash_chunk, data)
        else:
            actual = hash_chunk(data)
        if actual != chunk_hash:
            raise ChunkVerifyError(
                f"{len(data)} bytes {what} for chunk {chunk_hash} hash to {actual}; not storing them"
            )

    # --- internals: writing and eviction ---------------------------------------

    async def _store(
        self, chunk_hash: str, data: bytes | bytearray, *, raise_errors: bool, durable: bool = True
    ) -> None:
        """Write, index and remember a verified chunk. Caller has verified `data`.

        `durable=False` for bytes the server holds: no fsync (see `ChunkFiles.write`).
        """
        self._remember(chunk_hash, data)
        if self._index.size_of(chunk_hash) is not None:
            return
        self._doomed.discard(chunk_hash)
        while chunk_hash in self._unlinking:
            await self._unlinked.wait()
        if self._index.size_of(chunk_hash) is not None:
            return
        if self._make_room(len(data)) and not self._fits_beside_pins(chunk_hash, len(data)):
            return
        self._reserved += len(data)
        try:
            await trio.to_thread.run_sync(
                partial(self._files.write, chunk_hash, data, durable=durable)
            )
        except OSError as exc:
            if raise_errors:
                raise
            self._warn_store_failure(chunk_hash, exc)
            return
        finally:
            self._reserved -= len(data)
        self._warned.discard("store")
        if self._index.size_of(chunk_hash) is None:
            self._index.add(chunk_hash, len(data), self._next_access())
            self._size += len(data)
            self._count += 1
            # Writes that ran alongside this one may have left the total above the cap.
            self._make_room(0)

    def _make_room(self, incoming: int) -> int:
        """Evict LRU unpinned chunks so that `incoming` more bytes fit under the cap.

        Returns the bytes still over the cap afterwards: 0 normally; more when
        the rest is pinned or is other chunks still being written.
        """
        excess = self._size + self._reserved + incoming - self.capacity
        if excess <= 0:
            return 0
        self._flush_access()
        return max(0, excess - self._drop(self._index.lru_victims(excess)))

    def _fits_beside_pins(self, chunk_hash: str, size: int) -> bool:
        """Whether an unpinned chunk can ever fit next to the pinned ones; warns once if not."""
        pinned = self._index.pinned_bytes()
        if self._index.is_pinned(chunk_hash) or pinned + size <= self.capacity:
            return True
        if "cap" not in self._warned:
            self._warned.add("cap")
            log.warning(
                "chunk cache %s is full of pinned or unsynced data (%d of %d bytes pinned);"
                " new chunks are not cached until something is unpinned or uploaded,"
                " or the cache size is raised",
                self.directory,
                pinned,
                self.capacity,
            )
        return False

    def _drop(self, victims: list[tuple[str, int]]) -> int:
        """Remove rows now and queue their files for unlinking; returns the bytes freed."""
        if not victims:
            return 0
        hashes = [h for h, _ in victims]
        freed = sum(size for _, size in victims)
        self._index.remove(hashes)
        for chunk_hash in hashes:
            self._memory.pop(chunk_hash, None)
            self._pending_access.pop(chunk_hash, None)
        self._size -= freed
        self._count -= len(victims)
        self._bytes_evicted += freed
        self._doomed.update(hashes)
        if self._running:
            self._doomed_added.set()
        else:
            self._unlink_now()
        self._warned.discard("cap")
        return freed

    def _forget(self, chunk_hash: str) -> None:
        """Drop a damaged or vanished chunk (not counted as evicted)."""
        size = self._index.size_of(chunk_hash)
        if size is None:
            return
        self._index.remove([chunk_hash])
        self._memory.pop(chunk_hash, None)
        self._size -= size
        self._count -= 1
        self._doomed.add(chunk_hash)
        if self._running:
            self._doomed_added.set()
        else:
            self._unlink_now()

    def _unlink_now(self) -> None:
        """Unlink queued files synchronously (when no background task runs: open, close, tests)."""
        doomed, self._doomed = self._doomed, set()
        self._files.remove(doomed)

    async def _unlink_loop(self) -> None:
        while True:
            await self._doomed_added.wait()
            self._doomed_added = trio.Event()
            if not self._doomed:
                continue
            batch, self._doomed = frozenset(self._doomed), set()
            self._unlinking = batch
            done = self._unlinked = trio.Event()
            try:
                await trio.to_thread.run_sync(self._files.remove, batch)
            finally:
                self._unlinking = frozenset()
                done.set()

    def _warn_store_failure(self, chunk_hash: str, exc: OSError | sqlite3.Error) -> None:
        if "store" in self._warned:
            log.debug("not caching chunk %s: %s", chunk_hash, exc)
            return
        self._warned.add("store")
        full = is_disk_full(exc) or isinstance(exc, sqlite3.OperationalError) and "full" in str(exc)
        cause = "the disk is full" if full else str(exc)
        log.warning(
            "cannot write chunks to cache %s (%s); reads still work from the network but are"
            " not cached until this is fixed (first failed chunk %s)",
            self.directory,
            cause,
            chunk_hash,
        )

    # --- internals: memory and access times ------------------------------------

    def _remember(self, chunk_hash: str, data: bytes | bytearray) -> None:
        if len(data) <= self._memory.maxsize:
            self._memory[chunk_hash] = data

    def _next_access(self) -> int:
        self._access += 1
        return self._access

    def _touch(self, chunk_hash: str) -> None:
        self._pending_access[chunk_hash] = self._next_access()

    def _flush_access(self) -> None:
        if self._pending_access:
            pending, self._pending_access = self._pending_access, {}
            try:
                self._index.touch((access, h) for h, access in pending.items())
            except sqlite3.Error as exc:
                # Access times only order eviction; losing a batch is better than failing reads.
                log.warning("cannot record chunk access times in %s: %s", self.directory, exc)

    async def _flush_loop(self) -> None:
        while True:
            await trio.sleep(ACCESS_FLUSH_SECONDS)
            self._flush_access()

    def _wanted(self, chunk_hash: str) -> bool:
        """Whether read-ahead should fetch this chunk: not cached, queued or in flight."""
        return not (
            chunk_hash in self._queued or chunk_hash in self._inflight or self.contains(chunk_hash)
        )

    def _queue_read_ahead(
        self, hashes: tuple[str, ...], job: Callable[[], Awaitable[None]]
    ) -> bool:
        """Hand a job to the read-ahead workers; False when the queue is full."""
        try:
            self._prefetch_send.send_nowait((hashes, job))
        except trio.WouldBlock:
            return False
        self._queued.update(hashes)
        if self._read_ahead_busy == 0:
            self._read_ahead_idle = trio.Event()
        self._read_ahead_busy += 1
        return True

    async def _prefetch_worker(self) -> None:
        async for hashes, job in self._prefetch_recv:
            self._queued.difference_update(hashes)
            try:
                await job()
            except Exception as exc:
                log.info(
                    "read-ahead of %d chunks from %s failed (%s); a reader will fetch them again",
                    len(hashes),
                    hashes[0],
                    exc,
                )
            finally:
                self._read_ahead_busy -= 1
                if self._read_ahead_busy == 0:
                    self._read_ahead_idle.set()

    async def _read_ahead(self, chunk_hash: str, fetch: Fetch) -> None:
        if not self.contains(chunk_hash):
            await self._inflight.run(chunk_hash, partial(self._fetch_and_store, chunk_hash, fetch))

    async def _read_ahead_batch(self, hashes: tuple[str, ...], fetch_many: FetchMany) -> None:
        """Fetch those of `hashes` not cached in one call of `fetch_many`, all in flight meanwhile.

        Every chunk of the batch is registered in `self._inflight` before the
        request goes out, so a reader that needs one waits for this batch (and
        gets its bytes, or the batch's error) instead of asking again; a chunk
        some other task is already fetching is left out. Waiters of a chunk
        that does not match its hash get ChunkVerifyError; the others of the
        batch are stored and served.
        """
        wanted = [chunk_hash for chunk_hash in hashes if not self.contains(chunk_hash)]
        await self._inflight.run_many(wanted, partial(self._fetch_and_store_batch, fetch_many))

    async def _fetch_and_store_batch(
        self, fetch_many: FetchMany, hashes: list[str]
    ) -> dict[str, bytes | bytearray | BaseException]:
        """Each chunk's verified bytes, or the ChunkVerifyError of one that did not match."""
        datas = await fetch_many(hashes)
        if len(datas) != len(hashes):
            raise CacheError(f"asked for {len(hashes)} chunks, got {len(datas)}")
        chunks = list(zip(hashes, datas, strict=True))
        try:
            await self.put_fetched_many(chunks)
        except sqlite3.Error as exc:
            self._warn_store_failure(hashes[0], exc)
        except ChunkVerifyError:
            # Rare: find which ones (put_fetched_many stores the good ones, or stops at
            # the first bad one when it takes its careful path); re-check what is not stored.
            outcome: dict[str, bytes | bytearray | BaseException] = {}
            for chunk_hash, data in chunks:
                outcome[chunk_hash] = data
                if not self.contains(chunk_hash):
                    try:
                        await self.put_fetched(chunk_hash, bytes(data))
                    except ChunkVerifyError as exc:
                        outcome[chunk_hash] = exc
            return outcome
        return dict(chunks)


def _claim_directory(directory: Path) -> None:
    """Make `directory` a cache directory, or raise CacheError if it is something else."""
    marker = directory / MARKER_NAME
    if marker.exists():
        text = marker.read_text(errors="replace")
        if text == MARKER_TEXT:
            return
        if text.startswith("ferry chunk cache, layout "):
            raise CacheError(
                f"cache directory {directory} was made by a ferry with a different cache layout"
                f" ({text.strip()!r}; this ferry uses layout {LAYOUT}); delete it or choose"
                " another cache directory"
            )
        raise CacheError(f"{marker} does not describe a ferry chunk cache: {text[:80]!r}")
    directory.mkdir(parents=True, exist_ok=True)
    if any(directory.iterdir()):
        raise CacheError(
            f"cache directory {directory} is not empty and is not a ferry chunk cache"
            f" (no {MARKER_NAME} file); refusing to use it so that nothing in it is deleted"
        )
    tmp = directory / f".{MARKER_NAME}.tmp"
    tmp.write_text(MARKER_TEXT)
    os.replace(tmp, marker)


def _lock_directory(directory: Path) -> int:
    """Take the directory's exclusive lock (held until close) so two drives never share it."""
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CacheError(
            f"cache directory {directory} is in use by another ferry process;"
            " each mount needs its own cache directory"
        ) from None
    return fd


def _open_index(path: Path) -> ChunkIndex:
    """Open the index, rebuilding it (keeping readable pins) if it is damaged or of another version."""
    try:
        return ChunkIndex.open(path)
    except IndexDamaged as exc:
        log.warning("chunk cache index damaged (%s); rebuilding it from the chunk files", exc)
        pins = salvage_pins(path)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    try:
        index = ChunkIndex.open(path)
    except IndexDamaged as exc:
        raise CacheError(f"cannot rebuild chunk cache index {path}: {exc}") from exc
    by_owner: dict[str, list[str]] = {}
    for owner, chunk_hash in pins:
        by_owner.setdefault(owner, []).append(chunk_hash)
    for owner, hashes in by_owner.items():
        index.pin(owner, hashes)
    return index
