"""From runs to the printed table: medians, spread, ratio ferry/rclone and each row's target."""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
from dataclasses import dataclass

from tools.benchlib.workloads import Measurement


@dataclass(frozen=True)
class Row:
    """One line of the table. `target` is the ratio ferry/rclone the issue asks for (`higher`
    says which way is better); `limit` is an absolute bound on ferry's value instead."""

    key: str
    label: str
    unit: str
    higher: bool
    target: float | None = None
    limit: float | None = None
    native: bool = True


def rows(big_label: str, tree_files: int, many: int) -> list[Row]:
    return [
        Row("cold_read", f"cold sequential read of a {big_label} file", "MB/s", True, 2.0),
        Row("reread", "re-read of the same file", "MB/s", True, 10.0),
        Row("fio", "random 4 KiB reads, cached file (fio, QD1)", "IOPS", True, 1.2),
        Row("write", f"{big_label} written, until it is on the server", "s", False, 0.5),
        Row(
            "untar_exit",
            f"untar of the stdlib ({tree_files:,} files): until tar exits",
            "s",
            False,
            0.3,
        ),
        Row("untar_server", "  ... until all of it is on the server", "s", False, 0.1),
        Row("ls", "ls -lR of that tree on a fresh mount", "s", False, 0.25),
        Row("cp", "cp -r of that tree out of a fresh mount (cold)", "s", False, 0.2),
        Row(
            "change_wire",
            "1-byte change in a 100 MiB file: bytes on the wire",
            "MB",
            False,
            0.02,
            native=False,
        ),
        Row("change_time", "  ... time until it is on the server", "s", False),
        Row("many_ls", f"ls -lR of a library of {many:,} entries (fresh mount)", "s", False),
        Row(
            "rss",
            f"client peak RSS after listing {many:,} entries",
            "MiB",
            False,
            limit=200.0,
            native=False,
        ),
    ]


def num(value: float) -> str:
    if math.isnan(value):
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if abs(value) >= 0.1 else f"{value:.3f}"


def cell(values: list[float]) -> str:
    """`median (min-max)`, or just the value for a single run."""
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return num(med)
    return f"{num(med)} ({num(min(values))}-{num(max(values))})"


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def verdict(row: Row, ferry: float | None, rclone: float | None) -> tuple[str, str, str]:
    """(ratio text, target text, met text) for one row."""
    ratio = ferry / rclone if ferry is not None and rclone else None
    ratio_text = f"{ratio:.2f}x" if ratio is not None else "-"
    if row.limit is not None:
        target = f"<= {num(row.limit)} {row.unit}"
        met = "-" if ferry is None else ("yes" if ferry <= row.limit else "NO")
    elif row.target is not None:
        target = f"{'>=' if row.higher else '<='} {row.target:g}x"
        if ratio is None:
            met = "-"
        else:
            met = "yes" if (ratio >= row.target if row.higher else ratio <= row.target) else "NO"
    else:
        target, met = "", ""
    return ratio_text, target, met


def table(
    table_rows: list[Row],
    results: dict[str, dict[str, list[Measurement]]],
    errors: dict[str, dict[str, str]],
    systems: list[str],
) -> str:
    """The benchmark's table, then numbered notes saying why a cell is n/a.

    `results[system][row]` are the runs; `errors[system][row]` says why a row has none.
    """
    header = [
        "workload",
        "unit",
        *systems,
        "ferry/rclone",
        "target",
        "met",
        "wire MB rclone",
        "wire MB ferry",
    ]
    lines = [header]
    notes: list[str] = []
    for row in table_rows:
        cells = [row.label, row.unit]
        medians: dict[str, float | None] = {}
        for system in systems:
            runs = results.get(system, {}).get(row.key, [])
            values = [m.value for m in runs if not math.isnan(m.value)]
            medians[system] = median_or_none(values)
            if system == "native" and not row.native:
                cells.append("")
            elif values:
                cells.append(cell(values))
            else:
                reason = f"{system}: {errors.get(system, {}).get(row.key, 'not run')}"
                if reason not in notes:
                    notes.append(reason)
                cells.append(f"n/a [{notes.index(reason) + 1}]")
        cells.extend(verdict(row, medians.get("ferry"), medians.get("rclone")))
        for system in ("rclone", "ferry"):
            wires = [m.wire for m in results.get(system, {}).get(row.key, []) if m.wire is not None]
            cells.append(num(statistics.median(wires) / 1e6) if wires else "")
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        out.append(
            "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w)
                for i, (c, w) in enumerate(zip(line, widths, strict=True))
            ).rstrip()
        )
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    if notes:
        out.append("")
        out.extend(f"[{i}] {note}" for i, note in enumerate(notes, 1))
    return "\n".join(out)


def machine() -> str:
    """One paragraph describing where the numbers were measured."""
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    with open("/proc/meminfo") as f:
        mem_kib = int(next(line.split()[1] for line in f if line.startswith("MemTotal")))
    rclone = _first_line(["rclone", "version"])
    fio = _first_line(["fio", "--version"])
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem_kib / 1024 / 1024:.1f} GiB RAM, "
        f"Linux {platform.release()}, Python {platform.python_version()}, {rclone}, {fio}"
    )


def _first_line(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.splitlines()[
            0
        ]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return f"{argv[0]} missing"
