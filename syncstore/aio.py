"""The asyncio face of a store: ``store = await syncstore.aio.open(path)``, then ``await store.deliver(...)``.

:class:`AsyncStore` has a coroutine twin of every public :class:`~syncstore.store.Store`
method, ``close()`` and ``async with``.  Nothing that can block for long runs on
the event loop's thread, and no thread is parked per pending call:

* **Deliveries** (``deliver``) are the hot path.  A call validates its
  arguments on the loop, queues the message with a new future and awaits it.
  Once per pass of the loop, every delivery queued during that pass is
  sequenced together (:meth:`Writer.deliver_each
  <syncstore._loopwrites.LoopDeliveries.deliver_each>`: each one its own
  delivery, with its own duplicate or conflict answer, but one acquisition of
  the sequencing lock and one LMDB read transaction for all).  Each pending
  delivery leaves a waiter in the writer's heap whose ``release`` the
  group-commit flusher calls when its LSN is acknowledged; that posts the
  news to the loop (one ``call_soon_threadsafe`` per batch of news, not per
  delivery), which completes the future.  Sequencing on the loop thread takes
  the lock only if it is free and the LMDB gate only if it is open, and not at
  all under back-pressure; otherwise the batch goes to the worker thread
  (below), which may wait.  10,000 pending deliveries are 10,000 futures and
  heap entries, no thread each.
* **Waiting** (``wait``, ``changes(follow=True)``, ``feed(follow=True)``)
  registers a signal with the writer's :class:`~syncstore._watch.Watchers`,
  set from the flusher's thread when records become durable and posted to
  the loop the same way: no polling (except in a read-only view, which has
  no writer to wake it: it re-checks every 50 ms, as the threaded API does).
* **Everything else** -- LMDB reads (``sync``, ``head``, ``get``,
  ``history``), reading the log's files, ``deliver_many`` (its back-pressure
  and chunked commit), ``flush``, ``snapshot``, ``check``, consumers' file
  writes, opening and closing -- runs in **one worker thread** owned by the
  AsyncStore, in the order called; the caller awaits a future.  One thread
  keeps the store's thread count fixed; the price is that a long call (a
  ``check()`` or a ``snapshot()`` of a large store) delays the calls queued
  behind it -- not deliveries, which do not pass through it.

Cancelling a coroutine never loses a write and leaks nothing: a ``deliver``
cancelled before its batch was sequenced writes nothing; after, the message
is written and acknowledged as usual (retrying with the same ``client_seq``
returns it as a duplicate); a cancelled ``wait`` or follow unregisters its
signal.  ``close()`` refuses new calls (:class:`StoreClosed`), fails
deliveries not yet sequenced with :class:`StoreClosed` (nothing of them is
written), lets every sequenced one be acknowledged (or fail) as
:meth:`Store.close` does, wakes waiters (``wait`` returns False, follows
end), and stops the worker.  An AsyncStore belongs to the event loop that
opened it.  docs/design.md ("The asyncio API") tells the design.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import os
import queue
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

from . import feed as _feed
from . import store as _store
from ._loopwrites import Outcome, Releasable
from ._walread import LogRetired
from ._watch import Watchers
from .changelog import VIEW_POLL_S, Consumer
from .errors import StoreClosed, SyncStoreError
from .model import Change, Delivery, Event, Message
from .store import Store

__all__ = ["open", "AsyncStore", "AsyncConsumer"]

P = ParamSpec("P")
R = TypeVar("R")

_READ_BATCH = 1024  # changes (or feed events) read per worker call
_Queued = tuple[Message, tuple[int, ...], "asyncio.Future[Delivery]"]


# --- news from other threads --------------------------------------------------------------


class _Inbox:
    """News for the event loop from other threads, delivered in batches: one loop wake-up per batch.

    ``post`` runs in any thread (the flusher with the sequencing lock held, a
    notifier with the watchers' lock held, the worker): it appends and, if no
    drain is scheduled yet, schedules one with ``call_soon_threadsafe`` --
    whose self-pipe write is a system call, so doing it per delivery would
    cost a syscall each inside the flusher's critical section.
    """

    __slots__ = ("_loop", "_items", "_scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: collections.deque[tuple[Callable[[Any], None], Any]] = collections.deque()
        self._scheduled = False

    def post(self, callback: Callable[[Any], None], arg: Any) -> None:
        """Run ``callback(arg)`` on the loop soon.  ``callback`` must not raise."""
        self._items.append((callback, arg))
        if not self._scheduled:
            self._scheduled = True
            try:
                self._loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop is closed: nobody is left to tell
                pass

    def _drain(self) -> None:
        self._scheduled = False  # first: news posted from now on schedules another drain
        items = self._items
        while items:
            callback, arg = items.popleft()
            callback(arg)


def _resolve(pair: tuple[asyncio.Future[Any], Any]) -> None:
    future, value = pair
    if not future.done():
        future.set_result(value)


def _reject(pair: tuple[asyncio.Future[Any], BaseException]) -> None:
    future, error = pair
    if not future.done():
        future.set_exception(error)


class _Pending:
    """A delivery waiting for its LSN: the writer's releasable that completes a loop future."""

    __slots__ = ("future", "sequenced", "inbox")

    def __init__(self, future: asyncio.Future[Delivery], sequenced: tuple[int, bool, tuple[tuple[int, int], ...]], inbox: _Inbox) -> None:
        self.future = future
        self.sequenced = sequenced
        self.inbox = inbox

    def release(self, error: SyncStoreError | None) -> None:
        """The flusher's call (sequencing lock held): post the outcome to the loop."""
        self.inbox.post(self._settle, error)

    def _settle(self, error: SyncStoreError | None) -> None:
        future = self.future
        if future.done():  # the caller was cancelled; the write stands
            return
        if error is None:
            future.set_result(Delivery.of(*self.sequenced))
        else:
            future.set_exception(error)


class _Signal:
    """Set from any thread (:class:`Watchers` notifying), awaited on the loop; coalesces repeated sets."""

    __slots__ = ("_inbox", "_posted", "_fired", "_future")

    def __init__(self, inbox: _Inbox) -> None:
        self._inbox = inbox
        self._posted = False
        self._fired = False
        self._future: asyncio.Future[bool] | None = None

    def set(self) -> None:
        """The notifier's call (watchers' lock held): post to the loop, once until the loop has seen it."""
        if not self._posted:
            self._posted = True
            self._inbox.post(_Signal._fire, self)

    def _fire(self) -> None:
        self._posted = False  # before waking: a set from now on posts again
        self._fired = True
        if self._future is not None and not self._future.done():
            self._future.set_result(True)

    def clear(self) -> None:
        self._fired = False

    async def wait(self, loop: asyncio.AbstractEventLoop, timeout: float | None) -> bool:
        """True once set since the last :meth:`clear`; False if ``timeout`` seconds pass first."""
        if self._fired:
            return True
        future = self._future = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, _resolve, (future, False))
        try:
            return await future
        finally:
            self._future = None
            if timer is not None:
                timer.cancel()


# --- the worker thread --------------------------------------------------------------------


class _Worker:
    """The AsyncStore's one thread for calls that may block; jobs run in the order submitted."""

    def __init__(self, loop: asyncio.AbstractEventLoop, inbox: _Inbox, name: str) -> None:
        self._loop = loop
        self._inbox = inbox
        self._jobs: queue.SimpleQueue[tuple[asyncio.Future[Any] | None, Callable[[], Any]] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], R]) -> asyncio.Future[R]:
        """Run ``job()`` in the worker; the future gets its result or exception.  Loop thread only."""
        future: asyncio.Future[R] = self._loop.create_future()
        with self._lock:
            if not self._accepting:
                raise StoreClosed("the asyncio store is closed")
            self._jobs.put((future, job))
        return future

    def later(self, job: Callable[[], object]) -> None:
        """Run ``job()`` after every job submitted so far, no result wanted; at once if the worker has stopped."""
        with self._lock:
            if self._accepting:
                self._jobs.put((None, job))
                return
        job()

    def stop(self) -> asyncio.Future[None]:
        """Stop after the jobs submitted so far; the future completes when the thread has ended its last job."""
        done: asyncio.Future[None] = self._loop.create_future()
        with self._lock:
            if self._accepting:
                self._accepting = False
                self._jobs.put((done, lambda: None))
                self._jobs.put(None)
            else:
                done.set_result(None)
        return done

    def join(self) -> None:
        """Wait for the thread to end (after :meth:`stop`'s future: it has nothing left to do)."""
        self._thread.join()

    def _run(self) -> None:
        post = self._inbox.post
        while True:
            item = self._jobs.get()
            if item is None:
                return
            future, job = item
            if future is not None and future.cancelled():
                continue
            try:
                result = job()
            except BaseException as error:  # handed to the caller, whatever it is
                if future is not None:
                    post(_reject, (future, error))
                continue
            if future is not None:
                post(_resolve, (future, result))


# --- opening ------------------------------------------------------------------------------


async def open(path: str | os.PathLike[str], **options: Any) -> AsyncStore:  # noqa: A001 - the public name mirrors syncstore.open
    """Open the store at ``path`` for asyncio: :func:`syncstore.open`'s arguments, the same errors; returns an :class:`AsyncStore`.

    The opening (recovery, replay) runs in the AsyncStore's worker thread, so
    the loop goes on meanwhile.  If the awaiting task is cancelled, the store
    is closed again once it has opened.
    """
    loop = asyncio.get_running_loop()
    inbox = _Inbox(loop)
    worker = _Worker(loop, inbox, f"syncstore-aio:{os.fspath(path) if isinstance(path, (str, os.PathLike)) else path!r}")
    opened: list[Store] = []

    def open_store() -> Store:
        opened.append(_store.open(path, **options))
        return opened[0]

    try:
        store = await worker.submit(open_store)
    except BaseException:
        worker.later(functools.partial(_close_all, opened))  # cancelled while opening: it must not stay open
        await asyncio.shield(worker.stop())
        worker.join()  # it has finished its last job: immediate
        raise
    return AsyncStore(store, loop, worker, inbox)


def _close_all(stores: list[Store]) -> None:
    for store in stores:
        store.close()


def _in_worker(method: Callable[Concatenate[Store, P], R]) -> Callable[Concatenate[AsyncStore, P], Coroutine[Any, Any, R]]:
    """The coroutine twin of a Store method that may block: the call runs in the worker thread."""

    async def twin(self: AsyncStore, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return await self._call(functools.partial(method, self._store, *args, **kwargs))

    twin.__name__ = method.__name__
    twin.__qualname__ = f"AsyncStore.{method.__name__}"
    twin.__doc__ = f"Coroutine twin of :meth:`Store.{method.__name__}`, run in the worker thread.\n\n{method.__doc__ or ''}"
    return twin


# --- the store ----------------------------------------------------------------------------


class AsyncStore:
    """An open store for asyncio code; from :func:`syncstore.aio.open`.  See the module docstring.

    Use it from the event loop that opened it only.  ``store`` is the
    underlying :class:`Store` (for code running in other threads: its calls
    block, so never call them on the loop).
    """

    def __init__(self, store: Store, loop: asyncio.AbstractEventLoop, worker: _Worker, inbox: _Inbox) -> None:
        self.store = store
        self._store = store
        self._loop = loop
        self._worker = worker
        self._inbox = inbox
        self._queue: list[_Queued] = []  # deliveries of this pass of the loop, not sequenced yet
        self._scheduled = False
        self._handed_off = 0  # batches the worker is sequencing: later ones follow them there
        self._closing = False
        self._closed: asyncio.Future[None] | None = None

    # --- plumbing ---------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closing:
            raise StoreClosed("the store is closed", path=self._store.path)
        if asyncio.get_running_loop() is not self._loop:
            raise SyncStoreError(
                "this AsyncStore belongs to another event loop", path=self._store.path, hint="open one AsyncStore per event loop, or call it from the loop that opened it"
            )

    def _call(self, job: Callable[[], R]) -> asyncio.Future[R]:
        self._check_open()
        return self._worker.submit(job)

    # --- deliveries ---------------------------------------------------------------------

    async def deliver(self, message: Message, to: Sequence[int]) -> Delivery:
        """Coroutine twin of :meth:`Store.deliver`: returns the :class:`Delivery` once the message is durable.

        Waits on a future the group-commit flusher completes (no thread per
        call); the same idempotency, errors and durability as the threaded
        call.  Deliveries queued during one pass of the event loop are
        sequenced together.
        """
        self._check_open()
        store = self._store
        message = store._check_message(message)
        recipients = store._recipients(to)
        store._check_writer()
        future: asyncio.Future[Delivery] = self._loop.create_future()
        self._queue.append((message, recipients, future))
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._sequence_queued)
        return await future

    def _sequence_queued(self) -> None:
        """Sequence this pass's deliveries: on the loop if nothing has to wait, else in the worker."""
        self._scheduled = False
        batch = [item for item in self._queue if not item[2].done()]  # cancelled before sequencing: not written
        self._queue = []
        if not batch:
            return
        writer = self._store._writer
        assert writer is not None  # deliver checked it
        items = [(message, recipients) for message, recipients, _future in batch]
        waiter = functools.partial(self._waiter, batch)
        if not self._handed_off:  # otherwise keep the order: after the batches the worker holds
            try:
                outcomes = writer.deliver_each(items, waiter, blocking=False)
            except SyncStoreError as error:
                _fail(batch, error)
                return
            if outcomes is not None:
                _settle(batch, outcomes)
                return
        self._handed_off += 1
        try:
            handed = self._worker.submit(functools.partial(writer.deliver_each, items, waiter, blocking=True))
        except SyncStoreError as error:
            self._handed_off -= 1
            _fail(batch, error)
            return
        handed.add_done_callback(functools.partial(self._sequenced_in_worker, batch))

    def _waiter(self, batch: list[_Queued], index: int, sequenced: tuple[int, bool, tuple[tuple[int, int], ...]]) -> Releasable:
        return _Pending(batch[index][2], sequenced, self._inbox)

    def _sequenced_in_worker(self, batch: list[_Queued], handed: asyncio.Future[list[Outcome] | None]) -> None:
        self._handed_off -= 1
        error = handed.exception()
        if error is not None:
            _fail(batch, error)
            return
        outcomes = handed.result()
        assert outcomes is not None  # blocking=True always sequences
        _settle(batch, outcomes)

    deliver_many = _in_worker(Store.deliver_many)
    flush = _in_worker(Store.flush)

    # --- reads ----------------------------------------------------------------------------

    sync = _in_worker(Store.sync)
    head = _in_worker(Store.head)
    get = _in_worker(Store.get)
    history = _in_worker(Store.history)

    @property
    def epoch(self) -> int:
        """:attr:`Store.epoch` (no I/O)."""
        return self._store.epoch

    @property
    def lsn(self) -> int:
        """:attr:`Store.lsn`: the last durable LSN (no I/O in a writable store; one LMDB point read in a read-only view)."""
        return self._store.lsn

    @property
    def path(self) -> str:
        return self._store.path

    # --- waiting and the change log ---------------------------------------------------------

    def _watchers(self) -> Watchers | None:
        writer = self._store._writer
        return writer.watchers if writer is not None else None

    def _remaining(self, deadline: float | None) -> float | None:
        return None if deadline is None else deadline - self._loop.time()

    async def wait(self, user: int, since: int, timeout: float | None = None) -> bool:
        """Coroutine twin of :meth:`Store.wait`: True once ``head(user) > since``, False after ``timeout`` seconds or if the store closes.

        Woken by the durable write that reaches ``user`` (a signal the flusher
        sets; no polling, no thread); each wake-up reads the head in the worker.
        """
        self._check_open()
        self._store._check_wait(user, since, timeout)
        deadline = None if timeout is None else self._loop.time() + timeout
        watchers = self._watchers()
        if watchers is None:  # a read-only view: nothing wakes it
            while True:
                if await self.head(user) > since:
                    return True
                remaining = self._remaining(deadline)
                if remaining is not None and remaining <= 0:
                    return False
                await asyncio.sleep(VIEW_POLL_S if remaining is None else min(VIEW_POLL_S, remaining))
        signal = _Signal(self._inbox)
        watchers.add_user(user, signal)
        try:
            while True:
                signal.clear()  # before reading the head: a record arriving after the read sets it again
                if await self.head(user) > since:
                    return True
                remaining = self._remaining(deadline)
                if remaining is not None and remaining <= 0:
                    return False
                woken = await signal.wait(self._loop, remaining)
                if watchers.closed:
                    return False
                if not woken:  # the time is up: one last look
                    return await self.head(user) > since
        finally:
            watchers.unwatch(signal, user)

    def changes(self, since: int = 0, limit: int | None = None, follow: bool = False, timeout: float | None = None) -> AsyncIterator[Change]:
        """Twin of :meth:`Store.changes`: ``async for change in store.changes(since, follow=True)``.

        Arguments are checked at the call; the position (and
        :class:`SnapshotRequired`) at the first iteration.  Log files are read
        in the worker, up to 1,024 changes per call; a follow waits on a signal
        the writer sets (no polling).  Leaving the loop early closes the reader.
        """
        self._check_open()
        self._store._check_changes(since, limit, follow, timeout)
        return self._changes(since, limit, follow, None if timeout is None else self._loop.time() + timeout)

    async def _changes(self, since: int, limit: int | None, follow: bool, deadline: float | None) -> AsyncIterator[Change]:
        changelog = self._store._changelog
        watchers = self._watchers() if follow else None
        signal = None
        if watchers is not None:  # registered at the first step, before any await
            signal = _Signal(self._inbox)
            watchers.add_tail(signal)
        try:
            reader = await self._call(functools.partial(changelog.open_reader, since))
        except BaseException:
            if signal is not None and watchers is not None:
                watchers.unwatch(signal)
            raise
        position, left = since, limit
        try:
            while left is None or left > 0:
                if follow and self._closing:
                    return  # a follow ends quietly when the store closes (a plain read raises StoreClosed)
                if signal is not None:
                    signal.clear()  # before reading: a record made durable after the read sets it again
                try:
                    batch = await self._call(functools.partial(changelog.read, reader, position, _READ_BATCH if left is None else min(left, _READ_BATCH)))
                except LogRetired:  # retention overtook a slow reader between two batches
                    raise await self._call(functools.partial(changelog.snapshot_required, since)) from None
                if batch:
                    for change in batch:
                        yield change
                    position = batch[-1].lsn
                    if left is not None:
                        left -= len(batch)
                    continue
                remaining = self._remaining(deadline)
                if not follow or (remaining is not None and remaining <= 0):
                    return
                if signal is None or watchers is None:  # a read-only view: nothing wakes it
                    await asyncio.sleep(VIEW_POLL_S if remaining is None else min(VIEW_POLL_S, remaining))
                    continue
                if watchers.closed:
                    return  # what was written before it closed has been read
                if changelog.visible() <= position and not await signal.wait(self._loop, remaining):
                    return
        finally:
            if signal is not None and watchers is not None:
                watchers.unwatch(signal)
            self._worker.later(reader.close)  # after any read of it still running in the worker

    def feed(self, since: int = 0, follow: bool = False, timeout: float | None = None, snapshot_dir: str | None = None) -> AsyncIterator[Event]:
        """Twin of :meth:`Store.feed`: ``async for event in store.feed(since, follow=True)``.

        The snapshot chunks and the changes the log holds are read in the
        worker (positioning, and a snapshot into ``snapshot_dir`` if one is
        needed, at the first iteration); with ``follow=True`` it then follows
        the log as :meth:`changes` does.
        """
        self._check_open()
        take = self._store._check_feed(since, follow, timeout, snapshot_dir)
        return self._feed(since, follow, None if timeout is None else self._loop.time() + timeout, take)

    async def _feed(self, since: int, follow: bool, deadline: float | None, take: Callable[[], object] | None) -> AsyncIterator[Event]:
        events = await self._call(functools.partial(_feed.feed, self._store._changelog, since, False, None, take))
        position = since
        try:
            while True:
                batch = await self._call(functools.partial(_take, events, _READ_BATCH))
                if not batch:
                    break
                for event in batch:
                    yield event
                    position = event.lsn if type(event) is Change else event.snapshot_lsn  # type: ignore[union-attr]
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                self._worker.later(close)
        if follow:
            remaining = self._remaining(deadline)
            if remaining is None or remaining > 0:
                async for change in self._changes(position, None, True, deadline):
                    yield change

    async def consumer(self, name: str, start: int | None = None) -> AsyncConsumer:
        """Coroutine twin of :meth:`Store.consumer`: the named, persistent consumer (created in the worker)."""
        return AsyncConsumer(self, await self._call(functools.partial(self._store.consumer, name, start)))

    consumers = _in_worker(Store.consumers)
    drop_consumer = _in_worker(Store.drop_consumer)
    apply_changes = _in_worker(Store.apply_changes)
    apply = _in_worker(Store.apply)
    promote = _in_worker(Store.promote)

    # --- snapshots, verification, lifecycle ---------------------------------------------------

    snapshot = _in_worker(Store.snapshot)
    check = _in_worker(Store.check)

    async def close(self) -> None:
        """Close the store (see the module docstring); idempotent, and concurrent calls wait for the same close.

        Raises what :meth:`Store.close` raises (the writer's failure if the
        final flush fails); the worker is stopped and the store released either way.
        """
        if self._closed is None:
            self._closing = True  # at once: no call gets in between
            queued, self._queue = self._queue, []
            _fail(queued, StoreClosed("the store was closed before this delivery was written (nothing of it was)", path=self._store.path))
            self._closed = self._loop.create_task(self._close())
        await asyncio.shield(self._closed)

    async def _close(self) -> None:
        try:
            await self._worker.submit(self._store.close)  # sequenced deliveries are acknowledged before it returns
        finally:
            await self._worker.stop()
            self._worker.join()  # it has finished its last job: immediate

    async def __aenter__(self) -> AsyncStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<syncstore.aio.AsyncStore {self._store!r}>"


def _take(events: Iterator[Event], count: int) -> list[Event]:
    return list(itertools.islice(events, count))


def _settle(batch: list[_Queued], outcomes: list[Outcome]) -> None:
    """Complete what sequencing answered at once (duplicates of acknowledged deliveries, per-item errors)."""
    for (_message, _recipients, future), outcome in zip(batch, outcomes):
        if type(outcome) is tuple:
            if not future.done():
                future.set_result(Delivery.of(*outcome))
        elif isinstance(outcome, SyncStoreError) and not future.done():
            future.set_exception(outcome)


def _fail(batch: Sequence[_Queued], error: BaseException) -> None:
    for _message, _recipients, future in batch:
        if not future.done():
            future.set_exception(error)


class AsyncConsumer:
    """A named consumer of an :class:`AsyncStore` (from :meth:`AsyncStore.consumer`); see :class:`~syncstore.changelog.Consumer`.

    ``position``, ``dropped`` and ``lag`` read memory (no I/O); ``ack``
    writes the consumers file durably, in the worker.
    """

    def __init__(self, store: AsyncStore, consumer: Consumer) -> None:
        self._store = store
        self._consumer = consumer
        self.name = consumer.name

    @property
    def position(self) -> int:
        return self._consumer.position

    @property
    def dropped(self) -> str | None:
        return self._consumer.dropped

    @property
    def lag(self) -> int:
        return self._consumer.lag

    async def ack(self, lsn: int) -> None:
        """Coroutine twin of :meth:`Consumer.ack`."""
        await self._store._call(functools.partial(self._consumer.ack, lsn))

    def changes(self, limit: int | None = None, follow: bool = False, timeout: float | None = None) -> AsyncIterator[Change]:
        """``store.changes(since=position, ...)``, as :meth:`Consumer.changes`."""
        return self._store.changes(self.position, limit, follow, timeout)

    def __repr__(self) -> str:
        return f"<syncstore.aio.AsyncConsumer {self.name!r}>"
