"""Randomized two-device sync: random edits, server restarts, then convergence and no lost bytes.

Two devices (each its own cache dir) mount one library and take turns at
random operations -- create, overwrite, append, rename (within and across
directories, sometimes over an existing file), mkdir, delete a file, delete an
empty directory, move a directory -- while the server is stopped and started
at random and `ferry sync` runs now and then. At the end, with the server up,
both devices sync twice and the test checks:

- convergence: both trees are identical (names, kinds, sizes, modes, sha256 of
  contents) and equal to the server's own tree;
- no byte lost: every content some device wrote and no device deliberately
  destroyed afterwards (overwrote, appended to, deleted, renamed another file
  over) is in the final tree, under a name the test used or a conflict copy of
  one; and no file holds bytes nobody wrote.

A device destroys only what it can read first (the test reads the bytes it is
about to replace), so "destroyed" is exact even when the device's view was
stale. CI runs two seeds of 45 steps; `FERRY_RANDOM_STEPS=200
FERRY_RANDOM_SEEDS=1,2,3,4,5` runs longer. A failure names its seed.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

from remote.client import RemoteClient
from tests.t5_sync import tree
from tests.t5_twoway_support import server_tree

if TYPE_CHECKING:
    from tests.conftest import Library
    from tests.mounts import DriveFactory, DriveProcess

pytest_plugins = ["tests.mounts"]

pytestmark = [pytest.mark.mount, pytest.mark.slow]

STEPS = int(os.environ.get("FERRY_RANDOM_STEPS", "45"))
SEEDS = [int(s) for s in os.environ.get("FERRY_RANDOM_SEEDS", "1,2").split(",") if s.strip()]

#: Small name pools, so that devices collide on names now and then.
FILE_NAMES = ["a.txt", "b.txt", "notes.md", "data.bin", "x"]
DIR_NAMES = ["d1", "d2", "docs", "tmp"]
CONFLICT = re.compile(
    r"^(?P<stem>.*) \(conflict from \S+ \d{4}-\d\d-\d\d \d{4}(?: \d+)?\)(?P<ext>\.[^.]*)?$"
)
#: The name the server gives an entry restored from the trash when its own name is taken.
RESTORED = re.compile(r"^(?P<stem>.*) \(restored(?: \d+)?\)(?P<ext>\.[^.]*)?$")


# --- the server's tree, with contents ------------------------------------------------------


async def _server_files(library: Library, manifests: dict[str, str]) -> dict[str, str]:
    """sha256 of each manifest's bytes, fetched from the server."""
    out: dict[str, str] = {}
    async with RemoteClient(library.server.url, library.name, library.token) as client:
        for path, manifest in manifests.items():
            digest = hashlib.sha256()
            chunks = await client.get_manifest(manifest) if manifest else []
            for ref in chunks:
                digest.update(await client.get_chunk(ref.hash))
            out[path] = digest.hexdigest()
    return out


def server_view(library: Library) -> dict[str, tuple]:
    """The server's live tree in `tests.t5_sync.tree`'s shape (contents hashed from its chunks)."""
    entries = {p: e for p, e in server_tree(library).items() if p}
    manifests = {p: e.manifest or "" for p, e in entries.items() if e.kind == "file"}
    digests = trio.run(_server_files, library, manifests)
    out: dict[str, tuple] = {}
    for path, e in entries.items():
        if e.kind == "dir":
            out[path] = ("dir", e.mode)
        elif e.kind == "symlink":
            out[path] = ("symlink", e.target)
        else:
            out[path] = ("file", e.mode, e.size, digests[path])
    return out


def settle(drives: list[DriveProcess], library: Library, timeout: float = 30) -> dict[str, tuple]:
    """Sync every device twice, then wait until all trees and the server's agree; return it."""
    for _ in range(2):
        for d in drives:
            d.sync(timeout=90)
    deadline = time.monotonic() + timeout
    while True:
        views = [tree(d.mountpoint) for d in drives]
        on_server = server_view(library)
        if all(v == on_server for v in views):
            return on_server
        if time.monotonic() > deadline:
            for d, v in zip(drives, views, strict=True):
                only_here = {k: v[k] for k in v.keys() - on_server.keys()}
                only_server = {k: on_server[k] for k in on_server.keys() - v.keys()}
                differ = {k: (v[k], on_server[k]) for k in v.keys() & on_server.keys()}
                differ = {k: pair for k, pair in differ.items() if pair[0] != pair[1]}
                print(f"{d.mountpoint}: only here {only_here}")
                print(f"  only on server {only_server}\n  differ {differ}")
            raise AssertionError("the devices did not converge with the server (see stdout)")
        time.sleep(0.2)


# --- the random walk -----------------------------------------------------------------------


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class History:
    """What the walk wrote and destroyed, by content hash, and every name it used."""

    written: set[str] = field(default_factory=set)
    destroyed: set[str] = field(default_factory=set)
    names: set[str] = field(default_factory=set)
    log: list[str] = field(default_factory=list)
    #: content hash -> "step N: where it was written", for failure messages
    origin: dict[str, str] = field(default_factory=dict)

    def wrote(self, data: bytes, where: str) -> None:
        self.written.add(sha(data))
        self.destroyed.discard(sha(data))
        self.origin[sha(data)] = where


class Walk:
    """One seeded sequence of operations on two devices and one server."""

    def __init__(
        self, seed: int, drives: list[DriveProcess], library: Library, history: History
    ) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.drives = drives
        self.library = library
        self.history = history
        self.server_up = True
        self.step = 0

    # -- looking at one device's tree --

    def entries(self, root: Path) -> tuple[list[Path], list[Path]]:
        """(directories including root, files) of one device, as it sees them now."""
        dirs, files = [root], []
        for dirpath, dirnames, filenames in os.walk(root):
            dirs.extend(Path(dirpath) / n for n in dirnames)
            files.extend(Path(dirpath) / n for n in filenames)
        return dirs, files

    def content(self, n: int) -> bytes:
        """Unique bytes: a tag naming seed and step, then random bytes (sometimes > 1 chunk)."""
        size = self.rng.choice([0, 10, 300, 5000, 70_000, 300_000, 1_500_000])
        tag = f"<seed {self.seed} step {self.step} #{n}>".encode()
        return tag + self.rng.randbytes(size)

    def read_or_skip(self, path: Path) -> bytes | None:
        """The bytes about to be destroyed, or None if this device cannot read them now."""
        try:
            return path.read_bytes()
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.ENOENT, errno.EISDIR):
                return None  # offline and not cached, or a pull moved it meanwhile
            raise

    # -- operations; each returns a description, or None when it did not apply --

    def op_create(self, root: Path) -> str | None:
        dirs, _ = self.entries(root)
        parent = self.rng.choice(dirs)
        name = self.rng.choice([*FILE_NAMES, f"f{self.step}.dat"])
        path = parent / name
        if path.exists() or path.is_symlink():
            return None
        data = self.content(0)
        path.write_bytes(data)
        self.history.wrote(data, f"step {self.step}: {path}")
        self.history.names.add(name)
        return f"create {path.relative_to(root)} ({len(data)} B)"

    def op_overwrite(self, root: Path, append: bool) -> str | None:
        _, files = self.entries(root)
        if not files:
            return None
        path = self.rng.choice(files)
        old = self.read_or_skip(path)
        if old is None:
            return None
        self.history.destroyed.add(sha(old))
        extra = self.content(1)
        with open(path, "ab" if append else "wb") as f:
            f.write(extra)
        self.history.wrote(old + extra if append else extra, f"step {self.step}: {path}")
        return f"{'append' if append else 'overwrite'} {path.relative_to(root)}"

    def op_rename(self, root: Path) -> str | None:
        dirs, files = self.entries(root)
        if not files:
            return None
        src = self.rng.choice(files)
        parent = self.rng.choice([src.parent, src.parent, *dirs])
        name = self.rng.choice([*FILE_NAMES, f"r{self.step}.txt"])
        dst = parent / name
        if dst == src or dst.is_dir():
            return None
        if dst.exists():
            old = self.read_or_skip(dst)
            if old is None:
                return None
            self.history.destroyed.add(sha(old))
        os.rename(src, dst)
        self.history.names.add(name)
        return f"rename {src.relative_to(root)} -> {dst.relative_to(root)}"

    def op_mkdir(self, root: Path) -> str | None:
        dirs, _ = self.entries(root)
        name = self.rng.choice([*DIR_NAMES, f"dir{self.step}"])
        path = self.rng.choice(dirs) / name
        if path.exists():
            return None
        path.mkdir()
        self.history.names.add(name)
        return f"mkdir {path.relative_to(root)}"

    def op_delete(self, root: Path) -> str | None:
        _, files = self.entries(root)
        if not files:
            return None
        path = self.rng.choice(files)
        old = self.read_or_skip(path)
        if old is None:
            return None
        self.history.destroyed.add(sha(old))
        path.unlink()
        return f"delete {path.relative_to(root)}"

    def op_rmdir(self, root: Path) -> str | None:
        dirs, _ = self.entries(root)
        empty = [d for d in dirs[1:] if not any(d.iterdir())]
        if not empty:
            return None
        path = self.rng.choice(empty)
        path.rmdir()
        return f"rmdir {path.relative_to(root)}"

    def op_move_dir(self, root: Path) -> str | None:
        dirs, _ = self.entries(root)
        if len(dirs) < 2:
            return None
        src = self.rng.choice(dirs[1:])
        targets = [d for d in dirs if d != src and src not in d.parents]
        parent = self.rng.choice(targets)
        name = self.rng.choice([src.name, *DIR_NAMES, f"m{self.step}"])
        dst = parent / name
        if dst.exists():
            return None
        os.rename(src, dst)
        self.history.names.add(name)
        return f"move dir {src.relative_to(root)} -> {dst.relative_to(root)}"

    def one_step(self) -> None:
        self.step += 1
        roll = self.rng.random()
        if roll < 0.07:
            self.toggle_server()
            return
        d = self.rng.choice(self.drives)
        if roll < 0.15:
            if self.server_up:
                d.sync(timeout=90)
                self.history.log.append(f"{self.step}: sync {d.mountpoint.name}")
            return
        root = d.mountpoint
        ops = [
            (3, lambda: self.op_create(root)),
            (2, lambda: self.op_overwrite(root, append=False)),
            (1, lambda: self.op_overwrite(root, append=True)),
            (2, lambda: self.op_rename(root)),
            (1, lambda: self.op_mkdir(root)),
            (1, lambda: self.op_delete(root)),
            (1, lambda: self.op_rmdir(root)),
            (1, lambda: self.op_move_dir(root)),
        ]
        for _ in range(5):
            op = self.rng.choices([f for _, f in ops], [w for w, _ in ops])[0]
            try:
                done = op()
            except (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError):
                done = None  # a pull changed this device's tree between look and act
            except OSError as exc:
                if exc.errno != errno.ENOTEMPTY:
                    raise AssertionError(f"step {self.step} on {root.name}: {exc!r}") from exc
                done = None
            if done:
                self.history.log.append(f"{self.step}: {root.name}: {done}")
                return

    def toggle_server(self) -> None:
        if self.server_up:
            self.library.server.stop()
        else:
            self.library.server.start()
        self.server_up = not self.server_up
        self.history.log.append(f"{self.step}: server {'up' if self.server_up else 'down'}")


def check_no_byte_lost(final: dict[str, tuple], history: History) -> None:
    contents = {v[3]: path for path, v in final.items() if v[0] == "file"}
    lost = history.written - history.destroyed - contents.keys()
    assert not lost, (
        f"written contents in no file of the final tree: {[history.origin[h] for h in lost]}"
    )
    unknown = {p for h, p in contents.items() if h not in history.written | {sha(b"")}}
    assert not unknown, f"files holding bytes no device wrote: {sorted(unknown)}"
    for path in final:
        base = path.rsplit("/", 1)[-1]
        # A conflict copy edited on both devices gets a conflict copy of its own.
        while match := CONFLICT.match(base) or RESTORED.match(base):
            base = match["stem"] + (match["ext"] or "")
        assert base in history.names, f"{path!r} has a name the test never used"


@pytest.mark.parametrize("seed", SEEDS)
def test_random_edits_on_two_devices_converge_without_losing_bytes(
    drive_factory: DriveFactory, library: Library, seed: int
):
    drives = [drive_factory("a"), drive_factory("b")]
    history = History()
    walk = Walk(seed, drives, library, history)
    started = time.monotonic()
    try:
        for _ in range(STEPS):
            walk.one_step()
        if not walk.server_up:
            walk.toggle_server()
        final = settle(drives, library)
        check_no_byte_lost(final, history)
    except BaseException:
        print(f"FERRY_RANDOM_SEEDS={seed} FERRY_RANDOM_STEPS={STEPS} failed; the walk:")
        print("\n".join(history.log))
        raise
    print(f"seed {seed}: {STEPS} steps in {time.monotonic() - started:.1f} s, final tree:")
    print("\n".join(sorted(final)))
