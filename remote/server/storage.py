"""The two storage interfaces the sync server is written against.

`MetadataStore` holds everything but file bytes: accounts, tokens, libraries,
roles, entries (live ones and the tombstones that form the trash), the
per-library revision counter, manifests, versions, per-library chunk
membership and idempotency records. `ChunkStore` holds chunk bytes by key.

The HTTP layer (`app.py`) and the commit logic (`commits.py`) only ever talk
to these interfaces, so a PostgreSQL metadata store and an S3-compatible
object store can replace the SQLite file and the chunk directory without
touching them. Contracts an implementation must keep:

* `MetadataStore.transaction()` is all-or-nothing: either every write made
  inside it is durable when the block exits normally, or (on an exception, a
  crash, a kill -9) none is. Commits rely on it for atomicity.
* `ChunkStore.put` never makes a partial object visible: a reader sees all
  of the bytes or no object at all.
* Chunk existence is per library: a chunk counts as present for a library
  only once `MetadataStore.add_chunk` recorded it, after `ChunkStore.put`
  returned (bytes first, then the row that points at them).
* Running out of space is `StorageFull`, raised only after whatever was
  being written is gone again (no partial chunk, the transaction rolled
  back), so the caller can refuse the request as a whole and retry later.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from remote.protocol import ChunkRef, Entry, Version

ROLES = ("read", "write", "owner")


class StorageFull(Exception):
    """The server's disk (or quota) had no room for a write; nothing of it was kept."""


@dataclass(frozen=True, slots=True)
class User:
    id: int
    name: str


@dataclass(frozen=True, slots=True)
class Library:
    id: int
    name: str
    owner: int


@dataclass(slots=True)
class TrashItem:
    """A deleted entry that can still be restored, and who deleted it when."""

    entry: Entry
    deleted_at: float
    deleted_by: str
    device: str

    def to_json(self) -> dict[str, Any]:
        data = self.entry.to_json()
        data.update(deleted_at=self.deleted_at, deleted_by=self.deleted_by, device=self.device)
        return data


@dataclass(frozen=True, slots=True)
class StoredCommit:
    """The remembered answer to a commit, replayed when its idempotency key comes again."""

    body_hash: str
    status: int
    result: dict[str, Any]


class MetadataStore(Protocol):
    """Accounts, libraries and the entry tree; see the module docstring for the contract."""

    def transaction(self) -> AbstractContextManager[None]:
        """All writes inside the block apply together or not at all."""
        ...

    def close(self) -> None: ...

    # accounts and access
    def add_user(self, name: str) -> User: ...
    def get_user(self, name: str) -> User | None: ...
    def add_token(self, user: User, token_hash: str) -> None: ...
    def user_for_token(self, token_hash: str) -> User | None: ...
    def add_library(self, name: str, owner: User, root: Entry) -> Library: ...
    def get_library(self, name: str) -> Library | None: ...
    def set_role(self, library: Library, user: User, role: str) -> None: ...
    def role_of(self, library: Library, user: User) -> str | None: ...
    def libraries_for(self, user: User) -> list[tuple[Library, str]]: ...
    def all_libraries(self) -> list[Library]: ...

    # the tree
    def revision(self, library: Library) -> int: ...
    def next_revision(self, library: Library) -> int:
        """Increment and return the library's revision counter (inside a transaction)."""
        ...

    def get_entry(self, library: Library, entry_id: str) -> Entry | None: ...
    def live_child(self, library: Library, parent: str, name: str) -> Entry | None: ...
    def has_live_children(self, library: Library, entry_id: str) -> bool: ...
    def put_entry(
        self, library: Library, entry: Entry, *, user: str, device: str, now: float
    ) -> None:
        """Insert or replace the entry; a deleted one enters the trash stamped with user/device/now."""
        ...

    def changes(self, library: Library, cursor: int, limit: int) -> list[Entry]:
        """Entries whose revision is greater than `cursor`, in revision order, at most `limit`."""
        ...

    def all_entries(self, library: Library) -> Iterator[Entry]: ...

    # content
    def put_manifest(self, library: Library, manifest: str, chunks: list[ChunkRef]) -> None: ...
    def get_manifest(self, library: Library, manifest: str) -> list[ChunkRef] | None: ...
    def all_manifests(self, library: Library) -> Iterator[tuple[str, list[ChunkRef]]]: ...
    def add_version(self, library: Library, entry_id: str, version: Version) -> None: ...
    def versions(self, library: Library, entry_id: str) -> list[Version]: ...
    def trash(self, library: Library, deleted_after: float) -> list[TrashItem]: ...
    def purge_trash(self, deleted_before: float) -> int:
        """Forget versions of entries deleted before the time; they stay only as feed tombstones."""
        ...

    def is_purged(self, library: Library, entry_id: str) -> bool: ...

    # chunk membership
    def add_chunk(self, library: Library, chunk: str, size: int) -> None: ...
    def add_chunks(self, library: Library, chunks: list[tuple[str, int]]) -> None:
        """`add_chunk` for many (hash, size) pairs in one transaction."""
        ...

    def chunk_size(self, library: Library, chunk: str) -> int | None:
        """The chunk's length if the library holds it, else None."""
        ...

    def missing_chunks(self, library: Library, chunks: Iterable[str]) -> list[str]: ...
    def chunk_sizes(self, library: Library) -> Iterator[tuple[str, int]]: ...
    def drop_unreferenced(self, library: Library, added_before: float) -> list[str]:
        """Forget manifests and (older) chunks nothing refers to; return the chunks forgotten."""
        ...

    def recorded_chunks(self) -> set[str]:
        """Every chunk some library holds."""
        ...

    # idempotency
    def get_commit(self, library: Library, key: str) -> StoredCommit | None: ...
    def put_commit(self, library: Library, key: str, commit: StoredCommit, now: float) -> None: ...


class ChunkStore(Protocol):
    """Immutable byte objects by key (a hex hash). Blocking calls: run them on a worker thread."""

    def has(self, key: str) -> bool: ...
    def put(self, key: str, data: bytes) -> None:
        """Store durably and atomically; storing an existing key again is harmless."""
        ...

    def put_many(self, items: list[tuple[str, bytes | memoryview]]) -> None:
        """`put` of several objects, durable when it returns; may sync them together."""
        ...

    def get(self, key: str) -> bytes: ...
    def get_range(self, key: str, start: int, length: int) -> bytes: ...
    def delete(self, key: str) -> None: ...
    def size(self, key: str) -> int: ...
    def keys_older_than(self, when: float) -> Iterator[str]:
        """Every stored key written before `when` (unix seconds)."""
        ...
