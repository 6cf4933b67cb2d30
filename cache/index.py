"""The SQLite index of the chunk cache: which chunks are stored, how big, how recently used, who pins them.

The chunk files are the truth about content; this index is derived data that
makes size accounting, LRU order and pins cheap. Durability order is bytes
first, then the row: a row is added only after its file was renamed into
place, so a crash can leave a file without a row (adopted at the next open)
but never a row for bytes that were not written.

Statements here are short and run on the trio thread (as S3QL does); nothing
in this module awaits. The connection is in autocommit mode so that every call
is its own transaction unless it says otherwise.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path

SCHEMA_VERSION = 1
FORMAT = "ferry-chunk-index"

_SCHEMA = """
-- What kind of file this is; lets open() tell a foreign SQLite file from ours.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,   -- 'format'
    value TEXT NOT NULL       -- 'ferry-chunk-index'
) WITHOUT ROWID;

-- One row per chunk file under chunks/.
CREATE TABLE chunks (
    hash        TEXT PRIMARY KEY,  -- BLAKE3 hex of the bytes; also the file name
    size        INTEGER NOT NULL,  -- bytes in the file
    last_access INTEGER NOT NULL   -- access sequence number: larger is more recent; LRU evicts smallest
) WITHOUT ROWID;
CREATE INDEX chunks_lru ON chunks (last_access);

-- Who needs a chunk kept. A chunk's pin count is its number of rows here;
-- any row at all forbids eviction. A row may name a chunk not yet stored:
-- the pin holds as soon as the chunk arrives.
CREATE TABLE pins (
    owner TEXT NOT NULL,  -- 'pin:<entry id>' (kept offline) or 'dirty:<entry id>' (backs unsynced data)
    hash  TEXT NOT NULL,  -- chunk hash
    PRIMARY KEY (owner, hash)
) WITHOUT ROWID;
CREATE INDEX pins_hash ON pins (hash);
"""


class IndexDamaged(Exception):
    """The index file is not a usable ferry chunk index; the message says why."""


class ChunkIndex:
    """Rows of the chunk index. Not thread-safe: use from the trio thread only."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    @classmethod
    def open(cls, path: Path) -> ChunkIndex:
        """Open an existing index or create a new one; raise IndexDamaged if it cannot be trusted."""
        fresh = not path.exists() or path.stat().st_size == 0
        try:
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise IndexDamaged(f"cannot open {path}: {exc}") from exc
        try:
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            if fresh:
                with db:
                    db.executescript(f"BEGIN; {_SCHEMA}")
                    db.execute("INSERT INTO meta VALUES ('format', ?)", (FORMAT,))
                    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            else:
                _validate(db, path)
        except sqlite3.Error as exc:
            db.close()
            raise IndexDamaged(f"{path} is not a readable SQLite database: {exc}") from exc
        except IndexDamaged:
            db.close()
            raise
        return cls(db)

    def close(self) -> None:
        self._db.close()

    # --- chunks ---------------------------------------------------------------

    def add(self, chunk_hash: str, size: int, access: int) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO chunks (hash, size, last_access) VALUES (?, ?, ?)",
            (chunk_hash, size, access),
        )

    def add_many(self, rows: Iterable[tuple[str, int, int]]) -> None:
        """Add (hash, size, access) rows in one transaction."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR REPLACE INTO chunks (hash, size, last_access) VALUES (?, ?, ?)", rows
            )

    def remove(self, hashes: Iterable[str]) -> None:
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany("DELETE FROM chunks WHERE hash = ?", ((h,) for h in hashes))

    def size_of(self, chunk_hash: str) -> int | None:
        row = self._db.execute("SELECT size FROM chunks WHERE hash = ?", (chunk_hash,)).fetchone()
        return None if row is None else row[0]

    def sizes(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT hash, size FROM chunks"))

    def touch(self, accesses: Iterable[tuple[int, str]]) -> None:
        """Record (access, hash) pairs in one transaction; rows that are gone are ignored."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany("UPDATE chunks SET last_access = ? WHERE hash = ?", accesses)

    def totals(self) -> tuple[int, int]:
        """(number of chunks, total bytes)."""
        count, total = self._db.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM chunks"
        ).fetchone()
        return count, total

    def max_access(self) -> int:
        return self._db.execute("SELECT coalesce(max(last_access), 0) FROM chunks").fetchone()[0]

    def lru_victims(self, need: int) -> list[tuple[str, int]]:
        """Unpinned chunks, least recently used first, until their sizes add up to `need` bytes.

        Fewer (possibly none) if everything else is pinned.
        """
        cursor = self._db.execute(
            "SELECT hash, size FROM chunks"
            " WHERE NOT EXISTS (SELECT 1 FROM pins WHERE pins.hash = chunks.hash)"
            " ORDER BY last_access"
        )
        victims: list[tuple[str, int]] = []
        freed = 0
        try:
            while freed < need:
                batch = cursor.fetchmany(64)
                if not batch:
                    break
                for chunk_hash, size in batch:
                    victims.append((chunk_hash, size))
                    freed += size
                    if freed >= need:
                        break
        finally:
            cursor.close()
        return victims

    # --- pins -----------------------------------------------------------------

    def pin(self, owner: str, hashes: Iterable[str]) -> None:
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR IGNORE INTO pins (owner, hash) VALUES (?, ?)",
                ((owner, h) for h in hashes),
            )

    def unpin(self, owner: str, hashes: Iterable[str] | None) -> None:
        with self._db:
            self._db.execute("BEGIN")
            if hashes is None:
                self._db.execute("DELETE FROM pins WHERE owner = ?", (owner,))
            else:
                self._db.executemany(
                    "DELETE FROM pins WHERE owner = ? AND hash = ?", ((owner, h) for h in hashes)
                )

    def is_pinned(self, chunk_hash: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM pins WHERE hash = ? LIMIT 1", (chunk_hash,)
        ).fetchone()
        return row is not None

    def pin_count(self, chunk_hash: str) -> int:
        return self._db.execute(
            "SELECT count(*) FROM pins WHERE hash = ?", (chunk_hash,)
        ).fetchone()[0]

    def pinned_bytes(self) -> int:
        return self._db.execute(
            "SELECT coalesce(sum(size), 0) FROM chunks"
            " WHERE EXISTS (SELECT 1 FROM pins WHERE pins.hash = chunks.hash)"
        ).fetchone()[0]

    def all_pins(self) -> list[tuple[str, str]]:
        return list(self._db.execute("SELECT owner, hash FROM pins"))


def salvage_pins(path: Path) -> list[tuple[str, str]]:
    """Whatever (owner, hash) pin rows can still be read from a damaged index; [] if none."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return [(str(owner), str(h)) for owner, h in db.execute("SELECT owner, hash FROM pins")]
        finally:
            db.close()
    except sqlite3.Error:
        return []


def _validate(db: sqlite3.Connection, path: Path) -> None:
    """Raise IndexDamaged unless `db` is an intact index of this schema version."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version != SCHEMA_VERSION:
        raise IndexDamaged(f"{path} has index schema {version}, this ferry uses {SCHEMA_VERSION}")
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
    except sqlite3.Error as exc:
        raise IndexDamaged(f"{path} is not a ferry chunk index: {exc}") from exc
    if row is None or row[0] != FORMAT:
        raise IndexDamaged(f"{path} is not a ferry chunk index (format {row!r})")
    check = db.execute("PRAGMA quick_check").fetchone()[0]
    if check != "ok":
        raise IndexDamaged(f"{path} failed SQLite's quick_check: {check}")
