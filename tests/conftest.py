from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import ServerProcess
from tests.t4_server_helpers import Api, make_library, start_server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A real `ferry serve` process on 127.0.0.1 with an empty data directory."""
    srv = ServerProcess(tmp_path / "server-data")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@dataclass
class Library:
    server: ServerProcess
    name: str
    owner: str
    token: str

    @property
    def url(self) -> str:
        return f"{self.server.url}/{self.name}"


@pytest.fixture
def library(server: ServerProcess) -> Library:
    """A library `docs` owned by user `alice`, on a running server."""
    token = server.add_user("alice")
    server.admin("add-library", "docs", "--owner", "alice")
    return Library(server, "docs", "alice", token)


@pytest.fixture
def crashing(tmp_path: Path) -> Iterator[tuple[ServerProcess, Api]]:
    """A server of its own with one library, for tests that SIGKILL it (killed at the end)."""
    server = start_server(tmp_path)
    api = make_library(server)
    try:
        yield server, api
    finally:
        api.close()
        server.kill()
