"""The drive's shared state, handed from the composition root to every long-running task.

`vfs/mount.py` builds one `DriveContext` per mount; the filesystem
(`Operations`) and the sync engine (push, pull, control socket) read what they
need from it. It owns nothing and does nothing: it only names the parts, so
that a task's signature says "this runs inside a mounted drive".
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cache.store import ChunkCache
    from remote.client import RemoteClient
    from vfs.journal import Journal
    from vfs.mirror import Mirror
    from vfs.operations import Operations
    from vfs.sync.online import Connectivity
    from vfs.workcopy import WorkCopies


@dataclass
class DriveContext:
    """Everything one mounted drive is made of.

    `device` is the name this client commits under (hostname; shown in conflict
    copies). `writeback_delay` is how long (seconds) the uploader waits after the
    last local change before it pushes, so that a burst of writes uploads once.
    `mountpoint` and `read_only` are additions to the original contract
    (`read_only` is True when the user may only read the library).
    """

    cache_dir: Path
    db: sqlite3.Connection
    mirror: Mirror
    journal: Journal
    cache: ChunkCache
    client: RemoteClient
    connectivity: Connectivity
    workcopies: WorkCopies
    device: str
    writeback_delay: float
    operations: Operations
    mountpoint: Path | None = None
    read_only: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def control_socket(self) -> Path:
        """Where `ferry status` / `ferry sync` reach the daemon (answered as user.ferry.control)."""
        return self.cache_dir / "control.sock"
