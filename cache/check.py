"""Consistency between the chunk files and the index.

`reconcile` runs at every open and makes the index match the files again
after a crash or outside damage: rows whose file is gone are dropped, files
whose size disagrees with their row are deleted with the row (a truncated
chunk), and complete files without a row (renamed into place just before a
crash) are adopted as least recently used. `verify` is the slow oracle that
tests and tools run: it rehashes every file.

Both do blocking I/O and are meant for startup, tools and tests.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cache.chunking import hash_chunk
from cache.files import ChunkFiles
from cache.index import ChunkIndex
from remote.protocol import MAX_CHUNK_SIZE

log = logging.getLogger(__name__)


@dataclass
class Reconciliation:
    """What `reconcile` changed, for the log and for tests."""

    dropped_rows: int = 0
    removed_files: int = 0
    adopted_files: int = 0


def reconcile(index: ChunkIndex, files: ChunkFiles) -> Reconciliation:
    """Make the index describe exactly the chunk files on disk."""
    result = Reconciliation()
    rows = index.sizes()
    on_disk = {h: size for h, size, _ in files.scan()}
    gone = [h for h in rows if h not in on_disk]
    wrong = [h for h, size in on_disk.items() if h in rows and rows[h] != size]
    unfit = [h for h, size in on_disk.items() if h not in rows and not 0 < size <= MAX_CHUNK_SIZE]
    adopt = [
        (h, size, 0) for h, size in on_disk.items() if h not in rows and 0 < size <= MAX_CHUNK_SIZE
    ]
    if gone or wrong:
        index.remove(gone + wrong)
    if wrong or unfit:
        files.remove(wrong + unfit)
    if adopt:
        index.add_many(adopt)
    result.dropped_rows = len(gone) + len(wrong)
    result.removed_files = len(wrong) + len(unfit)
    result.adopted_files = len(adopt)
    if wrong:
        log.warning(
            "chunk cache %s: %d chunk files had the wrong size (truncated or damaged) and were removed",
            files.directory,
            len(wrong),
        )
    return result


def verify(index: ChunkIndex, files: ChunkFiles) -> list[str]:
    """Every inconsistency between index and files, as sentences; [] when the cache is sound."""
    problems: list[str] = []
    rows = index.sizes()
    on_disk = {h: size for h, size, _ in files.scan()}
    for h, size in rows.items():
        if h not in on_disk:
            problems.append(f"chunk {h} is in the index but has no file")
        elif on_disk[h] != size:
            problems.append(f"chunk {h} is {on_disk[h]} bytes on disk, {size} in the index")
        else:
            data = files.read(h)
            if data is None or hash_chunk(data) != h:
                problems.append(f"chunk file {files.path(h)} does not match its hash")
    problems += [f"chunk file {files.path(h)} has no index row" for h in on_disk if h not in rows]
    leftovers = list(files.tmp.iterdir()) if files.tmp.exists() else []
    problems += [f"temporary file {p} was left behind" for p in leftovers]
    return problems
