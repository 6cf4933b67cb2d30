"""Security defaults (issue 9), each against the real thing.

- the client refuses to carry a token over plain http:// to another host
  unless told to (`--insecure-http`, `insecure_http = true`), and verifies
  https:// servers against the system's CAs or `--ca-file`;
- `ferry serve --certfile --keyfile` serves TLS (a self-signed certificate made
  here with the openssl command): a client with the CA file works, one without
  gets a certificate error, plain HTTP to the TLS port gets nothing;
- tokens are stored as sha256 only and the server keeps no raw token;
- failed authentication is limited per client address: 429 with Retry-After;
- drive cache dirs, server data dirs and `ferry up`'s config dir are 0700,
  its token file 0600, and a loose existing cache dir is tightened;
- a mount lets other users in only with `--allow-other`.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import socket
import sqlite3
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
import trio

from remote import protocol
from remote.client import RemoteClient
from remote.errors import ServerUnreachable
from remote.retry import Backoff
from remote.server import admin
from remote.server.ratelimit import AuthFailureLimiter, client_key
from remote.transport_policy import TransportRefused
from tests.conftest import Library
from tests.support import ServerProcess, ferry, wait_for

if TYPE_CHECKING:
    from tests.mounts import DriveFactory

pytest_plugins = ["tests.mounts"]

FAST = Backoff(first=0.01, cap=0.05)


# --- the client's transport policy --------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "127.1.2.3", "[::1]", "localhost", "LOCALHOST", "a.localhost", "0.0.0.0"],
)
async def test_loopback_http_needs_no_flag(host: str) -> None:
    async with RemoteClient(f"http://{host}:8800", "docs", "t"):
        pass


@pytest.mark.parametrize(
    "url",
    [
        "http://192.0.2.1:8800",
        "http://files.example.org",
        "http://[2001:db8::1]:8800",
        "http://127.0.0.1.example.org",
        "HTTP://10.0.0.1",
    ],
)
async def test_plain_http_to_another_host_is_refused_unless_asked_for(url: str) -> None:
    with pytest.raises(TransportRefused, match="--insecure-http") as info:
        RemoteClient(url, "docs", "secret-token")
    assert "secret-token" not in str(info.value)
    async with RemoteClient(url, "docs", "t", insecure_http=True):
        pass


def test_other_schemes_and_bad_ca_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TransportRefused, match="https://"):
        RemoteClient("ftp://127.0.0.1", "docs", "t")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    for ca_file in (junk, tmp_path / "missing.pem"):
        with pytest.raises(TransportRefused, match=f"CA file {ca_file}"):
            RemoteClient("https://127.0.0.1:1", "docs", "t", ca_file=ca_file)


def test_ferry_mount_refuses_plain_http_before_reading_the_token(tmp_path: Path) -> None:
    """The flag and the config key both let the URL past the check (it then stops at the
    token file, which does not exist: proof that the check passed, with no network)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    missing = str(tmp_path / "no-token")
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    url = "http://192.0.2.1:8800/docs"
    refused = ferry("mount", url, str(mnt), "--token-file", missing, check=False, env=env)
    assert refused.returncode == 2
    assert "--insecure-http" in refused.stderr and "no-token" not in refused.stderr
    flag = ferry(
        "mount", url, str(mnt), "--token-file", missing, "--insecure-http", check=False, env=env
    )
    assert flag.returncode == 2 and "cannot read token file" in flag.stderr, flag.stderr
    config = tmp_path / "config" / "ferry" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text("insecure_http = true\n")
    keyed = ferry("mount", url, str(mnt), "--token-file", missing, check=False, env=env)
    assert keyed.returncode == 2 and "cannot read token file" in keyed.stderr, keyed.stderr
    config.write_text('insecure_http = "yes"\n')
    typo = ferry("mount", url, str(mnt), "--token-file", missing, check=False, env=env)
    assert typo.returncode == 2 and "must be true or false" in typo.stderr, typo.stderr


def test_fstab_options_carry_the_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from vfs.commands import fstab_main

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    url, token = "http://192.0.2.1:8800/docs", f"token_file={tmp_path / 'no-token'}"
    assert fstab_main([url, str(mnt), "-o", token]) == 2
    assert "--insecure-http" in capsys.readouterr().err
    assert fstab_main([url, str(mnt), "-o", f"{token},insecure_http,allow_other"]) == 2
    assert "cannot read token file" in capsys.readouterr().err


# --- TLS ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key (PEM files)."""
    if shutil.which("openssl") is None:
        pytest.fail(
            "the openssl command is needed to make a test certificate (apt-get install openssl)"
        )
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=ferry test",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],  # fmt: skip
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture
def tls_library(tmp_path: Path, certificate: tuple[Path, Path]) -> Iterator[Library]:
    """A library on a `ferry serve` that speaks only https://, with a self-signed certificate."""
    cert, key = certificate
    server = ServerProcess(
        tmp_path / "server-data",
        args=("--certfile", str(cert), "--keyfile", str(key)),
        scheme="https",
        verify=ssl.create_default_context(cafile=str(cert)),
    )
    server.start()
    try:
        token = server.add_user("alice")
        server.admin("add-library", "docs", "--owner", "alice")
        yield Library(server, "docs", "alice", token)
    finally:
        server.stop()


async def test_tls_server_with_a_self_signed_certificate(
    tls_library: Library, certificate: tuple[Path, Path]
) -> None:
    cert, _ = certificate
    url, token = tls_library.server.url, tls_library.token
    async with RemoteClient(url, "docs", token, ca_file=cert) as client:
        assert (await client.library_info())["role"] == "owner"
    async with RemoteClient(url, "docs", token, retries=1, backoff=FAST) as untrusting:
        with pytest.raises(ServerUnreachable, match="TLS certificate not trusted.*--ca-file"):
            await untrusting.library_info()
    plain = url.replace("https://", "http://")
    async with RemoteClient(plain, "docs", token, retries=1, backoff=FAST) as cleartext:
        with pytest.raises(ServerUnreachable):
            await cleartext.library_info()
    async with httpx.AsyncClient(timeout=5) as raw:
        with pytest.raises(httpx.TransportError):
            await raw.get(f"{plain}/v1/capabilities")
    offered = await trio.to_thread.run_sync(_negotiated_protocol, tls_library.server.port, cert)
    assert offered == "http/1.1"  # the protocol's; hypercorn's h2 is several times slower


async def test_chunks_come_over_tls_on_the_raw_path(
    tls_library: Library, certificate: tuple[Path, Path]
) -> None:
    """Chunk downloads over https:// skip httpx too (remote/chunk_download.py `_TLSChannel`),
    with the same certificate checks: an untrusted server gets the httpx path's clear error."""
    cert, _ = certificate
    url, token = tls_library.server.url, tls_library.token
    blobs = [os.urandom(n) for n in (1, 16 * 1024 + 1, 1024 * 1024, 4 * 1024 * 1024)]
    hashes = [protocol.hash_bytes(b) for b in blobs]
    async with RemoteClient(url, "docs", token, ca_file=cert) as client:
        await client.put_chunks(list(zip(hashes, blobs, strict=True)))
        assert await client.download_chunks(hashes) == blobs
        assert await client.get_chunk(hashes[2]) == blobs[2]
        assert client._raw is not None and client._raw.requests == 2
    async with RemoteClient(url, "docs", token, retries=1, backoff=FAST) as untrusting:
        with pytest.raises(ServerUnreachable, match="TLS certificate not trusted"):
            await untrusting.download_chunks(hashes[:1])
        assert untrusting._raw is not None and untrusting._raw.requests == 0


def _negotiated_protocol(port: int, cert: Path) -> str | None:
    """What the server picks when a client offers h2 and http/1.1 (ALPN), as curl does."""
    context = ssl.create_default_context(cafile=str(cert))
    context.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return tls.selected_alpn_protocol()


@pytest.mark.mount
def test_mount_over_tls_with_a_ca_file(
    tls_library: Library, certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    from tests.mounts import mount_drive

    cert, _ = certificate
    token_file = tmp_path / "token"
    token_file.write_text(tls_library.token + "\n")
    untrusting_mnt = tmp_path / "untrusting"
    untrusting_mnt.mkdir()
    try:
        refused = ferry(
            "mount", tls_library.url, str(untrusting_mnt), "--token-file", str(token_file),
            "--cache-dir", str(tmp_path / "untrusting-cache"), check=False, timeout=60,
        )  # fmt: skip
    finally:
        if os.path.ismount(untrusting_mnt):  # it must not mount; if it did, leave nothing behind
            ferry("unmount", str(untrusting_mnt), check=False)
            subprocess.run(["fusermount3", "-u", "-z", str(untrusting_mnt)], capture_output=True)
    assert refused.returncode == 1, refused.stderr
    assert "TLS certificate not trusted" in refused.stderr and "--ca-file" in refused.stderr
    assert not os.path.ismount(untrusting_mnt)
    drive = mount_drive(
        tls_library,
        tmp_path / "mnt",
        tmp_path / "cache",
        extra_args=("--writeback-delay", "0.2", "--ca-file", str(cert)),
    )
    try:
        (drive.mountpoint / "over-tls.txt").write_bytes(b"sealed")
        drive.sync()
        listing = httpx.get(
            f"{tls_library.server.url}/v1/libraries/docs/changes",
            headers={"Authorization": f"Bearer {tls_library.token}"},
            verify=ssl.create_default_context(cafile=str(cert)),
        ).json()
        assert "over-tls.txt" in {entry["name"] for entry in listing["entries"]}
        drive.unmount()
    finally:
        drive.cleanup()


# --- tokens at rest -----------------------------------------------------------------------


def test_tokens_are_stored_only_as_sha256(tmp_path: Path) -> None:
    data = tmp_path / "data"
    token = admin.add_user(data, "alice")
    second = admin.add_token(data, "alice")
    with sqlite3.connect(data / "meta.sqlite") as db:
        stored = {row[0] for row in db.execute("SELECT token_hash FROM tokens")}
    assert stored == {hashlib.sha256(t.encode()).hexdigest() for t in (token, second)}
    for path in data.rglob("*"):
        if path.is_file():
            raw = path.read_bytes()
            assert token.encode() not in raw and second.encode() not in raw, path


async def test_the_server_keeps_no_raw_token_in_memory(tmp_path: Path) -> None:
    from remote.server.app import FerryApp

    token = admin.add_user(tmp_path / "data", "alice")
    admin.add_library(tmp_path / "data", "docs", "alice")
    with admin.open_stores(tmp_path / "data") as (meta, chunks):
        app = FerryApp(meta, chunks)
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            assert (await http.get("/v1/libraries/docs", headers=headers)).status_code == 200
        assert token not in app._users
        assert hashlib.sha256(token.encode()).hexdigest() in app._users


# --- failed authentication, limited -------------------------------------------------------


def test_limiter_counts_per_address_in_bounded_memory() -> None:
    now = [0.0]
    limiter = AuthFailureLimiter(3, 10.0, max_addresses=4, clock=lambda: now[0])
    for _ in range(2):
        limiter.record_failure("10.0.0.1")
    assert limiter.retry_after("10.0.0.1") is None
    limiter.record_failure("10.0.0.1")
    assert limiter.retry_after("10.0.0.1") == pytest.approx(10.0)
    assert limiter.retry_after("10.0.0.2") is None
    now[0] = 10.5
    assert limiter.retry_after("10.0.0.1") is None
    # a fixed window: two failures, a pause past the window, two more: not blocked
    limiter.record_failure("10.0.0.3")
    limiter.record_failure("10.0.0.3")
    now[0] = 21.0
    limiter.record_failure("10.0.0.3")
    limiter.record_failure("10.0.0.3")
    assert limiter.retry_after("10.0.0.3") is None
    # IPv6 is counted per /64: walking through the addresses of one network does not help
    for suffix in ("1", "2", "beef"):
        limiter.record_failure(f"2001:db8:1:2::{suffix}")
    assert limiter.retry_after("2001:db8:1:2::ffff") is not None
    assert limiter.retry_after("2001:db8:1:3::1") is None
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
    for n in range(1000):
        limiter.record_failure(f"10.1.{n // 256}.{n % 256}")
    assert len(limiter._failures) <= 4 and len(limiter._blocked) <= 4
    assert not AuthFailureLimiter(0).enabled


def _client(server: ServerProcess, source: str, token: str | None) -> httpx.Client:
    """An HTTP client whose connections come from `source` (any 127.x address is this host)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    transport = httpx.HTTPTransport(local_address=source)
    return httpx.Client(base_url=server.url, headers=headers, transport=transport, timeout=30)


def test_a_burst_of_bad_tokens_is_answered_429(tmp_path: Path) -> None:
    window = 6.0
    server = ServerProcess(
        tmp_path / "server-data", args=("--auth-failures", "5", "--auth-window", str(window))
    )
    server.start()
    try:
        good = server.add_user("alice")
        server.admin("add-library", "docs", "--owner", "alice")
        path = "/v1/libraries/docs"
        with (
            _client(server, "127.0.0.1", "guess") as attacker,
            _client(server, "127.0.0.1", good) as neighbour,
            _client(server, "127.0.0.1", None) as anonymous,
            _client(server, "127.0.0.2", good) as elsewhere,
            _client(server, "127.0.0.2", "typo") as elsewhere_bad,
        ):
            # successes are never counted, however many
            for _ in range(20):
                assert neighbour.get(path).status_code == 200
            started = time.monotonic()
            assert [attacker.get(path).status_code for _ in range(5)] == [401] * 5
            assert time.monotonic() - started < window, "the machine is too slow for this window"
            blocked = attacker.get(path)
            assert blocked.status_code == 429
            assert blocked.json()["error"] == "too_many_failures"
            assert "127.0.0.1" in blocked.json()["message"]
            assert 1 <= int(blocked.headers["retry-after"]) <= window
            # policy: a blocked address is refused with any token, unchecked ...
            assert neighbour.get(path).status_code == 429
            # ... but requests without credentials and other addresses go on
            assert anonymous.get("/v1/capabilities").status_code == 200
            assert elsewhere.get(path).status_code == 200
            assert elsewhere_bad.get(path).status_code == 401
            # the block lifts after the window
            wait_for(
                lambda: neighbour.get(path).status_code == 200,
                timeout=window + 10,
                what="the block to lift",
            )
            assert attacker.get(path).status_code == 401
        assert "failed authentications from 127.0.0.1" in server.log()
    finally:
        server.stop()


# --- private directories ------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_server_data_dirs_are_private(tmp_path: Path) -> None:
    fresh = tmp_path / "new" / "parents" / "data"
    admin.add_user(fresh, "alice")
    assert [_mode(p) for p in (fresh, fresh.parent, fresh.parent.parent)] == [0o700] * 3
    loose = tmp_path / "loose"
    loose.mkdir()
    os.chmod(loose, 0o755)
    admin.add_user(loose, "alice")
    assert _mode(loose) == 0o700


def test_ferry_up_keeps_its_token_and_state_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vfs import up

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    paths = up.UpPaths.default()
    up.make_private_dir(paths.data_dir)
    up.ensure_account(paths)
    assert _mode(paths.token_file) == 0o600
    assert _mode(paths.token_file.parent) == 0o700
    assert _mode(paths.data_dir) == 0o700 and _mode(paths.data_dir.parent) == 0o700


# --- who may enter a mount ----------------------------------------------------------------

#: Runs as uid/gid 65534 after opening the mountpoint as root (pytest's tmp dirs are not
#: searchable by others, so the path itself cannot be walked after dropping privileges).
_OTHER_USER_PROBE = """
import os, sys
top = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
os.setgroups([]); os.setgid(65534); os.setuid(65534)
try:
    names = os.listdir(top)
    print("listed", sorted(names))
    print(os.read(os.open("public.txt", os.O_RDONLY, dir_fd=top), 100).decode())
except OSError as exc:
    print("errno", exc.errno)
"""


def _as_other_user(mountpoint: Path) -> list[str]:
    probe = [sys.executable, "-c", _OTHER_USER_PROBE, str(mountpoint)]
    done = subprocess.run(probe, capture_output=True, text=True, timeout=30, check=True)
    return done.stdout.splitlines()


@pytest.mark.mount
def test_only_the_mounting_user_enters_without_allow_other(
    drive_factory: DriveFactory, library: Library, tmp_path: Path
) -> None:
    from tests.mounts import mount_drive

    loose_cache = tmp_path / "a-cache"
    loose_cache.mkdir()
    os.chmod(loose_cache, 0o777)
    private = drive_factory("a")
    (private.mountpoint / "public.txt").write_text("hello")
    os.chmod(private.mountpoint / "public.txt", 0o644)
    assert _as_other_user(private.mountpoint) == [f"errno {errno.EACCES}"]
    assert _mode(loose_cache) == 0o700
    assert "made it private" in private.log()
    private.sync()

    nested_cache = tmp_path / "fresh" / "b-cache"  # the last --cache-dir wins
    shared = mount_drive(
        library,
        tmp_path / "b-mnt",
        tmp_path / "b-cache",
        extra_args=("--writeback-delay", "0.2", "--allow-other", "--cache-dir", str(nested_cache)),
    )
    try:
        wait_for(lambda: (shared.mountpoint / "public.txt").exists(), what="the file on b")
        assert _as_other_user(shared.mountpoint) == ["listed ['public.txt']", "hello"]
        assert _mode(nested_cache) == 0o700 and _mode(nested_cache.parent) == 0o700
        shared.unmount()
    finally:
        shared.cleanup()
