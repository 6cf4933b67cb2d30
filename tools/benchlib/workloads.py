"""The measured operations, grouped into scenarios that share a mount.

A scenario runs on one system once and returns a `Measurement` per table row
it produces. Each checks that the work really happened (sampled bytes compared
with the source, file counts, listing lengths) so that a fast wrong answer is
an error, not a win. Timed sections contain only the operation itself;
preparation (caching a file, making fresh mounts) and verification are outside.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tools.benchlib import procs
from tools.benchlib.dataset import Dataset, MiB
from tools.benchlib.systems import Expected, System

UPLOAD_TIMEOUT = 900.0
_READ_BLOCK = 1 * MiB


@dataclass
class Measurement:
    """One run's value of one row, and the bytes that crossed the wire meanwhile (None: no wire)."""

    value: float
    wire: int | None = None


@dataclass(frozen=True)
class Options:
    """Knobs the scenarios need besides the data: fio's run time and where outputs go."""

    fio_seconds: int
    scratch: Path


#: A scenario fills the dict it is given as it goes, so the rows measured before a failure count.
Scenario = Callable[[System, Dataset, Options, int, dict[str, Measurement]], None]


def read_whole(path: Path) -> tuple[float, int]:
    """Read `path` sequentially in 1 MiB requests; return (seconds, bytes read)."""
    buf = bytearray(_READ_BLOCK)
    view = memoryview(buf)
    total = 0
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        while n := os.readv(fd, [view]):
            total += n
    finally:
        os.close(fd)
    return time.perf_counter() - start, total


def check_same_bytes(path: Path, source: Path, samples: int = 32) -> None:
    """Compare `samples` random 64 KiB ranges (plus the first and last) of `path` with `source`."""
    size = source.stat().st_size
    if path.stat().st_size != size:
        raise AssertionError(f"{path} is {path.stat().st_size} bytes, expected {size}")
    rng = random.Random(size)
    offsets = [0, max(0, size - 65536)] + [
        rng.randrange(0, max(1, size - 65536)) for _ in range(samples)
    ]
    with open(path, "rb") as a, open(source, "rb") as b:
        for off in offsets:
            a.seek(off)
            b.seek(off)
            if a.read(65536) != b.read(65536):
                raise AssertionError(f"{path} differs from {source} at offset {off}")


def wire_since_reset(system: System) -> int | None:
    return system.wire_bytes()


# --- scenario: one big file (cold read, re-read, random reads, a new 1 GiB file, 1-byte change) ---


def big_file(
    system: System, data: Dataset, opts: Options, run: int, out: dict[str, Measurement]
) -> None:
    system.mount("main")
    try:
        target = system.root / data.big.name
        procs.drop_caches()
        system.reset_wire()
        seconds, n = read_whole(target)
        cold = Measurement(n / seconds / 1e6, system.wire_bytes())
        check_same_bytes(target, data.big)
        out["cold_read"] = cold

        system.reset_wire()
        seconds, n = read_whole(target)
        out["reread"] = Measurement(n / seconds / 1e6, system.wire_bytes())

        system.reset_wire()
        out["fio"] = Measurement(fio_randread(target, opts.fio_seconds), system.wire_bytes())

        out["write"] = write_new_file(system, data.big.stat().st_size, run)
        out["change_wire"], out["change_time"] = one_byte_change(system, data, run)
    finally:
        system.unmount()


def fio_randread(path: Path, seconds: int) -> float:
    """4 KiB random reads at queue depth 1 for `seconds`; return IOPS (fio's own count)."""
    proc = procs.run(
        ["fio", "--name=randread", f"--filename={path}", "--rw=randread", "--bs=4k",
         "--iodepth=1", "--ioengine=psync", f"--runtime={seconds}", "--time_based",
         "--invalidate=0", "--readonly", "--output-format=json"],
        timeout=seconds + 120,
    )  # fmt: skip
    report = json.loads(proc.stdout[proc.stdout.index("{") :])
    return float(report["jobs"][0]["read"]["iops"])


_write_source: bytearray | None = None


def _source_block(index: int, tag: bytes) -> memoryview:
    """1 MiB of pre-made random data, stamped with `tag` so that no run writes the same chunks."""
    global _write_source
    if _write_source is None:
        _write_source = bytearray(random.Random(3).randbytes(64 * MiB))
    offset = (index % 64) * MiB
    _write_source[offset : offset + len(tag)] = tag
    return memoryview(_write_source)[offset : offset + MiB]


def write_new_file(system: System, size: int, run: int) -> Measurement:
    """Write `size` new bytes to a new file and wait until the server has them; seconds."""
    name = f"written-{run}.bin"
    path = system.root / name
    stamp = f"{system.name}-{run}-{time.time_ns()}".encode()
    system.reset_wire()
    start = time.perf_counter()
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        for i in range(size // MiB):
            block = _source_block(i, stamp + i.to_bytes(8, "little"))
            written = 0
            while written < len(block):
                written += os.write(fd, block[written:])
    finally:
        os.close(fd)
    system.wait_on_server([Expected(name, size)], UPLOAD_TIMEOUT)
    result = Measurement(time.perf_counter() - start, system.wire_bytes())
    os.unlink(path)
    system.wait_on_server([], UPLOAD_TIMEOUT)
    return result


def one_byte_change(system: System, data: Dataset, run: int) -> tuple[Measurement, Measurement]:
    """Flip one byte in the middle of the cached 100 MiB file; (bytes on the wire, seconds)."""
    path = system.root / data.mid.name
    read_whole(path)  # the file is cached before the change, as it is for someone editing it
    offset = data.mid.stat().st_size // 2 + run
    with open(path, "rb") as f:
        f.seek(offset)
        new = (f.read(1)[0] + 1) % 256
    system.reset_wire()
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, bytes([new]), offset)
    finally:
        os.close(fd)
    system.wait_on_server(
        [Expected(data.mid.name, data.mid.stat().st_size, (offset, new))], UPLOAD_TIMEOUT
    )
    seconds = time.perf_counter() - start
    wire = system.wire_bytes()
    return Measurement(wire / 1e6 if wire is not None else float("nan"), wire), Measurement(
        seconds, wire
    )


# --- scenario: the stdlib tree (ls -lR and cp -r out of fresh mounts, then untar into the drive) ---


def tree(
    system: System, data: Dataset, opts: Options, run: int, out: dict[str, Measurement]
) -> None:
    system.mount("main")
    try:
        procs.drop_caches()
        system.reset_wire()
        start = time.perf_counter()
        listing = procs.run(["ls", "-lR", str(system.root / data.tree_name)], timeout=600).stdout
        listed = Measurement(time.perf_counter() - start, system.wire_bytes())
        check_listing(listing, data)
        out["ls"] = listed
    finally:
        system.unmount()

    system.mount("main")
    dest = opts.scratch / f"cp-{system.name}-{run}"
    try:
        procs.drop_caches()
        system.reset_wire()
        start = time.perf_counter()
        procs.run(["cp", "-r", str(system.root / data.tree_name), str(dest)], timeout=1200)
        copied = Measurement(time.perf_counter() - start, system.wire_bytes())
        check_tree(dest, data)
        out["cp"] = copied
    finally:
        shutil.rmtree(dest, ignore_errors=True)
        system.unmount()

    system.mount("main")
    try:
        out["untar_exit"], out["untar_server"] = untar(system, data, run)
    finally:
        system.unmount()


def untar(system: System, data: Dataset, run: int) -> tuple[Measurement, Measurement]:
    """`tar -xf` into the drive; (seconds until tar exits, seconds until all is on the server)."""
    top = f"untar-{run}"
    dest = system.root / top
    expected = tar_members(data.tarball, top)
    system.reset_wire()
    start = time.perf_counter()
    os.mkdir(dest)
    procs.run(["tar", "-xf", str(data.tarball), "-C", str(dest)], timeout=1200)
    exited = time.perf_counter() - start
    system.wait_on_server(expected, UPLOAD_TIMEOUT)
    on_server = time.perf_counter() - start
    wire = system.wire_bytes()
    return Measurement(exited, wire), Measurement(on_server, wire)


_members: dict[Path, list[tuple[str, int]]] = {}


def tar_members(tarball: Path, top: str) -> list[Expected]:
    """The regular files a tarball holds, as server-side expectations under `top`."""
    import tarfile

    if tarball not in _members:
        with tarfile.open(tarball) as tar:
            _members[tarball] = [(m.name, m.size) for m in tar.getmembers() if m.isfile()]
    return [Expected(f"{top}/{name}", size) for name, size in _members[tarball]]


_native_listing_lines: dict[Path, int] = {}


def check_listing(listing: str, data: Dataset) -> None:
    """The listing has as many lines as `ls -lR` of the native tree (every entry was shown)."""
    if data.tree not in _native_listing_lines:
        native = procs.run(["ls", "-lR", str(data.tree)], timeout=120).stdout
        _native_listing_lines[data.tree] = len(native.splitlines())
    want, got = _native_listing_lines[data.tree], len(listing.splitlines())
    if got != want:
        raise AssertionError(f"ls -lR printed {got} lines, the native tree gives {want}")


def check_tree(dest: Path, data: Dataset) -> None:
    from tools.benchlib.dataset import tree_totals

    got = tree_totals(dest)
    if got != (data.tree_files, data.tree_bytes):
        raise AssertionError(
            f"cp -r copied {got[0]} files / {got[1]} bytes, expected {data.tree_files} / {data.tree_bytes}"
        )


# --- scenario: a library of many entries (peak memory of the mount) ---


def many_entries(
    system: System, data: Dataset, opts: Options, run: int, out: dict[str, Measurement]
) -> None:
    system.mount("many")
    try:
        system.reset_wire()
        start = time.perf_counter()
        proc = subprocess.run(
            ["ls", "-lR", str(system.root)], stdout=subprocess.PIPE, check=True, timeout=900
        )
        seconds = time.perf_counter() - start
        wire = system.wire_bytes()
        lines = proc.stdout.count(b"\n")
        if lines < data.many_entries:
            raise AssertionError(f"ls -lR showed {lines} lines for {data.many_entries} entries")
        pid = system.mount_pid()
        out["many_ls"] = Measurement(seconds, wire)
        if pid is not None:
            out["rss"] = Measurement(procs.peak_rss_mib(pid), wire)
    finally:
        system.unmount()


SCENARIOS: dict[str, Scenario] = {"file": big_file, "tree": tree, "many": many_entries}
#: The table rows each scenario produces, in order.
SCENARIO_ROWS: dict[str, list[str]] = {
    "file": ["cold_read", "reread", "fio", "write", "change_wire", "change_time"],
    "tree": ["untar_exit", "untar_server", "ls", "cp"],
    "many": ["many_ls", "rss"],
}
