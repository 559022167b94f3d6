"""The Store facade: open, deliver, deliver_many, sync, head, check, close.

This module validates arguments, owns the store's files (lock file, LMDB
state, WAL) and their recovery on open, and serves reads.  The write path --
sequencing, group commit, the LMDB applier -- lives in :mod:`syncstore._writer`;
docs/design.md tells the whole story.

Reads (``sync``, ``head``) merge the LMDB state with the writer's
acknowledged-but-unapplied records, so every acknowledged write is visible at
once.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence

from . import _codec
from ._codec import RECORD_DELIVER, Deliver, unpack_inbox_head
from ._fileio import OS_FS, FileSystem
from ._ids import MAX_REPLICA, MessageIds
from ._writer import Writer
from .errors import CorruptionError, InvalidArgument, ReadOnlyStore, StoreClosed, StoreLocked, UsedAfterFork
from .model import MAX_U64, Delivery, Message, Messages, Page, StoredMessage, check_u64
from .state import State, state_dir
from .wal import DEFAULT_SEGMENT_BYTES, WriteAheadLog, io_failure

__all__ = ["Store", "open", "DURABILITY_MODES"]

log = logging.getLogger("syncstore.store")

DAY_MS = 86_400_000
#: "sync": acknowledged = fdatasync'd (default).  "interval": acknowledged =
#: written to the OS; fdatasync at least every 100 ms.  "none": acknowledged =
#: written to the OS; fdatasync only when the applier needs it (about every second).
DURABILITY_MODES = ("sync", "interval", "none")
MAX_SYNC_LIMIT = 10_000
MAX_RECIPIENTS = 100_000
DEFAULT_MAX_BODY = 1 << 20
DEFAULT_MAP_SIZE = 64 << 30
_REPLAY_BATCH = 20_000

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
    max_map_size: int | None = None,
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
    replica and is fixed at creation.  ``map_size`` is the initial LMDB map
    (virtual address space; the file grows only as used); a full map doubles,
    up to ``max_map_size`` (None: no limit; equal to ``map_size``: growth
    disabled, and a full map raises :class:`StoreFull`).  ``dedup_window_ms``
    (>= the hot window) is how long an idempotency key is remembered.
    ``clock_ms`` and ``fs`` are seams for tests and simulations.

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
        max_map_size=max_map_size,
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
        max_map_size: int | None,
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
        if max_map_size is not None:
            _check_option_int("max_map_size", max_map_size, map_size)
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
        self._state: State | None = None
        self._wal: WriteAheadLog | None = None
        self._writer: Writer | None = None
        self._register()
        try:
            self._open_files(replica_id, map_size, max_map_size, segment_bytes)
        except OSError as error:
            self._release()
            raise io_failure(error, "opening the store", self.path) from error
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

    def _open_files(self, replica_id: int, map_size: int, max_map_size: int | None, segment_bytes: int) -> None:
        if self.readonly:
            if not os.path.isdir(state_dir(self.path)):
                raise InvalidArgument(f"no store at {self.path}", path=self.path, hint="open it once without readonly=True to create it")
            self._state = State(state_dir(self.path), readonly=True, map_size=map_size)
            return
        os.makedirs(os.path.join(self.path, "wal"), exist_ok=True)
        os.makedirs(state_dir(self.path), exist_ok=True)
        self._take_lock()
        self._state = State(state_dir(self.path), readonly=False, map_size=map_size, max_map_size=max_map_size)
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
        self._state.upgrade()  # format-1 dedup entries gain fingerprints; before replay applies anything
        self._replay(applied)
        self._state.sync()
        self._wal.retire(self._wal.end_lsn)
        ids = MessageIds(replica_id, self._clock, floor=self._state.last_msg_id())
        self._writer = Writer(
            self.path,
            self._state,
            self._wal,
            ids,
            durability=self.durability,
            clock_ms=self._clock,
            dedup_window_ms=self.dedup_window_ms,
        )

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
        """Apply the WAL after ``applied`` to LMDB, checking that each record continues the state.

        A CRC-valid record whose cursors do not densely continue its
        recipients' heads cannot have been written by this store: it is
        reported as corruption (file and offset) instead of being applied.
        """
        assert self._wal is not None and self._state is not None
        wal, state = self._wal, self._state
        batch: list[Deliver] = []
        heads: dict[int, int] = {}  # heads as of the records in this batch
        last = applied
        txn = state.env.begin()  # no other thread runs yet; closed before every apply
        try:
            for frame in wal.frames(applied):
                record = _decode_record(frame, wal)
                for uid, cursor in record.pairs:
                    head = heads[uid] if uid in heads else state.head(txn, uid)
                    if cursor != head + 1:
                        raise CorruptionError(
                            f"WAL record {frame.lsn} gives user {uid} cursor {cursor}, but the user's head is {head}",
                            path=wal.segment_of(frame.lsn),
                            offset=frame.offset,
                        )
                    heads[uid] = cursor
                batch.append(record)
                last = frame.lsn
                if len(batch) >= _REPLAY_BATCH:
                    txn.abort()
                    state.apply(batch, last)
                    batch, txn = [], state.env.begin()
                    heads.clear()
        finally:
            txn.abort()
        if batch or last != applied:
            state.apply(batch, last)
        if last != applied:
            log.info("replayed WAL records %d..%d into %s", applied + 1, last, self.path)

    # --- guards -------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._forked:
            raise UsedAfterFork("this store was opened in the parent process", path=self.path)
        if self._closed:
            raise StoreClosed("the store is closed", path=self.path)

    def _check_writer(self) -> Writer:
        self._check_usable()
        if self._writer is None:
            raise ReadOnlyStore("the store was opened with readonly=True", path=self.path)
        return self._writer

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
        ``(sender, client_seq)`` is the idempotency key: ``client_seq`` must be
        unique per sender.  A retry of the key inside the dedup window must
        repeat the first delivery's ``conv``, ``body`` and set of recipients
        (``ts_ms``, ``priority`` and the order of ``to`` may differ): it writes
        nothing and returns the first delivery with ``duplicate=True``.  Other
        content raises :class:`IdempotencyConflict` (naming the key and the
        first msg_id) and writes nothing.  Repeated ids in ``to`` count once.
        Safe from many threads; concurrent calls share one WAL write and fsync.
        """
        message = self._check_message(message)
        recipients = self._recipients(to)
        writer = self._check_writer()  # before the writer's lock: a forked child may find it held forever
        return Delivery.of(*writer.deliver(message, recipients))

    def deliver_many(self, items: Iterable[tuple[Message, Sequence[int]]]) -> list[Delivery]:
        """Deliver many ``(message, to)`` pairs with one group commit; results in order.

        Every item is validated before anything is written, the idempotency
        check included: an item that conflicts with its key's first delivery,
        or two items of the batch with one key and different content, raise
        :class:`IdempotencyConflict` and nothing of the batch is written.
        Duplicates (also within the batch, with the same content) behave as
        in :meth:`deliver`.  Very large batches are committed in chunks of
        16,384 messages to bound memory.
        """
        writer = self._check_writer()
        if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
            raise InvalidArgument(f"items must be an iterable of (message, to) pairs, got {type(items).__name__}", key="items")
        checked = []
        for index, item in enumerate(items):
            if not isinstance(item, tuple) or len(item) != 2:
                raise InvalidArgument(f"items[{index}] must be a (message, to) pair", key="items")
            checked.append((self._check_message(item[0]), self._recipients(item[1])))
        return [Delivery.of(*result) for result in writer.deliver_many(checked)]

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
        # Unapplied records first, LMDB second: a record the applier moves in
        # between is then seen twice (and merged), never missed.
        pending, pending_head = self._writer.pending(user, since) if self._writer else ([], 0)
        assert self._state is not None
        with self._state.read() as txn:
            applied_head = self._state.head(txn, user)
            items: list[bytes | StoredMessage] = self._state.scan_inbox(txn, user, since, limit, applied_head)  # type: ignore[assignment]
        last = unpack_inbox_head(items[-1])[0] if items else since  # type: ignore[arg-type]
        if pending and len(items) < limit:
            items.extend([m for m in pending if m.cursor > last][: limit - len(items)])
            last = items[-1][0] if type(items[-1]) is StoredMessage else last  # type: ignore[index]
        return Page(Messages(items), last, last < max(applied_head, pending_head))

    def head(self, user: int) -> int:
        """The user's latest acknowledged cursor (0 if the user has no messages)."""
        self._check_usable()
        check_u64("user", user)
        pending_head = self._writer.pending(user, MAX_U64)[1] if self._writer else 0
        assert self._state is not None
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
        assert self._state is not None
        if self._writer is None:
            return {**self._state.check(2**64), "pending": 0}
        return self._writer.check()

    def close(self) -> None:
        """Flush, apply everything acknowledged, and close.  Idempotent.

        Raises the writer's failure if the final flush fails; the files and
        the lock are released either way, so the store can be reopened.
        """
        if self._closed or self._forked:
            return
        try:
            if self._writer is not None:
                self._writer.close()
        finally:
            self._release()

    def _forget_after_fork(self) -> None:
        """In a forked child: disown the parent's store so the child can open its own.

        Closes only this process's copies of the LMDB environment and file
        descriptors (the parent keeps its own; flock and LMDB reader slots
        belong to the parent), and makes every method raise UsedAfterFork.
        """
        self._forked = True
        for close in (self._state.env.close if self._state else None, self._wal.close if self._wal else None):
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
        if self._writer is not None:
            self._writer.abandon()
        if self._state is not None:
            self._state.env.close()  # no final sync, as in a crash
            self._state = None
        self._release()

    def _release(self) -> None:
        """Close state, log and lock; each step runs even if an earlier one raised."""
        self._closed = True
        with contextlib.ExitStack() as steps:  # runs in reverse order of push
            steps.callback(self._unregister)
            if self._lock_fd >= 0:
                steps.callback(os.close, self._lock_fd)  # releases the flock
                self._lock_fd = -1
            if self._wal is not None:
                steps.callback(self._wal.close)
            if self._state is not None:
                steps.callback(self._state.close)

    def _unregister(self) -> None:
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



def _decode_record(frame: _codec.Frame, wal: WriteAheadLog) -> Deliver:
    """The DELIVER record in ``frame``; errors name the segment file and the frame's offset."""
    path = wal.segment_of(frame.lsn)
    if frame.rtype != RECORD_DELIVER:
        raise CorruptionError(
            f"unknown WAL record type {frame.rtype} (LSN {frame.lsn})",
            path=path,
            offset=frame.offset,
            hint="open it with the syncstore version that wrote it",
        )
    return _codec.decode_deliver(frame.body, path=path, offset=frame.offset)
