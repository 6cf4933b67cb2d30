"""The mirror: the local copy of the remote tree, with local state, in `state.db`.

Listing and stat are served from here, online or offline, so no metadata
request ever waits on the network. The filesystem changes rows as the user
works (`insert`, `update`, `move`, `detach`); the sync engine brings in
remote changes (`apply_remote`) and records acknowledged commits
(`mark_synced`).

Sizes and mtimes change on every `write()`; persisting each would cost an
fsync per write. They are kept in a small in-memory overlay (`set_volatile`)
that `get` and friends apply, and written to the row by `persist_volatile`
when the working copy is made durable (flush/fsync/close), before the journal
records the write. After a crash the size comes back from the working copy
bookkeeping of the last durable flush, which is all invariant 1 promises.

`get` (by inode) is the query every FUSE request makes, several times per
request (an untar's write, setattr and flush each asked for the same row
again). Rows it read are kept in a small in-memory cache of committed state:
every change to the table goes through this class and drops the row it
touches, and nothing read inside an open transaction is cached, so a
rolled-back change can never be served from it.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from dataclasses import dataclass, field, replace

from remote import protocol
from remote.protocol import ROOT_ID, Entry
from vfs.schema import transaction

ROOT_INODE = 1
#: Rows `Mirror.get` keeps (a few hundred bytes each); the cache is emptied when full.
ROW_CACHE_SIZE = 4096
_COLUMNS = "inode, id, parent, name, kind, mode, mtime_ns, ctime_ns, size, target, manifest, revision, dirty"


class NoSuchEntry(LookupError):
    """An inode or name the mirror does not know."""


class EntryExists(FileExistsError):
    """A name already taken in its directory."""


class NameTaken(Exception):
    """A remote change wants a name that a local, unsynced entry holds.

    The sync engine resolves this (conflict copy) before applying the change.
    """

    def __init__(self, entry: Entry, occupant: MirrorRow) -> None:
        super().__init__(
            f"remote entry {entry.name!r} ({entry.id}) collides with local entry "
            f"{occupant.name!r} ({occupant.id}) that has not been synced yet"
        )
        self.entry = entry
        self.occupant = occupant


@dataclass(frozen=True, slots=True)
class MirrorRow:
    """One entry as the drive sees it now (volatile size/mtime applied)."""

    inode: int
    id: str
    parent: int | None
    name: str
    kind: str
    mode: int
    mtime_ns: int
    ctime_ns: int
    size: int
    target: str | None
    manifest: str | None
    revision: int
    dirty: bool

    @property
    def detached(self) -> bool:
        return self.parent is None and self.inode != ROOT_INODE


@dataclass(slots=True)
class Invalidation:
    """What the kernel must forget after the mirror changed under it.

    `inodes`: attributes and cached pages to drop. `entries`: (parent inode,
    name) dentries to drop. `content`: entry ids whose server content changed
    (clean working copies of them are stale); `previous` holds, for some of
    them, the manifest of what the file showed before, which handles opened
    for reading keep reading. `removed`: inodes detached by a remote delete,
    to be purged once the kernel lets go of them.
    """

    inodes: list[int] = field(default_factory=list)
    entries: list[tuple[int, str]] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    previous: dict[str, str | None] = field(default_factory=dict)

    def content_changed(self, entry_id: str, previous: str | None) -> None:
        """`entry_id` shows new content; open readers saw `previous` (the older one wins)."""
        self.content.append(entry_id)
        self.previous.setdefault(entry_id, previous)

    def extend(self, other: Invalidation) -> None:
        self.inodes += other.inodes
        self.entries += other.entries
        self.content += other.content
        self.removed += other.removed
        for entry_id, manifest in other.previous.items():
            self.previous.setdefault(entry_id, manifest)

    def __bool__(self) -> bool:
        return bool(self.inodes or self.entries or self.content or self.removed)


def new_entry_id() -> str:
    return uuid.uuid4().hex


class Mirror:
    """Rows of the `mirror` table, by inode, by id and by (parent, name)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self._volatile: dict[int, dict[str, int]] = {}
        #: inode -> its row as committed (volatile overlay not applied); see the module docstring.
        self._rows: dict[int, MirrorRow] = {}

    # --- reading ------------------------------------------------------------

    def _row(self, values: tuple) -> MirrorRow:
        row = MirrorRow(*values[:12], dirty=bool(values[12]))
        overlay = self._volatile.get(row.inode)
        return replace(row, **overlay) if overlay else row

    def get(self, inode: int) -> MirrorRow:
        """The row of `inode`; NoSuchEntry if there is none."""
        row = self._rows.get(inode)
        if row is None:
            values = self.db.execute(
                f"SELECT {_COLUMNS} FROM mirror WHERE inode = ?", (inode,)
            ).fetchone()
            if values is None:
                raise NoSuchEntry(f"no entry with inode {inode}")
            row = MirrorRow(*values[:12], dirty=bool(values[12]))
            if not self.db.in_transaction:  # uncommitted rows could still roll back
                if len(self._rows) >= ROW_CACHE_SIZE:
                    self._rows.clear()
                self._rows[inode] = row
        overlay = self._volatile.get(inode)
        return replace(row, **overlay) if overlay else row

    def _changed(self, inode: int) -> None:
        """The row of `inode` is being written: drop it from the row cache."""
        self._rows.pop(inode, None)

    def get_by_id(self, entry_id: str) -> MirrorRow | None:
        values = self.db.execute(
            f"SELECT {_COLUMNS} FROM mirror WHERE id = ?", (entry_id,)
        ).fetchone()
        return None if values is None else self._row(values)

    def lookup(self, parent: int, name: str) -> MirrorRow | None:
        values = self.db.execute(
            f"SELECT {_COLUMNS} FROM mirror WHERE parent = ? AND name = ?", (parent, name)
        ).fetchone()
        return None if values is None else self._row(values)

    def children(self, parent: int, after: int = 0, limit: int = 1000) -> list[MirrorRow]:
        """Children of `parent` with inode > `after`, by inode (stable readdir offsets)."""
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM mirror WHERE parent = ? AND inode > ? ORDER BY inode LIMIT ?",
            (parent, after, limit),
        ).fetchall()
        return [self._row(v) for v in rows]

    def has_children(self, inode: int) -> bool:
        return (
            self.db.execute("SELECT 1 FROM mirror WHERE parent = ? LIMIT 1", (inode,)).fetchone()
            is not None
        )

    def subdir_count(self, inode: int) -> int:
        """Number of child directories (for a directory's st_nlink)."""
        return self.db.execute(
            "SELECT count(*) FROM mirror WHERE parent = ? AND kind = 'dir'", (inode,)
        ).fetchone()[0]

    def path_of(self, inode: int) -> str:
        """The path of `inode` inside the library, '/'-separated, '' for the root."""
        parts: list[str] = []
        row = self.get(inode)
        while row.inode != ROOT_INODE:
            if row.parent is None:
                return "<deleted>/" + "/".join(reversed([row.name, *parts]))
            parts.append(row.name)
            row = self.get(row.parent)
        return "/".join(reversed(parts))

    def path_in(self, parent_inode: int, name: str) -> str:
        """The library path `name` has (or would have) in folder `parent_inode`."""
        return f"{self.path_of(parent_inode)}/{name}".lstrip("/")

    def is_ancestor(self, ancestor: int, inode: int) -> bool:
        """True if `ancestor` is `inode` or one of its parents."""
        current: int | None = inode
        while current is not None:
            if current == ancestor:
                return True
            current = self.get(current).parent
        return False

    def statistics(self) -> dict[str, int]:
        files, size = self.db.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM mirror"
        ).fetchone()
        return {"entries": files, "bytes": size}

    # --- local changes ------------------------------------------------------

    def ensure_root(self) -> MirrorRow:
        """Create the root row (inode 1) if this is a fresh state.db."""
        now = time.time_ns()
        self._changed(ROOT_INODE)
        self.db.execute(
            "INSERT OR IGNORE INTO mirror (inode, id, parent, name, kind, mode, mtime_ns, ctime_ns) "
            "VALUES (?, ?, NULL, '', 'dir', ?, ?, ?)",
            (ROOT_INODE, ROOT_ID, 0o755, now, now),
        )
        return self.get(ROOT_INODE)

    def insert(
        self,
        parent: int | None,
        name: str,
        kind: str,
        mode: int,
        mtime_ns: int,
        *,
        entry_id: str | None = None,
        target: str | None = None,
        size: int = 0,
        manifest: str | None = None,
        revision: int = 0,
    ) -> MirrorRow:
        """Add an entry; EntryExists if (parent, name) is taken."""
        try:
            cursor = self.db.execute(
                "INSERT INTO mirror (id, parent, name, kind, mode, mtime_ns, ctime_ns, size, target, "
                "manifest, revision) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    entry_id or new_entry_id(),
                    parent,
                    name,
                    kind,
                    mode & 0o7777,
                    mtime_ns,
                    time.time_ns(),
                    size,
                    target,
                    manifest,
                    revision,
                ),
            )
        except sqlite3.IntegrityError as exc:
            raise EntryExists(f"{name!r} already exists in directory inode {parent}") from exc
        self._changed(cursor.lastrowid)  # type: ignore[arg-type]
        return self.get(cursor.lastrowid)  # type: ignore[arg-type]

    def update(self, inode: int, **fields: object) -> None:
        """Set columns of one row (and ctime); volatile values for those columns are dropped."""
        overlay = self._volatile.get(inode)
        if overlay:
            for key in fields:
                overlay.pop(key, None)
        fields.setdefault("ctime_ns", time.time_ns())
        assignments = ", ".join(f"{key} = ?" for key in fields)
        self._changed(inode)
        self.db.execute(
            f"UPDATE mirror SET {assignments} WHERE inode = ?", (*fields.values(), inode)
        )

    def set_volatile(self, inode: int, **fields: int) -> None:
        """Change size/mtime/ctime in memory only (see the module docstring)."""
        self._volatile.setdefault(inode, {}).update(fields)

    def persist_volatile(self, inode: int, **extra: int) -> None:
        """Write the in-memory size/mtime of `inode` (and `extra` columns) to its row."""
        overlay = {**self._volatile.pop(inode, {}), **extra}
        if overlay:
            assignments = ", ".join(f"{key} = ?" for key in overlay)
            self._changed(inode)
            self.db.execute(
                f"UPDATE mirror SET {assignments} WHERE inode = ?", (*overlay.values(), inode)
            )

    def move(self, inode: int, parent: int, name: str) -> None:
        """Give `inode` a new parent and name; the caller has made room for it."""
        try:
            self.update(inode, parent=parent, name=name)
        except sqlite3.IntegrityError as exc:
            raise EntryExists(f"{name!r} already exists in directory inode {parent}") from exc

    def detach(self, inode: int) -> None:
        """Take `inode` out of the tree but keep its row for open handles and kernel lookups.

        The name becomes the entry id so that the UNIQUE(parent, name) rule cannot bite.
        """
        row = self.get(inode)
        self.update(inode, parent=None, name=row.id)

    def remove(self, inode: int) -> None:
        self._volatile.pop(inode, None)
        self._changed(inode)
        self.db.execute("DELETE FROM mirror WHERE inode = ?", (inode,))

    def detached_rows(self) -> list[MirrorRow]:
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM mirror WHERE parent IS NULL AND inode != ?", (ROOT_INODE,)
        ).fetchall()
        return [self._row(v) for v in rows]

    # --- the sync engine's side -------------------------------------------------

    def mark_synced(
        self, entry_id: str, revision: int, manifest: str | None, size: int, clear_dirty: bool
    ) -> None:
        """Record that the server committed this entry at `revision` (with `manifest`, `size`).

        `clear_dirty` is False when the user wrote again after the content that
        was committed was read; the row stays dirty and its size stays the local one.
        """
        row = self.get_by_id(entry_id)
        if row is None:
            return
        if clear_dirty:
            self.update(
                row.inode,
                revision=revision,
                manifest=manifest,
                size=size,
                dirty=0,
                ctime_ns=row.ctime_ns,
            )
        else:
            self.update(row.inode, revision=revision, manifest=manifest, ctime_ns=row.ctime_ns)

    def apply_remote(self, entry: Entry) -> Invalidation:
        """Bring in one change from the feed for an entry with no pending local ops.

        Inserts, updates attributes or content, moves, or deletes the row and
        says what the kernel must forget. A parent the mirror does not know yet
        (the snapshot is in revision order, so a directory renamed after its
        children were made comes later) gets a detached placeholder row that
        its own change fills in. A clean entry holding the wanted name is
        detached (its own change will move it); an unsynced local one raises
        NameTaken.
        """
        inv = Invalidation()
        row = self.get_by_id(entry.id)
        if entry.deleted:
            if row is not None and row.inode != ROOT_INODE:
                if row.parent is not None:
                    inv.entries.append((row.parent, row.name))
                self.detach(row.inode)
                inv.inodes.append(row.inode)
                inv.removed.append(row.inode)
                inv.inodes.append(row.parent or ROOT_INODE)
            return inv
        if entry.id == ROOT_ID:
            root = self.ensure_root()
            self.update(
                ROOT_INODE, mode=entry.mode, mtime_ns=entry.mtime_ns, revision=entry.revision
            )
            inv.inodes.append(root.inode)
            return inv
        parent = self._parent_inode(entry.parent)
        inv.inodes.append(parent)  # its nlink, size and listing may change
        with transaction(self.db):
            self._make_room(entry, parent, row, inv)
            if row is None:
                self.insert(
                    parent,
                    entry.name,
                    entry.kind,
                    entry.mode,
                    entry.mtime_ns,
                    entry_id=entry.id,
                    target=entry.target,
                    size=entry.size,
                    manifest=entry.manifest,
                    revision=entry.revision,
                )
                inv.entries.append((parent, entry.name))
                return inv
            if (row.parent, row.name) != (parent, entry.name):
                if row.parent is not None:
                    inv.entries.append((row.parent, row.name))
                    inv.inodes.append(row.parent)
                inv.entries.append((parent, entry.name))
            if row.manifest != entry.manifest and entry.kind == "file":
                inv.content_changed(entry.id, row.manifest)
            self.update(
                row.inode,
                parent=parent,
                name=entry.name,
                kind=entry.kind,
                mode=entry.mode,
                mtime_ns=entry.mtime_ns,
                size=entry.size,
                target=entry.target,
                manifest=entry.manifest,
                revision=entry.revision,
                dirty=0,
            )
            inv.inodes.append(row.inode)
        return inv

    def _parent_inode(self, parent_id: str | None) -> int:
        if parent_id is None:
            raise ValueError("a non-root entry from the server has no parent")
        parent = self.get_by_id(parent_id)
        if parent is not None:
            return parent.inode
        placeholder = self.insert(None, parent_id, "dir", 0o755, 0, entry_id=parent_id)
        return placeholder.inode

    def _make_room(
        self, entry: Entry, parent: int, row: MirrorRow | None, inv: Invalidation
    ) -> None:
        occupant = self.lookup(parent, entry.name)
        if occupant is None or (row is not None and occupant.inode == row.inode):
            return
        if occupant.revision == 0 or occupant.dirty:
            raise NameTaken(entry, occupant)
        self.detach(occupant.inode)
        inv.entries.append((parent, entry.name))
        inv.inodes.append(occupant.inode)


def validate_local_name(name: str) -> str:
    """The protocol's name rules, applied before a local create or rename."""
    return protocol.validate_name(name)
