"""The wire protocol's vocabulary, shared by the client, the server and the drive.

Everything both sides must agree on lives here and only here: URL shapes,
limits, the JSON form of entries and operations, name and hash validation,
and the canonical manifest encoding whose BLAKE3 hash names a manifest.
`remote/PROTOCOL.md` is the prose description of the same contract; when the
two disagree, this module is right and the document is a bug.

The module is pure (no I/O) so that it can be imported by the cache, the
server and the drive alike, and unit-tested on its own.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import blake3

PROTOCOL_VERSION = 1
HASH_NAME = "blake3"
HASH_HEX_LEN = 64

#: The id of every library's root directory. Entry ids are otherwise chosen by
#: the client that creates the entry (uuid4 hex), so that entries made offline
#: have stable ids before the server has seen them.
ROOT_ID = "0" * 32

MAX_NAME_BYTES = 255
MIN_CHUNK_SIZE = 64 * 1024
AVG_CHUNK_SIZE = 1024 * 1024
MAX_CHUNK_SIZE = 8 * 1024 * 1024
#: Largest JSON request body the server accepts (commit batches, missing-chunk queries).
MAX_JSON_BODY = 16 * 1024 * 1024
MAX_OPS_PER_COMMIT = 10_000
MAX_HASHES_PER_QUERY = 10_000
#: Most chunks one `chunks/upload` request carries (their hashes travel in a header).
MAX_UPLOAD_CHUNKS = 128
MAX_FEED_PAGE = 5_000
#: Most chunk references one `manifests/batch` answer carries; manifests past it are left out.
MAX_BATCH_MANIFEST_CHUNKS = 100_000
MAX_WAIT_SECONDS = 60.0

EntryKind = Literal["file", "dir", "symlink"]
ENTRY_KINDS: frozenset[str] = frozenset({"file", "dir", "symlink"})

_HASH_RE = re.compile(r"\A[0-9a-f]{64}\Z")
_ID_RE = re.compile(r"\A[0-9a-f]{32}\Z")


class ProtocolError(ValueError):
    """A message does not follow the protocol. `code` is the wire error code."""

    def __init__(self, message: str, code: str = "bad_request") -> None:
        super().__init__(message)
        self.code = code


# --- validation -------------------------------------------------------------


def validate_name(name: object) -> str:
    """Return `name` if it is a legal single path component, else raise ProtocolError."""
    if not isinstance(name, str):
        raise ProtocolError("name must be a string", "invalid_name")
    if name in ("", ".", ".."):
        raise ProtocolError(f"name {name!r} is not allowed", "invalid_name")
    if "/" in name or "\x00" in name:
        raise ProtocolError(f"name {name!r} contains '/' or NUL", "invalid_name")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError(f"name {name!r} is not valid UTF-8", "invalid_name") from None
    if len(encoded) > MAX_NAME_BYTES:
        raise ProtocolError(
            f"name is {len(encoded)} bytes long, the limit is {MAX_NAME_BYTES}", "name_too_long"
        )
    return name


def validate_hash(value: object) -> str:
    """Return `value` if it is a lowercase hex BLAKE3 digest, else raise ProtocolError."""
    if not isinstance(value, str) or not _HASH_RE.match(value):
        raise ProtocolError(f"{value!r} is not a {HASH_NAME} hash (64 lowercase hex digits)")
    return value


def validate_id(value: object) -> str:
    """Return `value` if it is an entry id (32 lowercase hex digits), else raise ProtocolError."""
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise ProtocolError(f"{value!r} is not an entry id (32 lowercase hex digits)")
    return value


def hash_bytes(data: bytes | bytearray | memoryview) -> str:
    """The protocol's content hash: BLAKE3, lowercase hex."""
    return blake3.blake3(data).hexdigest()


# --- manifests ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """One piece of a file: the chunk's hash and its length in bytes."""

    hash: str
    length: int


def encode_manifest(chunks: list[ChunkRef]) -> bytes:
    """Canonical bytes of a manifest: per chunk, 32 raw hash bytes then the length as u64 LE."""
    return b"".join(bytes.fromhex(c.hash) + c.length.to_bytes(8, "little") for c in chunks)


def manifest_hash(chunks: list[ChunkRef]) -> str:
    """The name of a manifest: BLAKE3 of its canonical encoding."""
    return hash_bytes(encode_manifest(chunks))


def chunks_to_json(chunks: list[ChunkRef]) -> list[list[Any]]:
    return [[c.hash, c.length] for c in chunks]


def chunks_from_json(value: object) -> list[ChunkRef]:
    """Parse `[[hash, length], ...]`, checking every hash and length."""
    if not isinstance(value, list):
        raise ProtocolError("chunks must be a list of [hash, length] pairs")
    out = []
    for item in value:
        if not (isinstance(item, list) and len(item) == 2):
            raise ProtocolError("each chunk must be a [hash, length] pair")
        length = item[1]
        if not isinstance(length, int) or isinstance(length, bool):
            raise ProtocolError("chunk length must be an integer")
        if not 0 < length <= MAX_CHUNK_SIZE:
            raise ProtocolError(f"chunk length {length} is outside 1..{MAX_CHUNK_SIZE}")
        out.append(ChunkRef(validate_hash(item[0]), length))
    return out


EMPTY_MANIFEST = manifest_hash([])


# --- entries --------------------------------------------------------------------


@dataclass(slots=True)
class Entry:
    """One file, directory or symlink of a library, as the server last committed it.

    `revision` is the library's change sequence number at the entry's last
    change; it is the base revision a client quotes when it changes the entry.
    `mode` holds permission bits only (0o7777); the kind says the file type.
    A deleted entry stays in the feed with `deleted=True` (and in the trash).
    """

    id: str
    parent: str | None
    name: str
    kind: str
    mode: int
    mtime_ns: int
    size: int = 0
    manifest: str | None = None
    target: str | None = None
    revision: int = 0
    deleted: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Entry:
        return cls(
            id=data["id"],
            parent=data.get("parent"),
            name=data["name"],
            kind=data["kind"],
            mode=int(data["mode"]),
            mtime_ns=int(data["mtime_ns"]),
            size=int(data.get("size", 0)),
            manifest=data.get("manifest"),
            target=data.get("target"),
            revision=int(data.get("revision", 0)),
            deleted=bool(data.get("deleted", False)),
        )


@dataclass(slots=True)
class ChangePage:
    """One page of the change feed: entries changed after the cursor, in revision order."""

    entries: list[Entry]
    cursor: int
    more: bool


@dataclass(slots=True)
class CommitResult:
    """The server's answer to a commit: the library revision after it, one entry per op."""

    revision: int
    entries: list[Entry] = field(default_factory=list)


@dataclass(slots=True)
class Version:
    """One historic (or the current) content of a file."""

    revision: int
    manifest: str
    size: int
    mtime_ns: int
    committed_at: float
    device: str
    user: str


# --- commit operations ----------------------------------------------------------
#
# A commit is {"key": idempotency key, "device": str, "ops": [op, ...]}.
# Every op is a JSON object with "op" naming its kind:
#
#   create   id parent name kind mode mtime_ns [chunks (file)] [target (symlink)]
#   update   id base chunks mtime_ns                      new content of a file
#   rename   id base parent name [replace] [replace_base] move and/or rename;
#            "replace" names the entry currently at the target (it is deleted)
#   setattr  id base [mode] [mtime_ns]
#   delete   id base                                      directories must be empty
#
# "base" is the entry revision the change was made against; if the entry's
# current revision differs the whole commit is refused with 409 conflict.

OP_KINDS: frozenset[str] = frozenset({"create", "update", "rename", "setattr", "delete"})


def op_create(
    entry_id: str,
    parent: str,
    name: str,
    kind: str,
    mode: int,
    mtime_ns: int,
    *,
    chunks: list[ChunkRef] | None = None,
    target: str | None = None,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "op": "create",
        "id": entry_id,
        "parent": parent,
        "name": name,
        "kind": kind,
        "mode": mode,
        "mtime_ns": mtime_ns,
    }
    if kind == "file":
        op["chunks"] = chunks_to_json(chunks or [])
    if kind == "symlink":
        op["target"] = target
    return op


def op_update(entry_id: str, base: int, chunks: list[ChunkRef], mtime_ns: int) -> dict[str, Any]:
    return {
        "op": "update",
        "id": entry_id,
        "base": base,
        "chunks": chunks_to_json(chunks),
        "mtime_ns": mtime_ns,
    }


def op_rename(
    entry_id: str,
    base: int,
    parent: str,
    name: str,
    *,
    replace: str | None = None,
    replace_base: int | None = None,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "op": "rename",
        "id": entry_id,
        "base": base,
        "parent": parent,
        "name": name,
    }
    if replace is not None:
        op["replace"] = replace
        op["replace_base"] = replace_base
    return op


def op_setattr(
    entry_id: str, base: int, *, mode: int | None = None, mtime_ns: int | None = None
) -> dict[str, Any]:
    op: dict[str, Any] = {"op": "setattr", "id": entry_id, "base": base}
    if mode is not None:
        op["mode"] = mode
    if mtime_ns is not None:
        op["mtime_ns"] = mtime_ns
    return op


def op_delete(entry_id: str, base: int) -> dict[str, Any]:
    return {"op": "delete", "id": entry_id, "base": base}


# --- URLs -------------------------------------------------------------------------


def library_path(library: str) -> str:
    return f"/v1/libraries/{library}"


def chunk_path(library: str, chunk: str) -> str:
    return f"/v1/libraries/{library}/chunks/{chunk}"
