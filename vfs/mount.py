"""The composition root of a mounted drive: open state, build the parts, run them, close them.

`run_drive` opens `state.db`, the chunk cache and the HTTP client, builds the
mirror, journal, connectivity, working copies, reader and `Operations`, pages
the whole tree in on a first mount, mounts with pyfuse3 and then runs, in one
trio nursery: the FUSE main loop, state.db's WAL checkpoints, the cache's
background work and the sync engine's push, pull and control-socket tasks.
SIGTERM/SIGINT/SIGHUP or an unmount from outside (`fusermount3 -u`, `ferry
unmount`) cancels the nursery; the parts close in reverse order. Nothing needs
saving at that point: the journal and working copies are durable as each
request answers.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from cache.store import ChunkCache, default_capacity
from remote.client import RemoteClient
from remote.errors import ServerRefused, ServerUnreachable
from remote.private_dirs import make_private_dir
from remote.protocol import MAX_FEED_PAGE
from vfs.context import DriveContext
from vfs.journal import Journal
from vfs.mirror import Mirror
from vfs.operations import Operations
from vfs.prefetch import SmallFilePrefetcher
from vfs.reader import ManifestStore, Reader
from vfs.schema import get_meta, open_db, run_checkpoints, set_meta, transaction
from vfs.sync.online import Connectivity
from vfs.workcopy import WorkCopies

log = logging.getLogger(__name__)

#: The kernel read-ahead window of a mount, in KiB (see `raise_read_ahead`).
READ_AHEAD_KB = 8192
#: How long the first contact with the server may take before the drive starts offline.
FIRST_CONTACT_TIMEOUT = 10.0


class MountError(Exception):
    """The drive cannot be mounted; the message says why and what to do."""


@dataclass
class MountConfig:
    """Everything `ferry mount` was told."""

    server_url: str
    library: str
    token: str
    mountpoint: Path
    cache_dir: Path
    cache_size: int | None = None
    writeback_delay: float = 2.0
    debug: bool = False
    #: Let other local users into the mount (FUSE `allow_other`); off unless asked for.
    allow_other: bool = False
    #: Send the token over plain http:// to another host (see `remote.transport_policy`).
    insecure_http: bool = False
    #: Answer the `user.ferry.*` xattrs (`--xattrs`); off, every xattr call is ENOSYS.
    xattrs: bool = False
    #: CA certificates an https:// server is verified against (None: the system's).
    ca_file: Path | None = None


def fuse_options(config: MountConfig) -> set[str]:
    """The mount options: only the mounting user may enter unless `--allow-other` was given.

    FUSE without `allow_other` answers EACCES to every uid but the mounting
    one (root too, when a user mounted), and a root mount does not add it by
    itself: the drive's files carry the mounting user's modes and its cache
    is private, so opening the drive to others is a decision, never a default.
    `default_permissions` stays on either way, so with `allow_other` the
    kernel still checks each file's mode bits against the caller.
    """
    options = set(pyfuse3.default_options)  # default_permissions: the kernel enforces modes
    options.add(f"fsname=ferry:{config.library}")
    options.add("subtype=ferry")
    if config.allow_other:
        options.add("allow_other")
    if config.debug:
        options.add("debug")
    return options


def check_identity(db, config: MountConfig) -> None:  # type: ignore[no-untyped-def]
    """A cache dir belongs to one library on one server; refuse to mix them up."""
    for key, value in (("server_url", config.server_url), ("library", config.library)):
        stored = get_meta(db, key)
        if stored is None:
            set_meta(db, key, value)
        elif stored != value:
            raise MountError(
                f"cache dir {config.cache_dir} belongs to {key} {stored!r}, not {value!r}; "
                "use another --cache-dir"
            )
    if get_meta(db, "device") is None:
        set_meta(db, "device", socket.gethostname())


async def learn_role(ctx: DriveContext, first_mount: bool) -> None:
    """Ask the server who we are there (read-only or not); remember it for offline starts."""
    try:
        with trio.fail_after(FIRST_CONTACT_TIMEOUT):
            info = await ctx.client.library_info()
    except (ServerUnreachable, trio.TooSlowError) as exc:
        if first_mount:
            url = f"{get_meta(ctx.db, 'server_url')}/{get_meta(ctx.db, 'library')}"
            raise MountError(
                f"cannot reach {url} to fetch the library for its first mount "
                f"(check the URL and that the server runs): {exc}"
            ) from exc
        ctx.connectivity.report_failure(
            exc if isinstance(exc, Exception) else RuntimeError(str(exc))
        )
        log.warning("server unreachable at mount; starting offline with the cached tree")
    except ServerRefused as exc:
        raise MountError(
            f"the server refused library {get_meta(ctx.db, 'library')!r}: {exc}"
        ) from exc
    else:
        set_meta(ctx.db, "role", str(info.get("role", "")))
    ctx.read_only = get_meta(ctx.db, "role") == "read"
    ctx.operations.read_only = ctx.read_only


async def page_in_tree(ctx: DriveContext) -> None:
    """First mount: page the whole tree in from the change feed (resumable: cursor saved per page)."""
    cursor = int(get_meta(ctx.db, "cursor") or 0)
    count = 0
    while True:
        page = await ctx.client.changes(cursor, limit=MAX_FEED_PAGE)
        with transaction(ctx.db):
            for entry in page.entries:
                ctx.mirror.apply_remote(entry)
            set_meta(ctx.db, "cursor", str(page.cursor))
        count += len(page.entries)
        cursor = page.cursor
        if not page.more:
            break
    log.info("paged in %d entries of the library tree (cursor %d)", count, cursor)


def build_context(config: MountConfig) -> DriveContext:
    """Open and wire every part of the drive (sync; nothing runs yet)."""
    make_private_dir(config.cache_dir)
    db = open_db(config.cache_dir / "state.db")
    check_identity(db, config)
    chunks_dir = config.cache_dir / "chunks"
    chunks_dir.mkdir(exist_ok=True)
    cache = ChunkCache.open(chunks_dir, capacity=config.cache_size or default_capacity(chunks_dir))
    client = RemoteClient(
        config.server_url,
        config.library,
        config.token,
        insecure_http=config.insecure_http,
        ca_file=config.ca_file,
    )
    connectivity = Connectivity()
    mirror = Mirror(db)
    mirror.ensure_root()
    journal = Journal(db)
    manifests = ManifestStore(db, client, connectivity)
    reader = Reader(manifests, cache, client, connectivity)
    reader.prefetcher = SmallFilePrefetcher(
        mirror, manifests, cache, client, connectivity, manifests.pending
    )
    workcopies = WorkCopies(config.cache_dir / "work", db, reader, cache)
    operations = Operations(
        mirror=mirror,
        journal=journal,
        workcopies=workcopies,
        reader=reader,
        cache_dir=config.cache_dir,
        state_xattrs=bool(config.xattrs),
    )
    return DriveContext(
        cache_dir=config.cache_dir,
        db=db,
        mirror=mirror,
        journal=journal,
        cache=cache,
        client=client,
        connectivity=connectivity,
        workcopies=workcopies,
        device=get_meta(db, "device") or socket.gethostname(),
        writeback_delay=config.writeback_delay,
        operations=operations,
        mountpoint=config.mountpoint,
    )


async def close_context(ctx: DriveContext) -> None:
    ctx.workcopies.close()
    ctx.cache.close()
    with trio.CancelScope(shield=True):
        await ctx.client.aclose()
    ctx.db.close()


async def run_drive(config: MountConfig, ready: Callable[[], None] | None = None) -> None:
    """Mount the drive and serve it until unmounted or signalled; `ready()` once it is usable."""
    ctx = build_context(config)
    try:
        first_mount = get_meta(ctx.db, "cursor") is None
        await learn_role(ctx, first_mount)
        ctx.operations.purge_detached()
        if first_mount:
            await page_in_tree(ctx)
        await serve(ctx, config, ready)
    finally:
        await close_context(ctx)


async def serve(ctx: DriveContext, config: MountConfig, ready: Callable[[], None] | None) -> None:
    pyfuse3.init(ctx.operations, str(config.mountpoint), fuse_options(config))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
            await nursery.start(run_checkpoints, ctx.db, ctx.cache_dir / "state.db")
            await nursery.start(ctx.cache.run)
            if ctx.operations.reader.prefetcher is not None:
                await nursery.start(ctx.operations.reader.prefetcher.run)
            await _start_sync_tasks(ctx, nursery)
            nursery.start_soon(_fuse_main, nursery.cancel_scope)
            await widen_read_ahead_after_init(config.mountpoint)
            log.info("mounted %s/%s on %s", config.server_url, config.library, config.mountpoint)
            if ready is not None:
                ready()
    finally:
        log.info("unmounting %s", config.mountpoint)
        pyfuse3.close(unmount=True)


def mount_device(mountpoint: Path, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The `major:minor` of the filesystem mounted on `mountpoint`, from mountinfo.

    Read from /proc rather than by stat(): a stat of our own mount would
    wait for the FUSE loop, which is not running yet.
    """
    where = os.path.abspath(mountpoint)
    device = None
    with open(mountinfo, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            fields = line.split()
            if len(fields) > 4 and _unescape_mountinfo(fields[4]) == where:
                device = fields[2]  # the last match is the mount on top
    return device


def _unescape_mountinfo(text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def raise_read_ahead(mountpoint: Path, sysfs: str = "/sys/class/bdi") -> None:
    """Widen the kernel's read-ahead for this mount to READ_AHEAD_KB.

    FUSE mounts start at the kernel's 128 KiB default, so a sequential
    reader sends 128 KiB requests one after another; a wider window makes
    the kernel send 1 MiB requests, several at a time, which the reader
    answers from chunks fetched in parallel. Needs root (sysfs); without it
    the drive works with the default window.
    """
    device = mount_device(mountpoint)
    if device is None:
        log.debug("no mountinfo line for %s; read-ahead left at the kernel default", mountpoint)
        return
    try:
        with open(f"{sysfs}/{device}/read_ahead_kb", "w") as knob:
            knob.write(str(READ_AHEAD_KB))
    except OSError as exc:
        log.info(
            "cannot widen read-ahead of %s to %d KiB (%s); sequential reads will be slower",
            mountpoint,
            READ_AHEAD_KB,
            exc,
        )


async def widen_read_ahead_after_init(mountpoint: Path) -> None:
    """`raise_read_ahead` once the kernel has the FUSE INIT answer, which would undo it.

    The INIT answer carries libfuse's `max_readahead`, which is the window the
    kernel offered at mount time (128 KiB), and the kernel lowers the mount's
    window to it; a window raised before the FUSE loop answered INIT is back
    at 128 KiB, and every sequential read arrives in 128 KiB requests. A stat
    of the mount point (in a thread: it waits for INIT and our own getattr)
    returns only after INIT was processed.
    """
    with trio.move_on_after(FIRST_CONTACT_TIMEOUT):
        try:
            await trio.to_thread.run_sync(os.stat, mountpoint, abandon_on_cancel=True)
        except OSError as exc:
            log.debug("stat of %s failed (%s); widening read-ahead anyway", mountpoint, exc)
    await trio.to_thread.run_sync(raise_read_ahead, mountpoint)


async def _fuse_main(scope: trio.CancelScope) -> None:
    """Serve FUSE requests; when the kernel ends the session (an unmount), stop everything."""
    await pyfuse3.main()
    log.info("the kernel ended the FUSE session (unmounted)")
    scope.cancel()


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("received %s, unmounting", signal.Signals(signum).name)
            scope.cancel()
            return


async def _start_sync_tasks(ctx: DriveContext, nursery: trio.Nursery) -> None:
    """The sync engine's tasks: push, pull, control socket (owned by vfs/sync/)."""
    from vfs.sync.control import run_control_server
    from vfs.sync.pull import run_pull
    from vfs.sync.push import run_push

    await nursery.start(run_control_server, ctx)
    await nursery.start(run_pull, ctx)
    await nursery.start(run_push, ctx)
    from vfs.steer import run_steering  # pins, transfer rates, the .ferry/versions tree

    await nursery.start(run_steering, ctx)
