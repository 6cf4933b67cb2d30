"""Conflict copies: how they are named, and the list `ferry status` shows.

When a local change meets a newer remote change to the same file, the
server's version keeps the name and the local one is kept beside it as
`name (conflict from HOST YYYY-MM-DD HHMM).ext`, as Dropbox and Seafile do,
so that nothing the user saved is dropped. Naming is a pure function; the
record of conflicts lives in state.db's `meta` table (key `conflicts`, a JSON
list) so that it survives restarts.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from datetime import datetime
from typing import Any

from remote.protocol import MAX_NAME_BYTES

#: Keep at most this many conflict records for `ferry status`.
MAX_RECORDS = 200


def split_extension(name: str, kind: str = "file") -> tuple[str, str]:
    """('report', '.txt') for 'report.txt'; dot files and directories have no extension."""
    dot = name.rfind(".")
    if kind != "file" or dot <= 0 or dot == len(name) - 1:
        return name, ""
    return name[:dot], name[dot:]


def conflict_name(
    name: str, host: str, when: datetime, *, kind: str = "file", attempt: int = 1
) -> str:
    """The name a conflicting local copy gets; `attempt` > 1 adds a counter to make it unique.

    The stem is shortened (never the extension or the marker) to stay within
    the protocol's 255-byte name limit.
    """
    stem, ext = split_extension(name, kind)
    counter = f" {attempt}" if attempt > 1 else ""
    marker = f" (conflict from {host} {when:%Y-%m-%d %H%M}{counter})"
    room = MAX_NAME_BYTES - len((marker + ext).encode())
    if room < 1:  # an absurd host name: keep the marker short instead
        marker = f" (conflict {when:%Y-%m-%d %H%M}{counter})"
        room = MAX_NAME_BYTES - len((marker + ext).encode())
    encoded = stem.encode()
    if len(encoded) > room:
        stem = encoded[:room].decode(errors="ignore")
    return stem + marker + ext


def unique_conflict_name(
    name: str, host: str, when: datetime, taken: Callable[[str], bool], *, kind: str = "file"
) -> str:
    """The first conflict name for `name` that `taken` says is free."""
    attempt = 1
    while True:
        candidate = conflict_name(name, host, when, kind=kind, attempt=attempt)
        if not taken(candidate):
            return candidate
        attempt += 1


def record_conflict(db: sqlite3.Connection, path: str, copy: str, reason: str) -> None:
    """Remember a conflict for `ferry status` (newest last, bounded)."""
    records = list_conflicts(db)
    records.append({"path": path, "copy": copy, "reason": reason, "at": datetime.now().isoformat()})
    db.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('conflicts', ?)",
        (json.dumps(records[-MAX_RECORDS:]),),
    )


def list_conflicts(db: sqlite3.Connection) -> list[dict[str, Any]]:
    row = db.execute("SELECT value FROM meta WHERE key = 'conflicts'").fetchone()
    return json.loads(row[0]) if row else []
