"""remote/server/h11_body.py: the one-copy body extraction gives what h11's own method gives."""

from __future__ import annotations

import os
from collections.abc import Iterator

import h11
import pytest
from h11._receivebuffer import ReceiveBuffer

from remote.server import h11_body


@pytest.fixture
def patched() -> Iterator[None]:
    assert h11_body.install()
    try:
        yield
    finally:
        h11_body.uninstall()


@pytest.mark.parametrize(
    ("held", "count"), [(b"", 5), (b"abc", 0), (b"abc", 2), (b"abc", 3), (b"abc", 10)]
)
def test_extraction_matches_h11s_own(held: bytes, count: int) -> None:
    expected, rest_expected = ReceiveBuffer(), b""
    expected += held
    want = h11_body._original(expected, count)
    rest_expected = bytes(expected)
    mine = ReceiveBuffer()
    mine += held
    got = h11_body.maybe_extract_at_most(mine, count)
    assert got == want and type(got) is type(want)
    assert bytes(mine) == rest_expected
    mine += b"more"  # the buffer goes on working after giving its bytearray away
    assert bytes(mine) == rest_expected + b"more"


def test_given_away_bytes_do_not_change_with_later_input(patched: None) -> None:
    buf = ReceiveBuffer()
    buf += b"body"
    out = buf.maybe_extract_at_most(100)
    buf += b"next"
    assert out == bytearray(b"body") and bytes(buf) == b"next"


def test_a_pipelined_connection_parses_the_same_bodies(patched: None) -> None:
    """Two POSTs with bodies, fed in odd-sized reads that split headers and bodies."""
    bodies = [os.urandom(70_001), os.urandom(3)]
    wire = b"".join(
        b"POST /u HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(b) + b for b in bodies
    )
    conn = h11.Connection(h11.SERVER)
    got: list[bytes] = []
    current = bytearray()
    for start in range(0, len(wire), 9_999):
        conn.receive_data(wire[start : start + 9_999])
        while True:
            event = conn.next_event()
            if event in (h11.NEED_DATA, h11.PAUSED):
                break
            if isinstance(event, h11.Data):
                current += event.data
            elif isinstance(event, h11.EndOfMessage):
                got.append(bytes(current))
                current = bytearray()
                conn.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
                conn.send(h11.EndOfMessage())
                conn.start_next_cycle()
    assert got == bodies
