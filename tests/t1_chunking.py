"""Pure units of content-defined chunking: boundaries, names, stability under edits."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cache.chunking import (
    DEFAULT_AVG_SIZE,
    DEFAULT_MAX_SIZE,
    DEFAULT_MIN_SIZE,
    Chunk,
    Chunker,
    hash_chunk,
    to_refs,
)
from remote.protocol import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, ChunkRef, hash_bytes

#: Small sizes keep the property tests fast; the algorithm does not care about scale.
SMALL = Chunker(min_size=1024, avg_size=4096, max_size=16384)


def noise(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def test_defaults_are_inside_the_protocol_limits() -> None:
    assert (
        MIN_CHUNK_SIZE <= DEFAULT_MIN_SIZE <= DEFAULT_AVG_SIZE <= DEFAULT_MAX_SIZE <= MAX_CHUNK_SIZE
    )


def test_chunks_cover_the_input_in_order_with_correct_names() -> None:
    data = noise(300_000, 1)
    chunks = SMALL.cut(data)
    assert chunks[0].offset == 0
    for before, after in zip(chunks, chunks[1:], strict=False):
        assert after.offset == before.offset + before.length
    assert sum(c.length for c in chunks) == len(data)
    for c in chunks:
        assert c.hash == hash_bytes(data[c.offset : c.offset + c.length])
        assert c.length <= 16384
    assert all(c.length >= 1024 for c in chunks[:-1])


def test_offset_shifts_every_chunk() -> None:
    data = noise(50_000, 2)
    plain = SMALL.cut(data)
    shifted = SMALL.cut(memoryview(data), offset=1000)
    assert [(c.offset + 1000, c.length, c.hash) for c in plain] == [
        (c.offset, c.length, c.hash) for c in shifted
    ]


def test_empty_input_has_no_chunks(tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    assert SMALL.cut(b"") == []
    assert list(SMALL.cut_file(tmp_path / "empty")) == []
    assert list(SMALL.cut_stream(io.BytesIO(b"").read)) == []


def test_file_stream_and_buffer_agree(tmp_path: Path) -> None:
    data = noise(5 * 1024 * 1024 + 17, 3)
    path = tmp_path / "f"
    path.write_bytes(data)
    chunker = Chunker()
    from_buffer = chunker.cut(data)
    assert list(chunker.cut_file(path)) == from_buffer
    pairs = list(chunker.cut_stream(io.BytesIO(data).read))
    assert [c for c, _ in pairs] == from_buffer
    assert b"".join(b for _, b in pairs) == data


def test_stream_with_short_reads_agrees() -> None:
    data = noise(200_000, 4)
    source = io.BytesIO(data)
    trickle = Chunker(min_size=1024, avg_size=4096, max_size=16384).cut_stream(
        lambda n: source.read(min(n, 777))
    )
    assert [c for c, _ in trickle] == SMALL.cut(data)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**32),
    where=st.floats(0.2, 0.8),
    inserted=st.binary(min_size=1, max_size=3000),
)
def test_insertion_changes_only_the_chunks_around_it(
    seed: int, where: float, inserted: bytes
) -> None:
    data = noise(400_000, seed)
    at = int(len(data) * where)
    edited = data[:at] + inserted + data[at:]
    before = SMALL.cut(data)
    after = SMALL.cut(edited)
    lost = {c.hash for c in before} - {c.hash for c in after}
    # The chunks the insertion touches change, and a few after it until the cut
    # points resynchronise; every other chunk keeps its name.
    assert len(lost) <= 5, f"{len(lost)} of {len(before)} chunks changed"
    untouched_prefix = [c for c in before if c.offset + c.length <= at - 16384]
    assert untouched_prefix == after[: len(untouched_prefix)]
    shift = len(inserted)
    tail_before = [(c.offset + shift, c.hash) for c in before if c.offset >= at + 4 * 16384]
    tail_after = {(c.offset, c.hash) for c in after}
    assert set(tail_before) <= tail_after


def test_deletion_changes_only_the_chunks_around_it() -> None:
    data = noise(400_000, 5)
    edited = data[:200_000] + data[200_100:]
    lost = {c.hash for c in SMALL.cut(data)} - {c.hash for c in SMALL.cut(edited)}
    assert 1 <= len(lost) <= 3


def test_to_refs_makes_manifest_entries() -> None:
    chunks = [Chunk(0, 5, "a" * 64), Chunk(5, 7, "b" * 64)]
    assert to_refs(chunks) == [ChunkRef("a" * 64, 5), ChunkRef("b" * 64, 7)]


def test_threaded_hash_equals_protocol_hash() -> None:
    big = noise(3 * 1024 * 1024, 6)
    assert hash_chunk(big) == hash_bytes(big)
    assert hash_chunk(big[:100]) == hash_bytes(big[:100])


@pytest.mark.parametrize(
    ("low", "avg", "high"),
    [(4096, 2048, 8192), (1024, 4096, 2048), (1024, 4096, MAX_CHUNK_SIZE * 2)],
)
def test_inconsistent_sizes_are_refused(low: int, avg: int, high: int) -> None:
    with pytest.raises(ValueError, match="chunk size"):
        Chunker(min_size=low, avg_size=avg, max_size=high)
