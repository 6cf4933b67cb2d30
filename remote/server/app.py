"""The sync server's HTTP API as a plain ASGI application.

One thin handler per endpoint of `remote/PROTOCOL.md`: authenticate, parse
and validate, call the storage interfaces (`MetadataStore`, `ChunkStore`) or
the commit logic, answer JSON. Every refusal is a `Refusal` turned into
`{"error": code, "message": text}` in one place (`__call__`), a full disk
(`StorageFull`) as 507 insufficient_storage; anything else
escaping a handler is a bug, logged and answered 500 as a last resort.
Chunk bytes are hashed, written and read on worker threads so the trio loop
never waits on disk or on BLAKE3 over megabytes. Batch downloads are sent as
one ASGI body message per chunk, never joined into one buffer.

Per-request overhead: the token -> user and name -> library lookups are kept
for `AUTH_CACHE_SECONDS` (found ones only, so a new token or library works at
once); roles are read on every request, so `ferry admin share` applies to the
very next request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio
from cachetools import TTLCache

from remote import protocol
from remote.protocol import ProtocolError
from remote.server import auth
from remote.server.asgi import Receive, Request, Response, Router, Scope, Send
from remote.server.collector import DEFAULT_GRACE, Collected, StoreGate, collect_garbage
from remote.server.commits import (
    MAX_DEVICE_LENGTH,
    MAX_KEY_LENGTH,
    Author,
    Refusal,
    TreeEditor,
    bad_request,
    check_commit_body,
    int_field,
    request_hash,
    require_fields,
    run_idempotent,
    text_field,
)
from remote.server.feed import ChangeNotifier
from remote.server.storage import ChunkStore, Library, MetadataStore, StorageFull, User

log = logging.getLogger(__name__)

DEFAULT_TRASH_RETENTION = 30 * 24 * 3600.0
#: Most bytes one batch download answers with; the client asks again for the rest.
DEFAULT_MAX_BATCH_BYTES = 64 * 1024 * 1024
#: How long a found token or library is remembered without asking SQLite again.
AUTH_CACHE_SECONDS = 10.0


@dataclass(slots=True)
class ServerConfig:
    max_json_body: int = protocol.MAX_JSON_BODY
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES
    trash_retention: float = DEFAULT_TRASH_RETENTION
    #: Chunks younger than this are never collected (remote/server/collector.py).
    gc_grace: float = DEFAULT_GRACE


@dataclass(slots=True)
class Caller:
    """An authenticated request on one library."""

    user: User
    library: Library
    role: str


class FerryApp:
    """The ASGI callable: `hypercorn.trio.serve(FerryApp(...), config)`."""

    def __init__(
        self, meta: MetadataStore, chunks: ChunkStore, config: ServerConfig | None = None
    ) -> None:
        self.meta = meta
        self.chunks = chunks
        self.config = config or ServerConfig()
        self.notifier = ChangeNotifier()
        self._write_lock = trio.Lock()
        #: Chunk uploads and the garbage collector take turns (remote/server/collector.py).
        self.store_gate = StoreGate()
        self._users: TTLCache[str, User] = TTLCache(maxsize=1024, ttl=AUTH_CACHE_SECONDS)
        self._libraries: TTLCache[str, Library] = TTLCache(maxsize=1024, ttl=AUTH_CACHE_SECONDS)
        self.router = Router()
        lib = "/v1/libraries/{library}"
        for method, pattern, handler in [
            ("GET", "/v1/capabilities", self.capabilities),
            ("GET", "/v1/libraries", self.list_libraries),
            ("GET", lib, self.library_info),
            ("GET", lib + "/changes", self.changes),
            ("POST", lib + "/chunks/missing", self.missing_chunks),
            ("POST", lib + "/chunks/batch", self.chunk_batch),
            ("POST", lib + "/chunks/upload", self.upload_chunks),
            ("PUT", lib + "/chunks/{chunk}", self.put_chunk),
            ("GET", lib + "/chunks/{chunk}", self.get_chunk),
            ("POST", lib + "/manifests/batch", self.manifest_batch),
            ("GET", lib + "/manifests/{manifest}", self.get_manifest),
            ("POST", lib + "/commit", self.commit),
            ("GET", lib + "/entries/{entry}", self.get_entry),
            ("GET", lib + "/entries/{entry}/versions", self.versions),
            ("POST", lib + "/entries/{entry}/restore", self.restore_version),
            ("GET", lib + "/trash", self.trash),
            ("POST", lib + "/trash/{entry}/restore", self.undelete),
        ]:
            self.router.add(method, pattern, handler)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        try:
            handler, params = self.router.match(request.method, request.path)
            response = await handler(request, **params)
        except Refusal as refusal:
            response = Response.error(refusal)
        except ProtocolError as exc:
            response = Response.error(Refusal(400, exc.code, str(exc)))
        except StorageFull as exc:
            log.error(
                "refused %s %s: %s; free space on the server", request.method, request.path, exc
            )
            response = Response.error(
                Refusal(
                    507,
                    "insufficient_storage",
                    f"{request.method} {request.path}: the server is out of disk space;"
                    " nothing was stored, try again later",
                )
            )
        except Exception:
            log.exception("bug: %s %s failed unexpectedly", request.method, request.path)
            response = Response.error(
                Refusal(500, "internal_error", "the server failed; see its log")
            )
        await response.send(send, head=request.method == "HEAD")

    # --- authentication -----------------------------------------------------------------

    def _user(self, request: Request) -> User:
        """The token's user (cached by token hash, so no raw token outlives its request)."""
        token = auth.bearer_token(request.header("authorization"))
        token_hash = auth.hash_token(token) if token else None
        user = self._users.get(token_hash) if token_hash else None
        if token_hash and user is None:
            user = self.meta.user_for_token(token_hash)
            if user is not None:
                self._users[token_hash] = user
        if user is None:
            raise Refusal(401, "unauthorized", "a valid 'Authorization: Bearer TOKEN' is required")
        return user

    def _library(self, name: str) -> Library | None:
        found = self._libraries.get(name)
        if found is None:
            found = self.meta.get_library(name)
            if found is not None:
                self._libraries[name] = found
        return found

    def _caller(self, request: Request, library: str, *, write: bool = False) -> Caller:
        user = self._user(request)
        found = self._library(library)
        role = self.meta.role_of(found, user) if found else None
        if found is None or role is None:
            raise Refusal(404, "no_such_library", f"there is no library {library!r}")
        if write and not auth.can_write(role):
            raise Refusal(403, "read_only", f"user {user.name!r} may only read library {library!r}")
        return Caller(user, found, role)

    # --- libraries ----------------------------------------------------------------------

    async def capabilities(self, request: Request) -> Response:
        return Response.json(
            {
                "protocol": protocol.PROTOCOL_VERSION,
                "hash": protocol.HASH_NAME,
                "min_chunk_size": protocol.MIN_CHUNK_SIZE,
                "avg_chunk_size": protocol.AVG_CHUNK_SIZE,
                "max_chunk_size": protocol.MAX_CHUNK_SIZE,
                "max_json_body": self.config.max_json_body,
                "max_batch_bytes": self.config.max_batch_bytes,
                "max_upload_chunks": protocol.MAX_UPLOAD_CHUNKS,
                "max_ops_per_commit": protocol.MAX_OPS_PER_COMMIT,
                "max_hashes_per_query": protocol.MAX_HASHES_PER_QUERY,
                "max_feed_page": protocol.MAX_FEED_PAGE,
                "max_wait_seconds": protocol.MAX_WAIT_SECONDS,
                "trash_retention_seconds": self.config.trash_retention,
            }
        )

    async def list_libraries(self, request: Request) -> Response:
        user = self._user(request)
        libraries = [
            {"name": lib.name, "role": role} for lib, role in self.meta.libraries_for(user)
        ]
        return Response.json({"libraries": libraries})

    async def library_info(self, request: Request, library: str) -> Response:
        caller = self._caller(request, library)
        return Response.json(
            {
                "name": caller.library.name,
                "role": caller.role,
                "root": protocol.ROOT_ID,
                "revision": self.meta.revision(caller.library),
            }
        )

    # --- change feed --------------------------------------------------------------------

    async def changes(self, request: Request, library: str) -> Response:
        caller = self._caller(request, library)
        cursor = request.int_param("cursor", 0, 0, 2**63 - 1)
        limit = request.int_param("limit", 1000, 1, protocol.MAX_FEED_PAGE)
        wait = request.float_param("wait", 0.0, 0.0, protocol.MAX_WAIT_SECONDS)
        current = self.meta.revision(caller.library)
        if cursor > current:
            raise Refusal(
                422,
                "cursor_ahead",
                f"cursor {cursor} is ahead of library {library!r} (revision {current});"
                " resync from cursor 0",
            )
        # Take the event before reading: a commit between the read and the
        # wait then still wakes us (no await separates the two).
        changed = self.notifier.event(caller.library.id)
        page = self._feed_page(caller.library, cursor, limit)
        if not page["entries"] and wait > 0:
            with trio.move_on_after(wait):
                await changed.wait()
            page = self._feed_page(caller.library, cursor, limit)
        return Response.json(page)

    def _feed_page(self, library: Library, cursor: int, limit: int) -> dict[str, Any]:
        entries = self.meta.changes(library, cursor, limit + 1)
        more = len(entries) > limit
        entries = entries[:limit]
        new_cursor = entries[-1].revision if more else max(cursor, self.meta.revision(library))
        return {"entries": [e.to_json() for e in entries], "cursor": new_cursor, "more": more}

    # --- chunks and manifests -----------------------------------------------------------

    async def _hash_list(self, request: Request) -> list[str]:
        body = await request.json(self.config.max_json_body)
        require_fields(body, {"hashes"}, set(), f"{request.method} {request.path}")
        hashes = body["hashes"]
        if not isinstance(hashes, list):
            raise bad_request("hashes must be a list")
        if len(hashes) > protocol.MAX_HASHES_PER_QUERY:
            raise Refusal(
                413,
                "too_many_hashes",
                f"{len(hashes)} hashes asked; the limit is {protocol.MAX_HASHES_PER_QUERY}",
            )
        return [protocol.validate_hash(h) for h in hashes]

    async def missing_chunks(self, request: Request, library: str) -> Response:
        caller = self._caller(request, library)
        hashes = await self._hash_list(request)
        return Response.json({"missing": self.meta.missing_chunks(caller.library, hashes)})

    async def put_chunk(self, request: Request, library: str, chunk: str) -> Response:
        caller = self._caller(request, library, write=True)
        protocol.validate_hash(chunk)
        data = await request.body(protocol.MAX_CHUNK_SIZE)
        if not data:
            raise bad_request(f"chunk {chunk}: an empty body is not a chunk", "empty_chunk")
        actual = await trio.to_thread.run_sync(protocol.hash_bytes, data)
        if actual != chunk:
            raise Refusal(
                422,
                "hash_mismatch",
                f"chunk {chunk}: the {len(data)} bytes sent hash to {actual}",
            )
        if self.meta.chunk_size(caller.library, chunk) is None:

            def store() -> None:
                # Bytes first, then the row that makes them visible to this library.
                self.chunks.put(chunk, data)
                self.meta.add_chunk(caller.library, chunk, len(data))

            async with self.store_gate.storing():
                await trio.to_thread.run_sync(store)
        return Response.json({"hash": chunk, "size": len(data)})

    async def upload_chunks(self, request: Request, library: str) -> Response:
        """Several chunks in one request: all verified, then stored with one fsync pass.

        A PUT per chunk costs a request and three fsyncs (file, directory, SQLite)
        each; here the new chunks of a batch are written, fsynced together, renamed,
        their directories fsynced once each, and recorded in one transaction.
        Any chunk that does not match its hash refuses the whole batch.
        """
        caller = self._caller(request, library, write=True)
        refs = _upload_refs(request, self.config.max_batch_bytes)
        data = await request.body(sum(length for _, length in refs))
        if len(data) != sum(length for _, length in refs):
            raise bad_request(
                f"the body has {len(data)} bytes; X-Ferry-Lengths adds up to"
                f" {sum(length for _, length in refs)}"
            )
        views, offset = [], 0
        view = memoryview(data)
        for _, length in refs:
            views.append(view[offset : offset + length])
            offset += length
        actual = await trio.to_thread.run_sync(lambda: [protocol.hash_bytes(v) for v in views])
        for (chunk, length), got in zip(refs, actual, strict=True):
            if got != chunk:
                raise Refusal(
                    422, "hash_mismatch", f"chunk {chunk}: the {length} bytes sent hash to {got}"
                )
        new: dict[str, memoryview] = {}
        for (chunk, _), piece in zip(refs, views, strict=True):
            if chunk not in new and self.meta.chunk_size(caller.library, chunk) is None:
                new[chunk] = piece

        def store() -> None:
            # Bytes first (all durable), then the rows that make them visible to this library.
            self.chunks.put_many(list(new.items()))
            self.meta.add_chunks(caller.library, [(h, len(v)) for h, v in new.items()])

        if new:
            async with self.store_gate.storing():
                await trio.to_thread.run_sync(store)
        return Response.json({"received": len(refs), "stored": len(new)})

    async def get_chunk(self, request: Request, library: str, chunk: str) -> Response:
        caller = self._caller(request, library)
        protocol.validate_hash(chunk)
        size = self.meta.chunk_size(caller.library, chunk)
        if size is None:
            raise Refusal(404, "no_such_chunk", f"library {library!r} has no chunk {chunk}")
        etag = f'"{chunk}"'
        headers = [
            ("etag", etag),
            ("cache-control", "public, max-age=31536000, immutable"),
            ("accept-ranges", "bytes"),
            ("content-type", "application/octet-stream"),
        ]
        if request.header("if-none-match") in (etag, "*"):
            return Response(304, b"", headers)
        wanted = _parse_range(request.header("range"), size)
        if wanted is None:
            data = await trio.to_thread.run_sync(self.chunks.get, chunk)
            return Response(200, data, headers)
        start, end = wanted
        if start >= size or start > end:
            return Response(
                416,
                b'{"error":"range_not_satisfiable","message":"the range is outside the chunk"}',
                [("content-range", f"bytes */{size}"), ("content-type", "application/json")],
            )
        end = min(end, size - 1)
        data = await trio.to_thread.run_sync(self.chunks.get_range, chunk, start, end - start + 1)
        headers.append(("content-range", f"bytes {start}-{end}/{size}"))
        return Response(206, data, headers)

    async def chunk_batch(self, request: Request, library: str) -> Response:
        caller = self._caller(request, library)
        hashes = await self._hash_list(request)
        if not hashes:
            raise bad_request("hashes must not be empty")
        sizes = [self.meta.chunk_size(caller.library, h) for h in hashes]
        missing = [h for h, size in zip(hashes, sizes, strict=True) if size is None]
        if missing:
            raise Refusal(
                404,
                "no_such_chunk",
                f"library {library!r} lacks {len(missing)} of the chunks asked for",
                missing=missing,
            )
        take, total = 0, 0
        for size in sizes:
            if take and total + (size or 0) > self.config.max_batch_bytes:
                break
            take, total = take + 1, total + (size or 0)
        chosen = hashes[:take]
        data = await trio.to_thread.run_sync(lambda: [self.chunks.get(h) for h in chosen])
        lengths = ",".join(str(len(d)) for d in data)
        return Response(
            200,
            headers=[("content-type", "application/octet-stream"), ("x-ferry-lengths", lengths)],
            parts=data,
        )

    async def get_manifest(self, request: Request, library: str, manifest: str) -> Response:
        caller = self._caller(request, library)
        protocol.validate_hash(manifest)
        chunks = self.meta.get_manifest(caller.library, manifest)
        if chunks is None:
            raise Refusal(
                404, "no_such_manifest", f"library {library!r} has no manifest {manifest}"
            )
        return Response.json(
            {
                "hash": manifest,
                "size": sum(c.length for c in chunks),
                "chunks": protocol.chunks_to_json(chunks),
            }
        )

    async def manifest_batch(self, request: Request, library: str) -> Response:
        """Many manifests in one answer (a cold copy of a directory of small files needs them all).

        Manifests the library lacks, and those past MAX_BATCH_MANIFEST_CHUNKS
        chunk references, are left out; the client asks for those one by one.
        """
        caller = self._caller(request, library)
        hashes = await self._hash_list(request)
        found: dict[str, list[list[Any]]] = {}
        refs = 0
        for manifest in dict.fromkeys(hashes):
            chunks = self.meta.get_manifest(caller.library, manifest)
            if chunks is None:
                continue
            if found and refs + len(chunks) > protocol.MAX_BATCH_MANIFEST_CHUNKS:
                break
            refs += len(chunks)
            found[manifest] = protocol.chunks_to_json(chunks)
        return Response.json({"manifests": found})

    # --- commits ------------------------------------------------------------------------

    async def commit(self, request: Request, library: str) -> Response:
        caller = self._caller(request, library, write=True)
        body = await request.json(self.config.max_json_body)
        key, device, ops = check_commit_body(body)
        editor = TreeEditor(
            self.meta, caller.library, Author(caller.user.name, device, time.time())
        )
        return await self._idempotent(
            caller, key, request_hash("commit", body), lambda: editor.apply(ops)
        )

    async def _idempotent(
        self, caller: Caller, key: str, body_hash: str, apply: Callable[[], dict[str, Any]]
    ) -> Response:
        """Run a tree change once per key, on a worker thread (its COMMIT fsyncs).

        Writers take turns through `_write_lock` instead of queueing inside
        SQLite; readers on the loop thread keep going and see the commit
        whole once it is done.
        """
        async with self._write_lock:
            result, applied = await trio.to_thread.run_sync(
                run_idempotent, self.meta, caller.library, key, body_hash, apply
            )
        if applied:
            self.notifier.notify(caller.library.id)
        return Response.json(result)

    async def _keyed_body(
        self, request: Request, extra: set[str]
    ) -> tuple[dict[str, Any], str, str]:
        body = await request.json(self.config.max_json_body)
        require_fields(body, {"key", "device"} | extra, set(), f"{request.method} {request.path}")
        key = text_field(body["key"], "key", MAX_KEY_LENGTH)
        device = text_field(body["device"], "device", MAX_DEVICE_LENGTH)
        return body, key, device

    # --- entries, versions, trash -------------------------------------------------------

    async def get_entry(self, request: Request, library: str, entry: str) -> Response:
        caller = self._caller(request, library)
        found = self.meta.get_entry(caller.library, protocol.validate_id(entry))
        if found is None:
            raise Refusal(404, "no_such_entry", f"library {library!r} has no entry {entry}")
        return Response.json(found.to_json())

    async def versions(self, request: Request, library: str, entry: str) -> Response:
        caller = self._caller(request, library)
        if self.meta.get_entry(caller.library, protocol.validate_id(entry)) is None:
            raise Refusal(404, "no_such_entry", f"library {library!r} has no entry {entry}")
        versions = self.meta.versions(caller.library, entry)
        return Response.json({"versions": [_version_json(v) for v in versions]})

    async def restore_version(self, request: Request, library: str, entry: str) -> Response:
        caller = self._caller(request, library, write=True)
        protocol.validate_id(entry)
        body, key, device = await self._keyed_body(request, {"revision", "base"})
        for field in ("revision", "base"):
            int_field(body[field], field)
        editor = TreeEditor(
            self.meta, caller.library, Author(caller.user.name, device, time.time())
        )
        body_hash = request_hash("restore_version", {**body, "entry": entry})
        return await self._idempotent(
            caller,
            key,
            body_hash,
            lambda: editor.restore_version(entry, body["revision"], body["base"]).to_json(),
        )

    async def trash(self, request: Request, library: str) -> Response:
        caller = self._caller(request, library)
        since = time.time() - self.config.trash_retention
        items = self.meta.trash(caller.library, since)
        return Response.json({"entries": [item.to_json() for item in items]})

    async def undelete(self, request: Request, library: str, entry: str) -> Response:
        caller = self._caller(request, library, write=True)
        protocol.validate_id(entry)
        body, key, device = await self._keyed_body(request, set())
        editor = TreeEditor(
            self.meta, caller.library, Author(caller.user.name, device, time.time())
        )
        body_hash = request_hash("undelete", {**body, "entry": entry})
        return await self._idempotent(
            caller, key, body_hash, lambda: editor.undelete(entry).to_json()
        )

    async def purge_trash(self) -> int:
        """Drop trash items older than the retention period; returns how many."""
        before = time.time() - self.config.trash_retention
        async with self._write_lock:
            return await trio.to_thread.run_sync(self.meta.purge_trash, before)

    async def collect_garbage(self) -> Collected:
        """Delete chunks nothing refers to (older than the configured grace)."""
        return await collect_garbage(
            self.meta, self.chunks, self.store_gate, self._write_lock, self.config.gc_grace
        )


def _version_json(version: protocol.Version) -> dict[str, Any]:
    return {
        "revision": version.revision,
        "manifest": version.manifest,
        "size": version.size,
        "mtime_ns": version.mtime_ns,
        "committed_at": version.committed_at,
        "device": version.device,
        "user": version.user,
    }


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a single `bytes=` range, or None to send the whole chunk.

    Multi-range and unparseable headers are ignored, as RFC 9110 allows.
    """
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first, dash, last = header[6:].strip().partition("-")
    if not dash:
        return None
    try:
        if not first:
            suffix = int(last)
            return (max(0, size - suffix), size - 1) if suffix > 0 else (size, size)
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start < 0 or end < 0:
        return None
    return start, end


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _upload_refs(request: Request, max_bytes: int) -> list[tuple[str, int]]:
    """The (hash, length) list of a chunk upload, from X-Ferry-Hashes and X-Ferry-Lengths."""
    hashes = [h.strip() for h in (request.header("x-ferry-hashes") or "").split(",") if h.strip()]
    raw = [n.strip() for n in (request.header("x-ferry-lengths") or "").split(",") if n.strip()]
    if not hashes or len(hashes) != len(raw):
        raise bad_request(
            "X-Ferry-Hashes and X-Ferry-Lengths must list the same, non-zero number of chunks"
        )
    if len(hashes) > protocol.MAX_UPLOAD_CHUNKS:
        raise Refusal(
            413,
            "too_many_hashes",
            f"{len(hashes)} chunks in one upload; the limit is {protocol.MAX_UPLOAD_CHUNKS}",
        )
    if not all(n.isdigit() for n in raw):
        raise bad_request("X-Ferry-Lengths must be decimal byte counts")
    lengths = [int(n) for n in raw]
    for chunk, length in zip(hashes, lengths, strict=True):
        protocol.validate_hash(chunk)
        if length == 0:
            raise bad_request(f"chunk {chunk}: an empty chunk is not a chunk", "empty_chunk")
        if length > protocol.MAX_CHUNK_SIZE:
            raise Refusal(
                413,
                "payload_too_large",
                f"chunk {chunk} is {length} bytes; the limit is {protocol.MAX_CHUNK_SIZE}",
            )
    if sum(lengths) > max_bytes:
        raise Refusal(
            413,
            "payload_too_large",
            f"an upload of {sum(lengths)} bytes; the limit is {max_bytes} (max_batch_bytes)",
        )
    return list(zip(hashes, lengths, strict=True))
