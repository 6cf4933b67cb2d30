"""Small TCP servers for the fault proxy's tests: echo, source and sink.

`ThreadedUpstream` serves plain blocking sockets from threads, for sync tests;
`TrioUpstream` serves from the test's own trio loop, for trio tests. Both
record the connections they saw and the errors their handlers met, so a test
can tell what reached the far side of the proxy.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from dataclasses import dataclass, field
from functools import partial

import trio

PATTERN = bytes(range(256)) * 4096  # 1 MiB, position-dependent so any skip shows


def pattern(size: int) -> bytes:
    """`size` bytes of a repeating, position-dependent pattern."""
    whole, rest = divmod(size, len(PATTERN))
    return PATTERN * whole + PATTERN[:rest]


class ThreadedUpstream:
    """A thread-per-connection server: `echo` returns what it reads, `source` sends `size` bytes."""

    def __init__(self, mode: str, size: int = 0) -> None:
        self.mode = mode
        self.size = size
        self.connections = 0
        self.errors: list[OSError] = []
        self._lock = threading.Lock()
        upstream = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                upstream._handle(self.request)

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self.address: tuple[str, int] = self._server.server_address[:2]  # type: ignore[assignment]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> ThreadedUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(2)

    def _handle(self, sock: socket.socket) -> None:
        with self._lock:
            self.connections += 1
        sock.settimeout(10)
        try:
            if self.mode == "source":
                sock.sendall(pattern(self.size))
            while data := sock.recv(65536):
                if self.mode == "echo":
                    sock.sendall(data)
        except OSError as exc:
            with self._lock:
                self.errors.append(exc)


@dataclass
class TrioUpstream:
    """Servers on the test's trio loop; see `serve`."""

    connections: int = 0
    received: list[int] = field(default_factory=list)
    #: Set when a sink has recorded a connection's byte count.
    sink_done: trio.Event = field(default_factory=trio.Event)
    port: int = 0

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    async def serve(self, nursery: trio.Nursery, mode: str, size: int = 0) -> TrioUpstream:
        """Listen in `nursery`: `echo`, `source` (sends `size` bytes) or `sink`.

        A sink reads to EOF, records how many bytes it got and answers that
        number in ASCII.
        """

        async def handler(stream: trio.SocketStream) -> None:
            self.connections += 1
            try:
                if mode == "source":
                    await stream.send_all(pattern(size))
                total = 0
                while data := await stream.receive_some(65536):
                    total += len(data)
                    if mode == "echo":
                        await stream.send_all(data)
                if mode == "sink":
                    self.received.append(total)
                    self.sink_done.set()
                    await stream.send_all(str(total).encode())
            except trio.BrokenResourceError:
                pass
            finally:
                await stream.aclose()

        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        self.port = listeners[0].socket.getsockname()[1]
        return self
