"""The write side of an open store: sequencing, group commit and the LMDB applier.

1. Under the *sequencing lock*, :meth:`Writer.deliver` looks the idempotency
   key up (overlay, then LMDB; a retry must repeat the first delivery's
   content, or raises :class:`IdempotencyConflict`), assigns the msg_id and each recipient's next
   cursor, encodes one WAL frame and indexes the record in the overlay.  No
   I/O but LMDB reads, so the lock is held for microseconds; LSN order, cursor
   order and WAL order are one and the same.
2. The caller then blocks on its own *gate* (a held lock).  The *flusher*
   thread takes every frame sequenced so far, writes them with one ``pwrite``
   (O_DSYNC in "sync" mode: durable on return), and releases the gates of
   exactly the LSNs it acknowledged.  Frames sequenced meanwhile form the next
   group.
3. The *applier* thread moves acknowledged, durable records from the overlay
   into LMDB in large batches, so LMDB's own fsync is paid per batch, not per
   group; it also purges expired dedup entries and retires WAL segments.

After a failed write or sync the writer is *failed*: waiting callers get the
error, later writes are refused until the store is reopened, reads go on.
"""

from __future__ import annotations

import _thread
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence

import lmdb

from . import _codec
from ._codec import Deliver, Pairs
from ._ids import MessageIds, msg_id_ms
from ._overlay import Overlay
from .errors import CorruptionError, DurabilityError, IdempotencyConflict, StoreClosed, SyncStoreError
from .model import Message, StoredMessage
from .state import State
from .wal import WriteAheadLog

log = logging.getLogger("syncstore.writer")

#: Seconds between applier passes per durability mode.  In "interval" mode the
#: applier's WAL sync is the promised fdatasync at least every 100 ms.
APPLY_INTERVAL_S = {"sync": 0.02, "interval": 0.1, "none": 1.0}
_APPLY_BATCH = 8_192  # wake the applier once this many records wait
_APPLY_TXN_RECORDS = 4_096  # records per LMDB transaction (bounds its dirty pages)
_MAX_PENDING = 65_536  # stop sequencing while this many records wait (bounded memory)
BULK_CHUNK = 16_384  # deliver_many commits in chunks of this many messages
_PURGE_BATCH = 1_000
_ALL = 2**64

#: What sequencing a message yields: (msg_id, duplicate, pairs).
Sequenced = tuple[int, bool, Pairs]
#: An idempotency key: (sender, client_seq).
Key = tuple[int, int]


class Writer:
    """Sequencing, group commit and applier of one writable store; see the module docstring."""

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
    ) -> None:
        self._path = path
        self._state = state
        self._wal = wal
        self._ids = ids
        self._durability = durability
        self._clock = clock_ms
        self._dedup_window_ms = dedup_window_ms
        end = wal.end_lsn
        self._next_lsn = end + 1
        self._written_lsn = self._synced_lsn = self.acked_lsn = end
        self._stopping = False
        self.failure: SyncStoreError | None = None
        self.overlay = Overlay()
        # Keys of deliver_many items not sequenced yet (chunks after the first):
        # key -> [message, recipients, how many batches claim it]; see deliver_many.
        self._claims: dict[Key, list] = {}
        self._dedup_now = 0  # the clock as dedup sees it: never backwards (see _first_delivery)
        # Keys _check_batch just found new, valid only inside its read transaction (see _first_delivery).
        self._fresh: tuple[lmdb.Transaction, set[Key]] | None = None
        self.lock = threading.Lock()  # sequencing: dedup, ids, cursors, frames, overlay
        self._frames: list[bytes] = []
        # Callers waiting for their LSN: a heap of (lsn, tiebreak, held lock).  The
        # flusher releases exactly the ones it acknowledged: a notify_all would wake
        # every waiter each round, and in CPython each needless wake-up is a GIL
        # hand-off (8-thread throughput rose ~50 % with this).
        self._waiters: list[tuple[int, int, _thread.LockType]] = []
        self._tiebreak = itertools.count()
        self._work = threading.Condition(self.lock)  # wakes the idle flusher
        self._flusher_idle = False
        self._applied = threading.Condition()  # applier progress, for back-pressure
        self._apply_wakeup = threading.Event()
        self._threads = [
            threading.Thread(target=self._flush_loop, name=f"syncstore-flusher:{path}", daemon=True),
            threading.Thread(target=self._apply_loop, name=f"syncstore-applier:{path}", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    # --- writing --------------------------------------------------------------------

    def deliver(self, message: Message, recipients: tuple[int, ...]) -> Sequenced:
        """Sequence one validated message and wait until it is acknowledged."""
        self._backpressure()
        with self.lock:
            self._check_writable()
            with self._state.read() as txn:
                msg_id, duplicate, pairs, lsn = self._sequence(txn, message, recipients)
            gate = self._gate(lsn)
        self._await(gate, lsn)
        return msg_id, duplicate, pairs

    def deliver_many(self, items: Sequence[tuple[Message, tuple[int, ...]]]) -> list[Sequenced]:
        """Sequence validated messages and wait once, for the last of them.

        The lock is released every :data:`BULK_CHUNK` messages so the flusher
        can write (and the applier apply) one chunk while the next is
        sequenced; back-pressure between chunks bounds the memory used.

        Nothing is written unless every item passes the idempotency check:
        under the lock of the first chunk, before anything is sequenced,
        :meth:`_check_batch` compares every item with the first delivery of
        its key and with earlier items of the batch.  Items of later chunks
        then *claim* their keys until they are sequenced, so that a
        concurrent delivery of such a key with other content fails instead
        of this batch failing half-written.
        """
        results: list[Sequenced] = []
        last = 0
        gate = None
        claimed = len(items)  # items[claimed:] hold claims
        try:
            for start in range(0, len(items), BULK_CHUNK):
                end = start + BULK_CHUNK
                self._backpressure()
                with self.lock:
                    self._check_writable()
                    with self._state.read() as txn:
                        if start == 0:
                            self._check_batch(txn, items)
                            if end < len(items):
                                self._claim(items[end:], 1)
                                claimed = end
                        elif claimed < end:
                            self._claim(items[claimed:end], -1)
                            claimed = end
                        for message, recipients in items[start:end]:
                            msg_id, duplicate, pairs, lsn = self._sequence(txn, message, recipients)
                            results.append((msg_id, duplicate, pairs))
                            last = max(last, lsn)
                        self._fresh = None
                    if end >= len(items):
                        gate = self._gate(last)
        finally:
            if claimed < len(items):
                with self.lock:
                    self._claim(items[claimed:], -1)
        self._await(gate, last)
        return results

    def _check_writable(self) -> None:
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
            self._release_waiters(_ALL)
        with self._applied:
            self._applied.notify_all()

    def _backpressure(self) -> None:
        if len(self.overlay) < _MAX_PENDING:
            return
        self._apply_wakeup.set()
        with self._applied:
            self._applied.wait_for(lambda: len(self.overlay) < _MAX_PENDING or self.failure is not None or self._stopping)

    def _sequence(self, txn: lmdb.Transaction, message: Message, recipients: tuple[int, ...]) -> tuple[int, bool, Pairs, int]:
        """Dedup, assign ids and cursors, frame the record; return (msg_id, duplicate, pairs, lsn).

        Sequencing lock held.  The LSN of a duplicate is that of its first
        delivery (0 if long applied), so the caller waits until it is durable.
        """
        overlay, state = self.overlay, self._state
        sender, client_seq = message.sender, message.client_seq
        first = self._first_delivery(txn, message, recipients)
        if first is not None:
            return first[0], True, first[1], first[2]
        msg_id = self._ids.next()
        pairs: Pairs = tuple((uid, (overlay.head(uid) or state.head(txn, uid)) + 1) for uid in recipients)
        ts_ms = msg_id_ms(msg_id) if message.ts_ms is None else message.ts_ms
        record = Deliver(msg_id, sender, message.conv, client_seq, ts_ms, message.priority, message.body, pairs)
        lsn = self._next_lsn
        self._frames.append(_codec.encode_deliver_frame(lsn, self._synced_lsn, record))
        self._next_lsn = lsn + 1  # only once the frame exists: an encoding error reserves nothing
        if self._flusher_idle:
            self._work.notify()
        overlay.add(lsn, record)
        if len(overlay) == _APPLY_BATCH:
            self._apply_wakeup.set()
        return msg_id, False, pairs, lsn

    # --- idempotency --------------------------------------------------------------------

    def _first_delivery(self, txn: lmdb.Transaction, message: Message, recipients: tuple[int, ...]) -> tuple[int, Pairs, int] | None:
        """The live first delivery of ``message``'s key as (msg_id, pairs, lsn), or None if the key is new.

        Raises :class:`IdempotencyConflict` if that delivery's conv, body or
        set of recipients differ from ``message``'s.  The LSN is that of a
        pending (unapplied) first delivery, 0 if applied.  Sequencing lock held.
        """
        key = (message.sender, message.client_seq)
        fresh = self._fresh
        if fresh is not None and fresh[0] is txn and key in fresh[1]:
            # deliver_many's check found the key new a moment ago, in this very transaction
            # and lock hold: nothing can have delivered it since (but its own earlier item,
            # hence discard: a repeat of the key is looked up).  Saves the lookups twice.
            fresh[1].discard(key)
            return None
        pending = self.overlay.dedup(*key)
        if pending is not None and self._live(pending[1].msg_id):
            lsn, first = pending
            differs = [name for name, same in (("conv", first.conv == message.conv), ("body", first.body == message.body)) if not same]
            if not _same_recipients(first.pairs, recipients):
                differs.append("recipients")
            if differs:
                raise _conflict(key, first.msg_id, f"differs from the first delivery (msg_id {first.msg_id}) in {', '.join(differs)}")
            return first.msg_id, first.pairs, lsn
        # An expired pending entry is the newest of its key: LMDB can only hold an older one.
        seen = None if pending is not None else self._state.dedup_entry(txn, *key)
        if seen is not None and self._live(seen.msg_id):
            differs = [] if seen.fingerprint == _codec.dedup_fingerprint(message.conv, message.body) else ["conv or body"]
            if not _same_recipients(seen.pairs, recipients):
                differs.append("recipients")
            if differs:
                raise _conflict(key, seen.msg_id, f"differs from the first delivery (msg_id {seen.msg_id}) in {', '.join(differs)}")
            return seen.msg_id, seen.pairs, 0
        claim = self._claims.get(key) if self._claims else None
        if claim is not None and not _same_content(claim[0], claim[1], message, recipients):
            raise _conflict(key, None, "a concurrent deliver_many is delivering it with other content")
        return None

    def _live(self, msg_id: int) -> bool:
        """Whether a first delivery with this msg_id is inside the dedup window.  Sequencing lock held.

        The clock used never goes backwards: an entry once expired stays so
        (the purge may have removed it already), and deliver_many's check
        and its sequencing cannot disagree about a key.
        """
        now = self._clock()
        if now > self._dedup_now:
            self._dedup_now = now
        return self._dedup_now - msg_id_ms(msg_id) <= self._dedup_window_ms

    def _check_batch(self, txn: lmdb.Transaction, items: Sequence[tuple[Message, tuple[int, ...]]]) -> None:
        """Raise :class:`IdempotencyConflict` if any item conflicts with its key's first delivery or an earlier item.

        A repeat of a key within the batch with the same content is fine (a
        duplicate, as in :meth:`deliver`).  Sequencing lock held.
        """
        firsts: dict[Key, int] = {}  # key -> index of its first item in this batch
        fresh: set[Key] = set()  # keys of the first chunk found new (sequenced in this same lock hold)
        pending, stored, claims, chunk = self.overlay.dedup, self._state.dedup_entry, self._claims, BULK_CHUNK
        for index, (message, recipients) in enumerate(items):
            key = (message.sender, message.client_seq)
            earlier = firsts.setdefault(key, index)
            if earlier == index:
                # Most keys of a bulk load are new: tell so without _first_delivery's call.
                if pending(*key) is None and stored(txn, *key) is None and key not in claims:
                    if index < chunk:
                        fresh.add(key)
                elif self._first_delivery(txn, message, recipients) is None and index < chunk:
                    fresh.add(key)
            elif not _same_content(*items[earlier], message, recipients):
                self._first_delivery(txn, message, recipients)  # names the stored first delivery, if any
                raise _conflict(key, None, f"items[{earlier}] and items[{index}] of the batch differ in conv, body or recipients")
        # Only this transaction's sequencing may use it; a memo left behind by an error
        # names a transaction no one else holds, and the next batch replaces it.
        self._fresh = (txn, fresh)

    def _claim(self, items: Sequence[tuple[Message, tuple[int, ...]]], change: int) -> None:
        """Add (change=1) or drop (change=-1) the claims of ``items`` on their keys.  Sequencing lock held.

        Claims on one key always carry the same content: a batch whose item
        differs from a claim fails its check before claiming anything.
        """
        claims = self._claims
        for message, recipients in items:
            key = (message.sender, message.client_seq)
            claim = claims.get(key)
            if claim is None:
                if change > 0:
                    claims[key] = [message, recipients, change]
            elif claim[2] + change > 0:
                claim[2] += change
            else:
                del claims[key]

    # --- group commit ---------------------------------------------------------------

    def _gate(self, lsn: int) -> _thread.LockType | None:
        """A held lock the flusher releases once ``lsn`` is acknowledged (None if it is).  Sequencing lock held."""
        if lsn <= self.acked_lsn:
            return None
        gate = _thread.allocate_lock()
        gate.acquire()
        heapq.heappush(self._waiters, (lsn, next(self._tiebreak), gate))
        return gate

    def _await(self, gate: _thread.LockType | None, lsn: int) -> None:
        """Block on ``gate`` until ``lsn`` is acknowledged; raise if the writer failed or stopped first."""
        if gate is None:
            return
        gate.acquire()
        if lsn > self.acked_lsn:
            raise self._failure_copy() if self.failure is not None else StoreClosed("the store was closed", path=self._path)

    def _release_waiters(self, upto_lsn: int) -> None:
        """Wake every caller waiting for an LSN <= ``upto_lsn``.  Sequencing lock held."""
        waiters = self._waiters
        while waiters and waiters[0][0] <= upto_lsn:
            heapq.heappop(waiters)[2].release()

    def _flush_loop(self) -> None:
        """Write (and sync) every frame sequenced so far, back to back, until stopped."""
        while True:
            with self.lock:
                self._release_waiters(self.acked_lsn)
                while not self._frames and not self._stopping:
                    self._flusher_idle = True
                    self._work.wait()
                self._flusher_idle = False
                frames, self._frames = self._frames, []
                last = self._next_lsn - 1
            if not frames and self._stopping:
                return
            try:
                self._wal.append(b"".join(frames), last, self._written_lsn + 1)
                self._written_lsn = last
                if self._durability == "sync":
                    self._wal.sync()  # a no-op after an O_DSYNC append; kept for clarity
                    self._synced_lsn = last
            except SyncStoreError as error:
                self._fail(error)
                return
            self.acked_lsn = last

    # --- applier ----------------------------------------------------------------------

    def _apply_loop(self) -> None:
        interval = APPLY_INTERVAL_S[self._durability]
        next_purge = 0.0
        while not self._stopping:
            self._apply_wakeup.wait(interval)
            self._apply_wakeup.clear()
            if self.failure is not None or self._stopping:
                return  # close() does the final apply itself; abandon() must not
            try:
                self.apply_pending()
                if time.monotonic() >= next_purge:
                    removed = self._state.purge_dedup(self._clock() - self._dedup_window_ms, _PURGE_BATCH)
                    next_purge = 0.0 if removed == _PURGE_BATCH else time.monotonic() + 1.0
            except SyncStoreError as error:
                self._fail(error)
                return
            except Exception as error:  # never let the applier die silently
                self._fail(DurabilityError(f"applier failed: {error!r}", path=self._path))
                return

    def apply_pending(self) -> None:
        """Move acknowledged, durable records from the overlay into LMDB.

        At most :data:`_APPLY_TXN_RECORDS` per LMDB transaction: a write
        transaction holds every page it dirties in memory, so this bounds the
        process's memory however far behind the applier is.
        """
        if self._durability != "sync":
            written = self._written_lsn
            self._wal.sync()  # LMDB must never get ahead of the durable WAL
            self._synced_lsn = max(self._synced_lsn, written)
        upto = self._synced_lsn
        applied = 0
        while True:
            with self.lock:
                records, last = self.overlay.take(upto, _APPLY_TXN_RECORDS)
            if not records:
                break
            self._state.apply(records, last)
            with self.lock:
                self.overlay.forget(last)
            with self._applied:
                self._applied.notify_all()
            applied = last
        if applied and len(self._wal.segment_paths()) > 1:
            self._state.sync()  # the applied LSN must be durable before its WAL goes
            self._wal.retire(applied)

    # --- reads and checks -----------------------------------------------------------------

    def pending(self, user: int, since: int) -> tuple[list[StoredMessage], int]:
        """Acknowledged, not yet applied messages of ``user`` after ``since``, and their head (0 if none)."""
        if not len(self.overlay):
            return [], 0
        with self.lock:
            return self.overlay.visible(user, since, self.acked_lsn)

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
        """Acknowledge everything sequenced, stop the threads, apply the rest.

        Raises the failure if the final flush fails; the threads are stopped
        either way.
        """
        try:
            if self.failure is None:
                with self.lock:
                    gate = self._gate(self._next_lsn - 1)
                self._await(gate, self._next_lsn - 1)
        finally:
            self._stop()
            if self.failure is None:
                self.apply_pending()

    def abandon(self) -> None:
        """Stop as a killed process would: drop unwritten frames, apply nothing."""
        with self.lock:
            self._frames = []
        self._stop()

    def _stop(self) -> None:
        with self.lock:
            self._stopping = True
            self._work.notify()
            self._release_waiters(_ALL)
        self._apply_wakeup.set()
        with self._applied:
            self._applied.notify_all()
        for thread in self._threads:
            thread.join()


def _same_recipients(pairs: Pairs, recipients: tuple[int, ...]) -> bool:
    """Whether a first delivery's (user, cursor) pairs name the same set of users as ``recipients``.

    Both sides list each user once (deliver drops repeats), so equal sizes and
    equal sets are the test; the order of ``to`` is not part of the content.
    """
    if len(pairs) != len(recipients):
        return False
    if len(pairs) == 1:
        return pairs[0][0] == recipients[0]
    return {uid for uid, _cursor in pairs} == set(recipients)


def _same_content(first: Message, first_to: tuple[int, ...], message: Message, to: tuple[int, ...]) -> bool:
    """Whether two deliveries of one key carry the same conv, body and set of recipients."""
    return first.conv == message.conv and first.body == message.body and (first_to == to or set(first_to) == set(to))


def _conflict(key: Key, msg_id: int | None, detail: str) -> IdempotencyConflict:
    return IdempotencyConflict(f"idempotency key reused with different content: {detail}", key=key, msg_id=msg_id)
