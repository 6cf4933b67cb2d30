"""The fault proxy in front of a real `ferry serve`: faults show up as the HTTP errors clients see.

This is how issue 9's network-fault tests use it: a client pointed at
`proxy.url` instead of the server's, faults switched while it runs. The
client here is plain httpx, so a failure points at the proxy, not the drive.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from remote import protocol
from tests.conftest import Library
from tools.faultproxy import FaultProxy

CHUNK = os.urandom(1_000_000)
CHUNK_HASH = protocol.hash_bytes(CHUNK)


@pytest.fixture
def proxy(library: Library) -> Iterator[FaultProxy]:
    with FaultProxy(("127.0.0.1", library.server.port)) as proxy:
        yield proxy


@pytest.fixture
def client(library: Library, proxy: FaultProxy) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {library.token}"}
    with httpx.Client(base_url=proxy.url, headers=headers, timeout=5) as client:
        yield client


def chunk_url(library: Library) -> str:
    return protocol.chunk_path(library.name, CHUNK_HASH)


def test_upload_and_download_are_counted_on_the_wire(
    library: Library, proxy: FaultProxy, client: httpx.Client
) -> None:
    client.put(chunk_url(library), content=CHUNK).raise_for_status()
    assert client.get(chunk_url(library)).content == CHUNK
    counted = proxy.counters()
    assert counted["connections"] == 1, "httpx should reuse one keep-alive connection"
    assert len(CHUNK) < counted["bytes_up"] < len(CHUNK) + 2000
    assert len(CHUNK) < counted["bytes_down"] < len(CHUNK) + 2000


def test_cut_response_is_an_incomplete_body_and_the_next_request_works(
    library: Library, proxy: FaultProxy, client: httpx.Client
) -> None:
    client.put(chunk_url(library), content=CHUNK).raise_for_status()
    proxy.set(cut_after=len(CHUNK) // 2)
    with pytest.raises(httpx.RemoteProtocolError, match="incomplete|closed"):
        client.get(chunk_url(library))
    proxy.set(cut_after=len(CHUNK) // 2, cut_with_reset=True)
    with pytest.raises(httpx.ReadError):
        client.get(chunk_url(library))
    proxy.clear()
    assert client.get(chunk_url(library)).content == CHUNK


def test_blackhole_times_out_and_clearing_it_recovers(
    library: Library, proxy: FaultProxy, client: httpx.Client
) -> None:
    assert client.get("/v1/capabilities").status_code == 200
    proxy.set(blackhole=True)
    start = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        client.get("/v1/capabilities", timeout=0.5)
    assert 0.5 <= time.monotonic() - start < 1.5
    proxy.clear()
    assert client.get("/v1/capabilities").status_code == 200


def test_refuse_and_reset_look_like_a_dead_server(
    library: Library, proxy: FaultProxy, client: httpx.Client
) -> None:
    assert client.get("/v1/capabilities").status_code == 200
    proxy.set(refuse=True)
    proxy.reset_all()
    with pytest.raises((httpx.ReadError, httpx.ConnectError, httpx.RemoteProtocolError)):
        client.get("/v1/capabilities")
    proxy.clear()
    assert client.get("/v1/capabilities").status_code == 200


def test_a_killed_server_resets_the_client_and_a_restarted_one_serves_again(
    library: Library, proxy: FaultProxy, client: httpx.Client
) -> None:
    assert client.get("/v1/capabilities").status_code == 200
    library.server.kill()
    with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError, httpx.ConnectError)):
        client.get("/v1/capabilities")
    library.server.start()
    assert client.get("/v1/capabilities").status_code == 200


# -- holds: stop one request (or its answer) at an exact moment -----------------------------


def send_in_thread(fn: Callable[[], httpx.Response]) -> tuple[threading.Thread, list[object]]:
    """Run one blocking request in a thread; its response or exception lands in the list."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(fn())
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def server_has_chunk(library: Library) -> bool:
    """Asked of the server directly, not through the proxy."""
    headers = {"Authorization": f"Bearer {library.token}"}
    with httpx.Client(base_url=library.server.url, headers=headers, timeout=5) as direct:
        answer = direct.post(
            f"{protocol.library_path(library.name)}/chunks/missing", json={"hashes": [CHUNK_HASH]}
        )
    return answer.raise_for_status().json()["missing"] == []


def test_a_held_request_reaches_nothing_until_released(
    library: Library, proxy: FaultProxy, client: httpx.Client
) -> None:
    held = proxy.hold(r"^PUT /v1/libraries/[^/]+/chunks/")
    thread, outcome = send_in_thread(lambda: client.put(chunk_url(library), content=CHUNK))
    assert held.wait(5), "the upload was not held"
    assert held.lines == [f"PUT {chunk_url(library)} HTTP/1.1"]
    assert client.get("/v1/capabilities").status_code == 200, "other requests still pass"
    time.sleep(0.3)
    assert not server_has_chunk(library), "a held request reached the server"
    assert outcome == []
    held.release()
    thread.join(5)
    assert [type(o) for o in outcome] == [httpx.Response] and server_has_chunk(library)
    client.put(chunk_url(library), content=CHUNK).raise_for_status()  # the hold is over
    assert (held.matched, held.held) == (1, 1)


def test_a_discarded_request_resets_its_client_and_never_arrives(
    library: Library, proxy: FaultProxy, client: httpx.Client
) -> None:
    held = proxy.hold(r"/chunks/", after=1)
    other = protocol.chunk_path(library.name, protocol.hash_bytes(b"first"))
    client.put(other, content=b"first").raise_for_status()  # the first match passes
    thread, outcome = send_in_thread(lambda: client.put(chunk_url(library), content=CHUNK))
    assert held.wait(5)
    held.discard()
    thread.join(5)
    assert [type(o) for o in outcome] in ([httpx.ReadError], [httpx.RemoteProtocolError])
    time.sleep(0.3)
    assert not server_has_chunk(library)
    assert (held.matched, held.held) == (2, 1)


def test_a_held_response_means_the_server_acted_and_the_client_does_not_know(
    library: Library, proxy: FaultProxy, client: httpx.Client
) -> None:
    held = proxy.hold(r"^PUT .*/chunks/", response=True)
    thread, outcome = send_in_thread(lambda: client.put(chunk_url(library), content=CHUNK))
    assert held.wait(5), "no response was held"
    assert server_has_chunk(library), "the request was not forwarded before its answer was held"
    time.sleep(0.3)
    assert outcome == []
    held.discard()
    thread.join(5)
    assert [type(o) for o in outcome] in ([httpx.ReadError], [httpx.RemoteProtocolError])
    assert client.get(chunk_url(library)).content == CHUNK
