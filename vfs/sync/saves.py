"""Atomic saves: a file replaced by freshly written content is a new version of the original.

Editors rarely write a file in place. vim, gedit and LibreOffice write the
new content into a second file and then either rename it over the original
("write tmp, rename over") or move the original aside first and delete it
afterwards ("rename to backup~, write new, delete backup~"). Replayed as they
happened, both would upload a new entry and delete the original, and the
file's version history on the server would end at every save.

So the filesystem asks this module at the two moments that finish such a
save -- a file renamed over another file, and the unlink of a file that was
moved away from the place a new file now holds -- and, when it applies, the
newcomer takes over the original's identity instead (`take_over`): the row
the kernel sees at the name gets the original's entry id, revision and base
manifest, the newcomer's working copy becomes the original's, and the
journal records a `write` of the original (plus a rename back if the
original had been moved aside, and a setattr if the mode changed) and a
delete of the newcomer's id, which folds away when the newcomer was never
uploaded. The row that leaves the tree keeps the newcomer's old id and
revision, so open readers of the old content and the journal's delete stay
consistent with each other.

Everything happens in one SQLite transaction with no await, so a crash
leaves the save either done or not started (the working copy's staged file
name is settled at the next start, see `WorkCopies.rekey`).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from vfs.mirror import new_entry_id
from vfs.schema import transaction

if TYPE_CHECKING:
    from vfs.journal import Journal
    from vfs.mirror import Mirror, MirrorRow
    from vfs.operations import Operations

log = logging.getLogger(__name__)

#: How long a move is remembered for recognising "rename to backup~ ... delete backup~".
MOVE_MEMORY_SECONDS = 300.0
#: At most this many remembered moves (a mass move must not grow memory without bound).
MOVE_MEMORY_ENTRIES = 10_000


def continues_version(newcomer: MirrorRow, original: MirrorRow, *, original_busy: bool) -> bool:
    """True if `newcomer` replacing `original` should be a new version of `original`.

    Only a file replacing a file the server already has: a directory keeps its
    own identity, and an original that was never uploaded has no history.
    `original_busy` (open with a working copy of its own) keeps the plain
    replacement, so a writer of the original never loses its working copy.
    """
    return (
        newcomer.kind == "file"
        and original.kind == "file"
        and original.revision > 0
        and newcomer.id != original.id
        and not original_busy
    )


class RecentMoves:
    """Where files were recently moved from, remembered past their upload.

    An editor's "rename to backup~, write new, delete backup~" may straddle an
    upload of the rename; the journal then no longer says where backup~ came
    from, so the filesystem also notes each move here (bounded, short-lived).
    """

    def __init__(self, *, keep_seconds: float = MOVE_MEMORY_SECONDS) -> None:
        self.keep_seconds = keep_seconds
        self._moves: dict[str, tuple[str, str, float]] = {}

    def moved(self, entry_id: str, from_parent: str, from_name: str) -> None:
        now = time.monotonic()
        if len(self._moves) >= MOVE_MEMORY_ENTRIES:
            self._moves = {k: v for k, v in self._moves.items() if now - v[2] < self.keep_seconds}
            if len(self._moves) >= MOVE_MEMORY_ENTRIES:
                self._moves.clear()
        self._moves.setdefault(entry_id, (from_parent, from_name, now))

    def origin(self, journal: Journal, entry_id: str) -> tuple[str, str] | None:
        """Where the entry was before its first recent move: the journal first, then memory."""
        first = journal.first_rename(entry_id)
        if first is not None and "from_parent" in first.args:
            return first.args["from_parent"], first.args["from_name"]
        remembered = self._moves.get(entry_id)
        if remembered is None or time.monotonic() - remembered[2] > self.keep_seconds:
            return None
        return remembered[0], remembered[1]

    def forget(self, entry_id: str) -> None:
        self._moves.pop(entry_id, None)


def moved_original(
    mirror: Mirror, journal: Journal, moves: RecentMoves, row: MirrorRow
) -> MirrorRow | None:
    """The file that took `row`'s place after `row` was moved aside, if any.

    `row` is about to be unlinked. If it is a file on the server that was
    recently moved away from a place another file now holds, that file is the
    saved content of `row`: "rename to backup~, write new, delete backup~".
    """
    if row.kind != "file" or row.revision == 0:
        return None
    origin = moves.origin(journal, row.id)
    if origin is None:
        return None
    parent = mirror.get_by_id(origin[0])
    if parent is None or parent.detached:
        return None
    occupant = mirror.lookup(parent.inode, origin[1])
    if occupant is None or occupant.kind != "file" or occupant.id == row.id:
        return None
    return occupant


def take_over(
    ops: Operations, newcomer: MirrorRow, original: MirrorRow, parent_inode: int, name: str
) -> None:
    """Make `newcomer`'s row the next version of `original`, at (`parent_inode`, `name`).

    `original` leaves the tree (detached, with the newcomer's old id and
    revision); `newcomer`'s inode ends up at the name with the original's id.
    Caller must not await between its checks and this call, and must move its
    open handles' entry ids the same way (`newcomer.inode` -> `original.id`,
    `original.inode` -> `newcomer.id`).
    """
    mirror, journal, workcopies = ops.mirror, ops.journal, ops.workcopies
    parent = mirror.get(parent_inode)
    if workcopies.get(newcomer.id) is None:
        workcopies.start(newcomer.id, newcomer.manifest, newcomer.size)
    spare = new_entry_id()
    moved = (original.parent, original.name) != (parent_inode, name)
    with transaction(mirror.db):
        mirror.detach(original.inode)
        mirror.update(newcomer.inode, id=spare)
        mirror.update(original.inode, id=newcomer.id, revision=newcomer.revision, dirty=0)
        mirror.update(
            newcomer.inode,
            id=original.id,
            parent=parent_inode,
            name=name,
            revision=original.revision,
            manifest=original.manifest,
            dirty=1,
        )
        workcopies.rekey(newcomer.id, original.id)
        journal.append("delete", newcomer.id, base=newcomer.revision)
        if moved:
            journal.append("rename", original.id, parent=parent.id, name=name, replaced=None)
        if newcomer.mode != original.mode:
            journal.append("setattr", original.id, mode=newcomer.mode)
        journal.append("write", original.id)
    workcopies.finish_rekey(newcomer.id, original.id)
    ops.moves.forget(original.id)
    log.debug("atomic save: %r continues entry %s", name, original.id)
