"""Helpers for the server tests: one real `ferry serve` per module, a library per test.

`Api` is a thin synchronous HTTP wrapper that speaks the protocol by hand
(not through `RemoteClient`), so the tests pin down the wire format itself.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from remote import protocol
from remote.protocol import ChunkRef
from remote.server import admin
from tests.support import ServerProcess


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Api:
    server: ServerProcess
    library: str
    token: str

    def __post_init__(self) -> None:
        self.http = httpx.Client(
            base_url=self.server.url,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=30,
        )

    @property
    def lib(self) -> str:
        return f"/v1/libraries/{self.library}"

    def close(self) -> None:
        self.http.close()

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.http.get(self.lib + path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> httpx.Response:
        if body is not None:
            kw["json"] = body
        return self.http.post(self.lib + path, **kw)

    def put_chunk(self, data: bytes) -> ChunkRef:
        h = protocol.hash_bytes(data)
        r = self.http.put(f"{self.lib}/chunks/{h}", content=data)
        assert r.status_code == 200, r.text
        return ChunkRef(h, len(data))

    def commit(self, *ops: dict[str, Any], key: str | None = None) -> httpx.Response:
        body = {"key": key or new_id(), "device": "test-device", "ops": list(ops)}
        return self.post("/commit", body)

    def ok(self, *ops: dict[str, Any]) -> list[dict[str, Any]]:
        r = self.commit(*ops)
        assert r.status_code == 200, r.text
        return r.json()["entries"]

    def mkdir(self, name: str, parent: str = protocol.ROOT_ID) -> dict[str, Any]:
        return self.ok(protocol.op_create(new_id(), parent, name, "dir", 0o755, 1))[0]

    def mkfile(
        self, name: str, data: bytes = b"hello", parent: str = protocol.ROOT_ID
    ) -> dict[str, Any]:
        chunks = [self.put_chunk(data)] if data else []
        return self.ok(protocol.op_create(new_id(), parent, name, "file", 0o644, 1, chunks=chunks))[
            0
        ]

    def feed(self, cursor: int = 0) -> dict[str, Any]:
        r = self.get("/changes", params={"cursor": cursor, "limit": protocol.MAX_FEED_PAGE})
        assert r.status_code == 200, r.text
        return r.json()

    def snapshot(self) -> tuple[int, list[dict[str, Any]]]:
        """The library revision and whole feed: compare before/after to prove nothing changed."""
        info = self.http.get(self.lib).json()
        return info["revision"], self.feed(0)["entries"]

    def entry(self, entry_id: str) -> dict[str, Any]:
        return self.get(f"/entries/{entry_id}").json()


def make_library(server: ServerProcess, owner: str | None = None) -> Api:
    """A fresh user and library on the running server (created through the admin API)."""
    user = owner or f"u{os.urandom(4).hex()}"
    token = admin.add_user(server.data_dir, user)
    name = f"lib{os.urandom(4).hex()}"
    admin.add_library(server.data_dir, name, user)
    return Api(server, name, token)


def start_server(base: Path, *args: str) -> ServerProcess:
    """A `ferry serve` on a fresh data dir under `base`; `args` are more serve options."""
    server = ServerProcess(base / "server-data", args=args)
    server.start()
    return server
