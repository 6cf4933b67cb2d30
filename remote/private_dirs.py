"""Directories only their owner may enter: drive state, chunk caches, server data.

A drive's cache directory holds the file contents it downloaded, its journal
and working copies; the server's data directory holds every library and the
token hashes. Either, readable by other local users, leaks the library. So
they are created 0700 (the XDG base-directory rule for user data), every
missing parent too; and one that already exists with group or world access is
tightened to 0700 with a warning, because a looser mode left by an older
version or a careless `mkdir` would otherwise silently stay. A directory owned
by someone else is left alone (only a warning): changing another user's
directory is not ours to do.

Used by both sides (the drive in `vfs/`, the server in `remote/server/`),
which is why it lives in `remote/`, the package both may import.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

PRIVATE_MODE = 0o700


def make_private_dir(path: Path) -> Path:
    """Create `path` (and missing parents) mode 0700, or tighten an existing one; return it."""
    missing: list[Path] = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, PRIVATE_MODE)
        except FileExistsError:
            pass  # another process made it between our check and now
    tighten(path)
    return path


def tighten(path: Path) -> None:
    """Remove group and world access from the directory `path` if we own it; warn otherwise."""
    info = path.stat()
    if not stat.S_ISDIR(info.st_mode):
        raise NotADirectoryError(f"{path} is not a directory")
    loose = stat.S_IMODE(info.st_mode) & 0o077
    if not loose:
        return
    if info.st_uid != os.geteuid():
        log.warning(
            "%s is readable by other users (mode %o) and owned by uid %d, not us; "
            "ask its owner to `chmod 700 %s`",
            path,
            stat.S_IMODE(info.st_mode),
            info.st_uid,
            path,
        )
        return
    os.chmod(path, stat.S_IMODE(info.st_mode) & ~0o077)
    log.warning(
        "%s was accessible to other users (mode %o); made it private (mode %o)",
        path,
        stat.S_IMODE(info.st_mode),
        stat.S_IMODE(info.st_mode) & ~0o077,
    )
