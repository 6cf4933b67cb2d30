"""The drive crash matrix (issue 9): SIGKILL of the drive at each stage of getting a change out.

Device A reaches a real `ferry serve` through `tools.faultproxy.FaultProxy`,
whose holds stop it at an exact moment; then A is killed with SIGKILL:

- ``writing``: a writer is in the middle of a file (not closed); files closed
  before it were still settling or uploading;
- ``closed``: everything closed, nothing sent (a long write-back delay);
- ``uploading``: the chunk upload held in the proxy (in longer runs also:
  stored by the server, its answer held);
- ``before-commit``: every chunk uploaded, the commit held before the server
  saw it (then dropped, or delivered late in longer runs);
- ``after-commit``: the commit applied on the server, its answer held before
  the drive saw it;
- ``replay``: edits made while the server was down (killed) replayed after
  it came back, killed when the second of the replay's commits is seen (the
  first one acknowledged).

The workload, in a folder per round, holds small files and a multi-chunk
file (> 4 MiB), an overwrite, a rename into a new folder and a delete of
files the server already had. After each kill A restarts on the same cache
dir and `ferry sync`s; then every file closed before the kill is on the
server exactly once with its bytes (read back through a fresh mount B),
there are no extra files or conflict copies and no version was committed
twice, A's tree equals B's, no chunk stays pinned for an upload, and
`ferry admin --data DIR check` passes.

`FERRY_CRASH_ROUNDS=N` repeats each stage N times on the same drive with
random kill timing (which upload or commit is held, how far the writer got,
whether a held commit is dropped or delivered late, a second kill while the
drive recovers); `FERRY_CRASH_SEED` repeats those choices. Run with `-s` to
see the crash points and bytes verified.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support import ServerProcess, drive_status, ferry, wait_for
from tests.t5_sync import tree
from tests.t5_twoway_support import server_tree, versions
from tools.faultproxy import FaultProxy

if TYPE_CHECKING:
    from tests.conftest import Library
    from tests.mounts import DriveProcess

pytest_plugins = ["tests.mounts"]

pytestmark = [pytest.mark.mount, pytest.mark.slow]

ROUNDS = int(os.environ.get("FERRY_CRASH_ROUNDS", "1"))
STAGES = ["writing", "closed", "uploading", "before-commit", "after-commit", "replay"]
#: Request lines the holds match (remote/PROTOCOL.md).
#: A chunk upload: the drive sends new chunks in batches (`chunks/upload`, up to 8 MiB each,
#: so this workload's chunks go in one request); a single PUT is still matched.
CHUNK_UPLOAD = (
    r"^(PUT /v1/libraries/[^/]+/chunks/[0-9a-f]{64}|POST /v1/libraries/[^/]+/chunks/upload) "
)
COMMIT = r"^POST /v1/libraries/[^/]+/commit "
BIG = 5 * 1024 * 1024 + 4321
HOLD_TIMEOUT = 60.0

#: Crash points survived and bytes verified, for the closing note (printed with -s).
CRASHES: Counter[str] = Counter()
VERIFIED: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    yield
    print(
        f"\ndrive crash points survived: {sum(CRASHES.values())} {dict(CRASHES)};"
        f" bytes verified on the server: {sum(VERIFIED.values())} {dict(VERIFIED)}"
    )


@dataclass
class Rig:
    """Device A behind its proxy, verifier B, and what one stage's folder must hold on the server.

    The server, the proxy and both drives live for the whole module (each stage
    works in its own folder and checks only that folder), so the matrix costs
    one server start and two mounts, not six of each.
    """

    library: Library
    proxy: FaultProxy
    drive: DriveProcess
    verifier: DriveProcess
    files: dict[str, bytes] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=set)
    #: A file being written at the kill: absent on the server, or a prefix of these bytes.
    unfinished: dict[str, bytes] = field(default_factory=dict)
    writeback_delay: float | None = None

    @property
    def root(self) -> Path:
        return self.drive.mountpoint

    def write(self, rel: str, data: bytes) -> None:
        (self.root / rel).write_bytes(data)
        self.files[rel] = data

    def mkdir(self, rel: str) -> None:
        (self.root / rel).mkdir()
        self.dirs.add(rel)

    def rename(self, src: str, dst: str) -> None:
        os.rename(self.root / src, self.root / dst)
        self.files[dst] = self.files.pop(src)

    def unlink(self, rel: str) -> None:
        (self.root / rel).unlink()
        del self.files[rel]

    def restart(self, writeback_delay: float = 0.2) -> None:
        """Start A again on the same cache dir (after a kill)."""
        self.writeback_delay = writeback_delay
        self.drive.extra_args = ("--writeback-delay", str(writeback_delay))
        self.drive.start()

    def running_with(self, writeback_delay: float) -> None:
        """Make sure A runs with this write-back delay (a stage before may have failed)."""
        alive = self.drive.proc is not None and self.drive.proc.poll() is None
        if alive and self.writeback_delay == writeback_delay:
            return
        self.drive.kill()
        self.restart(writeback_delay)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    from tests.conftest import Library
    from tests.mounts import DriveProcess, mount_drive

    tmp = tmp_path_factory.mktemp("drive-crash")
    server = ServerProcess(tmp / "server-data")
    server.start()
    proxy = FaultProxy(("127.0.0.1", server.port))
    proxy.start()
    drives: list[DriveProcess] = []
    try:
        token = server.add_user("alice")
        server.admin("add-library", "docs", "--owner", "alice")
        library = Library(server, "docs", "alice", token)
        drives.append(mount_drive(library, tmp / "b-mnt", tmp / "b-cache"))
        token_file = tmp / "a-cache.token"
        token_file.write_text(token + "\n")
        url = f"{proxy.url}/{library.name}"
        drives.append(DriveProcess(url, tmp / "a-mnt", tmp / "a-cache", token_file))
        yield Rig(library, proxy, drives[1], drives[0])
    finally:
        for drive in drives:
            drive.cleanup()
        proxy.stop()
        server.stop()


@pytest.fixture
def rig(world: Rig) -> Rig:
    world.files, world.dirs, world.unfinished = {}, set(), {}
    return world


@contextmanager
def flushing(rig: Rig) -> Iterator[None]:
    """`ferry sync` on A in the background: the whole journal goes out at once, in one round."""
    command = [sys.executable, "-m", "vfs", "sync", str(rig.root), "--timeout", "120"]
    flush = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        try:
            flush.wait(30)  # it ends when A is killed under it
        except subprocess.TimeoutExpired:
            flush.kill()
            flush.wait()


def blob(seed: str, size: int) -> bytes:
    """`size` reproducible, incompressible bytes (no two files share a chunk)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.blake2b(f"{seed}:{counter}".encode(), digest_size=64).digest()
        counter += 1
    return bytes(out[:size])


# --- the workload ---------------------------------------------------------------------------


def baseline(rig: Rig, top: str) -> None:
    """Files the server already has, for the crash workload to edit, rename and delete."""
    rig.mkdir(top)
    for name in ("keep.txt", "edit.txt", "old-name.txt", "doomed.txt"):
        rig.write(f"{top}/{name}", f"{top}/{name}: on the server before\n".encode() * 50)
    rig.drive.sync()


def first_half(rig: Rig, top: str) -> None:
    """New files, small and multi-chunk, in a new folder: the first commit batch."""
    rig.mkdir(f"{top}/new")
    for i, size in enumerate((1, 700, 65_536, 300_001)):
        rig.write(f"{top}/new/small-{i}.bin", blob(f"{top}-small-{i}", size))
    rig.write(f"{top}/new/big.bin", blob(f"{top}-big", BIG))
    rig.rename(f"{top}/old-name.txt", f"{top}/new/renamed.txt")


def second_half(rig: Rig, top: str) -> None:
    """A chmod of the entry just renamed (a second op on one entry starts a second commit
    batch, `vfs.journal.split_batches`), an overwrite and a delete."""
    os.chmod(rig.root / top / "new" / "renamed.txt", 0o600)
    rig.write(f"{top}/edit.txt", blob(f"{top}-edit", 200_000))
    rig.unlink(f"{top}/doomed.txt")


def workload(rig: Rig, top: str) -> None:
    first_half(rig, top)
    second_half(rig, top)


def on_server(rig: Rig, rel: str) -> bool:
    return rel in server_tree(rig.library)


# --- the stages -----------------------------------------------------------------------------
#
# Each returns the name of the crash point it reached. Stages that hold a request
# run A with a long write-back delay and flush it with `ferry sync` once the
# workload is closed, so that the first commit holds all of `first_half`.


def crash_while_writing(rig: Rig, top: str, rng: random.Random, first: bool) -> str:
    """Kill with a file half written (never closed), closed files settling or uploading."""
    rig.running_with(writeback_delay=0.2)
    baseline(rig, top)
    workload(rig, top)
    rel = f"{top}/unfinished.bin"
    data = blob(f"{top}-unfinished", 8 * 1024 * 1024)
    rig.unfinished[rel] = data
    kill_at = 3 * 1024 * 1024 if first else rng.randrange(1, len(data))
    written = 0
    reached = threading.Event()

    def writer() -> None:
        nonlocal written
        try:
            with open(rig.root / rel, "wb") as f:
                for offset in range(0, len(data), 64 * 1024):
                    written += f.write(data[offset : offset + 64 * 1024])
                    if written >= kill_at:
                        reached.set()
        except OSError:
            pass  # the drive died under the writer: expected
        finally:
            reached.set()

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    assert reached.wait(HOLD_TIMEOUT), "the writer did not get going"
    rig.drive.kill()
    thread.join(10)
    assert written < len(data), "the writer finished before the kill; the test proves nothing"
    return recover(rig, rng, first, "writing")


def crash_after_close(rig: Rig, top: str, rng: random.Random, first: bool) -> str:
    """Kill with every change closed and journaled, nothing of it sent."""
    rig.running_with(writeback_delay=300)
    baseline(rig, top)  # `ferry sync` flushes at once, whatever the write-back delay
    commits = rig.proxy.hold(COMMIT, after=10**9)  # counts, never holds
    try:
        workload(rig, top)
        if not first:
            time.sleep(rng.uniform(0, 1))
        pending = drive_status(rig.root)["pending_ops"]
        rig.drive.kill()
        assert pending > 0 and commits.matched == 0, "the workload was sent before the kill"
    finally:
        commits.release()
    return recover(rig, rng, first, "closed")


def crash_uploading(rig: Rig, top: str, rng: random.Random, first: bool) -> str:
    """Kill with the chunk upload held in the proxy, or stored and its answer held."""
    rig.running_with(writeback_delay=300)
    baseline(rig, top)
    # The workload's chunks go in one batch: hold it, or let the server store it and hold
    # the answer (chunks on the server, the drive does not know).
    stored = not first and rng.random() < 0.5
    uploads = rig.proxy.hold(CHUNK_UPLOAD, response=stored)
    commits = rig.proxy.hold(COMMIT, after=10**9)
    try:
        workload(rig, top)
        with flushing(rig):
            assert uploads.wait(HOLD_TIMEOUT), "no chunk upload was seen"
            rig.drive.kill()
        assert commits.matched == 0, "a commit went out before the held upload"
    finally:
        uploads.discard()
        commits.release()
    label = "uploading, answer held" if stored else "uploading, upload held"
    return recover(rig, rng, first, label)


def crash_before_commit(rig: Rig, top: str, rng: random.Random, first: bool) -> str:
    """Kill with the chunks on the server and the commit held before it reached it."""
    rig.running_with(writeback_delay=300)
    baseline(rig, top)
    batch = 0 if first else rng.randrange(0, 2)
    commit = rig.proxy.hold(COMMIT, after=batch)
    late = not first and rng.random() < 0.5
    try:
        workload(rig, top)
        with flushing(rig):
            assert commit.wait(HOLD_TIMEOUT), "no commit was seen"
            rig.drive.kill()
        # The first batch creates big.bin, the second deletes doomed.txt.
        if batch == 0:
            applied = on_server(rig, f"{top}/new/big.bin")
        else:
            applied = not on_server(rig, f"{top}/doomed.txt")
        assert not applied, "the commit was held, yet applied"
    finally:
        # Dropped, or delivered late: a dead client's request may still arrive (TCP
        # retransmits what it had sent), before or while the restarted drive re-sends it.
        commit.release() if late else commit.discard()
    label = f"before-commit {batch + 1}" + (", delivered late" if late else "")
    return recover(rig, rng, first, label)


def crash_after_commit(rig: Rig, top: str, rng: random.Random, first: bool) -> str:
    """Kill with the commit applied on the server and its answer held before the drive got it."""
    rig.running_with(writeback_delay=300)
    baseline(rig, top)
    batch = 0 if first else rng.randrange(0, 2)
    answer = rig.proxy.hold(COMMIT, response=True, after=batch)
    try:
        workload(rig, top)
        with flushing(rig):
            assert answer.wait(HOLD_TIMEOUT), "no commit answer was seen"
            if not first:
                time.sleep(rng.uniform(0, 0.5))
            rig.drive.kill()
    finally:
        answer.discard()
    applied = on_server(rig, f"{top}/new/big.bin")
    if batch == 1:
        applied = applied and not on_server(rig, f"{top}/doomed.txt")
    assert applied, "the commit was not applied before the kill"
    return recover(rig, rng, first, f"after-commit {batch + 1}")


def crash_replaying(rig: Rig, top: str, rng: random.Random, first: bool) -> str:
    """Kill in the middle of replaying an offline journal (two commits' worth)."""
    rig.running_with(writeback_delay=0.2)
    baseline(rig, top)
    rig.library.server.kill()  # gone at once (a graceful stop waits out long polls)
    try:
        wait_for(lambda: not drive_status(rig.root)["online"], 30, "A notices the server is gone")
        workload(rig, top)
    finally:
        if first:
            stop = rig.proxy.hold(COMMIT, after=1)
        else:
            # The replay sends one chunk upload (all its chunks) and two commits.
            pattern, response, most = rng.choice(
                [
                    (CHUNK_UPLOAD, False, 1),
                    (CHUNK_UPLOAD, True, 1),
                    (COMMIT, False, 2),
                    (COMMIT, True, 2),
                ]
            )
            stop = rig.proxy.hold(pattern, response=response, after=rng.randrange(0, most))
        rig.library.server.start()
    try:
        if not stop.wait(HOLD_TIMEOUT):
            status = drive_status(rig.root)
            raise AssertionError(
                f"the replay never reached {stop!r} ({stop.matched} seen): {status}"
            )
        rig.drive.kill()
    finally:
        stop.discard()
    if first:
        assert on_server(rig, f"{top}/new/big.bin"), "the first replay commit was not applied"
        assert on_server(rig, f"{top}/doomed.txt"), "the second replay commit was applied"
    what = "answer to" if stop.response else "request"
    kind = "commit" if "commit" in stop.pattern.pattern else "chunk upload"
    return recover(rig, rng, first, f"replay, {what} {kind} {stop.after + 1}")


def recover(rig: Rig, rng: random.Random, first: bool, label: str) -> str:
    """Start A again; in longer runs, sometimes kill it once more while it recovers."""
    rig.restart()
    if first or rng.random() >= 0.3:
        return label
    time.sleep(rng.uniform(0, 1.5))  # re-sending its commit, pulling, or replaying
    rig.drive.kill()
    rig.restart()
    return f"{label}, killed again while recovering"


CRASH = {
    "writing": crash_while_writing,
    "closed": crash_after_close,
    "uploading": crash_uploading,
    "before-commit": crash_before_commit,
    "after-commit": crash_after_commit,
    "replay": crash_replaying,
}


# --- the checks ------------------------------------------------------------------------------


def check_after_restart(rig: Rig, top: str) -> int:
    """Sync A, then hold the server, B and A to the expected folder; returns the bytes verified."""
    rig.drive.sync(timeout=120)
    status = drive_status(rig.root)
    assert status["pending_ops"] == 0 and status["conflicts"] == [], status
    # Nothing is pinned here but chunks waiting for their commit: once synced, none may stay.
    assert status["cache"]["pinned_bytes"] == 0, f"uploaded chunks stay pinned: {status['cache']}"
    inside = {p: e for p, e in server_tree(rig.library).items() if p.split("/")[0] == top}
    files = {p: e for p, e in inside.items() if e.kind == "file"}
    for rel, data in rig.unfinished.items():
        if rel in files:  # written up to some point before the kill: a prefix, never junk
            kept = (rig.root / rel).read_bytes()
            assert kept == data[: len(kept)], (
                f"{rel}: the unfinished file holds bytes never written"
            )
            rig.files[rel] = kept
        outcome = f"{len(rig.files[rel])} bytes" if rel in files else "absent"
        print(f"  {rel} (never closed, {len(data)} bytes meant): {outcome} after the restart")
    assert set(files) == set(rig.files), (
        f"extra on the server: {sorted(set(files) - set(rig.files))}; "
        f"missing: {sorted(set(rig.files) - set(files))}"
    )
    assert {p for p, e in inside.items() if e.kind == "dir"} == rig.dirs
    for rel, entry in files.items():
        manifests = [v.manifest for v in versions(rig.library, entry.id)]
        twice = [m for m, n in zip(manifests, manifests[1:], strict=False) if m == n]
        assert not twice, f"{rel}: one content committed twice in a row (a replayed commit)"
    rig.verifier.sync()
    verified = 0
    for rel, data in rig.files.items():
        assert (rig.verifier.mountpoint / rel).read_bytes() == data, f"{rel} differs on the server"
        verified += len(data)
    assert tree(rig.root / top) == tree(rig.verifier.mountpoint / top)
    check = ferry("admin", "--data", str(rig.library.server.data_dir), "check", check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    return verified


@pytest.mark.parametrize("stage", STAGES)
def test_drive_killed_loses_and_duplicates_nothing(rig: Rig, stage: str) -> None:
    seed = os.environ.get("FERRY_CRASH_SEED", str(time.time_ns()))
    print(f"\n{stage}: FERRY_CRASH_SEED={seed}")
    rng = random.Random(f"{stage}-{seed}")
    for n in range(ROUNDS):
        top = f"{stage}-{n}"
        CRASHES[CRASH[stage](rig, top, rng, n == 0)] += 1
        VERIFIED[stage] += check_after_restart(rig, top)
        rig.files, rig.dirs, rig.unfinished = {}, set(), {}
