"""The control socket of a mounted drive, and the `ferry sync` / `ferry status` commands.

The daemon listens on `<cache_dir>/control.sock` (a unix socket; the mount's
hidden `.ferry/control` is a symlink to it, so the commands need only a path
inside the drive). The protocol is one JSON object per line each way:

    {"cmd": "status"}                -> {"ok": true, "status": {...}}
    {"cmd": "sync", "timeout": S}    -> {"ok": true} once every local change is on the
                                        server and the mirror has caught up with it,
                                        or {"ok": false, "error": "..."} after S seconds
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from remote.errors import RemoteError, ServerUnreachable
from vfs.sync.conflicts import list_conflicts

if TYPE_CHECKING:
    from collections.abc import Iterator

    from vfs.context import DriveContext

log = logging.getLogger(__name__)

#: Inside a mount: the symlink to its daemon's control socket (vfs/versions_tree.py).
CONTROL_LINK = ".ferry/control"
MAX_REQUEST = 64 * 1024
#: Unix socket paths longer than this are reached through /proc/self/fd (sun_path is 108 bytes).
MAX_SOCKET_PATH = 100
DEFAULT_SYNC_TIMEOUT = 300.0


# --- the daemon side -----------------------------------------------------------------


async def run_control_server(
    ctx: DriveContext, *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve control requests on the drive's control socket until cancelled."""
    path = ctx.control_socket
    path.unlink(missing_ok=True)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with _short_path(path) as address:
        await sock.bind(address)
    os.chmod(path, 0o600)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    task_status.started()
    try:
        await trio.serve_listeners(lambda stream: _serve_one(ctx, stream), [listener])
    finally:
        path.unlink(missing_ok=True)


async def _serve_one(ctx: DriveContext, stream: trio.SocketStream) -> None:
    async with stream:
        try:
            request = json.loads(await _read_line(stream))
            answer = await handle_request(ctx, request)
        except (ValueError, KeyError) as exc:
            answer = {"ok": False, "error": f"bad control request: {exc}"}
        try:
            await stream.send_all(json.dumps(answer).encode() + b"\n")
        except trio.BrokenResourceError:
            pass  # the command gave up waiting


async def _read_line(stream: trio.SocketStream) -> bytes:
    data = b""
    while b"\n" not in data:
        piece = await stream.receive_some(4096)
        if not piece:
            break
        data += piece
        if len(data) > MAX_REQUEST:
            raise ValueError("request too long")
    return data.split(b"\n", 1)[0]


async def handle_request(ctx: DriveContext, request: dict[str, Any]) -> dict[str, Any]:
    cmd = request.get("cmd")
    if cmd == "status":
        return {"ok": True, "status": drive_status(ctx)}
    if cmd == "sync":
        timeout = float(request.get("timeout", DEFAULT_SYNC_TIMEOUT))
        return await sync_drive(ctx, timeout)
    from vfs.steer import STEER_COMMANDS, handle_steer_request

    if cmd in STEER_COMMANDS:
        return await handle_steer_request(ctx, request)
    return {"ok": False, "error": f"unknown command {cmd!r}"}


def drive_status(ctx: DriveContext) -> dict[str, Any]:
    """Everything `ferry status` shows, as plain JSON values."""
    conn = ctx.connectivity.statistics()
    journal = ctx.journal.statistics()
    cache = ctx.cache.statistics()
    puller = ctx.extra.get("puller")
    pusher = ctx.extra.get("pusher")
    return {
        "mountpoint": str(ctx.mountpoint) if ctx.mountpoint else None,
        "pid": os.getpid(),
        "online": conn.online,
        "since": conn.since,
        "last_error": conn.last_error,
        "pending_ops": journal.ops,
        "pending_entries": journal.entries,
        "pending_bytes": ctx.journal.pending_bytes(),
        "oldest_pending_ns": journal.oldest_ns,
        "uploading": bool(pusher and pusher.busy),
        "cursor": puller.cursor if puller else None,
        "cache": {
            "size": cache.size,
            "capacity": cache.capacity,
            "chunks": cache.chunks,
            "pinned_bytes": cache.pinned_bytes,
            "hits": cache.hits,
            "misses": cache.misses,
        },
        "conflicts": list_conflicts(ctx.db),
        "read_only": ctx.read_only,
        **_steer_status(ctx),
    }


def _steer_status(ctx: DriveContext) -> dict[str, Any]:
    from vfs.steer import steer_status  # pins and transfer rates (issue 7)

    return steer_status(ctx)


async def sync_drive(ctx: DriveContext, seconds: float) -> dict[str, Any]:
    """Wait until the journal is empty and the mirror has the server's current revision."""
    ctx.journal.request_flush()
    try:
        return await _sync_drive(ctx, seconds)
    finally:
        # A request left standing would make the uploader skip the write-back delay for the
        # next change: `echo new > f` would then upload the O_TRUNC's empty file as a version.
        ctx.journal.clear_flush_request()


async def _sync_drive(ctx: DriveContext, seconds: float) -> dict[str, Any]:
    with trio.move_on_after(seconds):
        while True:
            await ctx.journal.wait_empty()
            try:
                with trio.fail_after(max(1.0, min(30.0, seconds))):
                    info = await ctx.client.library_info()
            except (ServerUnreachable, trio.TooSlowError) as exc:
                ctx.connectivity.report_failure(
                    exc if isinstance(exc, Exception) else RuntimeError(str(exc))
                )
                await trio.sleep(ctx.connectivity.probe_delay())
                continue
            except RemoteError as exc:
                return {"ok": False, "error": f"the server refused: {exc}"}
            puller = ctx.extra.get("puller")
            if puller is not None:
                await puller.wait_cursor(int(info["revision"]))
            # The server answered and the mirror has caught up with it (pull before push holds):
            # online now, not when the pull loop's backoff next probes (reads would fail with EIO).
            ctx.connectivity.report_success()
            if ctx.journal.is_empty():
                return {"ok": True}
    pending = ctx.journal.statistics().ops
    why = ctx.connectivity.last_error if not ctx.connectivity.online else None
    reason = f"the server cannot be reached ({why})" if why else "uploads are still running"
    return {
        "ok": False,
        "error": f"not in sync after {seconds:g} s: {pending} operations pending; {reason}",
    }


# --- the command side ----------------------------------------------------------------


@contextmanager
def _short_path(path: Path) -> Iterator[str]:
    """A socket address for `path` that fits in sun_path (via /proc/self/fd when it is long)."""
    if len(str(path)) <= MAX_SOCKET_PATH:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


class ControlError(Exception):
    """The drive's daemon cannot be asked (not a ferry mount, daemon gone).

    `errno` is the cause's when the mountpoint itself failed (ENOTCONN: a
    mount whose daemon died)."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


def control_socket_of(mountpoint: Path) -> Path:
    try:
        return Path(os.fsdecode(os.readlink(mountpoint / CONTROL_LINK)))
    except OSError as exc:
        raise ControlError(
            f"{mountpoint} is not a mounted ferry drive (cannot read {CONTROL_LINK}: "
            f"{exc.strerror}); mount it with `ferry mount`",
            exc.errno,
        ) from exc


def locate(path: Path) -> tuple[Path, str]:
    """(mountpoint, library path) of `path`, which need not exist (undelete).

    The mountpoint is the nearest enclosing mount point that has a
    `.ferry/control` link: a folder in the library cannot pose as one, since
    only a mount point counts.
    """
    absolute = Path(os.path.abspath(path))
    probe = absolute
    while not (os.path.ismount(probe) and os.path.islink(probe / CONTROL_LINK)):
        if probe.parent == probe:
            raise ControlError(
                f"{path} is not inside a mounted ferry drive; mount one with `ferry mount`"
            )
        probe = probe.parent
    relative = absolute.relative_to(probe).as_posix()
    return probe, "" if relative == "." else relative


def file_states(paths: list[Path], timeout: float = 10) -> list[tuple[str, int] | None]:
    """(sync state, revision) of files inside one drive, asked of its daemon in one request;
    None for a path the drive does not have."""
    if not paths:
        return []
    mountpoint, _ = locate(paths[0])
    library_paths = []
    for path in paths:
        absolute = Path(os.path.abspath(path))
        if not absolute.is_relative_to(mountpoint):
            raise ControlError(f"{path} is not in the drive mounted on {mountpoint}")
        relative = absolute.relative_to(mountpoint).as_posix()
        library_paths.append("" if relative == "." else relative)
    answer = ask(mountpoint, {"cmd": "states", "paths": library_paths}, timeout)
    if not answer.get("ok"):
        raise ControlError(str(answer.get("error")))
    return [None if a is None else (a["state"], int(a["revision"])) for a in answer["states"]]


def ask(mountpoint: Path, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Send one control request to the drive mounted on `mountpoint` and return its answer."""
    path = control_socket_of(mountpoint)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            with _short_path(path) as address:
                sock.connect(address)
            sock.sendall(json.dumps(request).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                piece = sock.recv(65536)
                if not piece:
                    break
                data += piece
        except TimeoutError as exc:
            raise ControlError(
                f"the drive on {mountpoint} did not answer in {timeout:g} s"
            ) from exc
        except OSError as exc:
            raise ControlError(
                f"cannot reach the drive's daemon at {path}: {exc.strerror or exc}"
            ) from exc
    if not data:
        raise ControlError(f"the drive on {mountpoint} closed the control connection")
    return json.loads(data)


def sync_main(argv: list[str]) -> int:
    """`ferry sync MOUNTPOINT [--timeout S]`."""
    parser = argparse.ArgumentParser(
        prog="ferry sync",
        description="Wait until every local change is on the server and the drive shows the "
        "server's latest state.",
    )
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_SYNC_TIMEOUT, help="give up after S seconds"
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        if sys.stderr.isatty():
            status = ask(args.mountpoint, {"cmd": "status"}, 10)["status"]
            print(
                f"syncing {status['pending_ops']} pending operations "
                f"({_size(status['pending_bytes'])})...",
                file=sys.stderr,
            )
        request = {"cmd": "sync", "timeout": args.timeout}
        if sys.stdout.isatty():
            from vfs.progress import sync_with_progress

            answer = sync_with_progress(args.mountpoint, request, args.timeout + 15)
        else:
            answer = ask(args.mountpoint, request, args.timeout + 15)
    except ControlError as exc:
        print(f"ferry sync: {exc}", file=sys.stderr)
        return 2
    if not answer.get("ok"):
        print(f"ferry sync: {answer.get('error')}", file=sys.stderr)
        return 1
    if sys.stderr.isatty():
        print(f"in sync ({time.monotonic() - started:.1f} s)", file=sys.stderr)
    return 0


def status_main(argv: list[str]) -> int:
    """`ferry status MOUNTPOINT [--json]`."""
    parser = argparse.ArgumentParser(
        prog="ferry status", description="Show what a mounted drive is doing."
    )
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    try:
        answer = ask(args.mountpoint, {"cmd": "status"}, 10)
    except ControlError as exc:
        print(f"ferry status: {exc}", file=sys.stderr)
        return 2
    status = answer["status"]
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        print(format_status(status))
    return 0


def format_status(status: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status["since"]))
    state = "online" if status["online"] else "OFFLINE"
    cache = status["cache"]
    lines = [
        f"{status['mountpoint']}: {state} since {since}"
        + (" (read-only)" if status["read_only"] else ""),
        f"pending: {status['pending_ops']} operations on {status['pending_entries']} entries, "
        f"{_size(status['pending_bytes'])} to upload"
        + (" (uploading)" if status["uploading"] else ""),
        f"cache: {_size(cache['size'])} of {_size(cache['capacity'])} "
        f"({cache['chunks']} chunks, {_size(cache['pinned_bytes'])} pinned)",
    ]
    lines += _format_steer(status)
    if status["last_error"]:
        lines.append(f"last error: {status['last_error']}")
    conflicts = status["conflicts"]
    lines.append(f"conflicts: {len(conflicts)}")
    lines += [f"  {c['path']} -> {c['copy']} ({c['reason']}, {c['at']})" for c in conflicts]
    return "\n".join(lines)


def _format_steer(status: dict[str, Any]) -> list[str]:
    """Transfer rates and pins (issue 7)."""
    lines = [
        f"transfers: up {_size(int(status.get('upload_rate', 0)))}/s"
        + (" (uploading)" if status["uploading"] else "")
        + f", down {_size(int(status.get('download_rate', 0)))}/s"
    ]
    for pin in status.get("pins", []):
        lines.append(
            f"pinned: {pin['path'] or '/'} ({pin['files']} files, {_size(pin['local_bytes'])} "
            f"of {_size(pin['bytes'])} local)"
        )
    if status.get("pin_error"):
        lines.append(f"pin error: {status['pin_error']}")
    return lines


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
