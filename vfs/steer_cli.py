"""The commands that see and steer a mounted drive: ls, pin, unpin, evict, versions, restore,
trash, undelete.

Each takes paths on the mount, finds the drive's root by walking up to the
mount point with a `.ferry/control` link (vfs/sync/control.py `locate`), and
asks the daemon over its control socket (vfs/steer.py answers).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from vfs.progress import ProgressBar, human_size
from vfs.sync.control import ControlError, ask, file_states, locate

#: Seconds a request that talks to the server may take (restore waits for the feed too).
SERVER_TIMEOUT = 90.0
POLL_SECONDS = 0.2


def _request(path: Path, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Ask the drive holding `path`; raise ControlError with the daemon's reason on refusal."""
    mountpoint, library_path = locate(path)
    answer = ask(mountpoint, {**request, "path": library_path}, timeout)
    if not answer.get("ok"):
        raise ControlError(str(answer.get("error")))
    return answer


def _run(command: str, body: Callable[[], int]) -> int:
    """Run a command's body, turning a refusal into its message and exit status 1."""
    try:
        return int(body() or 0)
    except ControlError as exc:
        print(f"ferry {command}: {exc}", file=sys.stderr)
        return 1


def _parser(command: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"ferry {command}", description=description)


# --- ls ------------------------------------------------------------------------------


def ls_main(argv: list[str]) -> int:
    """`ferry ls [PATH]`: entries with their sync state and revision."""
    parser = _parser("ls", "List files with their sync state and revision.")
    parser.add_argument("path", type=Path, nargs="?", default=Path("."))
    parser.add_argument("-a", "--all", action="store_true", help="show dot files too")
    args = parser.parse_args(argv)
    if args.path.is_dir():
        names = sorted(os.listdir(args.path))
        targets = [args.path / n for n in names if args.all or not n.startswith(".")]
    elif args.path.exists() or args.path.is_symlink():
        targets = [args.path]
    else:
        print(f"ferry ls: {args.path}: no such file or folder", file=sys.stderr)
        return 1
    try:
        states = file_states(targets)
    except ControlError as exc:
        print(f"ferry ls: {exc}", file=sys.stderr)
        return 1
    for path, known in zip(targets, states, strict=True):
        state, revision = known if known is not None else ("-", "-")
        size, name = _ls_size_and_name(path)
        print(f"{state:<15} {revision!s:>6} {size:>10}  {name}")
    return 0


def _ls_size_and_name(path: Path) -> tuple[str, str]:
    info = path.lstat()
    name = path.name + ("/" if path.is_dir() and not path.is_symlink() else "")
    size = "-" if path.is_dir() else human_size(info.st_size)
    return size, name


# --- pins ----------------------------------------------------------------------------


def pin_main(argv: list[str]) -> int:
    """`ferry pin PATH...`: keep files (folders: everything under them) available offline."""
    parser = _parser("pin", "Download files or folders and keep them available offline.")
    parser.add_argument("paths", type=Path, nargs="+")
    parser.add_argument(
        "--no-wait", action="store_true", help="return at once; downloads go on in the background"
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="give up waiting after S s")
    args = parser.parse_args(argv)

    def body() -> int:
        for path in args.paths:
            answer = _request(path, {"cmd": "pin"}, 10)
            if not args.no_wait:
                _wait_pinned(path, answer["path"], args.timeout)
        return 0

    return _run("pin", body)


def _wait_pinned(path: Path, library_path: str, timeout: float) -> None:
    """Wait until everything under the pin is local, with a progress bar on a terminal."""
    mountpoint, _ = locate(path)
    bar = ProgressBar(f"pinning {path}")
    deadline = time.monotonic() + timeout
    while True:
        answer = ask(mountpoint, {"cmd": "status"}, 10)["status"]
        item = next((p for p in answer["pins"] if p["path"] == library_path), None)
        if item is None:
            raise ControlError(f"{path} is no longer pinned")
        bar.update(item["local_bytes"], item["bytes"], answer["download_rate"])
        if item["local_bytes"] >= item["bytes"]:
            bar.finish(f"{path}: {item['files']} files, {human_size(item['bytes'])} kept offline")
            return
        if not answer["online"]:
            bar.finish()
            raise ControlError(
                f"{path} is pinned, but the drive is offline: its files download when the "
                "server is back (`ferry status` shows progress)"
            )
        if time.monotonic() > deadline:
            bar.finish()
            why = answer.get("pin_error") or answer.get("last_error") or "downloads are slow"
            raise ControlError(
                f"{path}: {human_size(item['local_bytes'])} of {human_size(item['bytes'])} "
                f"local after {timeout:g} s ({why}); the drive keeps downloading"
            )
        time.sleep(POLL_SECONDS)


def unpin_main(argv: list[str]) -> int:
    parser = _parser("unpin", "Stop keeping files or folders offline (they stay cached for now).")
    parser.add_argument("paths", type=Path, nargs="+")
    args = parser.parse_args(argv)

    def body() -> int:
        for path in args.paths:
            _request(path, {"cmd": "unpin"}, 10)
        return 0

    return _run("unpin", body)


def evict_main(argv: list[str]) -> int:
    parser = _parser("evict", "Free the local copies of files or folders now (not pinned ones).")
    parser.add_argument("paths", type=Path, nargs="+")
    args = parser.parse_args(argv)

    def body() -> int:
        for path in args.paths:
            answer = _request(path, {"cmd": "evict"}, 30)
            print(f"{path}: freed {human_size(answer['freed'])}")
            for skipped in answer["pinned_skipped"]:
                print(f"  kept {skipped} (pinned; `ferry unpin` it first)")
        return 0

    return _run("evict", body)


# --- versions --------------------------------------------------------------------------


def versions_main(argv: list[str]) -> int:
    """`ferry versions PATH [--json]`: a file's versions, newest first."""
    parser = _parser("versions", "List a file's versions, newest first.")
    parser.add_argument("path", type=Path)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)

    def body() -> int:
        versions = _request(args.path, {"cmd": "versions"}, SERVER_TIMEOUT)["versions"]
        if args.json:
            print(json.dumps(versions, indent=2))
            return 0
        print(f"{'REV':>6}  {'COMMITTED':<16}  {'SIZE':>10}  BY")
        for index, v in enumerate(versions):
            when = datetime.fromtimestamp(v["committed_at"]).strftime("%Y-%m-%d %H:%M")
            current = "  (current)" if index == 0 else ""
            size = human_size(v["size"])
            print(f"{v['revision']:>6}  {when:<16}  {size:>10}  {v['user']}@{v['device']}{current}")
        return 0

    return _run("versions", body)


def restore_main(argv: list[str]) -> int:
    """`ferry restore PATH --version N`: make version N the current content."""
    parser = _parser("restore", "Bring back an old version as the file's current content.")
    parser.add_argument("path", type=Path)
    parser.add_argument(
        "--version", type=int, required=True, help="revision (see `ferry versions`)"
    )
    args = parser.parse_args(argv)

    def body() -> int:
        request = {"cmd": "restore", "revision": args.version}
        answer = _request(args.path, request, SERVER_TIMEOUT)
        print(
            f"restored {args.path} to version {args.version} "
            f"(now revision {answer['revision']}, {human_size(answer['size'])})"
        )
        return 0

    return _run("restore", body)


# --- trash ---------------------------------------------------------------------------------


def trash_main(argv: list[str]) -> int:
    """`ferry trash MOUNTPOINT [--json]`: deleted entries that can be brought back."""
    parser = _parser("trash", "List deleted files and folders that `ferry undelete` can restore.")
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)

    def body() -> int:
        entries = _request(args.mountpoint, {"cmd": "trash"}, SERVER_TIMEOUT)["entries"]
        if args.json:
            print(json.dumps(entries, indent=2))
            return 0
        for e in sorted(entries, key=lambda e: -e["revision"]):
            size = "-" if e["kind"] == "dir" else human_size(e["size"])
            suffix = "/" if e["kind"] == "dir" else ""
            print(f"{e['revision']:>6}  {size:>10}  {e['path']}{suffix}")
        if not entries:
            print("the trash is empty")
        return 0

    return _run("trash", body)


def undelete_main(argv: list[str]) -> int:
    """`ferry undelete PATH`: restore the entry most recently deleted at PATH."""
    parser = _parser("undelete", "Restore a deleted file or folder to where it was.")
    parser.add_argument("path", type=Path)
    args = parser.parse_args(argv)

    def body() -> int:
        answer = _request(args.path, {"cmd": "undelete"}, SERVER_TIMEOUT)
        print(f"restored {answer['path']} (revision {answer['revision']})")
        return 0

    return _run("undelete", body)
