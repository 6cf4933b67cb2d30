"""tools/bench's own parts that can be checked without mounts: the counting proxy and the verdicts."""

from __future__ import annotations

import socket
import threading

from tools.benchlib.proxy import CountingProxy
from tools.benchlib.report import Row, cell, table, verdict
from tools.benchlib.workloads import Measurement


def _echo_server() -> tuple[socket.socket, threading.Thread]:
    """A server that answers each connection with everything it received, reversed, then closes."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def serve() -> None:
        conn, _ = server.accept()
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
        conn.sendall(received[::-1])
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server, thread


def test_proxy_forwards_both_ways_and_counts_every_byte() -> None:
    server, thread = _echo_server()
    proxy = CountingProxy(server.getsockname()).start()
    try:
        payload = bytes(range(256)) * 4096 + b"tail"
        with socket.create_connection(("127.0.0.1", proxy.port)) as client:
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := client.recv(65536):
                answer += chunk
        thread.join(5)
        assert answer == payload[::-1]
        assert proxy.counters() == {
            "bytes_up": len(payload),
            "bytes_down": len(payload),
            "connections": 1,
        }
        proxy.reset_counters()
        assert proxy.counters() == {"bytes_up": 0, "bytes_down": 0, "connections": 0}
    finally:
        proxy.stop()
        server.close()


def test_verdict_follows_the_direction_of_each_row() -> None:
    faster = Row("cold_read", "read", "MB/s", higher=True, target=2.0)
    assert verdict(faster, 600.0, 280.0) == ("2.14x", ">= 2x", "yes")
    assert verdict(faster, 500.0, 280.0)[2] == "NO"
    quicker = Row("write", "write", "s", higher=False, target=0.5)
    assert verdict(quicker, 5.0, 11.6)[2] == "yes"
    assert verdict(quicker, 6.0, 11.6)[2] == "NO"
    bounded = Row("rss", "rss", "MiB", higher=False, limit=200.0)
    assert verdict(bounded, 250.0, 60.0)[2] == "NO"
    assert verdict(faster, None, 280.0) == ("-", ">= 2x", "-")


def test_table_shows_median_spread_and_why_a_cell_is_missing() -> None:
    assert cell([3.0, 1.0, 2.0]) == "2.00 (1.00-3.00)"
    row = Row("write", "1 GiB written", "s", higher=False, target=0.5)
    text = table(
        [row],
        {"rclone": {"write": [Measurement(10.0, 2_000_000), Measurement(12.0, 2_000_000)]}},
        {"ferry": {"write": "server down"}},
        ["rclone", "ferry"],
    )
    assert "11.0 (10.0-12.0)" in text
    assert "n/a [1]" in text and "[1] ferry: server down" in text
