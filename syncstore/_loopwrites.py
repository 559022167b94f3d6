"""Deliveries for an event loop: many independent deliveries in one lock hold, each acknowledged through a callback.

A mixin of :class:`~syncstore._writer.Writer`, split from it by capability.
:mod:`syncstore.aio` collects the ``deliver`` calls its coroutines make during
one pass of the event loop and hands them here together.  Each is sequenced
exactly as :meth:`Writer.deliver` sequences one -- its own idempotency
decision (new, duplicate, or :class:`IdempotencyConflict` for that item
alone), its msg_id, cursors, frame and overlay entry -- but the batch shares
one acquisition of the sequencing lock, one LMDB read transaction and one
wake-up of the flusher.  Instead of a blocked thread, each pending delivery
puts a *releasable* (an object with ``release(error)``) into the writer's
heap of waiters; the flusher calls it when the LSN is acknowledged (``error``
None) or can never be (the error), from the flusher's thread, sequencing lock
held -- so ``release`` must only hand the news over (the event loop's side
posts it to the loop: :mod:`syncstore.aio`).

``blocking=False`` is for the event loop thread itself: if anything would make
it wait -- back-pressure, the sequencing lock held by another thread (the
applier forgetting a batch, a ``check()``, a ``promote``), the LMDB gate
closed for a map resize -- nothing is done and None is returned, and the
caller hands the batch to a thread that may wait (``blocking=True``).
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import lmdb

from ._codec import Pairs
from .errors import SyncStoreError
from .model import Message

if TYPE_CHECKING:
    from ._idempotency import Idempotency
    from ._overlay import Overlay
    from .errors import StoreFull
    from .state import State

__all__ = ["LoopDeliveries", "Releasable", "Outcome"]

#: What sequencing a message yields: (msg_id, duplicate, pairs) -- as Writer.Sequenced.
_Sequenced = tuple[int, bool, Pairs]


class Releasable(Protocol):
    """A waiter in the writer's heap: told once, by the flusher, that its LSN is acknowledged (None) or failed."""

    def release(self, error: SyncStoreError | None) -> None: ...


#: Per item of :meth:`LoopDeliveries.deliver_each`: done now (the sequenced result: a duplicate of
#: an acknowledged delivery), refused (the error; nothing of it was written), or pending (its waiter).
Outcome = _Sequenced | SyncStoreError | Releasable


class LoopDeliveries:
    """:meth:`deliver_each` of the module docstring; relies on the Writer's lock, state, overlay and heap."""

    lock: threading.Lock
    overlay: Overlay
    acked_lsn: int
    _state: State
    _idempotency: Idempotency
    _apply_full: StoreFull | None
    _flusher_idle: bool
    _work: threading.Condition
    _waiters: list[tuple[int, int, Releasable]]
    _tiebreak: itertools.count[int]

    if TYPE_CHECKING:

        def _backpressure(self) -> None: ...
        def _check_writable(self) -> None: ...
        def _sequence(
            self, txn: lmdb.Transaction, message: Message, recipients: tuple[int, ...], head_of: Callable[[int], int], notify: bool = True
        ) -> tuple[int, bool, Pairs, int]: ...

    def must_wait(self) -> bool:
        """Whether a delivery sequenced now would first wait for back-pressure (or re-probe a full LMDB disk)."""
        from ._writer import _MAX_PENDING  # noqa: PLC0415 - the writer's constant, one definition

        return self._apply_full is not None or len(self.overlay) >= _MAX_PENDING

    def deliver_each(
        self,
        items: Sequence[tuple[Message, tuple[int, ...]]],
        waiter: Callable[[int, _Sequenced], Releasable],
        *,
        blocking: bool,
    ) -> list[Outcome] | None:
        """Sequence each validated ``(message, recipients)`` as its own delivery; one outcome per item, in order.

        ``waiter(index, sequenced)`` makes the releasable of an item whose LSN
        is not acknowledged yet (called under the sequencing lock, so the
        flusher cannot acknowledge it before it is in the heap).  Raises
        :class:`StoreClosed` or the writer's failure for the whole batch
        (nothing sequenced); ``blocking=False`` returns None instead of
        waiting (module docstring).
        """
        if self.must_wait():
            if not blocking:
                return None
            self._backpressure()
        if not self.lock.acquire(blocking):
            return None
        try:
            self._check_writable()
            reading = self._state.read() if blocking else self._state.read_nowait()
            if reading is None:
                return None
            outcomes: list[Outcome] = []
            acked, heap, tiebreak = self.acked_lsn, self._waiters, self._tiebreak
            with reading as txn:
                head_of, sequence = self._state.head_reader(txn), self._sequence
                for index, (message, recipients) in enumerate(items):
                    try:
                        msg_id, duplicate, pairs, lsn = sequence(txn, message, recipients, head_of, False)
                    except SyncStoreError as error:  # this item only (a conflict): nothing of it was written
                        outcomes.append(error)
                        continue
                    if lsn <= acked:  # a duplicate of an acknowledged delivery
                        outcomes.append((msg_id, duplicate, pairs))
                        continue
                    pending = waiter(index, (msg_id, duplicate, pairs))
                    heapq.heappush(heap, (lsn, next(tiebreak), pending))
                    outcomes.append(pending)
            if self._flusher_idle:
                self._work.notify()
            return outcomes
        finally:
            self.lock.release()
