"""The local chunk store of a mounted drive: content-defined chunking, BLAKE3 names,
chunk files with a SQLite index, a size cap with LRU eviction, pins, and one
download per missing chunk however many readers wait.

The public surface is re-exported here; see `cache.store` and `cache.chunking`.
"""

from cache.chunking import (
    DEFAULT_AVG_SIZE,
    DEFAULT_MAX_SIZE,
    DEFAULT_MIN_SIZE,
    Chunk,
    Chunker,
    hash_chunk,
    to_refs,
)
from cache.store import CacheError, CacheStats, ChunkCache, ChunkVerifyError, default_capacity

__all__ = [
    "DEFAULT_AVG_SIZE",
    "DEFAULT_MAX_SIZE",
    "DEFAULT_MIN_SIZE",
    "CacheError",
    "CacheStats",
    "Chunk",
    "ChunkCache",
    "ChunkVerifyError",
    "Chunker",
    "default_capacity",
    "hash_chunk",
    "to_refs",
]
