"""The chunk files on disk: where each chunk lives and how it gets there safely.

Layout of a cache directory::

    FERRY-CACHE          marker: what made this directory and its layout number
    index.sqlite3        the index (see cache/index.py); derived data, rebuildable
    lock                 flock()ed while a process has the cache open
    chunks/ab/<hash>     one file per chunk, fanned out by the hash's first two digits
    tmp/                 chunk files being written; emptied at every open

One file per chunk keeps eviction an unlink and a crash harmless: a chunk
reaches its real name only by `rename` after its bytes were fsynced, so a
name under `chunks/` never holds a partial write. (A pack-file layout would
save inodes but needs compaction and its own crash recovery.)

Every function here does blocking I/O: call them through `trio.to_thread`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path

from remote.protocol import HASH_HEX_LEN

LAYOUT = 1
MARKER_NAME = "FERRY-CACHE"
MARKER_TEXT = f"ferry chunk cache, layout {LAYOUT}\n"
INDEX_NAME = "index.sqlite3"
LOCK_NAME = "lock"


class ChunkFiles:
    """Paths and durable writes of the chunk files below one cache directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.chunks = directory / "chunks"
        self.tmp = directory / "tmp"
        # Plain strings for the hot paths: building a pathlib.Path costs more than an unlink.
        self._chunks = os.fspath(self.chunks)
        self._tmp = os.fspath(self.tmp)

    def path(self, chunk_hash: str) -> Path:
        return Path(self._name(chunk_hash))

    def _name(self, chunk_hash: str) -> str:
        return f"{self._chunks}/{chunk_hash[:2]}/{chunk_hash}"

    def create_layout(self) -> None:
        """Make the directories and empty `tmp/` of writes a crash left behind."""
        self.chunks.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(exist_ok=True)
        for leftover in self.tmp.iterdir():
            leftover.unlink(missing_ok=True)

    def write(self, chunk_hash: str, data: bytes | memoryview, *, durable: bool = True) -> None:
        """Write a chunk: tmp file, fsync, rename, fsync of the directory.

        With `durable=False` (chunks fetched from the server, which has them)
        the two fsyncs are skipped: a kill -9 still leaves whole files only
        (rename), and a power cut that tears one is caught by the hash check
        on read and the chunk is fetched again. On any failure (ENOSPC
        included) the tmp file is removed and the error propagates; the real
        name is never touched.
        """
        final = self._name(chunk_hash)
        tmp = f"{self._tmp}/{chunk_hash}.{secrets.token_hex(6)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.rename(tmp, final)
            except FileNotFoundError:
                os.makedirs(os.path.dirname(final), exist_ok=True)
                os.rename(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        if durable:
            _fsync_directory(os.path.dirname(final))

    def read(self, chunk_hash: str) -> bytes | None:
        """The chunk file's bytes, or None if there is no such file."""
        try:
            with open(self._name(chunk_hash), "rb", buffering=0) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def remove(self, hashes: Iterable[str]) -> None:
        """Unlink chunk files; ones already gone are fine."""
        for chunk_hash in hashes:
            try:
                os.unlink(self._name(chunk_hash))
            except FileNotFoundError:
                pass

    def scan(self) -> Iterator[tuple[str, int, int]]:
        """Every chunk file as (hash, size, mtime_ns); stray names are skipped."""
        try:
            fanout = list(os.scandir(self.chunks))
        except FileNotFoundError:
            return
        for sub in fanout:
            if not (sub.is_dir(follow_symlinks=False) and len(sub.name) == 2):
                continue
            for entry in os.scandir(sub.path):
                if is_chunk_name(entry.name) and entry.name[:2] == sub.name:
                    st = entry.stat(follow_symlinks=False)
                    yield entry.name, st.st_size, st.st_mtime_ns


def is_chunk_name(name: str) -> bool:
    return len(name) == HASH_HEX_LEN and all(c in "0123456789abcdef" for c in name)


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _fsync_directory(path: str) -> None:
    """Make a rename in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
