"""Content-defined chunking: FastCDC cut points, BLAKE3 names.

A file is cut where a rolling gear hash of its content says so (FastCDC 2020,
via pyfastcdc's Cython path), so inserting bytes in the middle of a file moves
only the cut points around the insertion and every other chunk keeps its name.
Each chunk is named by the BLAKE3 hash of its bytes (the same hash as
`remote.protocol.hash_bytes`).

Everything here is pure CPU work with no I/O except reading the file being
cut; callers on the trio loop run it in `trio.to_thread.run_sync`. The
calling thread finds cut points while a small thread pool hashes the chunks
already cut (both release the GIL), so on two cores cutting and hashing
overlap instead of taking turns: 1.4-1.5 GB/s against 0.85-0.9 GB/s for
cut-then-hash with BLAKE3's own multithreading, measured on 256 MiB in memory.

Why these default sizes (measured on the 2-core build machine over 256 MiB of
random data; `tools/bench_cache.py` repeats the measurement on 1 GiB):

====================  ==========  =========  ==========  ===============
pyfastcdc avg/min/max  mean chunk  cut MB/s   BLAKE3 MT   note
====================  ==========  =========  ==========  ===============
256K / 64K / 1M          308 KiB      1950       1910     4x the requests
1M / 256K / 4M          1.19 MiB      1860       2460     chosen
2M / 512K / 8M          2.49 MiB      2010       1970     coarse dedup
====================  ==========  =========  ==========  ===============

Cutting runs at about 1.9 GB/s whatever the size, so throughput does not pick
the size; the link and the edit pattern do. Every chunk costs one HTTP round
trip on a cold read and one index row, so small chunks make a cold sequential
read round-trip bound; big chunks make the first byte of a cold random read
wait longer (8 MiB is 0.7 s on a 100 Mbit/s link) and make a one-byte edit
re-upload more. About 1 MiB (the design brief's starting point) keeps a cold
read's first byte under 0.1 s at 100 Mbit/s while eight parallel read-ahead
fetches fill the link, and BLAKE3's multithreaded mode is at its best there
(2.4 GB/s against 1.5 GB/s single-threaded). pyfastcdc's effective mean is
about `avg_size + min_size / 4`, hence the measured 1.19 MiB for avg 1 MiB.
The maximum (4 MiB) bounds one read's memory and the worst first-byte wait,
and stays inside `protocol.MAX_CHUNK_SIZE`.
"""

from __future__ import annotations

import functools
import io
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import blake3
from pyfastcdc import FastCDC

from remote.protocol import MAX_CHUNK_SIZE, ChunkRef

DEFAULT_MIN_SIZE = 256 * 1024
DEFAULT_AVG_SIZE = 1024 * 1024
DEFAULT_MAX_SIZE = 4 * 1024 * 1024

#: Below this many bytes BLAKE3's thread pool costs more than it saves.
_THREADED_HASH_MIN = 128 * 1024
#: How much `cut_file` reads at a time; chunks are views into these blocks.
_BLOCK_SIZE = 16 * 1024 * 1024
#: Threads hashing chunks while the calling thread finds the next cut points.
_HASH_THREADS = max(2, os.cpu_count() or 1)
#: Chunks cut ahead of the oldest one still being hashed.
_PIPELINE_DEPTH = 2 * _HASH_THREADS + 2

_Data = bytes | bytearray | memoryview


def hash_chunk(data: bytes | bytearray | memoryview) -> str:
    """BLAKE3 of `data`, lowercase hex; equal to `protocol.hash_bytes` but multithreaded when big."""
    if len(data) >= _THREADED_HASH_MIN:
        return blake3.blake3(data, max_threads=blake3.blake3.AUTO).hexdigest()
    return blake3.blake3(data).hexdigest()


@dataclass(frozen=True, slots=True)
class Chunk:
    """One piece of a file: where it starts, how long it is, and the hash that names it."""

    offset: int
    length: int
    hash: str


class Chunker:
    """Cuts bytes, files or streams into content-defined chunks with fixed size bounds.

    One Chunker may be shared by several threads: pyfastcdc keeps no state in
    the FastCDC object between calls, only in the per-call iterators.
    """

    def __init__(
        self,
        min_size: int = DEFAULT_MIN_SIZE,
        avg_size: int = DEFAULT_AVG_SIZE,
        max_size: int = DEFAULT_MAX_SIZE,
    ) -> None:
        if not min_size <= avg_size <= max_size:
            raise ValueError(
                f"chunk sizes must satisfy min <= avg <= max, got {min_size}, {avg_size}, {max_size}"
            )
        if max_size > MAX_CHUNK_SIZE:
            raise ValueError(
                f"max chunk size {max_size} exceeds the protocol limit {MAX_CHUNK_SIZE}"
            )
        self.min_size = min_size
        self.avg_size = avg_size
        self.max_size = max_size
        self._cdc = FastCDC(avg_size, min_size=min_size, max_size=max_size)

    def cut(self, data: bytes | bytearray | memoryview, offset: int = 0) -> list[Chunk]:
        """Cut an in-memory buffer; chunk offsets are `offset` plus the position in `data`."""
        pieces = ((c.offset, c.length, c.data) for c in self._cdc.cut_buf(data))
        return [Chunk(offset + c.offset, c.length, c.hash) for c, _ in _hash_alongside(pieces)]

    def cut_file(self, path: os.PathLike[str] | str) -> Iterator[Chunk]:
        """Cut a file by reading it in blocks; memory stays within a few blocks."""
        with open(path, "rb", buffering=0) as f:
            for chunk, _ in _hash_alongside(self._cut_blocks(f)):
                yield chunk

    def _cut_blocks(self, f: io.RawIOBase) -> Iterator[tuple[int, int, memoryview]]:
        """Cut points of a file read block by block, each chunk a view into its block.

        A cut depends on at most `max_size` bytes after the chunk's start, so a
        chunk is final once that many bytes (or the end of the file) follow its
        start; the undecided tail is carried into the next block. This gives
        exactly the cuts of the whole file in memory without copying every
        chunk out of a reused buffer.
        """
        carry = memoryview(b"")
        base = 0
        while True:
            block = bytearray(len(carry) + _BLOCK_SIZE)
            block[: len(carry)] = carry
            filled = len(carry)
            view = memoryview(block)
            while filled < len(block):
                n = f.readinto(view[filled:])
                if not n:
                    break
                filled += n
            eof = filled < len(block)
            view = view[:filled]
            decided = 0
            for c in self._cdc.cut_buf(view):
                if not eof and filled - c.offset < self.max_size:
                    break
                yield base + c.offset, c.length, c.data
                decided = c.offset + c.length
            if eof:
                return
            carry = view[decided:]
            base += decided

    def cut_stream(self, read: Callable[[int], bytes]) -> Iterator[tuple[Chunk, bytes]]:
        """Cut what `read(n)` returns until it returns b""; yields each chunk with its bytes."""
        pieces = (
            (c.offset, c.length, bytes(c.data)) for c in self._cdc.cut_stream(_ReadFunction(read))
        )
        yield from _hash_alongside(pieces)  # type: ignore[misc]


def _hash_alongside(
    pieces: Iterable[tuple[int, int, _Data]],
) -> Iterator[tuple[Chunk, _Data]]:
    """Hash pieces in the pool while the caller's thread goes on cutting; yields in input order.

    At most `_PIPELINE_DEPTH` pieces are held, which bounds memory for streams.
    """
    pool = _hash_pool()
    window: deque[tuple[int, int, _Data, Future[str]]] = deque()
    for offset, length, data in pieces:
        window.append((offset, length, data, pool.submit(_hash_single, data)))
        if len(window) >= _PIPELINE_DEPTH:
            start, size, done, digest = window.popleft()
            yield Chunk(start, size, digest.result()), done
    while window:
        start, size, done, digest = window.popleft()
        yield Chunk(start, size, digest.result()), done


def _hash_single(data: _Data) -> str:
    return blake3.blake3(data).hexdigest()


@functools.cache
def _hash_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=_HASH_THREADS, thread_name_prefix="ferry-chunk-hash")


def to_refs(chunks: Iterable[Chunk]) -> list[ChunkRef]:
    """The manifest form of a list of chunks: (hash, length) in file order."""
    return [ChunkRef(c.hash, c.length) for c in chunks]


class _ReadFunction:
    """Adapts a `read(n) -> bytes` callable to pyfastcdc's stream protocol."""

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self.read = read
