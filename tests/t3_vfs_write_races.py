"""`Operations` called directly: a remote change never drops bytes written here and not yet flushed.

Between `write()` and the flush that journals it, a file's local state lives
only in memory (the working copy's unflushed ranges, the mirror's volatile
size) and its row is not dirty. A remote change applied to the row in that
window (a pulled change, the uploader adopting the server's entry) used to
make `Operations.invalidate` discard the working copy as stale server content,
so the flush found nothing to journal and the file read back empty.
"""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pyfuse3
import pytest

from remote.protocol import ROOT_ID, Entry
from vfs.context import DriveContext
from vfs.journal import coalesce
from vfs.mirror import ROOT_INODE, MirrorRow
from vfs.mount import MountConfig, build_context, close_context


@pytest.fixture
async def ctx(tmp_path: Path) -> AsyncIterator[DriveContext]:
    """A drive's parts, built but not mounted (no request reaches the unused server URL)."""
    config = MountConfig(
        "http://127.0.0.1:9", "docs", "token", tmp_path / "mnt", tmp_path / "cache", 64 << 20
    )
    context = build_context(config)
    try:
        yield context
    finally:
        await close_context(context)


def synced_file(ctx: DriveContext, name: str) -> MirrorRow:
    """A clean file the server has at revision 1 (empty content)."""
    return ctx.mirror.insert(ROOT_INODE, name, "file", 0o644, 1, revision=1)


def remote_change(row: MirrorRow, revision: int = 2) -> Entry:
    """The same file as another device committed it: new content, new revision."""
    return Entry(
        id=row.id,
        parent=ROOT_ID,
        name=row.name,
        kind="file",
        mode=0o644,
        mtime_ns=7,
        revision=revision,
        size=3,
        manifest="f" * 64,
    )


async def test_a_remote_change_keeps_unflushed_writes_and_their_size(ctx: DriveContext) -> None:
    ops, row = ctx.operations, synced_file(ctx, "f.txt")
    info = await ops.open(row.inode, os.O_WRONLY)
    assert await ops.write(info.fh, 0, b"written here") == 12
    assert not ops.mirror.get(row.inode).dirty  # only memory knows about these bytes

    await ops.invalidate(ctx.mirror.apply_remote(remote_change(row)))

    copy = ctx.workcopies.get(row.id)
    assert copy is not None, "the working copy holding unflushed writes was dropped"
    await ops.flush(info.fh)
    await ops.release(info.fh)
    after = ctx.mirror.get(row.inode)
    assert (after.size, after.dirty) == (12, True)
    assert ctx.journal.has_pending_write(row.id), "the flush journaled nothing"
    assert await ctx.workcopies.read(copy, 0, 100) == b"written here"


async def test_a_clean_working_copy_still_follows_a_remote_change(ctx: DriveContext) -> None:
    """The guard is about unflushed bytes only: flushed, committed content is stale and goes."""
    ops, row = ctx.operations, synced_file(ctx, "g.txt")
    copy = ctx.workcopies.start(row.id, None, 0)
    assert not copy.unsynced
    await ops.invalidate(ctx.mirror.apply_remote(remote_change(row)))
    assert ctx.workcopies.get(row.id) is None
    assert ctx.mirror.get(row.inode).size == 3


def attrs_change(**updates: bool) -> SimpleNamespace:
    """A stand-in for pyfuse3.SetattrFields (whose fields are read-only)."""
    names = ["atime", "mtime", "ctime", "mode", "uid", "gid", "size"]
    return SimpleNamespace(**{f"update_{n}": updates.get(n, False) for n in names})


async def test_attributes_set_before_close_are_journaled_by_its_flush(ctx: DriveContext) -> None:
    """tar's utimes and chmod between the writes and close() join the close's commit: shown at
    once, journaled and persisted with the content, never dropped."""
    ops = ctx.operations
    info, created = await ops.create(ROOT_INODE, b"t.py", 0o600, os.O_WRONLY | os.O_CREAT)
    inode = created.st_ino
    await ops.write(info.fh, 0, b"print()\n")
    journaled = len(ctx.journal.pending())
    wanted = pyfuse3.EntryAttributes()
    wanted.st_mode = stat.S_IFREG | 0o644
    wanted.st_mtime_ns = 10**18
    shown = await ops.setattr(inode, wanted, attrs_change(mode=True, mtime=True), info.fh)
    assert (stat.S_IMODE(shown.st_mode), shown.st_mtime_ns) == (0o644, 10**18)
    assert len(ctx.journal.pending()) == journaled, "journaled before the close"

    await ops.flush(info.fh)
    await ops.release(info.fh)
    setattrs = [op.args for op in ctx.journal.pending() if op.kind == "setattr"]
    assert setattrs == [{"mode": 0o644, "mtime_ns": 10**18}]
    stored = ctx.db.execute("SELECT mode, mtime_ns FROM mirror WHERE inode = ?", (inode,))
    assert stored.fetchone() == (0o644, 10**18)
    (create,) = coalesce(ctx.journal.pending()).ops
    assert (create.kind, create.args["mode"], create.content) == ("create", 0o644, True)

    # Nothing unflushed: a chmod is journaled at once, as any metadata change.
    wanted.st_mode = stat.S_IFREG | 0o600
    await ops.setattr(inode, wanted, attrs_change(mode=True), None)
    assert [op.args for op in ctx.journal.pending() if op.kind == "setattr"][-1] == {"mode": 0o600}
