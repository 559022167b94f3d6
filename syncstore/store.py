"""The Store facade: open, deliver, deliver_many, sync, head, check, close.

Write path (docs/design.md has the long version):

1. ``deliver`` validates everything before touching any state.
2. Under the *sequencing lock* it looks the idempotency key up (overlay, then
   LMDB), assigns the msg_id and each recipient's next cursor, encodes one WAL
   frame and adds the record to the overlay.  Nothing here does I/O beyond
   LMDB reads, so the lock is held for microseconds.
3. It then waits for its LSN to be acknowledged.  The first waiter becomes the
   *group-commit leader*: it takes every frame sequenced so far, writes them
   with one ``write`` and (durability "sync") one ``fdatasync``, acknowledges
   them all and wakes the others.  Threads that arrive meanwhile form the next
   group.
4. A background *applier* moves acknowledged records from the overlay into
   LMDB in large batches (one LMDB commit each), so LMDB's own fsync is paid
   per batch rather than per group.

Reads (``sync``, ``head``) merge the LMDB state with the overlay's
acknowledged records, so every acknowledged write is visible at once.
"""

from __future__ import annotations

import _thread
import fcntl
import heapq
import itertools
import logging
import os
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence

import lmdb

from . import _codec
from ._codec import RECORD_DELIVER, Deliver, Pairs
from ._fileio import OS_FS, FileSystem
from ._ids import MAX_REPLICA, MessageIds, msg_id_ms
from ._overlay import Overlay
from .errors import (
    CorruptionError,
    DurabilityError,
    InvalidArgument,
    ReadOnlyStore,
    StoreClosed,
    StoreLocked,
    SyncStoreError,
    UsedAfterFork,
)
from ._codec import unpack_inbox_head
from .model import MAX_U64, Delivery, Message, Messages, Page, StoredMessage, check_u64
from .state import State, state_dir
from .wal import DEFAULT_SEGMENT_BYTES, WriteAheadLog

__all__ = ["Store", "open", "DURABILITY_MODES"]

log = logging.getLogger("syncstore.store")

DAY_MS = 86_400_000
#: "sync": acknowledged = fdatasync'd (default).  "interval": acknowledged =
#: written to the OS; fdatasync at least every 100 ms.  "none": acknowledged =
#: written to the OS; fdatasync only when the applier needs it (about every second).
DURABILITY_MODES = ("sync", "interval", "none")
_APPLY_INTERVAL_S = {"sync": 0.02, "interval": 0.1, "none": 1.0}
MAX_SYNC_LIMIT = 10_000
MAX_RECIPIENTS = 100_000
DEFAULT_MAX_BODY = 1 << 20
DEFAULT_MAP_SIZE = 64 << 30
_APPLY_BATCH = 8_192  # wake the applier once this many records wait
_MAX_PENDING = 65_536  # stop sequencing while this many records wait (bounded memory)
_BULK_CHUNK = 16_384  # deliver_many commits in chunks of this many messages
_REPLAY_BATCH = 20_000
_PURGE_BATCH = 1_000

_open_paths: dict[str, weakref.ref[Store]] = {}
_open_paths_lock = threading.Lock()
_live_stores: weakref.WeakSet[Store] = weakref.WeakSet()


def _mark_forked() -> None:
    for store in list(_live_stores):
        store._forget_after_fork()
    _open_paths.clear()


os.register_at_fork(after_in_child=_mark_forked)


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def open(  # noqa: A001 - the public name is the contract
    path: str | os.PathLike[str],
    *,
    durability: str = "sync",
    readonly: bool = False,
    replica_id: int = 0,
    map_size: int = DEFAULT_MAP_SIZE,
    dedup_window_ms: int = 7 * DAY_MS,
    hot_window_ms: int = 7 * DAY_MS,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    clock_ms: Callable[[], int] | None = None,
    fs: FileSystem | None = None,
) -> Store:
    """Open (creating if needed) the store in directory ``path``.

    ``durability`` is one of :data:`DURABILITY_MODES` (trade-offs in
    docs/design.md).  ``readonly=True`` opens for reading while a writer in
    another process runs; it sees what the writer has applied to LMDB (at most
    one apply interval behind).  ``replica_id`` (0..1023) must be unique per
    replica and is fixed at creation.  ``dedup_window_ms`` (>= the hot window)
    is how long an idempotency key is remembered.  ``clock_ms`` and ``fs`` are
    seams for tests and simulations.

    Raises :class:`StoreLocked` if another writer holds the store,
    :class:`CorruptionError` if the log or state is damaged,
    :class:`InvalidArgument` for bad options.
    """
    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
        raise InvalidArgument(f"path must be a str or os.PathLike naming a directory, got {path!r}", key="path")
    return Store(
        os.fspath(path),
        durability=durability,
        readonly=readonly,
        replica_id=replica_id,
        map_size=map_size,
        dedup_window_ms=dedup_window_ms,
        hot_window_ms=hot_window_ms,
        max_body_bytes=max_body_bytes,
        segment_bytes=segment_bytes,
        clock_ms=clock_ms,
        fs=fs,
    )


def _check_option_int(name: str, value: object, low: int, high: int | None = None) -> None:
    if type(value) is not int or value < low or (high is not None and value > high):  # type: ignore[operator]
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise InvalidArgument(f"{name} must be an int {bound}, got {value!r}", key=name)


class Store:
    """An open syncstore; create with :func:`syncstore.open`.  Thread-safe; not fork-safe."""

    def __init__(
        self,
        path: str,
        *,
        durability: str,
        readonly: bool,
        replica_id: int,
        map_size: int,
        dedup_window_ms: int,
        hot_window_ms: int,
        max_body_bytes: int,
        segment_bytes: int,
        clock_ms: Callable[[], int] | None,
        fs: FileSystem | None,
    ) -> None:
        if durability not in DURABILITY_MODES:
            raise InvalidArgument(f"durability must be one of {DURABILITY_MODES}, got {durability!r}", key="durability")
        _check_option_int("replica_id", replica_id, 0, MAX_REPLICA)
        _check_option_int("map_size", map_size, 1 << 20)
        _check_option_int("hot_window_ms", hot_window_ms, 1)
        _check_option_int("dedup_window_ms", dedup_window_ms, hot_window_ms)
        _check_option_int("max_body_bytes", max_body_bytes, 0, 64 << 20)
        _check_option_int("segment_bytes", segment_bytes, 4096)
        if type(readonly) is not bool:
            raise InvalidArgument(f"readonly must be True or False, got {readonly!r}", key="readonly")
        if clock_ms is not None and not callable(clock_ms):
            raise InvalidArgument(f"clock_ms must be a callable returning epoch milliseconds, got {clock_ms!r}", key="clock_ms")
        if fs is not None and not isinstance(fs, FileSystem):
            raise InvalidArgument(f"fs must be a syncstore._fileio.FileSystem, got {fs!r}", key="fs")
        if os.path.exists(path) and not os.path.isdir(path):
            raise InvalidArgument(f"{path} exists and is not a directory", path=path, key="path")
        self.path = path
        self.durability = durability
        self.readonly = readonly
        self.dedup_window_ms = dedup_window_ms
        self.hot_window_ms = hot_window_ms
        self.max_body_bytes = max_body_bytes
        self._clock = clock_ms or _wall_clock_ms
        self._fs = fs or OS_FS
        self._closed = False
        self._forked = False
        self._lock_fd = -1
        self._failure: SyncStoreError | None = None
        self._overlay = Overlay()
        self._lock = threading.Lock()  # sequencing: dedup, ids, cursors, frames, overlay
        # Callers waiting for their LSN: a heap of (lsn, tiebreak, held lock); the
        # flusher releases exactly the ones it acknowledged (no thundering herd).
        self._waiters: list[tuple[int, int, _thread.LockType]] = []
        self._tiebreak = itertools.count()
        self._applied_cond = threading.Condition()  # applier progress (back-pressure)
        self._apply_wakeup = threading.Event()
        self._work = threading.Condition(self._lock)  # wakes the idle flusher
        self._flusher_idle = False
        self._flusher: threading.Thread | None = None
        self._frames: list[bytes] = []
        self._applier: threading.Thread | None = None
        self._wal: WriteAheadLog | None = None
        self._register()
        try:
            self._open_files(replica_id, map_size, segment_bytes)
        except BaseException:
            self._release()
            raise
        _live_stores.add(self)

    # --- opening ------------------------------------------------------------------

    def _register(self) -> None:
        key = os.path.realpath(self.path)
        with _open_paths_lock:
            other = _open_paths.get(key)
            if other is not None and other() is not None and not other()._closed:  # type: ignore[union-attr]
                raise StoreLocked(
                    "the store is already open in this process",
                    path=self.path,
                    holder=f"pid {os.getpid()} (this process)",
                    hint="share the open Store object; LMDB must not be opened twice in one process",
                )
            _open_paths[key] = weakref.ref(self)
        self._registry_key = key

    def _open_files(self, replica_id: int, map_size: int, segment_bytes: int) -> None:
        if self.readonly:
            if not os.path.isdir(state_dir(self.path)):
                raise InvalidArgument(f"no store at {self.path}", path=self.path, hint="open it once without readonly=True to create it")
            self._state = State(state_dir(self.path), readonly=True, map_size=map_size)
            return
        os.makedirs(os.path.join(self.path, "wal"), exist_ok=True)
        os.makedirs(state_dir(self.path), exist_ok=True)
        self._take_lock()
        self._state = State(state_dir(self.path), readonly=False, map_size=map_size)
        recorded = self._state.replica_id()
        if recorded is None:
            self._state.set_replica_id(replica_id)
        elif recorded != replica_id:
            raise InvalidArgument(
                f"this store was created with replica_id {recorded}, not {replica_id}", key="replica_id", hint=f"open it with replica_id={recorded}"
            )
        applied = self._state.applied_lsn()
        self._wal = WriteAheadLog.open(
            os.path.join(self.path, "wal"),
            next_lsn=applied + 1,
            fs=self._fs,
            segment_bytes=segment_bytes,
            sync_writes=self.durability == "sync",
        )
        # Recovered frames may never have been fsynced ("none" mode before a crash):
        # make them durable before LMDB, which must never be ahead of the durable WAL, gets them.
        self._wal.sync()
        self._replay(applied)
        end = self._wal.end_lsn
        self._next_lsn = end + 1
        self._written_lsn = self._synced_lsn = self._acked_lsn = end
        self._state.sync()
        self._wal.retire(end)
        self._ids = MessageIds(replica_id, self._clock, floor=self._state.last_msg_id())
        self._applier = threading.Thread(target=self._apply_loop, name=f"syncstore-applier:{self.path}", daemon=True)
        self._applier.start()
        self._flusher = threading.Thread(target=self._flush_loop, name=f"syncstore-flusher:{self.path}", daemon=True)
        self._flusher.start()

    def _take_lock(self) -> None:
        lock_path = os.path.join(self.path, "LOCK")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise StoreLocked(f"another writer holds the store: {holder}", path=lock_path, holder=holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid={os.getpid()} host={socket.gethostname()} cmd={' '.join(sys.argv)[:200]}\n".encode(), 0)
        self._lock_fd = fd

    def _replay(self, applied: int) -> None:
        assert self._wal is not None
        batch: list[Deliver] = []
        last = applied
        for frame in self._wal.frames(applied):
            batch.append(_decode_record(frame, self._wal))
            last = frame.lsn
            if len(batch) >= _REPLAY_BATCH:
                self._state.apply(batch, last)
                batch = []
        if batch or last != applied:
            self._state.apply(batch, last)
        if last != applied:
            log.info("replayed WAL records %d..%d into %s", applied + 1, last, self.path)

    # --- guards -------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._forked:
            raise UsedAfterFork("this store was opened in the parent process", path=self.path)
        if self._closed:
            raise StoreClosed("the store is closed", path=self.path)

    def _check_writable(self) -> None:
        """Call with the sequencing lock held."""
        self._check_usable()
        if self.readonly:
            raise ReadOnlyStore("the store was opened with readonly=True", path=self.path)
        if self._failure is not None:
            raise self._failure_copy()

    def _failure_copy(self) -> SyncStoreError:
        failure = self._failure
        assert failure is not None
        return type(failure)(f"the store stopped accepting writes: {failure.message}", path=failure.path, hint=failure.hint)

    def _fail(self, error: SyncStoreError) -> None:
        if self._failure is None:
            self._failure = error
            log.error("store %s stops accepting writes: %s", self.path, error)
        with self._lock:
            self._release_waiters(2**64)
        with self._applied_cond:
            self._applied_cond.notify_all()

    # --- validation ---------------------------------------------------------------

    def _recipients(self, to: object) -> tuple[int, ...]:
        if type(to) is not list and type(to) is not tuple:
            if isinstance(to, (str, bytes, bytearray)) or not isinstance(to, Iterable):
                raise InvalidArgument(f"to must be a list of user ids, got {type(to).__name__}", key="to")
        for uid in to:  # type: ignore[attr-defined]
            if type(uid) is not int or not 0 <= uid <= MAX_U64:
                check_u64("recipient id", uid)  # raises, with the precise reason
        recipients = tuple(dict.fromkeys(to))  # type: ignore[arg-type]  # drop repeats, keep order
        if not recipients:
            raise InvalidArgument("to must name at least one recipient", key="to")
        if len(recipients) > MAX_RECIPIENTS:
            raise InvalidArgument(f"at most {MAX_RECIPIENTS} recipients per message, got {len(recipients)}", key="to")
        return recipients

    def _check_message(self, message: object) -> Message:
        if not isinstance(message, Message):
            raise InvalidArgument(f"message must be a syncstore.Message, got {type(message).__name__}", key="message")
        if len(message.body) > self.max_body_bytes:
            raise InvalidArgument(
                f"body is {len(message.body)} bytes, over the {self.max_body_bytes}-byte limit", key="body", hint="split the body or raise max_body_bytes"
            )
        return message

    # --- writes -------------------------------------------------------------------

    def deliver(self, message: Message, to: Sequence[int]) -> Delivery:
        """Append ``message`` to the inbox of every user in ``to``; return when durable.

        Returns the :class:`Delivery` (msg_id and each recipient's new cursor).
        A retry of the same ``(sender, client_seq)`` inside the dedup window
        writes nothing and returns the first delivery with ``duplicate=True``.
        Repeated ids in ``to`` count once.  Safe from many threads; concurrent
        calls share one WAL write and fsync.
        """
        message = self._check_message(message)
        recipients = self._recipients(to)
        self._check_usable()  # before taking the lock: a forked child may find it held forever
        self._backpressure()
        with self._lock:
            self._check_writable()
            txn = self._state.env.begin()
            try:
                msg_id, duplicate, pairs, lsn = self._sequence(txn, message, recipients)
            finally:
                txn.abort()
            gate = self._gate(lsn)
        self._await(gate, lsn)
        return Delivery.of(msg_id, duplicate, pairs)

    def deliver_many(self, items: Iterable[tuple[Message, Sequence[int]]]) -> list[Delivery]:
        """Deliver many ``(message, to)`` pairs with one group commit; results in order.

        Every item is validated before anything is written.  Very large
        batches are committed in chunks of 16,384 messages to bound memory.
        Duplicates (also within the batch) behave as in :meth:`deliver`.
        """
        self._check_usable()
        if self.readonly:
            raise ReadOnlyStore("the store was opened with readonly=True", path=self.path)
        if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
            raise InvalidArgument(f"items must be an iterable of (message, to) pairs, got {type(items).__name__}", key="items")
        checked = []
        for index, item in enumerate(items):
            if not isinstance(item, tuple) or len(item) != 2:
                raise InvalidArgument(f"items[{index}] must be a (message, to) pair", key="items")
            checked.append((self._check_message(item[0]), self._recipients(item[1])))
        results: list[Delivery] = []
        for start in range(0, len(checked), _BULK_CHUNK):
            self._backpressure()
            last = 0
            with self._lock:
                self._check_writable()
                with self._state.read() as txn:
                    for message, recipients in checked[start : start + _BULK_CHUNK]:
                        msg_id, duplicate, pairs, lsn = self._sequence(txn, message, recipients)
                        results.append(Delivery.of(msg_id, duplicate, pairs))
                        last = max(last, lsn)
                gate = self._gate(last)
            self._await(gate, last)
        return results

    def _backpressure(self) -> None:
        if len(self._overlay) < _MAX_PENDING:
            return
        self._apply_wakeup.set()
        with self._applied_cond:
            self._applied_cond.wait_for(lambda: len(self._overlay) < _MAX_PENDING or self._failure is not None or self._closed)

    def _sequence(self, txn: lmdb.Transaction, message: Message, recipients: tuple[int, ...]) -> tuple[int, bool, Pairs, int]:
        """Dedup, assign ids and cursors, frame the record; return (msg_id, duplicate, pairs, lsn).

        Sequencing lock held.  The LSN of a duplicate is that of its first
        delivery (0 if long applied), so the caller waits until it is durable.
        """
        overlay, state = self._overlay, self._state
        sender, client_seq = message.sender, message.client_seq
        pending = overlay.dedup(sender, client_seq)
        if pending is not None:
            lsn, msg_id, pairs = pending
            return msg_id, True, pairs, lsn
        seen = state.dedup_entry(txn, sender, client_seq)
        if seen is not None and self._clock() - msg_id_ms(seen[0]) <= self.dedup_window_ms:
            return seen[0], True, seen[1], 0
        msg_id = self._ids.next()
        pairs: Pairs = tuple((uid, (overlay.head(uid) or state.head(txn, uid)) + 1) for uid in recipients)
        record = Deliver(
            msg_id,
            sender,
            message.conv,
            client_seq,
            msg_id_ms(msg_id) if message.ts_ms is None else message.ts_ms,
            message.priority,
            message.body,
            pairs,
        )
        lsn = self._next_lsn
        self._frames.append(_codec.encode_deliver_frame(lsn, record))
        self._next_lsn = lsn + 1
        if self._flusher_idle:
            self._work.notify()
        overlay.add(lsn, record)
        if len(overlay) == _APPLY_BATCH:
            self._apply_wakeup.set()
        return msg_id, False, pairs, lsn

    def _gate(self, lsn: int) -> _thread.LockType | None:
        """A held lock the flusher releases once ``lsn`` is acknowledged (None if it is).  Sequencing lock held."""
        if lsn <= self._acked_lsn:
            return None
        gate = _thread.allocate_lock()
        gate.acquire()
        heapq.heappush(self._waiters, (lsn, next(self._tiebreak), gate))
        return gate

    def _await(self, gate: _thread.LockType | None, lsn: int) -> None:
        """Block on ``gate`` until ``lsn`` is acknowledged; raise if the store failed first."""
        if gate is None:
            return
        gate.acquire()
        if lsn > self._acked_lsn:
            raise self._failure_copy() if self._failure is not None else StoreClosed("the store was closed", path=self.path)

    def _release_waiters(self, upto_lsn: int) -> None:
        """Wake every caller waiting for an LSN <= ``upto_lsn``.  Sequencing lock held."""
        waiters = self._waiters
        while waiters and waiters[0][0] <= upto_lsn:
            heapq.heappop(waiters)[2].release()

    def _flush_loop(self) -> None:
        """Group commit: write (and sync) every frame sequenced so far, back to back."""
        assert self._wal is not None
        while True:
            with self._lock:
                self._release_waiters(self._acked_lsn)
                while not self._frames and not self._closed:
                    self._flusher_idle = True
                    self._work.wait()
                self._flusher_idle = False
                frames, self._frames = self._frames, []
                last = self._next_lsn - 1
            if not frames and self._closed:
                return
            try:
                self._wal.append(b"".join(frames), last, self._written_lsn + 1)
                self._written_lsn = last
                if self.durability == "sync":
                    self._wal.sync()
                    self._synced_lsn = last
            except SyncStoreError as error:
                self._fail(error)
                return
            self._acked_lsn = last

    # --- applier ------------------------------------------------------------------

    def _apply_loop(self) -> None:
        interval = _APPLY_INTERVAL_S[self.durability]
        next_purge = 0.0
        while not self._closed:
            self._apply_wakeup.wait(interval)
            self._apply_wakeup.clear()
            if self._failure is not None:
                return
            try:
                self._apply_once()
                if time.monotonic() >= next_purge:
                    removed = self._state.purge_dedup(self._clock() - self.dedup_window_ms, _PURGE_BATCH)
                    next_purge = 0.0 if removed == _PURGE_BATCH else time.monotonic() + 1.0
            except SyncStoreError as error:
                self._fail(error)
                return
            except Exception as error:  # never let the applier die silently
                self._fail(DurabilityError(f"applier failed: {error!r}", path=self.path))
                return

    def _apply_once(self) -> None:
        """Move acknowledged, durable records from the overlay into LMDB."""
        assert self._wal is not None
        if self.durability != "sync":
            written = self._written_lsn
            self._wal.sync()  # LMDB must never get ahead of the durable WAL
            self._synced_lsn = max(self._synced_lsn, written)
        upto = self._synced_lsn
        with self._lock:
            records = self._overlay.take(upto)
        if not records:
            return
        self._state.apply(records, upto)
        with self._lock:
            self._overlay.forget(upto)
        with self._applied_cond:
            self._applied_cond.notify_all()
        if len(self._wal.segment_paths()) > 1:
            self._state.sync()  # the applied LSN must be durable before its WAL goes
            self._wal.retire(upto)

    # --- reads --------------------------------------------------------------------

    def sync(self, user: int, since: int = 0, limit: int = 100) -> Page:
        """Up to ``limit`` messages of ``user`` with cursor > ``since``, ascending.

        Pass the returned ``page.next`` as ``since`` to continue; ``has_more``
        says whether more messages are waiting.  ``limit`` is 1..10,000.
        """
        self._check_usable()
        check_u64("user", user)
        check_u64("since", since)
        if type(limit) is not int or not 1 <= limit <= MAX_SYNC_LIMIT:
            raise InvalidArgument(f"limit must be an int in 1..{MAX_SYNC_LIMIT}, got {limit!r}", key="limit")
        pending: list[StoredMessage] = []
        pending_head = 0
        if len(self._overlay):
            # Overlay first, LMDB second: a record the applier moves in between is
            # then seen twice (and merged), never missed.
            with self._lock:
                pending, pending_head = self._overlay.visible(user, since, self._acked_lsn)
        txn = self._state.env.begin()
        try:
            applied_head = self._state.head(txn, user)
            items: list[bytes | StoredMessage] = self._state.scan_inbox(txn, user, since, limit, applied_head)  # type: ignore[assignment]
        finally:
            txn.abort()
        last = unpack_inbox_head(items[-1])[0] if items else since  # type: ignore[arg-type]
        if pending and len(items) < limit:
            items.extend([m for m in pending if m.cursor > last][: limit - len(items)])
            last = items[-1][0] if type(items[-1]) is StoredMessage else last  # type: ignore[index]
        return Page(Messages(items), last, last < max(applied_head, pending_head))

    def head(self, user: int) -> int:
        """The user's latest acknowledged cursor (0 if the user has no messages)."""
        self._check_usable()
        check_u64("user", user)
        pending_head = 0
        if len(self._overlay):
            with self._lock:
                _messages, pending_head = self._overlay.visible(user, MAX_CURSOR, self._acked_lsn)
        with self._state.read() as txn:
            return max(self._state.head(txn, user), pending_head)

    # --- verification and lifecycle -------------------------------------------------

    def check(self) -> dict[str, int]:
        """Self-verification; raises :class:`CorruptionError` on any violated invariant.

        Checks that every user's cursors are dense and match its head, the
        dedup index points at real deliveries, the applied LSN is not beyond
        the WAL end, and unapplied records densely continue the applied state.
        Returns counts (users, messages, dedup_entries, applied_lsn, pending).
        Cost is proportional to the store's size.
        """
        self._check_usable()
        wal_end = self._wal.end_lsn if self._wal is not None else 2**64
        with self._lock:
            counts = self._state.check(wal_end)
            with self._state.read() as txn:
                heads = dict(self._state.iter_heads(txn))
                applied = self._state.applied_lsn(txn)
            problem = self._overlay.check_continues(heads, applied)
            pending = len(self._overlay)
        if problem is not None:
            raise CorruptionError(f"unapplied records do not continue the state: {problem}", path=self.path)
        return {**counts, "pending": pending}

    def close(self) -> None:
        """Flush, apply everything acknowledged, and close.  Idempotent."""
        if self._closed or self._forked:
            return
        try:
            if not self.readonly and self._failure is None:
                with self._lock:
                    gate = self._gate(self._next_lsn - 1)
                self._await(gate, self._next_lsn - 1)
        finally:
            with self._lock:
                self._closed = True
                self._work.notify()
            self._apply_wakeup.set()
            for thread in (self._flusher, self._applier):
                if thread is not None:
                    thread.join()
            try:
                if not self.readonly and self._failure is None:
                    self._apply_once()
            finally:
                self._release()

    def _forget_after_fork(self) -> None:
        """In a forked child: disown the parent's store so the child can open its own.

        Closes only this process's copies of the LMDB environment and file
        descriptors (the parent keeps its own; flock and LMDB reader slots
        belong to the parent), and makes every method raise UsedAfterFork.
        """
        self._forked = True
        state = getattr(self, "_state", None)
        for close in (state.env.close if state is not None else None, self._wal.close if self._wal else None):
            if close is not None:
                try:
                    close()
                except Exception:  # best effort in a child; the parent is what matters
                    pass
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _abandon(self) -> None:
        """Test seam: drop the store as a killed process would (no flush, no apply, no sync).

        Whatever reached the OS stays there, as after a ``SIGKILL``; the next
        ``open`` must recover from the WAL alone.
        """
        with self._lock:
            self._closed = True
            self._frames = []
            self._work.notify()
            self._release_waiters(2**64)
        self._apply_wakeup.set()
        for thread in (self._flusher, self._applier):
            if thread is not None:
                thread.join()
        if getattr(self, "_state", None) is not None:
            self._state.env.close()
            self._state = None  # type: ignore[assignment]
        self._release()

    def _release(self) -> None:
        self._closed = True
        with self._applied_cond:
            self._applied_cond.notify_all()
        state = getattr(self, "_state", None)
        if state is not None:
            state.close()
        if self._wal is not None:
            self._wal.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1
        with _open_paths_lock:
            if _open_paths.get(self._registry_key, lambda: None)() is self:
                del _open_paths[self._registry_key]

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("read-only" if self.readonly else self.durability)
        return f"<syncstore.Store {self.path!r} {state}>"


MAX_CURSOR = 2**64 - 1


def _decode_record(frame: _codec.Frame, wal: WriteAheadLog) -> Deliver:
    if frame.rtype != RECORD_DELIVER:
        raise CorruptionError(f"unknown WAL record type {frame.rtype}", key=frame.lsn, hint="open it with the syncstore version that wrote it")
    return _codec.decode_deliver(frame.body, offset=frame.offset)
