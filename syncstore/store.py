"""The Store facade: open, deliver, deliver_many, sync, head, check, close.

This module validates arguments, owns the open store's parts (lock file,
LMDB state, WAL, writer) and their release, and serves reads.  Opening --
creation, validation, repair, migration and replay -- lives in
:mod:`syncstore._open`; the write path -- sequencing, group commit, the LMDB
applier -- in :mod:`syncstore._writer`; docs/design.md tells the whole story.

Reads (``sync``, ``head``) merge the LMDB state with the writer's durable,
not yet applied records: readers see every durable write at once, and only
durable writes (in "sync" mode: every acknowledged one).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence

from . import _layout, _open
from . import snapshot as _snapshot
from ._fileio import OS_FS, FileSystem
from ._ids import MAX_REPLICA
from ._writer import Writer
from .errors import (
    InvalidArgument,
    LayoutError,
    ReadOnlyStore,
    StoreClosed,
    StoreLocked,
    StoreNotReady,
    SyncStoreError,
    UsedAfterFork,
)
from ._store_log import ChangeLogFacade
from .changelog import DEFAULT_MAX_LOG_BYTES, DEFAULT_RETENTION_BYTES, DEFAULT_RETENTION_MS, ChangeLog
from .model import MAX_U64, InboxRef, RESET_AHEAD, RESET_EPOCH, Delivery, HistoryPage, Message, MessageRecord, Messages, Page, StoredMessage, check_u64
from .snapshot import SnapshotInfo
from .state import DEFAULT_MAX_READERS, State
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

_open_paths: dict[str, weakref.ref[Store]] = {}
_open_paths_lock = threading.Lock()
_live_stores: weakref.WeakSet[Store] = weakref.WeakSet()


def _mark_forked() -> None:
    """``fork()`` child side: mark every inherited store unusable, and do nothing else.

    No lock is taken (another parent thread may have held it at the fork, and
    that thread does not exist here) and no LMDB call is made: LMDB forbids any
    use of an environment after fork, ``close`` included -- closing, or
    deallocating, the inherited environment aborts the inherited read
    transactions, which frees the *parent's* reader slots in the shared lock
    file and lets the parent read recycled pages.  So each inherited store is
    given one reference that is never dropped (not even at interpreter exit),
    and only raw descriptors are closed (a ``flock`` held through the parent's
    descriptor stays held).
    """
    global _open_paths_lock
    _open_paths_lock = threading.Lock()  # the parent's may be held by a thread that is gone
    for store in list(_live_stores.data):  # type: ignore[attr-defined]  # the WeakSet's raw refs: iterating it may take no lock
        store = store()
        if store is not None:
            store._forget_after_fork()


os.register_at_fork(after_in_child=_mark_forked)


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def open(  # noqa: A001 - the public name is the contract
    path: str | os.PathLike[str],
    *,
    create: bool = True,
    durability: str = "sync",
    readonly: bool = False,
    replica_id: int = 0,
    map_size: int = DEFAULT_MAP_SIZE,
    max_map_size: int | None = None,
    dedup_window_ms: int = 7 * DAY_MS,
    hot_window_ms: int = 7 * DAY_MS,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    max_readers: int = DEFAULT_MAX_READERS,
    file_mode: int | None = None,
    clock_ms: Callable[[], int] | None = None,
    fs: FileSystem | None = None,
    log_retention_bytes: int = DEFAULT_RETENTION_BYTES,
    log_retention_ms: int = DEFAULT_RETENTION_MS,
    max_log_bytes: int = DEFAULT_MAX_LOG_BYTES,
    follower: bool = False,
) -> Store:
    """Open the store in directory ``path``, creating it if ``create`` (the default).

    A store is a directory holding the ``SYNCSTORE`` marker.  ``create=True``
    creates one in a missing or empty directory; ``create=False`` raises
    :class:`StoreNotFound` there instead (a mistyped path or an unmounted
    volume is then an error, not a fresh store).  A non-empty directory that is
    not a store is refused (:class:`LayoutError`); a store written before the
    marker existed opens and gains it.

    ``durability`` is one of :data:`DURABILITY_MODES` (trade-offs in
    docs/design.md).  ``readonly=True`` opens for reading while a writer in
    another process runs; it sees what the writer has applied to LMDB (at most
    one apply interval behind); on files it may not write it opens in LMDB's
    lock-free mode, which excludes writers while it is open (docs/reliability.md).
    ``replica_id`` (0..1023) must be unique per replica and is fixed at
    creation.  ``map_size`` is the initial LMDB map (virtual address space; the
    file grows only as used); a full map doubles, up to ``max_map_size`` (None:
    no limit; equal to ``map_size``: growth disabled, and a full map raises
    :class:`StoreFull`; smaller than the data already stored: refused).
    ``hot_window_ms`` is the age after which messages leave the hot LMDB
    inbox for the monthly archive segments (the archiver uses it; until it
    runs, every message stays in LMDB); ``dedup_window_ms`` (>= the hot window)
    is how long an idempotency key is remembered.  ``file_mode`` is the mode
    of the store's files: 0o600 (the default for a new store: private), or
    0o640/0o660 to let the files' group read; directories get the matching x
    bits (0700, 0750).  None keeps an existing store's mode (its marker's).
    ``max_readers`` is the size of LMDB's reader table, shared by every
    process reading the store (one slot per read transaction open at once;
    slots of dead processes are cleared when the table fills up).
    ``clock_ms`` (called once here to check it returns int milliseconds) and
    ``fs`` are seams for tests and simulations.

    The change log (``changes``, consumers): applied WAL segments are kept
    while the log is within ``log_retention_bytes`` and younger than
    ``log_retention_ms`` (default 256 MiB, one day; whichever is exceeded
    first lets the oldest go), and while a named consumer pins them -- up to
    ``max_log_bytes`` of log behind it (default 4 GiB), beyond which it is
    dropped.  ``follower=True`` opens a store that takes only its leader's
    changes (``apply_changes``; ``deliver`` raises :class:`ReadOnlyStore`).

    Raises :class:`StoreNotFound`, :class:`LayoutError`,
    :class:`PermissionDenied` (naming the path and the access needed),
    :class:`StoreLocked` if another writer holds the store,
    :class:`CorruptionError` if the log or state is damaged or incomplete (the
    files are then left exactly as they were), :class:`InvalidArgument` for
    bad options.
    """
    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
        raise InvalidArgument(f"path must be a str or os.PathLike naming a directory, got {path!r}", key="path")
    if os.fspath(path) == "":
        raise InvalidArgument(
            "path is empty: it must name the store's directory", key="path", hint='use "." explicitly for the current directory'
        )
    return Store(
        os.fspath(path),
        create=create,
        durability=durability,
        readonly=readonly,
        replica_id=replica_id,
        map_size=map_size,
        max_map_size=max_map_size,
        dedup_window_ms=dedup_window_ms,
        hot_window_ms=hot_window_ms,
        max_body_bytes=max_body_bytes,
        segment_bytes=segment_bytes,
        file_mode=file_mode,
        max_readers=max_readers,
        clock_ms=clock_ms,
        fs=fs,
        log_retention_bytes=log_retention_bytes,
        log_retention_ms=log_retention_ms,
        max_log_bytes=max_log_bytes,
        follower=follower,
    )


def _checked_clock(clock: Callable[[], int]) -> Callable[[], int]:
    """``clock`` wrapped so that a bad reading is a clear SyncStoreError, never a TypeError deep inside."""

    def checked() -> int:
        try:
            value = clock()
        except Exception as error:
            raise SyncStoreError(f"clock_ms raised {error!r}", key="clock_ms", hint="fix the clock_ms callable") from error
        if type(value) is not int or not 0 <= value <= MAX_U64:
            raise InvalidArgument(
                f"clock_ms returned {value!r}: it must return an int, milliseconds since the Unix epoch",
                key="clock_ms",
                hint="fix the clock_ms callable (e.g. time.time_ns() // 1_000_000)",
            )
        return value

    return checked


def _check_option_int(name: str, value: object, low: int, high: int | None = None) -> None:
    if type(value) is not int or value < low or (high is not None and value > high):  # type: ignore[operator]
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise InvalidArgument(f"{name} must be an int {bound}, got {value!r}", key=name)


class Store(ChangeLogFacade):
    """An open syncstore; create with :func:`syncstore.open`.  Thread-safe; not fork-safe.

    The change-log calls (``lsn``, ``changes``, ``wait``, consumers, followers)
    come from :class:`~syncstore._store_log.ChangeLogFacade`.
    """

    def __init__(
        self,
        path: str,
        *,
        create: bool,
        durability: str,
        readonly: bool,
        replica_id: int,
        map_size: int,
        max_map_size: int | None,
        dedup_window_ms: int,
        hot_window_ms: int,
        max_body_bytes: int,
        segment_bytes: int,
        file_mode: int | None,
        max_readers: int,
        clock_ms: Callable[[], int] | None,
        fs: FileSystem | None,
        log_retention_bytes: int = DEFAULT_RETENTION_BYTES,
        log_retention_ms: int = DEFAULT_RETENTION_MS,
        max_log_bytes: int = DEFAULT_MAX_LOG_BYTES,
        follower: bool = False,
    ) -> None:
        if durability not in DURABILITY_MODES:
            raise InvalidArgument(f"durability must be one of {DURABILITY_MODES}, got {durability!r}", key="durability")
        _check_option_int("replica_id", replica_id, 0, MAX_REPLICA)
        _check_option_int("map_size", map_size, 1 << 20)
        if max_map_size is not None:
            if type(max_map_size) is int and type(map_size) is int and max_map_size < map_size:
                raise InvalidArgument(
                    f"max_map_size ({max_map_size}) is below map_size ({map_size}; the default is 64 GiB)",
                    key="max_map_size",
                    hint="pass a smaller map_size too, or a larger max_map_size",
                )
            _check_option_int("max_map_size", max_map_size, map_size)
        _check_option_int("hot_window_ms", hot_window_ms, 1)
        _check_option_int("dedup_window_ms", dedup_window_ms, hot_window_ms)
        _check_option_int("max_body_bytes", max_body_bytes, 0, 64 << 20)
        _check_option_int("segment_bytes", segment_bytes, 4096)
        _check_option_int("max_readers", max_readers, 8, 1 << 20)
        if type(readonly) is not bool:
            raise InvalidArgument(f"readonly must be True or False, got {readonly!r}", key="readonly")
        if type(create) is not bool:
            raise InvalidArgument(f"create must be True or False, got {create!r}", key="create")
        if type(follower) is not bool:
            raise InvalidArgument(f"follower must be True or False, got {follower!r}", key="follower")
        if follower and readonly:
            raise InvalidArgument("a follower is written by its leader's changes: follower=True needs readonly=False", key="follower")
        _check_option_int("log_retention_bytes", log_retention_bytes, 0)
        _check_option_int("log_retention_ms", log_retention_ms, 0)
        _check_option_int("max_log_bytes", max_log_bytes, 0)
        if file_mode is not None:
            _layout.check_file_mode(file_mode)
        clock = None
        if clock_ms is not None:
            if not callable(clock_ms):
                raise InvalidArgument(f"clock_ms must be a callable returning epoch milliseconds, got {clock_ms!r}", key="clock_ms")
            clock = _checked_clock(clock_ms)
            try:
                clock()  # once, so that a clock returning floats (or seconds as a str) fails here, not at the first delivery
            except SyncStoreError as error:
                raise InvalidArgument(error.message, key="clock_ms", hint="fix the clock_ms callable: it must return int milliseconds since the Unix epoch, e.g. lambda: time.time_ns() // 1_000_000") from error
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
        self._clock = clock or _wall_clock_ms
        self._fs = fs or OS_FS
        self._closed = False
        self._forked = False
        self._lock_fd = -1
        self._state: State | None = None
        self._wal: WriteAheadLog | None = None
        self._writer: Writer | None = None
        self._epoch = 0
        self.lock_free = False  # a read-only view without an LMDB reader slot (docs/reliability.md)
        self.follower = follower
        self._bootstrap: tuple[int, int] | None = None  # a follower's bootstrap under way: (snapshot LSN, next chunk)
        self._changelog = ChangeLog(
            path,
            visible=self._visible_lsn,
            head=self.head,
            watchers=lambda: self._writer.watchers if self._writer is not None else None,
            fs=self._fs,
            readonly=readonly,
            retention_bytes=log_retention_bytes,
            retention_ms=log_retention_ms,
            max_log_bytes=max_log_bytes,
            clock_ms=self._clock,
            check_usable=self._check_usable,
        )
        self._register()
        opened = _open.Opened()
        try:
            try:
                if readonly:
                    _open.open_view(path, opened, map_size=map_size, max_readers=max_readers, fs=self._fs)
                else:
                    _open.open_writable(
                        path,
                        opened,
                        create=create,
                        durability=durability,
                        replica_id=replica_id,
                        map_size=map_size,
                        max_map_size=max_map_size,
                        segment_bytes=segment_bytes,
                        file_mode=file_mode,
                        max_readers=max_readers,
                        dedup_window_ms=dedup_window_ms,
                        clock=self._clock,
                        fs=self._fs,
                        retain=self._changelog.retire_upto,
                        follower=follower,
                    )
            finally:  # whatever was acquired, the store owns (and releases, if opening failed)
                self._lock_fd, self._wal, self._state, self._writer = opened.lock_fd, opened.wal, opened.state, opened.writer
                self._epoch, self.lock_free = opened.epoch, opened.lock_free
        except PermissionError as error:
            self._release()
            raise _layout.permission_denied(error, "read access (read and write access for a writer)") from error
        except (IsADirectoryError, NotADirectoryError) as error:
            self._release()
            raise LayoutError(f"{error.filename} is not what a store keeps there: {error.strerror}", path=error.filename) from error
        except OSError as error:
            self._release()
            raise io_failure(error, "opening the store", self.path) from error
        except BaseException:
            self._release()
            raise
        if self._writer is not None:
            self._writer.leader = not follower
        _live_stores.add(self)
        exposed = _layout.exposed_entries(self.path)
        if exposed:
            log.warning(
                "store %s: other users may read %s; chmod o-rwx them (a store holds private messages; docs/reliability.md, Security)",
                self.path,
                ", ".join(exposed),
            )

    # --- one open Store per path and process ---------------------------------------

    def _register(self) -> None:
        key = os.path.realpath(self.path)
        with _open_paths_lock:
            other = _open_paths.get(key)
            if other is not None and other() is not None and other()._forked and not other()._closed:  # type: ignore[union-attr]
                raise UsedAfterFork(
                    "the store was open in the parent when this process forked, so it cannot be opened again here",
                    path=self.path,
                    hint="py-lmdb refuses a second environment on the same files in one process, and the inherited one "
                    "must never be closed; open the store in a process started with the 'spawn' or 'forkserver' "
                    "multiprocessing method, or fork before opening it",
                )
            if other is not None and other() is not None and not other()._closed:  # type: ignore[union-attr]
                raise StoreLocked(
                    "the store is already open in this process",
                    path=self.path,
                    holder=f"pid {os.getpid()} (this process)",
                    hint="share the open Store object; LMDB must not be opened twice in one process",
                )
            _open_paths[key] = weakref.ref(self)
        self._registry_key = key

    # --- guards -------------------------------------------------------------------

    def _check_usable(self, *, bootstrapping: bool = False) -> None:
        """Raise unless the store may be used; ``bootstrapping=True``: also while a follower's bootstrap runs."""
        if self._forked:
            raise UsedAfterFork("this store was opened in the parent process", path=self.path)
        if self._closed:
            raise StoreClosed("the store is closed", path=self.path)
        if self._bootstrap is not None and not bootstrapping:
            raise StoreNotReady(
                f"this follower is bootstrapping from snapshot {self._bootstrap[0]} (chunk {self._bootstrap[1]} is next): its state is incomplete",
                path=self.path,
                hint="apply the rest of the feed; reads work once its final chunk is applied",
            )

    def _check_writer(self, *, leader: bool = True) -> Writer:
        """The writer, for a write of this kind: a leader's own (``leader``) or a follower's applying its leader's changes."""
        self._check_usable(bootstrapping=not leader)
        if self._writer is None:
            raise ReadOnlyStore("the store was opened with readonly=True", path=self.path)
        if leader and self.follower:
            raise ReadOnlyStore(
                "this store is a follower: it takes only its leader's changes",
                path=self.path,
                hint="write to the leader; apply its changes here with apply_changes(); promote() makes this store a leader",
            )
        if not leader and not self.follower:
            raise ReadOnlyStore(
                "this store is a leader: apply, apply_changes and promote are for followers",
                path=self.path,
                hint="a follower is a store opened with follower=True (or restored with syncstore.restore(..., follower=True)); a promoted follower is a leader for good",
            )
        return self._writer

    # --- validation ---------------------------------------------------------------

    def _recipients(self, to: object) -> tuple[int, ...]:
        if type(to) is not list and type(to) is not tuple:
            if isinstance(to, (str, bytes, bytearray, Mapping)) or not isinstance(to, Iterable):
                what = "a mapping (pass its keys, or a list)" if isinstance(to, Mapping) else type(to).__name__
                raise InvalidArgument(f"to must be an iterable of user ids (list, tuple, set, generator), got {what}", key="to")
            to = tuple(to)  # read once: validating must not use up a generator
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

    def flush(self) -> None:
        """Block until every write acknowledged so far is durable, and so visible to ``sync``/``head``.

        Readers see only durable writes.  In ``durability="sync"`` every
        acknowledged write already is; in "interval"/"none" mode the WAL is
        synced on a timer (docs/design.md), and ``flush`` syncs it now.
        Raises :class:`DurabilityError` if the sync fails.
        """
        self._check_writer().flush()

    # --- reads --------------------------------------------------------------------

    def sync(self, user: int, since: int = 0, limit: int = 100, epoch: int | None = None) -> Page:
        """Up to ``limit`` messages of ``user`` with cursor > ``since``, ascending.

        Pass the returned ``page.next`` as ``since`` to continue; ``has_more``
        says whether more messages are waiting.  ``limit`` is 1..10,000.
        ``epoch`` is the ``page.epoch`` the client's cursor came from (None:
        not checked).  A position outside this store's history -- ``since``
        beyond the user's head, or another epoch -- gets a *reset page*
        (``reset=True``, no messages, ``next=0``), never a silent empty page;
        see :class:`Page` and docs/design.md for the client protocol.
        """
        self._check_usable()
        check_u64("user", user)
        check_u64("since", since)
        if type(limit) is not int or not 1 <= limit <= MAX_SYNC_LIMIT:
            raise InvalidArgument(f"limit must be an int in 1..{MAX_SYNC_LIMIT}, got {limit!r}", key="limit")
        if epoch is not None:
            check_u64("epoch", epoch)
            if epoch != self._epoch:
                return self._reset_page(RESET_EPOCH, self.head(user))
        # Unapplied records first, LMDB second: a record the applier moves in
        # between is then seen twice (and merged), never missed.
        pending, pending_head = self._writer.pending(user, since) if self._writer else ([], 0)
        assert self._state is not None
        with self._state.read() as txn:
            items, applied_head = self._state.scan_inbox(txn, user, since, limit)
        if since > applied_head and since > pending_head:  # a cursor from the future: the store was rewound under it
            return self._reset_page(RESET_AHEAD, max(applied_head, pending_head))
        page: list[InboxRef | StoredMessage] = items  # type: ignore[assignment]
        last = since + len(items)  # cursors are dense
        if pending and len(page) < limit:
            page.extend([m for m in pending if m.cursor > last][: limit - len(page)])
            last = page[-1][0] if type(page[-1]) is StoredMessage else last  # type: ignore[index]
        return Page(Messages(page), last, last < max(applied_head, pending_head), epoch=self._epoch)

    def _reset_page(self, reason: str, head: int) -> Page:
        """The answer to a position outside this store's history: resync from 0."""
        return Page(Messages(), 0, head > 0, reset=True, reset_reason=reason, epoch=self._epoch)

    def get(self, msg_id: int) -> MessageRecord | None:
        """The message ``msg_id`` (a quoted or replied-to message), or None if this store holds none.

        Returns a :class:`MessageRecord`: the message as stored once for all
        its recipients, without a cursor.  Like ``sync``, shows only durable
        messages.  The store does no access control: whether the asking user
        may see the message is the embedding server's decision.
        """
        self._check_usable()
        check_u64("msg_id", msg_id)
        if self._writer is not None:
            pending = self._writer.pending_message(msg_id)
            if pending is not None:
                return pending
        assert self._state is not None
        with self._state.read() as txn:
            value = self._state.message(txn, msg_id)
        return None if value is None else MessageRecord.from_value(msg_id, value)

    def history(self, user: int, conv: int, before: int | None = None, limit: int = 50) -> HistoryPage:
        """Scroll back in one chat: ``user``'s messages of conversation ``conv`` with cursor < ``before``, newest first.

        ``before=None`` starts from the newest message.  Returns a
        :class:`HistoryPage` of at most ``limit`` (1..10,000) messages; pass
        its ``before`` to get the next, older page.  Served from the history
        index (user, conv -> cursors), never by filtering the inbox: cost is
        proportional to the page, not to the inbox.  Durable messages only.
        """
        self._check_usable()
        check_u64("user", user)
        check_u64("conv", conv)
        if before is not None:
            check_u64("before", before)
        if type(limit) is not int or not 1 <= limit <= MAX_SYNC_LIMIT:
            raise InvalidArgument(f"limit must be an int in 1..{MAX_SYNC_LIMIT}, got {limit!r}", key="limit")
        below = MAX_U64 if before is None else before
        # Unapplied records first; LMDB answers only below the lowest of them, so a
        # record the applier moves in between is neither missed nor seen twice.
        pending, floor = self._writer.pending_history(user, conv, below) if self._writer else ([], None)
        page: list[InboxRef | StoredMessage] = pending[: limit + 1]  # type: ignore[assignment]
        if len(page) <= limit:
            assert self._state is not None
            with self._state.read() as txn:
                page += self._state.scan_history(txn, user, conv, below if floor is None else min(below, floor), limit + 1 - len(page))
        messages = Messages(page[:limit])
        oldest = messages[-1].cursor if messages else (0 if before is None else before)
        return HistoryPage(messages, oldest, len(page) > limit)

    @property
    def epoch(self) -> int:
        """This store's epoch: random, made at creation, changed by anything that rewinds its history.

        Clients keep it with their cursor and pass it to :meth:`sync`.
        """
        return self._epoch

    def head(self, user: int) -> int:
        """The user's latest durable cursor (0 if the user has no messages); in "sync" mode, the latest acknowledged."""
        self._check_usable()
        check_u64("user", user)
        pending_head = self._writer.pending(user, MAX_U64)[1] if self._writer else 0
        assert self._state is not None
        with self._state.read() as txn:
            return max(self._state.head(txn, user), pending_head)

    # --- snapshots (issue 9; the logic lives in syncstore.snapshot) -------------------

    def snapshot(self, dest_dir: str | os.PathLike[str], *, full: bool = False) -> SnapshotInfo:
        """Write a point-in-time snapshot of the state into ``dest_dir``; return its :class:`SnapshotInfo`.

        The first snapshot into a directory is a full *base*; later ones are
        *deltas* holding only the items changed since the previous snapshot
        there, found from the WAL.  ``full=True`` writes a new base, which
        replaces (collapses) the directory's chain; so does a snapshot whose
        delta the WAL can no longer give (its segments were retired) --
        ``info.reason`` says so.  The snapshot is exactly the state at
        ``info.lsn``: a writable store first applies every durable record,
        so that is the current durable LSN; a read-only view (another
        process than the writer, ``syncstore snapshot``) snapshots what the
        writer has applied.  Reads happen in short LMDB transactions, never
        one long one.  Nothing new is written when nothing was applied since
        the directory's newest snapshot (that one is returned).  The store
        notes the directory (see :func:`syncstore.snapshot.newest_snapshot`).
        Layout and guarantees: docs/format.md and docs/design.md, "Snapshots".
        """
        self._check_usable()
        if not isinstance(dest_dir, (str, os.PathLike)) or (os.path.exists(dest_dir) and not os.path.isdir(dest_dir)):
            raise InvalidArgument(f"dest_dir must name a directory (new or holding snapshots), got {dest_dir!r}", key="dest_dir")
        if self._writer is not None:
            self._writer.apply_pending()
        assert self._state is not None
        return _snapshot.take(self._state, os.path.join(self.path, _layout.WAL_DIR), dest_dir, store_path=self.path, full=full, fs=self._fs)

    # --- verification and lifecycle -------------------------------------------------

    def check(self) -> dict[str, int]:
        """Self-verification; raises :class:`CorruptionError` on any violated invariant.

        Checks that every user's cursors are dense, every inbox entry
        references a stored message and has its history entry, every
        message's reference count equals a recount (no body freed early, none
        orphaned), the dedup index points at real deliveries with matching
        fingerprints, the applied LSN is not beyond the WAL end, and unapplied
        records densely continue the applied state (``_statecheck``).
        Returns counts (users, inbox_entries, messages, dedup_entries,
        applied_lsn, pending) of the applied state.  Cost is proportional to
        the store's size, and memory to its number of messages (the recount).
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
        """In a forked child: make every method raise UsedAfterFork; see :func:`_mark_forked`."""
        self._forked = True
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(self))  # never deallocated: see _mark_forked
        for fd in (self._lock_fd, self._wal.fileno if self._wal is not None else -1):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
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

