"""Content and access that come from the server: lazy chunk reads, read-only libraries, tools.

The server is seeded through `RemoteClient` (as another device would), then
the drive is mounted and read through the kernel.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

from cache.chunking import Chunker, to_refs
from remote import protocol
from remote.client import RemoteClient
from tests.conftest import Library
from tests.support import ferry

if TYPE_CHECKING:
    from tests.mounts import DriveFactory

pytest_plugins = ["tests.mounts"]
pytestmark = pytest.mark.mount


def seed_file(
    library: Library, name: str, data: bytes, parent: str = protocol.ROOT_ID
) -> list[protocol.ChunkRef]:
    """Upload `data` as a new file `name` through the client API; returns its chunks."""

    async def upload() -> list[protocol.ChunkRef]:
        chunks = Chunker().cut(data)
        async with RemoteClient(library.server.url, library.name, library.token) as client:
            for chunk in chunks:
                await client.put_chunk(chunk.hash, data[chunk.offset : chunk.offset + chunk.length])
            refs = to_refs(chunks)
            op = protocol.op_create(
                uuid.uuid4().hex, parent, name, "file", 0o644, 10**18, chunks=refs
            )
            await client.commit(uuid.uuid4().hex, [op], device="seeder")
        return refs

    return trio.run(upload)


def cached_chunks(cache_dir: Path) -> int:
    return sum(1 for p in (cache_dir / "chunks").rglob("*") if p.is_file() and len(p.name) == 64)


def test_reads_are_lazy_chunk_by_chunk(library: Library, drive_factory: DriveFactory) -> None:
    data = os.urandom(12 * 1024 * 1024)
    refs = seed_file(library, "big.bin", data)
    assert len(refs) >= 4
    drive = drive_factory("a")
    path = drive.mountpoint / "big.bin"
    st = path.stat()
    assert st.st_size == len(data) and st.st_mtime_ns == 10**18
    assert cached_chunks(drive.cache_dir) == 0, "listing and stat must not fetch content"
    starts = [sum(r.length for r in refs[:i]) for i in range(len(refs))]
    pick = max(range(1, len(refs)), key=lambda i: refs[i].length)  # a big chunk, not the first
    inside = starts[pick] + 8192  # clear of the page the kernel rounds the read down to
    with open(path, "rb") as f:
        f.seek(inside)
        assert f.read(100) == data[inside : inside + 100]
    assert cached_chunks(drive.cache_dir) == 1, "one read fetches the one chunk it needs"
    assert path.read_bytes() == data
    assert cached_chunks(drive.cache_dir) == len(refs)


def test_read_only_library_refuses_writes(library: Library, drive_factory: DriveFactory) -> None:
    seed_file(library, "shared.txt", b"read me")
    bob = library.server.add_user("bob")
    library.server.admin("share", library.name, "bob", "--role", "read")
    drive = drive_factory("bob", token=bob)
    root = drive.mountpoint
    assert (root / "shared.txt").read_bytes() == b"read me"
    for attempt in (
        lambda: (root / "new").write_text("x"),
        lambda: open(root / "shared.txt", "w"),
        lambda: os.mkdir(root / "d"),
        lambda: os.unlink(root / "shared.txt"),
        lambda: os.chmod(root / "shared.txt", 0o600),
    ):
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno in (errno.EROFS, errno.EACCES)
    assert (root / "shared.txt").read_bytes() == b"read me"


def test_tools_cp_tar_git_sqlite(drive_factory: DriveFactory, tmp_path: Path) -> None:
    drive = drive_factory("a")
    root = drive.mountpoint
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "sub" / "data.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (source / "text.txt").write_text("hello\n" * 1000)
    os.symlink("text.txt", source / "link")

    def run(*cmd: str, cwd: Path = root) -> str:
        return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout

    try:  # cp -a carries xattrs where it can; the drive answers EOPNOTSUPP and cp goes on
        os.setxattr(source / "text.txt", "user.origin", b"here")
    except OSError:
        pass  # the temp dir's filesystem has no user xattrs: the copy is tested without
    run("cp", "-a", str(source), str(root / "copy"))
    run("diff", "-r", "--no-dereference", str(source), str(root / "copy"))
    run("cp", "-a", str(root / "copy"), str(tmp_path / "back"))
    run("diff", "-r", "--no-dereference", str(source), str(tmp_path / "back"))
    run("tar", "cf", str(root / "src.tar"), "-C", str(tmp_path), "src")
    (root / "untar").mkdir()
    run("tar", "xf", str(root / "src.tar"), "-C", str(root / "untar"))
    run("diff", "-r", "--no-dereference", str(source), str(root / "untar" / "src"))
    repo = root / "repo"
    repo.mkdir()
    git = ("git", "-c", "user.email=t@example.org", "-c", "user.name=t")
    run("git", "init", "-q", cwd=repo)
    (repo / "README").write_text("ferry\n")
    run(*git, "add", "README", cwd=repo)
    run(*git, "commit", "-qm", "first", cwd=repo)
    (repo / "README").write_text("ferry 2\n")
    run(*git, "commit", "-qam", "second", cwd=repo)
    assert run("git", "log", "--format=%s", cwd=repo).split() == ["second", "first"]
    run("git", "fsck", "--no-progress", cwd=repo)
    db = root / "app.sqlite"
    run(
        "sqlite3",
        str(db),
        "CREATE TABLE t(x); INSERT INTO t SELECT value FROM generate_series(1, 5000);",
    )
    run("sqlite3", str(db), "UPDATE t SET x = x * 2 WHERE x % 3 = 0; VACUUM;")
    assert run(
        "sqlite3", str(db), "PRAGMA integrity_check; SELECT count(*), sum(x) FROM t;"
    ).split() == [
        "ok",
        "5000|16668333",
    ]
    drive.unmount()
    drive.start()
    run("diff", "-r", "--no-dereference", str(source), str(root / "copy"))
    run("git", "fsck", "--no-progress", cwd=repo)
    assert run("sqlite3", str(db), "SELECT count(*) FROM t;").strip() == "5000"


def test_offline_reads_cached_content_and_fails_fast_on_the_rest(
    library: Library, drive_factory: DriveFactory
) -> None:
    cached, uncached = os.urandom(2_000_000), os.urandom(2_000_000)
    seed_file(library, "cached.bin", cached)
    seed_file(library, "uncached.bin", uncached)
    drive = drive_factory("a")
    root = drive.mountpoint
    assert (root / "cached.bin").read_bytes() == cached
    library.server.kill()
    deadline = time.monotonic() + 60
    while json.loads(ferry("status", str(root), "--json").stdout)["online"]:
        assert time.monotonic() < deadline, "the drive never noticed the server is gone"
        time.sleep(0.2)
    subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=True)
    assert (root / "cached.bin").read_bytes() == cached, "cached content stays readable offline"
    started = time.monotonic()
    with pytest.raises(OSError) as info:
        (root / "uncached.bin").read_bytes()
    assert info.value.errno == errno.EIO
    assert time.monotonic() - started < 1.0, "an uncached read offline fails fast"
    assert sorted(os.listdir(root)) == ["cached.bin", "uncached.bin"]
    (root / "offline.txt").write_text("written offline")
    os.rename(root / "offline.txt", root / "renamed.txt")
    assert (root / "renamed.txt").read_text() == "written offline"
