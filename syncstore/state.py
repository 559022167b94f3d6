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
from typing import TypeVar

import lmdb

from . import _codec
from ._codec import INBOX_HEAD_SIZE, DedupEntry, Deliver, pack_u64, unpack_u64
from .errors import CorruptionError, DurabilityError, StoreFull, SyncStoreError
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
_NEARLY_FULL_BYTES = 4 << 20  # an LMDB I/O error with less free space than this is "disk full"
_PUT_SLICE = 512  # items per putmulti call between GIL yields in apply()
STATE_FORMAT = 2  # 2: dedup values carry a fingerprint; 1 is migrated on open (State.upgrade)
_MIGRATE_BATCH = 4_096  # dedup entries per migration transaction (bounds its dirty pages)

_CURSOR_SIZE = INBOX_HEAD_SIZE - _codec.MESSAGE_HEAD_SIZE  # an inbox value starts with its cursor
_pair = struct.Struct(">QQ")
_triple = struct.Struct(">QQQ")
inbox_key = _pair.pack
_unpack_pair = _pair.unpack
_unpack_head = _codec.unpack_inbox_head


class _ResizeGate:
    """Many short read transactions at once, or one map resize alone.

    LMDB may change the map size only while this process has no transaction
    open; reads enter the gate for the life of their transaction, and a resize
    waits for them to drain while holding new ones back.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._readers = 0
        self._resizing = False

    def enter(self) -> None:
        with self._lock:
            while self._resizing:
                self._drained.wait()
            self._readers += 1

    def leave(self) -> None:
        with self._lock:
            self._readers -= 1
            if self._resizing and not self._readers:
                self._drained.notify_all()

    def exclusive(self, action: Callable[[], object]) -> None:
        """Run ``action`` with no read transaction open in this process."""
        with self._lock:
            self._resizing = True
            try:
                while self._readers:
                    self._drained.wait()
                action()
            finally:
                self._resizing = False
                self._drained.notify_all()


class _ReadTxn:
    """Context manager for one gated read transaction (a class: cheaper than @contextmanager)."""

    __slots__ = ("_state", "_txn")

    def __init__(self, state: State) -> None:
        self._state = state

    def __enter__(self) -> lmdb.Transaction:
        state = self._state
        while True:
            state.gate.enter()
            try:
                self._txn = state.env.begin(buffers=False)
                return self._txn
            except lmdb.MapResizedError:  # the writer process grew the map: adopt its size
                state.gate.leave()
                state.gate.exclusive(lambda: state.env.set_mapsize(0))
            except BaseException:
                state.gate.leave()
                raise

    def __exit__(self, *exc_info: object) -> None:
        self._txn.abort()
        self._state.gate.leave()


class State:
    """The LMDB environment holding inboxes, heads, the dedup index and metadata."""

    def __init__(self, path: str, *, readonly: bool, map_size: int, max_map_size: int | None = None) -> None:
        self.path = path
        self.readonly = readonly
        self.max_map_size = max_map_size
        self.gate = _ResizeGate()
        try:
            self.env = lmdb.open(
                path,
                map_size=map_size,
                max_dbs=len(_DB_NAMES),
                readonly=readonly,
                sync=True,
                metasync=False,
                readahead=False,  # point reads and short scans; readahead only pollutes RAM
                max_readers=512,
                create=not readonly,
            )
        except lmdb.InvalidError as error:
            raise CorruptionError(f"the LMDB state is not a valid LMDB environment: {error}", path=path) from error
        except lmdb.Error as error:
            raise SyncStoreError(
                f"cannot open the LMDB state: {error}", path=path, hint="check the path's permissions and free space"
            ) from error
        # Reader slots of dead processes (SIGKILLed readers) would pin pages forever.
        self.env.reader_check()
        try:
            if readonly:
                # Handles opened inside a read-only transaction die with it; open them bare.
                dbs = [self.env.open_db(name, create=False) for name in _DB_NAMES]
            else:
                with self.env.begin(write=True) as txn:
                    dbs = [self.env.open_db(name, txn=txn, create=True) for name in _DB_NAMES]
        except lmdb.NotFoundError as error:
            self.env.close()
            raise CorruptionError(f"the LMDB state lacks a named database: {error}", path=path) from error
        self.inbox, self.heads, self.dedup, self.dedup_expiry, self.meta = dbs
        if not readonly:
            with self.env.begin(write=True, db=self.meta) as txn:
                if txn.get(_FORMAT) is None:
                    txn.put(_FORMAT, pack_u64(STATE_FORMAT))
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
        # Where format-1 dedup values begin (see _DEDUP_V1_AFTER); None once all are current.
        self._v1_after: bytes | None = b"" if self.format == 1 else migrating

    # --- transactions -------------------------------------------------------------

    def read(self) -> _ReadTxn:
        """``with state.read() as txn``: a short read transaction (a long one pins pages)."""
        return _ReadTxn(self)

    def _write(self, body: Callable[[lmdb.Transaction], T]) -> T:
        """Run ``body`` in a write transaction, growing a full map and retrying.

        Maps LMDB failures to the error tree: :class:`StoreFull` for a full
        disk or a map that may not grow further, :class:`DurabilityError`
        otherwise.  The transaction is aborted on any error.
        """
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    return body(txn)
            except lmdb.MapFullError:
                self._grow_map()
            except lmdb.DiskError as error:
                raise StoreFull(f"LMDB write failed: {error}", path=self.path) from error
            except lmdb.Error as error:
                if self._disk_nearly_full():
                    raise StoreFull(f"LMDB write failed on a full disk: {error}", path=self.path) from error
                raise DurabilityError(f"LMDB write failed: {error}", path=self.path) from error

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
        """Close the environment (syncs first when writable)."""
        try:
            if not self.readonly:
                self.env.sync(True)
        finally:
            self.env.close()

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
        return {"users": users, "messages": messages, "dedup_entries": dedups, "applied_lsn": applied}

    def _check_head(self, heads: dict[int, int], uid: int | None, last_cursor: int) -> None:
        if uid is not None and heads.get(uid) != last_cursor:
            raise CorruptionError(f"user {uid}: head {heads.get(uid)} but last cursor {last_cursor}", path=self.path, key=uid)


def state_dir(path: str) -> str:
    """Directory of the LMDB environment inside a store directory."""
    return os.path.join(path, "state")
