"""`ferry serve` and `ferry admin`: the server's command line.

`serve_main` runs the ASGI app on hypercorn's trio worker until SIGTERM or
SIGINT, with a background task that, every --maintenance-interval seconds,
purges the trash past its retention and then deletes the chunks nothing
refers to any more (remote/server/collector.py).
`admin_main` wraps the functions of `remote.server.admin`.

Why hypercorn's trio worker (issue 8, measured on the 2-core dev machine with
a keep-alive client that reads with recv_into, so the client is not the
limit; the machine was shared, so ranges over repeated runs): a trivial ASGI
app answered 1 MiB GETs at 120-400 MB/s on hypercorn-trio, 310-1260 MB/s on
uvicorn (h11, asyncio) and 720-790 MB/s on hypercorn-asyncio; 1 MiB PUTs at
39-71, 105-185 and 56-199 MB/s. Through ferry's own client the drive reached
110-280 MB/s on hypercorn-trio, so on the download path the server's HTTP
layer is not the bottleneck (httpx/h11 in the client is, see
`remote/client.py`). Uploads are bounded by hypercorn reading 64 KiB per
socket read: `RECV_BYTES` widens that to 256 KiB, which measured 39 -> 73 MB/s
for 1 MiB PUTs on the same trivial app. Moving to uvicorn would mean porting
the app from trio to anyio and the drive's test harness with it, for a gain
on uploads that are fsync-bound anyway (3.4 ms per fsynced MiB here); we keep
trio and revisit if uploads become the limit.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import trio

from remote.server import admin, h11_body, wide_tls
from remote.server.app import DEFAULT_TRASH_RETENTION, FerryApp, ServerConfig
from remote.server.collector import DEFAULT_GRACE
from remote.server.ratelimit import (
    DEFAULT_MAX_FAILURES,
    DEFAULT_WINDOW,
    AuthFailureLimit,
    AuthFailureLimiter,
)
from remote.transport_policy import is_local_host

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:8800"
PURGE_INTERVAL = 3600.0
#: Bytes hypercorn's trio worker asks the socket for per read (its own default is 64 KiB).
RECV_BYTES = 256 * 1024
#: Requests one keep-alive connection may carry (hypercorn closes it after 1000 by default).
KEEP_ALIVE_MAX_REQUESTS = 100_000


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT")
    return host, int(port)


def serve_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ferry serve", description="Run the ferry sync server.")
    parser.add_argument("data_dir", type=Path, help="where metadata and chunks live (created)")
    parser.add_argument(
        "--listen",
        type=_listen,
        default=_listen(DEFAULT_LISTEN),
        help=f"HOST:PORT to listen on (default {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--trash-days",
        type=float,
        default=DEFAULT_TRASH_RETENTION / 86400,
        help="days deleted entries stay restorable (default 30)",
    )
    parser.add_argument(
        "--gc-grace-hours",
        type=float,
        default=DEFAULT_GRACE / 3600,
        help="chunks nothing refers to are deleted once this old (default"
        f" {DEFAULT_GRACE / 3600:g}; uploads wait this long for their commit)",
    )
    parser.add_argument(
        "--maintenance-interval",
        type=float,
        default=PURGE_INTERVAL,
        help=f"seconds between trash purges and chunk collections (default {PURGE_INTERVAL:g})",
    )
    parser.add_argument("--access-log", action="store_true", help="log every request")
    parser.add_argument(
        "--certfile", type=Path, help="PEM certificate (chain): serve https:// instead of http://"
    )
    parser.add_argument("--keyfile", type=Path, help="PEM private key of --certfile")
    parser.add_argument(
        "--auth-failures",
        type=int,
        default=DEFAULT_MAX_FAILURES,
        help="failed authentications one address may make per --auth-window before it gets 429"
        f" for a window (default {DEFAULT_MAX_FAILURES}; 0: no limit, e.g. behind a proxy)",
    )
    parser.add_argument(
        "--auth-window",
        type=float,
        default=DEFAULT_WINDOW,
        help=f"seconds of that window and of the block (default {DEFAULT_WINDOW:.0f})",
    )
    args = parser.parse_args(argv)
    if (args.certfile is None) != (args.keyfile is None):
        parser.error("--certfile and --keyfile go together")
    for path in (args.certfile, args.keyfile):
        if path is not None and not path.is_file():
            parser.error(f"{path} is not a readable file")
    if args.auth_failures < 0 or args.auth_window <= 0:
        parser.error("--auth-failures must be >= 0 and --auth-window > 0")
    if args.gc_grace_hours < 0 or args.maintenance_interval <= 0:
        parser.error("--gc-grace-hours must be >= 0 and --maintenance-interval > 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = ServerConfig(
        trash_retention=args.trash_days * 86400, gc_grace=args.gc_grace_hours * 3600
    )
    options = ServeOptions(
        listen=args.listen,
        access_log=args.access_log,
        certfile=args.certfile,
        keyfile=args.keyfile,
        limiter=AuthFailureLimiter(args.auth_failures, args.auth_window),
        maintenance_interval=args.maintenance_interval,
    )
    try:
        trio.run(_serve, args.data_dir, config, options)
    except KeyboardInterrupt:
        pass
    return 0


@dataclass(frozen=True)
class ServeOptions:
    """How `ferry serve` talks to the network: address, TLS, logging, the auth-failure limit."""

    listen: tuple[str, int]
    access_log: bool = False
    certfile: Path | None = None
    keyfile: Path | None = None
    limiter: AuthFailureLimiter = field(default_factory=AuthFailureLimiter)
    #: Seconds between trash purges and chunk collections.
    maintenance_interval: float = PURGE_INTERVAL


async def _serve(data_dir: Path, config: ServerConfig, options: ServeOptions) -> None:
    import hypercorn.trio.tcp_server
    from hypercorn.config import Config
    from hypercorn.trio import serve

    # hypercorn has no setting for its read size; each 64 KiB read is one round
    # through h11 and one ASGI message, which bounds uploads of 1-8 MiB chunks.
    hypercorn.trio.tcp_server.MAX_RECV = RECV_BYTES
    wide_tls.install()  # and over TLS, more than one 16 KiB record per read
    if not h11_body.install():
        log.warning("h11's receive buffer is not the expected one; uploads take a copy more")
    hyper = Config()
    hyper.bind = [f"{options.listen[0]}:{options.listen[1]}"]
    hyper.accesslog = "-" if options.access_log else None
    if options.certfile is not None:
        hyper.certfile = str(options.certfile)
        hyper.keyfile = str(options.keyfile)
        # The protocol is HTTP/1.1 (remote/PROTOCOL.md). Offered h2, curl took it and fetched
        # 1 MiB chunks at ~22 MiB/s (hypercorn's HTTP/2 sends 16 KiB frames within 64 KiB
        # flow-control windows) against 33-120 MiB/s over HTTP/1.1 on the same TLS port.
        hyper.alpn_protocols = ["http/1.1"]
    hyper.errorlog = logging.getLogger("hypercorn.error")
    hyper.keep_alive_timeout = 75
    hyper.keep_alive_max_requests = KEEP_ALIVE_MAX_REQUESTS
    hyper.graceful_timeout = 5
    with admin.open_stores(data_dir) as (meta, chunks):
        app = FerryApp(meta, chunks, config)
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_wait_for_signal, stop, app)
            nursery.start_soon(_maintain_periodically, app, options.maintenance_interval)
            scheme = "https" if options.certfile else "http"
            log.info("serving %s on %s://%s", data_dir, scheme, hyper.bind[0])
            if scheme == "http" and not is_local_host(options.listen[0]):
                log.warning(
                    "serving plain http:// on %s: tokens and files cross the network unencrypted;"
                    " give --certfile and --keyfile to serve https://",
                    options.listen[0],
                )
            asgi = AuthFailureLimit(app, options.limiter)
            await serve(asgi, hyper, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
            nursery.cancel_scope.cancel()
    log.info("ferry server stopped")


async def _wait_for_signal(stop: trio.Event, app: FerryApp) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s; finishing requests and stopping", signal.Signals(signum).name)
            stop.set()
            app.notifier.wake_all()
            return


async def _maintain_periodically(app: FerryApp, interval: float) -> None:
    while True:
        purged = await app.purge_trash()
        if purged:
            log.info("purged %d trash item(s) past the retention period", purged)
        collected = await app.collect_garbage()
        if collected.chunks:
            log.info(
                "deleted %d chunk(s) nothing refers to any more (%.1f MB freed)",
                collected.chunks,
                collected.bytes / 1e6,
            )
        await trio.sleep(interval)


def admin_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ferry admin", description="Manage a ferry server.")
    parser.add_argument("--data", type=Path, required=True, help="the server's DATA_DIR")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("add-user", help="create a user; prints its token on the last line")
    p.add_argument("name")
    p = commands.add_parser("add-token", help="another token for a user (last line)")
    p.add_argument("name")
    p = commands.add_parser("add-library", help="create a library")
    p.add_argument("name")
    p.add_argument("--owner", required=True)
    p = commands.add_parser("share", help="give a user read or write access to a library")
    p.add_argument("library")
    p.add_argument("user")
    p.add_argument("--role", choices=["read", "write"], required=True)
    commands.add_parser("check", help="verify the store; exit 1 naming each problem")
    args = parser.parse_args(argv)
    try:
        if args.command == "add-user":
            token = admin.add_user(args.data, args.name)
            print(f"created user {args.name}; their token (shown only now):")
            print(token)
        elif args.command == "add-token":
            print(admin.add_token(args.data, args.name))
        elif args.command == "add-library":
            admin.add_library(args.data, args.name, args.owner)
            print(f"created library {args.name} owned by {args.owner}")
        elif args.command == "share":
            admin.share(args.data, args.library, args.user, args.role)
            print(f"{args.user} may now {args.role} {args.library}")
        elif args.command == "check":
            problems = admin.check(args.data)
            for problem in problems:
                print(problem)
            if problems:
                print(f"{len(problems)} problem(s) found", file=sys.stderr)
                return 1
            print("store is consistent")
    except admin.AdminError as exc:
        print(f"ferry admin: {exc}", file=sys.stderr)
        return 1
    return 0
