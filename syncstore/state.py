"""The indexed state in LMDB, and ``apply(records)`` that moves WAL records into it.

Key layout, state format 3 (all integers unsigned big-endian, so byte order
is numeric order; value formats in ``_codec`` and docs/format.md)::

    named db      flags               key                        value
    messages      -                   msg_id                     refs | head | body: each message once
    inbox         DUPSORT|DUPFIXED    user id                    16-byte entries: cursor | msg_id
    history       DUPSORT|DUPFIXED    user id | conv             cursor (of that user's inbox entry)
    dedup         -                   sender | client_seq        first delivery (_codec.encode_dedup)
    dedup_expiry  -                   first-delivery ms | sender | client_seq   empty (purge index, oldest first)
    meta          -                   b"applied_lsn", b"last_msg_id", ...        u64 / bytes

One body per message: every recipient's inbox holds a 16-byte entry that
references it, and ``refs`` counts those entries (``check()`` recounts them),
so deleting the last reference frees the body.  A user's head is the cursor
of the last duplicate of its ``inbox`` key: no separate heads database to
rewrite per apply.  Fixed-size sorted duplicates are stored by LMDB packed,
without a per-item node header, and appended ones (``MDB_APPENDDUP``) fill
their pages.  ``msg_id`` is time-ordered, so new messages are appends too.
Why this layout and not a copy per recipient or an inline hybrid: the
measurements in docs/design.md ("Storage layout").

State format (meta ``format_version``): 3.  Formats 1 and 2 (a copy of the
message in every inbox entry) are migrated on open by ``_migrate``; a
read-only State opens them only far enough to report their format, applied
LSN and heads (what opening a store validates before it migrates).

Durability (see docs/design.md): the environment is opened ``sync=True,
metasync=False`` (MDB_NOMETASYNC).  Each commit fdatasyncs the data pages but
not the meta page, which becomes durable with the next commit.  LMDB documents
the failure mode as "a system crash can undo the last committed transaction
but retains integrity": because ``applied_lsn`` is written in the same
transaction as the data, an undone transaction simply means replaying a few
more WAL records.  WAL segments are retired only after ``env.sync(True)``.
"""

from __future__ import annotations

import functools
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from itertools import groupby, islice
from operator import itemgetter
from typing import Any, TypeVar, cast

import lmdb

from . import _codec
from . import _statecheck
from ._codec import DedupEntry, Deliver, Expire, ExpiredKey, Record, pack_u64, unpack_u64
from .model import InboxRef
from ._layout import DEFAULT_FILE_MODE
from .errors import CorruptionError, DurabilityError, InvalidArgument, PermissionDenied, ReadersFull, StoreClosed, StoreFull, SyncStoreError
from ._ids import msg_id_ms

__all__ = ["State", "STATE_FORMAT", "state_dir", "PAIR_KEY", "EXPIRY_KEY", "APPLIED_KEY", "LAST_ID_KEY"]

log = logging.getLogger("syncstore.state")
T = TypeVar("T")

_DB_NAMES = (b"messages", b"inbox", b"history", b"dedup", b"dedup_expiry", b"meta")
_DUPFIXED = frozenset({b"inbox", b"history"})  # fixed-size sorted duplicates
_LEGACY_HEADS = b"heads"  # formats 1 and 2: user -> head cursor
_APPLIED = b"applied_lsn"
_LAST_ID = b"last_msg_id"
_REPLICA = b"replica_id"
_FORMAT = b"format_version"
_FILES = ("data.mdb", "lock.mdb")
_NEARLY_FULL_BYTES = 4 << 20  # an LMDB I/O error with less free space than this is "disk full"
_PUT_SLICE = 512  # items per putmulti call between GIL yields in apply()
STATE_FORMAT = 3  # 3: one body per message; 1 and 2 are migrated on open (_migrate)
#: LMDB reader slots (one per read transaction open at once, across every process).
DEFAULT_MAX_READERS = 512

_pair = _codec.PAIR_KEY
_triple = _codec.EXPIRY_KEY
_u64 = struct.Struct(">Q")
_BATCH_DBS = ("messages", "inbox", "history", "dedup", "dedup_expiry")  # the order _encode_batch returns them in
_DUPFIXED_NAMES = frozenset(name.decode() for name in _DUPFIXED)
_MUST_ADD = frozenset({"messages", "inbox", "history"})  # an item that exists already is corruption

# The key layout's public names, for the modules that read or write the state's items directly
# (snapshots, restore, a follower's bootstrap, the self-check): one owner for the layout.
#: ``pack(a, b)``: a ``history`` key (user | conv) or a ``dedup`` key (sender | client_seq).
PAIR_KEY = _pair
#: ``pack(first-delivery ms, sender, client_seq)``: a ``dedup_expiry`` key.
EXPIRY_KEY = _triple
#: ``meta`` keys: the applied LSN, the largest msg_id applied.
APPLIED_KEY, LAST_ID_KEY = _APPLIED, _LAST_ID


@functools.lru_cache(maxsize=64)
def _msg_id_keys(count: int) -> struct.Struct:
    """Unpacks the msg_id keys of ``count`` joined inbox entries (cursor u64, msg_id u64): one C call for a page."""
    return struct.Struct(">" + "8x8s" * count)


class _Gate:
    """Many short read transactions at once, or one exclusive action (a map resize, a close) alone.

    LMDB may change the map size, or close the environment, only while this
    process has no transaction open: reads enter the gate for the life of
    their transaction, and an exclusive action waits for them to drain while
    holding new ones back.  After :meth:`close` every entry raises
    :class:`StoreClosed` -- so a read racing ``Store.close()`` either finishes
    on an open environment or is refused cleanly, never touches a closed one.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._readers = 0
        self._exclusive = False
        self.closed = False

    def enter(self) -> None:
        with self._lock:
            while self._exclusive:
                self._drained.wait()
            if self.closed:
                raise StoreClosed("the store is closed", path=self._path)
            self._readers += 1

    def try_enter(self) -> bool:
        """:meth:`enter` if that needs no waiting (its lock free, no exclusive action running); else False.

        For callers that must not block (an event loop thread, see
        :mod:`syncstore.aio`): they hand the work to a thread when this says no.
        """
        if not self._lock.acquire(blocking=False):
            return False
        try:
            if self._exclusive:
                return False
            if self.closed:
                raise StoreClosed("the store is closed", path=self._path)
            self._readers += 1
            return True
        finally:
            self._lock.release()

    def leave(self) -> None:
        with self._lock:
            self._readers -= 1
            if self._exclusive and not self._readers:
                self._drained.notify_all()

    def exclusive(self, action: Callable[[], object], *, close: bool = False) -> None:
        """Run ``action`` with no read transaction open in this process; ``close=True`` then refuses all later entries."""
        with self._lock:
            if self.closed:
                return
            self._exclusive = True
            try:
                while self._readers:
                    self._drained.wait()
                if close:
                    self.closed = True
                action()
            finally:
                self._exclusive = False
                self._drained.notify_all()


def _read_error(error: lmdb.Error, path: str) -> SyncStoreError:
    """The SyncStoreError for an LMDB failure during a read."""
    if isinstance(error, (lmdb.CorruptedError, lmdb.PageNotFoundError)):
        return CorruptionError(f"LMDB read failed: {error}", path=path)
    if isinstance(error, lmdb.ReadersFullError):
        return ReadersFull(
            f"all LMDB reader slots are held by live read transactions: {error}",
            path=path,
            hint="raise the max_readers option of syncstore.open, or hold fewer read transactions at once "
            "(each open read-only view, thread in a read and lingering iterator takes one)",
        )
    return SyncStoreError(f"LMDB read failed: {error}", path=path, hint="check the disk and the store's files")


class _ReadTxn:
    """Context manager for one gated read transaction (a class: cheaper than @contextmanager).

    LMDB errors inside the ``with`` body come out as :class:`SyncStoreError`.
    """

    __slots__ = ("_state", "_txn", "_entered")

    def __init__(self, state: State, entered: bool = False) -> None:
        self._state = state
        self._entered = entered  # the caller already passed the gate (State.read_nowait)

    def __enter__(self) -> lmdb.Transaction:
        state = self._state
        cleared = False
        while True:
            if self._entered:
                self._entered = False
            else:
                state.gate.enter()
            try:
                self._txn = state.env.begin(buffers=False)
                return self._txn
            except lmdb.MapResizedError:  # the writer process grew the map: adopt its size
                state.gate.leave()
                state.gate.exclusive(lambda: state.env.set_mapsize(0))
            except lmdb.ReadersFullError as error:
                state.gate.leave()
                # Slots of killed processes stay taken until someone clears them: do, once.
                if cleared or not state.clear_stale_readers():
                    raise _read_error(error, state.path) from error
                cleared = True
            except lmdb.Error as error:
                state.gate.leave()
                raise _read_error(error, state.path) from error
            except BaseException:
                state.gate.leave()
                raise

    def __exit__(self, exc_type: object, error: object, traceback: object) -> None:
        self._txn.abort()
        self._state.gate.leave()
        if isinstance(error, lmdb.Error):
            raise _read_error(error, self._state.path) from error


class State:
    """The LMDB environment holding messages, inboxes, the history and dedup indexes, and metadata."""

    def __init__(
        self,
        path: str,
        *,
        readonly: bool,
        map_size: int,
        max_map_size: int | None = None,
        lock: bool = True,
        file_mode: int = DEFAULT_FILE_MODE,
        replica_id: int | None = None,
        max_readers: int = DEFAULT_MAX_READERS,
    ) -> None:
        """Open the LMDB environment in directory ``path``.

        Writable: creates and initialises it when needed -- the named
        databases, the format key and ``replica_id`` in one transaction
        (``created`` is then True, and the caller forces it durable with
        :meth:`sync`) -- and gives the files it creates ``file_mode``
        whatever the umask; an older format raises :class:`CorruptionError`
        (the store migrates it first, see ``_migrate``).  Read-only: an
        environment that was never initialised (no format key) opens with
        ``initialised = False`` and no databases; one of an older format opens
        with ``legacy = True``, where only the meta reads and :meth:`head`
        work.  ``lock=False`` (read-only only) opens without LMDB's lock
        file, writing nothing at all: no reader slot protects the pages read,
        so the caller must make sure that no writer runs meanwhile.
        ``max_readers`` is the size of LMDB's reader table.
        """
        self.path = path
        self.readonly = readonly
        self.max_map_size = max_map_size
        self.max_readers = max_readers
        self.gate = _Gate(path)
        self.initialised = True
        self.created = False
        self.format = STATE_FORMAT
        self.legacy = False  # an older format, open read-only for validation before its migration
        self._lock = lock
        self._file_mode = file_mode
        self._reopen_needed = False
        self._open_env(map_size, replica_id)

    def _open_env(self, map_size: int, replica_id: int | None = None) -> None:
        path, readonly, lock, file_mode = self.path, self.readonly, self._lock, self._file_mode
        new_files = [] if readonly else [f for f in _FILES if not os.path.exists(os.path.join(path, f))]
        try:
            self.env = lmdb.open(
                path,
                map_size=map_size,
                max_dbs=len(_DB_NAMES) + 1,  # + the heads db of a legacy state
                readonly=readonly,
                lock=lock,
                sync=True,
                metasync=False,
                readahead=False,  # point reads and short scans; readahead only pollutes RAM
                max_readers=self.max_readers,
                create=not readonly,
                mode=file_mode,
            )
        except lmdb.ReadonlyError as error:  # EACCES: LMDB's name for "permission denied"
            raise PermissionDenied(
                f"permission denied opening the LMDB state ({error}): {'read' if readonly else 'read and write'} access to "
                f"{path}, data.mdb{' and lock.mdb' if lock else ''} is needed (running as uid {os.geteuid()})",
                path=path,
            ) from error
        except lmdb.InvalidError as error:
            raise CorruptionError(f"the LMDB state is not a valid LMDB environment: {error}", path=path) from error
        except lmdb.Error as error:
            raise SyncStoreError(
                f"cannot open the LMDB state: {error}", path=path, hint="check the path's permissions and free space"
            ) from error
        # Reader slots of dead processes (SIGKILLed readers) would pin pages forever.
        if lock:
            self.env.reader_check()
        try:
            dbs = self._open_existing_dbs() if readonly else self._initialise(replica_id)
        except lmdb.NotFoundError as error:
            self.env.close()
            raise CorruptionError(f"the LMDB state lacks a named database: {error}", path=path) from error
        except BaseException:
            self.env.close()
            raise
        self.messages, self.inbox, self.history, self.dedup, self.dedup_expiry, self.meta = dbs
        for name in _FILES if self.created else new_files:
            os.chmod(os.path.join(path, name), file_mode)  # LMDB applies the umask

    def _initialise(self, replica_id: int | None) -> list[Any]:
        """Open (creating on first use) the named databases of a writable environment; refuse another format."""
        with self.env.begin(write=True) as txn:
            meta = self.env.open_db(b"meta", txn=txn, create=True)
            stored = txn.get(_FORMAT, db=meta)
            if stored is not None:
                self._check_format(unpack_u64(stored), writable=True)
            dbs = [self.env.open_db(name, txn=txn, create=True, dupsort=name in _DUPFIXED, dupfixed=name in _DUPFIXED) for name in _DB_NAMES]
            if stored is None:
                txn.put(_FORMAT, pack_u64(STATE_FORMAT), db=meta)
                if replica_id is not None:
                    txn.put(_REPLICA, pack_u64(replica_id), db=meta)
                self.created = True
        self._check_flags(dbs)
        return dbs

    def _check_format(self, found: int, *, writable: bool) -> None:
        """Record the state's format; CorruptionError if this syncstore cannot open it this way."""
        self.format = found
        if not 1 <= found <= STATE_FORMAT:
            raise CorruptionError(
                f"LMDB state format {found} is not supported (this syncstore reads formats 1 to {STATE_FORMAT})",
                path=self.path,
                hint=f"open it with a syncstore version that supports state format {found}",
            )
        if found < STATE_FORMAT and writable:
            raise CorruptionError(
                f"LMDB state format {found} must be migrated to format {STATE_FORMAT} first",
                path=self.path,
                hint="open the store with syncstore.open(path) or run `syncstore upgrade PATH`: both migrate it",
            )

    def _check_flags(self, dbs: list[Any]) -> None:
        for name, db in zip(_DB_NAMES, dbs):
            flags = db.flags(None)
            if flags["dupsort"] != (name in _DUPFIXED) or flags["dupfixed"] != (name in _DUPFIXED):
                raise CorruptionError(f"LMDB database {name.decode()} has the wrong flags for state format {STATE_FORMAT}: {flags}", path=self.path)

    def _open_existing_dbs(self) -> list[Any]:
        """The named databases of a read-only environment; none (``initialised = False``) before its first initialisation."""
        # Handles opened inside a read-only transaction die with it; open them bare.
        try:
            meta = self.env.open_db(b"meta", create=False)
        except lmdb.NotFoundError:
            meta = None
        stored = None
        if meta is not None:
            with self.env.begin() as txn:
                stored = txn.get(_FORMAT, db=meta)
        if stored is None:
            self.initialised = False
            return [None] * len(_DB_NAMES)
        self._check_format(unpack_u64(stored), writable=False)
        if self.format < STATE_FORMAT:
            self.legacy = True
            self._legacy_heads = self.env.open_db(_LEGACY_HEADS, create=False)
            return [None] * (len(_DB_NAMES) - 1) + [meta]
        dbs = [self.env.open_db(name, create=False) for name in _DB_NAMES]
        self._check_flags(dbs)
        return dbs

    def reopen(self) -> None:
        """Close and reopen the environment in this process (after a failed commit on a full disk).

        A commit that fails while writing LMDB's meta page leaves the
        environment refusing every later transaction (MDB_PANIC) until it is
        reopened; reopening also drops any state of the aborted transaction.
        Committed data is untouched, and everything not yet applied is still in
        the WAL and the writer's overlay.  Reads wait at the gate meanwhile.
        """

        def swap() -> None:
            size = self.env.info()["map_size"]
            self.env.close()
            self._open_env(size)

        self.gate.exclusive(swap)

    def clear_stale_readers(self) -> int:
        """Free reader slots of dead processes (``reader_check``); return how many."""
        try:
            return self.env.reader_check()
        except lmdb.Error as error:
            raise _read_error(error, self.path) from error

    # --- transactions -------------------------------------------------------------

    def read(self) -> _ReadTxn:
        """``with state.read() as txn``: a short read transaction (a long one pins pages)."""
        return _ReadTxn(self)

    def read_nowait(self) -> _ReadTxn | None:
        """Like :meth:`read`, or None if passing the gate would wait (a map resize or close under way)."""
        return _ReadTxn(self, entered=True) if self.gate.try_enter() else None

    def _write(self, body: Callable[[lmdb.Transaction], T]) -> T:
        """Run ``body`` in a write transaction, growing a full map and retrying.

        Maps LMDB failures to the error tree: :class:`StoreFull` for a full
        disk (transient: the next call reopens the environment, which a commit
        that failed half-way may have left refusing everything, and tries
        again) or a map that may not grow further, :class:`DurabilityError`
        otherwise.  The transaction is aborted on any error.
        """
        self._reopen_if_needed()
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    return body(txn)
            except lmdb.MapFullError:
                self._grow_map()
            except lmdb.Error as error:
                if isinstance(error, lmdb.DiskError) or self._disk_nearly_full():
                    self._reopen_needed = True
                    raise StoreFull(f"LMDB write failed on a full disk: {error}", path=self.path) from error
                raise DurabilityError(f"LMDB write failed: {error}", path=self.path) from error

    def _reopen_if_needed(self) -> None:
        """Reopen after a commit failed on a full disk (before anything takes a database handle)."""
        if self._reopen_needed:
            self.reopen()
            self._reopen_needed = False

    def _disk_nearly_full(self) -> bool:
        # LMDB reports a short write -- what a full disk gives -- as EIO, not ENOSPC.
        try:
            stats = os.statvfs(self.path)
        except OSError:
            return False
        return stats.f_bavail * stats.f_frsize < _NEARLY_FULL_BYTES

    def _grow_map(self) -> None:
        current = self.env.info()["map_size"]
        if self.max_map_size is not None and current >= self.max_map_size:
            raise StoreFull(
                f"the LMDB map is full at map_size={current} bytes (max_map_size={self.max_map_size})",
                path=self.path,
                hint="reopen the store with a larger map_size or max_map_size; acknowledged data is safe in the WAL",
            )
        grown = current * 2 if self.max_map_size is None else min(current * 2, self.max_map_size)
        # The map may only change while this process has no transaction open.
        self.gate.exclusive(lambda: self.env.set_mapsize(grown))
        log.info("LMDB map of %s grown from %d to %d bytes", self.path, current, grown)

    def _meta_u64(self, txn: lmdb.Transaction, key: bytes) -> int:
        value = txn.get(key, db=self.meta)
        return 0 if value is None else unpack_u64(value)

    def applied_lsn(self, txn: lmdb.Transaction | None = None) -> int:
        """LSN of the last WAL record applied (0 for a new store), in ``txn`` or a fresh one."""
        if txn is not None:
            return self._meta_u64(txn, _APPLIED)
        with self.read() as fresh:
            return self._meta_u64(fresh, _APPLIED)

    def last_msg_id(self) -> int | None:
        """The largest msg_id applied so far (None before the first message)."""
        with self.read() as txn:
            value = txn.get(_LAST_ID, db=self.meta)
        return None if value is None else unpack_u64(value)

    def replica_id(self) -> int | None:
        """The replica id recorded at creation, or None before the first open."""
        with self.read() as txn:
            value = txn.get(_REPLICA, db=self.meta)
        return None if value is None else unpack_u64(value)

    def set_replica_id(self, replica_id: int) -> None:
        """Record the replica id (once, at creation)."""
        self._write(lambda txn: txn.put(_REPLICA, pack_u64(replica_id), db=self.meta))

    # --- reads --------------------------------------------------------------------

    def head(self, txn: lmdb.Transaction, uid: int) -> int:
        """The user's latest applied cursor (0 if none): the cursor of its last inbox entry."""
        return self.head_reader(txn)(uid)

    def head_reader(self, txn: lmdb.Transaction) -> Callable[[int], int]:
        """``head_of(uid)``: :meth:`head` in ``txn`` through one reused LMDB cursor (for many lookups in one transaction)."""
        if self.legacy:  # formats 1 and 2 kept heads in a database of their own
            heads = self._legacy_heads
            return lambda uid: unpack_u64(value) if (value := txn.get(pack_u64(uid), db=heads)) is not None else 0
        cursor = txn.cursor(db=self.inbox)
        set_key, last_dup, value, pack = cursor.set_key, cursor.last_dup, cursor.value, _u64.pack
        unpack = _u64.unpack_from

        def head_of(uid: int) -> int:
            if not set_key(pack(uid)):
                return 0
            last_dup()
            return unpack(value())[0]

        return head_of

    def dedup_keys_present(self, txn: lmdb.Transaction, keys: Sequence[tuple[int, int]]) -> set[tuple[int, int]]:
        """Which of the idempotency keys ``keys`` have an applied dedup entry (expired ones included)."""
        found = txn.cursor(db=self.dedup).getmulti([_pair.pack(*key) for key in keys])
        return {_pair.unpack(key) for key, _value in found}

    def dedup_entry(self, txn: lmdb.Transaction, sender: int, client_seq: int) -> DedupEntry | None:
        """The first delivery (msg_id, fingerprint, cursors) of an idempotency key, if applied."""
        value = txn.get(_pair.pack(sender, client_seq), db=self.dedup)
        return None if value is None else _codec.decode_dedup(value)

    def scan_inbox(self, txn: lmdb.Transaction, uid: int, since: int, limit: int) -> tuple[list[InboxRef], int]:
        """Up to ``limit`` inbox entries of ``uid`` with cursor > ``since``, with their messages; and the user's head.

        Each item is ``(entry, (msg_id key, message value))`` (see
        :class:`~syncstore.model.Messages`, which decodes it on access).  The
        entries are read in one C-level loop (``iternext_dup``) and their
        messages with one ``getmulti``.
        """
        cursor = txn.cursor(db=self.inbox)
        user = pack_u64(uid)
        if not cursor.set_key(user):
            return [], 0
        cursor.last_dup()
        head = _u64.unpack_from(cursor.value())[0]
        count = min(limit, head - since)
        if count <= 0:
            return [], head
        cursor.set_range_dup(user, pack_u64(since + 1))
        entries: list[bytes] = list(islice(cursor.iternext_dup(keys=False, values=True), count))  # type: ignore[arg-type]  # bytes: buffers=False
        if len(entries) != count or _u64.unpack_from(entries[-1])[0] != since + count:
            raise CorruptionError(f"user {uid}'s inbox cursors after {since} are not dense up to its head {head}", path=self.path, key=(uid, since))
        return self._with_messages(txn, entries, uid), head

    def _with_messages(self, txn: lmdb.Transaction, entries: list[bytes], uid: int) -> list[InboxRef]:
        """Pair each inbox entry with its message; CorruptionError if one is missing."""
        found = txn.cursor(db=self.messages).getmulti(_msg_id_keys(len(entries)).unpack(b"".join(entries)))
        if len(found) != len(entries):  # getmulti skips missing keys: find the dangling entry
            ids = {key for key, _value in found}
            for entry in entries:
                if entry[8:16] not in ids:
                    cursor, msg_id = _codec.unpack_inbox_entry(entry)
                    raise CorruptionError(f"inbox entry references message {msg_id}, which is not stored", path=self.path, key=(uid, cursor))
        return list(zip(entries, found))  # type: ignore[arg-type]  # bytes: read transactions use buffers=False

    def message(self, txn: lmdb.Transaction, msg_id: int) -> bytes | None:
        """The ``messages`` value of ``msg_id`` (head and body), or None."""
        return txn.get(pack_u64(msg_id), db=self.messages)  # type: ignore[return-value]  # bytes: buffers=False

    def scan_history(self, txn: lmdb.Transaction, uid: int, conv: int, before: int, limit: int) -> list[InboxRef]:
        """Up to ``limit`` inbox entries of ``uid`` in ``conv`` with cursor < ``before``, newest first, with their messages.

        Read from the ``history`` index (the cursors of one user's messages
        in one conversation), never by filtering the inbox.
        """
        if before <= 1:
            return []
        index = txn.cursor(db=self.history)
        key = _pair.pack(uid, conv)
        if not index.set_key(key):
            return []
        if index.set_range_dup(key, pack_u64(before)):
            if not index.prev_dup():  # the newest cursor below `before`; none: all are at or above it
                return []
        else:  # every cursor of the conversation is below `before` (and the failed seek unpositioned us)
            index.set_key(key)
            index.last_dup()
        cursors = list(islice(index.iterprev_dup(keys=False, values=True), limit))  # starts with the current one
        inbox = txn.cursor(db=self.inbox)
        user = pack_u64(uid)
        entries: list[bytes] = []
        for cursor in cursors:
            if not inbox.set_range_dup(user, cursor) or inbox.value()[:8] != cursor:
                raise CorruptionError(f"history entry names cursor {unpack_u64(cursor)}, which the inbox lacks", path=self.path, key=(uid, conv))
            entries.append(inbox.value())  # type: ignore[arg-type]  # bytes: buffers=False
        return self._with_messages(txn, entries, uid)

    # --- writes -------------------------------------------------------------------

    def apply(self, records: Sequence[Record], upto_lsn: int) -> None:
        """Apply decoded WAL records of any kind and set the applied LSN, in one transaction.

        Records apply in LSN order; runs of DELIVER records are encoded and
        written together (the bulk path).  A full map is grown (doubling, up
        to ``max_map_size``) and the batch retried.  Raises :class:`StoreFull`
        if the disk is full or the map may not grow (the transaction is
        aborted; the records stay in the WAL).
        """
        self._reopen_if_needed()  # the handles below must belong to the live environment
        if self.readonly or self.legacy:
            raise SyncStoreError("records can only be applied to a writable state of the current format", path=self.path)
        runs: list[list[Record]] = [list(run) for _kind, run in groupby(records, type)]
        # Pure encoding before the transaction opens, per run of deliveries.
        encoded = {index: _encode_batch(cast("list[Deliver]", run)) for index, run in enumerate(runs) if type(run[0]) is Deliver}

        def write(txn: lmdb.Transaction) -> None:
            last_id = -1  # msg_id 0 exists (a clock before 2020 at replica 0)
            for index, run in enumerate(runs):
                if index in encoded:
                    batches, run_last_id = encoded[index]
                    for name, db, items in zip(_BATCH_DBS, (self.messages, self.inbox, self.history, self.dedup, self.dedup_expiry), batches):
                        self._put_sorted(txn, name, db, items)
                    last_id = max(last_id, run_last_id)
                else:
                    for record in cast("list[Expire]", run):
                        self._expire(txn, record.keys)
            stored = txn.get(_LAST_ID, db=self.meta)
            if last_id >= 0 and (stored is None or last_id > unpack_u64(stored)):
                txn.put(_LAST_ID, pack_u64(last_id), db=self.meta)
            txn.put(_APPLIED, pack_u64(upto_lsn), db=self.meta)

        self._write(write)

    def _expire(self, txn: lmdb.Transaction, keys: Sequence[ExpiredKey]) -> None:
        """Apply an EXPIRE record: remove each expiry key, and its dedup entry unless the key was delivered again."""
        for ms, sender, client_seq in keys:
            if not txn.delete(_triple.pack(ms, sender, client_seq), db=self.dedup_expiry):
                raise CorruptionError(
                    f"EXPIRE names dedup key ({sender}, {client_seq}) first delivered at {ms} ms, which the expiry index lacks: the LMDB state and the WAL disagree",
                    path=self.path,
                    key=(sender, client_seq),
                    hint="run store.check(); restore the store from a backup",
                )
            dedup_key = _pair.pack(sender, client_seq)
            entry = txn.get(dedup_key, db=self.dedup)
            # A key redelivered after expiry has a newer entry: keep that one.
            if entry is not None and msg_id_ms(_codec.decode_dedup(entry).msg_id) == ms:
                txn.delete(dedup_key, db=self.dedup)

    def expired_keys(self, before_ms: int, limit: int) -> tuple[ExpiredKey, ...]:
        """Up to ``limit`` oldest idempotency keys first delivered before ``before_ms`` (an EXPIRE record's keys)."""
        out: list[ExpiredKey] = []
        with self.read() as txn:
            cursor = txn.cursor(db=self.dedup_expiry)
            for key in cursor.iternext(keys=True, values=False):
                ms, sender, client_seq = _triple.unpack(key)
                if ms >= before_ms or len(out) >= limit:
                    break
                out.append((ms, sender, client_seq))
        return tuple(out)

    def _put_sorted(self, txn: lmdb.Transaction, name: str, db: Any, items: list[tuple[bytes, bytes]]) -> None:
        """Write sorted ``items`` with ``putmulti``, as appends where LMDB allows it.

        Appends (MDB_APPEND, and MDB_APPENDDUP for the duplicate databases)
        fill each page before starting the next, instead of splitting pages
        half-full.  Inbox and history items always append: their cursors
        continue each user's.  Messages and the expiry index append when the
        whole batch sorts after what they hold (the usual case: ids and times
        grow), and are inserted into otherwise; dedup entries are always
        inserted (their keys are random anyway).  A dedup entry replaces an
        expired one of its key; every other item is new, and one that is not
        (LMDB refused it) means the state and the log disagree.
        """
        if not items:
            return
        cursor = txn.cursor(db=db)
        dup = name in _DUPFIXED_NAMES
        replace = name == "dedup"
        # Never for dedup: a batch may hold two deliveries of one key (the first expired), and an
        # append refuses -- skips -- the second, where an insert replaces the first with it.
        append = dup or (not replace and (not cursor.last() or bytes(cursor.key()) < items[0][0]))
        if threading.active_count() == 1:  # no other thread to let in (replay on open, in a single-threaded program)
            added = cursor.putmulti(items, dupdata=dup, overwrite=dup or replace, append=append)[1]
        else:
            added = 0
            for start in range(0, len(items), _PUT_SLICE):
                added += cursor.putmulti(items[start : start + _PUT_SLICE], dupdata=dup, overwrite=dup or replace, append=append)[1]
                # putmulti holds the GIL; yield between slices so the group-commit
                # flusher never waits the 5 ms switch interval behind the applier.
                # (The yield is a system call that also lets other processes run: it
                # was a tenth of replay's wall time, where no thread waits.)
                time.sleep(0)
        if added != len(items) and name in _MUST_ADD:
            raise CorruptionError(
                f"{len(items) - added} of {len(items)} {name} items were already present or out of order: the LMDB state and the WAL disagree",
                path=self.path,
                hint="run store.check(); restore the store from a backup",
            )

    def remove_prefix(self, uid: int, upto: int) -> int:
        """Delete ``uid``'s inbox entries with cursor <= ``upto`` (and their history entries); return how many bodies were freed.

        The building block of deletion (archiving moves a prefix of each
        inbox out, oldest first): each removed entry decrements its message's
        ``refs``, and the message value is deleted when that reaches zero --
        never earlier, never later.  One transaction.  The user's newest
        entry carries its head (there is no heads database), so ``upto`` must
        be below the head: otherwise :class:`InvalidArgument` and nothing is
        removed.  What remains is dense from ``upto + 1`` to the head
        (``check()`` accepts an inbox whose first entries are gone).  The
        caller must hold the writer's apply lock: nothing may be applied for
        this user meanwhile.
        """
        user = pack_u64(uid)

        def remove(txn: lmdb.Transaction) -> int:
            inbox, history = txn.cursor(db=self.inbox), txn.cursor(db=self.history)
            head = self.head(txn, uid)
            if upto >= head:
                raise InvalidArgument(f"user {uid}: cannot remove up to cursor {upto}, the head is {head}", key=(uid, upto), hint="keep each user's newest entry: it carries the head")
            freed = 0
            while inbox.set_key(user):
                entry = inbox.value()
                cursor, msg_id = _codec.unpack_inbox_entry(entry)
                if cursor > upto:
                    break
                inbox.delete()
                msg_key = entry[8:16]
                value = txn.get(msg_key, db=self.messages)
                if value is None:
                    raise CorruptionError(f"inbox entry references message {msg_id}, which is not stored", path=self.path, key=(uid, cursor))
                refs, _sender, conv = _codec.unpack_stored_head(value)[:3]
                if not history.set_key_dup(_pair.pack(uid, conv), entry[:8]):
                    raise CorruptionError(f"inbox entry has no history entry (conv {conv})", path=self.path, key=(uid, cursor))
                history.delete()
                if refs <= 1:
                    txn.delete(msg_key, db=self.messages)
                    freed += 1
                else:
                    txn.put(msg_key, _codec.set_refs(bytes(value), refs - 1), db=self.messages)
            return freed

        return self._write(remove)

    def sync(self) -> None:
        """Force everything committed (meta page included) to disk."""
        self.env.sync(True)

    def close(self) -> None:
        """Close the environment (syncs first when writable) once reads in progress finish.

        Reads that start later raise :class:`StoreClosed`.  Idempotent.
        """

        def close() -> None:
            try:
                if not self.readonly:
                    self.env.sync(True)
            finally:
                self.env.close()

        self.gate.exclusive(close, close=True)

    # --- verification -------------------------------------------------------------

    def iter_heads(self, txn: lmdb.Transaction) -> Iterator[tuple[int, int]]:
        """Every (user id, head cursor), in user order."""
        cursor = txn.cursor(db=self.inbox)
        found = cursor.first()
        while found:
            uid = unpack_u64(cursor.key())
            cursor.last_dup()
            yield uid, _u64.unpack_from(cursor.value())[0]
            found = cursor.next_nodup()

    def check(self, wal_end_lsn: int) -> dict[str, int]:
        """Verify every invariant of the applied state (see ``_statecheck``); CorruptionError on a violation."""
        with self.read() as txn:
            return _statecheck.check(self, txn, wal_end_lsn)


def state_dir(path: str) -> str:
    """Directory of the LMDB environment inside a store directory."""
    return os.path.join(path, "state")


def _encode_batch(records: Sequence[Deliver]) -> tuple[list[list[tuple[bytes, bytes]]], int]:
    """The sorted (key, value) items of :data:`_BATCH_DBS` that ``records`` add, and their largest msg_id.

    Pure: encoding happens before the write transaction opens.  Each message
    is one ``messages`` item whatever its fan-out; each recipient adds a
    16-byte inbox entry and an 8-byte history entry.  The formats are
    ``_codec``'s (message value, inbox entry, dedup value), written out here
    with the packed keys reused (the dedup value's pairs are the packed user
    ids and cursors of the inbox entries): this loop is most of apply's and
    replay's CPU time.  tests/test_codec.py checks it against the codec's
    encoders.
    """
    pack, pack_head, pack_dedup_head = _u64.pack, _codec.pack_stored_head, _codec.pack_dedup_head
    pack_pair, pack_triple, new_fingerprint, join = _pair.pack, _triple.pack, _codec.new_fingerprint, b"".join
    messages: list[tuple[bytes, bytes]] = []
    inbox: list[tuple[bytes, bytes]] = []
    history: list[tuple[bytes, bytes]] = []
    dedup: list[tuple[bytes, bytes]] = []
    expiry: list[tuple[bytes, bytes]] = []
    add_message, add_entry, add_history, add_dedup, add_expiry = messages.append, inbox.append, history.append, dedup.append, expiry.append
    last_id = 0
    for msg_id, sender, conv, client_seq, ts_ms, priority, body, pairs in records:
        mid, conv_key, count = pack(msg_id), pack(conv), len(pairs)
        add_message((mid, pack_head(count, sender, conv, client_seq, ts_ms, priority) + body))
        fingerprint = new_fingerprint()
        fingerprint.update(conv_key)
        fingerprint.update(body)
        dedup_value = [pack_dedup_head(msg_id, fingerprint.digest(), count)]  # then the pairs
        add_part = dedup_value.append
        for uid, cursor in pairs:
            user, at = pack(uid), pack(cursor)
            add_entry((user, at + mid))  # cursor | msg_id
            add_history((user + conv_key, at))  # key user | conv
            add_part(user)
            add_part(at)
        add_dedup((pack_pair(sender, client_seq), join(dedup_value)))
        add_expiry((pack_triple(msg_id_ms(msg_id), sender, client_seq), b""))
        if msg_id > last_id:
            last_id = msg_id
    first = itemgetter(0)
    for items in (messages, inbox, history, dedup, expiry):
        # By key only, and stable: a user's inbox and history entries stay in cursor
        # order, and of two deliveries of one dedup key the later one is written last.
        items.sort(key=first)
    return [messages, inbox, history, dedup, expiry], last_id
