"""The drive's HTTP client for one library on a ferry sync server.

One `httpx.AsyncClient` (one connection pool) per `RemoteClient`, running on
trio. Every method maps to one endpoint of `remote/PROTOCOL.md` and returns
the shared types of `remote.protocol`. Transient failures (connection
refused/reset, timeouts, 502/503/504) are retried with backoff and end as
`ServerUnreachable`; any other error answer becomes the matching
`ServerRefused` subclass (see `remote.errors`). Downloaded chunk bytes are
verified against the hash they were asked for before they are returned.

The pool is tuned for megabyte bodies (see `wide_read_transport`): httpcore
reads a response 64 KiB at a time, and each read is a round through h11 and
the trio loop; reading up to `READ_BYTES` at once cut the client's CPU per
downloaded MiB by a quarter to a half in `tools/bench_server.py` runs. Idle
connections are kept for `KEEPALIVE_SECONDS`, below the server's 75 s, so a
reader that pauses between files does not pay a new connection.
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit

import httpcore
import httpx
import trio

from remote import protocol, transport_policy
from remote.chunk_download import RawChunkDownloads, RawDownloadFailed
from remote.errors import HashMismatch, ServerUnreachable, refusal_from_response
from remote.protocol import ChangePage, ChunkRef, CommitResult, Entry, Version
from remote.retry import RETRY_AFTER_INLINE, TRANSIENT_STATUSES, Backoff, retry_after_seconds

log = logging.getLogger(__name__)

#: Buffers at least this large are hashed on a worker thread, off the trio loop.
_THREAD_HASH_BYTES = 256 * 1024
#: Most bytes one socket read takes; a 1 MiB chunk then arrives in a few reads, not 16+.
READ_BYTES = 1024 * 1024
#: How long an idle pooled connection is kept (the server closes its side after 75 s).
KEEPALIVE_SECONDS = 60.0
#: Connections kept open per client: read-ahead, batch fetches and uploads run side by side.
MAX_CONNECTIONS = 16


@dataclass
class TransferStats:
    """Counters for benchmarks and `ferry status`: requests made and bytes moved (approximate)."""

    requests: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


def split_library_url(url: str) -> tuple[str, str]:
    """Split `http://host:port/LIBRARY` into (`http://host:port`, `LIBRARY`)."""
    parts = urlsplit(url)
    library = parts.path.strip("/")
    if not parts.scheme or not parts.netloc or not library or "/" in library:
        raise ValueError(f"{url!r} is not a library URL of the form http://HOST:PORT/LIBRARY")
    return f"{parts.scheme}://{parts.netloc}", library


async def verify_chunk(chunk_hash: str, data: bytes) -> None:
    """Raise HashMismatch unless `data` hashes to `chunk_hash` (big buffers hash off-loop)."""
    if len(data) >= _THREAD_HASH_BYTES:
        actual = await trio.to_thread.run_sync(protocol.hash_bytes, data)
    else:
        actual = protocol.hash_bytes(data)
    if actual != chunk_hash:
        raise HashMismatch(
            200,
            "hash_mismatch",
            f"chunk {chunk_hash} downloaded as {len(data)} bytes hashing to {actual}",
        )


class RemoteClient:
    """An authenticated connection to one library; use as `async with RemoteClient(...) as c`."""

    def __init__(
        self,
        server_url: str,
        library: str,
        token: str,
        *,
        timeout: float = 30.0,
        retries: int = 3,
        transport: httpx.AsyncBaseTransport | None = None,
        backoff: Backoff | None = None,
        insecure_http: bool = False,
        ca_file: Path | None = None,
    ) -> None:
        """Raise `TransportRefused` for a URL the token must not go to (`remote.transport_policy`).

        An injected `transport` (tests, the in-process server) decides itself
        where requests go, so the URL is then only a label and is not checked.
        """
        ssl_context = None
        if transport is None:
            transport_policy.check_url(server_url, insecure_http=insecure_http)
            ssl_context = transport_policy.ssl_context(server_url, ca_file)
            transport = wide_read_transport(ssl_context)
        self.server_url = server_url.rstrip("/")
        self.library = library
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff or Backoff()
        self.stats = TransferStats()
        self._lib_path = protocol.library_path(quote(library, safe=""))
        self._http = httpx.AsyncClient(
            base_url=self.server_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(timeout),
            transport=transport,
        )
        #: Chunk GETs skip httpx (see remote/chunk_download.py); tests that inject a
        #: transport get none, so every request goes where they route it.
        self._raw = (
            RawChunkDownloads.for_url(
                self.server_url, token, timeout=timeout, max_body=protocol.MAX_CHUNK_SIZE,
                keepalive=KEEPALIVE_SECONDS, max_idle=MAX_CONNECTIONS, ssl_context=ssl_context,
            )
            if type(transport) is httpx.AsyncHTTPTransport
            else None
        )  # fmt: skip

    async def aclose(self) -> None:
        if self._raw is not None:
            await self._raw.aclose()
        await self._http.aclose()

    async def __aenter__(self) -> RemoteClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # --- the endpoints ---------------------------------------------------------------

    async def capabilities(self) -> dict[str, Any]:
        return (await self._request("GET", "/v1/capabilities")).json()

    async def library_info(self) -> dict[str, Any]:
        return (await self._request("GET", self._lib_path)).json()

    async def changes(self, cursor: int, *, wait: float = 0, limit: int = 1000) -> ChangePage:
        """One page of the change feed after `cursor`; with `wait`, long-poll up to that long."""
        params: dict[str, Any] = {"cursor": cursor, "limit": limit}
        timeout = None
        if wait > 0:
            params["wait"] = wait
            timeout = httpx.Timeout(self.timeout, read=wait + self.timeout)
        data = (
            await self._request(
                "GET", f"{self._lib_path}/changes", params=params, http_timeout=timeout
            )
        ).json()
        return ChangePage(
            entries=[Entry.from_json(e) for e in data["entries"]],
            cursor=int(data["cursor"]),
            more=bool(data["more"]),
        )

    async def missing_chunks(self, hashes: Sequence[str]) -> list[str]:
        """The subset of `hashes` the server lacks for this library (queried in batches)."""
        missing: list[str] = []
        for start in range(0, len(hashes), protocol.MAX_HASHES_PER_QUERY):
            batch = list(hashes[start : start + protocol.MAX_HASHES_PER_QUERY])
            response = await self._request(
                "POST", f"{self._lib_path}/chunks/missing", json={"hashes": batch}
            )
            missing.extend(response.json()["missing"])
        return missing

    async def put_chunk(self, chunk_hash: str, data: bytes) -> None:
        await self._request(
            "PUT",
            f"{self._lib_path}/chunks/{chunk_hash}",
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )

    async def put_chunks(self, chunks: Sequence[tuple[str, bytes | memoryview]]) -> None:
        """Upload several chunks in one request (`chunks/upload`, at most MAX_UPLOAD_CHUNKS of
        them and `max_batch_bytes` in all): one round trip and one fsync pass on the server."""
        await self._request(
            "POST",
            f"{self._lib_path}/chunks/upload",
            parts=[data for _, data in chunks],
            headers={
                "Content-Type": "application/octet-stream",
                "X-Ferry-Hashes": ",".join(h for h, _ in chunks),
                "X-Ferry-Lengths": ",".join(str(len(data)) for _, data in chunks),
            },
        )

    async def get_chunk(self, chunk_hash: str) -> bytes | bytearray:
        """The chunk's bytes, verified against `chunk_hash` (HashMismatch if they are not)."""
        data = await self.download_chunk(chunk_hash)
        await verify_chunk(chunk_hash, data)
        return data

    async def download_chunk(self, chunk_hash: str) -> bytes | bytearray:
        """The bytes the server sends for `chunk_hash`, NOT verified: the caller must hash them.

        For the chunk cache, which verifies every fetched chunk itself, so a
        download is hashed once. Tries the raw socket path first and asks
        through httpx (retries, error mapping) when that cannot deliver.
        """
        path = f"{self._lib_path}/chunks/{chunk_hash}"
        if self._raw is not None:
            try:
                data = await self._raw.get(path)
            except RawDownloadFailed as exc:
                log.debug("GET %s: %s; asking again through httpx", path, exc)
            else:
                self.stats.requests += 1
                self.stats.bytes_received += len(data)
                return data
        return (await self._request("GET", path)).content

    async def get_chunks(self, hashes: Sequence[str]) -> list[bytes | bytearray]:
        """Many chunks in few round trips, in the order asked, each verified.

        The server answers a prefix of the request when the whole would exceed
        its batch size cap; `download_chunks` asks again for the rest.
        """
        parts = await self.download_chunks(hashes)
        for chunk_hash, data in zip(hashes, parts, strict=True):
            await verify_chunk(chunk_hash, data)
        return parts

    async def download_chunks(self, hashes: Sequence[str]) -> list[bytes | bytearray]:
        """The bytes the server sends for each of `hashes`, in order, NOT verified.

        For read-ahead: several consecutive chunks in one `POST chunks/batch`
        cost the server one request's overhead instead of one each (about
        1.4 ms of CPU per request on hypercorn), which bounds a cold
        sequential read. The chunk cache hashes every chunk it stores, so
        nothing is hashed here. Tries the raw socket path first and asks
        through httpx (retries, error mapping) when that cannot deliver; a
        prefix answer is followed by a request for the rest.
        """
        path = f"{self._lib_path}/chunks/batch"
        out: list[bytes | bytearray] = []
        pending = list(hashes)
        while pending:
            parts = await self._raw_batch(path, pending)
            if parts is None:
                response = await self._request("POST", path, json={"hashes": pending})
                lengths = _parse_lengths(response.headers.get("X-Ferry-Lengths", ""))
                body = response.content
                if not lengths or len(lengths) > len(pending) or sum(lengths) != len(body):
                    raise ServerUnreachable(
                        f"batch download of {len(pending)} chunks returned a malformed answer "
                        f"({len(body)} bytes, lengths {lengths[:5]}...)"
                    )
                starts = [sum(lengths[:i]) for i in range(len(lengths))]
                parts = [body[a : a + n] for a, n in zip(starts, lengths, strict=True)]
            out.extend(parts)
            pending = pending[len(parts) :]
        return out

    async def _raw_batch(self, path: str, hashes: list[str]) -> list[bytearray] | None:
        """A batch answer over the raw path, or None when httpx should ask instead."""
        if self._raw is None:
            return None
        body = json.dumps({"hashes": hashes}, separators=(",", ":")).encode()
        try:
            parts = await self._raw.post_batch(path, body, max_parts=len(hashes))
        except RawDownloadFailed as exc:
            log.debug("POST %s (%d chunks): %s; asking again through httpx", path, len(hashes), exc)
            return None
        self.stats.requests += 1
        self.stats.bytes_received += sum(map(len, parts))
        return parts

    async def get_manifest(self, manifest: str) -> list[ChunkRef]:
        data = (await self._request("GET", f"{self._lib_path}/manifests/{manifest}")).json()
        return protocol.chunks_from_json(data["chunks"])

    async def get_manifests(self, manifests: Sequence[str]) -> dict[str, list[ChunkRef]]:
        """Many manifests in few round trips; the ones the server left out are simply absent."""
        found: dict[str, list[ChunkRef]] = {}
        for start in range(0, len(manifests), protocol.MAX_HASHES_PER_QUERY):
            batch = list(manifests[start : start + protocol.MAX_HASHES_PER_QUERY])
            response = await self._request(
                "POST", f"{self._lib_path}/manifests/batch", json={"hashes": batch}
            )
            for manifest, data in response.json()["manifests"].items():
                chunks = protocol.chunks_from_json(data)
                if manifest not in batch or protocol.manifest_hash(chunks) != manifest:
                    raise HashMismatch(
                        200, "hash_mismatch", f"batch answer holds a wrong manifest {manifest}"
                    )
                found[manifest] = chunks
        return found

    async def commit(self, key: str, ops: list[dict[str, Any]], *, device: str) -> CommitResult:
        """Apply `ops` atomically; safe to retry with the same `key` (applied once)."""
        body = {"key": key, "device": device, "ops": ops}
        data = (await self._request("POST", f"{self._lib_path}/commit", json=body)).json()
        return CommitResult(
            revision=int(data["revision"]), entries=[Entry.from_json(e) for e in data["entries"]]
        )

    async def versions(self, entry_id: str) -> list[Version]:
        """A file's versions, newest first, the current content included."""
        data = (await self._request("GET", f"{self._lib_path}/entries/{entry_id}/versions")).json()
        return [_version_from_json(v) for v in data["versions"]]

    async def restore_version(
        self, entry_id: str, revision: int, *, base: int, key: str, device: str
    ) -> Entry:
        body = {"revision": revision, "base": base, "key": key, "device": device}
        response = await self._request(
            "POST", f"{self._lib_path}/entries/{entry_id}/restore", json=body
        )
        return Entry.from_json(response.json())

    async def trash(self) -> list[Entry]:
        data = (await self._request("GET", f"{self._lib_path}/trash")).json()
        return [Entry.from_json(e) for e in data["entries"]]

    async def undelete(self, entry_id: str, *, key: str, device: str) -> Entry:
        body = {"key": key, "device": device}
        response = await self._request(
            "POST", f"{self._lib_path}/trash/{entry_id}/restore", json=body
        )
        return Entry.from_json(response.json())

    # --- transport -------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: bytes | None = None,
        parts: Sequence[bytes | memoryview] | None = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        http_timeout: httpx.Timeout | None = None,
    ) -> httpx.Response:
        """Send one request, retrying transient failures; return a 2xx response or raise.

        Every request ferry sends may be repeated safely (content-addressed
        uploads, idempotency keys on commits), so all of them are retried.
        `parts`: a body sent piece by piece, never joined: an upload batch is
        8 MiB of chunks already in memory, and h11 passes each `bytes` piece to
        the socket as it is (joining them cost a copy of every uploaded byte).
        """
        if parts is not None:
            headers = {**(headers or {}), "Content-Length": str(sum(len(p) for p in parts))}
        request = self._http.build_request(
            method,
            path,
            json=json,
            content=content,
            params=params,
            headers=headers,
            timeout=http_timeout if http_timeout is not None else httpx.USE_CLIENT_DEFAULT,
        )
        if parts is not None:
            request.stream = _BytesBody(parts)
        elif request.content:
            request.stream = _BytesBody([request.content])
        attempt = 0
        while True:
            self.stats.requests += 1
            self.stats.bytes_sent += _request_size(request)
            asked = None
            try:
                response = await self._http.send(request)
            except httpx.TransportError as exc:
                failure = f"{method} {path}: {transport_policy.describe_failure(exc)}"
            else:
                self.stats.bytes_received += _response_size(response)
                if response.status_code < 400:
                    return response
                if response.status_code not in TRANSIENT_STATUSES:
                    raise refusal_from_response(response.status_code, _json_or_none(response))
                failure = f"{method} {path}: HTTP {response.status_code}"
                asked = retry_after_seconds(response.headers.get("Retry-After"))
                if asked is not None and asked > RETRY_AFTER_INLINE:
                    raise ServerUnreachable(
                        f"{self.server_url} asks to be left alone for {asked:.0f} s: {failure}",
                        retry_after=asked,
                    )
            if attempt >= self.retries:
                raise ServerUnreachable(
                    f"{self.server_url} unreachable after {attempt + 1} attempts: {failure}"
                )
            delay = self.backoff.delay(attempt)
            if asked is not None:
                delay = max(delay, asked)
            log.info("%s; retrying in %.2fs", failure, delay)
            await trio.sleep(delay)
            attempt += 1


def wide_read_transport(ssl_context: ssl.SSLContext | None = None) -> httpx.AsyncHTTPTransport:
    """An httpx transport whose connections read up to READ_BYTES per socket read.

    `ssl_context` verifies https:// servers (None: httpcore's default trust).

    httpx offers no option for httpcore's read size nor for its network
    backend, so the transport's connection pool is replaced by one built the
    same way with a `_WideReads` backend; everything else (pooling, keep-alive,
    h11) stays httpx's and httpcore's own.
    """
    limits = httpx.Limits(
        max_connections=MAX_CONNECTIONS,
        max_keepalive_connections=MAX_CONNECTIONS,
        keepalive_expiry=KEEPALIVE_SECONDS,
    )
    transport = httpx.AsyncHTTPTransport(limits=limits)
    transport._pool = httpcore.AsyncConnectionPool(
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=_WideReads(httpcore.TrioBackend()),
        ssl_context=ssl_context,
    )
    return transport


class _WideReads(httpcore.AsyncNetworkBackend):
    """A trio network backend whose streams read at least READ_BYTES at a time.

    The `timeout` parameters are httpcore's interface, passed through as given.
    """

    def __init__(self, inner: httpcore.AsyncNetworkBackend) -> None:
        self._inner = inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_tcp(
            host, port, timeout=timeout, local_address=local_address, socket_options=socket_options
        )
        return _WideReadStream(stream)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_unix_socket(
            path, timeout=timeout, socket_options=socket_options
        )
        return _WideReadStream(stream)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _WideReadStream(httpcore.AsyncNetworkStream):
    """Delegates to a stream, widening every read to READ_BYTES (h11 buffers the surplus)."""

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner

    async def read(
        self,
        max_bytes: int,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> bytes:
        return await self._inner.read(max(max_bytes, READ_BYTES), timeout=timeout)

    async def write(
        self,
        buffer: bytes,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> None:
        await self._inner.write(buffer, timeout=timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: Any,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.start_tls(
            ssl_context, server_hostname=server_hostname, timeout=timeout
        )
        return _WideReadStream(stream)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _BytesBody(httpx.AsyncByteStream):
    """A request body of known pieces of bytes, iterated without an async generator.

    httpx's own `ByteStream` yields from an async generator; when a connection
    dies mid-upload that generator is left unfinished and trio reports it as
    a ResourceWarning. This iterator has nothing to finalize, and each
    iteration starts from the first piece again, so a retry sends it all.
    """

    def __init__(self, parts: Sequence[bytes | memoryview]) -> None:
        self._parts = parts

    def __aiter__(self) -> _Pieces:  # type: ignore[override]
        return _Pieces(self._parts)


class _Pieces:
    def __init__(self, parts: Sequence[bytes | memoryview]) -> None:
        self._parts = iter(parts)

    def __aiter__(self) -> _Pieces:
        return self

    async def __anext__(self) -> bytes | memoryview:
        for part in self._parts:
            if part:  # h11 sends an empty piece as nothing, httpcore would still await it
                return part
        raise StopAsyncIteration


def _version_from_json(data: dict[str, Any]) -> Version:
    """Build a Version, ignoring fields a newer server may add."""
    return Version(
        revision=int(data["revision"]),
        manifest=str(data["manifest"]),
        size=int(data["size"]),
        mtime_ns=int(data["mtime_ns"]),
        committed_at=float(data["committed_at"]),
        device=str(data["device"]),
        user=str(data["user"]),
    )


def _parse_lengths(header: str) -> list[int]:
    try:
        return [int(x) for x in header.split(",") if x.strip()]
    except ValueError:
        return []


def _json_or_none(response: httpx.Response) -> object:
    try:
        return response.json()
    except ValueError:
        return None


def _request_size(request: httpx.Request) -> int:
    header_bytes = sum(len(k) + len(v) + 4 for k, v in request.headers.raw)
    return header_bytes + int(request.headers.get("Content-Length", "0"))


def _response_size(response: httpx.Response) -> int:
    header_bytes = sum(len(k) + len(v) + 4 for k, v in response.headers.raw)
    return header_bytes + len(response.content)
