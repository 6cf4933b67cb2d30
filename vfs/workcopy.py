"""Working copies: sparse local files holding what the user wrote, over a base manifest.

A file being written gets `work/<entry id>`, a sparse file, plus the set of
byte ranges of it that are local (`workcopy_ranges`). A byte inside a local
range comes from the file; any other byte comes from the base manifest the
working copy was started on (zeros past the base's size). So writing 10 bytes
into a 10 GB file costs 10 bytes, and unchanged ranges are still read from
chunks. A truncation to S marks [S, END) local: bytes past S read as the
sparse file's zeros, never as old base content.

Durability order (invariant 1): the bytes are written before their ranges and
size are recorded, and the filesystem appends the journal's `write` op in the
same transaction. A close records without fsync (the page cache and SQLite's
WAL survive a kill -9 of the drive; `volatile` marks the copy); an fsync()
(`sync`, `flush_bytes(durable=True)`) fsyncs the file in a thread first, so
after a power cut too the recorded ranges describe bytes that are on disk.

The uploader reads a working copy through `snapshot` and `read_snapshot`,
so only the base chunks an edit touches are fetched (`vfs/sync/delta.py`).
`materialize(entry_id)` makes a complete local file instead: missing base
ranges are fetched through the cache and written in, skipping any byte the
user wrote meanwhile (checked with no await between the check and the write).
Base chunks are pinned in the chunk cache as "dirty:<entry id>" while a
working copy depends on them.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import logging
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from vfs.schema import relaxed, transaction

if TYPE_CHECKING:
    from cache.store import ChunkCache
    from vfs.reader import Reader

log = logging.getLogger(__name__)

#: "To the end of any file": the end of the range a truncation marks local.
END = 2**62
#: Free space kept on the cache disk for state.db (the journal must always be able to
#: commit an unlink): 2% of the disk, at least RESERVE_MIN, at most RESERVE_MAX.
RESERVE_MIN = 1 << 20
RESERVE_MAX = 64 << 20
#: `check_room` looks at the disk again after at most this many seconds.
ROOM_RECHECK_SECONDS = 0.5
#: Materialize fills gaps in pieces of at most this many bytes (bounded memory).
FILL_PIECE = 8 * 1024 * 1024
#: Joins the two ids in the staged file name of a working copy changing hands (`rekey`).
_REKEY_MARK = ".from-"


def _pread_path(path: Path, size: int, offset: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


class RangeSet:
    """Disjoint, merged half-open ranges [start, end), sorted."""

    def __init__(self, ranges: list[tuple[int, int]] | None = None) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for start, end in ranges or []:
            self.add(start, end)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(zip(self._starts, self._ends, strict=True))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RangeSet) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"RangeSet({list(self)!r})"

    def add(self, start: int, end: int) -> None:
        """Mark [start, end) as covered, merging with touching ranges."""
        if start >= end:
            return
        lo = bisect.bisect_left(self._ends, start)
        hi = bisect.bisect_right(self._starts, end)
        if lo < hi:
            start = min(start, self._starts[lo])
            end = max(end, self._ends[hi - 1])
        self._starts[lo:hi] = [start]
        self._ends[lo:hi] = [end]

    def segments(self, start: int, end: int) -> list[tuple[int, int, bool]]:
        """Split [start, end) into (start, end, covered) pieces, in order."""
        out: list[tuple[int, int, bool]] = []
        pos = start
        i = bisect.bisect_right(self._ends, start)
        while pos < end:
            if i < len(self._starts) and self._starts[i] <= pos:
                hi = min(self._ends[i], end)
                out.append((pos, hi, True))
                i += 1
            else:
                hi = min(self._starts[i], end) if i < len(self._starts) else end
                out.append((pos, hi, False))
            pos = hi
        return out

    def gaps(self, start: int, end: int) -> list[tuple[int, int]]:
        return [(lo, hi) for lo, hi, covered in self.segments(start, end) if not covered]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Size and local ranges of a working copy at the moment its bytes were fsynced."""

    size: int
    ranges: list[tuple[int, int]]


@dataclass
class WorkCopy:
    """One entry's working copy. `size` is the logical size; `unsynced` means writes since the
    last flush; `volatile` means flushed bytes not yet fsynced (a close journals without fsync);
    `pending_attrs` are a setattr's mode/mtime_ns made while `unsynced`, journaled by the next
    flush together with the writes (vfs/operations.py)."""

    entry_id: str
    path: Path
    base_manifest: str | None
    base_size: int
    size: int
    ranges: RangeSet = field(default_factory=RangeSet)
    unsynced: bool = False
    volatile: bool = False
    fd: int | None = None
    pending_attrs: dict[str, int] = field(default_factory=dict)
    #: Serializes flushes, so an fsync() never returns while another flush still syncs its bytes.
    flushing: trio.Lock = field(default_factory=trio.Lock)

    def fileno(self) -> int:
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return self.fd


class WorkCopies:
    """All working copies of one drive: `<cache_dir>/work/` plus their bookkeeping in state.db."""

    def __init__(
        self, directory: Path, db: sqlite3.Connection, reader: Reader, cache: ChunkCache
    ) -> None:
        self.directory = directory
        self.db = db
        self.reader = reader
        self.cache = cache
        self._open: dict[str, WorkCopy] = {}
        directory.mkdir(parents=True, exist_ok=True)
        #: ids that have a working copy, so that `get` of the common "none" case costs no query
        self._ids: set[str] = set(self.entry_ids())
        #: Bytes `check_room` may let through before it looks at the disk again, and when it last did.
        self._room_budget = 0
        self._room_checked = 0.0
        self._settle_rekeys()

    # --- finding and starting -------------------------------------------------

    def get(self, entry_id: str) -> WorkCopy | None:
        """The working copy of `entry_id`, loading its bookkeeping if needed; None if there is none."""
        copy = self._open.get(entry_id)
        if copy is not None or entry_id not in self._ids:
            return copy
        row = self.db.execute(
            "SELECT base_manifest, base_size, size FROM workcopies WHERE entry_id = ?", (entry_id,)
        ).fetchone()
        if row is None:
            return None
        ranges = self.db.execute(
            "SELECT start, end FROM workcopy_ranges WHERE entry_id = ?", (entry_id,)
        ).fetchall()
        copy = WorkCopy(
            entry_id, self.directory / entry_id, row[0], row[1], row[2], RangeSet(ranges)
        )
        self._open[entry_id] = copy
        return copy

    def start(self, entry_id: str, base_manifest: str | None, base_size: int) -> WorkCopy:
        """Begin a working copy over `base_manifest` (of `base_size` bytes), pinning its chunks.

        Joins the caller's transaction if one is open (a create starts the copy in
        its own commit); otherwise its row commits by itself, relaxed.
        """
        copy = self.get(entry_id)
        if copy is not None:
            return copy
        path = self.directory / entry_id
        copy = WorkCopy(entry_id, path, base_manifest, base_size, base_size)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            copy.fd = os.open(path, flags, 0o600)
        except FileExistsError:  # left by an earlier run: a new file, never bytes of the old one
            path.unlink()
            copy.fd = os.open(path, flags, 0o600)
        # made durable by the FULL commit of the first flush
        with relaxed(self.db) if not self.db.in_transaction else contextlib.nullcontext():
            self.db.execute(
                "INSERT OR REPLACE INTO workcopies (entry_id, base_manifest, base_size, size) "
                "VALUES (?, ?, ?, ?)",
                (entry_id, base_manifest, base_size, base_size),
            )
        self._open[entry_id] = copy
        self._ids.add(entry_id)
        chunks = self.reader.manifests.cached(base_manifest)
        if chunks:
            self.cache.pin([c.hash for c in chunks], f"dirty:{entry_id}")
        return copy

    def entry_ids(self) -> list[str]:
        return [row[0] for row in self.db.execute("SELECT entry_id FROM workcopies")]

    # --- content ----------------------------------------------------------------

    def check_room(self, nbytes: int) -> None:
        """ENOSPC before the disk is so full that state.db could not record an unlink.

        A write that would leave less than the reserve free is refused, so the user
        can always delete files to make room and the journal can always commit.
        The disk is asked again (statvfs) once the writes since the last look have
        used half of the room it showed above the reserve, or ROOM_RECHECK_SECONDS
        later: not at each write (an untar writes four times per file), and close
        to the reserve at nearly every one.
        """
        now = time.monotonic()
        if nbytes <= self._room_budget and now - self._room_checked < ROOM_RECHECK_SECONDS:
            self._room_budget -= nbytes
            return
        disk = os.statvfs(self.directory)
        free = disk.f_bavail * disk.f_frsize
        reserve = max(RESERVE_MIN, min(RESERVE_MAX, disk.f_blocks * disk.f_frsize // 50))
        if free - nbytes < reserve:
            self._room_budget = 0
            raise OSError(
                errno.ENOSPC,
                f"the cache disk of {self.directory.parent} is full ({free >> 20} MiB free, "
                f"{reserve >> 20} MiB kept for the drive's own state); delete files to make room",
            )
        self._room_budget = (free - nbytes - reserve) // 2
        self._room_checked = now

    def write(self, copy: WorkCopy, offset: int, data: bytes) -> int:
        """Write `data` at `offset` (a FUSE-sized buffer: short enough for the loop thread)."""
        self.check_room(len(data))
        written = os.pwrite(copy.fileno(), data, offset)
        copy.ranges.add(offset, offset + written)
        copy.size = max(copy.size, offset + written)
        copy.unsynced = True
        return written

    def truncate(self, copy: WorkCopy, size: int) -> None:
        os.ftruncate(copy.fileno(), size)
        copy.ranges.add(size, END)
        copy.size = size
        copy.unsynced = True

    async def read(
        self, copy: WorkCopy, offset: int, size: int, *, sequential: bool = False
    ) -> bytes:
        """Bytes [offset, offset + size) of the current content, short at its end."""
        end = min(offset + size, copy.size)
        parts = []
        for lo, hi, local in copy.ranges.segments(offset, end):
            if local:
                data = os.pread(copy.fileno(), hi - lo, lo)
            else:
                data = await self._read_base(copy, lo, hi, sequential)
            parts.append(data.ljust(hi - lo, b"\0"))
        return b"".join(parts)

    def snapshot(self, copy: WorkCopy) -> Snapshot:
        """Size and local ranges as of now (what an upload will send, whatever is written meanwhile)."""
        return Snapshot(copy.size, list(copy.ranges))

    async def read_snapshot(self, copy: WorkCopy, snapshot: Snapshot, lo: int, hi: int) -> bytes:
        """Bytes [lo, hi) of the content `snapshot` describes, for the uploader.

        Local ranges are read from the file in a thread (these reads are up to
        megabytes); other bytes come from the base through the reader, which
        fetches only the base chunks they fall in; past the base they are zeros.
        """
        ranges = RangeSet(snapshot.ranges)
        parts = []
        for seg_lo, seg_hi, local in ranges.segments(lo, min(hi, snapshot.size)):
            if local:
                # Its own descriptor: the last release may close `copy.fd` meanwhile.
                data = await trio.to_thread.run_sync(
                    _pread_path, copy.path, seg_hi - seg_lo, seg_lo
                )
            else:
                data = await self._read_base(copy, seg_lo, seg_hi, False)
            parts.append(data.ljust(seg_hi - seg_lo, b"\0"))
        return b"".join(parts)

    async def _read_base(self, copy: WorkCopy, lo: int, hi: int, sequential: bool) -> bytes:
        if lo >= copy.base_size:
            return b""
        return await self.reader.read(
            copy.base_manifest, lo, min(hi, copy.base_size) - lo, sequential=sequential
        )

    # --- durability ------------------------------------------------------------

    async def flush_bytes(self, copy: WorkCopy, *, durable: bool = True) -> Snapshot:
        """What to `record` now; with `durable`, fsync the working copy first (in a thread).

        Without `durable` the bytes are only in the page cache, which a kill -9 of
        the drive does not lose; `copy.volatile` remembers that an fsync is owed.
        """
        snapshot = Snapshot(copy.size, list(copy.ranges))
        copy.unsynced = False
        if not durable:
            copy.volatile = True
            return snapshot
        copy.volatile = False
        await trio.to_thread.run_sync(os.fsync, copy.fileno())
        return snapshot

    def record(self, copy: WorkCopy, snapshot: Snapshot) -> None:
        """Write the bookkeeping of durable bytes. Joins the caller's transaction if one is open."""
        with transaction(self.db):
            self.db.execute(
                "UPDATE workcopies SET size = ? WHERE entry_id = ?", (snapshot.size, copy.entry_id)
            )
            self.db.execute("DELETE FROM workcopy_ranges WHERE entry_id = ?", (copy.entry_id,))
            self.db.executemany(
                "INSERT INTO workcopy_ranges (entry_id, start, end) VALUES (?, ?, ?)",
                [(copy.entry_id, start, end) for start, end in snapshot.ranges],
            )

    async def sync(self, copy: WorkCopy) -> None:
        """Make the working copy durable: fsync the bytes, then record ranges and size."""
        self.record(copy, await self.flush_bytes(copy))

    async def materialize(
        self, entry_id: str, fetch: Callable[[str], Awaitable[bytes]] | None = None
    ) -> Path:
        """Make the working copy complete on disk and return its path (for the uploader to chunk).

        Missing base bytes come through the reader (cache first, then the server,
        so this fails with ContentUnavailable when offline and uncached). `fetch`
        is accepted for the contract's sake; the reader's client fetch is used.
        An entry without a working copy gets an empty one (a file created here
        and never written).
        """
        copy = self.get(entry_id) or self.start(entry_id, None, 0)
        pos, filled = 0, False
        while True:
            gaps = copy.ranges.gaps(pos, min(copy.size, copy.base_size))
            if not gaps:
                break
            lo, hi = gaps[0]
            hi = min(hi, lo + FILL_PIECE)
            data = await self.reader.read(copy.base_manifest, lo, hi - lo)
            data = data.ljust(hi - lo, b"\0")
            # No await from here to the end of the loop body: the user may have
            # written into [lo, hi) while we fetched, and their bytes must win.
            for glo, ghi in copy.ranges.gaps(lo, hi):
                os.pwrite(copy.fileno(), data[glo - lo : ghi - lo], glo)
            copy.ranges.add(lo, hi)
            pos, filled = hi, True
        copy.ranges.add(0, END)
        if os.fstat(copy.fileno()).st_size != copy.size:
            os.ftruncate(copy.fileno(), copy.size)
            filled = True
        if filled:
            # Not `sync`: that would clear `unsynced`, and the user's next flush must
            # still journal the writes this upload may have missed.
            snapshot = Snapshot(copy.size, list(copy.ranges))
            await trio.to_thread.run_sync(os.fsync, copy.fileno())
            self.record(copy, snapshot)
        return copy.path

    # --- the end of a working copy -----------------------------------------------

    def close_file(self, entry_id: str) -> None:
        """Close the file descriptor (the bookkeeping stays) -- on last release."""
        copy = self._open.pop(entry_id, None)
        if copy is not None and copy.fd is not None:
            if copy.unsynced:
                self._open[entry_id] = copy  # keep unsynced state in memory
                return
            os.close(copy.fd)
            copy.fd = None

    def discard(self, entry_id: str) -> None:
        """Forget the working copy entirely: file, bookkeeping and pins."""
        self.forget(entry_id).unlink(missing_ok=True)

    def forget(self, entry_id: str) -> Path:
        """Drop the bookkeeping, descriptor and pins of a working copy, but not its file.

        Joins the caller's transaction; returns the file, for the caller to unlink
        once that transaction has committed (bookkeeping that outlived its file
        would read as zeros where the user's bytes were).
        """
        copy = self._open.pop(entry_id, None)
        if copy is not None and copy.fd is not None:
            os.close(copy.fd)
        self._ids.discard(entry_id)
        with transaction(self.db):
            self.db.execute("DELETE FROM workcopies WHERE entry_id = ?", (entry_id,))
            self.db.execute("DELETE FROM workcopy_ranges WHERE entry_id = ?", (entry_id,))
        self.cache.unpin(f"dirty:{entry_id}")
        return self.directory / entry_id

    def rekey(self, old_id: str, new_id: str) -> None:
        """Hand the working copy of `old_id` to `new_id`, replacing `new_id`'s own, if any
        (an atomic save: the new content becomes the original entry's next version).

        Joins the caller's transaction. The bytes get a second name,
        `<new_id>.from-<old_id>`, before the bookkeeping changes; the caller calls
        `finish_rekey` once its transaction has committed. A crash in between is
        settled at the next start by `_settle_rekeys`: the bookkeeping says
        whether the change committed.
        """
        copy = self.get(old_id)
        if copy is None:
            return
        replaced = self.get(new_id)
        if replaced is not None and replaced.fd is not None:
            os.close(replaced.fd)
            replaced.fd = None
        staged = self.directory / f"{new_id}{_REKEY_MARK}{old_id}"
        staged.unlink(missing_ok=True)
        os.link(copy.path, staged)
        with transaction(self.db):
            for table in ("workcopies", "workcopy_ranges"):
                self.db.execute(f"DELETE FROM {table} WHERE entry_id = ?", (new_id,))
                self.db.execute(
                    f"UPDATE {table} SET entry_id = ? WHERE entry_id = ?", (new_id, old_id)
                )
        self._open.pop(old_id, None)
        self._open.pop(new_id, None)
        self._ids.discard(old_id)
        copy.entry_id, copy.path = new_id, self.directory / new_id
        self._open[new_id] = copy
        self._ids.add(new_id)
        self.cache.unpin(f"dirty:{new_id}")
        chunks = self.reader.manifests.cached(copy.base_manifest)
        if chunks:
            self.cache.pin([c.hash for c in chunks], f"dirty:{new_id}")
        self.cache.unpin(f"dirty:{old_id}")

    def finish_rekey(self, old_id: str, new_id: str) -> None:
        """After the transaction of `rekey` committed: the staged name becomes the real one."""
        staged = self.directory / f"{new_id}{_REKEY_MARK}{old_id}"
        if staged.exists():
            os.replace(staged, self.directory / new_id)
            (self.directory / old_id).unlink(missing_ok=True)

    def _settle_rekeys(self) -> None:
        """Finish or undo a `rekey` a crash interrupted (see there)."""
        for path in self.directory.glob(f"*{_REKEY_MARK}*"):
            new_id, _, old_id = path.name.partition(_REKEY_MARK)
            if old_id in self._ids:  # not committed: the old bookkeeping stands
                path.unlink()
            else:
                log.info("finishing an interrupted atomic save of working copy %s", new_id)
                self.finish_rekey(old_id, new_id)

    def close(self) -> None:
        for copy in self._open.values():
            if copy.fd is not None:
                os.close(copy.fd)
                copy.fd = None
        self._open.clear()

    def statistics(self) -> dict[str, int]:
        count, size = self.db.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM workcopies"
        ).fetchone()
        return {"workcopies": count, "workcopy_bytes": size}
