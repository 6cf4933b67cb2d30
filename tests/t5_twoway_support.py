"""Helpers for the two-way sync scenarios: the server's view of a library, read directly.

The drive tests compare mounts with each other (`tests.t5_sync.tree`); these
helpers ask the server itself which entries and versions it holds, so a test
can tell "one entry with a longer history" from "a new entry with the same name".
"""

from __future__ import annotations

import trio

from remote.client import RemoteClient
from remote.protocol import Entry, Version
from tests.conftest import Library


async def _live_paths(library: Library) -> dict[str, Entry]:
    async with RemoteClient(library.server.url, library.name, library.token) as client:
        latest: dict[str, Entry] = {}
        cursor = 0
        while True:
            page = await client.changes(cursor)
            for entry in page.entries:
                latest[entry.id] = entry
            cursor = page.cursor
            if not page.more:
                break
    live = {i: e for i, e in latest.items() if not e.deleted}
    out: dict[str, Entry] = {}
    for entry in live.values():
        parts, node = [], entry
        while node.parent is not None and node.parent in live:
            parts.append(node.name)
            node = live[node.parent]
        if node.parent is None:  # reached the root: a live path
            out["/".join(reversed(parts))] = entry
    return out


def server_tree(library: Library) -> dict[str, Entry]:
    """Every live entry on the server by path relative to the library root ('' is the root)."""
    return trio.run(_live_paths, library)


async def _versions(library: Library, entry_id: str) -> list[Version]:
    async with RemoteClient(library.server.url, library.name, library.token) as client:
        return await client.versions(entry_id)


def versions(library: Library, entry_id: str) -> list[Version]:
    """The server's versions of one file, newest first."""
    return trio.run(_versions, library, entry_id)
