"""The uploader: journal ops -> chunks the server lacks -> commits against base revisions.

`run_push` waits for journal ops, lets a burst of writes settle for the
write-back delay, folds the pending ops (`journal.coalesce`), and sends them
in commit batches. Content ops cut only the regions of the working copy
around its edits, reusing the base manifest's chunks elsewhere
(`vfs/sync/delta.py`), so a small edit of a large file reads and sends a
chunk or two; new chunks are pinned as `upload:<id>` until committed and put
into the local cache (no fsync: the working copy holds the bytes until the
commit) by writer tasks beside the cutting, all done before the commit. Each
is also handed to a `ChunkSender` (`vfs/sync/upload.py`) as soon as it is cut,
which sends those the server lacks in batched requests while the cutting goes
on, across all files of a commit batch. So cutting (with hashing), cache
writes and uploads overlap instead of taking turns.

Durability order (invariant 1): a batch's full request is written to
state.db with its idempotency key before it is sent (`Journal.begin_batch`);
journal rows are deleted only after the server answered. A client killed at
any point re-sends the recorded request with the same key at its next start,
and the server either applies it or answers with the stored result, so no op
is applied twice or lost.

A stale base revision comes back as a conflict and is resolved in
`vfs/sync/resolve.py` without dropping data; then the round starts again.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from cache.chunking import Chunk, Chunker, hash_chunk
from cache.files import is_disk_full
from remote import protocol
from remote.errors import CommitConflict, MissingChunks, ServerRefused, ServerUnreachable
from remote.protocol import ChunkRef, CommitResult
from vfs.errors import ContentUnavailable
from vfs.journal import PlannedOp, coalesce, split_batches
from vfs.mirror import Invalidation, NameTaken
from vfs.schema import get_meta, set_meta, transaction
from vfs.sync.delta import Piece, Rechunker, changed_ranges
from vfs.sync.upload import ChunkSender, first_error
from vfs.workcopy import END

if TYPE_CHECKING:
    from vfs.context import DriveContext

log = logging.getLogger(__name__)

#: Ops per commit request (well under protocol.MAX_OPS_PER_COMMIT; keeps requests small).
BATCH_OPS = 500
#: Journal rows folded per round.
ROUND_ROWS = 20_000
#: A burst of changes settles for at most this many write-back delays before it is pushed anyway.
MAX_SETTLE_FACTOR = 5
#: Wait after a refusal that is not a conflict before trying again (seconds, doubling).
REFUSED_BACKOFF_FIRST = 2.0
REFUSED_BACKOFF_CAP = 120.0
#: Tasks writing an upload's new chunks into the cache while the cutting goes on.
CACHE_WRITERS = 2
#: Chunks cut but not yet in the cache (memory: about this many MiB, on top of the sender's).
CACHE_QUEUE_CHUNKS = 8


@dataclass(slots=True)
class Content:
    """What a content op uploaded: the chunk list, its manifest and size."""

    chunks: list[ChunkRef]
    manifest: str
    size: int


@dataclass(slots=True)
class WireBatch:
    """Planned ops turned into protocol ops, with what their answers need."""

    planned: list[PlannedOp]
    ops: list[dict[str, Any]] = field(default_factory=list)
    sent: list[PlannedOp] = field(default_factory=list)  # planned op of each wire op
    skipped: list[int] = field(default_factory=list)  # seqs with nothing left to send
    content: dict[str, Content] = field(default_factory=dict)

    @property
    def seqs(self) -> list[int]:
        return sorted(s for p in self.planned for s in p.seqs)


async def run_push(ctx: DriveContext, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Upload local changes for as long as the drive is mounted."""
    pusher = Pusher(ctx)
    ctx.extra["pusher"] = pusher
    task_status.started()
    await pusher.run()


class Pusher:
    """One drive's uploader. All state lives in state.db except a few revision hints."""

    def __init__(self, ctx: DriveContext) -> None:
        self.ctx = ctx
        self.chunker = Chunker()
        #: revisions the server gave entries whose mirror row is gone (deleted here meanwhile)
        self.revisions: dict[str, int] = {}
        self.client_id = get_meta(ctx.db, "client_id") or uuid.uuid4().hex
        set_meta(ctx.db, "client_id", self.client_id)
        self.busy = False

    async def run(self) -> None:
        refused_delay = REFUSED_BACKOFF_FIRST
        while True:
            await self.ctx.journal.wait_nonempty()
            await self._settle()
            await self.ctx.connectivity.wait_online()
            self.busy = True
            try:
                await self.finish_inflight()
                await self.push_round()
            except (ServerUnreachable, ContentUnavailable) as exc:
                self.ctx.connectivity.report_failure(exc)
            except ServerRefused as exc:
                message = f"upload refused by the server: {exc}"
                log.error("%s; will retry in %.0f s", message, refused_delay)
                self.ctx.connectivity.note_error(message)
                await trio.sleep(refused_delay)
                refused_delay = min(REFUSED_BACKOFF_CAP, refused_delay * 2)
            except Exception as exc:  # a bug: keep the drive serving, retry later
                log.exception("the uploader failed; retrying in %.0f s", refused_delay)
                self.ctx.connectivity.note_error(f"uploader error: {exc!r}")
                await trio.sleep(refused_delay)
                refused_delay = min(REFUSED_BACKOFF_CAP, refused_delay * 2)
            else:
                refused_delay = REFUSED_BACKOFF_FIRST
                self.ctx.connectivity.report_success()
            finally:
                self.busy = False

    async def _settle(self) -> None:
        """Wait until a whole write-back delay passed with no op appended (bounded), or a
        flush is asked.

        Appends are counted, not awaited one by one: a burst (an untar appends
        several ops per file) must not wake this task at every op, which cost
        the FUSE handlers about a tenth of their time. A flush request (`ferry
        sync`, unmount) ends the wait at once.
        """
        journal = self.ctx.journal
        delay = self.ctx.writeback_delay
        with trio.move_on_after(delay * MAX_SETTLE_FACTOR):
            while not journal.flush_requested:
                seen = journal.changes
                with trio.move_on_after(delay):
                    await journal.wait_flush_requested()
                if journal.changes == seen:
                    return

    # --- rounds and batches ---------------------------------------------------------

    async def push_round(self) -> None:
        """Fold the pending journal and send it, batch by batch, stopping at a conflict."""
        journal = self.ctx.journal
        if journal.flush_requested:
            journal.clear_flush_request()
        plan = coalesce(journal.pending(limit=ROUND_ROWS))
        if plan.dropped:
            journal.ack(plan.dropped)
        for planned in split_batches(plan.ops, BATCH_OPS):
            if not await self.push_batch(planned):
                return  # a conflict was resolved: fold again from the journal

    async def push_batch(self, planned: list[PlannedOp]) -> bool:
        """Send one batch; False if it met a conflict (resolved, and the round must restart)."""
        async with self.sending() as sender:
            batch = await self.to_wire(planned, sender)
        if not batch.ops:
            self.ctx.journal.ack(batch.seqs)
            return True
        key = self._key(batch.seqs)
        request = {
            "ops": batch.ops,
            "content": {k: [c.manifest, c.size] for k, c in batch.content.items()},
        }
        self.ctx.journal.begin_batch(key, batch.seqs, request)
        try:
            result = await self.ctx.client.commit(key, batch.ops, device=self.ctx.device)
        except CommitConflict as exc:
            self.ctx.journal.end_batch(key)
            from vfs.sync.resolve import resolve_conflict

            planned_op = batch.sent[exc.op_index] if 0 <= exc.op_index < len(batch.sent) else None
            if planned_op is None:
                raise
            try:
                await resolve_conflict(self, planned_op, batch.ops[exc.op_index], exc)
            finally:
                self._release_uploads(batch.content)
            return False
        except MissingChunks:
            self.ctx.journal.end_batch(key)
            raise
        except ServerRefused:
            self.ctx.journal.end_batch(key)
            raise
        with transaction(self.ctx.db):  # one commit for the whole answer, not one per entry
            done = self.apply_result(batch.sent, batch.ops, request["content"], result)
            self.ctx.journal.ack(batch.seqs)
            self.ctx.journal.end_batch(key)
        await _unlink(done)
        self._release_uploads(batch.content)
        await self.adopt(result)
        return True

    async def finish_inflight(self) -> None:
        """Re-send commits a previous run recorded but did not finish (it was killed)."""
        journal = self.ctx.journal
        for inflight in journal.inflight_batches():
            ops = inflight.request["ops"]
            log.info("re-sending an interrupted commit of %d operations", len(ops))
            try:
                result = await self.ctx.client.commit(inflight.key, ops, device=self.ctx.device)
            except (CommitConflict, MissingChunks) as exc:
                # Not applied before the crash and no longer applicable as it was:
                # the journal still has its rows, the next round folds them afresh.
                log.info("interrupted commit no longer applies (%s); rebuilding it", exc)
                journal.end_batch(inflight.key)
                self._release_uploads(inflight.request.get("content", {}))
                continue
            sent = [_planned_stub(op, inflight.seqs) for op in ops]
            with transaction(self.ctx.db):
                done = self.apply_result(sent, ops, inflight.request.get("content", {}), result)
                journal.ack(inflight.seqs)
                journal.end_batch(inflight.key)
            await _unlink(done)
            # The killed run pinned these chunks until its commit; the pins outlived it.
            self._release_uploads(inflight.request.get("content", {}))
            await self.adopt(result)

    def _key(self, seqs: Sequence[int]) -> str:
        """Idempotency key: this cache dir's id plus a digest of the journal rows sent."""
        digest = hashlib.sha256(",".join(map(str, seqs)).encode()).hexdigest()[:24]
        return f"{self.client_id}-{digest}"

    # --- building wire ops ---------------------------------------------------------------

    def base_of(self, entry_id: str, fallback: int | None = None) -> int:
        """The server revision a change of `entry_id` is made against."""
        row = self.ctx.mirror.get_by_id(entry_id)
        if row is not None and row.revision:
            return row.revision
        if entry_id in self.revisions:
            return self.revisions[entry_id]
        return fallback or 0

    def removal_base(self, entry_id: str, recorded: int | None) -> int:
        """The base for deleting `entry_id` (a delete, or the target of a rename-over).

        It is the revision the user saw when they removed it (`recorded`, saved in
        the journal), moved forward only by this device's own commits. A revision
        learnt from a conflict on another op never counts: removing against it
        would silently delete an edit this device has not seen, where the server
        should answer with a conflict that keeps the edit.
        """
        if recorded is None:
            return self.base_of(entry_id)
        own = self.revisions.get(entry_id)
        return recorded if own is None else max(recorded, own)

    async def to_wire(self, planned: list[PlannedOp], sender: ChunkSender) -> WireBatch:
        batch = WireBatch(planned)
        for p in planned:
            op = await self._wire_op(p, batch, sender)
            if op is None:
                batch.skipped.extend(p.seqs)
                continue
            batch.ops.append(op)
            batch.sent.append(p)
        return batch

    async def _wire_op(
        self, p: PlannedOp, batch: WireBatch, sender: ChunkSender
    ) -> dict[str, Any] | None:
        mirror = self.ctx.mirror
        row = mirror.get_by_id(p.entry_id)
        args = p.args
        if p.kind == "create":
            chunks = None
            if args["kind"] == "file":
                chunks = []
                if p.content and row is not None:
                    content = await self.upload_content(p.entry_id, sender)
                    batch.content[p.entry_id] = content
                    chunks = content.chunks
            mode = row.mode if row is not None else args["mode"]
            mtime = row.mtime_ns if row is not None else args["mtime_ns"]
            return protocol.op_create(
                p.entry_id,
                args["parent"],
                args["name"],
                args["kind"],
                mode,
                mtime,
                chunks=chunks,
                target=args.get("target"),
            )
        if p.kind == "write":
            if row is None or row.kind != "file":
                return None  # deleted here since: the delete that follows says it all
            content = await self.upload_content(p.entry_id, sender)
            batch.content[p.entry_id] = content
            row = mirror.get_by_id(p.entry_id) or row
            return protocol.op_update(
                p.entry_id, self.base_of(p.entry_id), content.chunks, row.mtime_ns
            )
        if p.kind == "rename":
            replaced = args.get("replaced")
            return protocol.op_rename(
                p.entry_id,
                self.base_of(p.entry_id),
                args["parent"],
                args["name"],
                replace=replaced or None,
                replace_base=self.removal_base(replaced, args.get("replaced_base"))
                if replaced
                else None,
            )
        if p.kind == "setattr":
            return protocol.op_setattr(
                p.entry_id,
                self.base_of(p.entry_id),
                mode=args.get("mode"),
                mtime_ns=args.get("mtime_ns"),
            )
        return protocol.op_delete(p.entry_id, self.removal_base(p.entry_id, args.get("base")))

    # --- content --------------------------------------------------------------------------

    @asynccontextmanager
    async def sending(self) -> AsyncIterator[ChunkSender]:
        """A `ChunkSender` whose uploads have all finished when the block exits.

        Errors come out as the one exception that caused them, not as a group.
        """
        try:
            async with trio.open_nursery() as nursery:
                sender = ChunkSender(self.ctx.client, nursery)
                yield sender
                await sender.flush()
        except BaseExceptionGroup as group:
            raise first_error(group) from None

    async def upload_content(self, entry_id: str, sender: ChunkSender | None = None) -> Content:
        """Cut the working copy's changed regions and hand the new chunks to `sender`.

        Only the regions around the edits are read and cut (`vfs/sync/delta.py`);
        new chunks go into the local cache, pinned as `upload:<id>` until the
        commit (when the cache disk is full they are sent without being cached).
        The chunks are on the server once the sender's block has exited; without
        a `sender`, once this returns.
        """
        if sender is None:
            async with self.sending() as own:
                return await self.upload_content(entry_id, own)
        workcopies = self.ctx.workcopies
        copy = workcopies.get(entry_id)
        if copy is None:
            # Never written here (an empty new file), or its working copy is gone: send
            # what the mirror shows, never an empty file in place of the content.
            row = self.ctx.mirror.get_by_id(entry_id)
            shown = (row.manifest, row.size) if row is not None and row.manifest else (None, 0)
            copy = workcopies.start(entry_id, *shown)
        snapshot = workcopies.snapshot(copy)
        base = await workcopies.reader.chunks_of(copy.base_manifest)
        changed = changed_ranges(snapshot.ranges, copy.base_size, snapshot.size)
        if sum(c.length for c in base) != copy.base_size:
            changed.append((0, END))  # bookkeeping disagrees with the manifest: cut it all
        owner = f"upload:{entry_id}"

        async def read(lo: int, hi: int) -> bytes:
            return await workcopies.read_snapshot(copy, snapshot, lo, hi)

        uncached = 0
        # Chunks go to the cache from CACHE_WRITERS tasks, not from the cutting loop: a
        # cache write (a new file of ~1 MiB in a thread) took ~4 ms a chunk, 4.4 s per GiB
        # measured under load, and in line it stalled the cutting and the sending behind it.
        to_cache, cache_queue = trio.open_memory_channel[tuple[str, bytes]](CACHE_QUEUE_CHUNKS)

        async def cache_writer(queue: trio.MemoryReceiveChannel[tuple[str, bytes]]) -> None:
            nonlocal uncached
            async with queue:
                async for chunk_hash, chunk in queue:
                    try:
                        self.ctx.workcopies.check_room(len(chunk))  # leave state.db its reserve
                        # Hashed by the cutter just now; no fsync: the working copy keeps the
                        # bytes until the commit, and the server from then on.
                        await self.ctx.cache.put(chunk_hash, chunk, hashed=True, durable=False)
                    except (OSError, sqlite3.OperationalError) as exc:
                        if not (is_disk_full(exc) or "full" in str(exc)):
                            raise
                        uncached += 1

        async def sink(piece: Piece, data: memoryview) -> None:
            chunk = bytes(data)
            self.ctx.cache.pin([piece.ref.hash], owner)
            await to_cache.send((piece.ref.hash, chunk))
            await sender.add(piece.ref.hash, chunk)

        rechunker = Rechunker(
            base,
            changed,
            snapshot.size,
            read,
            self._cut,
            sink,
            keep_tail=self.chunker.min_size,
            digest=_digest,
        )
        try:
            async with trio.open_nursery() as writers:
                for _ in range(CACHE_WRITERS):
                    writers.start_soon(cache_writer, cache_queue.clone())
                cache_queue.close()
                async with to_cache:
                    pieces = await rechunker.pieces()
        except BaseExceptionGroup as group:
            raise first_error(group) from None
        chunks = [p.ref for p in pieces]
        if uncached:
            row = self.ctx.mirror.get_by_id(entry_id)
            log.warning(
                "the cache disk is full: %r is uploaded without keeping %d of its chunks in the"
                " cache; free space on the disk of %s",
                row.name if row is not None else entry_id,
                uncached,
                self.ctx.cache_dir,
            )
        fresh = sum(p.ref.length for p in pieces if p.new)
        log.debug("%s: %d of %d bytes cut again", entry_id, fresh, snapshot.size)
        return Content(chunks, protocol.manifest_hash(chunks), snapshot.size)

    async def _cut(self, data: bytes, offset: int) -> list[Chunk]:
        """Cut (and hash) a buffer in a worker thread."""
        return await trio.to_thread.run_sync(self.chunker.cut, data, offset)

    def _release_uploads(self, entry_ids: Iterable[str]) -> None:
        """Unpin the chunks uploaded for these entries (their commit is done or abandoned)."""
        for entry_id in entry_ids:
            self.ctx.cache.unpin(f"upload:{entry_id}")

    # --- answers ----------------------------------------------------------------------------

    def apply_result(
        self,
        sent: Sequence[PlannedOp],
        ops: Sequence[dict[str, Any]],
        content: dict[str, Any],
        result: CommitResult,
    ) -> list[Path]:
        """Record what the server committed in the mirror (and the kernel's view of it).

        Runs inside the caller's transaction, so a batch of 500 small files costs
        one commit (one fsync) instead of two per file. Returns the working-copy
        files it forgot, to be unlinked once that transaction has committed.
        """
        ctx = self.ctx
        manifests = ctx.workcopies.reader.manifests
        done: list[Path] = []
        latest = ctx.journal.last_content_seqs(content)
        for p, op, entry in zip(sent, ops, result.entries, strict=False):
            self.revisions[entry.id] = entry.revision
            row = ctx.mirror.get_by_id(entry.id)
            if row is None or entry.deleted:
                continue
            if entry.id in content:
                manifest, size = content[entry.id]
                if entry.manifest == manifest and op.get("chunks") is not None:
                    manifests.remember(manifest, protocol.chunks_from_json(op["chunks"]))
                last_seq = max(p.seqs) if p.seqs else 0
                clean = latest.get(entry.id, 0) <= last_seq and not being_written(ctx, entry.id)
                ctx.mirror.mark_synced(entry.id, entry.revision, manifest, size, clean)
                if clean and not ctx.operations.inodes.is_open(row.inode):
                    done.append(ctx.workcopies.forget(entry.id))
            else:
                ctx.mirror.mark_synced(entry.id, entry.revision, row.manifest, row.size, False)
        return done

    async def adopt(self, result: CommitResult) -> None:
        """Take the server's state of committed entries that have no local changes left.

        Usually a no-op; it matters after a rebased rename or setattr, when the
        server's entry also carries another device's change (new content, say)
        that the pull skipped while our op was pending.
        """
        ctx = self.ctx
        inv = Invalidation()
        for entry in result.entries:
            row = ctx.mirror.get_by_id(entry.id)
            if row is None or row.detached or row.dirty:
                continue
            if entry.deleted or row.revision != entry.revision:
                continue  # a newer change is known locally; the pull brings the rest
            if (row.manifest, row.mode, row.name) == (entry.manifest, entry.mode, entry.name):
                continue  # the usual case, decided before the journal query (a scan of it)
            if being_written(ctx, entry.id):
                continue  # the user's bytes are on their way into the journal
            if ctx.journal.pending_for(entry.id):
                continue
            try:
                inv.extend(ctx.mirror.apply_remote(entry))
            except NameTaken as exc:
                log.info("not adopting %s yet: %s", entry.name, exc)
        if inv:
            await ctx.operations.invalidate(inv)

    def statistics(self) -> dict[str, Any]:
        return {"uploading": self.busy}


async def _unlink(paths: list[Path]) -> None:
    """Remove files in a worker thread (dropping a file's cached pages can take milliseconds)."""
    if paths:
        await trio.to_thread.run_sync(lambda: [p.unlink(missing_ok=True) for p in paths])


async def _digest(data: bytes) -> str:
    return await trio.to_thread.run_sync(hash_chunk, data)


def being_written(ctx: DriveContext, entry_id: str) -> bool:
    """True while the entry's working copy holds writes not yet journaled (or being flushed).

    Such an entry is neither clean nor in the journal yet: remote state must
    not replace it, or the flush that follows would journal bytes already dropped.
    """
    copy = ctx.workcopies.get(entry_id)
    return copy is not None and (copy.unsynced or copy.flushing.locked())


def _planned_stub(op: dict[str, Any], seqs: list[int]) -> PlannedOp:
    """A PlannedOp standing for a recorded wire op (re-sent after a crash)."""
    kinds = {"update": "write"}
    return PlannedOp(
        kinds.get(op["op"], op["op"]), op["id"], {}, list(seqs), content="chunks" in op
    )
