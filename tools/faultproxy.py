"""A TCP proxy that injects network faults between a ferry client and server.

Tests put it between the drive and the sync server and script it while they
run: add latency and jitter, cap bandwidth, black-hole traffic, refuse or
reset connections, and cut the server->client stream after N bytes. It also
counts the bytes it forwards in each direction and the connections it
accepts, which benchmarks use to measure bytes on the wire.

The proxy runs its own trio loop in a daemon thread, so plain sync tests that
drive subprocesses and trio tests (whose loop is a different one) can both
use it. Every method on `FaultProxy` is safe to call from any thread; none of
them waits for the network, and `stop()` returns within a couple of seconds
whatever the connections are doing.

How each connection moves data: per direction, a reader task stamps each
piece it receives with its arrival time and puts it in a small bounded
channel; a writer task holds the piece until its delivery time (arrival +
latency + jitter, never before an earlier piece, so the stream stays in
order), holds it while black-holed, paces it through the direction's shared
bandwidth budget, and sends it. Settings are one immutable `Faults` value
swapped atomically by `set()`; writers that are waiting wake on every change
and re-evaluate, so a new setting applies to data already in flight.

Holds stop traffic at an exact HTTP moment, for crash tests: the client->server
stream is cut into requests (request head plus `Content-Length` body; the
clients we proxy never pipeline), and `hold(pattern)` stops every request
whose request line matches before its first byte is forwarded, or with
`response=True` forwards it and stops its response before the first byte
reaches the client. The test learns that a request was stopped
(`Hold.wait`) and then kills whoever it likes, and either lets the held
bytes go on (`Hold.release`) or resets their connections (`Hold.discard`).
A connection whose first bytes are not an HTTP/1.x request line is passed
through unparsed.

Command line::

    python tools/faultproxy.py --listen 127.0.0.1:9000 --target 127.0.0.1:8800 \\
        --latency 0.05 --jitter 0.01 --bandwidth 10e6

It prints the URL it listens on, runs until SIGINT or SIGTERM, then prints
its counters as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import logging
import random
import re
import signal
import socket
import struct
import sys
import termios
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType, TracebackType

import trio

log = logging.getLogger(__name__)

#: Largest piece read from a socket at once; also the unit latency applies to.
READ_SIZE = 64 * 1024
#: Pieces buffered per direction per connection before the proxy stops reading
#: (bounds memory while traffic is held by latency or a black hole).
BUFFERED_PIECES = 8
#: How long the proxy waits for the target to accept a connection before it
#: resets the client, as a dead server would.
CONNECT_TIMEOUT = 5.0
#: Bandwidth pacing sends slices of at most this many seconds' worth of bytes,
#: so that a cap shows as a steady rate rather than bursts.
PACING_SLICE_SECONDS = 0.02
#: How long a cut waits for the kernel to hand the first N bytes to the client
#: before it resets the connection anyway.
DRAIN_TIMEOUT = 1.0
DRAIN_POLL = 0.005
#: How long the blocking methods wait for the proxy's loop thread.
THREAD_TIMEOUT = 2.0
#: Longest HTTP request head the proxy buffers while it looks for the end of one; a longer
#: one (or bytes that cannot start a request line) turn parsing off for that connection.
MAX_REQUEST_HEAD = 64 * 1024
_REQUEST_LINE = re.compile(rb"[A-Z]{1,20} [^ \r\n]+ HTTP/1\.[01]\r\n")
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)[ \t]*(?=\r\n)", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[^\r\n]*chunked", re.IGNORECASE)


@dataclass(frozen=True)
class Faults:
    """The faults in force; `FaultProxy.set` replaces the whole value.

    latency: seconds added to each direction (a request/response round trip
        gains twice this).
    jitter: each piece's delay varies uniformly within +-jitter around
        latency (never below zero, never reordering the stream).
    bandwidth: bytes per second per direction, shared by all connections like
        one link; None for unlimited.
    blackhole: forward nothing in either direction; new connections are
        accepted and read but never reach the target. Held data flows again
        when the black hole is cleared, as after a healed partition: bytes a
        client sent before it gave up and closed cleanly still reach the
        target then (TCP would retransmit them), so a request can arrive
        after its client stopped waiting. A client that resets is forgotten.
    refuse: accept and immediately reset new connections (a dead server).
    cut_after: on each connection, forward this many more bytes of the
        server->client stream (counted from this `set` call), then cut it.
    cut_with_reset: cut with a TCP reset after the N bytes were delivered
        instead of a clean close (EOF).
    """

    latency: float = 0.0
    jitter: float = 0.0
    bandwidth: float | None = None
    blackhole: bool = False
    refuse: bool = False
    cut_after: int | None = None
    cut_with_reset: bool = False
    generation: int = 0

    def __post_init__(self) -> None:
        if self.latency < 0 or self.jitter < 0:
            raise ValueError(f"latency and jitter must be >= 0, got {self.latency}, {self.jitter}")
        if self.bandwidth is not None and self.bandwidth <= 0:
            raise ValueError(f"bandwidth must be > 0 bytes/s or None, got {self.bandwidth}")
        if self.cut_after is not None and self.cut_after < 0:
            raise ValueError(f"cut_after must be >= 0 bytes or None, got {self.cut_after}")


@dataclass
class _Piece:
    """Bytes read from one side, waiting to be delivered to the other."""

    arrived: float
    jitter_draw: float
    data: bytes


class _Pacer:
    """One direction's bandwidth budget, shared by every connection.

    Reservations are made without an await between reading and advancing
    `busy_until`, so concurrent writers on the loop thread never overlap.
    """

    def __init__(self) -> None:
        self.busy_until = 0.0

    def reserve(self, nbytes: int, bandwidth: float) -> float:
        """Book `nbytes` on the link and return when their transmission ends."""
        now = trio.current_time()
        # A writer back late from its previous slice keeps the schedule (wake-up delays are
        # not lost bandwidth); a link idle for longer than a slice starts afresh (no burst).
        start = self.busy_until if now - self.busy_until <= PACING_SLICE_SECONDS else now
        self.busy_until = start + nbytes / bandwidth
        return self.busy_until


def _could_start_request(head: bytes) -> bool:
    """True if `head` is, or may still grow into, an HTTP/1.x request line."""
    line, newline, _ = head.partition(b"\r\n")
    if newline:
        return _REQUEST_LINE.match(line + newline) is not None
    method, space, rest = line.partition(b" ")
    if not (method.isalpha() and method.isupper() and len(method) <= 20):
        return False
    if not space:
        return True
    target, space, version = rest.partition(b" ")
    if not space:
        return b"\r" not in target
    version = version.removesuffix(b"\r")
    return bool(target) and any(v[: len(version)] == version for v in (b"HTTP/1.1", b"HTTP/1.0"))


class _RequestFramer:
    """Cuts one connection's client->server bytes at HTTP request boundaries.

    `feed` returns the bytes to forward as segments, each paired with the
    request line it completes (None for other bytes). With `hold_heads` (some
    hold is in force) a request head is buffered until it is complete, so its
    line is seen before any byte of the request is forwarded; without, head
    bytes go on at once (a one-byte message that might begin a request line
    is not delayed) and are only tracked. Bodies are framed by
    `Content-Length`; a chunked body, or bytes that are not HTTP/1.x, end
    parsing for the connection.
    """

    def __init__(self) -> None:
        self.parsing = True
        self.head = bytearray()
        self.head_sent = 0  # bytes of `head` already forwarded
        self.body_left = 0

    def feed(self, data: bytes, *, hold_heads: bool = True) -> list[tuple[bytes, str | None]]:
        out: list[tuple[bytes, str | None]] = []
        view = memoryview(data)
        while view:
            if not self.parsing:
                out.append((bytes(view), None))
                break
            if self.body_left:
                n = min(self.body_left, len(view))
                out.append((bytes(view[:n]), None))
                self.body_left -= n
                view = view[n:]
                continue
            self.head += view
            view = memoryview(b"")
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > MAX_REQUEST_HEAD or not _could_start_request(bytes(self.head)):
                    out.append((self._stop(), None))
                elif not hold_heads:
                    out.append((bytes(self.head[self.head_sent :]), None))
                    self.head_sent = len(self.head)
                break
            head, rest = bytes(self.head[: end + 4]), bytes(self.head[end + 4 :])
            if not _REQUEST_LINE.match(head):
                out.append((self._stop(), None))
                break
            unsent, self.head_sent = head[self.head_sent :], 0
            self.head.clear()
            length = _CONTENT_LENGTH.search(head)
            self.body_left = int(length.group(1)) if length else 0
            if _CHUNKED.search(head):
                log.warning("fault proxy cannot frame chunked request bodies; holds stop here")
                self.parsing = False
            out.append((unsent, head.split(b"\r\n", 1)[0].decode("latin-1")))
            view = memoryview(rest)
        return out

    def flush(self) -> bytes:
        """Bytes of an unfinished head, forwarded as they are when the client stops sending."""
        return self._stop()

    def _stop(self) -> bytes:
        """Stop parsing; return the buffered bytes not forwarded yet."""
        self.parsing = False
        out = bytes(self.head[self.head_sent :])
        self.head.clear()
        self.head_sent = 0
        return out


class Hold:
    """Requests (or their responses) stopped in the proxy until the test decides; see `FaultProxy.hold`.

    `matched` counts the requests whose line matched, `held` those stopped so
    far, `lines` their request lines. Read them from any thread.
    """

    def __init__(self, proxy: FaultProxy, pattern: str, *, response: bool, after: int) -> None:
        self.pattern = re.compile(pattern)
        self.response = response
        self.after = after
        self.matched = 0
        self.held = 0
        self.lines: list[str] = []
        self.active = True
        self._proxy = proxy
        self._stopped = threading.Event()
        self._released = trio.Event()  # set on the proxy's loop only
        self._waiting: set[_Connection] = set()

    def __repr__(self) -> str:
        what = "responses to" if self.response else "requests"
        return f"Hold({what} {self.pattern.pattern!r} after {self.after}, held {self.held})"

    def wait(self, timeout: float) -> bool:
        """Block until something is held (True) or `timeout` seconds passed (False)."""
        return self._stopped.wait(timeout)

    def release(self) -> None:
        """End the hold: held bytes go on, later matches pass. Returns once done."""
        self._proxy._end_hold(self, forward=True)

    def discard(self) -> None:
        """End the hold: connections holding bytes are reset both ways, so held bytes
        never arrive; later matches pass. Returns once done."""
        self._proxy._end_hold(self, forward=False)

    async def _stop_here(self, conn: _Connection, line: str) -> None:
        """Hold `conn`'s stream (the caller's direction) until released or discarded."""
        self.held += 1
        self.lines.append(line)
        log.info("fault proxy holds %s on connection %d", line, conn.number)
        self._stopped.set()
        self._waiting.add(conn)
        try:
            await self._released.wait()
        finally:
            self._waiting.discard(conn)


class _Connection:
    """One proxied client connection, its upstream and how to end them."""

    def __init__(self, number: int, client: trio.SocketStream) -> None:
        self.number = number
        self.client = client
        self.upstream: trio.SocketStream | None = None
        self.scope = trio.CancelScope()
        self.client_reset = False
        self.upstream_reset = False
        self.down_bytes = 0
        self.cut_generation = -1
        self.cut_base = 0
        self.requests = _RequestFramer()
        #: The hold that stops the response to the request last forwarded, with its line.
        self.response_hold: tuple[Hold, str] | None = None

    def end(self, *, client_reset: bool, upstream_reset: bool) -> None:
        """Ask the connection to finish; the first caller's choice of reset wins."""
        if not self.scope.cancel_called:
            self.client_reset = client_reset
            self.upstream_reset = upstream_reset
        self.scope.cancel()

    def close_now(self) -> None:
        """Close both sockets at once, with RST where requested. Idempotent."""
        _close_socket(self.client, reset=self.client_reset)
        if self.upstream is not None:
            _close_socket(self.upstream, reset=self.upstream_reset)


def _close_socket(stream: trio.SocketStream, *, reset: bool) -> None:
    """Close `stream` synchronously; with `reset`, send RST instead of FIN.

    trio wakes any task blocked on the socket with ClosedResourceError.
    """
    sock = stream.socket
    if sock.fileno() == -1:
        return
    if reset:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    sock.close()


def _unsent_bytes(stream: trio.SocketStream) -> int:
    """Bytes still in the kernel's send queue for `stream` (Linux SIOCOUTQ)."""
    fd = stream.socket.fileno()
    if fd == -1:
        return 0
    buf = fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0")
    return struct.unpack("i", buf)[0]


_NETWORK_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class FaultProxy:
    """A fault-injecting TCP proxy to `target`, run in its own thread.

    Use as a context manager, or call `start()` and `stop()`. `url` is the
    HTTP base URL to hand to a client instead of the server's.
    """

    def __init__(self, target: tuple[str, int], listen: tuple[str, int] = ("127.0.0.1", 0)) -> None:
        self.target = target
        self.listen = listen
        self.port = 0
        self._faults = Faults()
        self._settings_lock = threading.Lock()
        self._counter_lock = threading.Lock()
        self._bytes_up = 0
        self._bytes_down = 0
        self._accepted = 0
        self._connections: set[_Connection] = set()
        self._changed = trio.Event()
        self._pacers = {"up": _Pacer(), "down": _Pacer()}
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._main_scope: trio.CancelScope | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._holds: list[Hold] = []

    @property
    def url(self) -> str:
        """`http://HOST:PORT` of the proxy's listening socket."""
        return f"http://{self.listen[0]}:{self.port}"

    def __repr__(self) -> str:
        return f"FaultProxy({self.url} -> {self.target[0]}:{self.target[1]}, {self._faults})"

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Start the proxy thread; returns once the proxy is listening."""
        if self._thread is not None:
            raise RuntimeError(f"{self!r} is already started")
        self._thread = threading.Thread(
            target=self._run, name=f"faultproxy->{self.target[0]}:{self.target[1]}", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(THREAD_TIMEOUT * 5):
            raise RuntimeError(f"fault proxy to {self.target} did not start listening in time")
        if self._startup_error is not None:
            self._thread.join(THREAD_TIMEOUT)
            self._thread = None
            raise RuntimeError(
                f"fault proxy could not listen on {self.listen[0]}:{self.listen[1]}: "
                f"{self._startup_error}"
            ) from self._startup_error

    def stop(self) -> None:
        """Close the listener and every connection, and join the thread."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._call_soon(self._cancel_main)
        thread.join(THREAD_TIMEOUT)
        if thread.is_alive():
            log.error("fault proxy thread %s did not stop within %ss", thread.name, THREAD_TIMEOUT)

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- scripting ---------------------------------------------------------

    def set(
        self,
        *,
        latency: float = 0,
        jitter: float = 0,
        bandwidth: float | None = None,
        blackhole: bool = False,
        refuse: bool = False,
        cut_after: int | None = None,
        cut_with_reset: bool = False,
    ) -> None:
        """Replace all faults (see `Faults`); applies to data already in flight too."""
        with self._settings_lock:
            self._faults = Faults(
                latency=latency,
                jitter=jitter,
                bandwidth=bandwidth,
                blackhole=blackhole,
                refuse=refuse,
                cut_after=cut_after,
                cut_with_reset=cut_with_reset,
                generation=self._faults.generation + 1,
            )
        log.info("fault proxy %s now injects %s", self.url, self._faults)
        self._call_soon(self._wake_waiters)

    def clear(self) -> None:
        """Remove every fault: forward as fast as possible."""
        self.set()

    @property
    def faults(self) -> Faults:
        """The faults currently in force."""
        return self._faults

    def reset_all(self) -> None:
        """Reset (RST) every open connection, both to the client and to the target.

        Returns after the resets were sent.
        """
        done = threading.Event()

        def reset_in_loop() -> None:
            for conn in list(self._connections):
                conn.end(client_reset=True, upstream_reset=True)
                conn.close_now()
                self._connections.discard(conn)
            done.set()

        if self._call_soon(reset_in_loop) and not done.wait(THREAD_TIMEOUT):
            log.error("fault proxy %s did not reset its connections in time", self.url)

    def hold(self, pattern: str, *, response: bool = False, after: int = 0) -> Hold:
        """Stop HTTP requests whose request line matches `pattern` (a regex, `re.search`).

        The first `after` matching requests pass; every later one is held
        before any of its bytes reach the target, or, with `response`, is
        forwarded and its response held before any byte reaches the client
        (so the server has acted on it and the client cannot know). Nothing
        else on the held connection moves meanwhile; other connections do.
        Holds are checked in the order they were made; the first that
        matches a request line decides. `Hold.release()` or `Hold.discard()`
        ends one; `stop()` ends them all.
        """
        made = Hold(self, pattern, response=response, after=after)
        with self._settings_lock:
            self._holds.append(made)
        log.info("fault proxy %s now holds %r", self.url, made)
        return made

    def _end_hold(self, hold: Hold, *, forward: bool) -> None:
        done = threading.Event()

        def end_in_loop() -> None:
            hold.active = False
            with self._settings_lock:
                if hold in self._holds:
                    self._holds.remove(hold)
            if not forward:
                for conn in list(hold._waiting):
                    conn.end(client_reset=True, upstream_reset=True)
                    conn.close_now()
                    self._connections.discard(conn)
            hold._released.set()
            done.set()

        if self._call_soon(end_in_loop):
            if not done.wait(THREAD_TIMEOUT):
                log.error("fault proxy %s did not end %r in time", self.url, hold)
        else:
            hold.active = False

    def counters(self) -> dict[str, int]:
        """Bytes forwarded client->target (up) and back (down), connections accepted."""
        with self._counter_lock:
            return {
                "bytes_up": self._bytes_up,
                "bytes_down": self._bytes_down,
                "connections": self._accepted,
            }

    def reset_counters(self) -> None:
        """Start counting from zero."""
        with self._counter_lock:
            self._bytes_up = self._bytes_down = self._accepted = 0

    def open_connections(self) -> int:
        """How many client connections are open right now."""
        return len(self._connections)

    # -- the loop thread ---------------------------------------------------

    def _call_soon(self, fn: Callable[[], None]) -> bool:
        """Run `fn` on the proxy's loop; False if the loop is not running."""
        if self._token is None:
            return False
        try:
            self._token.run_sync_soon(fn)
        except trio.RunFinishedError:
            return False
        return True

    def _cancel_main(self) -> None:
        if self._main_scope is not None:
            self._main_scope.cancel()

    def _wake_waiters(self) -> None:
        """Wake every writer waiting on the old settings; they re-evaluate."""
        changed, self._changed = self._changed, trio.Event()
        changed.set()
        for pacer in self._pacers.values():
            pacer.busy_until = 0.0

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported by start(), or logged once running
            if not self._ready.is_set():
                self._startup_error = exc
            else:
                log.exception("fault proxy to %s stopped on an error", self.target)
        finally:
            self._token = None
            self._ready.set()

    async def _main(self) -> None:
        self._changed = trio.Event()
        host, port = self.listen
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            self._startup_error = exc
            return
        self.port = listeners[0].socket.getsockname()[1]
        self._token = trio.lowlevel.current_trio_token()
        try:
            with trio.CancelScope() as self._main_scope:
                async with trio.open_nursery() as nursery:
                    await nursery.start(trio.serve_listeners, self._serve_client, listeners)
                    self._ready.set()
        finally:
            for listener in listeners:
                listener.socket.close()
            for conn in list(self._connections):
                conn.close_now()

    async def _serve_client(self, client: trio.SocketStream) -> None:
        with self._counter_lock:
            self._accepted += 1
            number = self._accepted
        conn = _Connection(number, client)
        if self._faults.refuse:
            log.debug("refusing connection %d", number)
            _close_socket(client, reset=True)
            return
        self._connections.add(conn)
        try:
            with conn.scope:
                await self._proxy(conn)
        except _NETWORK_ERRORS as exc:
            log.debug("connection %d ended: %s", number, exc)
        except Exception:
            log.exception("fault proxy connection %d to %s failed", number, self.target)
            conn.end(client_reset=True, upstream_reset=True)
        finally:
            self._connections.discard(conn)
            conn.close_now()

    async def _proxy(self, conn: _Connection) -> None:
        """Read the client at once; reach the target once no black hole is in force."""
        async with trio.open_nursery() as nursery:
            up_send, up_receive = trio.open_memory_channel[_Piece](BUFFERED_PIECES)
            nursery.start_soon(self._read, conn, conn.client, up_send)
            await self._wait_not_blackholed()
            upstream = await self._connect()
            if upstream is None:
                conn.end(client_reset=True, upstream_reset=False)
                return
            conn.upstream = upstream
            down_send, down_receive = trio.open_memory_channel[_Piece](BUFFERED_PIECES)
            nursery.start_soon(self._write, conn, "up", up_receive, upstream)
            nursery.start_soon(self._read, conn, upstream, down_send)
            nursery.start_soon(self._write, conn, "down", down_receive, conn.client)

    async def _connect(self) -> trio.SocketStream | None:
        host, port = self.target
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                return await trio.open_tcp_stream(host, port)
        except (OSError, trio.TooSlowError) as exc:
            log.warning("fault proxy cannot reach its target %s:%d: %s", host, port, exc)
            return None

    async def _read(
        self, conn: _Connection, source: trio.SocketStream, channel: trio.MemorySendChannel[_Piece]
    ) -> None:
        """Move bytes from `source` into `channel`; closing it passes EOF on."""
        async with channel:
            try:
                while data := await source.receive_some(READ_SIZE):
                    draw = random.uniform(-1.0, 1.0)
                    await channel.send(_Piece(trio.current_time(), draw, data))
            except _NETWORK_ERRORS as exc:
                log.debug("connection %d: read failed: %s", conn.number, exc)
                conn.end(client_reset=True, upstream_reset=True)

    async def _write(
        self,
        conn: _Connection,
        direction: str,
        channel: trio.MemoryReceiveChannel[_Piece],
        dest: trio.SocketStream,
    ) -> None:
        """Deliver pieces from `channel` to `dest` under the faults in force."""
        try:
            async with channel:
                async for piece in channel:
                    await self._wait_latency(piece)
                    if direction == "up":
                        holding = bool(self._holds)
                        for segment, line in conn.requests.feed(piece.data, hold_heads=holding):
                            if line is not None:
                                await self._on_request(conn, line)
                            await self._deliver(conn, direction, segment, dest)
                    else:
                        await self._on_response(conn)
                        await self._deliver(conn, direction, piece.data, dest)
            if direction == "up":
                await self._deliver(conn, direction, conn.requests.flush(), dest)
            await dest.send_eof()
        except _NETWORK_ERRORS as exc:
            log.debug("connection %d: %s write failed: %s", conn.number, direction, exc)
            conn.end(client_reset=True, upstream_reset=True)

    async def _on_request(self, conn: _Connection, line: str) -> None:
        """Apply the first matching hold to a request about to be forwarded."""
        log.debug("connection %d: %s", conn.number, line)
        with self._settings_lock:
            hold = next((h for h in self._holds if h.pattern.search(line)), None)
        if hold is None:
            return
        hold.matched += 1
        if hold.matched <= hold.after:
            return
        if hold.response:
            conn.response_hold = (hold, line)
        else:
            await hold._stop_here(conn, line)

    async def _on_response(self, conn: _Connection) -> None:
        """Hold the response to a request whose hold asked for it, while that hold lasts."""
        if conn.response_hold is None:
            return
        (hold, line), conn.response_hold = conn.response_hold, None
        if hold.active:
            await hold._stop_here(conn, line)

    async def _wait_latency(self, piece: _Piece) -> None:
        """Wait until `piece` is due.

        Pieces are taken one at a time, so one due before its predecessor
        simply follows it: jitter never reorders the stream.
        """
        while True:
            changed = self._changed
            faults = self._faults
            delay = max(0.0, faults.latency + piece.jitter_draw * faults.jitter)
            if await self._sleep_until(piece.arrived + delay, changed):
                return

    async def _deliver(
        self, conn: _Connection, direction: str, data: bytes, dest: trio.SocketStream
    ) -> None:
        """Send `data` in paced slices, holding it while black-holed; cuts if asked."""
        view = memoryview(data)
        while view:
            await self._wait_not_blackholed()
            faults = self._faults
            size = len(view)
            if faults.bandwidth is not None:
                size = min(size, max(1024, int(faults.bandwidth * PACING_SLICE_SECONDS)))
            remaining = self._cut_remaining(conn, faults) if direction == "down" else None
            if remaining is not None:
                size = min(size, remaining)
            if size and faults.bandwidth is not None:
                if not await self._pace(direction, size, faults.bandwidth):
                    continue  # settings changed while waiting: re-evaluate this slice
            if size:
                # Counted before sending, so a peer that has read the bytes sees them counted.
                self._count(direction, size)
                if direction == "down":
                    conn.down_bytes += size
                try:
                    await dest.send_all(view[:size])
                except BaseException:
                    self._count(direction, -size)
                    raise
                view = view[size:]
            if remaining is not None and remaining - size == 0:
                await self._cut(conn, faults)
                return

    def _cut_remaining(self, conn: _Connection, faults: Faults) -> int | None:
        """Bytes the down stream may still forward before the cut, or None."""
        if faults.cut_after is None:
            return None
        if conn.cut_generation != faults.generation:
            conn.cut_generation = faults.generation
            conn.cut_base = conn.down_bytes
        return max(0, conn.cut_base + faults.cut_after - conn.down_bytes)

    async def _cut(self, conn: _Connection, faults: Faults) -> None:
        """End `conn` after its allowed bytes, by FIN or (once delivered) by RST."""
        log.debug("cutting connection %d after %d bytes down", conn.number, conn.down_bytes)
        if faults.cut_with_reset:
            # The kernel has no readiness event for "send queue empty": poll it, bounded.
            for _ in range(int(DRAIN_TIMEOUT / DRAIN_POLL)):
                if _unsent_bytes(conn.client) == 0:
                    break
                await trio.sleep(DRAIN_POLL)
        conn.end(client_reset=faults.cut_with_reset, upstream_reset=False)
        conn.close_now()

    async def _pace(self, direction: str, size: int, bandwidth: float) -> bool:
        """Wait for `size` bytes' turn on the link; False if settings changed meanwhile."""
        changed = self._changed
        return await self._sleep_until(self._pacers[direction].reserve(size, bandwidth), changed)

    async def _wait_not_blackholed(self) -> None:
        while self._faults.blackhole:
            await self._changed.wait()

    async def _sleep_until(self, deadline: float, changed: trio.Event) -> bool:
        """Sleep until `deadline`; False if woken early by a change of settings."""
        if deadline <= trio.current_time():
            return True
        with trio.move_on_at(deadline):
            await changed.wait()
            return False
        return True

    def _count(self, direction: str, nbytes: int) -> None:
        with self._counter_lock:
            if direction == "up":
                self._bytes_up += nbytes
            else:
                self._bytes_down += nbytes


# -- command line ------------------------------------------------------------


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host or "127.0.0.1", int(port)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="faultproxy", description="TCP proxy that injects network faults."
    )
    parser.add_argument("--listen", type=_address, default=("127.0.0.1", 0), help="HOST:PORT")
    parser.add_argument("--target", type=_address, required=True, help="HOST:PORT to forward to")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added per direction")
    parser.add_argument("--jitter", type=float, default=0.0, help="+- seconds around latency")
    parser.add_argument("--bandwidth", type=float, default=None, help="bytes/s per direction")
    parser.add_argument("--blackhole", action="store_true", help="forward nothing")
    parser.add_argument("--refuse", action="store_true", help="reset every new connection")
    parser.add_argument("--cut-after", type=int, default=None, help="bytes down, then cut")
    parser.add_argument("--cut-with-reset", action="store_true", help="cut with RST, not EOF")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every connection")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a proxy until SIGINT/SIGTERM, then print its counters as JSON."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    proxy = FaultProxy(args.target, args.listen)
    proxy.start()
    try:
        faults = {f.name for f in dataclasses.fields(Faults)} - {"generation"}
        proxy.set(**{name: getattr(args, name) for name in faults})
        print(f"listening on {proxy.url}", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        proxy.stop()
    print(json.dumps(proxy.counters()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
