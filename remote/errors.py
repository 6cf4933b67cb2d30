"""What can go wrong talking to the sync server, as one exception tree.

The drive needs to tell two situations apart: the server could not be reached
(go offline, keep the journal, probe later) and the server answered "no"
(a conflict to resolve, a permission to report, a bug to log). Everything the
client raises is one of these:

    RemoteError
    +-- ServerUnreachable        refused, reset, timed out, DNS -- after retries
    +-- ServerRefused            the server answered with an error status
        +-- Unauthorized         401: no token or a bad one
        +-- Forbidden            403: a read-only user tried to write
        +-- NotFound             404: no such library (or no role on it), entry, chunk
        +-- CommitConflict       409: a stale base; `current` is the server's entry
        +-- HashMismatch         422 hash_mismatch, or downloaded bytes that do not hash right
        +-- MissingChunks        422 missing_chunks; `missing` lists what to upload first
        +-- PayloadTooLarge      413: a body or chunk over the server's limit
        +-- InsufficientStorage  507: the server's disk is full; nothing was stored, retry later

`refusal_from_response` is the single place that turns an HTTP error answer
into the right class.
"""

from __future__ import annotations

from typing import Any

from remote.protocol import Entry


class RemoteError(Exception):
    """Base of every error the remote client raises."""


class ServerUnreachable(RemoteError):
    """The server could not be reached (after retries): treat as offline.

    `retry_after`: seconds the server asked to be left alone (a 429 or 503 with
    Retry-After), which the drive's probes respect."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ServerRefused(RemoteError):
    """The server answered with an error; `code` is its machine-readable error code."""

    def __init__(self, status: int, code: str, message: str, body: dict[str, Any] | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.body: dict[str, Any] = body if body is not None else {}


class Unauthorized(ServerRefused):
    """401: the token is missing or not valid."""


class Forbidden(ServerRefused):
    """403: the user may read this library but not write it."""


class NotFound(ServerRefused):
    """404: the library (or entry, chunk, manifest) does not exist for this user."""


class CommitConflict(ServerRefused):
    """409 on a commit: op `op_index` was made against a stale base; `current` is the server's entry."""

    def __init__(self, status: int, code: str, message: str, body: dict[str, Any] | None = None):
        super().__init__(status, code, message, body)
        index = self.body.get("op_index")
        self.op_index: int = index if isinstance(index, int) else -1
        current = self.body.get("current")
        self.current: Entry | None = Entry.from_json(current) if isinstance(current, dict) else None


class HashMismatch(ServerRefused):
    """Bytes do not match the hash that names them (server- or client-side check)."""


class MissingChunks(ServerRefused):
    """422 missing_chunks: the commit references chunks the server lacks; upload `missing` first."""

    def __init__(self, status: int, code: str, message: str, body: dict[str, Any] | None = None):
        super().__init__(status, code, message, body)
        missing = self.body.get("missing")
        self.missing: list[str] = [str(h) for h in missing] if isinstance(missing, list) else []


class PayloadTooLarge(ServerRefused):
    """413: the request body or chunk is over the server's limit."""


class InsufficientStorage(ServerRefused):
    """507: the server ran out of disk space; the request changed nothing and may be retried later."""


def refusal_from_response(status: int, body: object) -> ServerRefused:
    """Build the exception for an error answer; `body` is the decoded JSON (or anything else)."""
    data: dict[str, Any] = body if isinstance(body, dict) else {}
    code = str(data.get("error") or f"http_{status}")
    message = str(data.get("message") or f"the server answered HTTP {status}")
    cls: type[ServerRefused]
    if status == 401:
        cls = Unauthorized
    elif status == 403:
        cls = Forbidden
    elif status == 404:
        cls = NotFound
    elif status == 409:
        cls = CommitConflict
    elif status == 413:
        cls = PayloadTooLarge
    elif status == 507:
        cls = InsufficientStorage
    elif code == "hash_mismatch":
        cls = HashMismatch
    elif code == "missing_chunks":
        cls = MissingChunks
    else:
        cls = ServerRefused
    return cls(status, code, message, data)
