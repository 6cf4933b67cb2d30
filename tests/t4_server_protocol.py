"""The wire protocol against a real `ferry serve` process: every endpoint, conflict, bad input.

One server per module (starting one per test would dominate the run time);
every test gets its own user and library. Refusals also assert that the
library revision and the whole change feed are unchanged.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from remote import protocol
from remote.protocol import (
    ROOT_ID,
    ChunkRef,
    op_create,
    op_delete,
    op_rename,
    op_setattr,
    op_update,
)
from remote.server import admin
from tests.support import ServerProcess
from tests.t4_server_helpers import Api, make_library, new_id, start_server


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("protocol"))
    try:
        yield server
    finally:
        server.stop()
        assert "internal_error" not in server.log() and "Traceback" not in server.log(), (
            server.log()
        )


@pytest.fixture
def api(srv: ServerProcess) -> Iterator[Api]:
    a = make_library(srv)
    try:
        yield a
    finally:
        a.close()


def refused(api: Api, response: httpx.Response, status: int, code: str, before: tuple) -> dict:
    """Assert a JSON refusal with `status`/`code` that changed nothing; return its body."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code, body
    assert isinstance(body["message"], str) and body["message"]
    assert api.snapshot() == before
    return body


# --- capabilities, libraries, auth ----------------------------------------------------------


def test_capabilities_need_no_token(srv: ServerProcess) -> None:
    caps = httpx.get(f"{srv.url}/v1/capabilities").json()
    assert caps["protocol"] == protocol.PROTOCOL_VERSION
    assert caps["hash"] == "blake3"
    assert caps["max_chunk_size"] == protocol.MAX_CHUNK_SIZE
    assert caps["max_json_body"] > 0


def test_library_info_and_listing(api: Api) -> None:
    info = api.http.get(api.lib).json()
    assert info == {"name": api.library, "role": "owner", "root": ROOT_ID, "revision": 1}
    listing = api.http.get("/v1/libraries").json()["libraries"]
    assert listing == [{"name": api.library, "role": "owner"}]


def test_missing_or_bad_token_is_401(api: Api) -> None:
    before = api.snapshot()
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"}):
        for method, path in [
            ("GET", api.lib),
            ("GET", "/v1/libraries"),
            ("POST", api.lib + "/commit"),
        ]:
            r = httpx.request(method, api.server.url + path, headers=headers, json={})
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.json()["error"] == "unauthorized"
    assert api.snapshot() == before


def test_foreign_library_is_404_like_a_missing_one(srv: ServerProcess, api: Api) -> None:
    other = make_library(srv)
    before = api.snapshot()
    foreign = other.http.get(api.lib)
    nowhere = other.http.get("/v1/libraries/does-not-exist")
    assert foreign.status_code == nowhere.status_code == 404
    assert foreign.json()["error"] == nowhere.json()["error"] == "no_such_library"
    chunk = api.put_chunk(b"secret bytes")
    # The other user cannot learn the chunk exists, write to it, or read it.
    r = other.http.post(api.lib + "/chunks/missing", json={"hashes": [chunk.hash]})
    assert r.status_code == 404
    r = other.http.put(f"{api.lib}/chunks/{chunk.hash}", content=b"secret bytes")
    assert r.status_code == 404
    r = other.http.post(api.lib + "/commit", json={"key": "k", "device": "d", "ops": []})
    assert r.status_code == 404
    assert api.snapshot()[0] == before[0]
    other.close()


def test_chunk_existence_is_per_library(srv: ServerProcess, api: Api) -> None:
    other = make_library(srv)
    chunk = api.put_chunk(b"shared content")
    assert other.post("/chunks/missing", {"hashes": [chunk.hash]}).json() == {
        "missing": [chunk.hash]
    }
    assert other.get(f"/chunks/{chunk.hash}").status_code == 404
    op = op_create(new_id(), ROOT_ID, "f", "file", 0o644, 1, chunks=[chunk])
    assert other.commit(op).json()["error"] == "missing_chunks"
    other.close()


def test_read_only_user_gets_403_on_writes(srv: ServerProcess, api: Api) -> None:
    name = "reader" + new_id()[:6]
    token = admin.add_user(srv.data_dir, name)
    admin.share(srv.data_dir, api.library, name, "read")
    reader = Api(srv, api.library, token)
    f = api.mkfile("a.txt")
    before = api.snapshot()
    assert reader.http.get(api.lib).json()["role"] == "read"
    assert reader.feed()["entries"]
    assert reader.get(f"/chunks/{protocol.hash_bytes(b'hello')}").content == b"hello"
    data = b"reader bytes"
    r = reader.http.put(f"{api.lib}/chunks/{protocol.hash_bytes(data)}", content=data)
    refused(api, r, 403, "read_only", before)
    r = reader.commit(op_delete(f["id"], f["revision"]))
    refused(api, r, 403, "read_only", before)
    r = reader.post(f"/trash/{f['id']}/restore", {"key": "k", "device": "d"})
    refused(api, r, 403, "read_only", before)
    admin.share(srv.data_dir, api.library, name, "write")
    assert reader.commit(op_delete(f["id"], f["revision"])).status_code == 200
    reader.close()


def test_unknown_endpoint_and_method(api: Api) -> None:
    assert api.http.get("/v2/nothing").json()["error"] == "not_found"
    r = api.http.delete(api.lib + "/commit")
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"


# --- chunks and manifests -------------------------------------------------------------------


def test_chunk_upload_download_etag_and_ranges(api: Api) -> None:
    data = bytes(range(256)) * 1000
    h = protocol.hash_bytes(data)
    assert api.post("/chunks/missing", {"hashes": [h]}).json() == {"missing": [h]}
    api.put_chunk(data)
    api.put_chunk(data)  # idempotent
    assert api.post("/chunks/missing", {"hashes": [h]}).json() == {"missing": []}
    r = api.get(f"/chunks/{h}")
    assert r.status_code == 200 and r.content == data
    assert r.headers["etag"] == f'"{h}"'
    assert "immutable" in r.headers["cache-control"]
    assert api.get(f"/chunks/{h}", headers={"If-None-Match": f'"{h}"'}).status_code == 304
    r = api.get(f"/chunks/{h}", headers={"Range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == data[10:20]
    assert r.headers["content-range"] == f"bytes 10-19/{len(data)}"
    r = api.get(f"/chunks/{h}", headers={"Range": "bytes=-5"})
    assert r.status_code == 206 and r.content == data[-5:]
    r = api.get(f"/chunks/{h}", headers={"Range": f"bytes={len(data) - 3}-"})
    assert r.content == data[-3:]
    r = api.get(f"/chunks/{h}", headers={"Range": f"bytes={len(data)}-"})
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(data)}"
    head = api.http.head(f"{api.lib}/chunks/{h}")
    assert head.status_code == 200 and head.content == b""


def test_chunk_batch_download(api: Api) -> None:
    blobs = [b"one", b"two" * 1000, b"three" * 7]
    refs = [api.put_chunk(b) for b in blobs]
    order = [refs[2].hash, refs[0].hash, refs[1].hash, refs[0].hash]
    r = api.post("/chunks/batch", {"hashes": order})
    lengths = [int(x) for x in r.headers["x-ferry-lengths"].split(",")]
    assert lengths == [len(blobs[2]), 3, 3000, 3]
    assert r.content == blobs[2] + blobs[0] + blobs[1] + blobs[0]
    unknown = protocol.hash_bytes(b"never uploaded")
    r = api.post("/chunks/batch", {"hashes": [refs[0].hash, unknown]})
    assert r.status_code == 404 and r.json()["missing"] == [unknown]


def test_bad_chunk_uploads_change_nothing(api: Api) -> None:
    before = api.snapshot()
    data = b"the real bytes"
    h = protocol.hash_bytes(data)
    r = api.http.put(f"{api.lib}/chunks/{h}", content=b"other bytes")
    refused(api, r, 422, "hash_mismatch", before)
    assert api.post("/chunks/missing", {"hashes": [h]}).json()["missing"] == [h]
    assert api.get(f"/chunks/{protocol.hash_bytes(b'other bytes')}").status_code == 404
    big = b"\0" * (protocol.MAX_CHUNK_SIZE + 1)
    r = api.http.put(f"{api.lib}/chunks/{protocol.hash_bytes(big)}", content=big)
    refused(api, r, 413, "payload_too_large", before)
    r = api.http.put(f"{api.lib}/chunks/{'A' * 64}", content=data)
    refused(api, r, 400, "bad_request", before)
    r = api.http.put(f"{api.lib}/chunks/..%2F..%2Fetc%2Fpasswd", content=data)
    assert r.status_code in (400, 404)
    r = api.http.put(f"{api.lib}/chunks/{protocol.hash_bytes(b'')}", content=b"")
    refused(api, r, 400, "empty_chunk", before)
    assert api.get(f"/chunks/{'z' * 64}").status_code == 400
    assert not list((api.server.data_dir / "chunks" / "tmp").iterdir())


def test_manifest_is_content_addressed(api: Api) -> None:
    chunks = [api.put_chunk(b"a" * 100), api.put_chunk(b"b" * 50)]
    f = api.ok(op_create(new_id(), ROOT_ID, "m", "file", 0o644, 5, chunks=chunks))[0]
    assert f["manifest"] == protocol.manifest_hash(chunks) and f["size"] == 150
    body = api.get(f"/manifests/{f['manifest']}").json()
    assert body == {"hash": f["manifest"], "size": 150, "chunks": protocol.chunks_to_json(chunks)}
    assert api.get(f"/manifests/{'0' * 64}").json()["error"] == "no_such_manifest"
    assert api.get("/manifests/nothex").status_code == 400


# --- commits ----------------------------------------------------------------------------------


def test_every_op_kind_and_the_feed(api: Api) -> None:
    d = api.mkdir("docs")
    f = api.mkfile("a.txt", b"v1", parent=d["id"])
    link = api.ok(op_create(new_id(), d["id"], "ln", "symlink", 0o777, 1, target="a.txt"))[0]
    assert link["target"] == "a.txt" and link["kind"] == "symlink"
    v2 = api.put_chunk(b"version two")
    f2 = api.ok(op_update(f["id"], f["revision"], [v2], 99))[0]
    assert f2["size"] == len(b"version two") and f2["mtime_ns"] == 99
    f3 = api.ok(op_rename(f["id"], f2["revision"], ROOT_ID, "b.txt"))[0]
    assert (f3["parent"], f3["name"], f3["id"]) == (ROOT_ID, "b.txt", f["id"])
    f4 = api.ok(op_setattr(f["id"], f3["revision"], mode=0o600, mtime_ns=7))[0]
    assert (f4["mode"], f4["mtime_ns"]) == (0o600, 7)
    gone = api.ok(op_delete(link["id"], link["revision"]))[0]
    assert gone["deleted"] is True
    feed = api.feed(0)
    by_id = {e["id"]: e for e in feed["entries"]}
    assert by_id[f["id"]] == f4 and by_id[link["id"]]["deleted"] is True
    revisions = [e["revision"] for e in feed["entries"]]
    assert revisions == sorted(revisions) and len(set(by_id)) == len(revisions)
    assert feed["cursor"] == api.snapshot()[0] and feed["more"] is False
    since = api.feed(f3["revision"])
    assert [e["id"] for e in since["entries"]] == [f["id"], link["id"]]


def test_feed_paging_covers_everything_once(api: Api) -> None:
    ops = [op_create(new_id(), ROOT_ID, f"d{i}", "dir", 0o755, 1) for i in range(25)]
    api.ok(*ops)
    seen, cursor = [], 0
    while True:
        page = api.get("/changes", params={"cursor": cursor, "limit": 7}).json()
        seen += [e["id"] for e in page["entries"]]
        cursor = page["cursor"]
        if not page["more"]:
            break
    assert len(seen) == len(set(seen)) == 26
    r = api.get("/changes", params={"cursor": cursor + 5})
    assert r.status_code == 422 and r.json()["error"] == "cursor_ahead"
    for bad in ({"cursor": "x"}, {"limit": 0}, {"wait": "nan"}, {"wait": 1e9}):
        assert api.get("/changes", params=bad).status_code == 400, bad


def test_commit_is_atomic(api: Api) -> None:
    before = api.snapshot()
    good = op_create(new_id(), ROOT_ID, "new", "dir", 0o755, 1)
    stale = op_setattr(ROOT_ID, 12345, mode=0o700)
    body = refused(api, api.commit(good, stale), 409, "conflict", before)
    assert body["op_index"] == 1 and body["current"]["id"] == ROOT_ID


def test_stale_base_conflicts_return_current_and_apply_nothing(api: Api) -> None:
    f = api.mkfile("f.txt", b"one")
    newer = api.ok(op_setattr(f["id"], f["revision"], mode=0o600))[0]
    before = api.snapshot()
    chunk = api.put_chunk(b"two")
    for op in [
        op_update(f["id"], f["revision"], [chunk], 5),
        op_rename(f["id"], f["revision"], ROOT_ID, "g.txt"),
        op_setattr(f["id"], f["revision"], mode=0o644),
        op_delete(f["id"], f["revision"]),
    ]:
        body = refused(api, api.commit(op), 409, "conflict", before)
        assert body["current"] == newer and body["op_index"] == 0


def test_naming_conflicts(api: Api) -> None:
    d = api.mkdir("d")
    a = api.mkfile("a")
    b = api.mkfile("b")
    child = api.mkfile("child", parent=d["id"])
    before = api.snapshot()
    # create with an existing id, or a taken name
    r = api.commit(op_create(a["id"], ROOT_ID, "zzz", "dir", 0o755, 1))
    assert refused(api, r, 409, "conflict", before)["current"]["id"] == a["id"]
    r = api.commit(op_create(new_id(), ROOT_ID, "a", "dir", 0o755, 1))
    assert refused(api, r, 409, "conflict", before)["current"]["id"] == a["id"]
    # rename onto a taken name without replace, or with a stale replace_base
    r = api.commit(op_rename(a["id"], a["revision"], ROOT_ID, "b"))
    assert refused(api, r, 409, "conflict", before)["current"]["id"] == b["id"]
    r = api.commit(op_rename(a["id"], a["revision"], ROOT_ID, "b", replace=b["id"], replace_base=1))
    assert refused(api, r, 409, "conflict", before)["current"]["id"] == b["id"]
    # replace names an entry no longer at the target
    r = api.commit(
        op_rename(
            a["id"], a["revision"], ROOT_ID, "free", replace=b["id"], replace_base=b["revision"]
        )
    )
    refused(api, r, 409, "conflict", before)
    # deleting a non-empty directory
    r = api.commit(op_delete(d["id"], d["revision"]))
    assert refused(api, r, 409, "conflict", before)["current"]["id"] == d["id"]
    # missing or deleted parent
    r = api.commit(op_create(new_id(), new_id(), "x", "dir", 0o755, 1))
    assert refused(api, r, 409, "conflict", before)["current"] is None
    # an entry that does not exist
    r = api.commit(op_delete(new_id(), 3))
    refused(api, r, 409, "conflict", before)
    # a deleted entry
    api.ok(op_delete(child["id"], child["revision"]))
    before = api.snapshot()
    r = api.commit(op_setattr(child["id"], child["revision"] + 100, mode=1))
    assert refused(api, r, 409, "conflict", before)["current"]["deleted"] is True
    r = api.commit(op_create(new_id(), child["id"], "x", "dir", 0o755, 1))
    refused(api, r, 409, "conflict", before)


def test_rename_with_replace_trashes_the_target(api: Api) -> None:
    tmp = api.mkfile(".a.swp", b"new content")
    old = api.mkfile("a.txt", b"old content")
    r = api.ok(
        op_rename(
            tmp["id"],
            tmp["revision"],
            ROOT_ID,
            "a.txt",
            replace=old["id"],
            replace_base=old["revision"],
        )
    )
    assert r[0]["name"] == "a.txt" and r[0]["id"] == tmp["id"]
    assert api.entry(old["id"])["deleted"] is True
    trash = api.get("/trash").json()["entries"]
    assert [t["id"] for t in trash] == [old["id"]]
    assert trash[0]["deleted_by"] and trash[0]["device"] == "test-device"


def test_structural_refusals(api: Api) -> None:
    d = api.mkdir("d")
    sub = api.mkdir("sub", parent=d["id"])
    f = api.mkfile("f")
    before = api.snapshot()
    r = api.commit(op_rename(d["id"], d["revision"], sub["id"], "d"))
    refused(api, r, 422, "cycle", before)
    r = api.commit(op_rename(d["id"], d["revision"], d["id"], "d2"))
    refused(api, r, 422, "cycle", before)
    r = api.commit(op_create(new_id(), f["id"], "x", "dir", 0o755, 1))
    refused(api, r, 422, "not_a_directory", before)
    r = api.commit(op_update(d["id"], d["revision"], [], 1))
    refused(api, r, 422, "not_a_file", before)
    r = api.commit(op_delete(ROOT_ID, 1))
    refused(api, r, 422, "root_immutable", before)
    r = api.commit(
        op_rename(f["id"], f["revision"], ROOT_ID, "d", replace=d["id"], replace_base=d["revision"])
    )
    refused(api, r, 422, "type_mismatch", before)


def test_missing_chunks_are_refused_with_the_list(api: Api) -> None:
    before = api.snapshot()
    have = api.put_chunk(b"present")
    lacking = ChunkRef(protocol.hash_bytes(b"absent"), 6)
    r = api.commit(op_create(new_id(), ROOT_ID, "f", "file", 0o644, 1, chunks=[have, lacking]))
    assert refused(api, r, 422, "missing_chunks", before)["missing"] == [lacking.hash]
    wrong_length = ChunkRef(have.hash, have.length + 1)
    r = api.commit(op_create(new_id(), ROOT_ID, "f", "file", 0o644, 1, chunks=[wrong_length]))
    refused(api, r, 422, "chunk_length_mismatch", before)


def test_idempotent_commit(api: Api) -> None:
    op = op_create(new_id(), ROOT_ID, "once", "dir", 0o755, 1)
    first = api.commit(op, key="journal-op-1")
    before = api.snapshot()
    again = api.commit(op, key="journal-op-1")
    assert again.status_code == 200 and again.json() == first.json()
    assert api.snapshot() == before
    other = op_create(new_id(), ROOT_ID, "other", "dir", 0o755, 1)
    refused(api, api.commit(other, key="journal-op-1"), 422, "idempotency_key_reused", before)


BAD_NAMES = ["a/b", "nul\x00", ".", "..", "", "x" * 256, "é" * 128]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused(api: Api, name: str) -> None:
    f = api.mkfile("ok")
    before = api.snapshot()
    r = api.commit(op_create(new_id(), ROOT_ID, name, "dir", 0o755, 1))
    body = refused(
        api, r, 400, "name_too_long" if len(name.encode()) > 255 else "invalid_name", before
    )
    assert "op 0" in body["message"]
    r = api.commit(op_rename(f["id"], f["revision"], ROOT_ID, name))
    assert r.status_code == 400 and api.snapshot() == before


def test_a_255_byte_name_is_fine(api: Api) -> None:
    api.mkdir("é" * 127 + "x")


BAD_BODIES: list[tuple[bytes | object, str]] = [
    (b"{not json", "malformed_json"),
    (b"[1, 2]", "malformed_json"),
    (b'{"key": "k", "device": "d", "ops": [], "x": NaN}', "malformed_json"),
    ({"key": "k", "device": "d"}, "missing_field"),
    ({"key": "k", "device": "d", "ops": [], "extra": 1}, "unknown_field"),
    ({"key": 5, "device": "d", "ops": [{}]}, "bad_request"),
    ({"key": "k", "device": "d", "ops": []}, "bad_request"),
    ({"key": "k", "device": "d", "ops": "create"}, "bad_request"),
    ({"key": "k", "device": "d", "ops": [{"op": "explode"}]}, "bad_request"),
    ({"key": "k", "device": "d", "ops": [{"op": "delete", "id": "x", "base": 1}]}, "bad_request"),
    (
        {"key": "k", "device": "d", "ops": [{"op": "delete", "id": ROOT_ID, "base": "1"}]},
        "bad_request",
    ),
    (
        {"key": "k", "device": "d", "ops": [{"op": "delete", "id": ROOT_ID, "base": True}]},
        "bad_request",
    ),
    (
        {
            "key": "k",
            "device": "d",
            "ops": [{"op": "delete", "id": ROOT_ID, "base": 1, "color": "red"}],
        },
        "unknown_field",
    ),
    ({"key": "k", "device": "d", "ops": [op_setattr(ROOT_ID, 1, mode=0o170000)]}, "bad_request"),
    (
        {
            "key": "k",
            "device": "d",
            "ops": [{**op_create(new_id(), ROOT_ID, "f", "file", 1, 1), "chunks": [["zz", 1]]}],
        },
        "bad_request",
    ),
    (
        {
            "key": "k",
            "device": "d",
            "ops": [
                {
                    **op_create(new_id(), ROOT_ID, "f", "file", 1, 1),
                    "chunks": [[protocol.EMPTY_MANIFEST, 0]],
                }
            ],
        },
        "bad_request",
    ),
    (
        {
            "key": "k",
            "device": "d",
            "ops": [op_create(new_id(), ROOT_ID, "l", "symlink", 1, 1, target=None)],
        },
        "bad_request",
    ),
    (
        {"key": "k", "device": "d", "ops": [op_create(new_id(), ROOT_ID, "d", "socket", 1, 1)]},
        "bad_request",
    ),
    (
        {
            "key": "k",
            "device": "d",
            "ops": [{**op_create(new_id(), ROOT_ID, "d", "dir", 1, 1), "chunks": []}],
        },
        "bad_request",
    ),
]


@pytest.mark.parametrize("body, code", BAD_BODIES)
def test_malformed_commits(api: Api, body: object, code: str) -> None:
    before = api.snapshot()
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = api.post("/commit", content=content, headers={"Content-Type": "application/json"})
    refused(api, r, 400, code, before)


def test_oversize_bodies(api: Api) -> None:
    before = api.snapshot()
    huge = b'{"key": "k", "device": "d", "ops": [' + b" " * protocol.MAX_JSON_BODY + b"]}"
    refused(api, api.post("/commit", content=huge), 413, "payload_too_large", before)
    too_many = [op_setattr(ROOT_ID, 1) for _ in range(protocol.MAX_OPS_PER_COMMIT + 1)]
    refused(api, api.commit(*too_many), 413, "too_many_ops", before)
    hashes = [protocol.EMPTY_MANIFEST] * (protocol.MAX_HASHES_PER_QUERY + 1)
    refused(api, api.post("/chunks/missing", {"hashes": hashes}), 413, "too_many_hashes", before)
    refused(api, api.post("/chunks/missing", {"hashes": ["nothex"]}), 400, "bad_request", before)


# --- versions and trash ---------------------------------------------------------------------


def test_versions_and_restore(api: Api) -> None:
    f = api.mkfile("doc.txt", b"first")
    second = api.ok(op_update(f["id"], f["revision"], [api.put_chunk(b"second")], 2))[0]
    versions = api.get(f"/entries/{f['id']}/versions").json()["versions"]
    assert [v["revision"] for v in versions] == [second["revision"], f["revision"]]
    assert versions[1]["size"] == 5 and versions[1]["device"] == "test-device"
    assert versions[1]["user"] and versions[1]["committed_at"] <= time.time()
    body = {"revision": f["revision"], "base": second["revision"], "key": "r1", "device": "dev"}
    restored = api.post(f"/entries/{f['id']}/restore", body).json()
    assert restored["manifest"] == f["manifest"] and restored["revision"] > second["revision"]
    assert api.post(f"/entries/{f['id']}/restore", body).json() == restored  # idempotent
    assert len(api.get(f"/entries/{f['id']}/versions").json()["versions"]) == 3
    before = api.snapshot()
    stale = {**body, "key": "r2"}
    refused(api, api.post(f"/entries/{f['id']}/restore", stale), 409, "conflict", before)
    nosuch = {**body, "key": "r3", "revision": 999999, "base": restored["revision"]}
    refused(api, api.post(f"/entries/{f['id']}/restore", nosuch), 404, "no_such_version", before)
    r = api.post(f"/entries/{new_id()}/restore", {**body, "key": "r4"})
    refused(api, r, 409, "conflict", before)
    assert api.get(f"/entries/{new_id()}/versions").status_code == 404


def test_trash_restore_recreates_parents_and_picks_free_names(api: Api) -> None:
    d = api.mkdir("d")
    f = api.mkfile("report.txt", b"x", parent=d["id"])
    gone_f = api.ok(op_delete(f["id"], f["revision"]))[0]
    api.ok(op_delete(d["id"], d["revision"]))
    replacement = api.mkdir("d")
    trash = {t["id"] for t in api.get("/trash").json()["entries"]}
    assert trash == {f["id"], d["id"]}
    r = api.post(f"/trash/{f['id']}/restore", {"key": "u1", "device": "dev"})
    assert r.status_code == 200, r.text
    back = r.json()
    assert back["deleted"] is False and back["revision"] > gone_f["revision"]
    parent = api.entry(d["id"])
    assert parent["deleted"] is False and parent["name"] == "d (restored)"
    assert api.entry(replacement["id"])["name"] == "d"
    assert {t["id"] for t in api.get("/trash").json()["entries"]} == set()
    before = api.snapshot()
    r = api.post(f"/trash/{f['id']}/restore", {"key": "u2", "device": "dev"})
    refused(api, r, 404, "not_in_trash", before)
    assert api.post(f"/trash/{f['id']}/restore", {"key": "u1", "device": "dev"}).json() == back


# --- long poll ------------------------------------------------------------------------------


async def test_long_poll_wakes_within_100ms_of_a_commit(api: Api) -> None:
    cursor = api.snapshot()[0]
    headers = {"Authorization": f"Bearer {api.token}"}
    async with httpx.AsyncClient(base_url=api.server.url, headers=headers, timeout=30) as http:
        woke: dict[str, float] = {}

        async def poll() -> None:
            r = await http.get(api.lib + "/changes", params={"cursor": cursor, "wait": 10})
            woke["at"] = time.monotonic()
            woke["count"] = len(r.json()["entries"])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(poll)
            await trio.sleep(0.5)
            committed = time.monotonic()
            r = await http.post(
                api.lib + "/commit",
                json={
                    "key": new_id(),
                    "device": "d",
                    "ops": [op_create(new_id(), ROOT_ID, "n", "dir", 0o755, 1)],
                },
            )
            assert r.status_code == 200
            done = time.monotonic()
    assert woke["count"] == 1
    assert woke["at"] - done < 0.1 and woke["at"] >= committed


async def test_long_poll_times_out_empty(api: Api) -> None:
    cursor = api.snapshot()[0]
    start = time.monotonic()
    r = await trio.to_thread.run_sync(
        lambda: api.get("/changes", params={"cursor": cursor, "wait": 0.5})
    )
    assert 0.45 < time.monotonic() - start < 3
    assert r.json() == {"entries": [], "cursor": cursor, "more": False}


def test_nothing_written_outside_data_dir(srv: ServerProcess, tmp_path: Path) -> None:
    outside = {p for p in srv.data_dir.parent.iterdir() if p != srv.data_dir}
    api = make_library(srv)
    for path in ["/../../x", "/chunks/..%2F..%2F..%2Fx", "/entries/..%2F..%2Fx/restore"]:
        api.http.put(api.lib + path, content=b"x")
        api.http.post(api.lib + path, content=b"{}")
    assert {p for p in srv.data_dir.parent.iterdir() if p != srv.data_dir} <= outside | {
        srv.log_path
    }
    api.close()
