"""Wider TLS reads for hypercorn's trio worker.

hypercorn reads a connection with `stream.receive_some(MAX_RECV)` and hands
each piece to h11 as one event. Over TLS a trio `SSLStream` returns at most
one TLS record (16 KiB) per call however much is asked for, so a 1 GiB
upload became 65,536 rounds through hypercorn and h11: the server spent 13.3
CPU s/GiB receiving chunks over https:// against 4.3 over http://, and
uploads ran at 62 MB/s against 138 (loopback, 128 MiB in 8 MiB batches).

`install()` makes the worker wrap each TLS stream so that a read returns
every record already decrypted and waiting, up to the size asked for,
without waiting on the socket for more. It reads trio's private
`_ssl_object` between awaits, as trio's own methods do; if a trio release
renames it, reads fall back to one record each (correct, only slower).
"""

from __future__ import annotations

import ssl
from typing import Any

import trio


class _WideReads:
    """A trio SSLStream whose receive_some also returns the records behind the first."""

    def __init__(self, inner: trio.SSLStream[Any]) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self._inner.receive_some(max_bytes)
        tls = getattr(self._inner, "_ssl_object", None)
        if not data or max_bytes is None or tls is None:
            return data
        parts, size = [data], len(data)
        while size < max_bytes:
            try:
                more = tls.read(max_bytes - size)
            except ssl.SSLError:  # nothing more decrypted yet; errors show on the next read
                break
            if not more:
                break
            parts.append(more)
            size += len(more)
        return data if len(parts) == 1 else b"".join(parts)


def install() -> None:
    """Make hypercorn's trio worker read TLS connections through `_WideReads`."""
    import hypercorn.trio.run
    from hypercorn.trio.tcp_server import TCPServer

    if getattr(hypercorn.trio.run.TCPServer, "wide_tls_reads", False):
        return

    class WideTLSTCPServer(TCPServer):
        wide_tls_reads = True

        def __init__(self, *args: Any) -> None:
            *rest, stream = args
            if isinstance(stream, trio.SSLStream):
                stream = _WideReads(stream)
            super().__init__(*rest, stream)

    hypercorn.trio.run.TCPServer = WideTLSTCPServer  # type: ignore[misc]
