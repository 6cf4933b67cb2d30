"""Applying commits: validation, conflict detection, atomicity and idempotency.

A commit is a list of operations, each made against a base revision. They
are applied in order inside one `MetadataStore.transaction()`, each taking
the next library revision, so the batch lands whole or not at all; the first
refusal raises `Refusal` and rolls everything back. No `await` happens
inside a transaction, so on the trio loop nothing interleaves with it.

Every write endpoint that changes the tree (commit, restore a version,
restore from trash) carries an idempotency key. Its answer is stored with
the transaction that applied it, so a retry with the same key and the same
request gets the original answer and changes nothing; the same key with a
different request is refused.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from remote import protocol
from remote.protocol import ChunkRef, Entry, ProtocolError, Version
from remote.server.storage import Library, MetadataStore, StoredCommit

MAX_KEY_LENGTH = 200
MAX_DEVICE_LENGTH = 200
MAX_TARGET_BYTES = 4096
#: Largest mtime_ns accepted: the int64 range, so every client can store it.
_INT64_MAX = 2**63 - 1


class Refusal(Exception):
    """A request that must be answered with an error status and changes nothing."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.extra}


def bad_request(message: str, code: str = "bad_request") -> Refusal:
    return Refusal(400, code, message)


def conflict(message: str, op_index: int, current: Entry | None) -> Refusal:
    return Refusal(
        409,
        "conflict",
        message,
        op_index=op_index,
        current=current.to_json() if current else None,
    )


@dataclass(slots=True)
class Author:
    """Who is changing the tree, stamped on versions and trash items."""

    user: str
    device: str
    now: float


# --- request shape ----------------------------------------------------------------------

_OP_FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    # kind: (required fields, optional fields), "op" itself excluded
    "create": (
        frozenset({"id", "parent", "name", "kind", "mode", "mtime_ns"}),
        frozenset({"chunks", "target"}),
    ),
    "update": (frozenset({"id", "base", "chunks", "mtime_ns"}), frozenset()),
    "rename": (frozenset({"id", "base", "parent", "name"}), frozenset({"replace", "replace_base"})),
    "setattr": (frozenset({"id", "base"}), frozenset({"mode", "mtime_ns"})),
    "delete": (frozenset({"id", "base"}), frozenset()),
}


def _int(value: object, what: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise bad_request(f"{what} must be an integer in {low}..{high}, not {value!r}")
    return value


def text_field(value: object, what: str, limit: int) -> str:
    """Return `value` if it is a non-empty, valid UTF-8 string of at most `limit` bytes."""
    try:
        size = len(value.encode("utf-8")) if isinstance(value, str) else 0
    except UnicodeEncodeError:
        size = 0
    if not size or size > limit:
        raise bad_request(f"{what} must be a non-empty UTF-8 string of at most {limit} bytes")
    return str(value)


def int_field(value: object, what: str) -> int:
    """Return `value` if it is an integer that fits a signed 64-bit column."""
    return _int(value, what, -_INT64_MAX, _INT64_MAX)


def require_fields(data: dict[str, Any], required: set[str], optional: set[str], what: str) -> None:
    """Refuse missing or unknown fields of a request object, naming them."""
    missing = sorted(required - data.keys())
    if missing:
        raise bad_request(f"{what} lacks required field(s) {', '.join(missing)}", "missing_field")
    unknown = sorted(data.keys() - required - optional)
    if unknown:
        raise bad_request(f"{what} has unknown field(s) {', '.join(unknown)}", "unknown_field")


def check_op(index: int, op: object) -> dict[str, Any]:
    """Validate one op's shape and field types (not its effect on the tree)."""
    where = f"op {index}"
    if not isinstance(op, dict):
        raise bad_request(f"{where} must be a JSON object")
    kind = op.get("op")
    if kind not in _OP_FIELDS:
        raise bad_request(f"{where}: unknown op {kind!r}; expected one of {sorted(_OP_FIELDS)}")
    required, optional = _OP_FIELDS[kind]
    require_fields(op, set(required) | {"op"}, set(optional), f"{where} ({kind})")
    try:
        protocol.validate_id(op["id"])
        if "parent" in op:
            protocol.validate_id(op["parent"])
        if "replace" in op:
            protocol.validate_id(op["replace"])
            _int(op.get("replace_base"), f"{where}: replace_base", 0, _INT64_MAX)
        elif "replace_base" in op:
            raise bad_request(f"{where}: replace_base without replace")
        if "name" in op:
            protocol.validate_name(op["name"])
        if "chunks" in op:
            protocol.chunks_from_json(op["chunks"])
    except ProtocolError as exc:
        raise bad_request(f"{where}: {exc}", exc.code) from None
    for field in ("base",):
        if field in op:
            _int(op[field], f"{where}: {field}", 0, _INT64_MAX)
    if "mode" in op:
        _int(op["mode"], f"{where}: mode", 0, 0o7777)
    if "mtime_ns" in op:
        _int(op["mtime_ns"], f"{where}: mtime_ns", -_INT64_MAX, _INT64_MAX)
    if kind == "create":
        entry_kind = op["kind"]
        if entry_kind not in protocol.ENTRY_KINDS:
            raise bad_request(f"{where}: kind must be file, dir or symlink, not {entry_kind!r}")
        if ("chunks" in op) != (entry_kind == "file"):
            raise bad_request(f"{where}: chunks are required for files and only for files")
        if ("target" in op) != (entry_kind == "symlink"):
            raise bad_request(f"{where}: target is required for symlinks and only for symlinks")
        if entry_kind == "symlink":
            target = text_field(op["target"], f"{where}: target", MAX_TARGET_BYTES)
            if "\x00" in target:
                raise bad_request(f"{where}: target contains NUL")
    return op


def check_commit_body(body: object) -> tuple[str, str, list[dict[str, Any]]]:
    """Validate a commit request's shape; return (key, device, ops)."""
    if not isinstance(body, dict):
        raise bad_request("a commit must be a JSON object")
    require_fields(body, {"key", "device", "ops"}, set(), "commit")
    key = text_field(body["key"], "key", MAX_KEY_LENGTH)
    device = text_field(body["device"], "device", MAX_DEVICE_LENGTH)
    ops = body["ops"]
    if not isinstance(ops, list) or not ops:
        raise bad_request("ops must be a non-empty list")
    if len(ops) > protocol.MAX_OPS_PER_COMMIT:
        raise Refusal(
            413,
            "too_many_ops",
            f"a commit has {len(ops)} ops; the limit is {protocol.MAX_OPS_PER_COMMIT}",
        )
    return key, device, [check_op(i, op) for i, op in enumerate(ops)]


def request_hash(kind: str, body: dict[str, Any]) -> str:
    """Canonical hash of a tree-changing request, to tell a retry from a reused key."""
    canonical = json.dumps({"kind": kind, **body}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def run_idempotent(
    store: MetadataStore,
    library: Library,
    key: str,
    body_hash: str,
    apply: Callable[[], dict[str, Any]],
) -> tuple[dict[str, Any], bool]:
    """Apply once per key in one transaction; return (answer, applied_now)."""
    with store.transaction():
        stored = store.get_commit(library, key)
        if stored is not None:
            if stored.body_hash != body_hash:
                raise Refusal(
                    422,
                    "idempotency_key_reused",
                    f"idempotency key {key!r} was already used for a different request",
                )
            return stored.result, False
        result = apply()
        store.put_commit(library, key, StoredCommit(body_hash, 200, result), time.time())
        return result, True


# --- applying ops -----------------------------------------------------------------------


class TreeEditor:
    """Applies validated ops to one library. Caller must hold a store transaction."""

    def __init__(self, store: MetadataStore, library: Library, author: Author) -> None:
        self.store = store
        self.library = library
        self.author = author

    def apply(self, ops: list[dict[str, Any]]) -> dict[str, Any]:
        entries = [getattr(self, f"_{op['op']}")(i, op).to_json() for i, op in enumerate(ops)]
        return {"revision": self.store.revision(self.library), "entries": entries}

    # --- the five ops

    def _create(self, index: int, op: dict[str, Any]) -> Entry:
        existing = self.store.get_entry(self.library, op["id"])
        if existing is not None:
            raise conflict(f"op {index}: entry {op['id']} already exists", index, existing)
        self._check_parent(index, op["parent"])
        self._check_name_free(index, op["parent"], op["name"])
        entry = Entry(
            id=op["id"],
            parent=op["parent"],
            name=op["name"],
            kind=op["kind"],
            mode=op["mode"],
            mtime_ns=op["mtime_ns"],
            target=op.get("target"),
        )
        if entry.kind == "file":
            entry.manifest, entry.size = self._manifest(index, op["chunks"])
        return self._save(entry, content_changed=entry.kind == "file")

    def _update(self, index: int, op: dict[str, Any]) -> Entry:
        entry = self._current(index, op)
        if entry.kind != "file":
            raise Refusal(
                422, "not_a_file", f"op {index}: entry {entry.id} is a {entry.kind}, not a file"
            )
        entry.manifest, entry.size = self._manifest(index, op["chunks"])
        entry.mtime_ns = op["mtime_ns"]
        return self._save(entry, content_changed=True)

    def _rename(self, index: int, op: dict[str, Any]) -> Entry:
        entry = self._current(index, op)
        if entry.id == protocol.ROOT_ID:
            raise Refusal(422, "root_immutable", f"op {index}: the root cannot be moved")
        parent = self._check_parent(index, op["parent"])
        if entry.kind == "dir":
            self._check_no_cycle(index, entry, parent)
        occupant = self.store.live_child(self.library, op["parent"], op["name"])
        if occupant is not None and occupant.id != entry.id:
            self._replace(index, op, entry, occupant)
        elif "replace" in op:
            current = self.store.get_entry(self.library, op["replace"])
            raise conflict(
                f"op {index}: {op['replace']} to be replaced is no longer at {op['name']!r}",
                index,
                current,
            )
        entry.parent = op["parent"]
        entry.name = op["name"]
        return self._save(entry)

    def _setattr(self, index: int, op: dict[str, Any]) -> Entry:
        entry = self._current(index, op)
        entry.mode = op.get("mode", entry.mode)
        entry.mtime_ns = op.get("mtime_ns", entry.mtime_ns)
        return self._save(entry)

    def _delete(self, index: int, op: dict[str, Any]) -> Entry:
        entry = self._current(index, op)
        if entry.id == protocol.ROOT_ID:
            raise Refusal(422, "root_immutable", f"op {index}: the root cannot be deleted")
        if entry.kind == "dir" and self.store.has_live_children(self.library, entry.id):
            raise conflict(f"op {index}: directory {entry.name!r} is not empty", index, entry)
        entry.deleted = True
        return self._save(entry)

    # --- restores (each its own idempotent request)

    def restore_version(self, entry_id: str, revision: int, base: int) -> Entry:
        entry = self._current(0, {"id": entry_id, "base": base})
        version = next(
            (v for v in self.store.versions(self.library, entry_id) if v.revision == revision),
            None,
        )
        if version is None:
            raise Refusal(
                404, "no_such_version", f"entry {entry_id} has no version at revision {revision}"
            )
        entry.manifest, entry.size, entry.mtime_ns = (
            version.manifest,
            version.size,
            version.mtime_ns,
        )
        return self._save(entry, content_changed=True)

    def undelete(self, entry_id: str) -> Entry:
        entry = self.store.get_entry(self.library, entry_id)
        if entry is None or not entry.deleted or self.store.is_purged(self.library, entry_id):
            raise Refusal(404, "not_in_trash", f"entry {entry_id} is not in the trash")
        parent = self.store.get_entry(self.library, entry.parent or protocol.ROOT_ID)
        if parent is None or parent.kind != "dir":
            entry.parent = protocol.ROOT_ID
        elif parent.deleted:
            self.undelete(parent.id)
        entry.name = self._free_name(entry.parent or protocol.ROOT_ID, entry.name)
        entry.deleted = False
        return self._save(entry)

    # --- helpers

    def _save(self, entry: Entry, *, content_changed: bool = False) -> Entry:
        entry.revision = self.store.next_revision(self.library)
        author = self.author
        self.store.put_entry(
            self.library, entry, user=author.user, device=author.device, now=author.now
        )
        if content_changed and entry.manifest is not None:
            version = Version(
                entry.revision,
                entry.manifest,
                entry.size,
                entry.mtime_ns,
                author.now,
                author.device,
                author.user,
            )
            self.store.add_version(self.library, entry.id, version)
        return replace(entry)

    def _current(self, index: int, op: dict[str, Any]) -> Entry:
        entry = self.store.get_entry(self.library, op["id"])
        if entry is None:
            raise conflict(f"op {index}: entry {op['id']} does not exist", index, None)
        if entry.deleted:
            raise conflict(f"op {index}: entry {entry.name!r} was deleted", index, entry)
        if entry.revision != op["base"]:
            raise conflict(
                f"op {index}: entry {entry.name!r} is at revision {entry.revision},"
                f" the change was made against {op['base']}",
                index,
                entry,
            )
        return entry

    def _check_parent(self, index: int, parent_id: str) -> Entry:
        parent = self.store.get_entry(self.library, parent_id)
        if parent is None or parent.deleted:
            raise conflict(f"op {index}: parent {parent_id} does not exist", index, parent)
        if parent.kind != "dir":
            raise Refusal(
                422,
                "not_a_directory",
                f"op {index}: parent {parent.name!r} is a {parent.kind}, not a directory",
            )
        return parent

    def _check_name_free(self, index: int, parent_id: str, name: str) -> None:
        occupant = self.store.live_child(self.library, parent_id, name)
        if occupant is not None:
            raise conflict(f"op {index}: the name {name!r} is taken", index, occupant)

    def _check_no_cycle(self, index: int, moved: Entry, parent: Entry) -> None:
        node: Entry | None = parent
        while node is not None:
            if node.id == moved.id:
                raise Refusal(
                    422,
                    "cycle",
                    f"op {index}: cannot move directory {moved.name!r} into its own subtree",
                )
            node = self.store.get_entry(self.library, node.parent) if node.parent else None

    def _replace(self, index: int, op: dict[str, Any], moved: Entry, occupant: Entry) -> None:
        if op.get("replace") != occupant.id:
            raise conflict(f"op {index}: the name {op['name']!r} is taken", index, occupant)
        if op.get("replace_base") != occupant.revision:
            raise conflict(
                f"op {index}: {occupant.name!r} to be replaced is at revision"
                f" {occupant.revision}, not {op.get('replace_base')}",
                index,
                occupant,
            )
        if (moved.kind == "dir") != (occupant.kind == "dir"):
            raise Refusal(
                422,
                "type_mismatch",
                f"op {index}: cannot replace a {occupant.kind} with a {moved.kind}",
            )
        if occupant.kind == "dir" and self.store.has_live_children(self.library, occupant.id):
            raise conflict(f"op {index}: directory {occupant.name!r} is not empty", index, occupant)
        occupant.deleted = True
        self._save(occupant)

    def _manifest(self, index: int, chunks_json: object) -> tuple[str, int]:
        chunks: list[ChunkRef] = protocol.chunks_from_json(chunks_json)
        missing = []
        for chunk in chunks:
            size = self.store.chunk_size(self.library, chunk.hash)
            if size is None:
                missing.append(chunk.hash)
            elif size != chunk.length:
                raise Refusal(
                    422,
                    "chunk_length_mismatch",
                    f"op {index}: chunk {chunk.hash} is {size} bytes, not {chunk.length}",
                )
        if missing:
            missing = list(dict.fromkeys(missing))
            raise Refusal(
                422,
                "missing_chunks",
                f"op {index}: the server lacks {len(missing)} chunk(s); upload them first",
                missing=missing,
                op_index=index,
            )
        name = protocol.manifest_hash(chunks)
        self.store.put_manifest(self.library, name, chunks)
        return name, sum(c.length for c in chunks)

    def _free_name(self, parent_id: str, name: str) -> str:
        candidate, n = name, 1
        while self.store.live_child(self.library, parent_id, candidate) is not None:
            suffix = " (restored)" if n == 1 else f" (restored {n})"
            stem, dot, ext = name.rpartition(".")
            base, tail = (stem, dot + ext) if stem else (name, "")
            budget = protocol.MAX_NAME_BYTES - len((suffix + tail).encode())
            base = base.encode()[:budget].decode("utf-8", "ignore")
            candidate, n = base + suffix + tail, n + 1
        return candidate
