"""The read-only `.ferry/versions/` tree inside the mount: every file's old versions, browsable.

`<mount>/.ferry/versions/` mirrors the library's folders; each file appears
there as a folder of its versions, one read-only file per revision named
`<stem>.r<revision><ext>` (so `notes.txt` -> `notes.r7.txt`: applications still
recognise the type). Opening one reads that version's manifest through the
reader and the chunk cache, exactly like a current file.

`.ferry` is hidden: the root's listing does not show it, but looking it up
works (as with NetApp's `.snapshot`). It shadows a library entry of that name
at the root.

`.ferry/control` is a symlink to the drive's control socket: how `ferry
status`, `ferry sync`, `ferry ls` and the other commands find the daemon
behind a mountpoint (vfs/sync/control.py) without an extended attribute, so
that the drive can answer every getxattr with ENOSYS and `ls -l` stops asking.

The nodes here are not in the mirror: they get inode numbers from
`VIRTUAL_BASE` up, far above any mirror inode, and live in memory for the
mount's life. Version lists come from the server (`client.versions`) and are
kept for `VERSIONS_TTL` seconds; offline, a file's version folder answers EIO
unless its list was fetched recently.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from dataclasses import dataclass, field

import pyfuse3

from remote.client import RemoteClient
from remote.protocol import Version
from vfs.errors import ContentUnavailable, DriveError
from vfs.mirror import ROOT_INODE, Mirror, MirrorRow
from vfs.reader import Reader
from vfs.sync.conflicts import split_extension
from vfs.sync.online import Connectivity

#: First inode number of the virtual nodes (mirror inodes are SQLite rowids, far below).
VIRTUAL_BASE = 1 << 60
FERRY_DIR = ".ferry"
VERSIONS_DIR = "versions"
CONTROL_LINK = "control"
#: Seconds a file's version list is reused before asking the server again.
VERSIONS_TTL = 5.0
#: The kernel may cache these nodes' entries and attributes this long.
VIRTUAL_TIMEOUT = 1.0
#: Open flags that would change a file: refused on versions.
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND


class ReadOnlyTree(DriveError):
    errno = errno.EROFS


@dataclass
class Node:
    """One virtual entry. `mirror_inode`: the library folder/file it shows (None for the top
    ones); `target`: set for the one symlink, `.ferry/control`."""

    inode: int
    name: str
    is_dir: bool
    mirror_inode: int | None = None
    version: Version | None = None
    target: str | None = None
    #: name -> inode of children already handed to the kernel.
    children: dict[str, int] = field(default_factory=dict)


def version_name(name: str, revision: int) -> str:
    """`notes.txt` -> `notes.r7.txt`; `.bashrc` -> `.bashrc.r7`."""
    stem, ext = split_extension(name)
    return f"{stem}.r{revision}{ext}"


class VersionsTree:
    """Answers FUSE requests for inodes at or under `<mount>/.ferry`."""

    def __init__(
        self,
        mirror: Mirror,
        reader: Reader,
        client: RemoteClient,
        connectivity: Connectivity,
        control_socket: str,
    ) -> None:
        self.mirror = mirror
        self.reader = reader
        self.client = client
        self.connectivity = connectivity
        self._nodes: dict[int, Node] = {}
        self._by_key: dict[tuple[object, ...], int] = {}
        self._versions: dict[str, tuple[float, list[Version]]] = {}
        self.top = self._node(("top",), FERRY_DIR, is_dir=True)
        self.versions_root = self._node(
            ("versions", ROOT_INODE), VERSIONS_DIR, is_dir=True, mirror_inode=ROOT_INODE
        )
        self.top.children[VERSIONS_DIR] = self.versions_root.inode
        self.control = self._node(("control",), CONTROL_LINK, is_dir=False, target=control_socket)
        self.top.children[CONTROL_LINK] = self.control.inode

    @staticmethod
    def owns(inode: int) -> bool:
        return inode >= VIRTUAL_BASE

    def _node(self, key: tuple[object, ...], name: str, **kwargs: object) -> Node:
        inode = self._by_key.get(key)
        if inode is None:
            inode = VIRTUAL_BASE + len(self._nodes)
            self._by_key[key] = inode
            self._nodes[inode] = Node(inode, name, **kwargs)  # type: ignore[arg-type]
        return self._nodes[inode]

    def get(self, inode: int) -> Node:
        node = self._nodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    # --- the tree -------------------------------------------------------------------

    async def lookup(self, parent: int, name: str) -> Node | None:
        """The child `name` of virtual folder `parent`, or None."""
        node = self.get(parent)
        if node.mirror_inode is not None and self.mirror.get(node.mirror_inode).kind == "dir":
            row = self.mirror.lookup(node.mirror_inode, name)  # no listing of big folders
            if row is None or row.kind not in ("file", "dir"):
                return None
            return self._folder_node(row)
        for child in await self.children(node):
            if child.name == name:
                return child
        return None

    async def children(self, node: Node) -> list[Node]:
        if not node.is_dir:
            return []
        if node is self.top:
            return [self.versions_root, self.control]
        assert node.mirror_inode is not None
        row = self.mirror.get(node.mirror_inode)
        if row.kind == "file":
            return [self._version_node(row, v) for v in await self.versions_of(row)]
        result = []
        after = 0
        while rows := self.mirror.children(row.inode, after=after):
            for child in rows:
                after = child.inode
                if child.kind in ("file", "dir"):
                    result.append(self._folder_node(child))
        return result

    def _folder_node(self, row: MirrorRow) -> Node:
        """The virtual folder that shows library folder `row`, or file `row`'s versions."""
        node = self._node(("versions", row.inode), row.name, is_dir=True, mirror_inode=row.inode)
        node.name = row.name  # the library entry may have been renamed since
        return node

    def _version_node(self, row: MirrorRow, version: Version) -> Node:
        name = version_name(row.name, version.revision)
        node = self._node(
            ("version", row.id, version.revision),
            name,
            is_dir=False,
            mirror_inode=row.inode,
            version=version,
        )
        node.name = name  # follows a rename of the file
        return node

    async def versions_of(self, row: MirrorRow) -> list[Version]:
        """A file's versions (newest first), from a short-lived cache or the server."""
        if row.revision == 0:
            return []
        cached = self._versions.get(row.id)
        if cached and time.monotonic() - cached[0] < VERSIONS_TTL:
            return cached[1]
        if not self.connectivity.online:
            if cached:
                return cached[1]
            raise ContentUnavailable(f"versions of {row.name!r} need the server; drive is offline")
        versions = await self.client.versions(row.id)
        self._versions[row.id] = (time.monotonic(), versions)
        return versions

    # --- FUSE answers -----------------------------------------------------------------

    def attrs(self, node: Node, uid: int, gid: int) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = node.inode
        entry.entry_timeout = VIRTUAL_TIMEOUT
        entry.attr_timeout = VIRTUAL_TIMEOUT
        if node.is_dir:
            entry.st_mode = stat.S_IFDIR | 0o555
            entry.st_nlink = 2
            entry.st_size = 4096
            mtime = time.time_ns() if node.mirror_inode is None else self._mtime(node)
        elif node.target is not None:
            entry.st_mode = stat.S_IFLNK | 0o777
            entry.st_nlink = 1
            entry.st_size = len(node.target.encode())
            mtime = time.time_ns()
        else:
            assert node.version is not None
            entry.st_mode = stat.S_IFREG | 0o444
            entry.st_nlink = 1
            entry.st_size = node.version.size
            mtime = node.version.mtime_ns
        entry.st_blocks = (entry.st_size + 511) // 512
        entry.st_blksize = 128 * 1024
        entry.st_uid = uid
        entry.st_gid = gid
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = mtime
        return entry

    def _mtime(self, node: Node) -> int:
        assert node.mirror_inode is not None
        try:
            return self.mirror.get(node.mirror_inode).mtime_ns
        except LookupError:
            return time.time_ns()

    def manifest_for_open(self, inode: int, flags: int) -> str:
        """The manifest an open of a version file reads; refuses writes."""
        node = self.get(inode)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if node.target is not None:
            raise pyfuse3.FUSEError(errno.ELOOP)  # the kernel follows symlinks before open
        if flags & WRITE_FLAGS:
            raise ReadOnlyTree(f"{node.name!r} is an old version and cannot be changed")
        assert node.version is not None
        return node.version.manifest

    def readlink(self, inode: int) -> bytes:
        target = self.get(inode).target
        if target is None:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return target.encode()

    def check_dir(self, inode: int) -> None:
        if not self.get(inode).is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
