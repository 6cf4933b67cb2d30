"""The drive's local state database (`<cache_dir>/state.db`): tables, pragmas, migrations.

One SQLite file holds everything the drive must remember across restarts: the
mirror of the remote tree, the journal of local operations the server has not
acknowledged, the base manifests content is read from, and which byte ranges
of each working copy are local. The connection runs in autocommit mode
(`isolation_level=None`): a single statement is its own durable transaction;
several statements that must land together use `transaction(db)`.

WAL with `synchronous=FULL` makes every commit durable when it returns, which
is what invariant 1 needs from the journal: once `journal.append` returns, a
`kill -9` (or a power cut) cannot lose the operation. Metadata-only changes
(create, mkdir, rename, unlink, chmod) and the `write` op of a close commit
inside `relaxed(db)` (`synchronous=NORMAL`): durable against a crash of the
drive at once (the WAL is in the OS page cache), and against a power cut from
the next FULL commit on, because the WAL is replayed in order; an fsync() of a
file commits FULL. That is the POSIX promise (durable after fsync) and saves
an fsync per create and per close: 200 small files written and closed take
~2 s instead of ~7 s on a 5 ms-fsync disk.

State machines (documented here because the schema is their only home):

mirror row
    new      revision = 0, created here, not yet acknowledged by the server
    clean    revision > 0, dirty = 0: the content is exactly `manifest`
    dirty    dirty = 1: the working copy holds bytes not yet committed
    detached parent IS NULL (and not the root): unlinked or deleted remotely
             while the kernel still knows the inode or a handle has it open;
             the row is removed at the last forget/release or at next mount
journal op
    appended by the filesystem, coalesced and pushed by the sync engine,
    deleted (`ack`) once the server has committed it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio

SCHEMA_VERSION = 1

#: How often the drive's background checkpointer moves the WAL into the database (seconds).
CHECKPOINT_INTERVAL = 0.5
#: WAL pages after which a committing connection checkpoints by itself while the background
#: checkpointer runs: a safety net only (SQLite's default, 1000, applies when it does not).
WAL_SAFETY_PAGES = 16_000
SQLITE_DEFAULT_AUTOCHECKPOINT = 1000

_TABLES = """
-- Facts about this cache dir. Keys: schema_version, server_url, library,
-- device (hostname shown in conflict names), cursor (change-feed cursor, int as
-- text; absent until the first full snapshot has been paged in), role (read |
-- write | owner: the user's access to the library, remembered for offline use).
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT
);

-- The local copy of the remote tree plus local state; listing and stat come
-- from here, online or offline.
CREATE TABLE IF NOT EXISTS mirror (
    inode    INTEGER PRIMARY KEY,       -- local inode number; 1 = the library root (protocol.ROOT_ID)
    id       TEXT UNIQUE NOT NULL,      -- entry id; uuid4().hex for entries created here
    parent   INTEGER,                   -- parent inode; NULL for the root and detached rows
    name     TEXT NOT NULL,             -- one path component (str, surrogateescape for non-UTF-8)
    kind     TEXT NOT NULL,             -- file | dir | symlink
    mode     INTEGER NOT NULL,          -- permission bits only (0o7777)
    mtime_ns INTEGER NOT NULL,          -- modification time, nanoseconds since the epoch (64-bit)
    ctime_ns INTEGER NOT NULL,          -- local status-change time, nanoseconds
    size     INTEGER NOT NULL DEFAULT 0,-- the size the user sees now (working copy included)
    target   TEXT,                      -- symlink target; NULL for other kinds
    manifest TEXT,                      -- manifest of the server content this entry is based on; NULL if none
    revision INTEGER NOT NULL DEFAULT 0,-- server revision the local state is based on; 0 = not on the server yet
    dirty    INTEGER NOT NULL DEFAULT 0,-- 1 while the working copy holds content not yet committed
    UNIQUE (parent, name)
);

-- Local operations the server has not acknowledged yet, in the order they happened.
CREATE TABLE IF NOT EXISTS journal (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT, -- order of local operations
    kind       TEXT NOT NULL,           -- create | write | rename | setattr | delete
    entry_id   TEXT NOT NULL,           -- the entry the operation is about (mirror.id)
    args       TEXT NOT NULL,           -- JSON: create {parent (entry id), name, kind, mode, mtime_ns, target?};
                                        -- write {} (content = the working copy at push time);
                                        -- rename {parent (entry id), name, replaced (entry id or null),
                                        --   from_parent?, from_name? (where it was before: atomic saves)};
                                        -- setattr {mode?, mtime_ns?}; delete {}
    created_ns INTEGER NOT NULL         -- wall-clock time of the operation, nanoseconds
);

-- Manifests content is read from, kept so that cached files stay readable offline.
CREATE TABLE IF NOT EXISTS manifests (
    hash   TEXT PRIMARY KEY,            -- protocol.manifest_hash of the chunk list
    chunks TEXT NOT NULL                -- JSON [[chunk hash, length], ...] (protocol.chunks_to_json)
);

-- One row per working copy (`<cache_dir>/work/<entry id>`, a sparse file).
CREATE TABLE IF NOT EXISTS workcopies (
    entry_id      TEXT PRIMARY KEY,     -- mirror.id
    base_manifest TEXT,                 -- manifest the non-local ranges are read from; NULL = none (zeros)
    base_size     INTEGER NOT NULL,     -- size of the base content; base bytes past it read as zeros
    size          INTEGER NOT NULL      -- logical size of the content at the last durable flush
);

-- Byte ranges [start, end) of a working copy whose bytes are local (written,
-- truncated away or materialized). Outside them, bytes come from the base
-- manifest. Ranges of one entry never overlap or touch (they are merged).
-- A truncation to S records [S, 2**62): bytes past S are zeros from the sparse file.
CREATE TABLE IF NOT EXISTS workcopy_ranges (
    entry_id TEXT NOT NULL,             -- workcopies.entry_id
    start    INTEGER NOT NULL,          -- first local byte
    end      INTEGER NOT NULL,          -- one past the last local byte
    PRIMARY KEY (entry_id, start)
);
"""


def open_db(path: Path) -> sqlite3.Connection:
    """Open (creating if needed) the state database with the drive's pragmas and tables.

    `check_same_thread=False` because short statements run on the trio thread
    while a few (materialize bookkeeping) may run from worker threads under trio's
    one-at-a-time discipline; callers never use the connection concurrently.
    """
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA foreign_keys=OFF")
    db.execute("PRAGMA busy_timeout=5000")
    migrate(db)
    return db


def migrate(db: sqlite3.Connection) -> None:
    """Create the tables, or refuse a database written by a newer ferry."""
    db.executescript(_TABLES)
    row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if row is None:
        set_meta(db, "schema_version", str(SCHEMA_VERSION))
    elif int(row[0]) > SCHEMA_VERSION:
        raise RuntimeError(
            f"state.db has schema version {row[0]}, this ferry understands up to "
            f"{SCHEMA_VERSION}: upgrade ferry or use another --cache-dir"
        )


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """Run several statements as one durable transaction (the connection is in autocommit)."""
    if db.in_transaction:  # nested: the outer transaction commits
        yield db
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


@contextmanager
def relaxed(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """Commit without fsync (see the module docstring); restores FULL afterwards."""
    db.execute("PRAGMA synchronous=NORMAL")
    try:
        yield db
    finally:
        db.execute("PRAGMA synchronous=FULL")


async def run_checkpoints(
    db: sqlite3.Connection, path: Path, *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    """Checkpoint `path`'s WAL from a worker thread, so that commits on the trio thread never do.

    SQLite's automatic checkpoint runs inside the COMMIT that crosses 1000 WAL
    pages: it copies the WAL into the database and fsyncs both, on the thread
    that committed. For the drive that is the trio thread, in the middle of a
    FUSE request: an untar (five small commits per file) paid more for those
    checkpoints than for the commits themselves. While this task runs, `db`
    only checkpoints past WAL_SAFETY_PAGES; a second connection does PASSIVE
    checkpoints every CHECKPOINT_INTERVAL in a thread, which never block the
    trio thread's readers or writers (WAL lets them go on). Durability does not
    change: a commit is as durable when it returns as before, the checkpoint
    only moves committed pages.
    """
    checkpointer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        checkpointer.execute("PRAGMA synchronous=FULL")
        db.execute(f"PRAGMA wal_autocheckpoint={WAL_SAFETY_PAGES}")
        task_status.started()
        seen = -1
        while True:
            await trio.sleep(CHECKPOINT_INTERVAL)
            if db.total_changes == seen:
                continue  # nothing committed since the last checkpoint: no thread hop
            seen = db.total_changes
            await trio.to_thread.run_sync(_checkpoint, checkpointer)
    finally:
        db.execute(f"PRAGMA wal_autocheckpoint={SQLITE_DEFAULT_AUTOCHECKPOINT}")
        checkpointer.close()


def _checkpoint(checkpointer: sqlite3.Connection) -> None:
    checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


def get_meta(db: sqlite3.Connection, key: str) -> str | None:
    row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else row[0]


def set_meta(db: sqlite3.Connection, key: str, value: str) -> None:
    db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))
