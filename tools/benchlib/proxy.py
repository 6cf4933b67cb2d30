"""A TCP proxy that counts the bytes it forwards, fast enough not to be the bottleneck.

Every mount in the benchmark talks to its server through one of these, so
"bytes on the wire" is measured identically for ferry and rclone. Data moves
with splice(2) through a kernel pipe (no copy into Python), one thread per
direction per connection; a Python copy loop would cap cold reads well below
what either system can do over loopback. The interface matches
`tools/faultproxy.FaultProxy` (`start`, `port`, `counters`, `reset_counters`,
`stop`) so that either can be used.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading

log = logging.getLogger(__name__)

_PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class CountingProxy:
    """Forward 127.0.0.1:`port` to `target`, counting bytes each way and connections."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()
        self._up = 0
        self._down = 0
        self._connections = 0
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._stopping = False

    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("CountingProxy.port read before start()")
        return self._listener.getsockname()[1]

    def start(self) -> CountingProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(256)
        self._listener = listener
        thread = threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def counters(self) -> dict[str, int]:
        """Bytes sent towards the server (`bytes_up`), back from it (`bytes_down`), connections."""
        with self._lock:
            return {
                "bytes_up": self._up,
                "bytes_down": self._down,
                "connections": self._connections,
            }

    def reset_counters(self) -> None:
        with self._lock:
            self._up = self._down = self._connections = 0

    def stop(self) -> None:
        """Close the listener and every open connection, then wait for the threads."""
        self._stopping = True
        if self._listener is not None:
            _shutdown(self._listener)
            self._listener.close()
        with self._lock:
            open_sockets = list(self._sockets)
        for sock in open_sockets:
            _shutdown(sock)
        for thread in self._threads:
            thread.join(timeout=5)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError as exc:
                log.warning("proxy: cannot reach the server at %s:%d: %s", *self.target, exc)
                client.close()
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._connections += 1
                self._sockets.update((client, upstream))
            pair = _Pair()
            for src, dst, up in ((client, upstream, True), (upstream, client, False)):
                thread = threading.Thread(
                    target=self._pump, args=(pair, src, dst, up), name="proxy-pump", daemon=True
                )
                thread.start()
                self._threads.append(thread)
            self._threads = [t for t in self._threads if t.is_alive()]

    def _pump(self, pair: _Pair, src: socket.socket, dst: socket.socket, up: bool) -> None:
        """Move bytes src -> dst until EOF; half-close dst so the other side sees it."""
        read_end, write_end = os.pipe()
        try:
            try:
                fcntl.fcntl(write_end, _F_SETPIPE_SZ, _PIPE_SIZE)
            except OSError:
                pass  # a smaller pipe only costs more system calls
            while True:
                n = os.splice(src.fileno(), write_end, _PIPE_SIZE)
                if n == 0:
                    break
                left = n
                while left:
                    left -= os.splice(read_end, dst.fileno(), left)
                with self._lock:
                    if up:
                        self._up += n
                    else:
                        self._down += n
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        except OSError:
            _shutdown(src)
            _shutdown(dst)
        finally:
            os.close(read_end)
            os.close(write_end)
            if pair.finish():
                with self._lock:
                    self._sockets.difference_update((src, dst))
                src.close()
                dst.close()


class _Pair:
    """The two sockets of one proxied connection; closed when both directions finished."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = 2

    def finish(self) -> bool:
        """Mark one direction done; True for the last one, which closes the sockets."""
        with self._lock:
            self._open -= 1
            return self._open == 0


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def make_proxy(target: tuple[str, int], kind: str = "auto"):
    """A started counting proxy to `target`: the shared FaultProxy if asked or present, else ours.

    `kind` is "auto" (FaultProxy when tools/faultproxy.py exists), "fault" or "splice".
    """
    if kind in ("auto", "fault"):
        try:
            from tools.faultproxy import FaultProxy  # type: ignore[import-not-found]
        except ImportError:
            if kind == "fault":
                raise
        else:
            proxy = FaultProxy(target=target)
            proxy.start()
            return proxy
    return CountingProxy(target).start()
