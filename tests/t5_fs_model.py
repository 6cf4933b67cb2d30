"""The mount behaves like a local filesystem: random operation sequences, compared with a real dir.

Hypothesis generates sequences of writes at offsets, truncations, renames
(also over existing files and into a subdirectory), unlinks (also while a
handle is open), reads and `ferry sync` (after which edits mix local bytes
with chunks from the server); each runs on the mount and on a directory of the
local disk, and results and errors must match. After all examples the drive
is remounted and the whole tree compared again (everything was durable).
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

if TYPE_CHECKING:
    from tests.mounts import DriveProcess

pytest_plugins = ["tests.mounts"]
pytestmark = pytest.mark.mount

NAMES = ["a", "b", "c", "d/x", "d/y"]

name = st.sampled_from(NAMES)
operation = st.one_of(
    st.tuples(st.just("write"), name, st.integers(0, 300_000), st.integers(1, 70_000), st.binary(min_size=1, max_size=1)),
    st.tuples(st.just("truncate"), name, st.integers(0, 400_000)),
    st.tuples(st.just("rename"), name, name),
    st.tuples(st.just("unlink"), name),
    st.tuples(st.just("read"), name, st.integers(0, 400_000), st.integers(1, 200_000)),
    st.tuples(st.just("unlink_open"), name),
    st.just(("sync", "")),
)  # fmt: skip


def run(root: Path, op: tuple) -> object:
    """Apply one operation under `root`; returns its result or the errno it failed with."""
    kind, path = op[0], root / op[1]
    try:
        if kind == "write":
            _, _, offset, length, byte = op
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                return os.pwrite(fd, byte * length, offset)
            finally:
                os.close(fd)
        if kind == "truncate":
            return os.truncate(path, op[2])
        if kind == "rename":
            return os.rename(path, root / op[2])
        if kind == "unlink":
            return os.unlink(path)
        if kind == "read":
            with open(path, "rb") as f:
                f.seek(op[2])
                return f.read(op[3])
        if kind == "sync":
            return None  # the drive side runs `ferry sync` (see the test); a local dir has nothing to do
        if kind == "unlink_open":
            with open(path, "rb") as f:
                os.unlink(path)
                return f.read()
    except OSError as exc:
        return ("errno", exc.errno)
    raise AssertionError(kind)


def tree(root: Path) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for entry in dirnames:
            out[str((Path(dirpath) / entry).relative_to(root))] = None
        for entry in filenames:
            path = Path(dirpath) / entry
            out[str(path.relative_to(root))] = path.read_bytes()
    return out


def test_random_operations_match_a_local_directory(drive: DriveProcess, tmp_path: Path) -> None:
    counter = itertools.count()
    reference_root = tmp_path / "reference"

    @settings(
        max_examples=30,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(st.lists(operation, min_size=1, max_size=20))
    def check(ops: list[tuple]) -> None:
        case = f"case{next(counter)}"
        mine, ref = drive.mountpoint / case, reference_root / case
        for root in (mine, ref):
            (root / "d").mkdir(parents=True)
        for op in ops:
            if op[0] == "sync":  # upload, so that later edits mix local bytes with server chunks
                drive.sync()
            assert run(mine, op) == run(ref, op), op
        assert tree(mine) == tree(ref)

    check()
    assert next(counter) >= 25, "hypothesis ran fewer examples than asked"
    expected = tree(reference_root)
    drive.unmount()
    drive.start()
    assert tree(drive.mountpoint) == expected
