"""Delta re-chunking: cut only the region around an edit, reuse the base chunks elsewhere.

A working copy is its base manifest with some byte ranges replaced (the
`changed` ranges: what the user wrote, a truncation, growth past the base).
Cutting the whole new content would give the right chunk list, but it needs
every byte of it, and the bytes nobody wrote may not be cached: a one-byte
edit of a 10 GB file would download 10 GB first. `rechunk` gives the same
chunk list (when the base was itself cut with the same `Chunker`) while
reading only the base chunks an edit touches.

Why that works: FastCDC decides a cut at position p from the chunk's start
and the last 64 bytes up to p (the gear hash shifts older bytes out), plus
p's distance from the start. So, walking from the start of the file,

- a base chunk whose bytes, and the `WINDOW_AFTER` bytes after its end, are
  unchanged is cut the same way when it starts at a cut of the new content:
  it is reused without reading it;
- around a change, the new content is cut from the base boundary before it,
  one base chunk further at a time, until a piece cut from a base boundary
  ends at the next base boundary with the `WINDOW_BEFORE`/`WINDOW_AFTER`
  bytes around that end unchanged: from there on the cuts are the base's.

Appends are the exception, when asked for (`keep_tail`): the old last chunk
ended at the end of the file, not at a content-defined cut, so the canonical
cut would re-cut it together with the new bytes and send it again (up to
`max_size` more). With `keep_tail=N`, a last chunk of at least N bytes is kept
and only the appended bytes are cut; a shorter one is cut again with them, so
a file that grows by small appends does not become a string of tiny chunks.
The price: an appended file's chunks can differ from those of the same bytes
cut from scratch, near the old end only. So that a later rewrite does not send
that tail again, the same mode (given a `digest`) also follows the base's
boundaries moved by the size change: where the rewritten bytes after a cut
hash like the base chunk that moved there, that chunk is reused.

A piece that ends where the bytes handed to the cutter end is undecided (the
cutter stops there for want of data, not because of a cut) unless it ends
the file or satisfies the rule above; an undecided piece is cut again with
the next base chunk appended.

Pure logic over two callables (`read`, `cut`); I/O and threads are the
caller's business (see `vfs/sync/push.py`).
"""

from __future__ import annotations

import bisect
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from cache.chunking import Chunk
from remote.protocol import ChunkRef

#: Bytes before a cut that FastCDC's rolling hash depends on (64) plus a margin.
WINDOW_BEFORE = 80
#: Bytes at and after a cut that the cut decision reads (the cut position's own byte,
#: and the odd byte of FastCDC's two-bytes-per-step loop).
WINDOW_AFTER = 2
#: Past the end of the base (appended or new content), read this much at a time.
STEP = 16 * 1024 * 1024

Read = Callable[[int, int], Awaitable[bytes]]
"""`read(lo, hi)`: bytes [lo, hi) of the new content, exactly hi - lo of them."""
Cut = Callable[[bytes, int], Awaitable[list[Chunk]]]
"""`cut(data, offset)`: the chunks of `data`, their offsets shifted by `offset`."""
Sink = Callable[["Piece", memoryview], Awaitable[None]]
"""`sink(piece, data)`: called once per new piece with its bytes, in file order."""
Digest = Callable[[bytes], Awaitable[str]]
"""`digest(data)`: the chunk hash of `data`."""


@dataclass(frozen=True, slots=True)
class Piece:
    """One chunk of the new content at `offset`: reused from the base, or newly cut."""

    offset: int
    ref: ChunkRef
    new: bool = False


class Changes:
    """Merged, sorted changed ranges; answers "is [lo, hi) untouched?"."""

    def __init__(self, ranges: Sequence[tuple[int, int]]) -> None:
        merged: list[list[int]] = []
        for lo, hi in sorted(r for r in ranges if r[0] < r[1]):
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        self._starts = [m[0] for m in merged]
        self._ends = [m[1] for m in merged]

    def covered(self, lo: int, hi: int) -> bool:
        """True if every byte of [lo, hi) is changed."""
        i = bisect.bisect_right(self._ends, lo)
        return i < len(self._starts) and self._starts[i] <= lo and self._ends[i] >= hi

    def clean(self, lo: int, hi: int) -> bool:
        """True if no changed byte lies in [lo, hi)."""
        i = bisect.bisect_right(self._ends, lo)
        return i >= len(self._starts) or self._starts[i] >= hi


def changed_ranges(
    local: Sequence[tuple[int, int]], base_size: int, size: int
) -> list[tuple[int, int]]:
    """What differs from the base: the local ranges, and everything past the shorter end."""
    ranges = [(lo, hi) for lo, hi in local]
    if size != base_size:
        ranges.append((min(size, base_size), max(size, base_size)))
    return ranges


class Rechunker:
    """Computes the chunk list of new content from its base chunks and changed ranges."""

    def __init__(
        self,
        base: Sequence[ChunkRef],
        changed: Sequence[tuple[int, int]],
        size: int,
        read: Read,
        cut: Cut,
        sink: Sink,
        *,
        keep_tail: int = 0,
        digest: Digest | None = None,
    ) -> None:
        self.base = list(base)
        self.starts: list[int] = []
        offset = 0
        for ref in self.base:
            self.starts.append(offset)
            offset += ref.length
        self.base_size = offset
        self.ends = self.starts[1:] + [offset]
        self._index_at = {start: i for i, start in enumerate(self.starts)}
        self.changes = Changes(changed)
        self.size = size
        self.read = read
        self.cut = cut
        self.sink = sink
        self.keep_tail = keep_tail
        self.digest = digest
        #: How far the base's tail moved (bytes inserted or deleted before it).
        self.shift = size - self.base_size

    async def pieces(self) -> list[Piece]:
        """The new content as chunks, in order; each new one's bytes went to `sink` first.

        Memory stays within a few chunks plus one read (bytes are handed to
        `sink` as they are cut, never gathered).
        """
        out: list[Piece] = []
        pos = 0
        while pos < self.size:
            i = self._index_at.get(pos)
            if i is not None and self._reusable(i):
                out.append(Piece(pos, self.base[i]))
                pos = self.ends[i]
                continue
            j = self._shifted(pos)
            if j is not None and await self._matches(pos, j):
                out.append(Piece(pos, self.base[j]))
                pos += self.base[j].length
                continue
            pos = await self._recut(pos, out)
        return out

    def _cut_stands(self, end: int) -> bool:
        """A base cut at `end` is also a cut of the new content, given the same chunk start."""
        if end == self.size:
            return True
        return (
            end < self.base_size
            and end + WINDOW_AFTER <= self.size
            and self.changes.clean(end - WINDOW_BEFORE, end + WINDOW_AFTER)
        )

    def _reusable(self, i: int) -> bool:
        start, end = self.starts[i], self.ends[i]
        if end > self.size or not self.changes.clean(start, end):
            return False
        if end == self.base_size < self.size and end - start >= self.keep_tail > 0:
            return True  # an append: keep the old last chunk, cut only what was added
        return self._cut_stands(end)

    def _shifted(self, pos: int) -> int | None:
        """The base chunk that would start at `pos` if the base's tail moved by `shift` bytes.

        Only where the bytes are all rewritten (a program that inserts or deletes
        rewrites everything after): there they may still be the base's, moved.
        """
        if not self.shift or self.digest is None:
            return None
        j = self._index_at.get(pos - self.shift)
        if j is None or pos + self.base[j].length > self.size:
            return None
        return j if self.changes.covered(pos, pos + self.base[j].length) else None

    async def _matches(self, pos: int, j: int) -> bool:
        assert self.digest is not None
        data = await self.read(pos, pos + self.base[j].length)
        return await self.digest(data) == self.base[j].hash

    def _next_end(self, pos: int) -> int:
        """Where to stop reading after `pos`: the next base boundary, or a STEP past the base."""
        i = bisect.bisect_right(self.ends, pos)
        end = self.ends[i] if i < len(self.ends) else pos + STEP
        return min(end, self.size)

    async def _recut(self, pos: int, out: list[Piece]) -> int:
        """Cut from `pos` (a cut of the new content) until the cuts settle; returns the new pos."""
        start = pos
        end = self._next_end(pos)
        data = await self.read(start, end)
        while True:
            chunks = await self.cut(data, start)
            last = chunks[-1]
            for chunk in chunks[:-1]:
                out.append(await self._new(chunk, data, start))
                if self._shifted(chunk.offset + chunk.length) is not None:
                    return chunk.offset + chunk.length  # the caller tries the moved base chunk
            if self._settled(last, end):
                out.append(await self._new(last, data, start))
                return end
            # Read the undecided tail again with the next stretch instead of gluing the
            # two: `read` copies in a worker thread, a concatenation would copy up to
            # STEP bytes on the caller's (event loop) thread, 0.2-0.7 s of held GIL per GiB.
            start = last.offset
            grown = self._next_end(end)
            data = await self.read(start, grown)
            end = grown

    def _settled(self, last: Chunk, end: int) -> bool:
        """The final piece [last.offset, end) is a real chunk, not a cut for want of data."""
        if end == self.size:
            return True
        i = self._index_at.get(last.offset)
        return i is not None and self.ends[i] == end and self._cut_stands(end)

    async def _new(self, chunk: Chunk, data: bytes, start: int) -> Piece:
        lo = chunk.offset - start
        piece = Piece(chunk.offset, ChunkRef(chunk.hash, chunk.length), new=True)
        await self.sink(piece, memoryview(data)[lo : lo + chunk.length])
        return piece
