"""The pull side: bring other devices' changes into the mirror and the kernel's view.

`run_pull` long-polls the change feed from the stored cursor and applies
each changed entry with `Mirror.apply_remote`, then tells the kernel what
to forget (`Operations.invalidate`). It leaves alone:

- echoes of our own commits (the mirror already has that revision);
- entries with local operations still in the journal (the uploader meets
  the newer remote change as a conflict and resolves it);
- a remote delete of a directory that still holds local, unsynced entries
  (the uploader restores it from the trash; nothing created here is lost).

A remote entry that wants a name a local unsynced entry holds moves the
local one to a conflict name first. While the drive is offline this loop is
also the probe: it retries with backoff, and when the server answers it
applies the catch-up page *before* reporting success, so the uploader
(waiting in `wait_online`) pushes only after the pull -- pull first, push second.
While online, a heartbeat beside the long poll notices a network that
answers nothing at all (see `Puller.next_page`).
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import TYPE_CHECKING, Any

import trio

from remote.errors import ServerRefused, ServerUnreachable
from remote.protocol import MAX_FEED_PAGE, ChangePage, Entry
from vfs.mirror import Invalidation, MirrorRow, NameTaken
from vfs.schema import get_meta, set_meta, transaction
from vfs.sync.conflicts import record_conflict, unique_conflict_name
from vfs.sync.push import being_written

if TYPE_CHECKING:
    from vfs.context import DriveContext

log = logging.getLogger(__name__)

#: Seconds one long-poll of the change feed may wait for news.
LONG_POLL = 25.0
#: While a long poll waits, check this often (seconds) that the server still answers at all...
HEARTBEAT = 5.0
#: ... and call it unreachable when a check gets no answer within this many seconds.
HEARTBEAT_TIMEOUT = 5.0
#: Wait after the server refused the feed request (seconds).
REFUSED_RETRY = 5.0


async def initial_snapshot(ctx: DriveContext) -> int:
    """Page the whole tree in from the change feed (first mount); returns the cursor.

    Resumable: the cursor is stored with every page.
    """
    puller = Puller(ctx)
    while True:
        page = await ctx.client.changes(puller.cursor, limit=MAX_FEED_PAGE)
        await puller.apply_page(page)
        if not page.more:
            return puller.cursor


async def run_pull(ctx: DriveContext, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Follow the change feed for as long as the drive is mounted."""
    puller = Puller(ctx)
    ctx.extra["puller"] = puller
    task_status.started()
    await puller.run()


class Puller:
    """The change-feed follower of one drive."""

    def __init__(self, ctx: DriveContext) -> None:
        self.ctx = ctx
        self.cursor = int(get_meta(ctx.db, "cursor") or 0)
        self._advanced = trio.Event()

    async def run(self) -> None:
        connectivity = self.ctx.connectivity
        while True:
            online = connectivity.online
            if not online:
                await trio.sleep(connectivity.probe_delay())
            try:
                page = await self.next_page(online)
            except ServerUnreachable as exc:
                connectivity.report_failure(exc)
                continue
            except ServerRefused as exc:
                message = f"the server refused the change feed: {exc}"
                log.error("%s; retrying in %.0f s", message, REFUSED_RETRY)
                connectivity.note_error(message)
                await trio.sleep(REFUSED_RETRY)
                continue
            try:
                await self.apply_page(page)
            except Exception as exc:  # a bug: keep the drive serving, retry later
                log.exception("applying remote changes failed; retrying in %.0f s", REFUSED_RETRY)
                connectivity.note_error(f"pull error: {exc!r}")
                await trio.sleep(REFUSED_RETRY)
                continue
            connectivity.report_success()

    async def next_page(self, online: bool) -> ChangePage:
        """The next page of the feed: a long poll watched by a heartbeat while online, else a probe.

        A network that swallows packets (a black hole: no reset, no answer)
        leaves a long poll waiting for its whole read timeout, and an upload
        or a fetch waiting for each retry's; the drive would look online for
        minutes while nothing moves. So while the long poll waits, a small
        request checks every HEARTBEAT s that the server still answers
        (skipped when answers arrived meanwhile); one that gets no answer
        within HEARTBEAT_TIMEOUT ends the long poll as unreachable.
        """
        client = self.ctx.client
        if not online:
            return await client.changes(self.cursor, wait=0, limit=MAX_FEED_PAGE)
        outcome: list[ChangePage | Exception] = []
        async with trio.open_nursery() as nursery:

            async def long_poll() -> None:
                try:
                    outcome.append(
                        await client.changes(self.cursor, wait=LONG_POLL, limit=MAX_FEED_PAGE)
                    )
                except (ServerUnreachable, ServerRefused) as exc:
                    outcome.append(exc)
                nursery.cancel_scope.cancel()

            nursery.start_soon(long_poll)
            outcome.append(await self._heartbeat())
            nursery.cancel_scope.cancel()
        if isinstance(outcome[0], Exception):
            raise outcome[0]
        return outcome[0]

    async def _heartbeat(self) -> ServerUnreachable:
        """Return (as the reason to go offline) once the server fails to answer a heartbeat."""
        stats = self.ctx.client.stats
        received = stats.bytes_received
        while True:
            await trio.sleep(HEARTBEAT)
            if stats.bytes_received != received:
                received = stats.bytes_received
                continue  # the server answered something meanwhile
            with trio.move_on_after(HEARTBEAT_TIMEOUT):
                try:
                    await self.ctx.client.capabilities()
                except ServerUnreachable as exc:
                    return exc
                except ServerRefused:
                    pass  # an answer all the same: the server is there
                received = stats.bytes_received
                continue
            return ServerUnreachable(
                f"the server did not answer a heartbeat within {HEARTBEAT_TIMEOUT:.0f} s "
                "(the network drops traffic?)"
            )

    async def wait_cursor(self, revision: int) -> None:
        """Return once the mirror has applied the feed up to `revision`."""
        while self.cursor < revision:
            await self._advanced.wait()

    async def apply_page(self, page: ChangePage) -> None:
        inv = Invalidation()
        with transaction(self.ctx.db):
            for entry in page.entries:
                inv.extend(self.apply_entry(entry))
            set_meta(self.ctx.db, "cursor", str(page.cursor))
        if page.entries:
            log.debug("applied %d remote changes (cursor %d)", len(page.entries), page.cursor)
        self.cursor = page.cursor
        self._advanced.set()
        self._advanced = trio.Event()
        if inv:
            await self.ctx.operations.invalidate(inv)

    def apply_entry(self, entry: Entry) -> Invalidation:
        """Apply one remote change unless local state must win or decide. Caller holds a transaction."""
        ctx = self.ctx
        row = ctx.mirror.get_by_id(entry.id)
        if row is not None and row.revision >= entry.revision:
            return Invalidation()  # our own commit coming back, or older news
        if ctx.journal.pending_for(entry.id) or being_written(ctx, entry.id):
            return Invalidation()
        if (
            entry.deleted
            and row is not None
            and row.kind == "dir"
            and ctx.mirror.has_children(row.inode)
        ):
            log.warning(
                "folder %r was deleted on another device but holds local changes; keeping it",
                entry.name,
            )
            return Invalidation()
        inv = Invalidation()
        if row is not None and row.kind == "dir" and not entry.deleted:
            inv.extend(self.undo_local_move_under(row, entry))
        occupant = self.renamed_occupant(entry)
        if occupant is not None:
            inv.extend(self.move_local_aside(occupant, entry))
        try:
            inv.extend(ctx.mirror.apply_remote(entry))
        except NameTaken as exc:
            inv.extend(self.move_local_aside(exc.occupant, entry))
            inv.extend(ctx.mirror.apply_remote(entry))
        return inv

    def undo_local_move_under(self, row: MirrorRow, entry: Entry) -> Invalidation:
        """Folder `row` moved on the server into a place that is inside it here.

        That happens when two devices moved folders into each other (A: d1 into
        d2; here, not sent yet: d2 into d1). Applying the server's move would tie
        the local tree into a loop, and the server refuses our move as a cycle
        anyway: the local move loses. The folder on the way that was moved here
        goes back where its first rename took it from, and that rename is
        dropped from the journal (it was never on the server).
        """
        ctx = self.ctx
        parent = ctx.mirror.get_by_id(entry.parent) if entry.parent else None
        if parent is None or not ctx.mirror.is_ancestor(row.inode, parent.inode):
            return Invalidation()
        node = parent
        while node.inode != row.inode:
            first = ctx.journal.first_rename(node.id)
            if first is not None:
                break
            node = ctx.mirror.get(node.parent) if node.parent is not None else row
        else:
            return Invalidation()  # no local move to undo: nothing here made the loop
        renames = [op for op in ctx.journal.pending() if op.entry_id == node.id]
        home = ctx.mirror.get_by_id(first.args.get("from_parent") or "")
        name = first.args.get("from_name")
        if (
            home is None
            or name is None
            or any(op.kind != "rename" or op.args.get("replaced") for op in renames)
            or ctx.mirror.lookup(home.inode, name) is not None
            or ctx.mirror.is_ancestor(node.inode, home.inode)
        ):
            log.warning(
                "folder %r was moved on another device into a folder moved into it here; "
                "keeping the local move for the server to decide",
                row.name,
            )
            return Invalidation()
        old_parent, old_name = node.parent, node.name
        ctx.mirror.move(node.inode, home.inode, name)
        ctx.journal.ack(op.seq for op in renames)
        record_conflict(
            ctx.db,
            ctx.mirror.path_in(home.inode, name),
            name,
            "moved here into a folder that another device moved into it: put back",
        )
        log.warning(
            "conflict: %r and %r were moved into each other here and on another device; "
            "the other device's move wins and %r is back in %r",
            old_name,
            row.name,
            name,
            ctx.mirror.path_of(home.inode) or "/",
        )
        assert old_parent is not None
        return Invalidation(
            inodes=[node.inode, old_parent, home.inode],
            entries=[(old_parent, old_name), (home.inode, name)],
        )

    def renamed_occupant(self, entry: Entry) -> MirrorRow | None:
        """The synced local entry holding `entry`'s name because of a rename not yet sent.

        The mirror would detach it as a clean entry the server moved away, and the
        pending rename would then be resolved on an entry no longer in the tree.
        """
        ctx = self.ctx
        if entry.deleted or entry.parent is None:
            return None
        parent = ctx.mirror.get_by_id(entry.parent)
        occupant = ctx.mirror.lookup(parent.inode, entry.name) if parent is not None else None
        if occupant is None or occupant.id == entry.id or occupant.revision == 0:
            return None
        return occupant if ctx.journal.first_rename(occupant.id) is not None else None

    def move_local_aside(self, occupant: Any, entry: Entry) -> Invalidation:
        """A remote entry takes a name held by a local unsynced one: the local one is renamed."""
        ctx = self.ctx
        parent = ctx.mirror.get(occupant.parent)
        new_name = unique_conflict_name(
            occupant.name,
            ctx.device,
            datetime.now(),
            lambda n: ctx.mirror.lookup(parent.inode, n) is not None,
            kind=occupant.kind,
        )
        ctx.mirror.move(occupant.inode, parent.inode, new_name)
        seqs = [op.seq for op in ctx.journal.pending() if op.entry_id == occupant.id]
        if occupant.revision == 0 and seqs:
            ctx.journal.amend(seqs, occupant.id, name=new_name)
        else:
            ctx.journal.append(
                "rename", occupant.id, parent=parent.id, name=new_name, replaced=None
            )
        record_conflict(
            ctx.db,
            ctx.mirror.path_in(parent.inode, occupant.name),
            new_name,
            "another device created the same name",
        )
        log.warning(
            "conflict: %r was also created on another device; the local one is now %r",
            occupant.name,
            new_name,
        )
        return Invalidation(
            inodes=[occupant.inode],
            entries=[(parent.inode, occupant.name), (parent.inode, new_name)],
        )
