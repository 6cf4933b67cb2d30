"""One fewer copy of every request body byte in h11, the HTTP/1.1 parser under hypercorn.

h11 keeps what the socket delivered in a bytearray and hands body bytes out
with `ReceiveBuffer.maybe_extract_at_most`, which slices the
buffer once to see whether it is empty and then again to extract (h11 0.16): two copies
of every uploaded byte before hypercorn copies it once more into the ASGI
message. On an upload that is most of the buffer's traffic (1 GiB of chunks
is 4,000 socket reads of 256 KiB), so `install` replaces that method with one
that gives the whole buffer away when all of it is wanted (the usual case for
a body: the socket read ends inside it) and slices once otherwise. Same
results, same types (a bytearray, None when empty); `tests/t1_h11_body.py`
checks them against the original and through a whole h11 connection.
"""

from __future__ import annotations

import h11._receivebuffer as _receivebuffer

_ReceiveBuffer = _receivebuffer.ReceiveBuffer
_original = _ReceiveBuffer.maybe_extract_at_most


def maybe_extract_at_most(self: _ReceiveBuffer, count: int) -> bytearray | None:
    """Up to `count` bytes from the front of the buffer, or None if it is empty."""
    data = self._data
    if not data or count <= 0:
        return None
    if count >= len(data):
        self._data = bytearray()
        self._next_line_search = 0
        self._multiple_lines_search = 0
        return data
    return self._extract(count)


def install() -> bool:
    """Use `maybe_extract_at_most` in h11; False (nothing changed) if h11's buffer is not
    the one this was written for."""
    fields = ("_data", "_next_line_search", "_multiple_lines_search")
    probe = _ReceiveBuffer()
    if not all(hasattr(probe, f) for f in fields) or not hasattr(_ReceiveBuffer, "_extract"):
        return False
    _ReceiveBuffer.maybe_extract_at_most = maybe_extract_at_most  # type: ignore[method-assign]
    return True


def uninstall() -> None:
    """Put h11's own method back (for tests)."""
    _ReceiveBuffer.maybe_extract_at_most = _original  # type: ignore[method-assign]
