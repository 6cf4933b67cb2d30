"""Units of the filesystem half of the drive: ranges, mirror, working copies, errno table."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from types import SimpleNamespace

import pyfuse3
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from remote.errors import Forbidden, ServerUnreachable
from remote.protocol import ROOT_ID, ChunkRef, Entry, ProtocolError
from vfs import schema, workcopy
from vfs.errors import ContentUnavailable, ReadOnlyLibrary, errno_for, fuse_errors
from vfs.journal import Journal
from vfs.mirror import ROOT_INODE, EntryExists, Mirror, NameTaken, NoSuchEntry
from vfs.reader import Layout
from vfs.schema import open_db, transaction
from vfs.workcopy import END, RangeSet, WorkCopies

# --- RangeSet -------------------------------------------------------------------


@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 200)), max_size=20))
def test_rangeset_matches_a_set_of_bytes(pairs: list[tuple[int, int]]) -> None:
    ranges, model = RangeSet(), set()
    for a, b in pairs:
        ranges.add(min(a, b), max(a, b))
        model.update(range(min(a, b), max(a, b)))
    covered = {i for lo, hi, local in ranges.segments(0, 220) if local for i in range(lo, hi)}
    assert covered == model
    items = list(ranges)
    assert all(hi < next_lo for (_, hi), (next_lo, _) in zip(items, items[1:], strict=False)), items
    pieces = ranges.segments(0, 220)
    assert pieces[0][0] == 0 and pieces[-1][1] == 220
    assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:], strict=False))


def test_rangeset_gaps() -> None:
    ranges = RangeSet([(10, 20), (30, 40)])
    assert ranges.gaps(0, 50) == [(0, 10), (20, 30), (40, 50)]
    assert ranges.gaps(12, 18) == []


def test_layout_span() -> None:
    layout = Layout.of([ChunkRef("a" * 64, 10), ChunkRef("b" * 64, 10), ChunkRef("c" * 64, 5)])
    assert list(layout.span(0, 1)) == [0]
    assert list(layout.span(9, 2)) == [0, 1]
    assert list(layout.span(10, 10)) == [1]
    assert list(layout.span(19, 100)) == [1, 2]
    assert list(layout.span(25, 10)) == []


# --- Mirror -----------------------------------------------------------------------


@pytest.fixture
def mirror(tmp_path: Path) -> Mirror:
    m = Mirror(open_db(tmp_path / "state.db"))
    m.ensure_root()
    return m


def entry(
    id_: str, parent: str, name: str, kind: str = "file", revision: int = 1, **kw: object
) -> Entry:
    return Entry(
        id=id_, parent=parent, name=name, kind=kind, mode=0o644, mtime_ns=5, revision=revision, **kw
    )  # type: ignore[arg-type]


def ident(n: int) -> str:
    return f"{n:032x}"


def test_apply_remote_inserts_moves_and_deletes(mirror: Mirror) -> None:
    inv = mirror.apply_remote(entry(ident(1), ROOT_ID, "d", "dir"))
    d = mirror.get_by_id(ident(1))
    assert d is not None and inv.entries == [(ROOT_INODE, "d")]
    mirror.apply_remote(entry(ident(2), ident(1), "f", size=3, manifest="m1"))
    f = mirror.get_by_id(ident(2))
    assert f is not None and mirror.path_of(f.inode) == "d/f"
    inv = mirror.apply_remote(entry(ident(2), ROOT_ID, "g", size=4, manifest="m2", revision=2))
    assert mirror.path_of(f.inode) == "g"
    assert (d.inode, "f") in inv.entries and (ROOT_INODE, "g") in inv.entries
    assert inv.content == [ident(2)] and f.inode in inv.inodes
    inv = mirror.apply_remote(entry(ident(2), ROOT_ID, "g", deleted=True, revision=3))
    assert mirror.lookup(ROOT_INODE, "g") is None
    assert mirror.get(f.inode).detached and inv.removed == [f.inode]


def test_apply_remote_child_before_parent_gets_a_placeholder(mirror: Mirror) -> None:
    mirror.apply_remote(entry(ident(2), ident(1), "child"))
    assert [r.name for r in mirror.children(ROOT_INODE)] == []
    mirror.apply_remote(entry(ident(1), ROOT_ID, "parent", "dir", revision=2))
    child = mirror.get_by_id(ident(2))
    assert child is not None and mirror.path_of(child.inode) == "parent/child"


def test_apply_remote_name_collisions(mirror: Mirror) -> None:
    mirror.apply_remote(entry(ident(1), ROOT_ID, "a"))
    mirror.apply_remote(entry(ident(2), ROOT_ID, "a", revision=2))  # a swap in flight
    assert mirror.lookup(ROOT_INODE, "a").id == ident(2)  # type: ignore[union-attr]
    assert mirror.get_by_id(ident(1)).detached  # type: ignore[union-attr]
    mirror.insert(ROOT_INODE, "local", "file", 0o644, 1)  # revision 0: not on the server
    with pytest.raises(NameTaken):
        mirror.apply_remote(entry(ident(3), ROOT_ID, "local"))
    assert mirror.get_by_id(ident(3)) is None, "a refused change leaves nothing behind"


def test_insert_move_and_volatile(mirror: Mirror) -> None:
    row = mirror.insert(ROOT_INODE, "x", "file", 0o100644, 7)
    assert row.mode == 0o644
    with pytest.raises(EntryExists):
        mirror.insert(ROOT_INODE, "x", "file", 0o644, 7)
    mirror.set_volatile(row.inode, size=99)
    assert mirror.get(row.inode).size == 99
    assert (
        mirror.db.execute("SELECT size FROM mirror WHERE inode = ?", (row.inode,)).fetchone()[0]
        == 0
    )
    mirror.persist_volatile(row.inode, dirty=1)
    fresh = Mirror(mirror.db).get(row.inode)
    assert fresh.size == 99 and fresh.dirty
    mirror.mark_synced(row.id, 4, "m", 99, clear_dirty=True)
    assert not mirror.get(row.inode).dirty and mirror.get(row.inode).revision == 4
    with pytest.raises(NoSuchEntry):
        mirror.get(12345)


def test_row_cache_serves_only_committed_rows(mirror: Mirror) -> None:
    row = mirror.insert(ROOT_INODE, "x", "file", 0o644, 7)
    assert mirror.get(row.inode).mode == 0o644  # now cached
    mirror.update(row.inode, mode=0o600)
    assert mirror.get(row.inode).mode == 0o600, "an update drops the cached row"
    with pytest.raises(RuntimeError), transaction(mirror.db):
        mirror.update(row.inode, mode=0o640)
        assert mirror.get(row.inode).mode == 0o640  # read inside the transaction, not cached
        raise RuntimeError("roll back")
    assert mirror.get(row.inode).mode == 0o600, "a rolled-back change is never served"
    with pytest.raises(RuntimeError), transaction(mirror.db):
        ghost = mirror.insert(ROOT_INODE, "ghost", "file", 0o644, 7)
        raise RuntimeError("roll back")
    with pytest.raises(NoSuchEntry):
        mirror.get(ghost.inode)
    mirror.set_volatile(row.inode, size=5)
    mirror.persist_volatile(row.inode, dirty=1)
    mirror.set_volatile(row.inode, size=9)
    assert mirror.get(row.inode).size == 9 and mirror.get(row.inode).dirty
    mirror.persist_volatile(row.inode)
    mirror.remove(row.inode)
    with pytest.raises(NoSuchEntry):
        mirror.get(row.inode)


def test_last_content_seqs_agrees_with_has_pending_write(mirror: Mirror) -> None:
    journal = Journal(mirror.db)
    ops = [("create", "a"), ("write", "b"), ("setattr", "a"), ("write", "a"), ("setattr", "c")]
    seqs = [journal.append(kind, entry_id) for kind, entry_id in ops]
    latest = journal.last_content_seqs(["a", "b", "c", "d"])
    assert latest == {"a": seqs[3], "b": seqs[1]}
    for entry_id in "abcd":
        for after in [0, *seqs]:
            assert (latest.get(entry_id, 0) > after) == journal.has_pending_write(
                entry_id, after=after
            )


async def test_checkpoints_run_in_the_background(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commits on the drive's connection leave checkpoints to `run_checkpoints`: its WAL
    reaches the database file although that connection never crosses its own threshold."""
    monkeypatch.setattr(schema, "CHECKPOINT_INTERVAL", 0.01)
    path = tmp_path / "state.db"
    db = open_db(path)
    db.execute("CREATE TABLE t (x BLOB)")
    size_before = path.stat().st_size
    async with trio.open_nursery() as nursery:
        await nursery.start(schema.run_checkpoints, db, path)
        assert db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == schema.WAL_SAFETY_PAGES
        for _ in range(50):  # 50 commits of 2+ pages each, far under WAL_SAFETY_PAGES
            db.execute("INSERT INTO t VALUES (zeroblob(8000))")
        for _ in range(1000):  # up to 10 s
            if path.stat().st_size >= size_before + 50 * 8000:
                break
            await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert path.stat().st_size >= size_before + 50 * 8000, "the WAL was never checkpointed"
    assert db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000
    assert db.execute("SELECT count(*) FROM t").fetchone()[0] == 50
    db.close()


# --- WorkCopies -----------------------------------------------------------------------


class FakeManifests:
    def __init__(self, chunks: dict[str, list[ChunkRef]]) -> None:
        self.chunks = chunks

    def cached(self, manifest: str | None) -> list[ChunkRef] | None:
        return self.chunks.get(manifest or "", [])


class FakeReader:
    """Base content by manifest, counting reads."""

    def __init__(self, contents: dict[str, bytes]) -> None:
        self.contents = contents
        self.reads = 0
        self.manifests = FakeManifests({})

    async def read(
        self, manifest: str | None, offset: int, size: int, *, sequential: bool = False
    ) -> bytes:
        self.reads += 1
        return self.contents[manifest or ""][offset : offset + size]


class FakeCache:
    def __init__(self) -> None:
        self.pins: dict[str, set[str]] = {}

    def pin(self, hashes: list[str], owner: str) -> None:
        self.pins.setdefault(owner, set()).update(hashes)

    def unpin(self, owner: str, hashes: object = None) -> None:
        self.pins.pop(owner, None)


@pytest.fixture
def base() -> bytes:
    return bytes(range(256)) * 40  # 10240 bytes


@pytest.fixture
def copies(tmp_path: Path, base: bytes) -> WorkCopies:
    db = open_db(tmp_path / "state.db")
    return WorkCopies(tmp_path / "work", db, FakeReader({"m": base}), FakeCache())  # type: ignore[arg-type]


async def test_a_new_working_copy_never_reuses_a_leftover_file(copies: WorkCopies) -> None:
    leftover = copies.directory / "e"
    leftover.write_bytes(b"old bytes of an earlier run")
    linked = copies.directory / "elsewhere"
    os.link(leftover, linked)  # a second name (as a staged rekey has) keeps its bytes
    copy = copies.start("e", None, 0)
    copies.write(copy, 0, b"new")
    assert await copies.read(copy, 0, 100) == b"new"
    assert leftover.read_bytes() == b"new"
    assert linked.read_bytes() == b"old bytes of an earlier run"


def test_check_room_refuses_writes_into_the_reserve_without_a_statvfs_per_write(
    copies: WorkCopies, monkeypatch: pytest.MonkeyPatch
) -> None:
    mib = 1 << 20
    disk = {"free": 101 * mib, "looks": 0}  # 100 MiB above the 1 MiB reserve of a 40 MiB disk

    def statvfs(path: object) -> SimpleNamespace:
        disk["looks"] += 1
        return SimpleNamespace(f_bavail=disk["free"] // 4096, f_frsize=4096, f_blocks=10240)

    monkeypatch.setattr(os, "statvfs", statvfs)
    for _ in range(40):  # 40 MiB: within half of the room seen
        copies.check_room(mib)
        disk["free"] -= mib
    assert disk["looks"] == 1, "the disk was asked at every write"
    disk["free"] = mib + mib // 2  # someone else filled the disk meanwhile
    with pytest.raises(OSError) as refused:
        for _ in range(20):
            copies.check_room(mib)
    assert refused.value.errno == errno.ENOSPC
    with pytest.raises(OSError):
        copies.check_room(2 * mib)  # refused at once, never out of a stale budget
    disk["free"] = 100 * mib  # room again (files deleted)
    copies.check_room(mib)
    monkeypatch.setattr(workcopy, "ROOM_RECHECK_SECONDS", 0.0)
    looks = disk["looks"]
    copies.check_room(1)
    assert disk["looks"] == looks + 1, "an old look at the disk is not trusted"


async def test_workcopy_mixes_local_writes_with_base(copies: WorkCopies, base: bytes) -> None:
    copy = copies.start("e1", "m", len(base))
    copies.write(copy, 100, b"XYZ")
    assert await copies.read(copy, 98, 7) == base[98:100] + b"XYZ" + base[103:105]
    assert (copies.directory / "e1").stat().st_size == 103, "only written bytes are local"
    copies.write(copy, len(base) + 10, b"tail")
    data = await copies.read(copy, 0, 1 << 20)
    assert data == base[:100] + b"XYZ" + base[103:] + b"\0" * 10 + b"tail"


async def test_workcopy_truncate_never_resurrects_base(copies: WorkCopies, base: bytes) -> None:
    copy = copies.start("e1", "m", len(base))
    copies.truncate(copy, 10)
    copies.truncate(copy, 20)
    assert await copies.read(copy, 0, 100) == base[:10] + b"\0" * 10


async def test_workcopy_survives_reload_after_sync(
    copies: WorkCopies, base: bytes, tmp_path: Path
) -> None:
    copy = copies.start("e1", "m", len(base))
    copies.write(copy, 5, b"abc")
    await copies.sync(copy)
    copies.write(copy, 50, b"unsynced")
    again = WorkCopies(copies.directory, copies.db, copies.reader, copies.cache)
    reloaded = again.get("e1")
    assert reloaded is not None
    assert await again.read(reloaded, 0, 60) == base[:5] + b"abc" + base[8:60]


async def test_materialize_fills_from_base_and_keeps_user_bytes(
    copies: WorkCopies, base: bytes
) -> None:
    copy = copies.start("e1", "m", len(base))
    copies.write(copy, 1000, b"mine")
    path = await copies.materialize("e1")
    assert path.read_bytes() == base[:1000] + b"mine" + base[1004:]
    reads = copies.reader.reads  # type: ignore[attr-defined]
    assert await copies.read(copy, 0, len(base)) == path.read_bytes()
    assert copies.reader.reads == reads, "after materialize every byte is local"  # type: ignore[attr-defined]
    assert list(copy.ranges) == [(0, END)]


async def test_materialize_of_a_never_written_new_file_is_empty(copies: WorkCopies) -> None:
    assert (await copies.materialize("new")).read_bytes() == b""


async def test_discard_removes_file_rows_and_pins(copies: WorkCopies, base: bytes) -> None:
    copies.reader.manifests = FakeManifests({"m": [ChunkRef("h" * 64, len(base))]})  # type: ignore[attr-defined]
    copy = copies.start("e1", "m", len(base))
    assert copies.cache.pins == {"dirty:e1": {"h" * 64}}  # type: ignore[attr-defined]
    copies.write(copy, 0, b"x")
    await copies.sync(copy)
    copies.discard("e1")
    assert copies.get("e1") is None and not (copies.directory / "e1").exists()
    assert copies.cache.pins == {}  # type: ignore[attr-defined]


# --- errno table ---------------------------------------------------------------------


def test_errno_table() -> None:
    assert errno_for(NoSuchEntry("x")) == errno.ENOENT
    assert errno_for(ReadOnlyLibrary("x")) == errno.EROFS
    assert errno_for(ContentUnavailable("x")) == errno.EIO
    assert errno_for(ServerUnreachable("down")) == errno.EIO
    assert errno_for(Forbidden(403, "forbidden", "no")) == errno.EACCES
    assert errno_for(ProtocolError("long", "name_too_long")) == errno.ENAMETOOLONG
    assert errno_for(OSError(errno.ENOSPC, "full")) == errno.ENOSPC
    assert errno_for(KeyError("bug")) is None


async def test_fuse_errors_turns_bugs_into_eio(caplog: pytest.LogCaptureFixture) -> None:
    class Ops:
        @fuse_errors
        async def broken(self, inode: int) -> None:
            raise KeyError(inode)

        @fuse_errors
        async def missing(self, inode: int) -> None:
            raise NoSuchEntry(f"inode {inode}")

    with pytest.raises(pyfuse3.FUSEError) as info:
        await Ops().broken(7)
    assert info.value.errno == errno.EIO
    assert "broken" in caplog.text
    with pytest.raises(pyfuse3.FUSEError) as info:
        await Ops().missing(7)
    assert info.value.errno == errno.ENOENT


async def test_materialize_leaves_unsynced_writes_for_the_next_flush(
    copies: WorkCopies, base: bytes
) -> None:
    copy = copies.start("e1", "m", len(base))
    copies.write(copy, 0, b"typed")
    await copies.materialize("e1")
    assert copy.unsynced, "the writer's flush must still journal its write"
    reloaded = WorkCopies(copies.directory, copies.db, copies.reader, copies.cache).get("e1")
    assert reloaded is not None and list(reloaded.ranges) == [(0, END)]
