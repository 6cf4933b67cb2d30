#!/usr/bin/env python3
"""Where a cold sequential read's CPU goes: CPU seconds per GiB of each process, ferry and rclone.

On a 2-core machine the drive, its server, the counting proxy and the kernel
share the cores, so the sum of CPU per GiB bounds cold-read throughput. For
each system this sets up the server and a fresh mount as `tools/bench` does
(same proxy, same data), drops the page cache, reads the big file in 1 MiB
requests and prints MB/s with the CPU seconds per GiB of the mount process,
the server process, and this process (the reader and the proxy threads),
read from /proc/PID/stat. With `--curl` it also fetches the file's chunks
from ferry's server with one `curl` over one kept-alive connection, one GET
per chunk and then one batch POST per read-ahead batch (READ_AHEAD_BATCH_BYTES):
what the server gives a client that costs almost nothing. Run as root.

    .venv/bin/python tools/bench_cold_cpu.py [--size-mib 256] [--runs 2] [--curl]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cache.store import READ_AHEAD_BATCH_BYTES  # noqa: E402
from tools.benchlib import dataset, ferryseed, procs  # noqa: E402
from tools.benchlib.systems import Ferry, Rclone, System  # noqa: E402
from tools.benchlib.workloads import check_same_bytes, read_whole  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def server_pid(work: Path) -> int:
    """The pid of the server process started for `work` (ferry serve or rclone serve)."""
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    for line in ps.splitlines():
        if " serve " in line and str(work) in line:
            return int(line.split()[0])
    raise RuntimeError(f"no server process found for {work}")


def measure(system: System, data: dataset.Dataset, runs: int) -> None:
    server = server_pid(system.work)
    for run in range(runs):
        system.mount("main")
        try:
            mount = system.mount_pid()
            assert mount is not None
            procs.drop_caches()
            before = (cpu_seconds(mount), cpu_seconds(server), own_cpu())
            seconds, n = read_whole(system.root / data.big.name)
            after = (cpu_seconds(mount), cpu_seconds(server), own_cpu())
            gib = n / 2**30
            per = [(b - a) / gib for a, b in zip(before, after, strict=True)]
            print(
                f"{system.name} run {run + 1}: {n / seconds / 1e6:.0f} MB/s; CPU s/GiB: mount"
                f" {per[0]:.2f}, server {per[1]:.2f}, reader+proxy {per[2]:.2f}, sum"
                f" {sum(per):.2f}; load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
            check_same_bytes(system.root / data.big.name, data.big)
        finally:
            system.unmount()


def curl_chunks(ferry: Ferry, data: dataset.Dataset) -> None:
    """Fetch the big file's chunks from ferry's server (through its proxy) with one curl:
    one GET per chunk, then one `POST chunks/batch` per read-ahead batch."""
    import trio

    from remote.client import RemoteClient

    assert ferry.proxy is not None
    url = f"http://127.0.0.1:{ferry.proxy.port}"
    token = ferry.token_file.read_text().strip()

    async def chunk_refs() -> list[tuple[str, int]]:
        async with RemoteClient(url, "main", token) as client:
            page = await client.changes(0, limit=1000)
            entry = next(e for e in page.entries if e.name == data.big.name)
            return [(ref.hash, ref.length) for ref in await client.get_manifest(entry.manifest)]

    refs = trio.run(chunk_refs)
    auth = ["-s", "-H", f"Authorization: Bearer {token}"]
    gets = ["curl", *auth]
    for h, _ in refs:
        gets += ["-o", "/dev/null", f"{url}/v1/libraries/main/chunks/{h}"]
    batches = ["curl"]  # one POST per read-ahead batch, as the drive sends them
    for group in batched(refs, READ_AHEAD_BATCH_BYTES):
        body = json.dumps({"hashes": group})
        batches += [
            *auth,
            "-o",
            "/dev/null",
            "-H",
            "Content-Type: application/json",
            "--data",
            body,
        ]
        batches += [f"{url}/v1/libraries/main/chunks/batch", "--next"]
    server = server_pid(ferry.work)
    gib = data.big.stat().st_size / 2**30
    for what, argv in (("chunk GETs", gets), ("batch POSTs", batches[:-1])):
        for label, drop in (("cold", True), ("page cache warm", False)):
            if drop:
                procs.drop_caches()
            s0, c0, t0 = cpu_seconds(server), os.times(), time.perf_counter()
            subprocess.run(argv, check=True)
            seconds, c1 = time.perf_counter() - t0, os.times()
            child = (c1.children_user - c0.children_user) + (
                c1.children_system - c0.children_system
            )
            print(
                f"curl {what}, {label}: {data.big.stat().st_size / seconds / 1e6:.0f} MB/s;"
                f" CPU s/GiB: server {(cpu_seconds(server) - s0) / gib:.2f}, curl {child / gib:.2f}",
                flush=True,
            )


def batched(refs: list[tuple[str, int]], limit: int) -> list[list[str]]:
    """Consecutive hashes in groups of at most `limit` bytes (a bigger chunk goes alone)."""
    groups: list[list[str]] = []
    size = limit
    for chunk_hash, length in refs:
        if size + length > limit:
            groups.append([])
            size = 0
        groups[-1].append(chunk_hash)
        size += length
    return groups


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--curl", action="store_true", help="also curl ferry's server")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ferry-bench-cpu"))
    args = parser.parse_args()
    data = dataset.prepare(
        args.work / "data", big_size=args.size_mib * dataset.MiB, mid_size=dataset.MiB,
        tree_every=64, many=1,
    )  # fmt: skip
    data = dataclasses.replace(data, many_dirs=1, many_per_dir=1)
    only_big = ferryseed.seed_store

    def seed_big(store, token, files, trees, many_dirs, many_per_dir):  # type: ignore[no-untyped-def]
        only_big(store, token, [data.big], [], many_dirs, many_per_dir)

    ferryseed.seed_store = seed_big  # the other inputs of tools/bench are not read here
    cleanup = procs.Cleanup()
    try:
        ferry = Ferry(args.work / "systems", cleanup, sys.executable)
        rclone = Rclone(args.work / "systems", cleanup, [])
        for system in (ferry, rclone):
            system.proxy_kind = "splice"
            system.prepare(data)
        for system in (ferry, rclone):
            measure(system, data, args.runs)
        if args.curl:
            curl_chunks(ferry, data)
    finally:
        cleanup.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
