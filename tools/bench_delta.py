#!/usr/bin/env python3
"""Delta sync benchmark: bytes on the wire for small edits of a large file (issue 6).

Each device is a real `ferry mount` whose server connection goes through its
own counting proxy (`tools/benchlib/proxy.CountingProxy`), so every byte of
HTTP both ways is counted: requests, headers, JSON and chunks. The file is
random bytes (no compression or dedup luck), written and synced first.

Cases, each measured from just before the edit until `ferry sync` (or the
read) returns:

  a  one byte overwritten in the middle              (device A, file cached)
  b  4 KiB inserted in the middle, the rest shifts   (device A)
  c  1 MiB appended                                  (device A)
  d  a, b, c made on device B, then the whole file read on device A,
     which had the previous version cached           (A's bytes)
  e  a on device E, which had only the first chunk cached

`--rclone` measures a..c with `rclone mount --vfs-cache-mode full` over
`rclone serve webdav` through the same kind of proxy (rclone uploads whole
files). `tests/t5_delta.py` runs the same cases on a smaller file and asserts
the bounds, so a regression fails CI.

    sudo /tmp/venv/bin/python tools/bench_delta.py --size-mib 256 [--rclone]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.benchlib import procs
from tools.benchlib.proxy import CountingProxy
from tools.benchlib.systems import free_port, wait_http

log = logging.getLogger("bench_delta")

MIB = 1024 * 1024
#: FastCDC's effective mean chunk with ferry's sizes (avg 1 MiB + min 256 KiB / 4; cache/chunking.py).
MEAN_CHUNK = MIB + 64 * 1024
METADATA_ALLOWANCE = 64 * 1024
INSERT = 4096
APPEND = MIB
MOUNT_TIMEOUT = 30.0


@dataclass
class Wire:
    """Bytes one device sent (`up`) and received (`down`) during one case."""

    up: int
    down: int


class Device:
    """One `ferry mount` (its own cache dir) talking to the server through its own proxy."""

    def __init__(self, rig: Rig, name: str) -> None:
        self.rig = rig
        self.name = name
        self.mnt = rig.work / f"{name}-mnt"
        self.cache = rig.work / f"{name}-cache"
        self.proxy = CountingProxy(("127.0.0.1", rig.port)).start()
        rig.cleanup.push(f"proxy of {name}", self.proxy.stop)
        self.mnt.mkdir()
        log_path = rig.work / f"{name}.log"
        argv = [
            sys.executable, "-m", "vfs", "mount", f"http://127.0.0.1:{self.proxy.port}/main",
            str(self.mnt), "--token-file", str(rig.token_file), "--cache-dir", str(self.cache),
            "--foreground", "--writeback-delay", "0.2",
        ]  # fmt: skip
        self.proc, self._stop = procs.start_process(argv, log_path, rig.cleanup)
        self._unmount = rig.cleanup.push(
            f"unmount {self.mnt}", lambda: procs.lazy_unmount(self.mnt)
        )
        procs.wait_mounted(self.mnt, self.proc, MOUNT_TIMEOUT, log_path)

    def sync(self) -> None:
        self.rig.ferry("sync", str(self.mnt), "--timeout", "600", timeout=660)

    def measure(self, action: Callable[[], None]) -> Wire:
        """Run `action` (which ends synced) and return the bytes it moved on this device's wire."""
        self.proxy.reset_counters()
        action()
        counters = self.proxy.counters()
        return Wire(counters["bytes_up"], counters["bytes_down"])

    def close(self) -> None:
        try:
            self.rig.ferry("unmount", str(self.mnt), timeout=120)
            self.proc.wait(60)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            log.warning("ferry unmount %s did not finish cleanly: %s", self.mnt, exc)
        self._unmount()
        self._stop()


class Rig:
    """A `ferry serve` with one library `main`, in a scratch directory; devices come and go."""

    def __init__(self, work: Path, cleanup: procs.Cleanup) -> None:
        self.work = work
        self.cleanup = cleanup
        store = work / "server-data"
        token = self.ferry("admin", "--data", str(store), "add-user", "bench").stdout
        self.token_file = work / "token"
        self.token_file.write_text(token.strip().splitlines()[-1].strip() + "\n")
        self.ferry("admin", "--data", str(store), "add-library", "main", "--owner", "bench")
        self.port = free_port()
        log_path = work / "serve.log"
        proc, _ = procs.start_process(
            [
                sys.executable,
                "-m",
                "vfs",
                "serve",
                str(store),
                "--listen",
                f"127.0.0.1:{self.port}",
            ],
            log_path,
            cleanup,
        )
        wait_http(f"http://127.0.0.1:{self.port}/v1/capabilities", proc, log_path)

    def ferry(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return procs.run([sys.executable, "-m", "vfs", *args], timeout=timeout)


# --- the edits (plain file operations, as a program would make them) ------------------


def random_bytes(seed: int, size: int) -> bytearray:
    """`size` reproducible random bytes (built in 16 MiB pieces: randbytes caps one call)."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        out += rng.randbytes(min(16 * MIB, size - len(out)))
    return out


def write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        for start in range(0, len(data), MIB):
            f.write(data[start : start + MIB])


def overwrite_byte(path: Path, content: bytearray) -> None:
    mid = len(content) // 2
    content[mid] ^= 0xFF
    with open(path, "r+b") as f:
        f.seek(mid)
        f.write(bytes([content[mid]]))


def insert_block(path: Path, content: bytearray) -> None:
    """4 KiB into the middle: as any program must, rewrite everything after the insertion."""
    mid = len(content) // 2 + 12345
    block = random.Random(len(content)).randbytes(INSERT)
    content[mid:mid] = block
    with open(path, "r+b") as f:
        f.seek(mid)
        f.write(bytes(content[mid:]))


def append_block(path: Path, content: bytearray) -> None:
    block = random.Random(len(content) + 1).randbytes(APPEND)
    content += block
    with open(path, "ab") as f:
        f.write(block)


EDITS: list[tuple[str, str, Callable[[Path, bytearray], None]]] = [
    ("a", "1 byte overwritten in the middle", overwrite_byte),
    ("b", "4 KiB inserted in the middle", insert_block),
    ("c", "1 MiB appended", append_block),
]


def digest(data: bytes | bytearray) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def read_all(path: Path) -> str:
    with open(path, "rb") as f:
        h = hashlib.blake2b(digest_size=16)
        while block := f.read(MIB):
            h.update(block)
    return h.hexdigest()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} not reached within {timeout:.0f} s")


# --- the cases --------------------------------------------------------------------------


def run_ferry(work: Path, size: int, seed: int = 6) -> dict[str, Wire]:
    """All five cases against a fresh server; returns each case's bytes on the measured device."""
    cleanup = procs.Cleanup()
    results: dict[str, Wire] = {}
    try:
        rig = Rig(work, cleanup)
        content = random_bytes(seed, size)
        a = Device(rig, "a")
        path_a = a.mnt / "big.bin"
        write_file(path_a, content)
        a.sync()
        for key, _, edit in EDITS:
            results[key] = a.measure(lambda edit=edit: (edit(path_a, content), a.sync()))
            assert read_all(path_a) == digest(content), (
                f"case {key}: content differs after the edit"
            )

        b = Device(rig, "b")
        path_b = b.mnt / "big.bin"
        assert read_all(path_b) == digest(content)  # B has it cached too, so it can edit it
        total = Wire(0, 0)
        for key, _, edit in EDITS:
            results[f"d{key}-b"] = b.measure(lambda edit=edit: (edit(path_b, content), b.sync()))

            def read_on_a() -> None:
                wait_until(lambda: path_a.stat().st_size == len(content), 60, "the edit on A")
                a.sync()  # the mirror has caught up with the server
                if read_all(path_a) != digest(content):
                    raise AssertionError("device A read other bytes than device B wrote")

            wire = a.measure(read_on_a)
            results[f"d{key}"] = wire
            total = Wire(total.up + wire.up, total.down + wire.down)
        results["d"] = total

        e = Device(rig, "e")
        path_e = e.mnt / "big.bin"
        with open(
            path_e, "rb"
        ) as f:  # one read inside the first chunk, not sequential: no read-ahead
            f.seek(64 * 1024)
            f.read(1)
        results["e"] = e.measure(lambda: (overwrite_byte(path_e, content), e.sync()))
        assert read_all(path_a) != "" and read_all(path_e) == digest(content)
        for device in (e, b, a):
            device.close()
    finally:
        cleanup.close()
    return results


def run_rclone(work: Path, size: int, seed: int = 6) -> dict[str, Wire]:
    """Cases a..c through `rclone mount --vfs-cache-mode full` (whole-file uploads)."""
    cleanup = procs.Cleanup()
    results: dict[str, Wire] = {}
    try:
        served = work / "served"
        (served / "main").mkdir(parents=True)
        content = random_bytes(seed, size)
        (served / "main" / "big.bin").write_bytes(content)
        config = work / "rclone.conf"
        config.write_text("")
        port, rc_port = free_port(), free_port()
        proc, _ = procs.start_process(
            ["rclone", "serve", "webdav", str(served), "--addr", f"127.0.0.1:{port}",
             "--config", str(config)],
            work / "serve.log", cleanup,
        )  # fmt: skip
        wait_http(f"http://127.0.0.1:{port}/", proc, work / "serve.log")
        proxy = CountingProxy(("127.0.0.1", port)).start()
        cleanup.push("rclone proxy", proxy.stop)
        mnt = work / "mnt"
        mnt.mkdir()
        mount, _ = procs.start_process(
            ["rclone", "mount", ":webdav:main", str(mnt), "--webdav-url",
             f"http://127.0.0.1:{proxy.port}", "--vfs-cache-mode", "full",
             "--cache-dir", str(work / "cache"), "--vfs-write-back", "0.2s",
             "--rc", "--rc-addr", f"127.0.0.1:{rc_port}", "--rc-no-auth", "--config", str(config)],
            work / "mount.log", cleanup,
        )  # fmt: skip
        cleanup.push(f"unmount {mnt}", lambda: procs.lazy_unmount(mnt))
        procs.wait_mounted(mnt, mount, MOUNT_TIMEOUT, work / "mount.log")
        path = mnt / "big.bin"
        assert read_all(path) == digest(content)  # cached, like ferry's device A

        def uploaded() -> bool:
            req = urllib.request.Request(
                f"http://127.0.0.1:{rc_port}/vfs/stats", data=b"{}", method="POST",
                headers={"Content-Type": "application/json"},
            )  # fmt: skip
            with urllib.request.urlopen(req, timeout=5) as resp:
                disk = json.load(resp).get("diskCache", {})
            busy = int(disk.get("uploadsInProgress", 0)) + int(disk.get("uploadsQueued", 0))
            served_file = served / "main" / "big.bin"
            return busy == 0 and served_file.stat().st_size == len(content)

        for key, _, edit in EDITS:
            proxy.reset_counters()
            edit(path, content)
            time.sleep(0.5)
            wait_until(uploaded, 600, f"rclone's upload of case {key}")
            counters = proxy.counters()
            results[key] = Wire(counters["bytes_up"], counters["bytes_down"])
            assert digest((served / "main" / "big.bin").read_bytes()) == digest(content)
    finally:
        cleanup.close()
    return results


def bounds(size: int) -> dict[str, Wire]:
    """The issue's targets: a..d within 2 mean chunks + 64 KiB each way; e within 3 chunks."""
    two = 2 * MEAN_CHUNK + METADATA_ALLOWANCE
    three = 3 * MEAN_CHUNK + METADATA_ALLOWANCE
    out = {k: Wire(two, two) for k in ("a", "b", "c", "da", "db", "dc")}
    out["e"] = Wire(three, three)
    return out


def report(size: int, ferry: dict[str, Wire], rclone: dict[str, Wire] | None) -> str:
    names = {k: v for k, v, _ in EDITS}
    rows = [("a", names["a"]), ("b", names["b"]), ("c", names["c"])]
    rows += [(f"d{k}", f"on B, read on A: {names[k]}") for k in "abc"]
    rows += [("e", "a, with only the first chunk cached")]
    limit = bounds(size)
    lines = [
        f"file: {size / MIB:.0f} MiB of random bytes; mean chunk {MEAN_CHUNK / MIB:.2f} MiB",
        f"{'case':<5}{'what':<42}{'sent':>11}{'received':>11}{'target':>11}{'rclone sent':>13}"
        f"{'rclone recv':>13}  verdict",
    ]
    for key, what in rows:
        wire = ferry[key]
        rc = (rclone or {}).get(key)
        ok = wire.up <= limit[key].up and wire.down <= limit[key].down
        lines.append(
            f"{key:<5}{what:<42}{_mib(wire.up):>11}{_mib(wire.down):>11}{_mib(limit[key].up):>11}"
            f"{_mib(rc.up) if rc else '-':>13}{_mib(rc.down) if rc else '-':>13}  "
            f"{'ok' if ok else 'OVER'}"
        )
    return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / MIB:.3f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--rclone", action="store_true", help="also measure rclone mount")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    size = args.size_mib * MIB
    with tempfile.TemporaryDirectory(prefix="ferry-bench-delta-") as tmp:
        (Path(tmp) / "ferry").mkdir()
        ferry = run_ferry(Path(tmp) / "ferry", size)
        rclone = None
        if args.rclone:
            if shutil.which("rclone") is None:
                print("rclone is not installed; its columns stay empty", file=sys.stderr)
            else:
                (Path(tmp) / "rclone").mkdir()
                rclone = run_rclone(Path(tmp) / "rclone", size)
    if args.json:
        print(json.dumps({k: vars(v) for k, v in ferry.items()}))
    print(report(size, ferry, rclone))
    over = [k for k, v in bounds(size).items() if ferry[k].up > v.up or ferry[k].down > v.down]
    return 1 if over else 0


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())
