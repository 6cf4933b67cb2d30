"""The three things measured side by side, behind one small interface.

`NativeDir` is a plain directory on the local disk (the physical limit),
`Rclone` is `rclone serve webdav` plus `rclone mount --vfs-cache-mode full`,
and `Ferry` is `ferry serve` plus `ferry mount`. The two remote systems sit
behind a counting proxy each, so bytes on the wire are counted the same way.
Each exposes `root` (where workloads read and write), `mount`/`unmount`
(fresh cache each time), `wait_on_server` and the wire counters.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tools.benchlib import procs
from tools.benchlib.dataset import Dataset
from tools.benchlib.proxy import make_proxy

log = logging.getLogger(__name__)

MOUNT_TIMEOUT = 60.0


class Unavailable(Exception):
    """A system cannot be measured on this machine right now; the message says why."""


@dataclass(frozen=True)
class Expected:
    """What must be on the server before an upload counts as done: a file and its size,
    optionally one byte at an offset (for changes that keep the size)."""

    relpath: str
    size: int
    byte_at: tuple[int, int] | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 30) -> None:
    """Wait until `url` answers at all (any HTTP status), or fail with the server's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Unavailable(f"{proc.args[0]} exited {proc.returncode}: {procs.tail(log_path, 5)}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.05)
    raise Unavailable(f"{url} did not answer within {timeout:.0f}s: {procs.tail(log_path, 5)}")


class System:
    """Base: a named system with a work area, a cleanup registry and optional wire counters."""

    name = "?"

    def __init__(self, work: Path, cleanup: procs.Cleanup) -> None:
        self.work = work / self.name
        self.cleanup = cleanup
        self.proxy = None
        self.mount_proc: subprocess.Popen | None = None
        self._mounts = 0
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)

    @property
    def root(self) -> Path:
        raise NotImplementedError

    def prepare(self, data: Dataset) -> None:
        raise NotImplementedError

    def mount(self, library: str = "main") -> None:
        raise NotImplementedError

    def unmount(self) -> None:
        raise NotImplementedError

    def wait_on_server(self, expected: list[Expected], timeout: float) -> None:
        raise NotImplementedError

    def wire_bytes(self) -> int | None:
        """Bytes both ways through this system's proxy since the last reset (None if no wire)."""
        if self.proxy is None:
            return None
        c = self.proxy.counters()
        return c["bytes_up"] + c["bytes_down"]

    def reset_wire(self) -> None:
        if self.proxy is not None:
            self.proxy.reset_counters()

    def mount_pid(self) -> int | None:
        return self.mount_proc.pid if self.mount_proc else None

    def _start_proxy(self, port: int) -> None:
        self.proxy = make_proxy(("127.0.0.1", port), self.proxy_kind)
        self.cleanup.push(f"{self.name} proxy", self.proxy.stop)

    proxy_kind = "auto"

    def _fresh_mount_dirs(self) -> tuple[Path, Path]:
        """A new mount point and an empty cache directory for the next mount."""
        self._mounts += 1
        mnt = self.work / "mnt"
        cache = self.work / f"cache-{self._mounts}"
        for old in self.work.glob("cache-*"):
            shutil.rmtree(old, ignore_errors=True)
        mnt.mkdir(exist_ok=True)
        cache.mkdir()
        return mnt, cache


class NativeDir(System):
    """A directory on the local disk: what the hardware does with no network and no FUSE."""

    name = "native"
    _library = "main"

    @property
    def root(self) -> Path:
        return self.work / self._library

    def prepare(self, data: Dataset) -> None:
        self.root.mkdir()
        link_or_copy(data.big, self.root / data.big.name)
        shutil.copyfile(data.mid, self.root / data.mid.name)
        shutil.copytree(data.tree, self.root / data.tree_name, symlinks=True)
        make_many(self.work / "many", data)

    def mount(self, library: str = "main") -> None:
        self._library = library

    def unmount(self) -> None:
        self._library = "main"

    def wait_on_server(self, expected: list[Expected], timeout: float) -> None:
        os.sync()  # "on the server" for a local disk is: durable


def link_or_copy(source: Path, dest: Path) -> None:
    """A hard link to `source` (the big file is only ever read there), else a copy.

    Saves writing the 1 GiB file twice per run; cold rows drop the page
    cache first, so sharing the inode with the data set changes nothing measured.
    """
    try:
        os.link(source, dest)
    except OSError:
        shutil.copyfile(source, dest)


def make_many(root: Path, data: Dataset) -> None:
    """Create the many-entry tree natively: `many_dirs` directories of `many_per_dir` empty files."""
    for d in range(data.many_dirs):
        sub = root / f"d{d:04}"
        sub.mkdir(parents=True)
        for f in range(data.many_per_dir):
            os.close(os.open(sub / f"f{f:05}.txt", os.O_CREAT | os.O_WRONLY, 0o644))


class Rclone(System):
    """`rclone serve webdav` over a local directory, mounted with `--vfs-cache-mode full`."""

    name = "rclone"

    def __init__(self, work: Path, cleanup: procs.Cleanup, extra_args: list[str]) -> None:
        super().__init__(work, cleanup)
        self.extra_args = extra_args
        self.served = self.work / "served"
        self.config = self.work / "rclone.conf"
        self.rc_port = 0
        self._mounted_library = "main"

    @property
    def root(self) -> Path:
        return self.work / "mnt"

    def prepare(self, data: Dataset) -> None:
        if shutil.which("rclone") is None:
            raise Unavailable("rclone is not installed (FERRY_BENCH=1 tools/setup installs it)")
        main = self.served / "main"
        main.mkdir(parents=True)
        link_or_copy(data.big, main / data.big.name)
        shutil.copyfile(data.mid, main / data.mid.name)
        shutil.copytree(data.tree, main / data.tree_name, symlinks=True)
        make_many(self.served / "many", data)
        self.config.write_text("")
        port = free_port()
        log_path = self.work / "serve.log"
        proc, _ = procs.start_process(
            [
                "rclone",
                "serve",
                "webdav",
                str(self.served),
                "--addr",
                f"127.0.0.1:{port}",
                "--config",
                str(self.config),
                "--log-file",
                str(log_path),
            ],
            self.work / "serve.out",
            self.cleanup,
        )
        wait_http(f"http://127.0.0.1:{port}/", proc, log_path)
        self._start_proxy(port)

    def mount(self, library: str = "main") -> None:
        assert self.proxy is not None
        mnt, cache = self._fresh_mount_dirs()
        self.rc_port = free_port()
        self._mounted_library = library
        log_path = self.work / "mount.log"
        argv = [
            "rclone", "mount", f":webdav:{library}", str(mnt),
            "--webdav-url", f"http://127.0.0.1:{self.proxy.port}",
            "--vfs-cache-mode", "full", "--cache-dir", str(cache),
            "--rc", "--rc-addr", f"127.0.0.1:{self.rc_port}", "--rc-no-auth",
            "--config", str(self.config), "--log-file", str(log_path),
            *self.extra_args,
        ]  # fmt: skip
        proc, stop = procs.start_process(argv, self.work / "mount.out", self.cleanup)
        self._stop_mount = stop
        self._unmount_cleanup = self.cleanup.push(f"unmount {mnt}", lambda: procs.lazy_unmount(mnt))
        self.mount_proc = proc
        procs.wait_mounted(mnt, proc, MOUNT_TIMEOUT, log_path)

    def unmount(self) -> None:
        self._unmount_cleanup()
        self._stop_mount()
        self.mount_proc = None

    def _upload_queue(self) -> int:
        """Uploads rclone's VFS still has in progress or queued (its remote-control API)."""
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.rc_port}/vfs/stats", data=b"{}", method="POST",
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(req, timeout=5) as resp:
            stats = json.load(resp)
        disk = stats.get("diskCache", {})
        return int(disk.get("uploadsInProgress", 0)) + int(disk.get("uploadsQueued", 0))

    def _on_server(self, expected: list[Expected]) -> bool:
        base = self.served / self._mounted_library
        for e in expected:
            try:
                if os.stat(base / e.relpath).st_size != e.size:
                    return False
            except FileNotFoundError:
                return False
            if e.byte_at is not None:
                offset, value = e.byte_at
                with open(base / e.relpath, "rb") as f:
                    f.seek(offset)
                    if f.read(1) != bytes([value]):
                        return False
        return True

    def wait_on_server(self, expected: list[Expected], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._upload_queue() == 0 and self._on_server(expected):
                return
            time.sleep(0.1)
        raise TimeoutError(f"rclone had not uploaded everything within {timeout:.0f}s")


class Ferry(System):
    """`ferry serve` plus `ferry mount`, run with `python` (the interpreter that has ferry)."""

    name = "ferry"

    def __init__(self, work: Path, cleanup: procs.Cleanup, python: str) -> None:
        super().__init__(work, cleanup)
        self.python = python
        self.token_file = self.work / "token"
        self.server_port = 0

    @property
    def root(self) -> Path:
        return self.work / "mnt"

    def ferry(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return procs.run([self.python, "-m", "vfs", *args], timeout=timeout)

    def prepare(self, data: Dataset) -> None:
        for sub in ("serve", "mount", "admin"):
            try:
                self.ferry(sub, "--help", timeout=30)
            except RuntimeError as exc:
                raise Unavailable(f"`ferry {sub}` does not work yet ({_gist(exc)})") from None
        store = self.work / "server-data"
        try:
            token = self.ferry("admin", "--data", str(store), "add-user", "bench").stdout
            self.token_file.write_text(token.strip().splitlines()[-1].strip() + "\n")
            for library in ("main", "many"):
                self.ferry(
                    "admin", "--data", str(store), "add-library", library, "--owner", "bench"
                )
        except RuntimeError as exc:
            raise Unavailable(f"`ferry admin` failed ({_gist(exc)})") from None
        self._seed(store, data)
        self.server_port = free_port()
        log_path = self.work / "serve.log"
        proc, _ = procs.start_process(
            [self.python, "-m", "vfs", "serve", str(store), "--listen", f"127.0.0.1:{self.server_port}"],
            log_path, self.cleanup,
        )  # fmt: skip
        try:
            wait_http(f"http://127.0.0.1:{self.server_port}/v1/capabilities", proc, log_path)
        except Unavailable as exc:
            raise Unavailable(f"`ferry serve` did not start ({_gist(exc)})") from None
        self._start_proxy(self.server_port)

    def _seed(self, store: Path, data: Dataset) -> None:
        """Put the inputs in the server's store through its API, in-process, before it serves
        (see tools/benchlib/ferryseed.py for why)."""
        from tools.benchlib import ferryseed

        token = self.token_file.read_text().strip()
        try:
            ferryseed.seed_store(
                store, token, [data.big, data.mid], [data.tree], data.many_dirs, data.many_per_dir
            )
        except Exception as exc:  # any failure of a young server means: ferry is not measurable
            raise Unavailable(
                f"putting the inputs on the ferry server failed ({_gist(exc)})"
            ) from None

    def mount(self, library: str = "main") -> None:
        assert self.proxy is not None
        mnt, cache = self._fresh_mount_dirs()
        log_path = self.work / "mount.log"
        argv = [
            self.python, "-m", "vfs", "mount", f"http://127.0.0.1:{self.proxy.port}/{library}",
            str(mnt), "--token-file", str(self.token_file), "--cache-dir", str(cache), "--foreground",
        ]  # fmt: skip
        proc, stop = procs.start_process(argv, log_path, self.cleanup)
        self._stop_mount = stop
        self._unmount_cleanup = self.cleanup.push(f"unmount {mnt}", lambda: procs.lazy_unmount(mnt))
        self.mount_proc = proc
        procs.wait_mounted(mnt, proc, MOUNT_TIMEOUT, log_path)

    def unmount(self) -> None:
        """`ferry unmount` (clean: flushes the journal), falling back to a lazy unmount."""
        proc = self.mount_proc
        try:
            self.ferry("unmount", str(self.root), timeout=60)
            if proc is not None:
                proc.wait(30)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            log.warning("ferry unmount %s did not finish cleanly: %s", self.root, _gist(exc))
        self._unmount_cleanup()
        self._stop_mount()
        self.mount_proc = None

    def wait_on_server(self, expected: list[Expected], timeout: float) -> None:
        try:
            self.ferry("sync", str(self.root), "--timeout", f"{timeout:.0f}", timeout=timeout + 30)
        except RuntimeError as exc:
            raise TimeoutError(f"ferry sync did not confirm the upload: {_gist(exc)}") from None


def _gist(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(exc).__name__
