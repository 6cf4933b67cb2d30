"""The kernel's view of inodes: lookup counts and open handles.

The kernel remembers an inode once per entry it was given (lookup, create,
mkdir, symlink, each readdirplus entry) and gives them back with `forget`.
An entry removed from the tree (unlink, rename over it, remote delete) keeps
its mirror row, detached, while the kernel still knows it or a handle has it
open; `InodeTable.in_use` says whether that is still so. The counts live in
memory only: after a restart the kernel knows no inode of ours.
"""

from __future__ import annotations

from collections import Counter


class InodeTable:
    """Lookup counts and open-handle counts per inode."""

    def __init__(self) -> None:
        self._lookups: Counter[int] = Counter()
        self._opens: Counter[int] = Counter()

    def remember(self, inode: int, count: int = 1) -> None:
        """The kernel was handed `inode` `count` more times."""
        self._lookups[inode] += count

    def forget(self, inode: int, count: int) -> None:
        """The kernel let go of `inode` `count` times (never raises, as forget must not)."""
        left = self._lookups[inode] - count
        if left > 0:
            self._lookups[inode] = left
        else:
            self._lookups.pop(inode, None)

    def opened(self, inode: int) -> None:
        self._opens[inode] += 1

    def closed(self, inode: int) -> None:
        left = self._opens[inode] - 1
        if left > 0:
            self._opens[inode] = left
        else:
            self._opens.pop(inode, None)

    def is_open(self, inode: int) -> bool:
        return self._opens[inode] > 0

    def in_use(self, inode: int) -> bool:
        """True while the kernel knows `inode` or a handle has it open."""
        return self._lookups[inode] > 0 or self._opens[inode] > 0

    def statistics(self) -> dict[str, int]:
        return {"known_inodes": len(self._lookups), "open_inodes": len(self._opens)}
