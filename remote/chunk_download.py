"""Chunk bodies over plain keep-alive HTTP/1.1 on trio sockets, read straight into one buffer.

A cold sequential read is bounded by CPU per downloaded MiB (client, server
and kernel share the cores), and for megabyte bodies most of the client's
share went to httpx/httpcore/h11: each socket read is an h11 event, a bytes
copy into its receive buffer, another out of it, and a join at the end. Here
a chunk GET is one request write, a small read for the head, and
`recv_into` of the rest into a buffer of the announced Content-Length, so the
body is copied once, by the kernel.

A batch of chunks (`post_batch`, for read-ahead) is one `POST chunks/batch`
with a JSON body; its answer's `X-Ferry-Lengths` header is read before the
body, so each chunk is received straight into a buffer of its own size.

Over https:// the same exchange runs through an `ssl.SSLObject` on memory
BIOs (`_TLSChannel`, with the client's verifying context, so the same
certificates are trusted or refused). httpx over TLS handled one 16 KiB
record per h11 event and managed a tenth of the plain rate (42 vs 502 MB/s
for 4 MiB batches on loopback); trio's SSLStream alone still spent ~55 us
of Python per record (4.1 CPU s/GiB). Here one socket read feeds the BIO
with up to TLS_RECV_BYTES and records are decrypted straight into the body
buffer.

This path only handles the expected answer: `200` with a Content-Length and
no transfer coding. Anything else (an error status, an unexpected header, a
broken or timed-out connection) raises `RawDownloadFailed`, and the caller
asks again through httpx, which owns retries, backoff and error mapping
(`remote.client.RemoteClient.download_chunk`). Nothing here checks the bytes
against the chunk's hash: the caller does (the chunk cache verifies every
fetched chunk before a reader sees it).
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from functools import partial
from urllib.parse import urlsplit

import trio

log = logging.getLogger(__name__)

#: Most bytes of status line and headers accepted (hypercorn sends about 300).
MAX_HEAD_BYTES = 16 * 1024
#: First read of an answer: the head and, usually, the first part of the body.
FIRST_READ_BYTES = 64 * 1024


class RawDownloadFailed(Exception):
    """The raw path could not deliver this body; ask again through httpx. The message says why."""


#: Most bytes of TLS records taken from the socket per read.
TLS_RECV_BYTES = 256 * 1024


class _PlainChannel:
    """A connected trio socket, as `_Connection` uses it."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.socket = sock

    async def send_all(self, data: bytes) -> None:
        await _send_all(self.socket, data)

    async def recv_into(self, view: memoryview) -> int:
        return await self.socket.recv_into(view)


class _TLSChannel:
    """TLS over a trio socket: an `ssl.SSLObject` between two memory BIOs.

    Reads decrypt record after record (16 KiB at most each) out of one
    socket read of up to TLS_RECV_BYTES, into the caller's buffer. Errors are
    `ssl.SSLError` (an OSError): the pool then gives up on the raw path.
    """

    def __init__(self, sock: trio.socket.SocketType, context: ssl.SSLContext, host: str) -> None:
        self.socket = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_hostname=host)

    async def handshake(self) -> None:
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    raise ConnectionResetError(
                        "the server closed the connection in the handshake"
                    ) from None
        await self._flush()

    async def send_all(self, data: bytes) -> None:
        self._tls.write(data)
        await self._flush()

    async def recv_into(self, view: memoryview) -> int:
        """Decrypted bytes into `view` (at most one record's worth); 0 at the end."""
        while True:
            try:
                return self._tls.read(len(view), view)
            except ssl.SSLWantReadError:
                await self._flush()  # e.g. an answer to a post-handshake message
                if not await self._fill():
                    self._incoming.write_eof()
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return 0

    async def _fill(self) -> int:
        data = await self.socket.recv(TLS_RECV_BYTES)
        self._incoming.write(data)
        return len(data)

    async def _flush(self) -> None:
        pending = self._outgoing.read()
        if pending:
            await _send_all(self.socket, pending)


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = await sock.send(view)
        view = view[sent:]


class _Connection:
    """One keep-alive connection (plain or TLS) and when it was last returned to the pool."""

    __slots__ = ("channel", "idle_since")

    def __init__(self, channel: _PlainChannel | _TLSChannel) -> None:
        self.channel = channel
        self.idle_since = time.monotonic()

    def close(self) -> None:
        self.channel.socket.close()


class RawChunkDownloads:
    """A small pool of HTTP/1.1 connections used only for GETs of chunk bodies.

    `get()` takes an idle connection (or opens one), sends the request and
    reads the answer; the connection goes back to the pool only when the
    answer was read completely and the server did not ask to close it, so a
    cancelled or failed read never leaves a half-read connection behind.
    """

    def __init__(
        self,
        host: str,
        port: int,
        authorization: str,
        *,
        timeout: float,
        max_body: int,
        keepalive: float,
        max_idle: int,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._ssl_context = ssl_context
        default_port = 443 if ssl_context is not None else 80
        self._host_header = host if port == default_port else f"{host}:{port}"
        self._authorization = authorization
        self._timeout = timeout
        self._max_body = max_body
        self._keepalive = keepalive
        self._max_idle = max_idle
        self._idle: list[_Connection] = []
        self.requests = 0

    @classmethod
    def for_url(
        cls, server_url: str, token: str, *, timeout: float, max_body: int, keepalive: float,
        max_idle: int, ssl_context: ssl.SSLContext | None = None,
    ) -> RawChunkDownloads | None:  # fmt: skip
        """A pool for `server_url`, or None when the raw path does not apply (neither
        http:// nor https:// with a context to verify the server by)."""
        parts = urlsplit(server_url)
        if not parts.hostname:
            return None
        if parts.scheme == "http":
            ssl_context = None
        elif parts.scheme != "https" or ssl_context is None:
            return None
        return cls(
            parts.hostname, parts.port or (443 if ssl_context else 80), f"Bearer {token}",
            timeout=timeout, max_body=max_body, keepalive=keepalive, max_idle=max_idle,
            ssl_context=ssl_context,
        )  # fmt: skip

    async def get(self, path: str) -> bytearray:
        """The body of a `200` answer to `GET path`; RawDownloadFailed for anything else."""
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {self._host_header}\r\n"
            f"Authorization: {self._authorization}\r\nAccept-Encoding: identity\r\n\r\n"
        ).encode("latin-1")
        (body,) = await self._ask(request, _whole_body)
        return body

    async def post_batch(self, path: str, body: bytes, max_parts: int) -> list[bytearray]:
        """The parts of a `200` answer to `POST path` (JSON `body`), one buffer per length
        in its `X-Ferry-Lengths` header; RawDownloadFailed for anything else, including
        more than `max_parts` lengths or lengths that do not add up to the body."""
        request = (
            f"POST {path} HTTP/1.1\r\nHost: {self._host_header}\r\n"
            f"Authorization: {self._authorization}\r\nAccept-Encoding: identity\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode("latin-1") + body
        return await self._ask(request, partial(_batch_parts, max_parts=max_parts))

    async def _ask(self, request: bytes, split: _Split) -> list[bytearray]:
        """Send `request` on a pooled connection (one fresh try if it was stale) and read
        the answer's body into the buffers `split` chooses from its headers."""
        with trio.move_on_after(self._timeout) as scope:
            conn = self._take_idle()
            if conn is not None:
                try:
                    return await self._exchange(conn, request, split)
                except _StaleConnection:
                    pass  # the server closed it while it idled; one fresh try below
            conn = await self._connect()
            try:
                return await self._exchange(conn, request, split)
            except _StaleConnection as exc:
                raise RawDownloadFailed(f"the server closed the connection: {exc}") from None
        assert scope.cancelled_caught
        raise RawDownloadFailed(f"no complete answer within {self._timeout:.0f}s")

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        await trio.lowlevel.checkpoint()

    # --- internals ---------------------------------------------------------------------

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if now - conn.idle_since < self._keepalive:
                return conn
            conn.close()  # idle too long: the server may be closing it now
        return None

    async def _connect(self) -> _Connection:
        try:
            tcp = await trio.open_tcp_stream(self._host, self._port)
        except OSError as exc:
            raise RawDownloadFailed(f"cannot connect to {self._host}:{self._port}: {exc}") from exc
        if self._ssl_context is None:
            return _Connection(_PlainChannel(tcp.socket))
        channel = _TLSChannel(tcp.socket, self._ssl_context, self._host)
        try:
            await channel.handshake()
        except OSError as exc:  # ssl.SSLError too
            tcp.socket.close()
            # httpx asks again and words the failure (an untrusted certificate, say)
            raise RawDownloadFailed(f"TLS handshake with {self._host} failed: {exc}") from exc
        return _Connection(channel)

    async def _exchange(self, conn: _Connection, request: bytes, split: _Split) -> list[bytearray]:
        """Send `request` and read its answer on `conn`; the connection is pooled or closed."""
        reusable = False
        try:
            parts, reusable = await self._send_and_read(conn, request, split)
            return parts
        except (ConnectionResetError, BrokenPipeError, trio.BrokenResourceError) as exc:
            # the server closed the connection (FIN or RST) before answering: a pooled
            # connection it timed out, which `get` replaces once
            raise _StaleConnection(str(exc) or type(exc).__name__) from exc
        except OSError as exc:
            raise RawDownloadFailed(f"connection failed: {exc}") from exc
        finally:
            if reusable and len(self._idle) < self._max_idle:
                conn.idle_since = time.monotonic()
                self._idle.append(conn)
            else:
                conn.close()

    async def _send_and_read(
        self, conn: _Connection, request: bytes, split: _Split
    ) -> tuple[list[bytearray], bool]:
        """(body parts, whether the connection may carry another request)."""
        self.requests += 1
        await conn.channel.send_all(request)
        head = bytearray(FIRST_READ_BYTES)
        filled = 0
        while (end := head.find(b"\r\n\r\n", 0, filled)) < 0:
            if filled >= MAX_HEAD_BYTES:
                raise RawDownloadFailed(f"answer head longer than {MAX_HEAD_BYTES} bytes")
            n = await conn.channel.recv_into(memoryview(head)[filled:])
            if n == 0:
                if filled == 0:
                    raise _StaleConnection("closed before answering")
                raise RawDownloadFailed("connection closed in the middle of the answer head")
            filled += n
        length, keep_alive, headers = self._parse_head(bytes(head[:end]))
        parts = [bytearray(n) for n in split(length, headers)]
        early = memoryview(head)[end + 4 : filled]
        if len(early) > length:
            raise RawDownloadFailed("the server sent more than its Content-Length")
        got = 0
        for part in parts:
            view = memoryview(part)
            taken = min(len(early), len(part))
            view[:taken] = early[:taken]
            early = early[taken:]
            filled_part = taken
            while filled_part < len(part):
                n = await conn.channel.recv_into(view[filled_part:])
                if n == 0:
                    raise RawDownloadFailed(
                        f"connection closed after {got + filled_part} of {length} body bytes"
                    )
                filled_part += n
            got += len(part)
        return parts, keep_alive

    def _parse_head(self, head: bytes) -> tuple[int, bool, dict[str, str]]:
        """(Content-Length, keep-alive, headers) of a 200 answer; RawDownloadFailed otherwise."""
        lines = head.decode("latin-1").split("\r\n")
        status = lines[0].split(" ", 2)
        if len(status) < 2 or status[0] != "HTTP/1.1" or status[1] != "200":
            raise RawDownloadFailed(f"answer {lines[0][:80]!r} is not a plain 200")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise RawDownloadFailed(f"malformed header line {line[:80]!r}")
            headers[name.strip().lower()] = value.strip()
        if "transfer-encoding" in headers or "content-encoding" in headers:
            raise RawDownloadFailed("the answer uses a transfer or content coding")
        raw_length = headers.get("content-length", "")
        if not raw_length.isdigit():
            raise RawDownloadFailed(f"the answer has no usable Content-Length ({raw_length!r})")
        length = int(raw_length)
        if length > self._max_body:
            raise RawDownloadFailed(f"a body of {length} bytes is larger than this pool accepts")
        return length, headers.get("connection", "").lower() != "close", headers


#: Given an answer's Content-Length and headers: the sizes of the buffers its body fills.
_Split = Callable[[int, dict[str, str]], list[int]]


def _whole_body(length: int, headers: dict[str, str]) -> list[int]:
    return [length]


def _batch_parts(length: int, headers: dict[str, str], *, max_parts: int) -> list[int]:
    """The chunk lengths of a batch answer; RawDownloadFailed unless they add up to the body."""
    raw = headers.get("x-ferry-lengths", "")
    try:
        lengths = [int(n) for n in raw.split(",")]
    except ValueError:
        raise RawDownloadFailed(f"the batch answer has no usable lengths ({raw[:80]!r})") from None
    if not 0 < len(lengths) <= max_parts or min(lengths) < 0 or sum(lengths) != length:
        raise RawDownloadFailed(
            f"the batch answer's lengths ({raw[:80]!r}) do not fit {max_parts} chunks"
            f" in {length} bytes"
        )
    return lengths


class _StaleConnection(Exception):
    """A connection closed before any answer byte: a pooled one the server timed out."""
