"""Benchmark the sync server over loopback: chunk throughput, latency, commits, feed wake-up.

Starts a real `ferry serve` on 127.0.0.1 with a fresh data directory, drives
it with `RemoteClient` (the drive's client) and prints:

* request latency: `GET /v1/capabilities` (no auth) and `GET /v1/libraries/L`
  (token lookup + one SQLite read), median and p95, sequentially,
* chunk upload and download throughput (MB/s) for every chunk size and
  number of requests in flight asked for (default 1 and 4 MiB at 1/4/8),
  fresh random chunks per cell so that uploads are never deduplicated,
* batch download: 256 x 16 KiB chunks in one request (chunks/s) and 64 x 1 MiB
  chunks through `get_chunks` (MB/s),
* commit latency (median, p95) of one-op commits, sequentially,
* change-feed notification latency: how long after a commit was answered a
  waiting long-poll returned (and after it was sent).

    /tmp/venv/bin/python tools/bench_server.py [--mib 64] [--sizes-kib 1024,4096]
        [--parallel 1,4,8] [--only latency,chunks,batch,commits,feed] [--serve-arg ARG ...]

`--serve-arg` passes extra arguments to `ferry serve` (to compare its options).
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
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from remote import protocol  # noqa: E402
from remote.client import RemoteClient  # noqa: E402
from remote.protocol import ROOT_ID, op_create  # noqa: E402
from remote.server import admin  # noqa: E402

SECTIONS = ("latency", "chunks", "batch", "commits", "feed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(data_dir: Path, port: int, extra: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vfs",
            "serve",
            str(data_dir),
            "--listen",
            f"127.0.0.1:{port}",
            *extra,
        ],
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


def _ms(samples: list[float]) -> str:
    return f"median {statistics.median(samples) * 1e3:6.2f} ms, p95 {_pct(samples, 0.95) * 1e3:6.2f} ms"


async def _parallel(jobs: list[Callable[[], Awaitable[object]]], parallel: int) -> None:
    limiter = trio.CapacityLimiter(parallel)

    async def run(job: Callable[[], Awaitable[object]]) -> None:
        async with limiter:
            await job()

    async with trio.open_nursery() as nursery:
        for job in jobs:
            nursery.start_soon(run, job)


async def _timed(count: int, call: Callable[[], Awaitable[object]]) -> list[float]:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - start)
    return samples


def _blobs(count: int, size: int) -> tuple[list[bytes], list[str]]:
    blobs = [os.urandom(size) for _ in range(count)]
    return blobs, [protocol.hash_bytes(b) for b in blobs]


async def bench_latency(client: RemoteClient, args: argparse.Namespace) -> None:
    await _timed(20, client.capabilities)  # warm the connection pool
    caps = await _timed(args.requests, client.capabilities)
    print(f"GET capabilities:     {_ms(caps)}  ({args.requests} sequential, no auth)")
    info = await _timed(args.requests, client.library_info)
    print(f"GET library info:     {_ms(info)}  ({args.requests} sequential, token + SQLite)")


async def bench_chunks(client: RemoteClient, args: argparse.Namespace) -> None:
    for size_kib in args.sizes_kib:
        size = size_kib * 1024
        count = max(8, args.mib * 1024 * 1024 // size)
        total_mb = count * size / 1e6
        for parallel in args.parallel:
            blobs, hashes = _blobs(count, size)
            start = time.perf_counter()
            await _parallel(
                [
                    lambda h=h, b=b: client.put_chunk(h, b)
                    for h, b in zip(hashes, blobs, strict=True)
                ],
                parallel,
            )
            up = total_mb / (time.perf_counter() - start)
            start = time.perf_counter()
            await _parallel([lambda h=h: client.get_chunk(h) for h in hashes], parallel)
            down = total_mb / (time.perf_counter() - start)
            print(
                f"chunks {size_kib:5d} KiB x {count:4d}, {parallel} in flight: "
                f"upload {up:7.1f} MB/s   download {down:7.1f} MB/s"
            )


async def bench_batch(client: RemoteClient, args: argparse.Namespace) -> None:
    small, small_hashes = _blobs(256, 16 * 1024)
    await _parallel(
        [lambda h=h, b=b: client.put_chunk(h, b) for h, b in zip(small_hashes, small, strict=True)],
        4,
    )
    start = time.perf_counter()
    await client.get_chunks(small_hashes)
    rate = len(small) / (time.perf_counter() - start)
    print(f"batch download:       {rate:8.0f} chunks/s (256 x 16 KiB in one request)")
    big, big_hashes = _blobs(64, 1024 * 1024)
    await _parallel(
        [lambda h=h, b=b: client.put_chunk(h, b) for h, b in zip(big_hashes, big, strict=True)], 4
    )
    start = time.perf_counter()
    await client.get_chunks(big_hashes)
    mbs = 64 * 1024 * 1024 / 1e6 / (time.perf_counter() - start)
    print(f"batch download:       {mbs:8.1f} MB/s    (64 x 1 MiB in one request)")


async def bench_commits(client: RemoteClient, args: argparse.Namespace) -> None:
    latencies = []
    for i in range(args.commits):
        op = op_create(uuid.uuid4().hex, ROOT_ID, f"d{i}", "dir", 0o755, 1)
        start = time.perf_counter()
        await client.commit(uuid.uuid4().hex, [op], device="bench")
        latencies.append(time.perf_counter() - start)
    print(f"commit latency:       {_ms(latencies)}  ({args.commits} one-op commits)")


async def bench_feed(
    client: RemoteClient, url: str, library: str, token: str, args: argparse.Namespace
) -> None:
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
        f"feed wake-up:         median {statistics.median(after_send) * 1e3:6.2f} ms after the "
        f"commit was sent (p95 {_pct(after_send, 0.95) * 1e3:.2f}), median "
        f"{statistics.median(after_answer) * 1e3:+6.2f} ms relative to its answer "
        f"({args.polls} samples)"
    )


async def bench(url: str, library: str, token: str, args: argparse.Namespace) -> None:
    async with RemoteClient(url, library, token) as client:
        if "latency" in args.only:
            await bench_latency(client, args)
        if "chunks" in args.only:
            await bench_chunks(client, args)
        if "batch" in args.only:
            await bench_batch(client, args)
        if "commits" in args.only:
            await bench_commits(client, args)
        if "feed" in args.only:
            await bench_feed(client, url, library, token, args)


def _int_list(value: str) -> list[int]:
    return [int(x) for x in value.split(",") if x.strip()]


def _sections(value: str) -> list[str]:
    chosen = [x.strip() for x in value.split(",") if x.strip()]
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown sections {sorted(unknown)}; pick from {SECTIONS}"
        )
    return chosen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="MiB moved per chunk cell")
    parser.add_argument("--sizes-kib", type=_int_list, default=[1024, 4096], help="chunk sizes")
    parser.add_argument("--parallel", type=_int_list, default=[1, 4, 8], help="requests in flight")
    parser.add_argument("--requests", type=int, default=500, help="latency samples")
    parser.add_argument("--commits", type=int, default=300, help="commits to time")
    parser.add_argument("--polls", type=int, default=50, help="long-poll wake-ups to time")
    parser.add_argument("--only", type=_sections, default=list(SECTIONS), help="sections to run")
    parser.add_argument(
        "--serve-arg", action="append", default=[], help="extra argument for ferry serve"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ferry-bench-") as tmp:
        data = Path(tmp) / "data"
        token = admin.add_user(data, "bench")
        admin.add_library(data, "bench", "bench")
        port = _free_port()
        proc = _start_server(data, port, args.serve_arg)
        print(f"ferry serve pid {proc.pid} {' '.join(args.serve_arg)}", flush=True)
        try:
            trio.run(bench, f"http://127.0.0.1:{port}", "bench", token, args)
        finally:
            proc.terminate()
            proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
