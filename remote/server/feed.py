"""Wake long-polling change-feed readers when a library changes.

One `trio.Event` per library that has waiters. A commit calls `notify`,
which sets the event (waking every waiter at once) and forgets it, so the
next waiter gets a fresh one. Readers take the event *before* they look at
the store and await it only if they found nothing: with no await between the
two, a commit cannot slip in unseen.
"""

from __future__ import annotations

import trio


class ChangeNotifier:
    """Per-library wake-ups for the long-poll form of the change feed."""

    def __init__(self) -> None:
        self._events: dict[int, trio.Event] = {}

    def event(self, library_id: int) -> trio.Event:
        """The event the next change of `library_id` will set."""
        event = self._events.get(library_id)
        if event is None:
            event = self._events[library_id] = trio.Event()
        return event

    def notify(self, library_id: int) -> None:
        event = self._events.pop(library_id, None)
        if event is not None:
            event.set()

    def wake_all(self) -> None:
        """Release every waiter (at shutdown) so long polls answer instead of holding it up."""
        events, self._events = self._events, {}
        for event in events.values():
            event.set()
