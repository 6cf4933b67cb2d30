"""Whether the drive can reach its server right now, and when to try again.

One `Connectivity` object per mount. Anything that talks to the server
reports the outcome: a `ServerUnreachable` flips the drive offline at once
(reads of uncached content then fail fast instead of hanging, the journal
grows), and the next success flips it back. The pull loop probes with
`probe_delay()` while offline; because it reports success only after it has
applied the catch-up page of the change feed, an uploader blocked in
`wait_online()` resumes after the pull -- pull first, push second.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

import trio

log = logging.getLogger(__name__)

#: Probe schedule while offline: first retry after PROBE_FIRST s, doubling up to PROBE_CAP s.
PROBE_FIRST = 0.5
PROBE_CAP = 15.0


@dataclass(frozen=True, slots=True)
class ConnectivityStatus:
    """A snapshot for `ferry status`."""

    online: bool
    since: float  # wall-clock time of the last change between online and offline
    last_error: str | None
    failures: int  # consecutive failures since the last success


class Connectivity:
    """The drive's online/offline state, shared by every task of the mount."""

    def __init__(self, *, online: bool = True) -> None:
        self.online = online
        self.since = time.time()
        self.last_error: str | None = None
        self.failures = 0
        #: time.monotonic() before which probes would only be turned away (Retry-After).
        self.not_before = 0.0
        self._changed = trio.Event()

    def report_failure(self, exc: BaseException) -> None:
        """The server could not be reached: go offline (once) and remember why."""
        self.failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        retry_after = getattr(exc, "retry_after", None)
        if retry_after:
            self.not_before = max(self.not_before, time.monotonic() + retry_after)
        if self.online:
            log.warning(
                "server unreachable, working offline (local changes are kept and uploaded "
                "when it is back): %s",
                exc,
            )
            self._set(False)

    def report_success(self) -> None:
        """The server answered: go online (once)."""
        self.failures = 0
        if not self.online:
            log.warning(
                "server reachable again, back online after %.0f s", time.time() - self.since
            )
            self._set(True)

    def note_error(self, message: str) -> None:
        """Remember a problem that is not about reachability (a refusal), for `ferry status`."""
        self.last_error = message

    def probe_delay(self) -> float:
        """Seconds to wait before the next probe: exponential backoff with jitter, and no
        sooner than the server asked (Retry-After)."""
        ceiling = min(PROBE_CAP, PROBE_FIRST * 2 ** max(0, self.failures - 1))
        return max(random.uniform(ceiling / 2, ceiling), self.not_before - time.monotonic())

    async def wait_online(self) -> None:
        """Return once the drive is online (at once if it is)."""
        while not self.online:
            await self._changed.wait()

    async def wait_offline(self) -> None:
        """Return once the drive is offline (at once if it is)."""
        while self.online:
            await self._changed.wait()

    def statistics(self) -> ConnectivityStatus:
        return ConnectivityStatus(self.online, self.since, self.last_error, self.failures)

    def _set(self, online: bool) -> None:
        self.online = online
        self.since = time.time()
        self._changed.set()
        self._changed = trio.Event()
