"""POSIX behaviour of a real mount, through the kernel, with plain `os` calls.

Each test mounts the `docs` library of a real `ferry serve` process with
`ferry mount --foreground` (tests/mounts.py) and checks what applications see.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from vfs.sync.control import file_states

if TYPE_CHECKING:
    from tests.mounts import DriveFactory, DriveProcess

pytest_plugins = ["tests.mounts"]
pytestmark = pytest.mark.mount


def test_create_write_read_append_and_stat(drive: DriveProcess) -> None:
    path = drive.mountpoint / "notes.txt"
    path.write_bytes(b"hello")
    with open(path, "ab") as f:
        f.write(b" world")
    assert path.read_bytes() == b"hello world"
    st = path.stat()
    assert stat.S_ISREG(st.st_mode)
    assert st.st_size == 11
    assert st.st_nlink == 1
    assert st.st_blocks == 1
    assert path.name in os.listdir(drive.mountpoint)
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"HELLO", 0)
        assert os.pread(fd, 100, 0) == b"HELLO world"
    finally:
        os.close(fd)


def test_o_excl_o_trunc_and_truncate(drive: DriveProcess) -> None:
    path = drive.mountpoint / "f"
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    os.write(fd, b"0123456789")
    os.close(fd)
    with pytest.raises(FileExistsError):
        os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    assert os.fstat(fd).st_size == 0
    os.write(fd, b"abc")
    os.ftruncate(fd, 6)
    os.close(fd)
    assert path.read_bytes() == b"abc\0\0\0"
    os.truncate(path, 2)
    assert path.read_bytes() == b"ab"
    os.truncate(path, 4)
    assert path.read_bytes() == b"ab\0\0", "bytes cut by a truncate must come back as zeros"


def test_sparse_write_past_eof(drive: DriveProcess) -> None:
    path = drive.mountpoint / "sparse"
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    os.pwrite(fd, b"end", 5_000_000)
    os.close(fd)
    assert path.stat().st_size == 5_000_003
    with open(path, "rb") as f:
        assert f.read(10) == b"\0" * 10
        f.seek(5_000_000)
        assert f.read() == b"end"


def test_rename_over_file_is_atomic_for_open_readers(drive: DriveProcess) -> None:
    old, new = drive.mountpoint / "doc", drive.mountpoint / "doc.tmp"
    old.write_bytes(b"old" * 1000)
    reader = open(old, "rb")
    try:
        new.write_bytes(b"new" * 2000)
        os.rename(new, old)
        assert reader.read() == b"old" * 1000
        assert old.read_bytes() == b"new" * 2000
        assert not new.exists()
    finally:
        reader.close()
    assert sorted(os.listdir(drive.mountpoint)) == ["doc"]


def test_unlink_while_open_keeps_data_for_the_handle(drive: DriveProcess) -> None:
    path = drive.mountpoint / "victim"
    path.write_bytes(b"still here")
    fd = os.open(path, os.O_RDWR)
    try:
        path.unlink()
        assert not path.exists()
        assert os.pread(fd, 100, 0) == b"still here"
        os.pwrite(fd, b"STILL", 0)
        assert os.pread(fd, 100, 0) == b"STILL here"
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)
    assert os.listdir(drive.mountpoint) == []


def test_directories_mkdir_rmdir_and_rename_over_empty_dir(drive: DriveProcess) -> None:
    root = drive.mountpoint
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f").write_text("x")
    (root / "empty").mkdir()
    (root / "full").mkdir()
    (root / "full" / "g").write_text("y")
    assert root.joinpath("a").stat().st_nlink == 3
    with pytest.raises(OSError) as info:
        os.rmdir(root / "full")
    assert info.value.errno == errno.ENOTEMPTY
    with pytest.raises(OSError) as info:
        os.rename(root / "a", root / "full")
    assert info.value.errno == errno.ENOTEMPTY
    with pytest.raises(OSError) as info:
        os.rename(root / "a", root / "a" / "b" / "inside")
    assert info.value.errno == errno.EINVAL
    os.rename(root / "a", root / "empty")
    assert (root / "empty" / "b" / "f").read_text() == "x"
    assert not (root / "a").exists()
    os.unlink(root / "full" / "g")
    os.rmdir(root / "full")
    assert sorted(os.listdir(root)) == ["empty"]


def test_symlink_chmod_utimens(drive: DriveProcess) -> None:
    root = drive.mountpoint
    (root / "target").write_text("pointed at")
    os.symlink("target", root / "link")
    assert os.readlink(root / "link") == "target"
    assert (root / "link").read_text() == "pointed at"
    assert stat.S_ISLNK(os.lstat(root / "link").st_mode)
    os.chmod(root / "target", 0o640)
    assert stat.S_IMODE((root / "target").stat().st_mode) == 0o640
    far_future = (2**33) * 1_000_000_000 + 123_456_789  # year 2242: past 32-bit seconds
    os.utime(root / "target", ns=(far_future, far_future))
    assert (root / "target").stat().st_mtime_ns == far_future
    with pytest.raises(OSError) as info:  # past 2262 does not fit 64-bit nanoseconds
        os.utime(root / "target", ns=(0, 2**40 * 1_000_000_000))
    assert info.value.errno == errno.EINVAL
    before_epoch = -86_400 * 1_000_000_000 + 5
    os.utime(root / "target", ns=(before_epoch, before_epoch))
    assert (root / "target").stat().st_mtime_ns == before_epoch


def test_unsupported_operations_say_so(drive: DriveProcess) -> None:
    root = drive.mountpoint
    (root / "f").write_text("x")
    with pytest.raises(OSError) as info:
        os.link(root / "f", root / "hard")
    assert info.value.errno == errno.EPERM
    with pytest.raises(OSError) as info:
        os.mkfifo(root / "fifo")
    assert info.value.errno == errno.EPERM
    with pytest.raises(OSError) as info:
        os.chown(root / "f", 12345, -1)
    assert info.value.errno == errno.EPERM
    with pytest.raises(OSError) as info:
        os.setxattr(root / "f", "user.x", b"1")
    assert info.value.errno == errno.EOPNOTSUPP
    fd = os.open(root / "f", os.O_RDWR)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fallocate = libc.fallocate
        fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
        assert fallocate(fd, 0, 0, 4096) == -1
        assert ctypes.get_errno() == errno.EOPNOTSUPP
    finally:
        os.close(fd)


def test_name_too_long(drive: DriveProcess) -> None:
    with pytest.raises(OSError) as info:
        (drive.mountpoint / ("x" * 256)).write_text("x")
    assert info.value.errno == errno.ENAMETOOLONG
    (drive.mountpoint / ("y" * 255)).write_text("fits")
    assert (drive.mountpoint / ("y" * 255)).read_text() == "fits"


def test_mmap_read_and_write(drive: DriveProcess) -> None:
    path = drive.mountpoint / "mapped"
    path.write_bytes(b"a" * 8192)
    with open(path, "r+b") as f:
        with mmap.mmap(f.fileno(), 0) as m:
            assert m[:4] == b"aaaa"
            m[4096:4100] = b"ZZZZ"
            m.flush()
    assert path.read_bytes()[4090:4102] == b"aaaaaaZZZZaa"


def test_xattr_calls_are_unsupported_and_the_control_link_finds_the_daemon(
    drive: DriveProcess,
) -> None:
    """By default every xattr call is ENOSYS (the kernel then answers EOPNOTSUPP itself and
    stops asking: `ls -l` makes no upcall per file); `.ferry/control` leads to the daemon."""
    root = drive.mountpoint
    assert os.readlink(root / ".ferry" / "control") == str(drive.cache_dir / "control.sock")
    assert sorted(os.listdir(root / ".ferry")) == ["control", "versions"]
    assert ".ferry" not in os.listdir(root)
    (root / "f").write_text("x")
    for call in (
        lambda: os.getxattr(root / "f", "user.ferry.state"),
        lambda: os.getxattr(root / "f", "security.selinux"),
        lambda: os.listxattr(root / "f"),
        lambda: os.setxattr(root / "f", "user.tag", b"v"),
        lambda: os.removexattr(root / "f", "user.tag"),
    ):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EOPNOTSUPP
    assert file_states([root / "f", root / "missing"]) == [("pending-upload", 0), None]
    with pytest.raises(OSError):
        open(root / ".ferry" / "control", "rb")  # a socket: nothing to read


def test_state_xattrs_when_asked_for(drive_factory: DriveFactory) -> None:
    """`--xattrs`: user.ferry.state/.revision by name; a miss on another name (ENODATA)
    does not switch them off, and they are not listed (so `cp -a` does not copy them)."""
    drive = drive_factory("x", extra_args=("--writeback-delay", "0.2", "--xattrs"))
    root = drive.mountpoint
    (root / "f").write_text("x")
    assert os.getxattr(root / "f", "user.ferry.state") == b"pending-upload"
    with pytest.raises(OSError) as info:
        os.getxattr(root / "f", "user.other")
    assert info.value.errno == errno.ENODATA
    assert os.listxattr(root / "f") == []
    drive.sync()
    assert os.getxattr(root / "f", "user.ferry.state") == b"cached"
    assert int(os.getxattr(root / "f", "user.ferry.revision")) > 0
    with pytest.raises(OSError) as info:
        os.setxattr(root / "f", "user.tag", b"v")
    assert info.value.errno == errno.EOPNOTSUPP


def test_statfs_and_fsync(drive: DriveProcess) -> None:
    root = drive.mountpoint
    (root / "f").write_text("x")
    vfs = os.statvfs(root)
    assert vfs.f_namemax == 255 and vfs.f_bavail > 0
    fd = os.open(root / "f", os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"y")
    os.fsync(fd)
    os.close(fd)
    assert (root / "f").read_text() == "xy"


def test_changes_survive_unmount_and_sigkill(drive: DriveProcess) -> None:
    root = drive.mountpoint
    (root / "d").mkdir()
    (root / "d" / "kept").write_bytes(b"1" * 100_000)
    (root / "gone").write_text("bye")
    (root / "gone").unlink()
    drive.unmount()
    drive.start()
    assert (root / "d" / "kept").read_bytes() == b"1" * 100_000
    assert os.listdir(root) == ["d"]
    with open(root / "d" / "kept", "r+b") as f:
        f.seek(50_000)
        f.write(b"2" * 10)
    drive.kill()
    drive.start()
    data = (root / "d" / "kept").read_bytes()
    assert data[49_999:50_011] == b"1" + b"2" * 10 + b"1"
    assert len(data) == 100_000


def test_mount_refuses_bad_mountpoints(drive: DriveProcess, tmp_path: Path) -> None:
    from tests.support import ferry

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    token = drive.token_file
    args = ("mount", drive.url, "--token-file", str(token), "--cache-dir", str(tmp_path / "c2"))
    out = ferry(args[0], args[1], str(busy), *args[2:], check=False)
    assert out.returncode != 0 and "not empty" in out.stderr
    out = ferry(args[0], args[1], str(drive.mountpoint), *args[2:], check=False)
    assert out.returncode != 0 and "already mounted" in out.stderr
    drive.proc.kill()  # type: ignore[union-attr]
    drive.proc.wait()  # type: ignore[union-attr]
    out = ferry(args[0], args[1], str(drive.mountpoint), *args[2:], check=False)
    assert out.returncode != 0 and "fusermount3 -u -z" in out.stderr
    drive.kill()


def test_creating_in_a_deleted_directory_fails(drive: DriveProcess) -> None:
    (drive.mountpoint / "d").mkdir()
    fd = os.open(drive.mountpoint / "d", os.O_RDONLY)
    try:
        os.rmdir(drive.mountpoint / "d")
        with pytest.raises(FileNotFoundError):
            os.open("f", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd)
        assert os.listdir(fd) == []
    finally:
        os.close(fd)


ERROR_CASES = [
    (lambda r: os.mkdir(r / "dir"), errno.EEXIST),
    (lambda r: os.rmdir(r / "file"), errno.ENOTDIR),
    (lambda r: os.unlink(r / "dir"), errno.EISDIR),
    (lambda r: os.rename(r / "file", r / "dir"), errno.EISDIR),
    (lambda r: os.rename(r / "dir", r / "file"), errno.ENOTDIR),
    (lambda r: os.rename(r / "missing", r / "x"), errno.ENOENT),
    (lambda r: os.open(r / "dir", os.O_WRONLY), errno.EISDIR),
    (lambda r: os.open(r / "file" / "x", os.O_RDONLY), errno.ENOTDIR),
    (lambda r: os.symlink("x", r / "file"), errno.EEXIST),
    (lambda r: os.readlink(r / "file"), errno.EINVAL),
    (lambda r: os.truncate(r / "dir", 0), errno.EISDIR),
]


def test_errors_match_posix(drive: DriveProcess) -> None:
    root = drive.mountpoint
    (root / "dir").mkdir()
    (root / "file").write_text("x")
    for index, (action, expected) in enumerate(ERROR_CASES):
        with pytest.raises(OSError) as info:
            action(root)
        assert info.value.errno == expected, f"case {index}: {info.value}"
    assert sorted(os.listdir(root)) == ["dir", "file"]


def test_modes_are_enforced_for_other_users(drive_factory: DriveFactory) -> None:
    # other users get into a drive only with --allow-other; then file modes decide
    drive = drive_factory("a", extra_args=("--writeback-delay", "0.2", "--allow-other"))
    root = drive.mountpoint
    (root / "private").write_text("secret")
    os.chmod(root / "private", 0o600)
    (root / "public").write_text("hello")
    os.chmod(root / "public", 0o644)
    probe = (
        "import os, sys\n"
        "top = os.open(sys.argv[1], os.O_RDONLY)  # before dropping privileges: pytest's\n"
        "os.setgid(65534); os.setuid(65534)     # tmp dirs are not searchable by others\n"
        "for name in sys.argv[2:]:\n"
        "    try:\n"
        "        print(os.read(os.open(name, os.O_RDONLY, dir_fd=top), 100).decode())\n"
        "    except OSError as exc:\n"
        "        print('errno', exc.errno)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, str(root), "public", "private"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    assert out[:2] == ["hello", f"errno {errno.EACCES}"]
