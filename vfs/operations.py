"""The kernel-facing filesystem: one thin async method per FUSE request.

Metadata comes from the mirror (never the network); content from working
copies and the reader. Every handler runs under `fuse_errors`, so only
`FUSEError` leaves it, with the errno chosen in `vfs/errors.py`.

Concurrency: handlers run as trio tasks on one thread. A handler's checks and
the changes that depend on them happen with no `await` in between, so two
requests never interleave inside one decision; the few awaits (fsync, chunk
fetches) are marked. Local changes are journaled in the same SQLite
transaction as the mirror change they describe (`_journaled`), so a crash
leaves both or neither.

Kernel caches: entries and attributes are given long timeouts (negative
lookups too), because everything that changes them either goes through these
handlers (the kernel then updates its own caches) or comes from the server,
when `invalidate()` drops exactly what changed. Files are opened with
`keep_cache` while their content is the one the kernel last cached.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pyfuse3
import trio

from vfs.errors import (
    DirectoryNotEmpty,
    InvalidArgument,
    IsADirectory,
    NotADirectory,
    NotPermitted,
    NotSupported,
    ReadOnlyLibrary,
    fuse_errors,
)
from vfs.inodes import InodeTable
from vfs.journal import Journal
from vfs.mirror import (
    ROOT_INODE,
    EntryExists,
    Invalidation,
    Mirror,
    MirrorRow,
    NoSuchEntry,
    new_entry_id,
)
from vfs.reader import Reader
from vfs.schema import relaxed, transaction
from vfs.sync import saves
from vfs.workcopy import WorkCopies, WorkCopy
from vfs.xattrs import XATTR_REVISION, XATTR_STATE, FileStates

if TYPE_CHECKING:
    from vfs.versions_tree import VersionsTree

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds the kernel may trust entries and attributes (remote changes invalidate explicitly).
CACHE_TIMEOUT = 300.0
#: Block size reported to applications: big enough that `cp` reads in large pieces.
BLOCK_SIZE = 128 * 1024
MAX_NAME_BYTES = 255
#: Timestamps are stored as signed 64-bit nanoseconds (years 1678..2262).
_NS_LIMIT = 2**63 - 1

_KIND_BITS = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK}

_STATE_NAME = XATTR_STATE.encode()
_REVISION_NAME = XATTR_REVISION.encode()


@dataclass
class Handle:
    """One open file: which entry, what content it opened, how it is being read."""

    fh: int
    inode: int
    entry_id: str
    manifest: str | None
    writable: bool
    next_offset: int = 0


def decode_name(name: bytes) -> str:
    """A path component from the kernel, checked against the drive's name rules."""
    if len(name) > MAX_NAME_BYTES:
        raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument(f"name {name!r} is not valid UTF-8") from None


def check_time(ns: int) -> int:
    if not -_NS_LIMIT <= ns <= _NS_LIMIT:
        raise InvalidArgument(f"timestamp {ns} ns is outside the supported range (1678..2262)")
    return ns


class Operations(pyfuse3.Operations):
    """pyfuse3 handlers over the mirror, working copies and reader of one drive."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        *,
        mirror: Mirror,
        journal: Journal,
        workcopies: WorkCopies,
        reader: Reader,
        cache_dir: Path,
        read_only: bool = False,
        state_xattrs: bool = False,
    ) -> None:
        super().__init__()
        self.mirror = mirror
        self.journal = journal
        self.workcopies = workcopies
        self.reader = reader
        self.cache_dir = cache_dir
        self.read_only = read_only
        #: Answer `user.ferry.state`/`.revision` (`--xattrs`); else every xattr call is ENOSYS.
        self.state_xattrs = state_xattrs
        self.inodes = InodeTable()
        self.uid = os.getuid()
        self.gid = os.getgid()
        self._handles: dict[int, Handle] = {}
        self._fh_counter = itertools.count(1)
        #: inode -> the content key the kernel's page cache holds for it (see `_content_key`).
        self._page_keys: dict[int, str] = {}
        #: Recent moves, to recognise an editor's atomic save (vfs/sync/saves.py).
        self.moves = saves.RecentMoves()
        #: user.ferry.state answers (vfs/xattrs.py).
        self.states = FileStates(mirror, journal, reader)
        #: The read-only `.ferry/versions/` tree (vfs/versions_tree.py); set by the mount.
        self.virtual: VersionsTree | None = None

    def _is_virtual(self, inode: int) -> bool:
        return self.virtual is not None and self.virtual.owns(inode)

    def _check_not_reserved(self, parent_inode: int, name: str) -> None:
        if parent_inode == ROOT_INODE and name == ".ferry" and self.virtual is not None:
            raise EntryExists("'.ferry' at the drive's root is ferry's own (old versions)")

    # --- attributes -----------------------------------------------------------

    def attrs(self, row: MirrorRow) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = row.inode
        entry.generation = 0
        entry.entry_timeout = CACHE_TIMEOUT
        entry.attr_timeout = CACHE_TIMEOUT
        entry.st_mode = _KIND_BITS[row.kind] | row.mode
        if row.kind == "dir":
            entry.st_nlink = 2 + self.mirror.subdir_count(row.inode)
            entry.st_size = 4096
        elif row.kind == "symlink":
            entry.st_nlink = 0 if row.detached else 1
            entry.st_size = len((row.target or "").encode())
        else:
            entry.st_nlink = 0 if row.detached else 1
            entry.st_size = row.size
        entry.st_blocks = (entry.st_size + 511) // 512
        entry.st_blksize = BLOCK_SIZE
        entry.st_uid = self.uid
        entry.st_gid = self.gid
        entry.st_rdev = 0
        entry.st_atime_ns = row.mtime_ns
        entry.st_mtime_ns = row.mtime_ns
        entry.st_ctime_ns = row.ctime_ns
        return entry

    def _negative_entry(self) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = 0
        entry.entry_timeout = CACHE_TIMEOUT
        return entry

    def _dir(self, inode: int, *, live: bool = True) -> MirrorRow:
        if self._is_virtual(inode):
            raise ReadOnlyLibrary(f"inode {inode} is inside the read-only .ferry tree")
        row = self.mirror.get(inode)
        if row.kind != "dir":
            raise NotADirectory(f"inode {inode} ({row.name!r}) is not a directory")
        if live and row.detached:  # removed while a process still had it as its cwd
            raise NoSuchEntry(f"directory inode {inode} has been deleted")
        return row

    def _child(self, parent: int, name: bytes) -> MirrorRow:
        row = self.mirror.lookup(parent, decode_name(name))
        if row is None:
            raise NoSuchEntry(f"no {name!r} in {self.mirror.path_of(parent)!r}")
        return row

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyLibrary("this library is shared with you read-only")

    def _touch(self, inode: int) -> None:
        """A directory's entries changed: new mtime/ctime, in memory (the server keeps its own)."""
        now = time.time_ns()
        self.mirror.set_volatile(inode, mtime_ns=now, ctime_ns=now)

    def _journaled(
        self,
        op: str,
        entry_id: str,
        change: Callable[[], T],
        args: dict[str, object] | None = None,
        *,
        durable: bool = False,
    ) -> T:
        """Apply `change` to the mirror and append its journal op in one transaction.

        One commit, and a crash keeps both or neither. It survives a crash of the
        drive at once; `durable` (an fsync() of a file) also syncs it to disk,
        otherwise see vfs/schema.py on durability.
        """
        db = self.mirror.db
        with contextlib.ExitStack() as stack:
            if not durable:
                stack.enter_context(relaxed(db))
            with transaction(db):
                result = change()
                self.journal.append(op, entry_id, **(args or {}))
        return result

    # --- lookups and listing ----------------------------------------------------

    @fuse_errors
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        log.debug("lookup %d %r", parent_inode, name)
        if self.virtual is not None and (
            self.virtual.owns(parent_inode) or (parent_inode == ROOT_INODE and name == b".ferry")
        ):
            return await self._virtual_lookup(parent_inode, name)
        if name == b".":
            row = self.mirror.get(parent_inode)
        elif name == b"..":
            row = self.mirror.get(self.mirror.get(parent_inode).parent or ROOT_INODE)
        else:
            found = self.mirror.lookup(parent_inode, decode_name(name))
            if found is None:
                return self._negative_entry()
            row = found
        self.inodes.remember(row.inode)
        return self.attrs(row)

    @fuse_errors
    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            self.inodes.forget(inode, count)
            self._purge_if_unused(inode)

    @fuse_errors
    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        if self.virtual is not None and self.virtual.owns(inode):
            return self.virtual.attrs(self.virtual.get(inode), self.uid, self.gid)
        return self.attrs(self.mirror.get(inode))

    @fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> bytes:
        if self.virtual is not None and self.virtual.owns(inode):
            return self.virtual.readlink(inode)
        row = self.mirror.get(inode)
        if row.kind != "symlink":
            raise InvalidArgument(f"{self.mirror.path_of(inode)!r} is not a symlink")
        return (row.target or "").encode()

    @fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> int:
        if self.virtual is not None and self.virtual.owns(inode):
            self.virtual.check_dir(inode)
            return inode
        self._dir(inode, live=False)
        return inode

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """List children by inode; the next offset is the inode, so listings survive changes."""
        if self._is_virtual(fh):
            return await self._virtual_readdir(fh, start_id, token)
        after = start_id
        while True:
            rows = self.mirror.children(fh, after=after)
            if not rows:
                return
            for row in rows:
                if not pyfuse3.readdir_reply(token, row.name.encode(), self.attrs(row), row.inode):
                    return
                self.inodes.remember(row.inode)
                after = row.inode

    @fuse_errors
    async def releasedir(self, fh: int) -> None:
        return None

    @fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None  # every directory change is durable in state.db when its request answers

    @fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.StatvfsData:
        """Space is the cache disk's: that is where writes land before they upload."""
        disk = os.statvfs(self.cache_dir)
        data = pyfuse3.StatvfsData()
        data.f_bsize = disk.f_bsize
        data.f_frsize = disk.f_frsize
        data.f_blocks = disk.f_blocks
        data.f_bfree = disk.f_bfree
        data.f_bavail = disk.f_bavail
        entries = self.mirror.statistics()["entries"]
        data.f_files = entries + disk.f_ffree
        data.f_ffree = disk.f_ffree
        data.f_favail = disk.f_favail
        data.f_namemax = MAX_NAME_BYTES
        return data

    # --- creating and removing ----------------------------------------------------

    def _new_entry(
        self,
        parent_inode: int,
        name: bytes,
        kind: str,
        mode: int,
        target: str | None = None,
        *,
        with_copy: bool = False,
    ) -> MirrorRow:
        """Create an entry in the mirror and journal it. Caller must not await before using the row.

        `with_copy`: also start its (empty) working copy in the same commit, for a
        file opened to be written (create): its first write() then commits nothing.
        """
        self._check_writable()
        parent = self._dir(parent_inode)
        text = decode_name(name)
        self._check_not_reserved(parent_inode, text)
        if self.mirror.lookup(parent_inode, text) is not None:
            raise EntryExists(f"{text!r} already exists in {self.mirror.path_of(parent_inode)!r}")
        entry_id = new_entry_id()
        now = time.time_ns()
        args: dict[str, object] = {
            "parent": parent.id,
            "name": text,
            "kind": kind,
            "mode": mode & 0o7777,
            "mtime_ns": now,
        }
        if target is not None:
            args["target"] = target

        def change() -> MirrorRow:
            row = self.mirror.insert(
                parent_inode, text, kind, mode, now, entry_id=entry_id, target=target
            )
            if with_copy:
                self.workcopies.start(entry_id, None, 0)
            return row

        try:
            row = self._journaled("create", entry_id, change, args)
        except BaseException:
            if with_copy:  # rolled back: no entry, so no working copy either
                self.workcopies.discard(entry_id)
            raise
        self._touch(parent_inode)
        self.inodes.remember(row.inode)
        return row

    @fuse_errors
    async def create(
        self,
        parent_inode: int,
        name: bytes,
        mode: int,
        flags: int,
        ctx: pyfuse3.RequestContext | None = None,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        log.debug("create %d %r %o", parent_inode, name, mode)
        row = self._new_entry(parent_inode, name, "file", mode, with_copy=True)
        info = self._open_handle(row, writable=True)
        return info, self.attrs(row)

    @fuse_errors
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        return self.attrs(self._new_entry(parent_inode, name, "dir", mode))

    @fuse_errors
    async def symlink(
        self,
        parent_inode: int,
        name: bytes,
        target: bytes,
        ctx: pyfuse3.RequestContext | None = None,
    ) -> pyfuse3.EntryAttributes:
        try:
            text = target.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument(f"symlink target {target!r} is not valid UTF-8") from None
        return self.attrs(self._new_entry(parent_inode, name, "symlink", 0o777, target=text))

    @fuse_errors
    async def mknod(
        self,
        parent_inode: int,
        name: bytes,
        mode: int,
        rdev: int,
        ctx: pyfuse3.RequestContext | None = None,
    ) -> pyfuse3.EntryAttributes:
        if not stat.S_ISREG(mode):
            raise NotPermitted(
                "ferry stores files, directories and symlinks only (no devices, FIFOs, sockets)"
            )
        return self.attrs(self._new_entry(parent_inode, name, "file", mode))

    @fuse_errors
    async def link(
        self,
        inode: int,
        new_parent_inode: int,
        new_name: bytes,
        ctx: pyfuse3.RequestContext | None = None,
    ) -> pyfuse3.EntryAttributes:
        raise NotPermitted("ferry does not support hard links")

    def _remove(self, row: MirrorRow) -> None:
        """Journal a delete and take the entry out of the tree (kept while the kernel uses it)."""
        parent = row.parent
        self._journaled("delete", row.id, lambda: self.mirror.detach(row.inode))
        if parent is not None:
            self._touch(parent)
        self._purge_if_unused(row.inode)

    @fuse_errors
    async def unlink(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> None:
        self._check_writable()
        row = self._child(parent_inode, name)
        if row.kind == "dir":
            raise IsADirectory(f"{self.mirror.path_of(row.inode)!r} is a directory")
        saved = saves.moved_original(self.mirror, self.journal, self.moves, row)
        if saved is not None and self._continues_version(saved, row):
            # "rename to backup~, write new, delete backup~": the new file is row's next version
            place = saved.parent or ROOT_INODE
            saves.take_over(self, saved, row, place, saved.name)
            self._swap_handles(saved, row)
            self._touch(parent_inode)
            self._purge_if_unused(row.inode)
            return
        self._remove(row)

    @fuse_errors
    async def rmdir(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> None:
        self._check_writable()
        row = self._child(parent_inode, name)
        if row.kind != "dir":
            raise NotADirectory(f"{self.mirror.path_of(row.inode)!r} is not a directory")
        if self.mirror.has_children(row.inode):
            raise DirectoryNotEmpty(f"{self.mirror.path_of(row.inode)!r} is not empty")
        self._remove(row)

    @fuse_errors
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext | None = None,
    ) -> None:
        self._check_writable()
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise InvalidArgument("ferry does not support RENAME_EXCHANGE")
        row = self._child(parent_inode_old, name_old)
        self._dir(parent_inode_new)
        new_name = decode_name(name_new)
        self._check_not_reserved(parent_inode_new, new_name)
        target = self.mirror.lookup(parent_inode_new, new_name)
        if target is not None and target.inode == row.inode:
            return
        if target is not None and flags & pyfuse3.RENAME_NOREPLACE:
            raise EntryExists(f"{new_name!r} exists (RENAME_NOREPLACE)")
        if row.kind == "dir" and self.mirror.is_ancestor(row.inode, parent_inode_new):
            raise InvalidArgument("cannot move a directory into itself")
        if target is not None:
            self._check_replaceable(row, target)
        if target is not None and self._continues_version(row, target):
            saves.take_over(self, row, target, parent_inode_new, new_name)
            self._swap_handles(row, target)
            self._touch(parent_inode_old)
            self._touch(parent_inode_new)
            self._purge_if_unused(target.inode)
            return

        def change() -> None:
            if target is not None:
                self.mirror.detach(target.inode)
            self.mirror.move(row.inode, parent_inode_new, new_name)

        parent_id = self.mirror.get(parent_inode_new).id
        replaced = target.id if target is not None else None
        args = {"parent": parent_id, "name": new_name, "replaced": replaced}
        from_parent = self.mirror.get(parent_inode_old).id
        args |= {"from_parent": from_parent, "from_name": row.name}
        self._journaled("rename", row.id, change, args)
        self.moves.moved(row.id, from_parent, row.name)
        self._touch(parent_inode_old)
        self._touch(parent_inode_new)
        if target is not None:
            self._purge_if_unused(target.inode)

    def _continues_version(self, newcomer: MirrorRow, original: MirrorRow) -> bool:
        """An atomic save (vfs/sync/saves.py): `newcomer` becomes `original`'s next version."""
        busy = self.inodes.is_open(original.inode) and self.workcopies.get(original.id) is not None
        return saves.continues_version(newcomer, original, original_busy=busy)

    def _swap_handles(self, newcomer: MirrorRow, original: MirrorRow) -> None:
        """After `saves.take_over`: open handles follow their inode's new entry id."""
        for handle in self._handles.values():
            if handle.inode == newcomer.inode:
                handle.entry_id = original.id
            elif handle.inode == original.inode:
                handle.entry_id = newcomer.id

    def _check_replaceable(self, row: MirrorRow, target: MirrorRow) -> None:
        if target.kind == "dir":
            if row.kind != "dir":
                raise IsADirectory(f"cannot replace directory {target.name!r} with a non-directory")
            if self.mirror.has_children(target.inode):
                raise DirectoryNotEmpty(f"cannot replace {target.name!r}: directory not empty")
        elif row.kind == "dir":
            raise NotADirectory(f"cannot replace non-directory {target.name!r} with a directory")

    def _purge_if_unused(self, inode: int) -> None:
        """Free a detached entry: its working copy once no handle has it open (so an unlinked
        file's space comes back at once), its row once the kernel has forgotten the inode."""
        if self.inodes.is_open(inode):
            return
        try:
            row = self.mirror.get(inode)
        except NoSuchEntry:
            return
        if not row.detached or self.mirror.has_children(inode):
            return
        if self.journal.pending_for(row.id) and not self._deleted_locally(row):
            return  # the sync engine still needs it (a remote delete raced a local change)
        self.workcopies.discard(row.id)
        if not self.inodes.in_use(inode):
            self.mirror.remove(inode)
            self._page_keys.pop(inode, None)

    def purge_detached(self) -> None:
        """At mount: free the entries a previous run left detached (the kernel knows none now)."""
        for row in self.mirror.detached_rows():
            self._purge_if_unused(row.inode)

    def _deleted_locally(self, row: MirrorRow) -> bool:
        """The journal already removes this entry (deleted, or replaced by a rename)."""
        return any(
            (op.entry_id == row.id and op.kind == "delete")
            or (op.kind == "rename" and op.args.get("replaced") == row.id)
            for op in self.journal.pending()
        )

    # --- attributes -----------------------------------------------------------------

    @fuse_errors
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext | None = None,
    ) -> pyfuse3.EntryAttributes:
        row = self.mirror.get(inode)
        if (fields.update_uid and attr.st_uid != self.uid) or (
            fields.update_gid and attr.st_gid != self.gid
        ):
            raise NotPermitted("ferry files belong to the user who mounted the drive")
        changes: dict[str, int] = {}
        if fields.update_mode:
            changes["mode"] = stat.S_IMODE(attr.st_mode)
        if fields.update_mtime:
            changes["mtime_ns"] = check_time(attr.st_mtime_ns)
        if changes or fields.update_size:
            self._check_writable()
        if fields.update_size:
            if row.kind != "file":
                raise IsADirectory(f"{self.mirror.path_of(inode)!r} is not a regular file")
            await self._truncate(row, attr.st_size)  # await: another flush may be running
        copy = self.workcopies.get(row.id) if changes and row.kind == "file" else None
        if copy is not None and copy.unsynced:
            # Written and not flushed yet: the change joins the content that the next
            # flush journals, in the same commit (an untar's utimes and chmod before
            # close cost two commits each otherwise). Like the writes, it is not
            # promised until close() or fsync() returns.
            self.mirror.set_volatile(inode, **changes, ctime_ns=time.time_ns())
            copy.pending_attrs.update(changes)
        elif changes:
            self._journaled(
                "setattr", row.id, lambda: self.mirror.update(inode, **changes), dict(changes)
            )
        elif fields.update_ctime or fields.update_uid or fields.update_gid:
            self.mirror.set_volatile(inode, ctime_ns=time.time_ns())
        return self.attrs(self.mirror.get(inode))

    async def _truncate(self, row: MirrorRow, size: int) -> None:
        if size < 0:
            raise InvalidArgument("negative size")
        copy = self.workcopies.get(row.id)
        if copy is None:
            copy = self.workcopies.start(
                row.id, *((None, 0) if size == 0 else (row.manifest, row.size))
            )
        self.workcopies.truncate(copy, size)
        now = time.time_ns()
        self.mirror.set_volatile(row.inode, size=size, mtime_ns=now, ctime_ns=now)
        await self._commit_content(row.inode, durable=False)

    # --- file content ----------------------------------------------------------------

    def _content_key(self, row: MirrorRow) -> str:
        """What the kernel's cached pages of `row` show: the manifest, or local edits."""
        return "local" if row.dirty or self.workcopies.get(row.id) else f"m:{row.manifest}"

    def _open_handle(self, row: MirrorRow, *, writable: bool) -> pyfuse3.FileInfo:
        fh = next(self._fh_counter)
        # The kernel's page cache is one per inode: while a reader of an older version
        # is open, it fills the cache with that version, and a new handle that shared
        # the cache would read it too. New handles then bypass the cache. (With a
        # working copy, every handle reads it: nobody is behind.)
        behind = self.workcopies.get(row.id) is None and any(
            h.entry_id == row.id and h.manifest != row.manifest and not h.writable
            for h in self._handles.values()
        )
        self._handles[fh] = Handle(fh, row.inode, row.id, row.manifest, writable)
        self.inodes.opened(row.inode)
        if behind:
            self._page_keys.pop(row.inode, None)  # the next cached open starts afresh
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        key = self._content_key(row)
        keep = self._page_keys.get(row.inode) == key
        self._page_keys[row.inode] = key
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep)

    @fuse_errors
    async def open(
        self, inode: int, flags: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.FileInfo:
        if self.virtual is not None and self.virtual.owns(inode):
            manifest = self.virtual.manifest_for_open(inode, flags)
            fh = next(self._fh_counter)
            self._handles[fh] = Handle(fh, inode, f"version:{inode}", manifest, False)
            self.inodes.opened(inode)
            return pyfuse3.FileInfo(fh=fh, keep_cache=True)  # versions never change
        row = self.mirror.get(inode)
        if row.kind != "file":
            raise IsADirectory(f"{self.mirror.path_of(inode)!r} is not a regular file")
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        if writable or flags & os.O_TRUNC:
            self._check_writable()
        if flags & os.O_TRUNC and row.size:
            # libfuse enables atomic O_TRUNC: the kernel sends no separate truncate
            await self._truncate(row, 0)  # await: another flush of this file may be running
            row = self.mirror.get(inode)
        elif not writable and self.workcopies.get(row.id) is None:
            self.reader.opened(row)  # may batch-fetch the directory's small files
        return self._open_handle(row, writable=writable)

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        handle = self._handles[fh]
        sequential = off == handle.next_offset
        handle.next_offset = off + size
        copy = self.workcopies.get(handle.entry_id)
        if copy is not None:
            return await self.workcopies.read(copy, off, size, sequential=sequential)
        # pyfuse3 takes any buffer: a view of the cached chunk goes to the kernel uncopied
        return await self.reader.read_buffer(handle.manifest, off, size, sequential=sequential)

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._handles[fh]
        copy = self._workcopy_for_write(handle.inode)
        written = self.workcopies.write(copy, off, buf)
        now = time.time_ns()
        self.mirror.set_volatile(handle.inode, size=copy.size, mtime_ns=now, ctime_ns=now)
        return written

    def _workcopy_for_write(self, inode: int) -> WorkCopy:
        row = self.mirror.get(inode)
        copy = self.workcopies.get(row.id)
        if copy is None:
            copy = self.workcopies.start(row.id, row.manifest, row.size)
        self._page_keys[inode] = "local"
        return copy

    async def _commit_content(self, inode: int, *, durable: bool) -> None:
        """Record and journal unsynced writes; with `durable`, fsync them to disk first.

        close() (flush, release) journals without fsync: the bytes are in the
        kernel's page cache and the journal row in SQLite's WAL, so a kill -9 of
        the drive loses nothing (invariant 1) and a power cut what any local
        filesystem loses of an unsynced file. fsync() also syncs bytes that an
        earlier close journaled, and commits with a WAL fsync.
        """
        if self._is_virtual(inode):
            return  # old versions are read-only
        row = self.mirror.get(inode)
        copy = self.workcopies.get(row.id)
        if copy is None:
            return
        async with copy.flushing:
            if not copy.unsynced and not (durable and copy.volatile):
                return
            journal = copy.unsynced
            # await (durable only): fsync in a thread
            snapshot = await self.workcopies.flush_bytes(copy, durable=durable)
            row = self.mirror.get(inode)

            def record() -> None:
                self.workcopies.record(copy, snapshot)
                # The working copy's size is the truth; the volatile overlay can have been
                # dropped meanwhile by a remote change applied to the row.
                self.mirror.persist_volatile(inode, dirty=1, size=copy.size)
                if copy.pending_attrs and not row.detached:
                    self.journal.append("setattr", row.id, **copy.pending_attrs)

            if row.detached or not journal:
                # Deleted already (nothing to upload, but keep the bookkeeping straight), or
                # journaled by an earlier close: this FULL commit syncs that one's WAL too.
                # (Attributes set since that close are journaled in the same transaction.)
                with relaxed(self.mirror.db) if not durable else contextlib.nullcontext():
                    with transaction(self.mirror.db):
                        record()
            else:
                self._journaled("write", row.id, record, durable=durable)
            copy.pending_attrs.clear()  # no await since `record` committed them

    @fuse_errors
    async def flush(self, fh: int) -> None:
        await self._commit_content(self._handles[fh].inode, durable=False)

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._commit_content(self._handles[fh].inode, durable=True)

    @fuse_errors
    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh)
        try:
            await self._commit_content(handle.inode, durable=False)
        finally:
            self.inodes.closed(handle.inode)
            if not self.inodes.is_open(handle.inode):
                self.workcopies.close_file(handle.entry_id)
            self._purge_if_unused(handle.inode)

    # --- extended attributes -----------------------------------------------------------

    # Without `--xattrs` every xattr call answers ENOSYS, which the kernel remembers
    # for the whole mount: `ls -l` asks for two attributes per entry (ACL and
    # SELinux label), and answering each with an upcall made a fresh `ls -lR`
    # of 4,400 entries take 7x as long. With `--xattrs`, file managers and
    # scripts can read `user.ferry.state`/`.revision`, and other names answer
    # ENODATA (ENOSYS once would switch the ferry names off too).

    @fuse_errors
    async def getxattr(
        self, inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> bytes:
        if not self.state_xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        if not name.startswith(b"user.ferry.") or self._is_virtual(inode):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        row = self.mirror.get(inode)
        if name == _STATE_NAME:
            return self.states.state_of(row).encode()
        if name == _REVISION_NAME:
            return str(row.revision).encode()
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    @fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> list[bytes]:
        if not self.state_xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        if self._is_virtual(inode):
            return []
        self.mirror.get(inode)
        return []  # not listed, so `cp -a` does not copy them; getxattr answers them by name

    @fuse_errors
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> None:
        if not self.state_xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        raise NotSupported("ferry does not store extended attributes")

    @fuse_errors
    async def removexattr(
        self, inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> None:
        if not self.state_xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        raise NotSupported("ferry does not store extended attributes")

    # --- the read-only .ferry tree (answers come from vfs/versions_tree.py) ---------------

    async def _virtual_lookup(self, parent_inode: int, name: bytes) -> pyfuse3.EntryAttributes:
        assert self.virtual is not None
        if parent_inode == ROOT_INODE:
            node = self.virtual.top
        elif name in (b".", b".."):
            node = self.virtual.get(parent_inode)  # ".." of a virtual folder: not needed by Linux
        else:
            found = await self.virtual.lookup(parent_inode, decode_name(name))
            if found is None:
                raise NoSuchEntry(f"no {name!r} in the .ferry tree")
            node = found
        return self.virtual.attrs(node, self.uid, self.gid)

    async def _virtual_readdir(self, inode: int, start: int, token: pyfuse3.ReaddirToken) -> None:
        assert self.virtual is not None
        children = await self.virtual.children(self.virtual.get(inode))
        for index, node in enumerate(children[start:], start + 1):
            attrs = self.virtual.attrs(node, self.uid, self.gid)
            if not pyfuse3.readdir_reply(token, node.name.encode(), attrs, index):
                return

    # --- remote changes ----------------------------------------------------------------

    async def invalidate(self, inv: Invalidation) -> None:
        """Make the kernel forget what a remote change made stale (the sync engine calls this).

        Entry invalidation is queued (`invalidate_entry_async`); inode
        invalidation runs in a worker thread, as pyfuse3 asks.
        """
        for entry_id in inv.content:
            row = self.mirror.get_by_id(entry_id)
            copy = self.workcopies.get(entry_id)
            if row is None or row.dirty:
                continue
            if copy is not None and (copy.unsynced or copy.flushing.locked()):
                # Bytes written here that no flush has journaled yet (so the row is not
                # dirty): never dropped. Their flush journals them and they upload as the
                # next version; the remote one stays in the file's history.
                log.info("keeping unsaved writes to %r over a remote change", row.name)
                continue
            if copy is not None:
                # A clean working copy holds the previous server content: drop it.
                self.workcopies.discard(entry_id)
            shown = inv.previous.get(entry_id, row.manifest)
            self._retarget_handles(entry_id, row.manifest, shown, had_copy=copy is not None)
        for inode in inv.inodes:
            self._page_keys.pop(inode, None)
        for parent, name in inv.entries:
            try:
                pyfuse3.invalidate_entry_async(parent, name.encode(), ignore_enoent=True)
            except Exception as exc:  # no FUSE session (tests driving Operations directly)
                log.debug("invalidate_entry(%d, %r) skipped: %s", parent, name, exc)
        if inv.inodes:
            await trio.to_thread.run_sync(_invalidate_inodes, list(inv.inodes))
        for inode in inv.removed:
            self._purge_if_unused(inode)

    def _retarget_handles(
        self, entry_id: str, current: str | None, shown: str | None, *, had_copy: bool
    ) -> None:
        """After a remote content change: writers follow the file to its new content
        (their next write edits it); readers keep the version they were reading, so no
        read mixes two versions: `shown` for those that read the dropped working copy,
        the manifest they opened for the others."""
        for handle in self._handles.values():
            if handle.entry_id != entry_id:
                continue
            if handle.writable:
                handle.manifest = current
            elif had_copy:
                handle.manifest = shown

    def statistics(self) -> dict[str, int]:
        return {"open_handles": len(self._handles), **self.inodes.statistics()}


def _invalidate_inodes(inodes: list[int]) -> None:
    for inode in inodes:
        try:
            pyfuse3.invalidate_inode(inode)
        except Exception as exc:  # ENOENT: the kernel does not know it; no session in unit tests
            log.debug("invalidate_inode(%d) skipped: %s", inode, exc)
