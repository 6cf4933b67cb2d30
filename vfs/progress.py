"""A one-line progress bar for `ferry pin` and `ferry sync`, drawn only on a terminal.

When stdout is not a terminal (scripts, pipes, cron) nothing is drawn, so the
commands stay quiet and their output parseable.
"""

from __future__ import annotations

import shutil
import sys
from typing import TextIO


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
