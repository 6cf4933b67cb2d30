"""Per-file sync state: what `ferry ls` prints (control request `states`), and with `--xattrs`
the extended attributes `user.ferry.state` and `user.ferry.revision`.

A file's state is, in order of precedence:

    conflict        a conflict copy the sync engine made (see vfs/sync/conflicts.py)
    pending-upload  created or changed here and not yet committed by the server
    pinned          under a pin (`ferry pin`) and every chunk is local
    cached          every chunk is local (may be evicted when the cache fills)
    partial         some chunks are local
    online-only     nothing is local; reading it needs the server

A directory is `pending-upload` until the server has it, `pinned` under a pin,
else `cached` (listings are always local). Everything is answered from
state.db and the chunk index: no network.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vfs.mirror import MirrorRow
from vfs.pins import PinStore
from vfs.sync.conflicts import list_conflicts

if TYPE_CHECKING:
    from vfs.journal import Journal
    from vfs.mirror import Mirror
    from vfs.reader import Reader

STATES = ("online-only", "partial", "cached", "pinned", "pending-upload", "conflict")

XATTR_STATE = "user.ferry.state"
XATTR_REVISION = "user.ferry.revision"


class FileStates:
    """Answers `user.ferry.state` for mirror rows from the mirror, journal, pins and cache."""

    def __init__(self, mirror: Mirror, journal: Journal, reader: Reader) -> None:
        self.mirror = mirror
        self.journal = journal
        self.reader = reader
        self.pins = PinStore(mirror.db, mirror)

    def state_of(self, row: MirrorRow) -> str:
        if row.kind == "file" and self._is_conflict_copy(row):
            return "conflict"
        if row.revision == 0 or row.dirty or self.journal.pending_for(row.id):
            return "pending-upload"
        pinned = self.pins.is_pinned(row)
        if row.kind != "file":
            return "pinned" if pinned else "cached"
        local = self._local_fraction(row)
        if local == "all":
            return "pinned" if pinned else "cached"
        return local

    def _local_fraction(self, row: MirrorRow) -> str:
        """'all', 'partial' or 'online-only' by which of the file's chunks are in the cache."""
        chunks = self.reader.manifests.cached(row.manifest)
        if chunks is None:
            return "online-only"
        present = sum(1 for c in chunks if self.reader.cache.contains(c.hash))
        if present == len(chunks):
            return "all"
        return "partial" if present else "online-only"

    def _is_conflict_copy(self, row: MirrorRow) -> bool:
        if " (conflict" not in row.name:
            return False
        path = self.mirror.path_of(row.inode)
        return any(r.get("copy") in (path, row.name) for r in list_conflicts(self.mirror.db))
