"""A one-line progress bar for `ferry pin` and `ferry sync`, drawn only on a terminal.

`sync_with_progress` runs the (blocking) sync request in a thread and draws
the upload from the drive's status meanwhile.

When stdout is not a terminal (scripts, pipes, cron) nothing is drawn, so the
commands stay quiet and their output parseable.
"""

from __future__ import annotations

import shutil
import sys
import threading
from pathlib import Path
from typing import Any, TextIO


def human_size(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


class ProgressBar:
    """`label [#####.....]  42%  1.2 MiB of 3.0 MiB  250.0 KiB/s`, redrawn in place."""

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.label = label
        self.stream = stream or sys.stdout
        self.enabled = self.stream.isatty()
        self._drawn = False

    def update(self, done: int, total: int, rate: float | None = None) -> None:
        if not self.enabled:
            return
        fraction = 1.0 if total <= 0 else min(done / total, 1.0)
        tail = f" {fraction:4.0%}  {human_size(done)} of {human_size(total)}"
        if rate is not None:
            tail += f"  {human_size(rate)}/s"
        width = max(
            10, shutil.get_terminal_size((80, 20)).columns - len(self.label) - len(tail) - 4
        )
        filled = int(width * fraction)
        bar = "#" * filled + "." * (width - filled)
        self.stream.write(f"\r{self.label} [{bar}]{tail}")
        self.stream.flush()
        self._drawn = True

    def finish(self, message: str | None = None) -> None:
        """End the bar's line (and print `message` on a terminal)."""
        if not self.enabled:
            return
        if self._drawn:
            self.stream.write("\n")
        if message:
            self.stream.write(message + "\n")
        self.stream.flush()


def sync_with_progress(mountpoint: Path, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Send a `sync` request while drawing upload progress from the drive's status."""
    from vfs.sync.control import ask  # the control module imports this one for `ferry sync`

    result: dict[str, Any] = {}

    def wait() -> None:
        try:
            result["answer"] = ask(mountpoint, request, timeout)
        except Exception as exc:  # handed to the caller's thread below
            result["error"] = exc

    worker = threading.Thread(target=wait, name="ferry-sync", daemon=True)
    worker.start()
    bar = ProgressBar(f"syncing {mountpoint}")
    total = 0
    while worker.is_alive():
        try:
            status = ask(mountpoint, {"cmd": "status"}, 10)["status"]
        except Exception:  # the sync request reports the real problem
            status = None
        if status is not None:
            total = max(total, status["pending_bytes"])
            bar.update(total - status["pending_bytes"], total, status.get("upload_rate"))
        worker.join(0.25)
    bar.finish()
    if "error" in result:
        raise result["error"]
    return result["answer"]
