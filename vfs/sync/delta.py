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
        return end <= self.size and self.changes.clean(start, end) and self._cut_stands(end)

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
            if self._settled(last, end):
                out.append(await self._new(last, data, start))
                return end
            data = data[last.offset - start :]
            start = last.offset
            grown = self._next_end(end)
            data += await self.read(end, grown)
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
