"""A property-based fuzzer against a live `ferry serve`: hostile requests change nothing.

Hypothesis builds malformed and adversarial requests -- bad JSON, wrong
types, huge or negative sizes, lengths, cursors and waits, path tricks in
names and URLs (`..`, `%2e%2e`, `/`, NUL, overlong, non-UTF-8 bytes), hash
mismatches, declared bodies over the limit, replayed idempotency keys with
different bodies, other users' tokens, no token, foreign libraries -- and
sends each over a raw socket, so nothing in an HTTP client cleans it up
first. After every request:

* the status is below 500;
* a refusal the app answers is JSON `{"error": CODE, "message": TEXT}`; the
  few the HTTP layer refuses before the app sees them (an unparseable request
  line) are 4xx without a body;
* a refused request changed nothing: both libraries' revision and change
  feed, the chunk, manifest, version and idempotency tables, the files under
  DATA_DIR and the files around it are as before;
* no file exists anywhere but under DATA_DIR, and under `chunks/` only
  fan-out paths named by a valid hash (plus an empty `tmp/`).

Examples per property: `FERRY_FUZZ_EXAMPLES` (default 60; e.g. 2000 for a
long run). Run with `-s` to see how many requests were sent.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from remote import protocol
from remote.protocol import ROOT_ID, ChunkRef, op_create, op_delete, op_rename, op_update
from remote.server import admin
from tests.support import ServerProcess, ferry
from tests.t4_server_helpers import Api, new_id, start_server

EXAMPLES = int(os.environ.get("FERRY_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: A long run (FERRY_FUZZ_EXAMPLES in the thousands) outlasts the default per-test timeout.
pytestmark = pytest.mark.timeout(max(300, EXAMPLES))
#: Requests sent, by family; printed at the end of the module (run with -s).
SENT: Counter[str] = Counter()

_CHUNK_PATH = re.compile(r"\A([0-9a-f]{2})/([0-9a-f]{2})/(\1\2[0-9a-f]{60})\Z")


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Probe:
    """One hostile request and what its answer may be."""

    family: str
    method: bytes
    target: bytes
    body: bytes = b""
    token: str | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    #: Statuses allowed; None means any status below 500.
    allowed: frozenset[int] | None = None
    #: The error code a refusal must carry, when the probe pins it down.
    code: str | None = None


@dataclass
class World:
    """The live server, two owners (alice: library a, mallory: library b), a reader (bob) on a."""

    server: ServerProcess
    base: Path
    alice: Api
    mallory: Api
    bob_token: str
    alice_chunk: ChunkRef
    mallory_chunk: ChunkRef
    file_a: dict[str, Any]
    replay_key: str
    replay_body: dict[str, Any]
    replay_answer: dict[str, Any]

    def send(self, probe: Probe) -> Reply:
        SENT[probe.family] += 1
        head = [probe.method + b" " + probe.target + b" HTTP/1.1", b"Host: fuzz"]
        if probe.token is not None:
            head.append(b"Authorization: Bearer " + probe.token.encode())
        names = {k.lower() for k, _ in probe.headers}
        head += [k + b": " + v for k, v in probe.headers]
        if b"content-length" not in names:
            head.append(b"Content-Length: " + str(len(probe.body)).encode())
        head.append(b"Connection: close")
        raw = b"\r\n".join(head) + b"\r\n\r\n" + probe.body
        return _exchange(self.server.port, raw)

    def state(self) -> tuple:
        """Everything a request could change, for before/after comparison."""
        db = sqlite3.connect(self.server.data_dir / "meta.sqlite")
        try:
            tables = tuple(
                db.execute(f"SELECT * FROM {table} ORDER BY 1, 2, 3").fetchall()
                for table in ("library_chunks", "manifests", "versions", "commits", "libraries")
            )
        finally:
            db.close()
        return (self.alice.snapshot(), self.mallory.snapshot(), tables, self.files())

    def files(self) -> frozenset[str]:
        """Every file under the test's directory, DATA_DIR included, as relative paths."""
        found = set()
        for dirpath, _, filenames in os.walk(self.base):
            for name in filenames:
                found.add(os.path.relpath(os.path.join(dirpath, name), self.base))
        return frozenset(found)


def _exchange(port: int, raw: bytes) -> Reply:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            sock.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server refused early (413 on a declared length); read its answer
        data = b""
        while True:
            try:
                piece = sock.recv(65536)
            except ConnectionResetError:
                break
            if not piece:
                break
            data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0].startswith(b"HTTP/1.1 "), f"no HTTP answer: {data[:200]!r}"
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower().decode()] = value.strip().decode("latin-1")
    return Reply(int(lines[0].split()[1]), headers, body)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("fuzz")
    # Bad tokens are sent on purpose, hundreds a minute in long runs; the auth-failure
    # limit would answer them 429 (tests/t6_security.py tests the limit itself).
    server = start_server(base, "--auth-failures", "0")
    try:
        alice_token = admin.add_user(server.data_dir, "alice")
        mallory_token = admin.add_user(server.data_dir, "mallory")
        bob_token = admin.add_user(server.data_dir, "bob")
        admin.add_library(server.data_dir, "a", "alice")
        admin.add_library(server.data_dir, "b", "mallory")
        admin.share(server.data_dir, "a", "bob", "read")
        alice, mallory = Api(server, "a", alice_token), Api(server, "b", mallory_token)
        file_a = alice.mkfile("report.txt", b"alice's words")
        alice.mkdir("sub")
        mallory.mkfile("secret.txt", b"mallory's secret")
        key = new_id()
        body = {
            "key": key,
            "device": "d",
            "ops": [op_create(new_id(), ROOT_ID, "replayed", "dir", 0o755, 1)],
        }
        answer = alice.post("/commit", body)
        assert answer.status_code == 200, answer.text
        yield World(
            server,
            base,
            alice,
            mallory,
            bob_token,
            ChunkRef(protocol.hash_bytes(b"alice's words"), 13),
            ChunkRef(protocol.hash_bytes(b"mallory's secret"), 16),
            file_a,
            key,
            body,
            answer.json(),
        )
        alice.close()
        mallory.close()
    finally:
        server.stop()
    log = server.log()
    assert "internal_error" not in log and "Traceback" not in log, log
    result = ferry("admin", "--data", str(server.data_dir), "check", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    print(f"\nfuzz requests sent: {sum(SENT.values())} {dict(sorted(SENT.items()))}")


def check(world: World, probe: Probe) -> Reply:
    """Send `probe` and assert the module's properties; return the reply for extra checks."""
    before = world.state()
    reply = world.send(probe)
    what = f"{probe.family}: {probe.method.decode()} {probe.target[:120]!r} -> {reply.status}"
    assert reply.status < 500, f"{what}: {reply.body[:500]!r}"
    if probe.allowed is not None:
        assert reply.status in probe.allowed, f"{what}: {reply.body[:500]!r}"
    if reply.status >= 400:
        if probe.method == b"HEAD":
            assert not reply.body, what
        elif reply.headers.get("content-type") == "application/json":
            body = reply.json()
            assert isinstance(body.get("error"), str) and body["error"], f"{what}: {body}"
            assert isinstance(body.get("message"), str) and body["message"], f"{what}: {body}"
            if probe.code is not None:
                assert body["error"] == probe.code, f"{what}: {body}"
        else:
            # Refused by the HTTP layer before the app: a bad request line or header.
            assert reply.status in (400, 413, 414, 431), what
            assert probe.code is None, f"{what}: expected the app to answer {probe.code}"
        assert world.state() == before, f"{what}: a refused request changed the server's state"
    check_files(world)
    return reply


def check_files(world: World) -> None:
    """Files exist only under DATA_DIR (besides the server's log), chunk files only by hash."""
    data = os.path.relpath(world.server.data_dir, world.base)
    log = os.path.relpath(world.server.log_path or "", world.base)
    for path in world.files():
        if path == log:
            continue
        assert path.startswith(data + os.sep), f"file written outside DATA_DIR: {path}"
        inner = os.path.relpath(os.path.join(world.base, path), world.server.data_dir)
        if inner.startswith("chunks" + os.sep):
            chunk = inner[len("chunks" + os.sep) :]
            assert _CHUNK_PATH.match(chunk), f"unexpected file in the chunk directory: {inner}"
        else:
            assert inner.startswith("meta.sqlite"), f"unexpected file in DATA_DIR: {inner}"


# --- building blocks ------------------------------------------------------------------------

NAME_TRICKS = [
    "..",
    ".",
    "",
    "/",
    "a/b",
    "../../etc/passwd",
    "a\x00b",
    "x" * 256,
    "é" * 128,
    "\udc80",
    "%2e%2e",
    "..%2f..%2f",
    "\\..\\x",
    " ",
    "ok.txt",
]
SEGMENT_TRICKS = [
    b"..",
    b"%2e%2e",
    b"%2E%2E",
    b"..%2f..%2f..%2fetc",
    b"%2e%2e%2f%2e%2e%2fx",
    b"a%00b",
    b"%ff%fe",
    b"\xff\xfe",
    b"a\x00b",
    b"x" * 5000,
    b"",
    b"%00",
    b"A" * 64,
    b"0" * 63,
    b"0" * 65,
]
NUMBER_TRICKS = [
    -1,
    -(2**63),
    2**63,
    2**64,
    10**30,
    0,
    1,
    1.5,
    "1",
    None,
    True,
    [],
    {},
]
QUERY_TRICKS = [
    "-1",
    "0",
    "1",
    "1e3",
    "1e999",
    "NaN",
    "nan",
    "inf",
    "-inf",
    "9223372036854775808",
    "99999999999999999999999999",
    "%ff",
    "",
    "0x10",
    "1_000",
    " 2",
    "%00",
    "0.01",
]
hex64 = st.text("0123456789abcdef", min_size=64, max_size=64)
names = st.sampled_from(NAME_TRICKS) | st.text(max_size=40)
numbers = st.sampled_from(NUMBER_TRICKS) | st.integers()
segments = st.sampled_from(SEGMENT_TRICKS) | st.binary(max_size=20).map(
    lambda b: b.replace(b"/", b"").replace(b" ", b"").replace(b"?", b"")
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
bad_json = st.sampled_from(
    [
        b"",
        b"{",
        b"[]",
        b"null",
        b'"x"',
        b"{'key': 1}",
        b'{"key": NaN}',
        b'{"key": Infinity}',
        b'{"key": 1e999}',
        b'{"key": "\\ud800", "device": "d", "ops": []}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a": 1, "a": 2}',
        b"\xff\xfe{}",
        b'{"key": "k", "device": "d", "ops": [}',
    ]
) | st.binary(max_size=200)


def lib_path(library: str) -> bytes:
    return protocol.library_path(library).encode()


def dump(value: Any) -> bytes:
    return json.dumps(value).encode()


# --- the properties -------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_malformed_commits_are_refused_and_change_nothing(
    world: World, data: st.DataObject
) -> None:
    """Bad JSON, wrong types, path tricks in names and ids, huge or negative sizes."""
    choice = data.draw(st.sampled_from(["garbage", "values", "ops"]))
    if choice == "garbage":
        body = data.draw(bad_json)
    elif choice == "values":
        body = dump(data.draw(json_values))
    else:
        chunk_ref = data.draw(
            st.sampled_from(
                [
                    [world.alice_chunk.hash, world.alice_chunk.length],
                    [world.mallory_chunk.hash, world.mallory_chunk.length],
                    [world.alice_chunk.hash, world.alice_chunk.length + 1],
                ]
            )
            | st.lists(hex64 | numbers, max_size=3)
            | st.tuples(hex64, numbers).map(list)
        )
        op = {
            "op": data.draw(st.sampled_from(["create", "update", "rename", "setattr", "delete"])),
            "id": data.draw(st.sampled_from([new_id(), ROOT_ID, world.file_a["id"]]) | names),
            "parent": data.draw(st.sampled_from([ROOT_ID, new_id()]) | names),
            "name": data.draw(names),
            "kind": data.draw(st.sampled_from(["file", "dir", "symlink", "fifo"])),
            "mode": data.draw(numbers),
            "mtime_ns": data.draw(numbers),
            "base": data.draw(numbers),
            "chunks": [chunk_ref],
            "target": data.draw(names),
        }
        keep = data.draw(st.sets(st.sampled_from(sorted(op))))
        body = dump(
            {
                "key": data.draw(st.sampled_from([new_id(), "", "k" * 300]) | names),
                "device": data.draw(st.sampled_from(["d", "", "é" * 150])),
                "ops": [{k: v for k, v in op.items() if k in keep or k == "op"}],
            }
        )
    probe = Probe("commit", b"POST", lib_path("a") + b"/commit", body, world.alice.token)
    reply = check(world, probe)
    if reply.status == 200:
        for entry in reply.json()["entries"]:
            protocol.validate_name(entry["name"])
            assert entry["manifest"] is None or entry["size"] >= 0


@FUZZ
@given(data=st.data())
def test_foreign_chunks_stay_invisible(world: World, data: st.DataObject) -> None:
    """Commits, queries and downloads naming another library's chunk learn nothing about it."""
    secret = world.mallory_chunk
    kind = data.draw(st.sampled_from(["commit", "missing", "batch", "get", "head"]))
    token = world.alice.token
    if kind == "commit":
        op = data.draw(
            st.sampled_from(
                [
                    op_create(
                        new_id(), ROOT_ID, f"steal-{new_id()}", "file", 0o644, 1, chunks=[secret]
                    ),
                    op_update(world.file_a["id"], world.file_a["revision"], [secret], 1),
                ]
            )
        )
        body = dump({"key": new_id(), "device": "d", "ops": [op]})
        probe = Probe("foreign-chunk", b"POST", lib_path("a") + b"/commit", body, token)
        probe.allowed, probe.code = frozenset({409, 422}), None
        reply = check(world, probe)
        if reply.status == 422:
            assert reply.json()["error"] == "missing_chunks"
            assert reply.json()["missing"] == [secret.hash]
    elif kind in ("missing", "batch"):
        others = data.draw(
            st.lists(st.sampled_from([world.alice_chunk.hash, secret.hash]), max_size=4)
        )
        hashes = [secret.hash, *others]
        body = dump({"hashes": hashes})
        probe = Probe(
            "foreign-chunk", b"POST", lib_path("a") + f"/chunks/{kind}".encode(), body, token
        )
        probe.allowed = frozenset({200}) if kind == "missing" else frozenset({404})
        reply = check(world, probe)
        if kind == "missing":
            assert secret.hash in reply.json()["missing"]
        else:
            assert secret.hash in reply.json()["missing"]
    else:
        target = lib_path("a") + f"/chunks/{secret.hash}".encode()
        method = b"GET" if kind == "get" else b"HEAD"
        reply = check(
            world, Probe("foreign-chunk", method, target, b"", token, allowed=frozenset({404}))
        )
        assert secret.length != len(reply.body) or b"secret" not in reply.body


@FUZZ
@given(data=st.data())
def test_chunk_uploads_are_checked(world: World, data: st.DataObject) -> None:
    """Hash mismatches, empty bodies, bad names and declared sizes over the limit."""
    body = data.draw(st.binary(max_size=2000))
    kind = data.draw(st.sampled_from(["mismatch", "name", "too-large", "negative-length", "valid"]))
    headers: list[tuple[bytes, bytes]] = []
    allowed: frozenset[int] | None = None
    code = None
    name = protocol.hash_bytes(body).encode()
    if kind == "mismatch":
        name = protocol.hash_bytes(body + b"!").encode()
        allowed, code = frozenset({400, 422}), "hash_mismatch" if body else "empty_chunk"
    elif kind == "name":
        name = data.draw(segments) or b"%2e%2e"
        allowed = frozenset({400, 404, 405})
    elif kind == "too-large":
        size = data.draw(st.sampled_from([protocol.MAX_CHUNK_SIZE + 1, 2**40, 10**30]))
        headers = [(b"Content-Length", str(size).encode())]
        # h11 itself refuses a length it cannot hold (400, no body); the app any other.
        allowed = frozenset({413} if size < 2**63 else {400, 413})
        code = "payload_too_large" if size < 2**63 else None
    elif kind == "negative-length":
        headers = [(b"Content-Length", data.draw(st.sampled_from([b"-1", b"1e3", b"0x10", b" "])))]
        allowed = frozenset({400})
    else:
        allowed = frozenset({200} if body else {400})
    probe = Probe(
        "chunk-put",
        b"PUT",
        lib_path("a") + b"/chunks/" + name,
        body,
        world.alice.token,
        headers,
        allowed,
        code,
    )
    reply = check(world, probe)
    if reply.status == 200:
        fetched = world.alice.get(f"/chunks/{name.decode()}")
        assert fetched.content == body


@FUZZ
@given(
    endpoint=st.sampled_from(["changes", "trash", f"entries/{ROOT_ID}/versions"]),
    cursor=st.sampled_from(QUERY_TRICKS) | st.integers().map(str),
    limit=st.sampled_from(QUERY_TRICKS) | st.integers().map(str),
    wait=st.sampled_from(["-1", "NaN", "inf", "1e999", "61", "x", "%ff", "0.01", "0"]),
    repeat=st.booleans(),
)
def test_query_parameters_are_bounded(
    world: World, endpoint: str, cursor: str, limit: str, wait: str, repeat: bool
) -> None:
    """Huge, negative, non-numeric and undecodable cursors, limits and waits."""
    query = f"cursor={cursor}&limit={limit}&wait={wait}"
    if repeat:
        query += f"&cursor={limit}&limit={cursor}"
    target = lib_path("a") + f"/{endpoint}?".encode() + query.replace(" ", "%20").encode()
    reply = check(world, Probe("query", b"GET", target, b"", world.alice.token))
    if endpoint == "changes" and reply.status == 200:
        page = reply.json()
        assert 0 <= page["cursor"] <= world.alice.snapshot()[0]


WRITE_ENDPOINTS = ["commit", "put", "restore", "undelete"]
READ_ENDPOINTS = ["info", "changes", "missing", "batch", "get", "manifest", "entry", "trash"]


def endpoint_request(world: World, library: str, which: str) -> tuple[bytes, bytes, bytes]:
    """A request that is valid for library `library`'s owner: (method, target, body)."""
    lib = lib_path(library)
    chunk = world.alice_chunk if library == "a" else world.mallory_chunk
    entry = world.file_a["id"] if library == "a" else ROOT_ID
    key = {"key": new_id(), "device": "d"}
    return {
        "info": (b"GET", lib, b""),
        "changes": (b"GET", lib + b"/changes?cursor=0", b""),
        "missing": (b"POST", lib + b"/chunks/missing", dump({"hashes": [chunk.hash]})),
        "batch": (b"POST", lib + b"/chunks/batch", dump({"hashes": [chunk.hash]})),
        "get": (b"GET", lib + f"/chunks/{chunk.hash}".encode(), b""),
        "manifest": (b"GET", lib + f"/manifests/{world.file_a['manifest']}".encode(), b""),
        "entry": (b"GET", lib + f"/entries/{entry}".encode(), b""),
        "trash": (b"GET", lib + b"/trash", b""),
        "commit": (
            b"POST",
            lib + b"/commit",
            dump({**key, "ops": [op_create(new_id(), ROOT_ID, new_id(), "dir", 0o755, 1)]}),
        ),
        "put": (b"PUT", lib + f"/chunks/{protocol.hash_bytes(b'new')}".encode(), b"new"),
        "restore": (
            b"POST",
            lib + f"/entries/{entry}/restore".encode(),
            dump({**key, "revision": 1, "base": 1}),
        ),
        "undelete": (b"POST", lib + f"/trash/{entry}/restore".encode(), dump(key)),
    }[which]


@FUZZ
@given(data=st.data())
def test_nobody_reaches_a_library_without_a_role(world: World, data: st.DataObject) -> None:
    """No token, bad tokens, other users' tokens and read-only tokens on otherwise valid requests."""
    which = data.draw(st.sampled_from(WRITE_ENDPOINTS + READ_ENDPOINTS))
    who = data.draw(st.sampled_from(["none", "garbage", "scheme", "mallory", "bob"]))
    method, target, body = endpoint_request(world, "a", which)
    token: str | None = None
    headers: list[tuple[bytes, bytes]] = []
    if who == "garbage":
        token = data.draw(
            st.sampled_from(["", "x", world.alice.token[:-1], world.alice.token + "x", "a" * 5000])
            | st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=60)
        )
        allowed, code = frozenset({401}), "unauthorized"
    elif who == "scheme":
        headers = [(b"Authorization", b"Basic " + world.alice.token.encode())]
        allowed, code = frozenset({401}), "unauthorized"
    elif who == "mallory":
        token = world.mallory.token
        allowed, code = frozenset({404}), "no_such_library"
    elif who == "bob":
        token = world.bob_token
        if which in WRITE_ENDPOINTS:
            allowed, code = frozenset({403}), "read_only"
        else:
            allowed, code = frozenset({200}), None
    else:
        allowed, code = frozenset({401}), "unauthorized"
    probe = Probe("auth", method, target, body, token, headers, allowed, code)
    reply = check(world, probe)
    if who == "mallory":
        assert b"alice" not in reply.body and b"report.txt" not in reply.body


@FUZZ
@given(data=st.data())
def test_replayed_idempotency_keys(world: World, data: st.DataObject) -> None:
    """The same key with the same body answers the first result; with another body, 422."""
    same = data.draw(st.booleans())
    if same:
        body = world.replay_body
    else:
        op = data.draw(
            st.sampled_from(
                [
                    op_create(new_id(), ROOT_ID, "other", "dir", 0o755, 1),
                    op_delete(world.file_a["id"], world.file_a["revision"]),
                    op_rename(world.file_a["id"], world.file_a["revision"], ROOT_ID, "moved"),
                ]
            )
        )
        device = data.draw(st.sampled_from(["d", "another device"]))
        body = {"key": world.replay_key, "device": device, "ops": [op]}
    probe = Probe("replay", b"POST", lib_path("a") + b"/commit", dump(body), world.alice.token)
    before = world.state()
    if same:
        probe.allowed = frozenset({200})
        reply = check(world, probe)
        assert reply.json() == world.replay_answer
        assert world.state() == before, "a replayed commit applied again"
    else:
        probe.allowed, probe.code = frozenset({422}), "idempotency_key_reused"
        check(world, probe)


@FUZZ
@given(
    method=st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"PATCH"]),
    library=st.sampled_from([b"a", b"b"]) | segments,
    tail=st.lists(
        segments | st.sampled_from([b"chunks", b"entries", b"trash", b"restore"]), max_size=4
    ),
    body=st.sampled_from([b"", b"{}", b'{"hashes": []}']) | st.binary(max_size=64),
)
def test_url_path_tricks(
    world: World, method: bytes, library: bytes, tail: list[bytes], body: bytes
) -> None:
    """Odd library names and path segments never reach another library or another file."""
    target = b"/v1/libraries/" + library + b"".join(b"/" + s for s in tail)
    if b"\x00" in target or any(c > 0x7E or c < 0x21 for c in target):
        allowed = frozenset({400, 404, 405, 414, 431})
    else:
        allowed = None
    probe = Probe("url", method, target, body, world.alice.token, allowed=allowed)
    reply = check(world, probe)
    if library not in (b"a",) and reply.status == 200:
        # Only `..`-free paths into library a may succeed for alice.
        raise AssertionError(f"{target!r} answered 200 for a library alice has no role on")


@FUZZ
@given(
    which=st.sampled_from(["restore", "undelete", "versions", "entry"]),
    entry=st.sampled_from([ROOT_ID, new_id(), "..", "%2e%2e", "..%2f..%2fmeta.sqlite"]),
    revision=numbers,
    base=numbers,
    key=st.sampled_from(["k", "", None, 5, "x" * 300]),
)
def test_restores_with_bad_fields(
    world: World, which: str, entry: str, revision: Any, base: Any, key: Any
) -> None:
    """Version and trash restores with odd ids, revisions, bases and keys."""
    lib = lib_path("a")
    body = dump({"revision": revision, "base": base, "key": key, "device": "d"})
    method, target = {
        "restore": (b"POST", lib + f"/entries/{entry}/restore".encode()),
        "undelete": (b"POST", lib + f"/trash/{entry}/restore".encode()),
        "versions": (b"GET", lib + f"/entries/{entry}/versions".encode()),
        "entry": (b"GET", lib + f"/entries/{entry}".encode()),
    }[which]
    if which == "undelete":
        body = dump({"key": key, "device": "d"})
    probe = Probe("restore", method, target, body, world.alice.token)
    if method == b"POST":
        probe.allowed = frozenset({400, 404, 409, 422})
    check(world, probe)


def test_hash_lists_over_the_limit(world: World) -> None:
    """More hashes than a query may carry: 413, not work proportional to the list."""
    hashes = [
        protocol.hash_bytes(str(i).encode()) for i in range(protocol.MAX_HASHES_PER_QUERY + 1)
    ]
    for which in ("missing", "batch"):
        target = lib_path("a") + f"/chunks/{which}".encode()
        probe = Probe("hash-list", b"POST", target, dump({"hashes": hashes}), world.alice.token)
        probe.allowed, probe.code = frozenset({413}), "too_many_hashes"
        check(world, probe)


def test_a_chunk_over_the_limit_sent_in_full_is_refused(world: World) -> None:
    """A body that really is one byte over max_chunk_size (chunked, no Content-Length)."""
    data = os.urandom(protocol.MAX_CHUNK_SIZE + 1)
    size = hex(len(data))[2:].encode()
    body = size + b"\r\n" + data + b"\r\n0\r\n\r\n"
    target = lib_path("a") + f"/chunks/{protocol.hash_bytes(data)}".encode()
    headers = [(b"Transfer-Encoding", b"chunked")]
    probe = Probe("chunk-put", b"PUT", target, body, world.alice.token, headers)
    before = world.state()
    reply = _send_without_length(world, probe)
    assert reply.status == 413, reply.body[:300]
    assert reply.json()["error"] == "payload_too_large"
    assert world.state() == before
    check_files(world)


def _send_without_length(world: World, probe: Probe) -> Reply:
    SENT[probe.family] += 1
    head = [
        probe.method + b" " + probe.target + b" HTTP/1.1",
        b"Host: fuzz",
        b"Authorization: Bearer " + (probe.token or "").encode(),
        *(k + b": " + v for k, v in probe.headers),
        b"Connection: close",
    ]
    return _exchange(world.server.port, b"\r\n".join(head) + b"\r\n\r\n" + probe.body)
