"""The server app in-process: random bodies never cause a 500, trash retention and purge.

Runs `FerryApp` through `httpx.ASGITransport` on a fresh store per test; the
wire-level behaviour is covered by t4_server_protocol. The hypothesis tests
are plain functions that run each example with `trio.run`, sharing one store.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from remote.protocol import ROOT_ID, op_create, op_delete
from remote.server import admin
from remote.server.app import FerryApp, ServerConfig
from remote.server.chunk_dir import DirectoryChunkStore
from remote.server.sqlite_store import SqliteMetadataStore

SHARED = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@dataclass
class InProcess:
    app: FerryApp
    token: str

    def http(self) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=self.app)
        headers = {"Authorization": f"Bearer {self.token}"}
        return httpx.AsyncClient(transport=transport, base_url="http://t", headers=headers)


async def snapshot(http: httpx.AsyncClient) -> tuple[int, list]:
    info = (await http.get("/v1/libraries/docs")).json()
    feed = (await http.get("/v1/libraries/docs/changes", params={"cursor": 0})).json()
    return info["revision"], feed["entries"]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[InProcess]:
    data = tmp_path / "data"
    token = admin.add_user(data, "alice")
    admin.add_library(data, "docs", "alice")
    meta = SqliteMetadataStore(data / "meta.sqlite")
    app = FerryApp(meta, DirectoryChunkStore(data / "chunks"), ServerConfig(trash_retention=0.3))
    yield InProcess(app, token)
    meta.close()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
op_like = st.fixed_dictionaries(
    {"op": st.sampled_from(["create", "update", "rename", "setattr", "delete", "x"])},
    optional={
        "id": st.sampled_from([ROOT_ID, uuid.uuid4().hex, "zz"]) | json_values,
        "parent": st.sampled_from([ROOT_ID, uuid.uuid4().hex]) | json_values,
        "name": st.text(max_size=300) | json_values,
        "kind": st.sampled_from(["file", "dir", "symlink"]) | json_values,
        "mode": st.integers(-5, 0o10000) | json_values,
        "mtime_ns": st.integers(-(2**70), 2**70) | json_values,
        "base": st.integers(-1, 2**70) | json_values,
        "chunks": st.just([]) | json_values,
        "target": st.text(max_size=20) | json_values,
        "replace": st.sampled_from([ROOT_ID, uuid.uuid4().hex]) | json_values,
        "replace_base": st.integers(0, 5) | json_values,
    },
)
bodies = st.fixed_dictionaries(
    {"key": st.text(min_size=1, max_size=5) | json_values, "device": st.just("d") | json_values},
    optional={"ops": st.lists(op_like, max_size=3) | json_values},
)


@settings(SHARED, max_examples=150)
@given(body=bodies)
def test_random_commits_never_500_and_refusals_change_nothing(
    server: InProcess, body: dict
) -> None:
    async def check() -> None:
        async with server.http() as http:
            before = await snapshot(http)
            r = await http.post("/v1/libraries/docs/commit", content=json.dumps(body))
            assert r.status_code < 500, r.text
            data = r.json()
            if r.status_code == 200:
                assert data["revision"] > before[0]
            else:
                assert isinstance(data["error"], str) and data["message"]
                assert await snapshot(http) == before

    trio.run(check)


@settings(SHARED, max_examples=60)
@given(
    path=st.sampled_from(
        [
            "changes",
            "chunks/missing",
            "chunks/batch",
            "trash/x/restore",
            f"entries/{ROOT_ID}/restore",
        ]
    ),
    query=st.text(max_size=20),
    raw=st.binary(max_size=40),
)
def test_random_requests_never_500(server: InProcess, path: str, query: str, raw: bytes) -> None:
    async def check() -> None:
        async with server.http() as http:
            url = f"/v1/libraries/docs/{path}"
            r = await http.post(url, content=raw)
            assert r.status_code < 500, r.text
            r = await http.get(url, params={"cursor": query, "wait": query, "limit": query})
            assert r.status_code < 500, r.text

    trio.run(check)


async def test_undecodable_query_and_oversized_integers(server: InProcess) -> None:
    async with server.http() as http:
        r = await http.get("/v1/libraries/docs/changes?cursor=%ff%fe")
        assert r.status_code == 400
        body = {"revision": 2**70, "base": 1, "key": "k", "device": "d"}
        r = await http.post(f"/v1/libraries/docs/entries/{ROOT_ID}/restore", json=body)
        assert r.status_code == 400
        raw = '{"key": "\\ud800", "device": "d", "ops": []}'
        r = await http.post("/v1/libraries/docs/commit", content=raw)
        assert r.status_code == 400 and "UTF-8" in r.json()["message"]
        op = json.dumps(op_create(uuid.uuid4().hex, ROOT_ID, "NAME", "dir", 0o755, 1))
        raw = '{"key": "k", "device": "d", "ops": [' + op.replace('"NAME"', '"\\udc80"') + "]}"
        r = await http.post("/v1/libraries/docs/commit", content=raw)
        assert r.status_code == 400 and r.json()["error"] == "invalid_name"


async def test_trash_purge_after_retention(server: InProcess) -> None:
    entry_id = uuid.uuid4().hex
    lib = "/v1/libraries/docs"
    async with server.http() as http:
        ops = [op_create(entry_id, ROOT_ID, "x", "dir", 0o755, 1)]
        r = await http.post(f"{lib}/commit", json={"key": "a", "device": "d", "ops": ops})
        created = r.json()["entries"][0]
        ops = [op_delete(entry_id, created["revision"])]
        r = await http.post(f"{lib}/commit", json={"key": "b", "device": "d", "ops": ops})
        assert r.status_code == 200
        trash = (await http.get(f"{lib}/trash")).json()["entries"]
        assert [t["id"] for t in trash] == [entry_id]
        assert trash[0]["deleted_by"] == "alice" and trash[0]["deleted_at"] <= time.time()
        await trio.sleep(0.4)
        assert await server.app.purge_trash() == 1
        assert (await http.get(f"{lib}/trash")).json()["entries"] == []
        feed = (await http.get(f"{lib}/changes", params={"cursor": 0})).json()
        assert any(e["id"] == entry_id and e["deleted"] for e in feed["entries"])
        r = await http.post(f"{lib}/trash/{entry_id}/restore", json={"key": "c", "device": "d"})
        assert r.status_code == 404 and r.json()["error"] == "not_in_trash"
