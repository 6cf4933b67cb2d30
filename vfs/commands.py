"""`ferry mount`, `ferry unmount` and the `mount.ferry` fstab helper.

`ferry mount` checks the mountpoint (exists, is a directory, is empty, is not
already or stale-mounted), then runs the drive: in the foreground with
`--foreground`, else in a daemon child that reports through a pipe once the
mount is usable (or why it failed), so the command returns only when the drive
can be used. `ferry sync`/`status` (vfs.sync.control) and `ferry up` (vfs.up)
are other modules' and are only re-exported here for `vfs.cli`.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import hashlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from remote.private_dirs import make_private_dir
from vfs.config import parse_size, resolve_mount_args

log = logging.getLogger(__name__)

MOUNT_LOG = "mount.log"
LOCK_FILE = "mount.lock"


def sync_main(argv: list[str]) -> int:
    from vfs.sync.control import sync_main as main

    return int(main(argv) or 0)


def status_main(argv: list[str]) -> int:
    from vfs.sync.control import status_main as main

    return int(main(argv) or 0)


def up_main(argv: list[str]) -> int:
    from vfs.up import up_main as main

    return int(main(argv) or 0)


def default_cache_dir(url: str, mountpoint: Path) -> Path:
    """`~/.cache/ferry/<library>-<short hash of url+mountpoint>`."""
    library = url.rstrip("/").rsplit("/", 1)[-1]
    digest = hashlib.sha256(f"{url}\0{mountpoint}".encode()).hexdigest()[:10]
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "ferry" / f"{library}-{digest}"


def mount_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ferry mount", description="Mount a ferry library as a drive."
    )
    parser.add_argument(
        "url", nargs="?", help="the library, as http://HOST:PORT/LIBRARY (default: config file)"
    )
    parser.add_argument(
        "mountpoint", nargs="?", type=Path, help="an empty directory (default: config file)"
    )
    parser.add_argument("--token-file", type=Path, help="file holding your access token")
    parser.add_argument(
        "--config", type=Path, help="configuration file (default ~/.config/ferry/config.toml)"
    )
    parser.add_argument("--drive", help="use the [drive.NAME] table of the configuration file")
    parser.add_argument(
        "--cache-dir", type=Path, help="local state and chunk cache (default ~/.cache/ferry/...)"
    )
    parser.add_argument(
        "--cache-size",
        type=parse_size,
        help="chunk cache cap, e.g. 20GiB (default 10%% of the free disk)",
    )
    parser.add_argument(
        "--writeback-delay", type=float, help="seconds to wait before uploading changes (2)"
    )
    parser.add_argument(
        "--foreground", action="store_true", help="stay in the foreground, log to stderr"
    )
    parser.add_argument("--debug", action="store_true", help="log every request")
    # store_true flags default to None so that resolve_mount_args can tell "not given" from False
    parser.add_argument(
        "--allow-other",
        action="store_true",
        default=None,
        help="let other local users into the drive (file modes still apply; default: only you)",
    )
    parser.add_argument(
        "--xattrs",
        action="store_true",
        default=None,
        help="answer the user.ferry.state and user.ferry.revision extended attributes, for "
        "file managers and scripts (listings get slower: `ls -l` then asks the drive about "
        "attributes of every file)",
    )
    parser.add_argument(
        "--insecure-http",
        action="store_true",
        default=None,
        help="allow sending the token over plain http:// to another machine (trusted networks only)",
    )
    parser.add_argument(
        "--ca-file",
        type=Path,
        help="PEM file of CA certificates to verify an https:// server (default: the system's)",
    )
    return parser


def check_mountpoint(mountpoint: Path) -> str | None:
    """Why `mountpoint` cannot be mounted on, or None if it can."""
    try:
        mountpoint.stat()
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            return _stale(mountpoint)
        if exc.errno == errno.ENOENT:
            return f"{mountpoint} does not exist; create an empty directory there first"
        return f"{mountpoint} cannot be used: {exc.strerror}"
    if not mountpoint.is_dir():
        return f"{mountpoint} is not a directory"
    if os.path.ismount(mountpoint):
        try:
            os.statvfs(mountpoint)  # stat may be answered from the kernel's cache; statfs is not
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:
                return _stale(mountpoint)
        return f"{mountpoint} is already mounted; `ferry unmount {mountpoint}` first"
    if any(mountpoint.iterdir()):
        return f"{mountpoint} is not empty; mount on an empty directory"
    return None


def _stale(mountpoint: Path) -> str:
    return (
        f"{mountpoint} is a stale mount left by a ferry that was killed; clear it with "
        f"`fusermount3 -u -z {mountpoint}` and mount again"
    )


def lock_cache_dir(cache_dir: Path) -> int:
    """Hold an exclusive lock on the cache dir for the daemon's life (one drive per cache dir)."""
    make_private_dir(cache_dir)
    fd = os.open(cache_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SystemExit(
            f"ferry mount: cache dir {cache_dir} is in use by another running drive"
        ) from None
    return fd


def mount_main(argv: list[str]) -> int:
    args = resolve_mount_args(mount_parser(), argv)
    from remote.client import split_library_url

    try:
        server_url, library = split_library_url(args.url)
    except ValueError as exc:
        print(f"ferry mount: {exc}", file=sys.stderr)
        return 2
    from remote import transport_policy

    try:  # before the token is even read: refuse to carry it to an unsafe URL
        transport_policy.check_url(server_url, insecure_http=args.insecure_http)
        transport_policy.ssl_context(server_url, args.ca_file)
    except transport_policy.TransportRefused as exc:
        print(f"ferry mount: {exc}", file=sys.stderr)
        return 2
    try:
        token = args.token_file.read_text().strip()
    except OSError as exc:
        print(
            f"ferry mount: cannot read token file {args.token_file}: {exc.strerror}",
            file=sys.stderr,
        )
        return 2
    mountpoint = Path(os.path.abspath(args.mountpoint))
    problem = check_mountpoint(mountpoint)
    if problem:
        print(f"ferry mount: {problem}", file=sys.stderr)
        return 1
    cache_dir = Path(os.path.abspath(args.cache_dir or default_cache_dir(args.url, mountpoint)))
    lock_cache_dir(cache_dir)

    from vfs.mount import MountConfig

    config = MountConfig(
        server_url=server_url,
        library=library,
        token=token,
        mountpoint=mountpoint,
        cache_dir=cache_dir,
        cache_size=args.cache_size,
        writeback_delay=args.writeback_delay,
        debug=args.debug,
        allow_other=args.allow_other,
        insecure_http=args.insecure_http,
        xattrs=args.xattrs,
        ca_file=args.ca_file,
    )
    if args.foreground:
        _configure_logging(None, args.debug)
        return _run(config, None)
    return _daemonize(config, args.debug)


def _configure_logging(path: Path | None, debug: bool) -> None:
    handler: logging.Handler = logging.FileHandler(path) if path else logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _run(config, report_fd: int | None) -> int:  # type: ignore[no-untyped-def]
    """Run the drive until it is unmounted; report readiness or failure on `report_fd`."""
    import trio

    from vfs.mount import MountError, run_drive

    def ready() -> None:
        if report_fd is not None:
            os.write(report_fd, b"ok\n")
            os.close(report_fd)

    try:
        trio.run(run_drive, config, ready)
    except MountError as exc:
        return _fail(report_fd, str(exc))
    except Exception as exc:
        log.exception("the drive stopped on an error")
        return _fail(report_fd, f"{type(exc).__name__}: {exc} (see {config.cache_dir / MOUNT_LOG})")
    return 0


def _fail(report_fd: int | None, message: str) -> int:
    log.error("%s", message)
    if report_fd is not None:
        try:
            os.write(report_fd, f"error: {message}\n".encode())
            os.close(report_fd)
        except OSError:
            pass  # already reported ready; the message is in the log
    else:
        print(f"ferry mount: {message}", file=sys.stderr)
    return 1


def _daemonize(config, debug: bool) -> int:  # type: ignore[no-untyped-def]
    """Fork a daemon that serves the drive; return once it reports the mount usable (or failed)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            answer = pipe.read().decode(errors="replace").strip()
        if answer == "ok":
            return 0
        os.waitpid(pid, 0)
        reason = (
            answer.removeprefix("error: ")
            or f"the drive exited early; see {config.cache_dir / MOUNT_LOG}"
        )
        print(f"ferry mount: {reason}", file=sys.stderr)
        return 1
    os.close(read_fd)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    log_fd = os.open(config.cache_dir / MOUNT_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(devnull, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.chdir("/")
    _configure_logging(None, debug)
    code = 1
    try:
        code = _run(config, write_fd)
    finally:
        os._exit(code)


def unmount_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ferry unmount", description="Unmount a drive cleanly.")
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for the drive to stop"
    )
    args = parser.parse_args(argv)
    mountpoint = Path(os.path.abspath(args.mountpoint))
    from vfs.sync.control import ControlError, ask

    try:
        pid = int(ask(mountpoint, {"cmd": "status"}, 10)["status"]["pid"])
    except ControlError as exc:
        if exc.errno == errno.ENOTCONN:
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
            print(f"ferry unmount: cleared the stale mount at {mountpoint}")
            return 0
        print(f"ferry unmount: {exc}", file=sys.stderr)
        return 1
    done = subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"ferry unmount: {done.stderr.strip() or 'fusermount3 failed'}", file=sys.stderr)
        return 1
    deadline = time.monotonic() + args.timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            print(
                f"ferry unmount: unmounted, but the drive (pid {pid}) is still stopping",
                file=sys.stderr,
            )
            return 1
        time.sleep(0.05)
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie of our own (foreground test runs) counts as stopped
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


#: `-o` options mount.ferry passes on to `ferry mount` as --flags.
OPTIONS = (
    "token_file",
    "cache_dir",
    "cache_size",
    "writeback_delay",
    "drive",
    "config",
    "ca_file",
)
#: `-o` options without a value that mount.ferry passes on as --flags.
FLAG_OPTIONS = ("allow_other", "insecure_http", "xattrs")


def fstab_main(argv: list[str]) -> int:
    """`mount.ferry URL MOUNTPOINT -o token_file=F[,cache_dir=D,cache_size=N,writeback_delay=S]`.

    `drive=NAME` and `config=FILE` read the rest from the configuration file
    (then URL may be `ferry`, a placeholder: mount(8) needs a source field).
    """
    positional: list[str] = []
    options: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "-o":
            options += next(it, "").split(",")
        elif arg.startswith("-"):
            continue  # mount(8) passes -n, -s, -v: nothing to do for them
        else:
            positional.append(arg)
    if len(positional) != 2:
        print("usage: mount.ferry URL/LIBRARY MOUNTPOINT -o token_file=FILE[,...]", file=sys.stderr)
        return 2
    # a source without "://" is a placeholder: the URL comes from the configuration file
    translated = positional if "://" in positional[0] else positional[1:]
    for option in options:
        key, _, value = option.partition("=")
        if key in OPTIONS and value:
            translated += [f"--{key.replace('_', '-')}", value]
        elif key in FLAG_OPTIONS and not value:
            translated.append(f"--{key.replace('_', '-')}")
    return mount_main(translated)
