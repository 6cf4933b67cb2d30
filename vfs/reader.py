"""File content from the server's chunks: offset -> manifest -> chunks, with read-ahead.

A manifest names the ordered chunks of one version of a file. Manifests are
kept in `state.db` (`manifests` table) once seen, so that cached files stay
readable offline. A chunk is read from the chunk cache; a missing one is
fetched once through `cache.get_or_fetch(h, client.download_chunk)` (the
cache verifies it), unless the drive is offline, when the read fails fast
with `ContentUnavailable` (EIO) instead of hanging. Sequential readers get the next chunks prefetched
(several per request: `cache.prefetch_batches`, `client.download_chunks`); a
small file's open may batch its directory (`vfs.prefetch`), and readers wait
for such a batch (`Pending`) rather than fetch the same thing twice.
"""

from __future__ import annotations

import bisect
import json
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import trio
from cachetools import LRUCache

from cache.store import ChunkVerifyError
from remote import protocol
from remote.errors import RemoteError, ServerUnreachable
from remote.protocol import EMPTY_MANIFEST, ChunkRef
from vfs.errors import ContentUnavailable
from vfs.schema import relaxed, transaction

if TYPE_CHECKING:
    from cache.store import ChunkCache
    from remote.client import RemoteClient
    from vfs.mirror import MirrorRow
    from vfs.prefetch import SmallFilePrefetcher
    from vfs.sync.online import Connectivity

log = logging.getLogger(__name__)

T = TypeVar("T")

_REMEMBER = "INSERT OR IGNORE INTO manifests (hash, chunks) VALUES (?, ?)"
#: How many chunks past the current one a sequential reader gets prefetched: about 16 MiB,
#: so that a 4 MiB read-ahead batch (cache.store.READ_AHEAD_BATCH_BYTES) goes out while
#: the ones before it are still on their way.
READAHEAD_CHUNKS = 16


class Pending:
    """Manifests and chunks a batch download is fetching right now, each with its done event.

    A reader that needs one of them waits for the batch instead of asking the
    server again (see vfs/prefetch.py); the batch sets every event it
    registered when it ends, whether or not it got the bytes.
    """

    def __init__(self) -> None:
        self.manifests: dict[str, trio.Event] = {}
        self.chunks: dict[str, trio.Event] = {}

    def release_manifests(self, hashes: list[str]) -> None:
        for manifest in hashes:
            event = self.manifests.pop(manifest, None)
            if event is not None:
                event.set()

    def release_chunks(self, hashes: list[str]) -> None:
        for chunk_hash in hashes:
            event = self.chunks.pop(chunk_hash, None)
            if event is not None:
                event.set()


@dataclass(frozen=True, slots=True)
class Layout:
    """A manifest's chunks with the file offset each one starts at."""

    chunks: tuple[ChunkRef, ...]
    starts: tuple[int, ...]
    size: int

    @classmethod
    def of(cls, chunks: list[ChunkRef]) -> Layout:
        starts, offset = [], 0
        for chunk in chunks:
            starts.append(offset)
            offset += chunk.length
        return cls(tuple(chunks), tuple(starts), offset)

    def span(self, offset: int, size: int) -> range:
        """Indexes of the chunks that hold bytes [offset, offset + size)."""
        end = min(offset + size, self.size)
        if offset >= end:
            return range(0)
        first = bisect.bisect_right(self.starts, offset) - 1
        last = bisect.bisect_left(self.starts, end) - 1
        return range(first, last + 1)


class ManifestStore:
    """Manifests by hash: local table first, then the server (when online)."""

    def __init__(
        self,
        db: sqlite3.Connection,
        client: RemoteClient,
        connectivity: Connectivity,
        pending: Pending | None = None,
    ) -> None:
        self.db = db
        self.client = client
        self.connectivity = connectivity
        self.pending = pending or Pending()
        self._layouts: LRUCache[str, Layout] = LRUCache(maxsize=256)

    def cached(self, manifest: str | None) -> list[ChunkRef] | None:
        """The chunks of `manifest` if known locally (no network)."""
        if manifest is None or manifest == EMPTY_MANIFEST:
            return []
        row = self.db.execute("SELECT chunks FROM manifests WHERE hash = ?", (manifest,)).fetchone()
        return None if row is None else protocol.chunks_from_json(json.loads(row[0]))

    def remember(self, manifest: str, chunks: list[ChunkRef]) -> None:
        """Keep a manifest locally (the sync engine calls this after committing new content)."""
        self.remember_many({manifest: chunks})

    def remember_many(self, manifests: dict[str, list[ChunkRef]]) -> None:
        """Keep manifests locally in one commit without fsync (`relaxed`).

        Every manifest remembered here is on the server already (fetched from
        it, or just committed there), so a power cut that loses the rows only
        means fetching them again; an fsync per manifest cost a cold `cp -r`
        of small files most of its time, on the trio thread.
        """
        rows = [(m, json.dumps(protocol.chunks_to_json(c))) for m, c in manifests.items()]
        if not rows:
            return
        if self.db.in_transaction:  # the caller's transaction commits these rows with its own
            self.db.executemany(_REMEMBER, rows)
            return
        with relaxed(self.db), transaction(self.db):
            self.db.executemany(_REMEMBER, rows)

    async def layout(self, manifest: str | None) -> Layout:
        """The layout of `manifest`, fetching the manifest if it is not local."""
        key = manifest or EMPTY_MANIFEST
        layout = self._layouts.get(key)
        if layout is not None:
            return layout
        chunks = self.cached(manifest)
        if chunks is None and key in self.pending.manifests:
            await self.pending.manifests[key].wait()  # a directory batch is fetching it
            chunks = self.cached(manifest)
        if chunks is None:
            chunks = await self._fetch(key)
        layout = Layout.of(chunks)
        self._layouts[key] = layout
        return layout

    async def _fetch(self, manifest: str) -> list[ChunkRef]:
        if not self.connectivity.online:
            raise ContentUnavailable(
                f"manifest {manifest[:12]} is not cached and the drive is offline"
            )
        try:
            chunks = await unless_offline(
                self.connectivity,
                lambda: self.client.get_manifest(manifest),
                f"manifest {manifest[:12]}",
            )
        except ServerUnreachable as exc:
            self.connectivity.report_failure(exc)
            raise ContentUnavailable(f"cannot fetch manifest {manifest[:12]}: {exc}") from exc
        except RemoteError as exc:
            raise ContentUnavailable(f"server refused manifest {manifest[:12]}: {exc}") from exc
        self.remember(manifest, chunks)
        return chunks


class Reader:
    """Reads byte ranges of a manifest's content through the chunk cache."""

    def __init__(
        self,
        manifests: ManifestStore,
        cache: ChunkCache,
        client: RemoteClient,
        connectivity: Connectivity,
        readahead: int = READAHEAD_CHUNKS,
    ) -> None:
        self.manifests = manifests
        self.cache = cache
        self.client = client
        self.connectivity = connectivity
        self.readahead = readahead
        #: Batches a directory's small files when one is opened (set by the mount).
        self.prefetcher: SmallFilePrefetcher | None = None

    def opened(self, row: MirrorRow) -> None:
        """A file was opened to read its server content: maybe batch its directory's small files."""
        prefetcher = self.prefetcher
        if prefetcher is not None and row.parent is not None and prefetcher.wants(row):
            prefetcher.request(row.parent)

    async def read(
        self, manifest: str | None, offset: int, size: int, *, sequential: bool = False
    ) -> bytes:
        """Bytes [offset, offset + size) of `manifest`'s content (short at its end)."""
        return b"".join(await self._pieces(manifest, offset, size, sequential))

    async def read_buffer(
        self, manifest: str | None, offset: int, size: int, *, sequential: bool = False
    ) -> bytes | memoryview:
        """Like `read`, but a range inside one chunk comes back as a view of the cached bytes.

        For the FUSE read handler, which only hands the buffer to the kernel:
        most reads of a big file lie inside one chunk and then cost no copy.
        """
        pieces = await self._pieces(manifest, offset, size, sequential)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    async def _pieces(
        self, manifest: str | None, offset: int, size: int, sequential: bool
    ) -> list[memoryview]:
        """Views of the chunks' bytes that make up [offset, offset + size), in order."""
        layout = await self.manifests.layout(manifest)
        indexes = layout.span(offset, size)
        if sequential and indexes:
            self._prefetch(layout, indexes[-1] + 1)
        pieces = []
        for index in indexes:
            data = await self.chunk(layout.chunks[index].hash)
            start = layout.starts[index]
            lo = max(offset - start, 0)
            hi = min(offset + size - start, len(data))
            pieces.append(memoryview(data)[lo:hi])
        return pieces

    async def chunk(self, chunk_hash: str) -> bytes | bytearray:
        """One chunk: from the cache, else fetched once (online) or ContentUnavailable (offline)."""
        pending = self.manifests.pending.chunks.get(chunk_hash)
        if pending is not None:
            await pending.wait()  # a directory batch is fetching it; then it is local
        if self.cache.contains(chunk_hash) or not self.connectivity.online:
            data = await self.cache.get(chunk_hash)
            if data is not None:
                return data  # the common case: no task or cancel scope for a cached chunk
            if not self.connectivity.online:
                raise ContentUnavailable(
                    f"chunk {chunk_hash[:12]} is not cached and the drive is offline"
                )
        try:
            return await unless_offline(
                self.connectivity,
                lambda: self.cache.get_or_fetch(chunk_hash, self.client.download_chunk),
                f"chunk {chunk_hash[:12]}",
            )
        except ServerUnreachable as exc:
            self.connectivity.report_failure(exc)
            raise ContentUnavailable(f"cannot fetch chunk {chunk_hash[:12]}: {exc}") from exc
        except RemoteError as exc:
            raise ContentUnavailable(f"server refused chunk {chunk_hash[:12]}: {exc}") from exc
        except ChunkVerifyError as exc:
            raise ContentUnavailable(
                f"chunk {chunk_hash[:12]} arrived damaged (the server's copy or the network is"
                f" bad; `ferry admin check` on the server finds damaged chunks): {exc}"
            ) from exc

    async def chunks_of(self, manifest: str | None) -> list[ChunkRef]:
        return list((await self.manifests.layout(manifest)).chunks)

    def _prefetch(self, layout: Layout, first: int) -> None:
        if not self.connectivity.online:
            return
        # several chunks per request: the server's CPU per request bounds a cold read
        window = [(c.hash, c.length) for c in layout.chunks[first : first + self.readahead]]
        if window:
            self.cache.prefetch_batches(window, self.client.download_chunks)


async def unless_offline(
    connectivity: Connectivity, fetch: Callable[[], Awaitable[T]], what: str
) -> T:
    """`fetch()`, unless the drive goes offline first: then ContentUnavailable at once.

    A network that swallows traffic leaves a request waiting for its read
    timeout, retried several times: minutes. The drive notices sooner (the
    pull's heartbeat, or any other request failing) and goes offline; a
    reader still waiting then gets EIO right away, as one starting now would.
    A shared fetch in the cache (`cache.inflight`) is not failed for the
    other readers by this one giving up.
    """
    outcome: list[T] = []
    failure: list[BaseException] = []
    async with trio.open_nursery() as nursery:

        async def run() -> None:
            try:
                outcome.append(await fetch())
            except Exception as exc:
                failure.append(exc)
            nursery.cancel_scope.cancel()

        nursery.start_soon(run)
        await connectivity.wait_offline()
        nursery.cancel_scope.cancel()
    if failure:
        raise failure[0]
    if not outcome:
        raise ContentUnavailable(f"{what} is not cached and the drive went offline fetching it")
    return outcome[0]
