"""Records the writer appends that no ``deliver`` sequenced: dedup expiry, and a follower's copy of its leader's log.

A mixin of :class:`~syncstore._writer.Writer`, split from it by capability:
both kinds go through the same frames, overlay, group commit and applier as a
delivery -- one mechanism for every write -- but are framed here:

* :meth:`RecordAppends.expire_dedup`: the applier turns idempotency keys past
  the dedup window into one EXPIRE record (never on a follower, whose log is
  its leader's).
* :meth:`RecordAppends.append_local`: a local write of any kind but a delivery
  (a read marker, per-user state, an archive move): the caller builds its
  record under the sequencing lock, from the state it reads there, and waits
  until it is acknowledged like a delivery.
* :meth:`RecordAppends.append_records`: a follower appends its leader's
  records at their own LSNs (duplicates skipped, gaps and diverging cursors
  refused before anything is appended); :meth:`RecordAppends.restart_log`
  starts an empty follower's log after a snapshot bootstrap.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import lmdb

from . import _codec
from ._codec import RECORD_EXPIRE, Deliver, Expire, Record
from .errors import CorruptionError, LogGap, SyncStoreError

if TYPE_CHECKING:
    from ._ids import MessageIds
    from ._overlay import Overlay
    from .state import State
    from .wal import WriteAheadLog

__all__ = ["RecordAppends", "PURGE_BATCH"]

R = TypeVar("R", bound=Record)

PURGE_BATCH = 1_000  # idempotency keys per EXPIRE record, at most


class RecordAppends:
    """The appends of the module docstring; relies on the Writer's locks, frames, overlay and gate."""

    _path: str
    _state: State
    _wal: WriteAheadLog
    _ids: MessageIds
    _clock: Callable[[], int]
    _dedup_window_ms: int
    _expire_lsn: int
    _next_lsn: int
    _frames: list[bytes]
    _flusher_idle: bool
    _apply_lock: threading.Lock
    _synced: threading.Condition
    _work: threading.Condition
    lock: threading.Lock
    overlay: Overlay
    leader: bool
    failure: SyncStoreError | None
    _stopping: bool
    synced_lsn: int
    acked_lsn: int
    _written_lsn: int
    _notified_lsn: int

    if TYPE_CHECKING:

        def _backpressure(self) -> None: ...
        def _check_writable(self) -> None: ...
        def _gate(self, lsn: int) -> Any: ...
        def _await(self, waiter: Any) -> None: ...
        def _sync_if_due(self) -> None: ...

    def expire_dedup(self, limit: int = PURGE_BATCH) -> int:
        """Sequence an EXPIRE record for up to ``limit`` idempotency keys past the dedup window; return how many.

        Called by the applier (apply lock held, so LMDB's expiry index does
        not change underneath).  One EXPIRE at a time: none while the last is
        unapplied, since its keys are still in LMDB.  The record is applied
        like any other, once durable.
        """
        if not self.leader or self._expire_lsn > self._state.applied_lsn():
            return 0
        keys = self._state.expired_keys(self._clock() - self._dedup_window_ms, limit)
        if not keys:
            return 0
        with self.lock:
            if self.failure is not None or self._stopping:
                return 0
            self._expire_lsn = self._append_locked(RECORD_EXPIRE, _codec.encode_expire(Expire(keys)), Expire(keys))
        return len(keys)

    def append_local(self, build: Callable[[lmdb.Transaction], R | None]) -> R | None:
        """Sequence the record ``build(txn)`` returns and wait until it is acknowledged; return it.

        ``build`` runs under the sequencing lock with a read transaction of
        the applied state, so what it decides from that state and the
        overlay (a marker's current position, a key's type) cannot change
        before the record is framed; it validates and raises before anything
        is written, or returns None when there is nothing to write (then
        nothing is appended and None returned).  Only a leader sequences
        local writes (a follower's log is its leader's): the caller checks.
        Raises what ``build`` raises, :class:`StoreClosed`, or the writer's
        failure (:class:`StoreFull`, :class:`DurabilityError`).
        """
        self._backpressure()
        with self.lock:
            self._check_writable()
            with self._state.read() as txn:
                record = build(txn)
            if record is None:
                return None
            rtype, body = _codec.encode_record(record)
            waiter = self._gate(self._append_locked(rtype, body, record))
        self._await(waiter)
        self._sync_if_due()
        return record

    def _append_locked(self, rtype: int, body: bytes, record: Record) -> int:
        """Frame a record sequenced elsewhere (expiry, a leader's record) at the next LSN.  Sequencing lock held."""
        lsn = self._next_lsn
        self._frames.append(_codec.encode_unsealed(lsn, rtype, body))
        self._next_lsn = lsn + 1
        if self._flusher_idle:
            self._work.notify()
        self.overlay.add(lsn, record)
        return lsn

    def append_records(self, items: Sequence[tuple[int, Record]]) -> int:
        """A follower's write: append a leader's records at their own LSNs; wait until durable; return how many were new.

        A record at or below the log's end was applied before and is skipped
        (it must be the same record: the caller's stream is the leader's).
        One beyond the next LSN is a gap: :class:`InvalidArgument`-like
        :class:`~syncstore.errors.LogGap` naming the missing LSNs, and
        nothing of the batch is appended.  A delivery whose cursors do not
        continue its recipients' heads means the follower diverged from the
        leader: :class:`CorruptionError`, nothing appended.
        """
        self._backpressure()
        with self.lock:
            self._check_writable()
            expected = self._next_lsn
            fresh = [(lsn, record) for lsn, record in items if lsn >= expected]
            for lsn, record in fresh:
                if lsn != expected:
                    raise LogGap(
                        f"change {lsn} does not follow this store's log, which ends at {expected - 1}: changes {expected}..{lsn - 1} are missing",
                        path=self._path,
                        missing=(expected, lsn - 1),
                        hint=f"feed the changes from {expected} on (leader.changes(since={expected - 1}))",
                    )
                expected += 1
            with self._state.read() as txn:
                heads: dict[int, int] = {}
                head_of = self._state.head_reader(txn)
                for lsn, record in fresh:
                    if type(record) is Deliver:
                        for uid, cursor in record.pairs:
                            head = heads[uid] if uid in heads else (self.overlay.head(uid) or head_of(uid))
                            if cursor != head + 1:
                                raise CorruptionError(
                                    f"change {lsn} gives user {uid} cursor {cursor}, but this follower's head is {head}: it diverged from its leader",
                                    path=self._path,
                                    key=uid,
                                    hint="restore the follower from a snapshot of its leader",
                                )
                            heads[uid] = cursor
            last = 0
            for lsn, record in fresh:
                if type(record) is Deliver:
                    self._ids.observe(record.msg_id)
                last = self._append_locked(*_codec.encode_record(record), record)
            waiter = self._gate(last) if fresh else None
        self._await(waiter)
        self._sync_if_due()
        return len(fresh)

    @property
    def apply_lock(self) -> threading.Lock:
        """Held by whoever writes LMDB (the applier, or a follower's bootstrap)."""
        return self._apply_lock

    def observe_msg_id(self, msg_id: int) -> None:
        """Ids issued from now on stay above ``msg_id`` (a follower saw its leader issue it)."""
        with self.lock:
            self._ids.observe(msg_id)

    def restart_log(self, lsn: int) -> None:
        """A follower bootstrapped from a snapshot at ``lsn``: its empty log continues at ``lsn + 1``."""
        with self.lock:
            if self._frames or len(self.overlay) or self._next_lsn != self._wal.end_lsn + 1 or self._wal.end_lsn >= self._wal.first_lsn:
                raise AssertionError("a log restarts only while it holds nothing")
            self._wal.restart(lsn + 1)
            with self._synced:
                self._next_lsn = lsn + 1
                self._written_lsn = self.synced_lsn = self.acked_lsn = self._notified_lsn = lsn
