"""Pins: files and folders the user keeps available offline (`ferry pin` / `unpin` / `evict`).

A pin names an entry id (so it follows renames) and covers the entry and, for a
folder, everything under it now and later. Pins live in `state.db` so they
survive a remount. The `PinKeeper` task turns them into cache pins: for each
file under a pin it pins the chunks of the file's current manifest in the
chunk cache (owner `pin:<entry id>`, so eviction never drops them) and fetches
the missing ones. It rescans when a pin is added or removed and whenever the
change feed moved (a file added or changed under a pinned folder), and drops
the cache pins of files that left every pin or whose content changed.

Tables `pins` and `pinned_content` are owned here and created on first use
(`PIN_TABLES` comments every column; vfs/schema.py holds the others).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from remote.errors import RemoteError
from vfs.mirror import ROOT_INODE, Mirror, MirrorRow, NoSuchEntry
from vfs.reader import ContentUnavailable
from vfs.schema import get_meta, transaction

if TYPE_CHECKING:
    import sqlite3

    from vfs.context import DriveContext

log = logging.getLogger(__name__)

PIN_TABLES = """
-- Entries the user pinned (`ferry pin`): a file, or a folder and everything under it.
CREATE TABLE IF NOT EXISTS pins (
    entry_id   TEXT PRIMARY KEY,        -- mirror.id of the pinned entry (pins follow renames)
    created_ns INTEGER NOT NULL         -- wall-clock time of the pin, nanoseconds
);

-- Files whose chunks the keeper has pinned in the chunk cache (owner 'pin:<entry_id>').
CREATE TABLE IF NOT EXISTS pinned_content (
    entry_id TEXT PRIMARY KEY,          -- mirror.id of a file under a pin
    manifest TEXT NOT NULL              -- the manifest whose chunks are pinned
);
"""

#: Seconds between checks whether the change feed moved (a cheap meta read).
WATCH_SECONDS = 1.0
#: Seconds to wait before retrying a fetch that failed (offline, server refused).
RETRY_SECONDS = 5.0
#: Chunk fetches in flight while pinning.
FETCH_PARALLEL = 8


def cache_owner(entry_id: str) -> str:
    return f"pin:{entry_id}"


@dataclass
class PinProgress:
    """How much of a pinned entry is local: files and bytes, in total and cached."""

    path: str
    files: int = 0
    bytes: int = 0
    local_bytes: int = 0

    @property
    def done(self) -> bool:
        return self.local_bytes >= self.bytes


class PinStore:
    """The `pins` table: which entries are pinned, and whether a row falls under one."""

    def __init__(self, db: sqlite3.Connection, mirror: Mirror) -> None:
        self.db = db
        self.mirror = mirror
        db.executescript(PIN_TABLES)

    def add(self, entry_id: str) -> bool:
        """Pin an entry; False if it was pinned already."""
        cursor = self.db.execute(
            "INSERT OR IGNORE INTO pins (entry_id, created_ns) VALUES (?, ?)",
            (entry_id, time.time_ns()),
        )
        return cursor.rowcount > 0

    def remove(self, entry_id: str) -> bool:
        """Unpin an entry; False if it was not pinned itself."""
        return self.db.execute("DELETE FROM pins WHERE entry_id = ?", (entry_id,)).rowcount > 0

    def roots(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT entry_id FROM pins ORDER BY created_ns")]

    def is_pinned(self, row: MirrorRow) -> bool:
        """Whether `row` or one of its ancestors is pinned."""
        roots = set(self.roots())
        if not roots:
            return False
        current: MirrorRow | None = row
        while current is not None:
            if current.id in roots:
                return True
            if current.parent is None or current.inode == ROOT_INODE:
                return False
            try:
                current = self.mirror.get(current.parent)
            except NoSuchEntry:
                return False
        return False

    def pinned_files(self) -> dict[str, MirrorRow]:
        """Every live file under a pin, by entry id."""
        found: dict[str, MirrorRow] = {}
        for entry_id in self.roots():
            row = self.mirror.get_by_id(entry_id)
            if row is None or row.detached:
                continue
            for file_row in files_under(self.mirror, row):
                found[file_row.id] = file_row
        return found

    def content(self) -> dict[str, str]:
        """entry id -> manifest whose chunks are pinned in the cache now."""
        return dict(self.db.execute("SELECT entry_id, manifest FROM pinned_content"))

    def set_content(self, entry_id: str, manifest: str | None) -> None:
        if manifest is None:
            self.db.execute("DELETE FROM pinned_content WHERE entry_id = ?", (entry_id,))
        else:
            self.db.execute(
                "INSERT OR REPLACE INTO pinned_content (entry_id, manifest) VALUES (?, ?)",
                (entry_id, manifest),
            )


def files_under(mirror: Mirror, row: MirrorRow) -> Iterator[MirrorRow]:
    """`row` itself if it is a file, else every file below it (depth first)."""
    if row.kind == "file":
        yield row
        return
    if row.kind != "dir":
        return
    stack = [row.inode]
    while stack:
        parent = stack.pop()
        after = 0
        while True:
            children = mirror.children(parent, after=after)
            if not children:
                break
            for child in children:
                if child.kind == "dir":
                    stack.append(child.inode)
                elif child.kind == "file":
                    yield child
                after = child.inode


class PinKeeper:
    """Keeps the chunks of every pinned file pinned and local; see the module docstring."""

    def __init__(self, ctx: DriveContext) -> None:
        self.ctx = ctx
        self.store = PinStore(ctx.db, ctx.mirror)
        self.last_error: str | None = None
        self._wake = trio.Event()
        self._seen_cursor: str | None = None

    @property
    def manifests(self):  # type: ignore[no-untyped-def]
        return self.ctx.operations.reader.manifests

    def wake(self) -> None:
        """Rescan soon (a pin was added or removed)."""
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            self._wake = trio.Event()
            self._seen_cursor = get_meta(self.ctx.db, "cursor")
            try:
                complete = await self.reconcile()
            except (RemoteError, ContentUnavailable, OSError) as exc:
                complete = False
                self.last_error = f"pinning: {exc}"
                log.warning("could not make pinned files local yet (%s); will retry", exc)
            delay = WATCH_SECONDS if complete else RETRY_SECONDS
            while not self._wake.is_set():
                with trio.move_on_after(delay):
                    await self._wake.wait()
                if not complete or get_meta(self.ctx.db, "cursor") != self._seen_cursor:
                    break

    async def reconcile(self) -> bool:
        """Pin and fetch what pins cover, release what they no longer cover; True if all local."""
        cache = self.ctx.cache
        wanted = self.store.pinned_files()
        held = self.store.content()
        for entry_id, manifest in held.items():
            row = wanted.get(entry_id)
            if row is None or row.manifest != manifest:
                cache.unpin(cache_owner(entry_id))
                self.store.set_content(entry_id, None)
        complete = True
        for entry_id, row in wanted.items():
            if row.manifest is None:
                continue  # new here: the content is local in its working copy
            if held.get(entry_id) == row.manifest and self._all_local(row.manifest):
                continue  # the common case on a rescan: nothing to do, no SQL writes
            if not self.ctx.connectivity.online and self.manifests.cached(row.manifest) is None:
                complete = False
                continue
            chunks = await self.ctx.operations.reader.chunks_of(row.manifest)
            hashes = [c.hash for c in chunks]
            with transaction(self.ctx.db):
                cache.pin(hashes, cache_owner(entry_id))
                self.store.set_content(entry_id, row.manifest)
            if all(cache.contains(h) for h in hashes):
                continue
            if not self.ctx.connectivity.online:
                complete = False
                continue
            await cache.fetch_missing(hashes, self.ctx.client.get_chunk, limit=FETCH_PARALLEL)
        if complete:
            self.last_error = None
        return complete

    def _all_local(self, manifest: str) -> bool:
        chunks = self.manifests.cached(manifest)
        return chunks is not None and all(self.ctx.cache.contains(c.hash) for c in chunks)

    def progress(self) -> list[PinProgress]:
        """For every pin: files and bytes under it, and how many of those bytes are local."""
        result = []
        for entry_id in self.store.roots():
            row = self.ctx.mirror.get_by_id(entry_id)
            if row is None or row.detached:
                continue
            item = PinProgress(self.ctx.mirror.path_of(row.inode))
            for file_row in files_under(self.ctx.mirror, row):
                item.files += 1
                item.bytes += file_row.size
                item.local_bytes += self.local_bytes(file_row)
            result.append(item)
        return result

    def local_bytes(self, row: MirrorRow) -> int:
        """Bytes of a file's content on this machine: all of a dirty one, else its cached chunks."""
        if row.dirty or row.manifest is None:
            return row.size  # all in the working copy
        chunks = self.manifests.cached(row.manifest)
        if chunks is None:
            return 0
        return sum(c.length for c in chunks if self.ctx.cache.contains(c.hash))
