"""Who waits for what: long-polls on a user's head, and tails of the change log.

One job: let a thread block until something it cares about becomes durable,
without polling and without holding an LMDB read transaction.  The writer
calls :meth:`Watchers.notify` with the records that just became durable (the
high watermark moved); a thread in :meth:`Store.wait` is woken only when one
of those records reaches its user, and a tail (``changes(follow=True)``) on
every move of the high watermark.  With no waiter registered, notifying costs
one attribute test per group commit.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from ._codec import Deliver, Record

__all__ = ["Watchers"]


class Watchers:
    """Events of threads waiting for a user's head or for any new durable record."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._registered = threading.Condition(self._lock)
        self._users: dict[int, list[threading.Event]] = {}
        self._tails: list[threading.Event] = []
        self.active = False  # anyone registered: the writer then looks at what became durable
        self.closed = False  # the store stopped: waiters give up

    def watch_user(self, uid: int) -> threading.Event:
        """Register an event set whenever a durable record reaches ``uid``; :meth:`unwatch` it after."""
        event = threading.Event()
        with self._lock:
            self._users.setdefault(uid, []).append(event)
            self.active = True
            self._registered.notify_all()
        return event

    def watch_log(self) -> threading.Event:
        """Register an event set whenever any record becomes durable."""
        event = threading.Event()
        with self._lock:
            self._tails.append(event)
            self.active = True
            self._registered.notify_all()
        return event

    def unwatch(self, event: threading.Event, uid: int | None = None) -> None:
        with self._lock:
            if uid is None:
                self._tails.remove(event)
            else:
                events = self._users[uid]
                events.remove(event)
                if not events:
                    del self._users[uid]
            self.active = bool(self._users or self._tails)

    def wait_registered(self, count: int, timeout: float | None = None) -> bool:
        """Block until at least ``count`` waiters are registered (tests and diagnostics: "is everyone waiting yet?")."""
        with self._lock:
            return self._registered.wait_for(lambda: sum(map(len, self._users.values())) + len(self._tails) >= count, timeout)

    def notify(self, records: Iterable[Record]) -> None:
        """Wake the waiters of the users these newly durable records reach, and every tail."""
        with self._lock:
            for event in self._tails:
                event.set()
            users = self._users
            if not users:
                return
            for record in records:
                if type(record) is Deliver:
                    for uid, _cursor in record.pairs:
                        events = users.get(uid)
                        if events:
                            for event in events:
                                event.set()

    def wake_all(self) -> None:
        """Wake everyone: the store stopped, they give up."""
        with self._lock:
            self.closed = True
            for event in self._tails:
                event.set()
            for events in self._users.values():
                for event in events:
                    event.set()
