"""Benchmark the sync server over loopback: chunk throughput, commit latency, feed wake-up.

Starts a real `ferry serve` on 127.0.0.1 with a fresh data directory, drives
it with `RemoteClient` (the drive's client) and prints:

* chunk upload and download throughput (MB/s) with N concurrent requests,
* commit latency (median, p95) of one-op commits, sequentially,
* change-feed notification latency: how long after a commit was answered a
  waiting long-poll returned (and after it was sent).

    /tmp/venv/bin/python tools/bench_server.py [--mib 128] [--chunk-kib 1024] [--parallel 4]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from remote import protocol  # noqa: E402
from remote.client import RemoteClient  # noqa: E402
from remote.protocol import ROOT_ID, op_create  # noqa: E402
from remote.server import admin  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(data_dir: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "vfs", "serve", str(data_dir), "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/capabilities", timeout=1).is_success:
                return proc
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("ferry serve did not start within 20 s")


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _parallel(jobs: list, parallel: int) -> None:
    limiter = trio.CapacityLimiter(parallel)

    async def run(job) -> None:
        async with limiter:
            await job()

    async with trio.open_nursery() as nursery:
        for job in jobs:
            nursery.start_soon(run, job)


async def bench(url: str, library: str, token: str, args: argparse.Namespace) -> None:
    size = args.chunk_kib * 1024
    count = max(1, args.mib * 1024 * 1024 // size)
    blobs = [os.urandom(size) for _ in range(count)]
    hashes = [protocol.hash_bytes(b) for b in blobs]
    total_mb = count * size / 1e6
    async with RemoteClient(url, library, token) as client:
        start = time.perf_counter()
        await _parallel(
            [lambda h=h, b=b: client.put_chunk(h, b) for h, b in zip(hashes, blobs, strict=True)],
            args.parallel,
        )
        up = time.perf_counter() - start
        print(
            f"chunk upload:   {total_mb / up:8.1f} MB/s  ({count} x {args.chunk_kib} KiB, "
            f"{args.parallel} parallel, server hashes + fsyncs each)"
        )

        start = time.perf_counter()
        await _parallel([lambda h=h: client.get_chunk(h) for h in hashes], args.parallel)
        down = time.perf_counter() - start
        print(f"chunk download: {total_mb / down:8.1f} MB/s  (client verifies each hash)")

        small = [os.urandom(16 * 1024) for _ in range(256)]
        small_hashes = [protocol.hash_bytes(b) for b in small]
        for h, b in zip(small_hashes, small, strict=True):
            await client.put_chunk(h, b)
        start = time.perf_counter()
        await client.get_chunks(small_hashes)
        batch = time.perf_counter() - start
        print(f"batch download: {len(small) / batch:8.0f} chunks/s (256 x 16 KiB in one request)")

        latencies = []
        for i in range(args.commits):
            op = op_create(uuid.uuid4().hex, ROOT_ID, f"d{i}", "dir", 0o755, 1)
            start = time.perf_counter()
            await client.commit(uuid.uuid4().hex, [op], device="bench")
            latencies.append(time.perf_counter() - start)
        print(
            f"commit latency: median {statistics.median(latencies) * 1e3:6.2f} ms, "
            f"p95 {_pct(latencies, 0.95) * 1e3:6.2f} ms  ({args.commits} one-op commits)"
        )

        after_answer, after_send = [], []
        async with RemoteClient(url, library, token) as poller:
            for i in range(args.polls):
                cursor = (await client.library_info())["revision"]
                returned: list[float] = []

                async def poll(cursor: int = cursor, returned: list[float] = returned) -> None:
                    await poller.changes(cursor, wait=10)
                    returned.append(time.perf_counter())

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(poll)
                    await trio.sleep(0.05)
                    op = op_create(uuid.uuid4().hex, ROOT_ID, f"p{i}", "dir", 0o755, 1)
                    sent = time.perf_counter()
                    await client.commit(uuid.uuid4().hex, [op], device="bench")
                    answered = time.perf_counter()
                after_send.append(returned[0] - sent)
                after_answer.append(returned[0] - answered)
        print(
            f"feed wake-up:   median {statistics.median(after_send) * 1e3:6.2f} ms after the "
            f"commit was sent (p95 {_pct(after_send, 0.95) * 1e3:.2f}), median "
            f"{statistics.median(after_answer) * 1e3:+6.2f} ms relative to its answer "
            f"({args.polls} samples)"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=128, help="MiB to upload and download")
    parser.add_argument("--chunk-kib", type=int, default=1024, help="chunk size in KiB")
    parser.add_argument("--parallel", type=int, default=4, help="concurrent chunk requests")
    parser.add_argument("--commits", type=int, default=300, help="commits to time")
    parser.add_argument("--polls", type=int, default=50, help="long-poll wake-ups to time")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ferry-bench-") as tmp:
        data = Path(tmp) / "data"
        token = admin.add_user(data, "bench")
        admin.add_library(data, "bench", "bench")
        port = _free_port()
        proc = _start_server(data, port)
        try:
            trio.run(bench, f"http://127.0.0.1:{port}", "bench", token, args)
        finally:
            proc.terminate()
            proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
