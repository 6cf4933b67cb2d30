"""When and how long the client waits before retrying a request.

Only transient failures are retried: the connection could not be made or
died mid-way, or a gateway in front of the server said it is briefly
unavailable (502/503/504), or the server is limiting this address (429). A
`Retry-After` on such an answer is honoured: waited out between retries when
short, else the request ends at once and the drive's probes wait that long
(`vfs/sync/online.py`). Every request the client makes is safe to repeat
(chunk uploads are content-addressed, commits carry an idempotency key), so a
retry can never apply a change twice.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

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


#: A Retry-After up to this many seconds is waited out inside the request's own retries;
#: a longer one ends the request at once (the drive goes offline and probes no sooner).
RETRY_AFTER_INLINE = 5.0


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds a `Retry-After` header asks the client to wait, or None when it says nothing
    usable. Both forms of RFC 9110: delay-seconds ("120") and an HTTP-date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000" and obsolete forms: HTTP dates are always UTC
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
