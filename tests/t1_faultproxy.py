"""The fault proxy really injects each fault, and its counters are exact.

Trio tests run small servers on the test's own loop and talk to them through
a proxy whose loop runs in its thread; sync tests use blocking sockets and a
threaded server, the way subprocess-driving mount tests will use the proxy.
Every network wait in here is bounded, so a proxy that fails to forward, cut
or reset makes a test fail rather than hang.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from tests.support import free_port
from tests.t1_faultproxy_support import ThreadedUpstream, TrioUpstream, pattern
from tools.faultproxy import FaultProxy, _RequestFramer

REPO = Path(__file__).resolve().parent.parent


@contextmanager
def proxy_to(address: tuple[str, int]) -> Iterator[FaultProxy]:
    with FaultProxy(address) as proxy:
        yield proxy


@pytest.fixture
async def echo(nursery: trio.Nursery) -> TrioUpstream:
    return await TrioUpstream().serve(nursery, "echo")


async def connect(proxy: FaultProxy) -> trio.SocketStream:
    with trio.fail_after(2):
        return await trio.open_tcp_stream("127.0.0.1", proxy.port)


async def receive_exactly(stream: trio.SocketStream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        piece = await stream.receive_some(size - len(data))
        if not piece:
            raise AssertionError(f"EOF after {len(data)} of {size} bytes")
        data += piece
    return bytes(data)


async def round_trip(stream: trio.SocketStream, message: bytes = b"ping") -> float:
    """Seconds from sending `message` to its echo arriving in full."""
    start = trio.current_time()
    with trio.fail_after(5):
        await stream.send_all(message)
        assert await receive_exactly(stream, len(message)) == message
    return trio.current_time() - start


async def echo_through(stream: trio.SocketStream, payload: bytes) -> bytes:
    """Send `payload` while reading its echo, so neither side's buffers deadlock."""
    received = b""

    async def receive() -> None:
        nonlocal received
        received = await receive_exactly(stream, len(payload))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await stream.send_all(payload)
    return received


def read_until_closed(
    sock: socket.socket, limit: int, pause: float = 0
) -> tuple[bytes, type[BaseException] | None]:
    """Read until EOF or an error; returns the bytes and the error's type (None for EOF).

    With `pause`, read 8 KiB at a time and sleep between reads: a slow reader.
    """
    data = bytearray()
    try:
        while len(data) <= limit and (piece := sock.recv(8192 if pause else 1 << 20)):
            data += piece
            time.sleep(pause)
    except OSError as exc:
        return bytes(data), type(exc)
    return bytes(data), None


# -- forwarding and counters ---------------------------------------------------


async def test_forwards_bytes_exactly_and_counts_them(echo: TrioUpstream) -> None:
    sizes = [1, 70_000, 1_500_000]
    with proxy_to(echo.address) as proxy:
        for size in sizes:
            async with await connect(proxy) as stream:
                payload = os.urandom(size)
                assert await echo_through(stream, payload) == payload
        assert proxy.counters() == {
            "bytes_up": sum(sizes),
            "bytes_down": sum(sizes),
            "connections": len(sizes),
        }
        proxy.reset_counters()
        assert proxy.counters() == {"bytes_up": 0, "bytes_down": 0, "connections": 0}
    assert echo.connections == len(sizes)


async def test_half_close_passes_through(nursery: trio.Nursery) -> None:
    sink = await TrioUpstream().serve(nursery, "sink")
    with proxy_to(sink.address) as proxy:
        async with await connect(proxy) as stream:
            with trio.fail_after(5):
                await stream.send_all(pattern(200_000))
                await stream.send_eof()
                answer = b""
                while piece := await stream.receive_some():
                    answer += piece
        assert answer == b"200000"
        assert proxy.counters()["bytes_down"] == len(answer)


# -- latency, jitter and bandwidth ---------------------------------------------


async def test_latency_is_added_to_each_direction_of_an_open_connection(
    echo: TrioUpstream,
) -> None:
    with proxy_to(echo.address) as proxy:
        async with await connect(proxy) as stream:
            baseline = statistics.median([await round_trip(stream) for _ in range(5)])
            proxy.set(latency=0.1)
            delayed = statistics.median([await round_trip(stream) for _ in range(3)])
            proxy.clear()
            restored = await round_trip(stream)
    assert 0.19 <= delayed - baseline <= 0.45, (baseline, delayed)
    assert restored < 0.05


async def test_jitter_varies_delay_but_keeps_the_stream_in_order(echo: TrioUpstream) -> None:
    with proxy_to(echo.address) as proxy:
        proxy.set(latency=0.05, jitter=0.04)
        stream = await connect(proxy)
        rtts = [await round_trip(stream, b"x") for _ in range(15)]
        # Separate sends become separate pieces with separate jitter draws.
        messages = [b"%05d;" % i for i in range(200)]
        async with stream:
            with trio.fail_after(5):
                for message in messages:
                    await stream.send_all(message)
                    await trio.sleep(0.001)
                echoed = await receive_exactly(stream, sum(map(len, messages)))
    assert min(rtts) >= 2 * (0.05 - 0.04) - 0.002, rtts
    assert max(rtts) <= 2 * (0.05 + 0.04) + 0.05, rtts
    assert statistics.pstdev(rtts) > 0.008, rtts
    assert echoed == b"".join(messages)


@pytest.mark.parametrize("direction", ["up", "down"])
async def test_bandwidth_is_capped(nursery: trio.Nursery, direction: str) -> None:
    size, rate = 1_000_000, 2_000_000.0
    upstream = await TrioUpstream().serve(nursery, "sink" if direction == "up" else "source", size)
    with proxy_to(upstream.address) as proxy:
        proxy.set(bandwidth=rate)
        stream = await connect(proxy)
        start = trio.current_time()
        async with stream:
            with trio.fail_after(5):
                if direction == "up":
                    await stream.send_all(pattern(size))
                    await stream.send_eof()
                    assert await stream.receive_some() == str(size).encode()
                else:
                    assert await receive_exactly(stream, size) == pattern(size)
        elapsed = trio.current_time() - start
    assert size / rate * 0.95 <= elapsed <= size / rate * 1.6, elapsed


async def test_bandwidth_is_shared_by_all_connections(nursery: trio.Nursery) -> None:
    size, rate = 400_000, 2_000_000.0
    source = await TrioUpstream().serve(nursery, "source", size)
    with proxy_to(source.address) as proxy:
        proxy.set(bandwidth=rate)
        start = trio.current_time()
        streams = [await connect(proxy) for _ in range(3)]
        with trio.fail_after(5):
            async with trio.open_nursery() as readers:
                for stream in streams:
                    readers.start_soon(receive_exactly, stream, size)
        for stream in streams:
            await stream.aclose()
        elapsed = trio.current_time() - start
    assert 3 * size / rate * 0.95 <= elapsed <= 3 * size / rate * 1.6, elapsed


async def test_lifting_a_bandwidth_cap_speeds_up_a_transfer_in_flight(
    nursery: trio.Nursery,
) -> None:
    size = 4_000_000
    source = await TrioUpstream().serve(nursery, "source", size)
    with proxy_to(source.address) as proxy:
        proxy.set(bandwidth=200_000)
        stream = await connect(proxy)
        start = trio.current_time()
        async with stream:
            with trio.fail_after(5):
                await receive_exactly(stream, 50_000)
                proxy.clear()
                await receive_exactly(stream, size - 50_000)
        assert trio.current_time() - start < 2


# -- reset, refuse, black hole, cut --------------------------------------------


def test_reset_all_resets_client_and_server_sides() -> None:
    with ThreadedUpstream("echo") as upstream, proxy_to(upstream.address) as proxy:
        clients = [socket.create_connection(("127.0.0.1", proxy.port), timeout=2) for _ in range(2)]
        for sock in clients:
            sock.sendall(b"hello")
            assert sock.recv(5) == b"hello"
        proxy.reset_all()
        for sock in clients:
            with pytest.raises(ConnectionResetError):
                sock.recv(5)
            sock.close()
        deadline = time.monotonic() + 2
        while len(upstream.errors) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [type(e) for e in upstream.errors] == [ConnectionResetError] * 2
        assert proxy.open_connections() == 0


def test_refuse_resets_new_connections_but_not_open_ones() -> None:
    with ThreadedUpstream("echo") as upstream, proxy_to(upstream.address) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as existing:
            existing.sendall(b"a")
            assert existing.recv(1) == b"a"
            proxy.set(refuse=True)
            with pytest.raises(ConnectionResetError):
                # The reset may already be seen by connect() itself, which a timeout makes poll.
                with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as refused:
                    refused.sendall(b"b")
                    refused.recv(1)
            existing.sendall(b"c")
            assert existing.recv(1) == b"c"
            proxy.clear()
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as later:
                later.sendall(b"d")
                assert later.recv(1) == b"d"
        assert upstream.connections == 2
        assert proxy.counters()["connections"] == 3


def test_blackhole_answers_nothing_then_releases_held_data() -> None:
    with ThreadedUpstream("echo") as upstream, proxy_to(upstream.address) as proxy:
        existing = socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
        existing.sendall(b"before")
        assert existing.recv(6) == b"before"
        proxy.set(blackhole=True)
        fresh = socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
        for sock in (existing, fresh):
            sock.settimeout(0.3)
            sock.sendall(b"held")
            with pytest.raises(TimeoutError):
                sock.recv(4)
        assert upstream.connections == 1, "a black-holed connection must not reach the server"
        assert proxy.counters()["bytes_up"] == len(b"before")
        proxy.clear()
        for sock in (existing, fresh):
            sock.settimeout(2)
            assert sock.recv(4) == b"held"
            sock.close()
        assert upstream.connections == 2


async def test_blackhole_delivers_what_a_client_sent_before_giving_up(
    nursery: trio.Nursery,
) -> None:
    sink = await TrioUpstream().serve(nursery, "sink")
    with proxy_to(sink.address) as proxy:
        proxy.set(blackhole=True)
        async with await connect(proxy) as gave_up:
            await gave_up.send_all(b"late request")
        reset = await connect(proxy)
        await reset.send_all(b"reset request")
        reset.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await reset.aclose()
        await trio.sleep(0.2)
        assert (sink.connections, proxy.open_connections()) == (0, 1)
        proxy.clear()
        with trio.fail_after(2):
            await sink.sink_done.wait()
        assert sink.received == [len(b"late request")]
        assert sink.connections == 1


@pytest.mark.parametrize("with_reset", [False, True])
def test_cut_after_delivers_exactly_n_bytes_then_ends(with_reset: bool) -> None:
    size, cut = 8_000_000, 300_001
    with ThreadedUpstream("source", size) as upstream, proxy_to(upstream.address) as proxy:
        proxy.set(cut_after=cut, cut_with_reset=with_reset)
        with socket.socket() as sock:
            # A small receive window and a slow reader leave bytes queued in the proxy's
            # kernel when it cuts; a reset sent before they drain would discard them.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
            sock.settimeout(5)
            sock.connect(("127.0.0.1", proxy.port))
            data, error = read_until_closed(sock, size, pause=0.002)
        assert len(data) == cut
        assert data == pattern(cut)
        assert error is (ConnectionResetError if with_reset else None)
        assert proxy.counters()["bytes_down"] == cut


def test_cut_after_counts_from_the_set_call_on_an_open_connection() -> None:
    with ThreadedUpstream("echo") as upstream, proxy_to(upstream.address) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as sock:
            sock.sendall(b"x" * 1000)
            assert len(read_exactly(sock, 1000)) == 1000
            proxy.set(cut_after=10)
            sock.sendall(b"y" * 100)
            data, error = read_until_closed(sock, 100)
        assert (data, error) == (b"y" * 10, None)


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size and (piece := sock.recv(size - len(data))):
        data += piece
    return bytes(data)


# -- request framing (what holds match on) -------------------------------------


def framed(pieces: list[bytes]) -> tuple[list[str | None], bytes, bool]:
    """Feed `pieces` to one framer: the lines it saw per segment, the bytes out, still parsing."""
    framer = _RequestFramer()
    segments = [seg for piece in pieces for seg in framer.feed(piece)]
    parsing = framer.parsing
    out = b"".join(data for data, _ in segments) + framer.flush()
    return [line for _, line in segments if line is not None], out, parsing


def test_framer_finds_request_lines_across_any_split() -> None:
    stream = (
        b"PUT /v1/libraries/docs/chunks/ab HTTP/1.1\r\nContent-Length: 10\r\n\r\n"
        + b"GET /fake HTTP/1.1\r\n"[:10]  # body bytes that look like a request are body
        + b"POST /v1/libraries/docs/commit HTTP/1.1\r\ncontent-length:2\r\n\r\n{}"
        + b"GET /v1/capabilities HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    expected = [
        "PUT /v1/libraries/docs/chunks/ab HTTP/1.1",
        "POST /v1/libraries/docs/commit HTTP/1.1",
        "GET /v1/capabilities HTTP/1.1",
    ]
    for size in (1, 2, 7, 64, len(stream)):
        pieces = [stream[i : i + size] for i in range(0, len(stream), size)]
        lines, out, parsing = framed(pieces)
        assert (lines, out, parsing) == (expected, stream, True), size


def test_framer_passes_anything_else_through_at_once() -> None:
    for first in (b"hello", b"\x00\x01\x02", b"HELLO WORLD\r\n", b"GET  /x HTTP/1.1\r\n"):
        framer = _RequestFramer()
        assert framer.feed(first) == [(first, None)], first
        assert framer.feed(b"PUT /a HTTP/1.1\r\n\r\n") == [(b"PUT /a HTTP/1.1\r\n\r\n", None)]
    # Without a hold in force, bytes that might start a request line are not delayed.
    framer = _RequestFramer()
    assert framer.feed(b"P", hold_heads=False) == [(b"P", None)]
    assert framer.feed(b"UT /a HTTP/1.1\r\n\r\n", hold_heads=True) == [
        (b"UT /a HTTP/1.1\r\n\r\n", "PUT /a HTTP/1.1")
    ]
    # A chunked body cannot be framed: that request is seen, then parsing stops.
    chunked = b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nGET /b\r\n0\r\n\r\n"
    assert framed([chunked]) == (["POST /a HTTP/1.1"], chunked, False)


# -- lifecycle -----------------------------------------------------------------


def test_unreachable_target_is_seen_as_a_reset() -> None:
    with proxy_to(("127.0.0.1", free_port())) as proxy:
        start = time.monotonic()
        with pytest.raises(ConnectionResetError):
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as sock:
                assert sock.recv(10) == b"never: EOF or data here is a failure"
        assert time.monotonic() - start < 1


def test_stop_returns_promptly_and_closes_held_connections() -> None:
    with ThreadedUpstream("source", 10_000_000) as upstream:
        proxy = FaultProxy(upstream.address)
        proxy.start()
        slow = socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
        assert len(read_exactly(slow, 1000)) == 1000  # the source is now blocked on us
        proxy.set(latency=30, bandwidth=10)
        held = socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
        proxy.set(blackhole=True)
        held.sendall(b"never answered")
        start = time.monotonic()
        proxy.stop()
        assert time.monotonic() - start < 1.5
        for sock in (slow, held):
            read_until_closed(sock, 20_000_000)  # ends (EOF or reset) instead of timing out
            sock.close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proxy.port), timeout=2)


def test_settings_are_validated() -> None:
    proxy = FaultProxy(("127.0.0.1", 9))
    for bad in ({"latency": -1}, {"bandwidth": 0}, {"cut_after": -5}):
        with pytest.raises(ValueError):
            proxy.set(**bad)
    with pytest.raises(RuntimeError, match="could not listen"):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            FaultProxy(("127.0.0.1", 9), listen=taken.getsockname()).start()


def test_command_line_forwards_with_faults_and_prints_counters_on_exit() -> None:
    with ThreadedUpstream("echo") as upstream:
        target = f"{upstream.address[0]}:{upstream.address[1]}"
        proc = subprocess.Popen(
            [sys.executable, "tools/faultproxy.py", "--target", target, "--latency", "0.05"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()
            assert first.startswith("listening on http://127.0.0.1:"), first
            port = int(first.rsplit(":", 1)[1])
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                start = time.monotonic()
                sock.sendall(b"hello")
                assert read_exactly(sock, 5) == b"hello"
                assert time.monotonic() - start >= 0.1
            proc.send_signal(signal.SIGINT)
            out, _ = proc.communicate(timeout=5)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0
    assert json.loads(out.strip().splitlines()[-1]) == {
        "bytes_up": 5,
        "bytes_down": 5,
        "connections": 1,
    }
