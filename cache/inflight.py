"""One fetch per key, however many tasks ask at once.

The first task to ask for a key runs the work (it is the leader); every other
task asking meanwhile waits for the leader's outcome and gets the same bytes,
or the same exception. If the leader is cancelled before it finishes, the
waiters are not failed with the leader's cancellation: one of them becomes the
new leader and runs the work itself.

`run_many` leads several keys with one piece of work (a batch download): all
of them are registered before the work starts, so a task asking for any one
waits for the batch and gets that key's own result or exception.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import trio


class _Flight:
    """The outcome of one run of the work, once `done` is set."""

    __slots__ = ("done", "result", "error", "abandoned")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: bytes | None = None
        self.error: BaseException | None = None
        self.abandoned = False


class InFlight:
    """A map from key to the single running piece of work for it."""

    def __init__(self) -> None:
        self._flights: dict[str, _Flight] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._flights

    def __len__(self) -> int:
        return len(self._flights)

    async def run(self, key: str, work: Callable[[], Awaitable[bytes]]) -> bytes:
        """The result of `work()` for `key`, running it only if no other task already is."""
        while True:
            flight = self._flights.get(key)
            if flight is None:
                return await self._lead(key, work)
            await flight.done.wait()
            if flight.abandoned:
                continue
            if flight.error is not None:
                raise flight.error
            assert flight.result is not None
            return flight.result

    async def run_many(
        self,
        keys: Sequence[str],
        work: Callable[[list[str]], Awaitable[dict[str, bytes | BaseException]]],
    ) -> None:
        """Run `work(led)` once as the leader of `led`: those of `keys` nobody runs yet.

        `work` answers each led key's bytes or exception; a key it leaves out
        fails with KeyError. Keys already in flight are left to their leader.
        If `work` raises, every led key fails with that exception (and it
        propagates); if it is cancelled, waiters take the work over one by one.
        """
        led = [key for key in dict.fromkeys(keys) if key not in self._flights]
        if not led:
            return
        flights = {key: _Flight() for key in led}
        self._flights.update(flights)  # no await since the check above
        try:
            outcome = await work(led)
        except trio.Cancelled:
            for flight in flights.values():
                flight.abandoned = True
            raise
        except BaseException as exc:
            for flight in flights.values():
                flight.error = exc
            raise
        else:
            for key, flight in flights.items():
                got = outcome.get(key, KeyError(f"the batch ended without {key}"))
                if isinstance(got, BaseException):
                    flight.error = got
                else:
                    flight.result = got
        finally:
            for key, flight in flights.items():
                del self._flights[key]
                flight.done.set()

    async def _lead(self, key: str, work: Callable[[], Awaitable[bytes]]) -> bytes:
        flight = self._flights[key] = _Flight()
        try:
            flight.result = await work()
            return flight.result
        except trio.Cancelled:
            flight.abandoned = True
            raise
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            del self._flights[key]
            flight.done.set()
