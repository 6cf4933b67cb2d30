"""Delta re-chunking (vfs/sync/delta.py): same chunks as a full cut, reading only what an edit touches.

Small chunk sizes keep each case to a few hundred KiB of data; the cut rules
are the same at any size. The oracle is `Chunker.cut` of the whole new content.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cache.chunking import Chunk, Chunker, hash_chunk
from remote.protocol import ChunkRef
from vfs.sync.delta import Piece, Rechunker, changed_ranges

CHUNKER = Chunker(min_size=1024, avg_size=4096, max_size=16384)


class Source:
    """New content overlaid on base content, counting which base bytes were read."""

    def __init__(self, base: bytes, new: bytes, changed: list[tuple[int, int]]) -> None:
        self.base = base
        self.new = new
        self.changed = sorted(changed)
        self.base_reads: list[tuple[int, int]] = []
        self.sunk: dict[str, bytes] = {}

    async def read(self, lo: int, hi: int) -> bytes:
        assert 0 <= lo <= hi <= len(self.new)
        pos, top = lo, min(hi, len(self.base))
        for c_lo, c_hi in self.changed:  # record the unchanged parts: those come from the base
            if c_hi <= pos or c_lo >= top:
                continue
            if c_lo > pos:
                self.base_reads.append((pos, c_lo))
            pos = max(pos, c_hi)
        if pos < top:
            self.base_reads.append((pos, top))
        return self.new[lo:hi]

    async def cut(self, data: bytes, offset: int) -> list[Chunk]:
        return CHUNKER.cut(data, offset)

    async def digest(self, data: bytes) -> str:
        return hash_chunk(data)

    async def sink(self, piece: Piece, data: memoryview) -> None:
        assert piece.new and len(data) == piece.ref.length
        self.sunk[piece.ref.hash] = bytes(data)


async def delta(
    base: bytes, new: bytes, local: list[tuple[int, int]], keep_tail: int = 0
) -> tuple[list[Piece], Source]:
    refs = [ChunkRef(c.hash, c.length) for c in CHUNKER.cut(base)]
    changed = changed_ranges(local, len(base), len(new))
    source = Source(base, new, changed)
    rechunker = Rechunker(
        refs,
        changed,
        len(new),
        source.read,
        source.cut,
        source.sink,
        keep_tail=keep_tail,
        digest=source.digest if keep_tail else None,
    )
    return await rechunker.pieces(), source


def full_cut(data: bytes) -> list[ChunkRef]:
    return [ChunkRef(c.hash, c.length) for c in CHUNKER.cut(data)]


def data_of(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def assert_same_as_full_cut(pieces: list[Piece], new: bytes) -> None:
    assert [p.ref for p in pieces] == full_cut(new)
    offset = 0
    for piece in pieces:
        assert piece.offset == offset
        offset += piece.ref.length
    assert offset == len(new)


def touched_chunks(base: bytes, reads: list[tuple[int, int]]) -> int:
    """How many base chunks the reads overlapped."""
    starts, offset = [], 0
    for c in CHUNKER.cut(base):
        starts.append((offset, offset + c.length))
        offset += c.length
    return sum(1 for lo, hi in starts if any(r_lo < hi and lo < r_hi for r_lo, r_hi in reads))


async def test_one_byte_overwrite_reads_and_cuts_one_chunk() -> None:
    base = data_of(1, 256 * 1024)
    mid = len(base) // 2
    new = base[:mid] + bytes([base[mid] ^ 0xFF]) + base[mid + 1 :]
    pieces, source = await delta(base, new, [(mid, mid + 1)])
    assert_same_as_full_cut(pieces, new)
    assert sum(p.new for p in pieces) <= 2
    assert touched_chunks(base, source.base_reads) <= 2
    for piece in pieces:
        if piece.new:
            assert (
                source.sunk[piece.ref.hash] == new[piece.offset : piece.offset + piece.ref.length]
            )


async def test_unchanged_content_reads_nothing() -> None:
    base = data_of(2, 100_000)
    pieces, source = await delta(base, base, [])
    assert_same_as_full_cut(pieces, base)
    assert not any(p.new for p in pieces)
    assert source.base_reads == []


async def test_insert_rewritten_from_the_middle_reuses_the_prefix() -> None:
    base = data_of(3, 300_000)
    mid = len(base) // 2
    new = base[:mid] + data_of(4, 4096) + base[mid:]
    pieces, source = await delta(base, new, [(mid, len(new))])
    assert_same_as_full_cut(pieces, new)
    base_hashes = {r.hash for r in full_cut(base)}
    fresh = [p for p in pieces if p.ref.hash not in base_hashes]
    assert len(fresh) <= 3
    assert touched_chunks(base, source.base_reads) <= 2  # only the chunk holding `mid`


async def test_append_recuts_only_the_last_chunk() -> None:
    base = data_of(5, 200_000)
    new = base + data_of(6, 50_000)
    pieces, source = await delta(base, new, [(len(base), len(new))])
    assert_same_as_full_cut(pieces, new)
    assert touched_chunks(base, source.base_reads) == 1


@pytest.mark.parametrize("seed", range(6))
async def test_append_keeping_the_tail_cuts_only_the_new_bytes(seed: int) -> None:
    base = data_of(20 + seed, 100_000 + seed * 7919)
    added = data_of(30 + seed, 20_000)
    new = base + added
    pieces, source = await delta(base, new, [(len(base), len(new))], keep_tail=CHUNKER.min_size)
    assert all(p.ref.length <= CHUNKER.max_size for p in pieces)
    last_base = full_cut(base)[-1]
    new_bytes = sum(p.ref.length for p in pieces if p.new)
    if last_base.length >= CHUNKER.min_size:
        assert new_bytes == len(added) and source.base_reads == []
    else:
        assert new_bytes == len(added) + last_base.length
    assert_concatenates(pieces, source, base, new)


async def test_rewrite_after_an_insert_follows_the_moved_base_chunks() -> None:
    """An appended (non-canonical) tail is reused after a later insert shifts it."""
    first = data_of(40, 150_000)
    appended = first + data_of(41, 30_000)
    refs_pieces, src = await delta(first, appended, [(150_000, 180_000)], keep_tail=1024)
    mid = 60_000
    new = appended[:mid] + data_of(42, 500) + appended[mid:]
    refs = [p.ref for p in refs_pieces]
    changed = changed_ranges([(mid, len(new))], len(appended), len(new))
    source = Source(appended, new, changed)
    pieces = await Rechunker(
        refs, changed, len(new), source.read, source.cut, source.sink,
        keep_tail=1024, digest=source.digest,
    ).pieces()  # fmt: skip
    assert (
        b"".join(
            source.sunk[p.ref.hash] if p.new else new[p.offset : p.offset + p.ref.length]
            for p in pieces
        )
        == new
    )
    assert pieces[-1].ref == refs[-1] and not pieces[-1].new
    assert sum(p.ref.length for p in pieces if p.new) <= 3 * CHUNKER.max_size


def assert_concatenates(pieces: list[Piece], source: Source, base: bytes, new: bytes) -> None:
    """The pieces spell `new`: reused ones are base chunks (found by hash), new ones as sunk."""
    base_chunks = {c.hash: base[c.offset : c.offset + c.length] for c in CHUNKER.cut(base)}
    out = bytearray()
    for piece in pieces:
        out += source.sunk[piece.ref.hash] if piece.new else base_chunks[piece.ref.hash]
    assert bytes(out) == new


async def test_truncation_and_new_file() -> None:
    base = data_of(7, 120_000)
    cut_to = 70_000
    pieces, _ = await delta(base, base[:cut_to], [(cut_to, 2**62)])
    assert_same_as_full_cut(pieces, base[:cut_to])
    new = data_of(8, 90_000)
    pieces, _ = await delta(b"", new, [(0, len(new))])
    assert_same_as_full_cut(pieces, new)
    pieces, _ = await delta(base, b"", [(0, 2**62)])
    assert pieces == []


@pytest.mark.parametrize("where", [0, 1, 2, 79, 80, 81])
async def test_edits_near_a_boundary(where: int) -> None:
    """Edits just before and after a base cut: the window rules must hold exactly there."""
    base = data_of(9, 150_000)
    boundary = full_cut(base)[0].length
    for pos in (boundary - where - 1, boundary + where):
        new = bytearray(base)
        new[pos] ^= 0x5A
        pieces, _ = await delta(base, bytes(new), [(pos, pos + 1)])
        assert_same_as_full_cut(pieces, bytes(new))


edits = st.lists(
    st.tuples(
        st.sampled_from(["overwrite", "insert", "delete", "append", "truncate"]),
        st.floats(0, 1),
        st.integers(1, 9000),
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), size=st.integers(0, 150_000), script=edits)
async def test_any_edits_give_the_full_cut(seed: int, size: int, script: list) -> None:
    """Random edit scripts, tracked as a working copy would track them (local ranges)."""
    rng = random.Random(seed)
    base = rng.randbytes(size)
    new = bytearray(base)
    local: list[tuple[int, int]] = []
    for kind, where, n in script:
        pos = int(where * len(new))
        if kind == "overwrite":
            new[pos : pos + n] = rng.randbytes(n)
            local.append((pos, pos + n))
        elif kind == "insert":  # programs rewrite everything after an insertion
            new[pos:pos] = rng.randbytes(n)
            local.append((pos, len(new)))
        elif kind == "delete":
            del new[pos : pos + n]
            local.append((pos, 2**62))
        elif kind == "append":
            local.append((len(new), len(new) + n))
            new += rng.randbytes(n)
        else:
            del new[pos:]
            local.append((pos, 2**62))
    pieces, source = await delta(base, bytes(new), local)
    assert_same_as_full_cut(pieces, bytes(new))
    kept, kept_source = await delta(base, bytes(new), local, keep_tail=CHUNKER.min_size)
    assert_concatenates(kept, kept_source, base, bytes(new))
    for piece in pieces:
        if piece.new:
            assert (
                source.sunk[piece.ref.hash] == new[piece.offset : piece.offset + piece.ref.length]
            )
