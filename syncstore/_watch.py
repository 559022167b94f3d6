"""Who waits for what: long-polls on a user's head, and tails of the change log.

One job: let a thread block until something it cares about becomes durable,
without polling and without holding an LMDB read transaction.  The writer
calls :meth:`Watchers.notify` with the records that just became durable (the
high watermark moved); a thread in :meth:`Store.wait` is woken only when one
of those records reaches its user, and a tail (``changes(follow=True)``) on
every move of the high watermark.  With no waiter registered, notifying costs
one attribute test per group commit.

A waiter is anything with a ``set()`` method: a :class:`threading.Event` for a
thread, or what :mod:`syncstore.aio` registers to wake a coroutine (its
``set`` runs in the notifying thread, under this registry's lock, so it only
posts the news to the event loop).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Protocol

from ._codec import Deliver, Record

__all__ = ["Watchers", "Settable"]


class Settable(Protocol):
    """What waits in :class:`Watchers`: told by ``set()`` that something it may care about happened."""

    def set(self) -> None: ...


class Watchers:
    """Events of threads waiting for a user's head or for any new durable record."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._registered = threading.Condition(self._lock)
        self._users: dict[int, list[Settable]] = {}
        self._tails: list[Settable] = []
        self.active = False  # anyone registered: the writer then looks at what became durable
        self.closed = False  # the store stopped: waiters give up

    def watch_user(self, uid: int) -> threading.Event:
        """Register an event set whenever a durable record reaches ``uid``; :meth:`unwatch` it after."""
        event = threading.Event()
        self.add_user(uid, event)
        return event

    def add_user(self, uid: int, event: Settable) -> None:
        """Register ``event``: set whenever a durable record reaches ``uid``; :meth:`unwatch` it after."""
        with self._lock:
            self._users.setdefault(uid, []).append(event)
            self.active = True
            self._registered.notify_all()

    def watch_log(self) -> threading.Event:
        """Register an event set whenever any record becomes durable."""
        event = threading.Event()
        self.add_tail(event)
        return event

    def add_tail(self, event: Settable) -> None:
        """Register ``event``: set whenever any record becomes durable; :meth:`unwatch` it after."""
        with self._lock:
            self._tails.append(event)
            self.active = True
            self._registered.notify_all()

    def unwatch(self, event: Settable, uid: int | None = None) -> None:
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
