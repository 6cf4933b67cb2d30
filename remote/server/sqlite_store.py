"""The default `MetadataStore`: one SQLite file in WAL mode (via sqlite-utils).

Reads are one or a few short statements, fast enough to run on the trio
loop thread (as S3QL does). Writes end in an fsync (`synchronous=FULL`, so an
acknowledged commit survives power loss too), so the server runs them on a
worker thread; each thread has its own connection, and WAL gives readers a
snapshot, so the loop thread never sees a commit half-applied. A commit is one
`BEGIN IMMEDIATE ... COMMIT` transaction: a kill -9 at any moment leaves it
wholly applied or not at all. A full disk (SQLITE_FULL, on any statement or
on the COMMIT itself) rolls the transaction back and raises `StorageFull`, so
no connection is left holding a half-done write transaction (and the write
lock with it). The schema below documents every column.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlite_utils

from remote.protocol import ChunkRef, Entry, Version
from remote.server.storage import Library, StorageFull, StoredCommit, TrashItem, User

SCHEMA_VERSION = 2

SCHEMA = """
-- People who may sign in. Names are unique and never reused.
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL            -- unix seconds
);
-- Bearer tokens, stored only as sha256 hex of the token string.
CREATE TABLE IF NOT EXISTS tokens (
    token_hash TEXT PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id),
    created_at REAL NOT NULL
);
-- A library is one tree with its own revision counter.
CREATE TABLE IF NOT EXISTS libraries (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    owner_id INTEGER NOT NULL REFERENCES users(id),
    revision INTEGER NOT NULL DEFAULT 0 -- last revision handed out; one per applied op
);
-- Who may do what: 'read', 'write' or 'owner' (owner implies write).
CREATE TABLE IF NOT EXISTS roles (
    library_id INTEGER NOT NULL REFERENCES libraries(id),
    user_id INTEGER NOT NULL REFERENCES users(id),
    role TEXT NOT NULL CHECK (role IN ('read', 'write', 'owner')),
    PRIMARY KEY (library_id, user_id)
);
-- Every entry ever created, live or deleted (deleted rows are the trash and
-- the feed's tombstones). One row per (library, id); a change rewrites it.
CREATE TABLE IF NOT EXISTS entries (
    library_id INTEGER NOT NULL REFERENCES libraries(id),
    id TEXT NOT NULL,                   -- 32 hex, chosen by the creating client; stable
    parent TEXT,                        -- NULL only for the root
    name TEXT NOT NULL,                 -- '' for the root
    kind TEXT NOT NULL CHECK (kind IN ('file', 'dir', 'symlink')),
    mode INTEGER NOT NULL,              -- permission bits only
    mtime_ns INTEGER NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,    -- bytes of content (files), 0 otherwise
    manifest TEXT,                      -- files: manifest hash; NULL otherwise
    target TEXT,                        -- symlinks: the link target; NULL otherwise
    revision INTEGER NOT NULL,          -- library revision of the last change; unique per library
    deleted INTEGER NOT NULL DEFAULT 0, -- 1 = in the trash (or purged)
    deleted_at REAL,                    -- when it was deleted (trash retention counts from here)
    deleted_by TEXT,                    -- user name who deleted it
    deleted_device TEXT,                -- device that deleted it
    purged INTEGER NOT NULL DEFAULT 0,  -- 1 = retention over: only a feed tombstone remains
    PRIMARY KEY (library_id, id)
);
CREATE UNIQUE INDEX IF NOT EXISTS entries_by_revision ON entries (library_id, revision);
-- A name is taken by at most one live entry per directory.
CREATE UNIQUE INDEX IF NOT EXISTS live_names ON entries (library_id, parent, name)
    WHERE deleted = 0;
-- Manifests: ordered chunk lists, named by protocol.manifest_hash.
CREATE TABLE IF NOT EXISTS manifests (
    library_id INTEGER NOT NULL,
    hash TEXT NOT NULL,
    size INTEGER NOT NULL,              -- sum of chunk lengths
    chunks TEXT NOT NULL,               -- JSON [[hash, length], ...]
    PRIMARY KEY (library_id, hash)
);
-- Every content a file has had, the current one included.
CREATE TABLE IF NOT EXISTS versions (
    library_id INTEGER NOT NULL,
    entry_id TEXT NOT NULL,
    revision INTEGER NOT NULL,          -- revision of the commit that set this content
    manifest TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    committed_at REAL NOT NULL,
    device TEXT NOT NULL,
    user TEXT NOT NULL,
    PRIMARY KEY (library_id, entry_id, revision)
);
-- Which chunks each library holds (the bytes may be shared on disk).
CREATE TABLE IF NOT EXISTS library_chunks (
    library_id INTEGER NOT NULL,
    hash TEXT NOT NULL,
    size INTEGER NOT NULL,
    added_at REAL NOT NULL DEFAULT 0,   -- when uploaded: young chunks are never collected
    PRIMARY KEY (library_id, hash)
) WITHOUT ROWID;
-- Answers of applied commits by idempotency key, replayed on a retry.
CREATE TABLE IF NOT EXISTS commits (
    library_id INTEGER NOT NULL,
    key TEXT NOT NULL,                  -- the client's journal operation id
    body_hash TEXT NOT NULL,            -- sha256 of the canonical request; a different body is refused
    status INTEGER NOT NULL,
    result TEXT NOT NULL,               -- JSON answer sent the first time
    created_at REAL NOT NULL,
    PRIMARY KEY (library_id, key)
);
"""

_ENTRY_COLUMNS = "id, parent, name, kind, mode, mtime_ns, size, manifest, target, revision, deleted"


def _statements(script: str) -> Iterator[str]:
    """Split a script into statements (`executescript` would commit our transaction)."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending
            pending = ""


@contextmanager
def _full_is_storage_full(path: Path) -> Iterator[None]:
    """Turn SQLite's "database or disk is full" into `StorageFull`, naming the file."""
    try:
        yield
    except sqlite3.Error as exc:
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            raise StorageFull(f"no space left for the metadata database {path}: {exc}") from exc
        raise


def _entry(row: sqlite3.Row | tuple) -> Entry:
    return Entry(
        id=row[0],
        parent=row[1],
        name=row[2],
        kind=row[3],
        mode=row[4],
        mtime_ns=row[5],
        size=row[6],
        manifest=row[7],
        target=row[8],
        revision=row[9],
        deleted=bool(row[10]),
    )


class SqliteMetadataStore:
    """`MetadataStore` on one SQLite database file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        self.db = sqlite_utils.Database(self._conn)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._migrate()

    @property
    def _conn(self) -> sqlite3.Connection:
        """This thread's connection: transactions belong to one thread, and a reader on
        another thread sees only committed states (WAL snapshots), never half a commit."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=5000")
            self._local.conn, self._local.depth = conn, 0
            with self._all_lock:
                self._all.append(conn)
        return conn

    def _migrate(self) -> None:
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"the metadata database has schema {version}; this ferry knows {SCHEMA_VERSION}"
            )
        if version < 1:
            with self.transaction():
                for statement in _statements(SCHEMA):
                    self._conn.execute(statement)
        elif version < 2:  # library_chunks.added_at; chunks already there count from now
            with self.transaction():
                self._conn.execute(
                    "ALTER TABLE library_chunks ADD COLUMN added_at REAL NOT NULL DEFAULT 0"
                )
                self._conn.execute("UPDATE library_chunks SET added_at = ?", (time.time(),))
                self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextmanager
    def transaction(self) -> Iterator[None]:
        conn = self._conn
        if self._local.depth:
            self._local.depth += 1
            try:
                yield
            finally:
                self._local.depth -= 1
            return
        with _full_is_storage_full(self.path):
            conn.execute("BEGIN IMMEDIATE")
            self._local.depth = 1
            try:
                yield
                # A failed COMMIT (SQLITE_FULL, say) leaves the transaction open:
                # it is rolled back below like any other failure.
                conn.execute("COMMIT")
            except BaseException:
                # SQLite may already have rolled back on its own (it does on SQLITE_FULL).
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            finally:
                self._local.depth = 0

    def close(self) -> None:
        with self._all_lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()

    def _one(self, sql: str, *params: object) -> tuple | None:
        return self._conn.execute(sql, params).fetchone()

    # --- accounts and access ----------------------------------------------------------

    def add_user(self, name: str) -> User:
        cur = self._conn.execute(
            "INSERT INTO users (name, created_at) VALUES (?, ?)", (name, time.time())
        )
        return User(int(cur.lastrowid or 0), name)

    def get_user(self, name: str) -> User | None:
        row = self._one("SELECT id, name FROM users WHERE name = ?", name)
        return User(row[0], row[1]) if row else None

    def add_token(self, user: User, token_hash: str) -> None:
        self._conn.execute(
            "INSERT INTO tokens (token_hash, user_id, created_at) VALUES (?, ?, ?)",
            (token_hash, user.id, time.time()),
        )

    def user_for_token(self, token_hash: str) -> User | None:
        row = self._one(
            "SELECT users.id, users.name FROM tokens JOIN users ON users.id = tokens.user_id"
            " WHERE token_hash = ?",
            token_hash,
        )
        return User(row[0], row[1]) if row else None

    def add_library(self, name: str, owner: User, root: Entry) -> Library:
        with self.transaction():
            cur = self._conn.execute(
                "INSERT INTO libraries (name, owner_id, revision) VALUES (?, ?, ?)",
                (name, owner.id, root.revision),
            )
            library = Library(int(cur.lastrowid or 0), name, owner.id)
            self.set_role(library, owner, "owner")
            self.put_entry(library, root, user=owner.name, device="server", now=time.time())
        return library

    def get_library(self, name: str) -> Library | None:
        row = self._one("SELECT id, name, owner_id FROM libraries WHERE name = ?", name)
        return Library(row[0], row[1], row[2]) if row else None

    def all_libraries(self) -> list[Library]:
        rows = self._conn.execute("SELECT id, name, owner_id FROM libraries ORDER BY name")
        return [Library(*row) for row in rows]

    def set_role(self, library: Library, user: User, role: str) -> None:
        self._conn.execute(
            "INSERT INTO roles (library_id, user_id, role) VALUES (?, ?, ?)"
            " ON CONFLICT (library_id, user_id) DO UPDATE SET role = excluded.role",
            (library.id, user.id, role),
        )

    def role_of(self, library: Library, user: User) -> str | None:
        row = self._one(
            "SELECT role FROM roles WHERE library_id = ? AND user_id = ?", library.id, user.id
        )
        return row[0] if row else None

    def libraries_for(self, user: User) -> list[tuple[Library, str]]:
        rows = self._conn.execute(
            "SELECT libraries.id, name, owner_id, role FROM roles"
            " JOIN libraries ON libraries.id = roles.library_id"
            " WHERE user_id = ? ORDER BY name",
            (user.id,),
        )
        return [(Library(r[0], r[1], r[2]), r[3]) for r in rows]

    # --- the tree ---------------------------------------------------------------------

    def revision(self, library: Library) -> int:
        row = self._one("SELECT revision FROM libraries WHERE id = ?", library.id)
        return int(row[0]) if row else 0

    def next_revision(self, library: Library) -> int:
        self._conn.execute(
            "UPDATE libraries SET revision = revision + 1 WHERE id = ?", (library.id,)
        )
        return self.revision(library)

    def get_entry(self, library: Library, entry_id: str) -> Entry | None:
        row = self._one(
            f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE library_id = ? AND id = ?",
            library.id,
            entry_id,
        )
        return _entry(row) if row else None

    def live_child(self, library: Library, parent: str, name: str) -> Entry | None:
        row = self._one(
            f"SELECT {_ENTRY_COLUMNS} FROM entries"
            " WHERE library_id = ? AND parent = ? AND name = ? AND deleted = 0",
            library.id,
            parent,
            name,
        )
        return _entry(row) if row else None

    def has_live_children(self, library: Library, entry_id: str) -> bool:
        row = self._one(
            "SELECT 1 FROM entries WHERE library_id = ? AND parent = ? AND deleted = 0 LIMIT 1",
            library.id,
            entry_id,
        )
        return row is not None

    def put_entry(
        self, library: Library, entry: Entry, *, user: str, device: str, now: float
    ) -> None:
        deleted = (now, user, device) if entry.deleted else (None, None, None)
        self._conn.execute(
            "INSERT OR REPLACE INTO entries (library_id, id, parent, name, kind, mode, mtime_ns,"
            " size, manifest, target, revision, deleted, deleted_at, deleted_by, deleted_device,"
            " purged) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)",
            (
                library.id,
                entry.id,
                entry.parent,
                entry.name,
                entry.kind,
                entry.mode,
                entry.mtime_ns,
                entry.size,
                entry.manifest,
                entry.target,
                entry.revision,
                int(entry.deleted),
                *deleted,
            ),
        )

    def changes(self, library: Library, cursor: int, limit: int) -> list[Entry]:
        rows = self._conn.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE library_id = ? AND revision > ?"
            " ORDER BY revision LIMIT ?",
            (library.id, cursor, limit),
        )
        return [_entry(row) for row in rows]

    def all_entries(self, library: Library) -> Iterator[Entry]:
        rows = self._conn.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE library_id = ? ORDER BY revision",
            (library.id,),
        )
        return (_entry(row) for row in rows.fetchall())

    # --- content ----------------------------------------------------------------------

    def put_manifest(self, library: Library, manifest: str, chunks: list[ChunkRef]) -> None:
        self._conn.execute(
            "INSERT OR IGNORE INTO manifests (library_id, hash, size, chunks) VALUES (?, ?, ?, ?)",
            (
                library.id,
                manifest,
                sum(c.length for c in chunks),
                json.dumps([[c.hash, c.length] for c in chunks]),
            ),
        )

    def get_manifest(self, library: Library, manifest: str) -> list[ChunkRef] | None:
        row = self._one(
            "SELECT chunks FROM manifests WHERE library_id = ? AND hash = ?", library.id, manifest
        )
        return [ChunkRef(h, n) for h, n in json.loads(row[0])] if row else None

    def all_manifests(self, library: Library) -> Iterator[tuple[str, list[ChunkRef]]]:
        rows = self._conn.execute(
            "SELECT hash, chunks FROM manifests WHERE library_id = ?", (library.id,)
        ).fetchall()
        return ((h, [ChunkRef(c, n) for c, n in json.loads(cs)]) for h, cs in rows)

    def add_version(self, library: Library, entry_id: str, version: Version) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO versions (library_id, entry_id, revision, manifest, size,"
            " mtime_ns, committed_at, device, user) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                library.id,
                entry_id,
                version.revision,
                version.manifest,
                version.size,
                version.mtime_ns,
                version.committed_at,
                version.device,
                version.user,
            ),
        )

    def versions(self, library: Library, entry_id: str) -> list[Version]:
        rows = self._conn.execute(
            "SELECT revision, manifest, size, mtime_ns, committed_at, device, user FROM versions"
            " WHERE library_id = ? AND entry_id = ? ORDER BY revision DESC",
            (library.id, entry_id),
        )
        return [Version(*row) for row in rows]

    def trash(self, library: Library, deleted_after: float) -> list[TrashItem]:
        rows = self._conn.execute(
            f"SELECT {_ENTRY_COLUMNS}, deleted_at, deleted_by, deleted_device FROM entries"
            " WHERE library_id = ? AND deleted = 1 AND purged = 0 AND deleted_at > ?"
            " ORDER BY deleted_at DESC, revision DESC",
            (library.id, deleted_after),
        )
        return [TrashItem(_entry(row), row[11], row[12] or "", row[13] or "") for row in rows]

    def purge_trash(self, deleted_before: float) -> int:
        with self.transaction():
            self._conn.execute(
                "DELETE FROM versions WHERE (library_id, entry_id) IN (SELECT library_id, id"
                " FROM entries WHERE deleted = 1 AND purged = 0 AND deleted_at <= ?)",
                (deleted_before,),
            )
            cur = self._conn.execute(
                "UPDATE entries SET purged = 1 WHERE deleted = 1 AND purged = 0 AND deleted_at <= ?",
                (deleted_before,),
            )
        return cur.rowcount

    def is_purged(self, library: Library, entry_id: str) -> bool:
        row = self._one(
            "SELECT purged FROM entries WHERE library_id = ? AND id = ?", library.id, entry_id
        )
        return bool(row and row[0])

    # --- chunk membership ---------------------------------------------------------------

    def add_chunk(self, library: Library, chunk: str, size: int) -> None:
        self.add_chunks(library, [(chunk, size)])

    def add_chunks(self, library: Library, chunks: list[tuple[str, int]]) -> None:
        now = time.time()
        with self.transaction():
            self._conn.executemany(
                "INSERT OR IGNORE INTO library_chunks (library_id, hash, size, added_at)"
                " VALUES (?, ?, ?, ?)",
                [(library.id, chunk, size, now) for chunk, size in chunks],
            )

    def drop_unreferenced(self, library: Library, added_before: float) -> list[str]:
        """Forget what nothing in `library` refers to any more; return the chunks forgotten.

        Manifests no entry or version names go (a purged file's history), then
        chunks uploaded before `added_before` that no remaining manifest lists
        (a purged file's content, uploads whose commit never came). Younger
        chunks stay: a client may have uploaded them for a commit still on its
        way. One transaction, so a commit sees the library before or after.
        """
        lib = library.id
        with self.transaction():
            self._conn.execute(
                "DELETE FROM manifests WHERE library_id = ? AND hash NOT IN ("
                " SELECT manifest FROM versions WHERE library_id = ?"
                " UNION SELECT manifest FROM entries"
                " WHERE library_id = ? AND manifest IS NOT NULL AND purged = 0)",
                (lib, lib, lib),
            )
            used: set[str] = set()
            for (chunks,) in self._conn.execute(
                "SELECT chunks FROM manifests WHERE library_id = ?", (lib,)
            ):
                used.update(chunk for chunk, _ in json.loads(chunks))
            old = self._conn.execute(
                "SELECT hash FROM library_chunks WHERE library_id = ? AND added_at < ?",
                (lib, added_before),
            ).fetchall()
            dropped = [chunk for (chunk,) in old if chunk not in used]
            self._conn.executemany(
                "DELETE FROM library_chunks WHERE library_id = ? AND hash = ?",
                [(lib, chunk) for chunk in dropped],
            )
        return dropped

    def recorded_chunks(self) -> set[str]:
        """Every chunk some library holds."""
        return {h for (h,) in self._conn.execute("SELECT DISTINCT hash FROM library_chunks")}

    def chunk_size(self, library: Library, chunk: str) -> int | None:
        row = self._one(
            "SELECT size FROM library_chunks WHERE library_id = ? AND hash = ?", library.id, chunk
        )
        return int(row[0]) if row else None

    def missing_chunks(self, library: Library, chunks: Iterable[str]) -> list[str]:
        wanted = list(dict.fromkeys(chunks))
        present: set[str] = set()
        for start in range(0, len(wanted), 500):
            batch = wanted[start : start + 500]
            marks = ",".join("?" * len(batch))
            rows = self._conn.execute(
                f"SELECT hash FROM library_chunks WHERE library_id = ? AND hash IN ({marks})",
                (library.id, *batch),
            )
            present.update(row[0] for row in rows)
        return [h for h in wanted if h not in present]

    def chunk_sizes(self, library: Library) -> Iterator[tuple[str, int]]:
        rows = self._conn.execute(
            "SELECT hash, size FROM library_chunks WHERE library_id = ?", (library.id,)
        ).fetchall()
        return iter(rows)

    # --- idempotency ----------------------------------------------------------------------

    def get_commit(self, library: Library, key: str) -> StoredCommit | None:
        row = self._one(
            "SELECT body_hash, status, result FROM commits WHERE library_id = ? AND key = ?",
            library.id,
            key,
        )
        return StoredCommit(row[0], row[1], json.loads(row[2])) if row else None

    def put_commit(self, library: Library, key: str, commit: StoredCommit, now: float) -> None:
        self._conn.execute(
            "INSERT INTO commits (library_id, key, body_hash, status, result, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (library.id, key, commit.body_hash, commit.status, json.dumps(commit.result), now),
        )
