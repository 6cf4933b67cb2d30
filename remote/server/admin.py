"""Administration of a server's data directory: users, libraries, shares, checks.

These functions open the store directly (the server may be running: SQLite
in WAL mode serialises the writers), so `ferry admin` and `ferry up` can set
up accounts without an HTTP admin API. `open_stores` is also the one place
that knows the data directory's layout.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from remote import protocol
from remote.private_dirs import make_private_dir
from remote.protocol import Entry
from remote.server import auth
from remote.server.chunk_dir import DirectoryChunkStore
from remote.server.sqlite_store import SqliteMetadataStore
from remote.server.storage import ROLES

_NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


class AdminError(Exception):
    """An admin request that cannot be done; the message says why."""


@contextmanager
def open_stores(data_dir: Path) -> Iterator[tuple[SqliteMetadataStore, DirectoryChunkStore]]:
    """Open (creating on first use, private: 0700) the metadata database and chunk directory of DATA_DIR."""
    make_private_dir(data_dir)
    meta = SqliteMetadataStore(data_dir / "meta.sqlite")
    try:
        yield meta, DirectoryChunkStore(data_dir / "chunks")
    finally:
        meta.close()


def _check_name(kind: str, name: str) -> None:
    if not _NAME_RE.match(name):
        raise AdminError(
            f"{kind} name {name!r} must be 1-64 letters, digits, '.', '_' or '-',"
            " starting with a letter or digit"
        )


def add_user(data_dir: Path, name: str) -> str:
    """Create user NAME and return a new bearer token for it (shown once, stored hashed)."""
    _check_name("user", name)
    token = auth.new_token()
    with open_stores(data_dir) as (meta, _):
        with meta.transaction():
            if meta.get_user(name) is not None:
                raise AdminError(f"user {name!r} already exists")
            user = meta.add_user(name)
            meta.add_token(user, auth.hash_token(token))
    return token


def add_token(data_dir: Path, name: str) -> str:
    """Give existing user NAME another token (one per device, say) and return it."""
    token = auth.new_token()
    with open_stores(data_dir) as (meta, _):
        user = meta.get_user(name)
        if user is None:
            raise AdminError(f"there is no user {name!r}")
        meta.add_token(user, auth.hash_token(token))
    return token


def add_library(data_dir: Path, name: str, owner: str) -> None:
    """Create library NAME owned by user OWNER, with an empty root directory."""
    _check_name("library", name)
    with open_stores(data_dir) as (meta, _):
        user = meta.get_user(owner)
        if user is None:
            raise AdminError(f"there is no user {owner!r}")
        if meta.get_library(name) is not None:
            raise AdminError(f"library {name!r} already exists")
        root = Entry(
            id=protocol.ROOT_ID,
            parent=None,
            name="",
            kind="dir",
            mode=0o755,
            mtime_ns=time.time_ns(),
            revision=1,
        )
        meta.add_library(name, user, root)


def share(data_dir: Path, library: str, user: str, role: str) -> None:
    """Give USER the ROLE ('read' or 'write') on LIBRARY, replacing any earlier role."""
    if role not in ("read", "write"):
        raise AdminError(f"role must be read or write, not {role!r}")
    with open_stores(data_dir) as (meta, _):
        found_user = meta.get_user(user)
        found_library = meta.get_library(library)
        if found_user is None:
            raise AdminError(f"there is no user {user!r}")
        if found_library is None:
            raise AdminError(f"there is no library {library!r}")
        if found_library.owner == found_user.id:
            raise AdminError(f"{user!r} owns {library!r}; an owner's role cannot change")
        assert role in ROLES
        meta.set_role(found_library, found_user, role)


def check(data_dir: Path) -> list[str]:
    """Consistency problems of the store, one sentence each; empty when all is well.

    Checks that every manifest's chunks are recorded and present with bytes
    matching their hash and length, every entry's manifest exists, every
    entry's parent exists and is a directory (live entries: a live one), and
    every live entry is reachable from the root.
    """
    problems: list[str] = []
    with open_stores(data_dir) as (meta, chunks):
        for library in meta.all_libraries():
            where = f"library {library.name!r}"
            sizes = dict(meta.chunk_sizes(library))
            for chunk, size in sizes.items():
                if not chunks.has(chunk):
                    problems.append(f"{where}: chunk {chunk} is recorded but its file is missing")
                    continue
                data = chunks.get(chunk)
                if len(data) != size or protocol.hash_bytes(data) != chunk:
                    problems.append(f"{where}: chunk {chunk} does not match its hash or size")
            manifests = dict(meta.all_manifests(library))
            for name, refs in manifests.items():
                if protocol.manifest_hash(refs) != name:
                    problems.append(f"{where}: manifest {name} does not match its chunk list")
                for ref in refs:
                    if sizes.get(ref.hash) != ref.length:
                        problems.append(
                            f"{where}: manifest {name} needs chunk {ref.hash} ({ref.length}"
                            " bytes), which the library lacks"
                        )
            entries = {e.id: e for e in meta.all_entries(library)}
            # a purged file is a tombstone: its content went with the trash
            purged = {e.id for e in entries.values() if e.deleted and meta.is_purged(library, e.id)}
            problems += _check_tree(where, entries, manifests, purged)
    return problems


def _check_tree(
    where: str, entries: dict[str, Entry], manifests: dict, purged: set[str]
) -> list[str]:
    problems = []
    if protocol.ROOT_ID not in entries:
        return [f"{where}: the root directory is missing"]
    for entry in entries.values():
        if entry.kind == "file" and entry.manifest not in manifests and entry.id not in purged:
            problems.append(f"{where}: file {entry.id} has no manifest {entry.manifest}")
        if entry.id == protocol.ROOT_ID:
            continue
        parent = entries.get(entry.parent or "")
        if parent is None or parent.kind != "dir":
            problems.append(f"{where}: entry {entry.id} ({entry.name!r}) has no parent directory")
        elif not entry.deleted and parent.deleted:
            problems.append(f"{where}: live entry {entry.id} ({entry.name!r}) is in a deleted dir")
        elif not entry.deleted:
            seen = {entry.id}
            node = parent
            while node.id != protocol.ROOT_ID:
                if node.id in seen or node.parent not in entries:
                    problems.append(f"{where}: entry {entry.id} is not reachable from the root")
                    break
                seen.add(node.id)
                node = entries[node.parent]
    return problems
