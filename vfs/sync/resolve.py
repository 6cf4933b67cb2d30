"""Resolving a commit the server refused as a conflict, without dropping anything.

The server refuses an op made against a stale base (409) and names the
entry as it is now (`CommitConflict.current`). The rules, from DESIGN.md and
issue 5:

- edit vs edit: the server's version keeps the name; the local content is
  committed as a new file `name (conflict from HOST ...).ext` beside it.
- delete here vs edit there: the edit wins; the entry comes back locally.
- edit here vs delete there: the edit wins; the entry is restored from the
  trash and the edit applied on top.
- a local create or rename onto a name the server gave to another entry
  (or onto a replaced file that changed there): the local entry moves to a
  conflict name.
- a parent deleted there while entries were created in it here: the parent
  is restored from the trash.
- rename/setattr against an older revision: re-sent on the current one; if
  the other device changed the content and ours waits to be uploaded too,
  ours becomes a conflict copy first (as for edit vs edit).

Each resolution changes the mirror and the journal so that the next round
of the uploader succeeds; it never acknowledges a row whose effect is not
on the server or deliberately superseded there.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime
from typing import TYPE_CHECKING, Any

import trio

from remote import protocol
from remote.errors import CommitConflict
from remote.protocol import Entry
from vfs.journal import PlannedOp
from vfs.mirror import Invalidation, NameTaken
from vfs.schema import transaction
from vfs.sync.conflicts import record_conflict, unique_conflict_name
from vfs.sync.pull import Puller
from vfs.sync.push import being_written

if TYPE_CHECKING:
    from vfs.sync.push import Pusher

log = logging.getLogger(__name__)

#: Seconds to wait before trying again a conflict copy of a file that is still being written.
STILL_WRITING_WAIT = 1.0


async def resolve_conflict(
    pusher: Pusher, p: PlannedOp, op: dict[str, Any], exc: CommitConflict
) -> None:
    """Change local state so that `op` (for planned op `p`) can be committed, or is moot."""
    current = exc.current
    kind = op["op"]
    log.info("conflict on %s of %s: %s", kind, _describe(pusher, p.entry_id), exc)
    if kind == "create":
        if current is not None and current.id == p.entry_id:
            await _already_created(pusher, p, current)
        elif current is None or current.id == op["parent"]:
            await _restore_parent(pusher, op["parent"], current)
        else:
            await _move_aside(pusher, p, op["parent"], op["name"], current)
    elif (
        current is None
        and op.get("replace")
        and not pusher.ctx.journal.has_pending_write(op["replace"])
    ):
        # The entry the rename replaced was created here and never reached the server
        # (its create was folded away with the replacement): nothing to replace there.
        pusher.ctx.journal.amend(p.seqs, p.entry_id, replaced=None)
    elif (
        current is None
        and kind == "delete"
        and not pusher.ctx.journal.has_pending_write(p.entry_id)
    ):
        # Never created on the server (a create folded away, or a replace of such an
        # entry turned into a delete): there is nothing to delete.
        pusher.ctx.journal.ack(p.seqs)
    elif current is None:
        log.warning("%s of %s refused: %s; retrying later", kind, p.entry_id, exc)
        raise exc
    elif current.id != p.entry_id:
        if current.deleted and current.id == op.get("replace"):
            pusher.ctx.journal.amend(p.seqs, p.entry_id, replaced=None)
        elif current.id == op.get("parent"):
            await _restore_parent(pusher, op["parent"], current)
        else:
            await _move_aside(
                pusher,
                p,
                op["parent"],
                op["name"],
                current,
                replace=op.get("replace"),
                replace_base=op.get("replace_base"),
            )
    elif kind == "delete":
        await _keep_remote_edit(pusher, p, current)
    elif current.deleted:
        await _undelete(pusher, current)
    elif kind == "update":
        await _conflict_copy(pusher, p, op, current)
    else:
        await _rebase(pusher, p, op, current)


def _describe(pusher: Pusher, entry_id: str) -> str:
    row = pusher.ctx.mirror.get_by_id(entry_id)
    if row is None:
        return entry_id
    try:
        return repr(pusher.ctx.mirror.path_of(row.inode))
    except LookupError:
        return repr(row.name)


async def _rebase(pusher: Pusher, p: PlannedOp, op: dict[str, Any], current: Entry) -> None:
    """Our op only touches attributes or the name: re-send it against the current revision.

    The current revision may carry another device's new content. A clean file
    takes that content now, so that the mirror never pairs a revision with
    content older than it (a later delete or rename-over against that revision
    would otherwise drop an edit this device never saw). The revision is kept
    in the mirror only, not in `pusher.revisions`, which holds this device's
    own commits (see `Pusher.removal_base`).
    """
    ctx = pusher.ctx
    row = ctx.mirror.get_by_id(current.id)
    if row is None:
        # Re-sent, its commit would move the base of the removal that follows past the
        # other device's change, which would then be deleted silently.
        _drop_op_of_removed(pusher, p, op)
        return
    remote_content = row.kind == "file" and current.manifest != row.manifest
    clean = not (
        row.dirty or ctx.journal.has_pending_write(current.id) or being_written(ctx, current.id)
    )
    if remote_content and clean:
        ctx.mirror.mark_synced(current.id, current.revision, current.manifest, current.size, True)
        inv = Invalidation(inodes=[row.inode])
        inv.content_changed(current.id, row.manifest)
        await ctx.operations.invalidate(inv)
        return
    if remote_content:
        await _set_local_content_aside(pusher, current)
        return
    ctx.mirror.mark_synced(current.id, current.revision, row.manifest, row.size, False)


async def _set_local_content_aside(pusher: Pusher, current: Entry) -> None:
    """Both sides changed the content, and ours waits behind a rename or setattr.

    Re-basing the whole entry would let our pending write land on top of the
    other device's content without a conflict. Instead the local content
    becomes the conflict copy now (as `_conflict_copy` does for a refused
    update), its pending writes are settled by that copy, and the entry takes
    the server's content; the rename or setattr is then re-sent on the current
    revision.
    """
    ctx = pusher.ctx
    if being_written(ctx, current.id):
        log.info(
            "conflict on %s: it is still being written here; the conflict copy waits for the writer",
            _describe(pusher, current.id),
        )
        await trio.sleep(STILL_WRITING_WAIT)
        return
    content = await pusher.upload_content(current.id)
    try:
        new_name, inv = await _commit_copy(pusher, current, content.chunks)
    finally:
        ctx.cache.unpin(f"upload:{current.id}")
    row = ctx.mirror.get_by_id(current.id)
    with transaction(ctx.db):
        ctx.journal.ack(ctx.journal.content_seqs(current.id))
        ctx.mirror.mark_synced(current.id, current.revision, current.manifest, current.size, True)
    if row is not None:
        inv.inodes.append(row.inode)
    inv.content_changed(current.id, content.manifest)  # open readers keep the local version
    await ctx.operations.invalidate(inv)
    log.warning(
        "conflict: %r changed here and on another device; the local version is kept as %r",
        current.name,
        new_name,
    )


def _drop_op_of_removed(pusher: Pusher, p: PlannedOp, op: dict[str, Any]) -> None:
    """A refused rename or setattr of an entry removed here since: drop it.

    The move or chmod no longer matters; the removal that follows in the
    journal keeps the base the user saw, so it still meets a change made on
    another device as a conflict. An entry the rename replaced is gone here
    too: it is deleted on its own.
    """
    ctx = pusher.ctx
    log.info("dropping the %s of %s: it was removed here since", op["op"], p.entry_id)
    with transaction(ctx.db):
        ctx.journal.ack(p.seqs)
        if op.get("replace"):
            ctx.journal.append("delete", op["replace"], base=op.get("replace_base"))


async def _already_created(pusher: Pusher, p: PlannedOp, current: Entry) -> None:
    """An earlier attempt of this create landed: continue from the server's entry."""
    ctx = pusher.ctx
    pusher.revisions[current.id] = current.revision
    row = ctx.mirror.get_by_id(current.id)
    with transaction(ctx.db):
        if row is not None:
            ctx.mirror.mark_synced(current.id, current.revision, row.manifest, row.size, False)
        ctx.journal.ack(p.seqs)
        if row is not None and not row.detached:
            parent = ctx.mirror.get(row.parent) if row.parent else None
            if parent is not None and (parent.id, row.name) != (current.parent, current.name):
                ctx.journal.append("rename", current.id, parent=parent.id, name=row.name)
            if p.content:
                ctx.journal.append("write", current.id)


async def _undelete(pusher: Pusher, current: Entry) -> Entry:
    """Restore an entry the server has in its trash (our change to it wins over the delete)."""
    ctx = pusher.ctx
    key = f"{pusher.client_id}-undelete-{current.id}-{current.revision}"
    entry = await ctx.client.undelete(current.id, key=key, device=ctx.device)
    log.warning(
        "%r was deleted on another device while it changed here; restored it from the trash",
        current.name,
    )
    pusher.revisions[entry.id] = entry.revision
    row = ctx.mirror.get_by_id(entry.id)
    if row is not None:
        ctx.mirror.mark_synced(entry.id, entry.revision, row.manifest, row.size, False)
    else:
        await ctx.operations.invalidate(ctx.mirror.apply_remote(entry))
    return entry


async def _restore_parent(pusher: Pusher, parent_id: str, current: Entry | None) -> None:
    if current is None or not current.deleted:
        raise CommitConflict(409, "conflict", f"parent {parent_id} is not on the server yet")
    await _undelete(pusher, current)
    record_conflict(
        pusher.ctx.db,
        current.name,
        current.name,
        "folder deleted on another device while files were added here: restored",
    )


async def _move_aside(
    pusher: Pusher,
    p: PlannedOp,
    parent_id: str,
    name: str,
    occupant: Entry,
    *,
    replace: str | None = None,
    replace_base: int | None = None,
) -> None:
    """Our entry wanted a name the server gave to `occupant`: ours takes a conflict name.

    `replace` is the entry our rename replaced (gone here): it is deleted on its own.
    """
    ctx = pusher.ctx
    row = ctx.mirror.get_by_id(p.entry_id)
    parent = ctx.mirror.get_by_id(parent_id)
    if row is None and p.kind == "rename":
        # Removed here since: no name to take any more (retrying would never succeed).
        _drop_op_of_removed(
            pusher, p, {"op": "rename", "replace": replace, "replace_base": replace_base}
        )
        return
    if row is None and p.kind == "create" and parent is not None:
        # Removed here since, but still created for the ops that follow (entries made
        # in it and moved out): it takes a conflict name in the journal alone.
        new_name = unique_conflict_name(
            name,
            ctx.device,
            datetime.now(),
            lambda n: ctx.mirror.lookup(parent.inode, n) is not None,
            kind=p.args.get("kind", "file"),
        )
        log.info(
            "%r is taken on the server; %s (removed here) is created as %r",
            name,
            p.entry_id,
            new_name,
        )
        ctx.journal.amend(p.seqs, p.entry_id, name=new_name)
        return
    if row is None or parent is None:
        raise CommitConflict(409, "conflict", f"{name!r} is taken on the server")
    new_name = unique_conflict_name(
        name,
        ctx.device,
        datetime.now(),
        lambda n: ctx.mirror.lookup(parent.inode, n) is not None,
        kind=row.kind,
    )
    inv = Invalidation(inodes=[row.inode], entries=[(parent.inode, name), (parent.inode, new_name)])
    with transaction(ctx.db):
        if (row.parent, row.name) == (parent.inode, name):
            ctx.mirror.move(row.inode, parent.inode, new_name)
        ctx.journal.amend(p.seqs, p.entry_id, name=new_name, replaced=None)
        if replace:
            # The rename no longer replaces anything, but the entry it replaced is gone
            # here: delete it on its own (a change made there meanwhile still wins).
            ctx.journal.append("delete", replace, base=replace_base)
    if (
        not occupant.deleted
        and ctx.journal.pending_for(occupant.id) is False
        and not being_written(ctx, occupant.id)
    ):
        inv.extend(ctx.mirror.apply_remote(occupant))
    await ctx.operations.invalidate(inv)
    record_conflict(
        ctx.db,
        ctx.mirror.path_in(parent.inode, name),
        new_name,
        "the name was taken by a change on another device",
    )
    log.warning(
        "conflict: %r changed on another device; the local one is kept as %r", name, new_name
    )


async def _keep_remote_edit(pusher: Pusher, p: PlannedOp, current: Entry) -> None:
    """We deleted what another device changed: keep their change, bring it back here."""
    ctx = pusher.ctx
    if current.deleted:
        ctx.journal.ack(p.seqs)  # deleted there too
        return
    with transaction(ctx.db):
        ctx.journal.ack(p.seqs)
        inv = _apply_remote(pusher, current)
    await ctx.operations.invalidate(inv)
    record_conflict(
        ctx.db, current.name, current.name, "deleted here but changed on another device: kept"
    )
    log.warning("%r was deleted here but changed on another device; it is kept", current.name)


async def _conflict_copy(pusher: Pusher, p: PlannedOp, op: dict[str, Any], current: Entry) -> None:
    """Both sides changed the content: the server's keeps the name, ours becomes a copy.

    Not while the file is still being written (unflushed bytes, or writes journaled
    after the refused op): the copy would miss them, and the working copy that holds
    them is dropped when the server's version takes the name. The round is tried
    again a little later, when the journal folds all the writes into one op.
    """
    ctx = pusher.ctx
    if being_written(ctx, p.entry_id) or ctx.journal.has_pending_write(
        p.entry_id, after=max(p.seqs, default=0)
    ):
        log.info(
            "conflict on %s: it is still being written here; the conflict copy waits for the writer",
            _describe(pusher, p.entry_id),
        )
        await trio.sleep(STILL_WRITING_WAIT)
        return
    chunks = protocol.chunks_from_json(op["chunks"])
    new_name, inv = await _commit_copy(pusher, current, chunks)
    inv.content_changed(current.id, protocol.manifest_hash(chunks))  # what open readers see
    with transaction(ctx.db):
        ctx.journal.ack(p.seqs)
        inv.extend(_apply_remote(pusher, current))
    await ctx.operations.invalidate(inv)
    log.warning(
        "conflict: %r changed here and on another device; the local version is kept as %r",
        current.name,
        new_name,
    )


def _apply_remote(pusher: Pusher, entry: Entry) -> Invalidation:
    """`Mirror.apply_remote` for an entry whose conflict is settled; caller holds a transaction.

    A local entry not yet synced that holds the name the server's entry wants
    moves to a conflict name first, as the pull does. Raising instead would
    undo the settlement, and the next round would settle it again (for an
    edit, by committing one more conflict copy each time).
    """
    try:
        return pusher.ctx.mirror.apply_remote(entry)
    except NameTaken as exc:
        inv = Puller(pusher.ctx).move_local_aside(exc.occupant, entry)
        inv.extend(pusher.ctx.mirror.apply_remote(entry))
        return inv


async def _commit_copy(
    pusher: Pusher, current: Entry, chunks: list[protocol.ChunkRef]
) -> tuple[str, Invalidation]:
    """Commit our content (`chunks`, on the server already) as a new file beside `current`.

    The copy is named `name (conflict from HOST ...)`, enters the mirror and
    the conflict list; returns its name and what the kernel must forget.
    """
    ctx = pusher.ctx
    row = ctx.mirror.get_by_id(current.id)
    parent = ctx.mirror.get_by_id(current.parent) if current.parent else None
    if row is None or parent is None:
        raise CommitConflict(409, "conflict", f"cannot place a conflict copy of {current.name!r}")
    new_id = uuid.uuid4().hex
    new_name = unique_conflict_name(
        current.name,
        ctx.device,
        datetime.now(),
        lambda n: ctx.mirror.lookup(parent.inode, n) is not None,
    )
    create = protocol.op_create(
        new_id, parent.id, new_name, "file", row.mode, row.mtime_ns, chunks=chunks
    )
    result = await ctx.client.commit(
        f"{pusher.client_id}-copy-{new_id}", [create], device=ctx.device
    )
    entry = result.entries[0]
    ctx.workcopies.reader.manifests.remember(protocol.manifest_hash(chunks), chunks)
    if ctx.mirror.get_by_id(new_id) is None:  # the pull may have brought it in already
        ctx.mirror.insert(
            parent.inode,
            new_name,
            "file",
            row.mode,
            row.mtime_ns,
            entry_id=new_id,
            size=entry.size,
            manifest=entry.manifest,
            revision=entry.revision,
        )
    record_conflict(
        ctx.db,
        ctx.mirror.path_in(parent.inode, current.name),
        new_name,
        "changed here and on another device",
    )
    return new_name, Invalidation(entries=[(parent.inode, new_name)])
