"""Processes and FUSE mounts the benchmark starts, and the guarantee that they all stop.

Everything started goes through one `Cleanup` registry whose `close()` runs in
reverse order: lazy unmounts first (`fusermount3 -u -z`), then SIGTERM to each
process group, then SIGKILL after a grace period. `tools/bench` calls it from
`finally` and from its SIGINT/SIGTERM handler, so Ctrl-C leaves nothing behind.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)


class Cleanup:
    """A stack of undo actions, each run once, last registered first, errors logged not raised."""

    def __init__(self) -> None:
        self._actions: list[tuple[str, Callable[[], None]]] = []

    def push(self, what: str, action: Callable[[], None]) -> Callable[[], None]:
        """Register `action`; return a function that runs it now and forgets it."""
        entry = (what, action)
        self._actions.append(entry)

        def run_now() -> None:
            if entry in self._actions:
                self._actions.remove(entry)
                _run_logged(what, action)

        return run_now

    def close(self) -> None:
        while self._actions:
            what, action = self._actions.pop()
            _run_logged(what, action)


def _run_logged(what: str, action: Callable[[], None]) -> None:
    try:
        action()
    except Exception as exc:  # cleanup must go on with the rest whatever one step raises
        log.warning("cleanup: %s failed: %s", what, exc)


def start_process(
    argv: Sequence[str], log_path: Path, cleanup: Cleanup, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, Callable[[], None]]:
    """Start `argv` in its own process group, output to `log_path`; return it and its stopper."""
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    stop = cleanup.push(f"stop {Path(argv[0]).name} (pid {proc.pid})", lambda: stop_process(proc))
    return proc, stop


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL it if it has not exited after `grace` seconds."""
    if proc.poll() is not None:
        return
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        log.warning("pid %d ignored SIGTERM for %.0fs; killing it", proc.pid, grace)
        _signal_group(proc, signal.SIGKILL)
        proc.wait(5)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def is_mounted(path: Path) -> bool:
    """True if `path` is a mount point in this namespace (reads /proc/self/mountinfo)."""
    target = str(path.resolve())
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def wait_mounted(path: Path, proc: subprocess.Popen, timeout: float, log_path: Path) -> None:
    """Wait until `path` is mounted; raise with the log's tail if the process died or time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_mounted(path):
            return
        if proc.poll() is not None:
            raise RuntimeError(
                f"{proc.args[0]} exited with status {proc.returncode} before {path} was mounted:\n"
                + tail(log_path)
            )
        time.sleep(0.02)
    raise RuntimeError(f"{path} was not mounted within {timeout:.0f}s:\n" + tail(log_path))


def lazy_unmount(path: Path) -> None:
    """Detach a FUSE mount even if it is busy or its daemon is gone."""
    if is_mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True, timeout=30)


def drop_caches() -> None:
    """Write back dirty pages and drop the kernel's page, dentry and inode caches (needs root)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set (VmHWM) in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmHWM line")


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"(no log at {path})"


def run(argv: Sequence[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """Run a command to completion, raising with its output if it fails."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, **kwargs)
    if proc.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(argv)}` exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-800:]}"
        )
    return proc
