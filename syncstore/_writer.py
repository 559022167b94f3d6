"""The write side of an open store: sequencing, group commit, the sync timer and the LMDB applier.

1. Under the *sequencing lock*, :meth:`Writer.deliver` looks the idempotency
   key up (:mod:`syncstore._idempotency`: overlay, then LMDB; a retry must repeat the first delivery's
   content, or raises :class:`IdempotencyConflict`), assigns the msg_id and each recipient's next
   cursor, encodes one WAL frame (unsealed) and indexes the record in the
   overlay.  No I/O but LMDB reads, so the lock is held for microseconds; LSN
   order, cursor order and WAL order are one and the same.
2. The caller then blocks on its own *waiter* (a held lock).  The *flusher*
   thread takes every frame sequenced so far, seals them -- stamping the LSN
   up to which the log is durable at that moment, the evidence recovery uses
   to tell a torn tail from damage in acknowledged frames -- writes them with
   one ``pwrite`` (O_DSYNC in "sync" mode: durable on return), and releases
   the waiters of exactly the LSNs it acknowledged.  In "interval" and "none"
   mode the same thread ``fdatasync``s on its own timer: at most
   :data:`SYNC_INTERVAL_S` after a write first left the log unsynced, under
   any load.
3. The *applier* thread moves durable records from the overlay into LMDB in
   large batches, so LMDB's own fsync is paid per batch, not per group; it
   also sequences EXPIRE records for idempotency keys past the dedup window
   (expiry is a logged write like any other, so followers and snapshot deltas
   see it), clears stale reader slots and retires WAL segments the retention
   policy lets go (:mod:`syncstore.changelog`).

**Visibility** (Kafka's high watermark): readers see only records whose WAL
frames are durable (:attr:`Writer.synced_lsn`).  In "interval"/"none" mode an
acknowledgement may be lost by a power cut, but a cursor any reader saw never
is, so it is never handed out again.

**Failures.**  A write that finds the disk full is rolled back -- its records
leave the overlay, their LSNs and cursors are reused -- and its callers get
:class:`StoreFull`; so do writes while LMDB cannot take the applied records
for lack of space, each of which first re-probes.  The store resumes by itself
once space is back.  Any other failed write or sync leaves the writer
*failed*: waiting callers get the error, later writes are refused until the
store is reopened, reads go on.
"""

from __future__ import annotations

import _thread
import collections
import functools
import gc
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence

import lmdb

from . import _codec
from ._codec import Deliver, Pairs
from ._idempotency import Idempotency
from ._ids import MessageIds, msg_id_ms
from ._appends import PURGE_BATCH, RecordAppends
from ._loopwrites import LoopDeliveries, Releasable
from ._overlay import Overlay
from ._watch import Watchers
from .errors import CorruptionError, DurabilityError, StoreClosed, StoreFull, SyncStoreError
from .model import Message, MessageRecord, StoredMessage
from .state import State
from .wal import WriteAheadLog

log = logging.getLogger("syncstore.writer")

#: Seconds between applier passes per durability mode.
APPLY_INTERVAL_S = {"sync": 1.0, "interval": 1.0, "none": 1.0}
#: Longest time a written WAL frame stays unsynced, per durability mode ("sync":
#: every write is durable before it is acknowledged).
SYNC_INTERVAL_S = {"sync": 0.0, "interval": 0.1, "none": 1.0}
_APPLY_BATCH = 32_768  # wake the applier once this many records wait
_APPLY_TXN_RECORDS = 16_384  # records per LMDB transaction, at most ...
#: ... and recipients per LMDB transaction, at most: a transaction holds every page it dirties in
#: memory, about five per record when users are many and scattered (inbox, history, dedup), so
#: with 1M users this is what bounds it (~4,000 records); with few users, pages are shared and
#: the record cap does.
_APPLY_TXN_USERS = 8_192
_MAX_PENDING = 65_536  # stop sequencing while this many records wait (bounded memory)
BULK_CHUNK = 16_384  # deliver_many commits in chunks of this many messages
_READER_CHECK_S = 10.0  # clear reader slots of dead processes this often
_ALL = 2**64
_monotonic = time.monotonic  # the sync timer's clock; a seam: tests substitute their own

#: What sequencing a message yields: (msg_id, duplicate, pairs).
Sequenced = tuple[int, bool, Pairs]


class _GcPause:
    """``with _gc_paused:`` keeps the cyclic garbage collector out of a hot loop; nests, across threads.

    Bulk sequencing creates a few tracked objects per message (the Message,
    the record, overlay entries) and keeps them alive in the overlay until
    they are applied: every young-generation collection then re-examines
    them, and full collections walk the whole overlay.  Measured on the
    bulk path, that was half of sequencing's CPU time (11 -> 6 us per
    message).  Reference counting still frees everything acyclic meanwhile;
    the collector resumes, if it was enabled, when the last pause ends.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._resume = False

    def __enter__(self) -> None:
        with self._lock:
            if self._depth == 0:
                self._resume = gc.isenabled()
                gc.disable()
            self._depth += 1

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0 and self._resume:
                gc.enable()


_gc_paused = _GcPause()


class _Waiter:
    """A caller blocked until its LSN is acknowledged: a held lock, and the error if it never is.

    The flusher calls :meth:`release`; any object with that method can wait
    in the writer's heap (:mod:`syncstore._loopwrites` registers ones that
    complete an event loop's future instead of waking a thread).
    """

    __slots__ = ("lock", "error")

    def __init__(self) -> None:
        self.lock = _thread.allocate_lock()
        self.lock.acquire()
        self.error: SyncStoreError | None = None

    def release(self, error: SyncStoreError | None) -> None:
        """Acknowledged (``error`` None) or failed: wake the caller.  Sequencing lock held."""
        self.error = error
        self.lock.release()


class Writer(RecordAppends, LoopDeliveries):
    """Sequencing, group commit and applier of one writable store; see the module docstring.

    Records sequenced elsewhere -- expiry, a leader's records on a follower --
    come from :class:`~syncstore._appends.RecordAppends`.
    """

    def __init__(
        self,
        path: str,
        state: State,
        wal: WriteAheadLog,
        ids: MessageIds,
        *,
        durability: str,
        clock_ms: Callable[[], int],
        dedup_window_ms: int,
        monotonic: Callable[[], float] | None = None,
        retain: Callable[[int], int] | None = None,
    ) -> None:
        self._path = path
        self._state = state
        self._wal = wal
        self._ids = ids
        self._durability = durability
        self._clock = clock_ms
        self._monotonic = monotonic or _monotonic
        self._dedup_window_ms = dedup_window_ms
        # Retention: given the applied LSN, up to which LSN WAL segments may go (the change log's policy).
        self._retain = retain or (lambda applied: applied)
        self.watchers = Watchers()  # Store.wait and follow=True tails
        self._expire_lsn = 0  # LSN of the last EXPIRE sequenced: one at a time, until it is applied
        # False for a follower: its log is its leader's, so it never sequences records of its own (expiry included).
        self.leader = True
        end = wal.end_lsn
        self._notified_lsn = end
        self._next_lsn = end + 1
        # written: reached the OS; synced: durable (the high watermark: what readers
        # see); acked: what callers were told is done (written, or synced in "sync" mode).
        self._written_lsn = self.synced_lsn = self.acked_lsn = end
        self._sync_interval = SYNC_INTERVAL_S[durability]
        # The sync timer ("interval"/"none"), guarded by its own lock rather than the
        # sequencing lock: under bulk load the flusher can wait hundreds of ms for the
        # sequencing lock, and the timer must not wait with it.
        self._sync_lock = threading.Lock()
        self._synced = threading.Condition(self._sync_lock)  # the high watermark moved, or a sync is wanted
        self._unsynced_since: float | None = None  # when the oldest unsynced write happened
        self._sync_requested = False
        self._flusher_done = False
        self._abandoned = False
        self._syncing = False  # a thread is in fdatasync
        self._stopping = False
        self._stopped = False  # the threads are gone
        self.failure: SyncStoreError | None = None
        self._apply_full: StoreFull | None = None  # LMDB refused the last apply for lack of space
        # Rollbacks so far, and the written LSN at the latest of them (see _check_chunks).
        self._rollbacks = 0
        self._rollback_log: collections.deque[int] = collections.deque(maxlen=1024)
        self.overlay = Overlay()
        # Dedup decisions, the claims of deliver_many's later chunks, the dedup clock.
        self._idempotency = Idempotency(self.overlay, state, clock_ms=clock_ms, dedup_window_ms=dedup_window_ms)
        self._first_delivery = self._idempotency.first_delivery  # bound once: _sequence calls it per message
        self.lock = threading.Lock()  # sequencing: dedup, ids, cursors, frames, overlay
        self._apply_lock = threading.Lock()  # one apply at a time (applier thread or a re-probing writer)
        self._frames: list[bytes] = []
        # Callers waiting for their LSN: a heap of (lsn, tiebreak, waiter).  The
        # flusher releases exactly the ones it acknowledged: a notify_all would wake
        # every waiter each round, and in CPython each needless wake-up is a GIL
        # hand-off (8-thread throughput rose ~50 % with this).
        self._waiters: list[tuple[int, int, Releasable]] = []
        self._tiebreak = itertools.count()
        self._work = threading.Condition(self.lock)  # wakes the idle flusher
        self._flusher_idle = False
        self._applied = threading.Condition()  # applier progress, for back-pressure
        self._apply_wakeup = threading.Event()
        self._threads = [
            threading.Thread(target=self._flush_loop, name=f"syncstore-flusher:{path}", daemon=True),
            threading.Thread(target=self._apply_loop, name=f"syncstore-applier:{path}", daemon=True),
        ]
        if durability != "sync":
            self._threads.append(threading.Thread(target=self._sync_loop, name=f"syncstore-syncer:{path}", daemon=True))
        for thread in self._threads:
            thread.start()

    # --- writing --------------------------------------------------------------------

    def deliver(self, message: Message, recipients: tuple[int, ...]) -> Sequenced:
        """Sequence one validated message and wait until it is acknowledged."""
        self._backpressure()
        with self.lock:
            self._check_writable()
            with self._state.read() as txn:
                # Most heads come from the overlay: the LMDB lookup (and its cursor) only when needed.
                msg_id, duplicate, pairs, lsn = self._sequence(txn, message, recipients, functools.partial(self._state.head, txn))
            waiter = self._gate(lsn)
        self._await(waiter)
        self._sync_if_due()
        return msg_id, duplicate, pairs

    def deliver_many(self, items: Sequence[tuple[Message, tuple[int, ...]]]) -> list[Sequenced]:
        """Sequence validated messages and wait once, for the last of them.

        The lock is released every :data:`BULK_CHUNK` messages so the flusher
        can write (and the applier apply) one chunk while the next is
        sequenced; back-pressure between chunks bounds the memory used.  If a
        chunk's write fails (a full disk), earlier chunks may have been
        acknowledged: a retry of the whole batch finds those as duplicates.

        Nothing is written unless every item passes the idempotency check:
        under the lock of the first chunk, before anything is sequenced,
        :meth:`Idempotency.check_batch` compares every item with the first delivery of
        its key and with earlier items of the batch.  Items of later chunks
        then *claim* their keys until they are sequenced, so that a
        concurrent delivery of such a key with other content fails instead
        of this batch failing half-written.
        """
        results: list[Sequenced] = []
        last = 0
        waiter = None
        chunks: list[tuple[int, int]] = []  # (rollbacks so far, highest LSN) per chunk, when sequenced
        claimed = len(items)  # items[claimed:] hold claims
        idempotency = self._idempotency
        try:
            for start in range(0, len(items), BULK_CHUNK):
                end = start + BULK_CHUNK
                self._backpressure()
                with self.lock, _gc_paused:
                    self._check_writable()
                    with self._state.read() as txn:
                        if start == 0:
                            idempotency.check_batch(txn, items, BULK_CHUNK)
                            if end < len(items):
                                idempotency.claim(items[end:], 1)
                                claimed = end
                        elif claimed < end:
                            idempotency.claim(items[claimed:end], -1)
                            claimed = end
                        chunk_last = 0
                        head_of, sequence = self._state.head_reader(txn), self._sequence
                        for message, recipients in items[start:end]:
                            msg_id, duplicate, pairs, lsn = sequence(txn, message, recipients, head_of, False)
                            results.append((msg_id, duplicate, pairs))
                            if lsn > chunk_last:
                                chunk_last = lsn
                        if self._flusher_idle:
                            self._work.notify()
                        last = max(last, chunk_last)
                        chunks.append((self._rollbacks, chunk_last))
                        idempotency.forget_fresh()
                    if end >= len(items):
                        waiter = self._gate(last)
                self._sync_if_due()
        finally:
            if claimed < len(items):
                with self.lock:
                    idempotency.claim(items[claimed:], -1)
        self._await(waiter)
        self._check_chunks(chunks)
        self._sync_if_due()
        return results

    def _check_chunks(self, chunks: list[tuple[int, int]]) -> None:
        """Raise StoreFull if a write that failed for space dropped records of an earlier chunk.

        deliver_many waits only for its last LSN; a rollback in between drops
        every record beyond what was written and lets later chunks reuse the
        LSNs, so the last one's acknowledgement does not cover the earlier chunks.
        """
        with self.lock:
            log_, total = list(self._rollback_log), self._rollbacks
        oldest = total - len(log_)
        for seen, chunk_last in chunks:
            if seen < oldest:  # more rollbacks since than the log keeps: assume the worst
                raise StoreFull("a write of this batch found the disk full (part of the batch may be written)", path=self._path)
            for written in log_[seen - oldest :]:
                if chunk_last > written:
                    raise StoreFull(
                        "a write of this batch found the disk full: part of it was not written (earlier chunks may have been)",
                        path=self._path,
                    )

    def _check_writable(self) -> None:
        """Raise if no new write may be sequenced.  Sequencing lock held."""
        if self._stopping:
            raise StoreClosed("the store is closed", path=self._path)
        if self.failure is not None:
            raise self._failure_copy()

    def _failure_copy(self) -> SyncStoreError:
        failure = self.failure
        assert failure is not None
        return type(failure)(f"the store stopped accepting writes: {failure.message}", path=failure.path, hint=failure.hint)

    def _fail(self, error: SyncStoreError) -> None:
        if self.failure is None:
            self.failure = error
            log.error("store %s stops accepting writes: %s", self._path, error)
        with self.lock:
            self._release_waiters(_ALL, self._failure_copy())
        with self._synced:
            self._synced.notify_all()
        with self._applied:
            self._applied.notify_all()

    def _backpressure(self) -> None:
        """Before sequencing: wait while too many records await the applier; re-probe a full LMDB disk."""
        if self._apply_full is not None:
            self._reprobe_apply()
        if len(self.overlay) < _MAX_PENDING:
            return
        self._request_sync()  # the applier needs durable records: don't make it wait for the timer
        self._apply_wakeup.set()
        with self._applied:
            self._applied.wait_for(
                lambda: len(self.overlay) < _MAX_PENDING or self.failure is not None or self._stopping or self._apply_full is not None
            )
        if self._apply_full is not None and len(self.overlay) >= _MAX_PENDING:
            raise self._apply_full_copy()

    def _reprobe_apply(self) -> None:
        """LMDB refused the last apply for lack of space: try again now, from this thread."""
        with self._apply_lock:
            if self._apply_full is None or self.failure is not None or self._stopping:
                return
            try:
                self._apply_unlocked()
            except StoreFull as error:
                self._apply_full = error
                raise self._apply_full_copy() from error
            except SyncStoreError as error:
                self._fail(error)
                raise self._failure_copy() from error

    def _apply_full_copy(self) -> StoreFull:
        full = self._apply_full
        assert full is not None
        return StoreFull(f"the LMDB state has no room for acknowledged writes: {full.message}", path=full.path, hint=full.hint)

    def _sequence(
        self, txn: lmdb.Transaction, message: Message, recipients: tuple[int, ...], head_of: Callable[[int], int], notify: bool = True
    ) -> tuple[int, bool, Pairs, int]:
        """Dedup, assign ids and cursors, frame the record; return (msg_id, duplicate, pairs, lsn).

        Sequencing lock held.  ``head_of`` reads a user's applied head in
        ``txn`` (:meth:`State.head_reader`).  ``notify=False`` leaves waking
        the flusher to the caller (deliver_many does it once per chunk: a
        notify per message was a tenth of bulk time).  The LSN of a duplicate
        is that of its first delivery (0 if long applied), so the caller
        waits until it is durable.
        """
        overlay = self.overlay
        sender, client_seq = message.sender, message.client_seq
        first = self._first_delivery(txn, message, recipients)
        if first is not None:
            return first[0], True, first[1], first[2]
        msg_id = self._ids.next()
        pairs: Pairs = tuple((uid, (overlay.head(uid) or head_of(uid)) + 1) for uid in recipients)
        ts_ms = msg_id_ms(msg_id) if message.ts_ms is None else message.ts_ms
        record = Deliver(msg_id, sender, message.conv, client_seq, ts_ms, message.priority, message.body, pairs)
        lsn = self._next_lsn
        self._frames.append(_codec.encode_deliver_unsealed(lsn, record))  # sealed by the flusher
        self._next_lsn = lsn + 1  # only once the frame exists: an encoding error reserves nothing
        if notify and self._flusher_idle:
            self._work.notify()
        overlay.add(lsn, record)
        if len(overlay) == _APPLY_BATCH:
            self._apply_wakeup.set()
        return msg_id, False, pairs, lsn

    # --- group commit ---------------------------------------------------------------

    def _gate(self, lsn: int) -> _Waiter | None:
        """A waiter the flusher releases once ``lsn`` is acknowledged (None if it is).  Sequencing lock held."""
        if lsn <= self.acked_lsn:
            return None
        if self.failure is not None:  # the flusher is gone: nobody would release it
            raise self._failure_copy()
        waiter = _Waiter()
        heapq.heappush(self._waiters, (lsn, next(self._tiebreak), waiter))
        return waiter

    @staticmethod
    def _await(waiter: _Waiter | None) -> None:
        """Block until the waiter is released; raise its error if its LSN was not acknowledged."""
        if waiter is None:
            return
        waiter.lock.acquire()
        if waiter.error is not None:
            raise waiter.error

    def _release_waiters(self, upto_lsn: int, error: SyncStoreError | None = None) -> None:
        """Wake every caller waiting for an LSN <= ``upto_lsn``, with ``error`` if given.  Sequencing lock held."""
        waiters = self._waiters
        while waiters and waiters[0][0] <= upto_lsn:
            heapq.heappop(waiters)[2].release(error)

    def _flush_loop(self) -> None:
        """Write every frame sequenced so far, back to back, until stopped and drained."""
        sync_mode = self._durability == "sync"
        try:
            while True:
                with self.lock:
                    self._release_waiters(self.acked_lsn)
                    while not self._frames and not self._stopping:
                        self._flusher_idle = True
                        self._work.wait()
                    self._flusher_idle = False
                    frames, self._frames = self._frames, []
                    last = self._next_lsn - 1
                    if not frames:  # stopping, and everything is written
                        return
                try:
                    data = bytearray().join(frames)
                    _codec.seal_frames(data, self.synced_lsn)  # the durable prefix as of this write
                    self._wal.append(data, last, self._written_lsn + 1)
                except StoreFull as error:
                    self._roll_back(error)
                    continue
                except SyncStoreError as error:
                    self._fail(error)
                    return
                with self._synced:
                    self._written_lsn = last
                    if sync_mode:
                        self.synced_lsn = last  # O_DSYNC: durable on return
                        self._synced.notify_all()
                    elif self._unsynced_since is None:
                        self._unsynced_since = self._monotonic()
                        self._synced.notify_all()  # start the syncer's timer
                self.acked_lsn = last
                if sync_mode:
                    self._notify_durable()
                else:
                    self._sync_if_due()
        finally:
            with self._synced:
                self._flusher_done = True
                self._synced.notify_all()

    def _sync_due(self) -> bool:
        """Whether the syncer must fdatasync now.  Sync lock held."""
        if self._abandoned or self._unsynced_since is None:
            return False
        return self._sync_requested or self._flusher_done or self._monotonic() - self._unsynced_since >= self._sync_interval

    def _sync_wait(self) -> float | None:
        """How long the syncer may sleep before a sync falls due (None: until woken).  Sync lock held."""
        if self._unsynced_since is None:
            return None
        return max(0.0, self._unsynced_since + self._sync_interval - self._monotonic())

    def _sync_loop(self) -> None:
        """"interval"/"none" mode: fdatasync the WAL at most :data:`SYNC_INTERVAL_S` after a write, or on request.

        Running threads (the flusher after a write, callers as they return)
        also sync when the timer is due (:meth:`_sync_if_due`): under heavy
        load a thread waking from a timed wait can wait long for the GIL, and
        the promise must hold under any load.
        """
        while True:
            with self._synced:
                while self._syncing or not self._sync_due():
                    if self._flusher_done and not self._syncing and (self._unsynced_since is None or self._abandoned):
                        return
                    self._synced.wait(None if self._syncing else self._sync_wait())
            if not self._sync_now():
                return

    def _sync_if_due(self) -> None:
        """Sync if the timer is due and no other thread is syncing; cheap when not (no lock taken)."""
        since = self._unsynced_since
        if since is not None and self._monotonic() - since >= self._sync_interval:
            self._sync_now()

    def _sync_now(self) -> bool:
        """fdatasync the WAL if due and nobody else is; update the high watermark.  False if the sync failed."""
        with self._synced:
            if self._syncing or not self._sync_due():
                return True
            self._syncing = True
            target, since = self._written_lsn, self._monotonic()
        try:
            self._wal.sync()  # covers every frame written so far, target included
        except SyncStoreError as error:
            with self._synced:
                self._syncing = False
            self._fail(error)
            return False
        with self._synced:
            self._syncing = False
            self.synced_lsn = max(self.synced_lsn, target)
            self._sync_requested = False
            # Frames written after target was read became unsynced no earlier than `since`.
            self._unsynced_since = None if self._written_lsn == target else since
            self._synced.notify_all()
        self._notify_durable()
        return True

    def _request_sync(self) -> None:
        with self._synced:
            self._sync_requested = True
            self._synced.notify_all()

    def flush(self) -> None:
        """Wait until every write sequenced so far is durable (and so visible to readers).

        In "sync" mode that is already true; otherwise the syncer syncs now
        instead of at its timer.  Raises the writer's failure if the sync fails.
        """
        target = self._next_lsn - 1  # everything sequenced so far (an EXPIRE too), acknowledged or about to be
        with self._synced:
            while self.synced_lsn < min(target, self._next_lsn - 1):  # a rollback (disk full) may take some back
                if self.failure is not None:
                    raise self._failure_copy()
                if self._stopped:
                    raise StoreClosed("the store was closed", path=self._path)
                self._sync_requested = True
                self._synced.notify_all()
                self._synced.wait()

    def _roll_back(self, error: StoreFull) -> None:
        """A write found the disk full: forget every record not written, and tell their callers."""
        with self.lock:
            dropped = self.overlay.rollback(self._written_lsn)
            self._rollbacks += 1
            self._rollback_log.append(self._written_lsn)  # everything after it was dropped
            self._frames = []
            self._next_lsn = self._written_lsn + 1
            # Acknowledged waiters first (they succeeded); every one left waits for a dropped LSN.
            self._release_waiters(self.acked_lsn)
            self._release_waiters(_ALL, StoreFull(error.message, path=error.path, hint=error.hint))
        log.warning("store %s: %d unwritten records dropped, their callers told: %s", self._path, dropped, error)

    # --- applier ----------------------------------------------------------------------

    def _apply_loop(self) -> None:
        interval = APPLY_INTERVAL_S[self._durability]
        next_purge = next_reader_check = 0.0
        while not self._stopping:
            self._apply_wakeup.wait(interval)
            self._apply_wakeup.clear()
            if self.failure is not None or self._stopping:
                return  # close() does the final apply itself; abandon() must not
            try:
                with self._apply_lock:
                    self._apply_unlocked()
                    now = time.monotonic()
                    if now >= next_purge:
                        expired = self.expire_dedup()
                        next_purge = 0.0 if expired == PURGE_BATCH else now + 1.0
                    if now >= next_reader_check:
                        self._state.clear_stale_readers()
                        next_reader_check = now + _READER_CHECK_S
            except StoreFull as error:  # transient: the records stay in the overlay, durable in the WAL
                if self._apply_full is None:
                    log.warning("store %s: LMDB has no room to apply acknowledged writes; retrying: %s", self._path, error)
                self._apply_full = error
                with self._applied:
                    self._applied.notify_all()
            except SyncStoreError as error:
                self._fail(error)
                return
            except Exception as error:  # never let the applier die silently
                self._fail(DurabilityError(f"applier failed: {error!r}", path=self._path))
                return

    def apply_pending(self) -> None:
        """Move durable records from the overlay into LMDB (see :meth:`_apply_unlocked`)."""
        with self._apply_lock:
            self._apply_unlocked()

    def _apply_unlocked(self) -> None:
        """Move durable records from the overlay into LMDB.  Apply lock held.

        At most :data:`_APPLY_TXN_RECORDS` records and :data:`_APPLY_TXN_USERS` recipients per LMDB transaction: a write
        transaction holds every page it dirties in memory, so this bounds the
        process's memory however far behind the applier is.  LMDB must never
        get ahead of the durable WAL, so only records up to the synced LSN go.
        """
        upto = self.synced_lsn
        applied = 0
        while True:
            with self.lock:
                records, last = self.overlay.take(upto, _APPLY_TXN_RECORDS, _APPLY_TXN_USERS)
            if not records:
                break
            with _gc_paused:
                self._state.apply(records, last)
            with self.lock:
                self._notify_locked(last)  # before they leave the overlay: a waiter must hear of them
                self.overlay.forget(last)
            with self._applied:
                self._applied.notify_all()
            applied = last
        if self._apply_full is not None:
            log.warning("store %s: LMDB accepts writes again", self._path)
            self._apply_full = None
        if len(self._wal.segment_paths()) > 1:  # also with nothing new applied: a consumer's ack may free segments
            upto = self._retain(applied or self._state.applied_lsn())
            if upto >= self._wal.first_lsn:
                self._state.sync()  # the applied LSN must be durable before its WAL goes
                self._wal.retire(upto)

    # --- durability notifications ---------------------------------------------------------

    def _notify_durable(self) -> None:
        """The high watermark moved: wake the waiters the newly durable records concern."""
        if not self.watchers.active:
            self._notified_lsn = max(self._notified_lsn, self.synced_lsn)
            return
        with self.lock:
            self._notify_locked(self.synced_lsn)

    def _notify_locked(self, upto: int) -> None:
        """Notify watchers of the records in (last notified, ``upto``].  Sequencing lock held."""
        if upto <= self._notified_lsn:
            return
        if self.watchers.active:
            self.watchers.notify(record for lsn, record in self.overlay.since(self._notified_lsn) if lsn <= upto)
        self._notified_lsn = upto

    # --- reads and checks -----------------------------------------------------------------

    def pending(self, user: int, since: int) -> tuple[list[StoredMessage], int]:
        """Durable, not yet applied messages of ``user`` after ``since``, and their head (0 if none)."""
        if not len(self.overlay):
            return [], 0
        with self.lock:
            return self.overlay.visible(user, since, self.synced_lsn)

    def pending_message(self, msg_id: int) -> MessageRecord | None:
        """The durable, not yet applied message ``msg_id``, if it is one."""
        if not len(self.overlay):
            return None
        with self.lock:
            return self.overlay.message(msg_id, self.synced_lsn)

    def pending_history(self, user: int, conv: int, before: int) -> tuple[list[StoredMessage], int | None]:
        """Durable, not yet applied messages of ``user`` in ``conv`` below ``before``, newest first; and the
        lowest unapplied cursor of ``user`` (None if none), below which LMDB answers."""
        if not len(self.overlay):
            return [], None
        with self.lock:
            return self.overlay.history(user, conv, before, self.synced_lsn)

    def check(self) -> dict[str, int]:
        """Verify the LMDB state, and that the unapplied records densely continue it.

        Holds the sequencing lock throughout, so nothing is sequenced while
        the two are compared.  Returns the state's counts plus ``pending``.
        """
        with self.lock:
            counts = self._state.check(self._wal.end_lsn)
            with self._state.read() as txn:
                heads = dict(self._state.iter_heads(txn))
                applied = self._state.applied_lsn(txn)
            problem = self.overlay.check_continues(heads, applied)
            pending = len(self.overlay)
        if problem is not None:
            raise CorruptionError(f"unapplied records do not continue the state: {problem}", path=self._path)
        return {**counts, "pending": pending}

    # --- stopping ---------------------------------------------------------------------

    def close(self) -> None:
        """Refuse new writes, acknowledge (and sync) everything sequenced, stop the threads, apply the rest.

        Every delivery sequenced before ``close`` is acknowledged normally;
        later ones raise :class:`StoreClosed`.  Raises the failure if the final
        flush fails; the threads are stopped either way.
        """
        with self.lock:
            self._stopping = True
            waiter = None if self.failure is not None else self._gate(self._next_lsn - 1)
            self._work.notify()
        with self._applied:  # callers held back by back-pressure now see _stopping
            self._applied.notify_all()
        try:
            try:
                self._await(waiter)
            except StoreFull:
                pass  # the last writes found the disk full; their callers were told
        finally:
            self._stop()
            if self.failure is None:
                try:
                    self.apply_pending()
                except StoreFull as error:  # the WAL keeps them: the next open applies them
                    log.warning("store %s closed with %d records not applied to LMDB: %s", self._path, len(self.overlay), error)

    def abandon(self) -> None:
        """Stop as a killed process would: drop unwritten frames, apply nothing."""
        with self.lock:
            self._frames = []
        with self._synced:
            self._abandoned = True  # and no final sync on the way out
        self._stop()

    def _stop(self) -> None:
        with self.lock:
            self._stopping = True
            self._work.notify()
            self._release_waiters(_ALL, StoreClosed("the store was closed", path=self._path))
        self._apply_wakeup.set()
        with self._applied:
            self._applied.notify_all()
        with self._synced:
            self._synced.notify_all()
        for thread in self._threads:
            thread.join()
        with self._synced:
            self._stopped = True
            self._synced.notify_all()
        self.watchers.wake_all()

