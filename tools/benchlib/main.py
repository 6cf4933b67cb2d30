"""`tools/bench`'s body: options, the run plan (scenarios x runs x systems, alternating), the table."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tools.benchlib import dataset, procs, report
from tools.benchlib.dataset import GiB, MiB
from tools.benchlib.systems import Ferry, NativeDir, Rclone, System, Unavailable
from tools.benchlib.workloads import SCENARIO_ROWS, SCENARIOS, Measurement, Options

log = logging.getLogger("bench")

#: (big file size, stdlib file subsampling, entries in the many-entry library, runs of the
#: file scenario, runs of the tree scenario, runs of the many scenario, fio seconds)
#: The full run does the tree once: its rows varied by 1-9% between two full runs (cp -r
#: 45.2-45.8 s rclone, 44.6-48.8 s ferry; until on the server 137-138 s and 106-113 s) and a
#: second round cost six minutes of the 15; the file rows spread 2x and keep three runs.
PLANS = {
    "full": (1 * GiB, 1, 100_000, 3, 1, 1, 5),
    "quick": (256 * MiB, 8, 10_000, 1, 1, 1, 2),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tools/bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller data, one run each (< 3 min)")
    parser.add_argument(
        "--runs", type=int, help="runs per scenario (default: 3 file, 2 tree, 1 many)"
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=Path("/tmp/ferry-bench"),
        help="work directory (default /tmp/ferry-bench)",
    )
    parser.add_argument(
        "--scenarios", default="file,tree,many", help="comma list of file,tree,many (default all)"
    )
    parser.add_argument(
        "--systems", default="native,rclone,ferry", help="comma list (default all three)"
    )
    parser.add_argument("--proxy", choices=["auto", "fault", "splice"], default="splice",
                        help="counting proxy: splice (ours, zero-copy), fault (tools/faultproxy), auto")  # fmt: skip
    parser.add_argument(
        "--rclone-arg",
        action="append",
        default=[],
        help="extra `rclone mount` argument (repeatable)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory afterwards")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def make_systems(
    names: list[str], work: Path, cleanup: procs.Cleanup, args, python: str | None
) -> list[System]:
    systems: list[System] = []
    for name in names:
        if name == "native":
            systems.append(NativeDir(work, cleanup))
        elif name == "rclone":
            systems.append(Rclone(work, cleanup, args.rclone_arg))
        elif name == "ferry":
            systems.append(Ferry(work, cleanup, python or sys.executable))
        else:
            raise SystemExit(f"tools/bench: unknown system {name!r} (native, rclone, ferry)")
        systems[-1].proxy_kind = args.proxy
    return systems


def _on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str], python: str | None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if os.geteuid() != 0:
        print(
            "tools/bench: run as root: cold rows drop the kernel page cache and mounts need FUSE",
            file=sys.stderr,
        )
        return 2
    for tool in ("fio", "tar", "fusermount3"):
        if shutil.which(tool) is None:
            print(
                f"tools/bench: `{tool}` is missing; run `FERRY_BENCH=1 tools/setup`",
                file=sys.stderr,
            )
            return 2
    plan = PLANS["quick" if args.quick else "full"]
    big_size, every, many, *scenario_runs, fio_seconds = plan
    runs = dict(zip(("file", "tree", "many"), scenario_runs, strict=True))
    if args.runs:
        runs = dict.fromkeys(runs, args.runs)

    started = time.monotonic()
    signal.signal(signal.SIGTERM, _on_sigterm)
    cleanup = procs.Cleanup()
    work: Path = args.work
    results: dict[str, dict[str, list[Measurement]]] = {}
    errors: dict[str, dict[str, str]] = {}
    status = 0
    data: dataset.Dataset | None = None
    systems: list[System] = []
    try:
        log.info("bench: preparing data in %s", work)
        data = dataset.prepare(
            work, big_size=big_size, mid_size=100 * MiB, tree_every=every, many=many
        )
        scratch = work / "scratch"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        opts = Options(fio_seconds=fio_seconds, scratch=scratch)
        systems = make_systems(args.systems.split(","), work / "systems", cleanup, args, python)
        live = prepare_systems(systems, data, errors)
        for scenario in args.scenarios.split(","):
            run_scenario(scenario, runs[scenario], live, data, opts, results, errors, started)
    except KeyboardInterrupt:
        log.warning("bench: interrupted; cleaned up, printing what was measured")
        status = 130
    finally:
        cleanup.close()
        if not args.keep:
            shutil.rmtree(work / "systems", ignore_errors=True)
            shutil.rmtree(work / "scratch", ignore_errors=True)
    if data is None:
        return status
    big_label = f"{big_size // GiB} GiB" if big_size >= GiB else f"{big_size // MiB} MiB"
    names = [s.name for s in systems]
    kind = "quick" if args.quick else "full"
    if status:
        kind += ", INTERRUPTED"
    print()
    print(f"ferry vs rclone mount ({kind} run, {time.monotonic() - started:.0f}s)")
    print(f"machine: {report.machine()}")
    print(f"runs: {', '.join(f'{k} x{v}' for k, v in runs.items())}; cells are median (min-max); "
          f"stdlib tree {data.tree_files:,} files, {data.tree_bytes / 1e6:.0f} MB")  # fmt: skip
    print()
    rows = report.rows(big_label, data.tree_files, data.many_entries)
    print(report.table(rows, results, errors, names))
    return status


def prepare_systems(
    systems: list[System], data: dataset.Dataset, errors: dict[str, dict[str, str]]
) -> list[System]:
    """Prepare every system at once, one thread each; return those that can be measured.

    Seeding ferry's server (chunking, uploads, commits of 100,000 entries) is
    CPU work while the native and rclone copies mostly wait on the disk, so
    side by side they take about as long as the ferry seed alone.
    """
    ready: dict[str, bool] = {}

    def prepare(system: System) -> None:
        t0 = time.monotonic()
        try:
            system.prepare(data)
            ready[system.name] = True
            log.info("bench: %s ready in %.0fs", system.name, time.monotonic() - t0)
        except Unavailable as exc:
            log.warning("bench: %s cannot be measured: %s", system.name, exc)
            errors[system.name] = _all_rows(str(exc))

    pool = ThreadPoolExecutor(max_workers=len(systems) or 1, thread_name_prefix="prepare")
    try:
        for future in [pool.submit(prepare, system) for system in systems]:
            future.result()
    finally:
        # On Ctrl-C the caller's cleanup stops the servers, which ends the other threads.
        pool.shutdown(wait=False, cancel_futures=True)
    return [system for system in systems if ready.get(system.name)]


def _all_rows(reason: str) -> dict[str, str]:
    return {key: reason for keys in SCENARIO_ROWS.values() for key in keys}


def run_scenario(name, runs, systems, data, opts, results, errors, started) -> None:
    """Run one scenario `runs` times on every live system, alternating who goes first."""
    scenario = SCENARIOS[name]
    remote = [s for s in systems if s.name != "native"]
    native = [s for s in systems if s.name == "native"]
    for run in range(runs):
        order = native + (remote if run % 2 == 0 else remote[::-1])
        for system in order:
            t0 = time.monotonic()
            measured: dict[str, Measurement] = {}
            try:
                scenario(system, data, opts, run, measured)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # one failed run is reported in the table, the bench goes on
                reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                log.warning("bench: %s %s run %d failed: %s", system.name, name, run + 1, reason)
                for key in SCENARIO_ROWS[name]:
                    if key not in measured:
                        errors.setdefault(system.name, {}).setdefault(key, reason)
            for key, m in measured.items():
                results.setdefault(system.name, {}).setdefault(key, []).append(m)
            summary = ", ".join(f"{k}={report.num(m.value)}" for k, m in measured.items())
            log.info(
                "bench: [%4.0fs] %s %s run %d/%d (%.0fs): %s",
                time.monotonic() - started, system.name, name, run + 1, runs, time.monotonic() - t0, summary,
            )  # fmt: skip
