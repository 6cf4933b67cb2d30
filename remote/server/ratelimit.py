"""Failed authentication, limited per client address.

Policy: when one address has presented `max_failures` credentials that did
not verify (answers 401 to requests that carried an `Authorization` header)
within `window` seconds, every request from it that carries credentials is
answered `429 too_many_failures` with a `Retry-After` for the next `window`
seconds, without looking at the token. Looking at it would tell the guesser
whether the guess was right, which is what the limit exists to stop; so a
good token from a blocked address waits out the block too (a device behind
the same NAT as a misconfigured one does). Requests without credentials
(`/v1/capabilities`, probes) are never blocked, successful requests are
never counted or delayed, and other addresses are not affected.

IPv6 clients are counted by their /64 network, which one host or household
usually owns whole, so walking through its addresses does not reset the
count. Memory is bounded: at most `max_addresses` addresses are remembered
(least recently failing first out), each for at most two windows.

Behind a reverse proxy every request comes from the proxy's address, so one
bad client would block everyone: run such a server with
`--auth-failures 0` (no limit here) and limit at the proxy.

It wraps the ASGI app (`AuthFailureLimit(FerryApp(...), limiter)`), so the
app's handlers know nothing about it.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cachetools import TTLCache

from remote.server.asgi import Receive, Scope, Send

log = logging.getLogger(__name__)

DEFAULT_MAX_FAILURES = 100
DEFAULT_WINDOW = 60.0
DEFAULT_MAX_ADDRESSES = 100_000


@dataclass(slots=True)
class _Failures:
    """Failed attempts of one address in the window that began at `since`."""

    since: float
    count: int = 0


class AuthFailureLimiter:
    """Counts failed authentications per address and says how long an address is blocked."""

    def __init__(
        self,
        max_failures: int = DEFAULT_MAX_FAILURES,
        window: float = DEFAULT_WINDOW,
        *,
        max_addresses: int = DEFAULT_MAX_ADDRESSES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures = max_failures
        self.window = window
        self._clock = clock
        # An entry is mutated in place, never re-set, so it expires `window` after its
        # first failure: a fixed window per address.
        self._failures: TTLCache[str, _Failures] = TTLCache(max_addresses, window, timer=clock)
        self._blocked: TTLCache[str, float] = TTLCache(max_addresses, window, timer=clock)

    @property
    def enabled(self) -> bool:
        return self.max_failures > 0

    def retry_after(self, address: str) -> float | None:
        """Seconds until `address` may authenticate again, or None if it may now."""
        if not self._blocked:
            return None  # the common case, checked on every request: no address is blocked
        until = self._blocked.get(client_key(address))
        if until is None:
            return None
        return max(0.0, until - self._clock())

    def record_failure(self, address: str) -> None:
        """One more credential from `address` did not verify; block it at the limit."""
        if not self.enabled:
            return
        key = client_key(address)
        now = self._clock()
        failures = self._failures.get(key)
        if failures is None:
            failures = self._failures[key] = _Failures(since=now)
        failures.count += 1
        if failures.count >= self.max_failures and key not in self._blocked:
            self._blocked[key] = now + self.window
            self._failures.pop(key, None)  # may have expired this very moment
            log.warning(
                "%d failed authentications from %s within %.0f s; refusing its requests for %.0f s",
                failures.count,
                key,
                self.window,
                self.window,
            )


def client_key(address: str) -> str:
    """What an address is counted as: itself, or its /64 network for IPv6."""
    if ":" not in address:
        return address  # IPv4 as the ASGI server reports it (parsing it costs ~10 us a request)
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class AuthFailureLimit:
    """ASGI middleware: 429 for blocked addresses, and counting of 401 answers to credentials."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Any], limiter: AuthFailureLimiter):
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.limiter.enabled or not _has_credentials(scope):
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        address = str(client[0]) if client else "unknown"
        wait = self.limiter.retry_after(address)
        if wait is not None:
            await _send_too_many(send, address, wait)
            return
        status = 0

        async def watch(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, receive, watch)
        if status == 401:
            self.limiter.record_failure(address)


def _has_credentials(scope: Scope) -> bool:
    return any(name.lower() == b"authorization" for name, _ in scope.get("headers", ()))


async def _send_too_many(send: Send, address: str, wait: float) -> None:
    seconds = max(1, math.ceil(wait))
    body = json.dumps(
        {
            "error": "too_many_failures",
            "message": (
                f"too many failed authentications from {client_key(address)}; "
                f"try again in {seconds} s with a valid token"
            ),
            "retry_after": seconds,
        },
        separators=(",", ":"),
    ).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"retry-after", str(seconds).encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    await send({"type": "http.response.start", "status": 429, "headers": headers})
    await send({"type": "http.response.body", "body": body})
