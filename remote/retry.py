"""When and how long the client waits before retrying a request.

Only transient failures are retried: the connection could not be made or
died mid-way, or a gateway in front of the server said it is briefly
unavailable (502/503/504). Every request the client makes is safe to repeat
(chunk uploads are content-addressed, commits carry an idempotency key), so a
retry can never apply a change twice.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

#: HTTP statuses that mean "try again shortly", not "the server refused". 429: the server
#: blocks this address for a while after failed authentications (a device sharing the
#: address with a misconfigured one); the drive goes offline and probes until it lifts.
TRANSIENT_STATUSES: frozenset[int] = frozenset({429, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter: attempt n waits up to min(cap, first * 2**n)."""

    first: float = 0.1
    cap: float = 5.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt` (0-based)."""
        ceiling = min(self.cap, self.first * (2**attempt))
        return random.uniform(ceiling / 2, ceiling)
