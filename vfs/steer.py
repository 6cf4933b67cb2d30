"""The daemon side of steering a drive: pins, eviction, versions, restore, trash, undelete.

`ferry pin`, `unpin`, `evict`, `versions`, `restore`, `trash` and `undelete`
reach the mounted drive through its control socket (vfs/sync/control.py hands
every command it does not know to `handle_steer_request`). Paths in requests
are library paths ('/'-separated, relative to the mount's root): the command
side turns a path on the mount into one. Answers are plain JSON.

`run_steering` is the drive's task for this: it starts the `PinKeeper` and a
`TransferMeter` (upload and download rates for `ferry status`).
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import trio

from remote.errors import CommitConflict, RemoteError, ServerUnreachable
from vfs.mirror import ROOT_INODE, Invalidation, MirrorRow, NoSuchEntry
from vfs.pins import PinKeeper, files_under
from vfs.versions_tree import VersionsTree

if TYPE_CHECKING:
    from vfs.context import DriveContext

log = logging.getLogger(__name__)

#: How long a restore or undelete waits for the change feed to bring the result in.
APPLY_TIMEOUT = 30.0
#: Seconds between samples of the client's byte counters.
METER_SECONDS = 1.0


class SteerError(Exception):
    """A steering request cannot be done; the message says why, for the user."""


# --- the drive's task ----------------------------------------------------------------


async def run_steering(
    ctx: DriveContext, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve `.ferry/versions/`, keep pins local, measure transfer rates while mounted."""
    ops = ctx.operations
    ops.virtual = VersionsTree(
        ctx.mirror, ops.reader, ctx.client, ctx.connectivity, str(ctx.control_socket)
    )
    keeper = PinKeeper(ctx)
    meter = TransferMeter(ctx)
    ctx.extra["pins"] = keeper
    ctx.extra["meter"] = meter
    async with trio.open_nursery() as nursery:
        await nursery.start(keeper.run)
        nursery.start_soon(meter.run)
        task_status.started()


class TransferMeter:
    """Upload and download rates, sampled from the HTTP client's byte counters."""

    def __init__(self, ctx: DriveContext) -> None:
        self.ctx = ctx
        self.upload_rate = 0.0
        self.download_rate = 0.0

    async def run(self) -> None:
        stats = self.ctx.client.stats
        sent, received, at = stats.bytes_sent, stats.bytes_received, time.monotonic()
        while True:
            await trio.sleep(METER_SECONDS)
            now = time.monotonic()
            elapsed = max(now - at, 1e-6)
            self.upload_rate = (stats.bytes_sent - sent) / elapsed
            self.download_rate = (stats.bytes_received - received) / elapsed
            sent, received, at = stats.bytes_sent, stats.bytes_received, now


def steer_status(ctx: DriveContext) -> dict[str, Any]:
    """What `ferry status` adds for pins and transfers."""
    keeper: PinKeeper | None = ctx.extra.get("pins")
    meter: TransferMeter | None = ctx.extra.get("meter")
    pins = [asdict(p) for p in keeper.progress()] if keeper else []
    return {
        "pins": pins,
        "pinned_size": sum(p["bytes"] for p in pins),
        "pin_error": keeper.last_error if keeper else None,
        "upload_rate": meter.upload_rate if meter else 0.0,
        "download_rate": meter.download_rate if meter else 0.0,
    }


# --- requests ------------------------------------------------------------------------

STEER_COMMANDS = (
    "pin", "unpin", "pins", "evict", "versions", "restore", "trash", "undelete", "states",
)  # fmt: skip


async def handle_steer_request(ctx: DriveContext, request: dict[str, Any]) -> dict[str, Any]:
    """Answer one steering request (its `cmd` is one of STEER_COMMANDS)."""
    cmd = request["cmd"]
    try:
        if cmd == "pins":
            return {"ok": True, "pins": steer_status(ctx)["pins"]}
        if cmd == "trash":
            return {"ok": True, "entries": await list_trash(ctx)}
        if cmd == "undelete":
            return {"ok": True, **await undelete(ctx, str(request["path"]))}
        if cmd == "states":
            return {"ok": True, "states": file_states(ctx, request["paths"])}
        row = resolve(ctx, str(request["path"]))
        if cmd == "pin":
            return {"ok": True, **pin(ctx, row)}
        if cmd == "unpin":
            return {"ok": True, **unpin(ctx, row)}
        if cmd == "evict":
            return {"ok": True, **await evict(ctx, row)}
        if cmd == "versions":
            return {"ok": True, "versions": await list_versions(ctx, row)}
        if cmd == "restore":
            return {"ok": True, **await restore(ctx, row, int(request["revision"]))}
    except SteerError as exc:
        return {"ok": False, "error": str(exc)}
    except ServerUnreachable as exc:
        ctx.connectivity.report_failure(exc)
        return {"ok": False, "error": f"the server cannot be reached ({exc}); try again online"}
    except RemoteError as exc:
        return {"ok": False, "error": f"the server refused: {exc}"}
    return {"ok": False, "error": f"unknown command {cmd!r}"}


def resolve(ctx: DriveContext, path: str) -> MirrorRow:
    """The mirror row at library path `path` ('' is the root)."""
    row = ctx.mirror.get(ROOT_INODE)
    for part in [p for p in path.split("/") if p]:
        child = ctx.mirror.lookup(row.inode, part)
        if child is None:
            raise SteerError(f"{path!r}: no such file or folder in the drive")
        row = child
    return row


def file_states(ctx: DriveContext, paths: object) -> list[dict[str, Any] | None]:
    """Sync state and revision of each library path (None where nothing is there): what
    `ferry ls` shows, answered from state.db and the chunk index like vfs/xattrs.py says."""
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise SteerError("'paths' must be a list of library paths")
    answers: list[dict[str, Any] | None] = []
    for path in paths:
        try:
            row = resolve(ctx, path)
        except SteerError:
            answers.append(None)
            continue
        state = ctx.operations.states.state_of(row)
        answers.append({"state": state, "revision": row.revision})
    return answers


def _keeper(ctx: DriveContext) -> PinKeeper:
    keeper: PinKeeper | None = ctx.extra.get("pins")
    if keeper is None:
        raise SteerError("the drive is still starting; try again")
    return keeper


def pin(ctx: DriveContext, row: MirrorRow) -> dict[str, Any]:
    keeper = _keeper(ctx)
    added = keeper.store.add(row.id)
    keeper.wake()
    log.info("pinned %r for offline use", ctx.mirror.path_of(row.inode))
    return {"path": ctx.mirror.path_of(row.inode), "added": added}


def unpin(ctx: DriveContext, row: MirrorRow) -> dict[str, Any]:
    keeper = _keeper(ctx)
    path = ctx.mirror.path_of(row.inode)
    removed = keeper.store.remove(row.id)
    # Pins inside this folder go too: "unpin this folder" means nothing below stays pinned.
    inner = [r for r in keeper.store.roots() if _is_below(ctx, r, row)]
    for entry_id in inner:
        keeper.store.remove(entry_id)
    if not removed and not inner:
        if keeper.store.is_pinned(row):
            raise SteerError(f"{path!r} is pinned through a folder above it; unpin that folder")
        raise SteerError(f"{path!r} is not pinned")
    keeper.wake()
    return {"path": path, "removed": 1 + len(inner) if removed else len(inner)}


def _is_below(ctx: DriveContext, entry_id: str, folder: MirrorRow) -> bool:
    row = ctx.mirror.get_by_id(entry_id)
    if row is None or folder.kind != "dir":
        return False
    return row.inode != folder.inode and ctx.mirror.is_ancestor(folder.inode, row.inode)


async def evict(ctx: DriveContext, row: MirrorRow) -> dict[str, Any]:
    """Drop the cached chunks of every file at or under `row` that is neither pinned nor dirty."""
    keeper = _keeper(ctx)
    manifests = ctx.operations.reader.manifests
    hashes: list[str] = []
    inodes: list[int] = []
    skipped: list[str] = []
    for file_row in files_under(ctx.mirror, row):
        if keeper.store.is_pinned(file_row):
            skipped.append(ctx.mirror.path_of(file_row.inode))
            continue
        if file_row.dirty or ctx.workcopies.get(file_row.id) is not None:
            continue  # local edits live in the working copy, not in evictable chunks
        chunks = manifests.cached(file_row.manifest)
        if chunks:
            hashes += [c.hash for c in chunks]
            inodes.append(file_row.inode)
    freed = ctx.cache.evict(hashes)
    if inodes:  # the kernel's page cache would keep serving the evicted bytes
        await ctx.operations.invalidate(Invalidation(inodes=inodes))
    return {"path": ctx.mirror.path_of(row.inode), "freed": freed, "pinned_skipped": skipped}


async def list_versions(ctx: DriveContext, row: MirrorRow) -> list[dict[str, Any]]:
    if row.kind != "file":
        raise SteerError(
            f"{ctx.mirror.path_of(row.inode)!r} is not a file; only files have versions"
        )
    if row.revision == 0:
        return []
    return [asdict(v) for v in await ctx.client.versions(row.id)]


async def restore(ctx: DriveContext, row: MirrorRow, revision: int) -> dict[str, Any]:
    """Commit version `revision` of a file as its current content; wait until the drive shows it."""
    path = ctx.mirror.path_of(row.inode)
    if row.kind != "file":
        raise SteerError(f"{path!r} is not a file; only files have versions")
    if row.revision == 0 or row.dirty or ctx.journal.pending_for(row.id):
        raise SteerError(
            f"{path!r} has local changes that are not uploaded yet; run `ferry sync` first"
        )
    try:
        entry = await ctx.client.restore_version(
            row.id, revision, base=row.revision, key=uuid.uuid4().hex, device=ctx.device
        )
    except CommitConflict as exc:
        raise SteerError(
            f"{path!r} changed on the server meanwhile; look at `ferry versions` again ({exc})"
        ) from exc
    await _wait_applied(ctx, entry.revision)
    return {"path": path, "revision": entry.revision, "size": entry.size}


async def list_trash(ctx: DriveContext) -> list[dict[str, Any]]:
    entries = await ctx.client.trash()
    return [
        {
            "id": e.id,
            "path": _trash_path(ctx, e.parent, e.name),
            "kind": e.kind,
            "size": e.size,
            "revision": e.revision,
        }
        for e in entries
    ]


def _trash_path(ctx: DriveContext, parent_id: str | None, name: str) -> str:
    parent = ctx.mirror.get_by_id(parent_id) if parent_id else None
    if parent is None or parent.detached:
        return f"<deleted folder>/{name}"
    prefix = ctx.mirror.path_of(parent.inode)
    return f"{prefix}/{name}" if prefix else name


async def undelete(ctx: DriveContext, path: str) -> dict[str, Any]:
    """Restore the most recently deleted entry that was at `path` (or whose id is `path`)."""
    wanted = path.strip("/")
    candidates = [t for t in await list_trash(ctx) if wanted in (t["path"], t["id"])]
    if not candidates:
        raise SteerError(f"{wanted!r} is not in the trash; `ferry trash` lists what is")
    if _exists(ctx, wanted):
        raise SteerError(f"{wanted!r} exists again; move it away before undeleting the old one")
    newest = max(candidates, key=lambda t: t["revision"])
    entry = await ctx.client.undelete(newest["id"], key=uuid.uuid4().hex, device=ctx.device)
    await _wait_applied(ctx, entry.revision)
    return {"path": newest["path"], "revision": entry.revision}


def _exists(ctx: DriveContext, path: str) -> bool:
    try:
        resolve(ctx, path)
    except (SteerError, NoSuchEntry):
        return False
    return True


async def _wait_applied(ctx: DriveContext, revision: int) -> None:
    """Wait (bounded) until the change feed has brought `revision` into the mirror."""
    puller = ctx.extra.get("puller")
    if puller is None:
        return
    with trio.move_on_after(APPLY_TIMEOUT):
        await puller.wait_cursor(revision)
