"""The indexed state in LMDB, and ``apply(records)`` that moves WAL records into it.

Key layout (all integers unsigned 64-bit big-endian, so byte order is numeric
order and a range scan of one user's keys is a sync)::

    named db       key                                   value
    inbox          user id | cursor                       cursor | message head | body (_codec)
    heads          user id                                latest cursor of the user
    dedup          sender | client_seq                    first delivery (_codec.encode_dedup)
    dedup_expiry   first-delivery ms | sender | client_seq  empty (purge index, oldest first)
    meta           b"applied_lsn", b"last_msg_id", ...    u64 / bytes

State format (meta ``format_version``): 2 since dedup values carry a content
fingerprint (``_codec.encode_dedup``).  A format-1 state is migrated on open
by :meth:`State.upgrade`; a newer format than :data:`STATE_FORMAT` is refused.

Durability (see docs/design.md): the environment is opened ``sync=True,
metasync=False`` (MDB_NOMETASYNC).  Each commit fdatasyncs the data pages but
not the meta page, which becomes durable with the next commit.  LMDB documents
the failure mode as "a system crash can undo the last committed transaction
but retains integrity": because ``applied_lsn`` is written in the same
transaction as the data, an undone transaction simply means replaying a few
more WAL records.  WAL segments are retired only after ``env.sync(True)``.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from typing import Any, TypeVar

import lmdb

from . import _codec
from ._codec import INBOX_HEAD_SIZE, DedupEntry, Deliver, pack_u64, unpack_u64
from ._layout import DEFAULT_FILE_MODE
from .errors import CorruptionError, DurabilityError, PermissionDenied, ReadersFull, StoreClosed, StoreFull, SyncStoreError
from ._ids import msg_id_ms

__all__ = ["State", "inbox_key", "state_dir"]

log = logging.getLogger("syncstore.state")
T = TypeVar("T")

_DB_NAMES = (b"inbox", b"heads", b"dedup", b"dedup_expiry", b"meta")
_APPLIED = b"applied_lsn"
_LAST_ID = b"last_msg_id"
_REPLICA = b"replica_id"
_FORMAT = b"format_version"
#: Present only while a format-1 state is being migrated: the last dedup key
#: already rewritten (b"" before the first); keys after it are still format 1.
_DEDUP_V1_AFTER = b"dedup_v1_after"
_FILES = ("data.mdb", "lock.mdb")
_NEARLY_FULL_BYTES = 4 << 20  # an LMDB I/O error with less free space than this is "disk full"
_PUT_SLICE = 512  # items per putmulti call between GIL yields in apply()
STATE_FORMAT = 2  # 2: dedup values carry a fingerprint; 1 is migrated on open (State.upgrade)
_MIGRATE_BATCH = 4_096  # dedup entries per migration transaction (bounds its dirty pages)
#: LMDB reader slots (one per read transaction open at once, across every process).
DEFAULT_MAX_READERS = 512

_CURSOR_SIZE = INBOX_HEAD_SIZE - _codec.MESSAGE_HEAD_SIZE  # an inbox value starts with its cursor
_pair = struct.Struct(">QQ")
_triple = struct.Struct(">QQQ")
inbox_key = _pair.pack
_unpack_pair = _pair.unpack
_unpack_head = _codec.unpack_inbox_head


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

    __slots__ = ("_state", "_txn")

    def __init__(self, state: State) -> None:
        self._state = state

    def __enter__(self) -> lmdb.Transaction:
        state = self._state
        cleared = False
        while True:
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
    """The LMDB environment holding inboxes, heads, the dedup index and metadata."""

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
        whatever the umask.  Read-only: an environment that was never
        initialised (no format key) opens with ``initialised = False`` and no
        databases.  ``lock=False`` (read-only only) opens without LMDB's lock
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
        self._lock = lock
        self._file_mode = file_mode
        self._reopen_needed = False
        self._open_env(map_size, replica_id)
        self.format = STATE_FORMAT
        # Where format-1 dedup values begin (see _DEDUP_V1_AFTER); None once all are current.
        self._v1_after: bytes | None = None
        if not self.initialised:
            return
        with self.read() as txn:
            stored = txn.get(_FORMAT, db=self.meta)
            migrating = txn.get(_DEDUP_V1_AFTER, db=self.meta)
        self.format = STATE_FORMAT if stored is None else unpack_u64(stored)
        if not 1 <= self.format <= STATE_FORMAT:
            self.env.close()
            raise CorruptionError(
                f"LMDB state format {self.format} is not supported (this syncstore reads formats 1 to {STATE_FORMAT})",
                path=path,
                hint=f"open it with a syncstore version that supports state format {self.format}",
            )
        self._v1_after = b"" if self.format == 1 else migrating

    def _open_env(self, map_size: int, replica_id: int | None = None) -> None:
        path, readonly, lock, file_mode = self.path, self.readonly, self._lock, self._file_mode
        new_files = [] if readonly else [f for f in _FILES if not os.path.exists(os.path.join(path, f))]
        try:
            self.env = lmdb.open(
                path,
                map_size=map_size,
                max_dbs=len(_DB_NAMES),
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
            if readonly:
                dbs = self._open_existing_dbs()
            else:
                with self.env.begin(write=True) as txn:
                    dbs = [self.env.open_db(name, txn=txn, create=True) for name in _DB_NAMES]
                    if txn.get(_FORMAT, db=dbs[-1]) is None:
                        txn.put(_FORMAT, pack_u64(STATE_FORMAT), db=dbs[-1])
                        if replica_id is not None:
                            txn.put(_REPLICA, pack_u64(replica_id), db=dbs[-1])
                        self.created = True
        except lmdb.NotFoundError as error:
            self.env.close()
            raise CorruptionError(f"the LMDB state lacks a named database: {error}", path=path) from error
        self.inbox, self.heads, self.dedup, self.dedup_expiry, self.meta = dbs
        for name in _FILES if self.created else new_files:
            os.chmod(os.path.join(path, name), file_mode)  # LMDB applies the umask

    def _open_existing_dbs(self) -> list[Any]:
        """The named databases of a read-only environment; none (``initialised = False``) before its first initialisation."""
        # Handles opened inside a read-only transaction die with it; open them bare.
        try:
            meta = self.env.open_db(b"meta", create=False)
        except lmdb.NotFoundError:
            meta = None
        if meta is not None:
            with self.env.begin() as txn:
                if txn.get(_FORMAT, db=meta) is not None:
                    return [self.env.open_db(name, create=False) for name in _DB_NAMES]
        self.initialised = False
        return [None] * len(_DB_NAMES)

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
        """The user's latest applied cursor (0 if none)."""
        value = txn.get(pack_u64(uid), db=self.heads)
        return 0 if value is None else unpack_u64(value)

    def dedup_entry(self, txn: lmdb.Transaction, sender: int, client_seq: int) -> DedupEntry | None:
        """The first delivery (msg_id, fingerprint, cursors) of an idempotency key, if applied."""
        value = txn.get(_pair.pack(sender, client_seq), db=self.dedup)
        return None if value is None else _codec.decode_dedup(value)

    def scan_inbox(self, txn: lmdb.Transaction, uid: int, since: int, limit: int, head: int) -> list[bytes | memoryview]:
        """Inbox values of ``uid`` with cursor > ``since``, ascending, at most ``limit``.

        ``head`` is the user's head in the same transaction.  Cursors are
        dense, so the page is exactly the next ``min(limit, head - since)``
        values after ``since``: they are read without a per-item Python loop,
        and the last key read confirms it.  Should the range not be dense (a
        store damaged by hand), it falls back to checking key by key.
        """
        count = min(limit, head - since)
        if count <= 0:
            return []
        cursor = txn.cursor(db=self.inbox)
        if not cursor.set_range(_pair.pack(uid, since + 1)):
            return []
        values = list(islice(cursor.iternext(keys=False, values=True), count))
        if len(values) == count and cursor.key() == _pair.pack(uid, since + count):
            return values
        out: list[bytes | memoryview] = []
        cursor.set_range(_pair.pack(uid, since + 1))
        for key, value in cursor:
            if _unpack_pair(key)[0] != uid or len(out) >= limit:
                break
            out.append(value)
        return out

    # --- writes -------------------------------------------------------------------

    def apply(self, records: Sequence[Deliver], upto_lsn: int) -> None:
        """Apply decoded DELIVER records and set the applied LSN, in one transaction.

        A full map is grown (doubling, up to ``max_map_size``) and the batch
        retried.  Raises :class:`StoreFull` if the disk is full or the map may
        not grow (the transaction is aborted; the records stay in the WAL).
        """
        self._reopen_if_needed()  # the handles below must belong to the live environment
        if self._v1_after is not None:
            # A format-1 entry next to a format-2 one could never be told apart again.
            raise SyncStoreError(
                "the LMDB state still has format-1 dedup entries", path=self.path, hint="call State.upgrade() before applying records"
            )
        # Encode everything first, then write each database with one putmulti
        # (a loop in C, over sorted keys for B-tree locality); a user's head is
        # written once per batch, not once per message.
        inbox: list[tuple[bytes, bytes]] = []
        heads: dict[int, int] = {}
        dedup: list[tuple[bytes, bytes]] = []
        expiry: list[tuple[bytes, bytes]] = []
        last_id = 0
        for record in records:
            shared = _codec.encode_inbox_head(record)
            for uid, cursor in record.pairs:
                inbox.append((_pair.pack(uid, cursor), _codec.encode_inbox_value(cursor, shared)))
                heads[uid] = cursor  # records come in LSN order, so cursors only grow
            fingerprint = _codec.dedup_fingerprint(record.conv, record.body)
            dedup.append((_pair.pack(record.sender, record.client_seq), _codec.encode_dedup(record.msg_id, fingerprint, record.pairs)))
            expiry.append((_triple.pack(msg_id_ms(record.msg_id), record.sender, record.client_seq), b""))
            last_id = max(last_id, record.msg_id)
        inbox.sort()
        dedup.sort()
        batches = (
            (self.inbox, inbox),
            (self.heads, sorted((pack_u64(uid), pack_u64(cursor)) for uid, cursor in heads.items())),
            (self.dedup, dedup),
            (self.dedup_expiry, expiry),
        )

        def write(txn: lmdb.Transaction) -> None:
            for db, items in batches:
                cursor = txn.cursor(db=db)
                for start in range(0, len(items), _PUT_SLICE):
                    cursor.putmulti(items[start : start + _PUT_SLICE])
                    # putmulti holds the GIL; yield between slices so the group-commit
                    # flusher never waits the 5 ms switch interval behind the applier.
                    time.sleep(0)
            stored = txn.get(_LAST_ID, db=self.meta)
            if records and (stored is None or last_id > unpack_u64(stored)):
                txn.put(_LAST_ID, pack_u64(last_id), db=self.meta)
            txn.put(_APPLIED, pack_u64(upto_lsn), db=self.meta)

        self._write(write)

    def purge_dedup(self, before_ms: int, batch: int) -> int:
        """Delete up to ``batch`` dedup entries first delivered before ``before_ms``; return how many."""
        return self._write(lambda txn: self._purge(txn, before_ms, batch))

    def _purge(self, txn: lmdb.Transaction, before_ms: int, batch: int) -> int:
        removed = 0
        cursor = txn.cursor(db=self.dedup_expiry)
        if not cursor.first():
            return 0
        while removed < batch:
            key = cursor.key()
            if not key:
                break
            ms, sender, client_seq = _triple.unpack(key)
            if ms >= before_ms:
                break
            dedup_key = _pair.pack(sender, client_seq)
            entry = txn.get(dedup_key, db=self.dedup)
            # A key redelivered after expiry has a newer entry: keep that one.
            if entry is not None and msg_id_ms(_codec.decode_dedup(entry).msg_id) == ms:
                txn.delete(dedup_key, db=self.dedup)
            cursor.delete()
            removed += 1
        return removed

    # --- format migration -----------------------------------------------------------

    def upgrade(self, batch: int | None = None) -> int:
        """Migrate a format-1 state to :data:`STATE_FORMAT`; return how many dedup entries were rewritten.

        Format 1 kept no content fingerprint in dedup values.  Each entry gets
        the fingerprint of the inbox entry it points at (the inbox value holds
        conv and body), so a retry of a key delivered before the upgrade is
        checked like any other.  Nothing to do on a current or read-only state.

        Everything is verified before the first write: a damaged entry raises
        :class:`CorruptionError` with the state unchanged.  The first
        transaction sets the format to 2, so that an older syncstore refuses
        the half-migrated state instead of misreading it; entries are then
        rewritten in key order, at most ``batch`` per transaction (bounding
        its dirty pages), with the last key done recorded in the same
        transaction, so an interrupted upgrade resumes where it stopped at the
        next open.  Call it before any record is applied: :meth:`apply`
        refuses a state that still has format-1 entries.
        """
        if self.readonly or self._v1_after is None:
            return 0
        batch = max(1, _MIGRATE_BATCH if batch is None else batch)
        if self.format == 1:
            with self.read() as txn:
                for key, value in txn.cursor(db=self.dedup):
                    self._v1_entry(txn, key, value)
        rewritten = 0
        while self._v1_after is not None:
            count, self._v1_after = self._write(lambda txn: self._upgrade_step(txn, batch))
            self.format = STATE_FORMAT
            rewritten += count
        log.info("LMDB state %s migrated to format %d (%d dedup entries)", self.path, STATE_FORMAT, rewritten)
        return rewritten

    def _upgrade_step(self, txn: lmdb.Transaction, batch: int) -> tuple[int, bytes | None]:
        """Rewrite up to ``batch`` format-1 dedup entries; return the count and where format 1 now begins."""
        after = txn.get(_DEDUP_V1_AFTER, db=self.meta)
        if after is None:
            after = b""
            txn.put(_FORMAT, pack_u64(STATE_FORMAT), db=self.meta)
        cursor = txn.cursor(db=self.dedup)
        found = cursor.set_range(after)
        if found and cursor.key() == after:
            found = cursor.next()
        items: list[tuple[bytes, bytes]] = []
        while found and len(items) < batch:
            key = cursor.key()
            items.append((key, _codec.encode_dedup(*self._v1_entry(txn, key, cursor.value()))))
            found = cursor.next()
        if items:
            txn.cursor(db=self.dedup).putmulti(items)  # overwrites: same keys, format-2 values
        if found:
            txn.put(_DEDUP_V1_AFTER, items[-1][0], db=self.meta)
            return len(items), items[-1][0]
        txn.delete(_DEDUP_V1_AFTER, db=self.meta)
        return len(items), None

    def _v1_entry(self, txn: lmdb.Transaction, key: bytes, value: bytes) -> DedupEntry:
        """A format-1 dedup value with its fingerprint computed from the inbox; CorruptionError if it points nowhere."""
        where = _unpack_pair(key)
        try:
            msg_id, pairs = _codec.decode_dedup_v1(value)
        except CorruptionError as error:
            raise CorruptionError(error.message, path=self.path, key=where) from None
        if not pairs:
            # Only a crafted WAL record makes one; a retry names recipients, so it conflicts whatever the fingerprint.
            return DedupEntry(msg_id, bytes(_codec.FINGERPRINT_SIZE), pairs)
        stored = txn.get(_pair.pack(*pairs[0]), db=self.inbox)
        if stored is None or len(stored) < INBOX_HEAD_SIZE or _unpack_head(stored)[1] != msg_id:
            raise CorruptionError(f"dedup entry points at a missing inbox entry {pairs[0]}", path=self.path, key=where)
        return DedupEntry(msg_id, _codec.dedup_fingerprint(_unpack_head(stored)[3], stored[INBOX_HEAD_SIZE:]), pairs)

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
        """Every (user id, head cursor)."""
        for key, value in txn.cursor(db=self.heads):
            yield unpack_u64(key), unpack_u64(value)

    def check(self, wal_end_lsn: int) -> dict[str, int]:
        """Verify invariants of the applied state; raise :class:`CorruptionError` on a violation.

        Checks: every user's cursors are dense 1..head and match the heads db;
        each inbox value decodes; every dedup entry points at inbox entries
        holding its msg_id and one and the same message, whose conv and body
        match the entry's fingerprint (format-1 entries, which a read-only
        view of a not yet migrated store may see, have none); the expiry
        index covers the dedup index; the applied LSN is not beyond the WAL
        end.  Returns counts.
        """
        with self.read() as txn:
            applied = self._meta_u64(txn, _APPLIED)
            if applied > wal_end_lsn:
                raise CorruptionError(f"applied LSN {applied} is beyond the WAL end {wal_end_lsn}", path=self.path)
            users = messages = 0
            heads = dict(self.iter_heads(txn))
            expected_uid, expected_cursor = None, 0
            for key, value in txn.cursor(db=self.inbox):
                uid, cursor = _unpack_pair(key)
                if uid != expected_uid:
                    self._check_head(heads, expected_uid, expected_cursor)
                    expected_uid, expected_cursor = uid, 0
                    users += 1
                if cursor != expected_cursor + 1:
                    raise CorruptionError(f"user {uid}: cursor {cursor} follows {expected_cursor}", path=self.path, key=(uid, cursor))
                if len(value) < INBOX_HEAD_SIZE or _unpack_head(value)[0] != cursor:
                    raise CorruptionError("inbox value is truncated or names another cursor", path=self.path, key=(uid, cursor))
                expected_cursor = cursor
                messages += 1
            self._check_head(heads, expected_uid, expected_cursor)
            if len(heads) != users:
                raise CorruptionError(f"{len(heads)} heads but {users} users with messages", path=self.path)
            dedups = 0
            v1_after = b"" if self._meta_u64(txn, _FORMAT) == 1 else txn.get(_DEDUP_V1_AFTER, db=self.meta)
            for key, value in txn.cursor(db=self.dedup):
                sender, client_seq = _unpack_pair(key)
                fingerprint: bytes | None = None
                try:
                    if v1_after is not None and key > v1_after:
                        msg_id, pairs = _codec.decode_dedup_v1(value)
                    else:
                        msg_id, fingerprint, pairs = _codec.decode_dedup(value)
                except CorruptionError as error:
                    raise CorruptionError(error.message, path=self.path, key=(sender, client_seq)) from None
                first = None  # inbox value of the first recipient: every other must hold the same message
                for uid, cursor in pairs:
                    stored = txn.get(_pair.pack(uid, cursor), db=self.inbox)
                    if stored is None or _unpack_head(stored)[1] != msg_id:
                        raise CorruptionError(f"dedup entry points at a missing inbox entry ({uid}, {cursor})", path=self.path, key=(sender, client_seq))
                    if first is None:
                        first = stored
                    elif stored[_CURSOR_SIZE:] != first[_CURSOR_SIZE:]:
                        raise CorruptionError(f"recipient ({uid}, {cursor}) holds another message than the first recipient", path=self.path, key=(sender, client_seq))
                if fingerprint is not None and first is not None:
                    if _codec.dedup_fingerprint(_unpack_head(first)[3], first[INBOX_HEAD_SIZE:]) != fingerprint:
                        raise CorruptionError("dedup entry's fingerprint does not match the message it points at", path=self.path, key=(sender, client_seq))
                if txn.get(_triple.pack(msg_id_ms(msg_id), sender, client_seq), db=self.dedup_expiry) is None:
                    raise CorruptionError("dedup entry has no expiry index entry", path=self.path, key=(sender, client_seq))
                dedups += 1
        return {"users": users, "inbox_entries": messages, "dedup_entries": dedups, "applied_lsn": applied}

    def _check_head(self, heads: dict[int, int], uid: int | None, last_cursor: int) -> None:
        if uid is not None and heads.get(uid) != last_cursor:
            raise CorruptionError(f"user {uid}: head {heads.get(uid)} but last cursor {last_cursor}", path=self.path, key=uid)


def state_dir(path: str) -> str:
    """Directory of the LMDB environment inside a store directory."""
    return os.path.join(path, "state")
