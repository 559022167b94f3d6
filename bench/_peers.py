"""The systems the benchmarks compare syncstore with, doing the same job.

- :class:`SqlitePeer`: what one would build on SQLite: WAL journal,
  ``synchronous=FULL``, a per-user cursor table (``heads``), inboxes keyed by
  (uid, cursor) holding the message (body included), a unique dedup key on
  (sender, client_seq) with an expiry index, one transaction per message,
  one connection per thread, ``busy_timeout`` set.  Group messages (more
  than :data:`SqlitePeer.INLINE_MAX_RECIPIENTS` recipients) keep their body
  once, in a ``messages`` table, and their inbox rows an empty body that the
  read fills in from there.
- :class:`LmdbCeiling`: raw py-lmdb writing and reading exactly syncstore's
  state format 3 (issue #8: one body per message in ``messages``, 16-byte
  ``inbox`` and 8-byte ``history`` dups per recipient, no heads db), one write
  transaction per message with LMDB's default durability (``sync=True,
  metasync=True``), or one per batch with one ``putmulti`` per database;
  reading with ``set_range_dup`` + dups iterated in C + one ``getmulti``.
  No overlay, no WAL, no validation: what the LMDB layer alone costs.

Every system exposes the same small surface, used by the workloads in
``_harness``: ``writer()`` returns a per-thread ``deliver(item)`` callable,
``deliver_batch(items)`` (one transaction), ``reader()`` returns a per-thread
``sync(uid, since, limit)`` callable, ``heads_total(users)`` and ``close()``.
An *item* is a tuple ``(sender, conv, client_seq, body, to)``.
"""

from __future__ import annotations

import hashlib
import itertools
from itertools import islice
import os
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence

import lmdb

import syncstore
from syncstore import Message

Item = tuple[int, int, int, bytes, tuple[int, ...]]
_pair = struct.Struct(">QQ")
_triple = struct.Struct(">QQQ")
_u64 = struct.Struct(">Q")
# The peers encode values with the sizes of syncstore's (docs/format.md, state format 3)
# but their own code, so they do not depend on syncstore internals.
_message_head = struct.Struct(">IQQQQB")  # messages value: refs, sender, conv, client_seq, ts_ms, priority (37 B), body
_inbox_entry = struct.Struct(">QQ")  # inbox dup: cursor, msg_id (16 B)
_dedup_head = struct.Struct(">Q16sI")  # LMDB dedup value: msg_id, fingerprint, recipient count; then the pairs
_sqlite_dedup_head = struct.Struct(">QI")  # SQLite's cursors blob: msg_id, recipient count; then the pairs


def encode_pairs(msg_id: int, pairs: Sequence[tuple[int, int]]) -> bytes:
    """SQLite's dedup blob: msg_id, count, (uid, cursor) pairs."""
    flat = [n for pair in pairs for n in pair]
    return _sqlite_dedup_head.pack(msg_id, len(pairs)) + struct.pack(f">{len(flat)}Q", *flat)


def decode_pairs(value: bytes) -> tuple[int, tuple[tuple[int, int], ...]]:
    """Inverse of :func:`encode_pairs`."""
    msg_id, count = _sqlite_dedup_head.unpack_from(value)
    flat = struct.unpack_from(f">{2 * count}Q", value, _sqlite_dedup_head.size)
    return msg_id, tuple(zip(flat[0::2], flat[1::2]))


def fingerprint(conv: int, body: bytes) -> bytes:
    """16 bytes identifying a delivery's content (the size of syncstore's dedup fingerprint)."""
    digest = hashlib.blake2b(_u64.pack(conv), digest_size=16)
    digest.update(body)
    return digest.digest()


def encode_dedup(msg_id: int, print_: bytes, pairs: Sequence[tuple[int, int]]) -> bytes:
    """An LMDB dedup value (format 2 and 3): msg_id, fingerprint, count, (uid, cursor) pairs."""
    flat = [n for pair in pairs for n in pair]
    return _dedup_head.pack(msg_id, print_, len(pairs)) + struct.pack(f">{len(flat)}Q", *flat)


def decode_dedup(value: bytes) -> tuple[int, bytes, tuple[tuple[int, int], ...]]:
    """Inverse of :func:`encode_dedup`."""
    msg_id, print_, count = _dedup_head.unpack_from(value)
    flat = struct.unpack_from(f">{2 * count}Q", value, _dedup_head.size)
    return msg_id, print_, tuple(zip(flat[0::2], flat[1::2]))


def _uids(users: int | Iterable[int]) -> Iterable[int]:
    """``users`` as user ids: ``range(users)`` for a count."""
    return range(users) if isinstance(users, int) else users


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class SyncstoreSystem:
    """syncstore itself, behind the common surface."""

    name = "syncstore"

    def __init__(self, path: str, durability: str = "sync", **options: object) -> None:
        self.store = syncstore.open(path, durability=durability, **options)  # type: ignore[arg-type]

    def writer(self) -> Callable[[Item], object]:
        """A ``deliver(item)`` callable for one thread."""
        deliver = self.store.deliver

        def call(item: Item) -> object:
            sender, conv, client_seq, body, to = item
            return deliver(Message(sender, conv, client_seq, body), to)

        return call

    def deliver_batch(self, items: Sequence[Item]) -> object:
        """All ``items`` with one ``deliver_many``."""
        return self.store.deliver_many([(Message(s, c, q, b), to) for s, c, q, b, to in items])

    def reader(self, decode: bool = False) -> Callable[[int, int, int], Sequence[object]]:
        """A ``sync(uid, since, limit) -> messages`` callable for one thread.

        ``decode=True`` also turns every message of the page into a
        ``StoredMessage`` (``sync`` itself may decode lazily, on access).
        """
        sync = self.store.sync
        if decode:
            return lambda uid, since, limit: tuple(sync(uid, since, limit).messages)
        return lambda uid, since, limit: sync(uid, since, limit).messages

    def heads_total(self, users: int | Iterable[int]) -> int:
        """Sum of the heads of ``users`` (a count: ``0..users-1``, or the ids) = their inbox entries."""
        return sum(self.store.head(uid) for uid in _uids(users))

    def thread_ids(self) -> dict[str, int | None]:
        """Native ids of the store's WAL flusher and LMDB applier threads (None if not running)."""
        found: dict[str, int | None] = {"flusher": None, "applier": None}
        for thread in threading.enumerate():
            for role in found:
                if thread.name == f"syncstore-{role}:{self.store.path}":
                    found[role] = thread.native_id
        return found

    def close(self) -> None:
        """Close the store (flushes and applies everything)."""
        self.store.close()


class SqlitePeer:
    """The same job on SQLite (see the module docstring)."""

    name = "sqlite"
    #: Messages to more recipients keep their body once, in ``messages`` (a group message
    #: copied into 100 inboxes would be 100 copies of the body); 1:1 ones inline, as before.
    INLINE_MAX_RECIPIENTS = 2
    SCHEMA = """
        CREATE TABLE IF NOT EXISTS heads (uid INTEGER PRIMARY KEY, head INTEGER NOT NULL);
        CREATE TABLE IF NOT EXISTS inbox (
            uid INTEGER NOT NULL, cursor INTEGER NOT NULL, msg_id INTEGER NOT NULL,
            sender INTEGER NOT NULL, conv INTEGER NOT NULL, client_seq INTEGER NOT NULL,
            ts_ms INTEGER NOT NULL, priority INTEGER NOT NULL, body BLOB NOT NULL,
            PRIMARY KEY (uid, cursor)) WITHOUT ROWID;
        CREATE TABLE IF NOT EXISTS dedup (
            sender INTEGER NOT NULL, client_seq INTEGER NOT NULL, msg_id INTEGER NOT NULL,
            first_ms INTEGER NOT NULL, cursors BLOB NOT NULL,
            PRIMARY KEY (sender, client_seq)) WITHOUT ROWID;
        CREATE INDEX IF NOT EXISTS dedup_expiry ON dedup (first_ms);
        CREATE TABLE IF NOT EXISTS messages (msg_id INTEGER PRIMARY KEY, body BLOB NOT NULL);
    """

    def __init__(self, path: str, busy_timeout_ms: int = 60_000) -> None:
        os.makedirs(path, exist_ok=True)
        self.file = os.path.join(path, "peer.sqlite")
        self.busy_timeout_ms = busy_timeout_ms
        self._ids = itertools.count(1)
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        with self._connect() as conn:
            conn.executescript(self.SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.file, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout={self.busy_timeout_ms}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        with self._lock:
            self._connections.append(conn)
        return conn

    def _deliver(self, conn: sqlite3.Connection, item: Item) -> tuple[int, bool, list[tuple[int, int]]]:
        """One message, inside the caller's transaction."""
        sender, conv, client_seq, body, to = item
        execute = conn.execute
        row = execute("SELECT msg_id, cursors FROM dedup WHERE sender=? AND client_seq=?", (sender, client_seq)).fetchone()
        if row is not None:
            return row[0], True, list(decode_pairs(row[1])[1])
        msg_id, ts_ms = next(self._ids), _now_ms()
        recipients = dict.fromkeys(to)
        if len(recipients) > self.INLINE_MAX_RECIPIENTS:
            execute("INSERT INTO messages VALUES (?, ?)", (msg_id, body))
            body = b""  # the read takes it from messages
        pairs = []
        for uid in recipients:
            (cursor,) = execute(
                "INSERT INTO heads (uid, head) VALUES (?, 1) ON CONFLICT (uid) DO UPDATE SET head = head + 1 RETURNING head", (uid,)
            ).fetchone()
            execute("INSERT INTO inbox VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?)", (uid, cursor, msg_id, sender, conv, client_seq, ts_ms, body))
            pairs.append((uid, cursor))
        execute(
            "INSERT INTO dedup VALUES (?, ?, ?, ?, ?)", (sender, client_seq, msg_id, ts_ms, encode_pairs(msg_id, pairs))
        )
        return msg_id, False, pairs

    def writer(self) -> Callable[[Item], object]:
        """A ``deliver(item)`` callable with its own connection: one transaction per message."""
        conn = self._connect()

        def call(item: Item) -> object:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = self._deliver(conn, item)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

        return call

    def deliver_batch(self, items: Sequence[Item]) -> object:
        """All ``items`` in one transaction."""
        conn = self._batch_conn if hasattr(self, "_batch_conn") else self._connect()
        self._batch_conn = conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            results = [self._deliver(conn, item) for item in items]
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return results

    def reader(self) -> Callable[[int, int, int], Sequence[object]]:
        """``SELECT ... WHERE uid=? AND cursor>? ORDER BY cursor LIMIT ?`` on its own connection.

        An empty inline body is looked up in ``messages`` (a group message's;
        a 1:1 message with an empty body finds none there and stays empty).
        """
        conn = self._connect()
        query = (
            "SELECT cursor, msg_id, sender, conv, client_seq, ts_ms, priority,"
            " CASE WHEN length(body) THEN body ELSE coalesce((SELECT m.body FROM messages m WHERE m.msg_id = inbox.msg_id), body) END"
            " FROM inbox WHERE uid = ? AND cursor > ? ORDER BY cursor LIMIT ?"
        )
        execute = conn.execute
        return lambda uid, since, limit: execute(query, (uid, since, limit)).fetchall()

    def heads_total(self, users: int | Iterable[int]) -> int:
        """Sum of the heads of ``users`` (a count: ``0..users-1``, or the ids) = their inbox entries."""
        conn = self._connect()
        if isinstance(users, int):
            return conn.execute("SELECT coalesce(sum(head), 0) FROM heads WHERE uid < ?", (users,)).fetchone()[0]
        execute = conn.execute
        return sum(row[0] for uid in users for row in execute("SELECT head FROM heads WHERE uid = ?", (uid,)))

    def close(self) -> None:
        """Close every connection (the last one checkpoints the WAL)."""
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()


class LmdbCeiling:
    """Raw py-lmdb writing and reading syncstore's state format 3 (see the module docstring).

    Named databases, keys and values exactly as in format 3
    (``/work/shared-notes/layout-v3.md``, later ``docs/format.md``):
    ``messages`` (one body per message, with a reference count), ``inbox``
    and ``history`` (DUPSORT | DUPFIXED: one 16-byte and one 8-byte dup per
    recipient), ``dedup``, ``dedup_expiry`` and ``meta`` (``format_version``
    3, written at creation).  No ``heads`` db: a user's head is the cursor of
    the last dup of ``inbox[user]``.  The next msg_id continues after the
    last key of ``messages`` (msg_ids are a counter from 1: inserts are
    appends, as syncstore's time-ordered ids are).  Neither a WAL nor
    ``applied_lsn``: this peer has no log.

    Stateless between transactions: heads are read from LMDB in every
    transaction, as a writer without a cache must.
    """

    name = "lmdb"
    FORMAT = 3
    DB_NAMES = (b"messages", b"inbox", b"history", b"dedup", b"dedup_expiry", b"meta")
    _DUPFIXED = (b"inbox", b"history")

    def __init__(self, path: str, *, sync: bool = True, metasync: bool = True, readonly: bool = False) -> None:
        self.env = lmdb.open(path, map_size=64 << 30, max_dbs=len(self.DB_NAMES), sync=sync, metasync=metasync, readahead=False, readonly=readonly, max_readers=512)
        if readonly:  # handles opened inside a read-only txn die with it (py-lmdb 3): no txn here
            dbs = [self.env.open_db(name, create=False) for name in self.DB_NAMES]
        else:
            with self.env.begin(write=True) as txn:
                dbs = [self.env.open_db(name, txn=txn, dupsort=name in self._DUPFIXED, dupfixed=name in self._DUPFIXED) for name in self.DB_NAMES]
                if txn.get(b"format_version", db=dbs[-1]) is None:
                    txn.put(b"format_version", _u64.pack(self.FORMAT), db=dbs[-1])
        self.messages, self.inbox, self.history, self.dedup, self.expiry, self.meta = dbs
        with self.env.begin() as txn:
            stored = txn.get(b"format_version", db=self.meta)
            if stored is None or _u64.unpack(stored)[0] != self.FORMAT:
                raise ValueError(f"{path}: LMDB state format {stored and _u64.unpack(stored)[0]}, not {self.FORMAT}")
            cursor = txn.cursor(db=self.messages)
            last_id = _u64.unpack(cursor.key())[0] if cursor.last() else 0
        self._ids = itertools.count(last_id + 1)

    @staticmethod
    def state_format(path: str) -> int | None:
        """``meta[format_version]`` of the LMDB environment at ``path`` (None if absent), read-only."""
        env = lmdb.open(path, max_dbs=8, readonly=True, lock=False)
        try:
            try:
                meta = env.open_db(b"meta", create=False)
            except lmdb.NotFoundError:
                return None
            with env.begin(db=meta) as txn:
                stored = txn.get(b"format_version")
            return None if stored is None else _u64.unpack(stored)[0]
        finally:
            env.close()

    # --- writes ---------------------------------------------------------------------

    @staticmethod
    def _head(cursor: lmdb.Cursor, user_key: bytes) -> int:
        """A user's head: the cursor of the last dup of ``inbox[user]`` (0 if none)."""
        if cursor.set_key(user_key) and cursor.last_dup():
            return _u64.unpack_from(cursor.value())[0]
        return 0

    def _deliver(self, txn: lmdb.Transaction, item: Item) -> tuple[int, bool, tuple[tuple[int, int], ...]]:
        """One message, with single puts (the one-transaction-per-message path)."""
        sender, conv, client_seq, body, to = item
        dedup_key = _pair.pack(sender, client_seq)
        seen = txn.get(dedup_key, db=self.dedup)
        if seen is not None:
            msg_id, _fingerprint, pairs = decode_dedup(seen)
            return msg_id, True, pairs
        msg_id, ts_ms = next(self._ids), _now_ms()
        inbox_cursor = txn.cursor(db=self.inbox)
        pairs = tuple((uid, self._head(inbox_cursor, _u64.pack(uid)) + 1) for uid in dict.fromkeys(to))
        put = txn.put
        written = put(_u64.pack(msg_id), _message_head.pack(len(pairs), sender, conv, client_seq, ts_ms, 0) + body, db=self.messages, append=True)
        for uid, cursor in pairs:
            written &= put(_u64.pack(uid), _inbox_entry.pack(cursor, msg_id), db=self.inbox, append=True)  # APPENDDUP
            written &= put(_pair.pack(uid, conv), _u64.pack(cursor), db=self.history, append=True)
        written &= put(dedup_key, encode_dedup(msg_id, fingerprint(conv, body), pairs), db=self.dedup)
        written &= put(_triple.pack(ts_ms, sender, client_seq), b"", db=self.expiry)
        if not written:
            raise AssertionError(f"lmdb peer: a put of message {msg_id} was refused (out of order append?)")
        return msg_id, False, pairs

    def writer(self) -> Callable[[Item], object]:
        """A ``deliver(item)`` callable: one write transaction (and LMDB's syncs) per message."""

        def call(item: Item) -> object:
            with self.env.begin(write=True) as txn:
                return self._deliver(txn, item)

        return call

    def deliver_batch(self, items: Sequence[Item]) -> list[tuple[int, bool, tuple[tuple[int, int], ...]]]:
        """All ``items`` in one write transaction, the best raw py-lmdb can do.

        Dedup lookups in one ``getmulti``; each distinct recipient's head read
        once; every record encoded, sorted, and written with one ``putmulti``
        per database (``append=True`` -- MDB_APPENDDUP -- on ``inbox`` and
        ``history``, MDB_APPEND on ``messages`` and, when the batch's keys
        follow the last one, on ``dedup_expiry``); ``added`` counts checked.
        """
        pack_u64, pack_pair, pack_entry, pack_head, pack_dedup = _u64.pack, _pair.pack, _inbox_entry.pack, _message_head.pack, _dedup_head.pack
        blake2b, join, read_head = hashlib.blake2b, b"".join, self._head
        with self.env.begin(write=True) as txn:
            dedup_keys = [pack_pair(sender, client_seq) for sender, _conv, client_seq, _body, _to in items]
            known = dict(txn.cursor(db=self.dedup).getmulti(sorted(set(dedup_keys))))
            inbox_cursor = txn.cursor(db=self.inbox)
            heads: dict[int, int] = {}
            ts_ms = _now_ms()
            results: list[tuple[int, bool, tuple[tuple[int, int], ...]]] = []
            first: dict[bytes, tuple[int, bool, tuple[tuple[int, int], ...]]] = {}  # a key twice in the batch
            messages, inbox, history, dedup, expiry = [], [], [], [], []
            add_message, add_inbox, add_history, add_dedup, add_expiry = messages.append, inbox.append, history.append, dedup.append, expiry.append
            for (sender, conv, client_seq, body, to), dedup_key in zip(items, dedup_keys):
                seen = known.get(dedup_key)
                if seen is not None:
                    msg_id, _fingerprint, pairs = decode_dedup(seen)
                    results.append((msg_id, True, pairs))
                    continue
                repeat = first.get(dedup_key)
                if repeat is not None:
                    results.append((repeat[0], True, repeat[2]))
                    continue
                msg_id = next(self._ids)
                pairs_list, packed_pairs = [], []
                for uid in dict.fromkeys(to):
                    head = heads.get(uid)
                    if head is None:
                        head = read_head(inbox_cursor, pack_u64(uid))
                    heads[uid] = head = head + 1
                    pairs_list.append((uid, head))
                    packed_pairs.append(pack_pair(uid, head))
                    add_inbox((pack_u64(uid), pack_entry(head, msg_id)))
                    add_history((pack_pair(uid, conv), pack_u64(head)))
                pairs = tuple(pairs_list)
                add_message((pack_u64(msg_id), pack_head(len(pairs), sender, conv, client_seq, ts_ms, 0) + body))
                digest = blake2b(pack_u64(conv), digest_size=16)
                digest.update(body)
                add_dedup((dedup_key, pack_dedup(msg_id, digest.digest(), len(pairs)) + join(packed_pairs)))
                add_expiry((_triple.pack(ts_ms, sender, client_seq), b""))
                first[dedup_key] = result = (msg_id, False, pairs)
                results.append(result)
            inbox.sort()
            history.sort()
            dedup.sort()
            expiry.sort()
            expiry_cursor = txn.cursor(db=self.expiry)
            expiry_append = bool(expiry) and (not expiry_cursor.last() or expiry_cursor.key() < expiry[0][0])
            for db, records, append in (
                (self.messages, messages, True),  # msg_ids grow: appends
                (self.inbox, inbox, True),
                (self.history, history, True),
                (self.dedup, dedup, False),
                (self.expiry, expiry, expiry_append),
            ):
                if records:
                    consumed, added = txn.cursor(db=db).putmulti(records, dupdata=True, append=append)
                    if consumed != len(records) or added != len(records):  # putmulti skips refused items silently
                        raise AssertionError(f"lmdb peer: putmulti wrote {added} of {len(records)} records into {db}")
            return results

    # --- reads ----------------------------------------------------------------------

    def reader(self) -> Callable[[int, int, int], list[tuple[bytes, tuple[bytes, bytes]]]]:
        """The format-3 sync read: inbox dups in C, then the messages in one ``getmulti``.

        ``set_range_dup((uid), (since+1))``, ``limit`` entries by
        ``iternext_dup`` in C, their msg_ids sliced out and looked up with
        ``getmulti`` on ``messages``.  Returns ``[(inbox entry, (msg_id key,
        message value))]`` undecoded: the least a read of this layout from
        Python can do, hence the ceiling.
        """
        env, inbox, messages, pack = self.env, self.inbox, self.messages, _u64.pack

        def sync(uid: int, since: int, limit: int) -> list[tuple[bytes, tuple[bytes, bytes]]]:
            with env.begin(buffers=False) as txn:
                cursor = txn.cursor(db=inbox)
                if not cursor.set_range_dup(pack(uid), pack(since + 1)):
                    return []
                entries = list(islice(cursor.iternext_dup(keys=False, values=True), limit))
                found = txn.cursor(db=messages).getmulti([entry[8:16] for entry in entries])
                if len(found) != len(entries):  # getmulti skips missing keys silently
                    raise AssertionError(f"lmdb peer: user {uid}: {len(entries) - len(found)} inbox entries name missing messages")
                return list(zip(entries, found))

        return sync

    def history_reader(self) -> Callable[[int, int, int | None, int], list[tuple[bytes, tuple[bytes, bytes]]]]:
        """``history(uid, conv, before, limit)`` on format 3, newest first, undecoded.

        ``history[uid|conv]`` dups below ``before`` walked backwards
        (``iterprev_dup``), each cursor's inbox entry found with
        ``set_range_dup``, the messages with one ``getmulti``.
        """
        env, inbox, history, messages = self.env, self.inbox, self.history, self.messages
        pack, pack_pair = _u64.pack, _pair.pack

        def read(uid: int, conv: int, before: int | None, limit: int) -> list[tuple[bytes, tuple[bytes, bytes]]]:
            with env.begin(buffers=False) as txn:
                cursor = txn.cursor(db=history)
                key = pack_pair(uid, conv)
                if before is None or not cursor.set_range_dup(key, pack(before)):
                    if not (cursor.set_key(key) and cursor.last_dup()):  # no dup >= before: start at the last
                        return []
                elif not cursor.prev_dup():  # on the first dup >= before: step below it
                    return []
                cursors = list(islice(cursor.iterprev_dup(keys=False, values=True), limit))
                inbox_cursor = txn.cursor(db=inbox)
                user_key, entries = pack(uid), []
                for position in cursors:
                    if not inbox_cursor.set_range_dup(user_key, position) or inbox_cursor.value()[:8] != position:
                        raise AssertionError(f"lmdb peer: history of user {uid} names a missing cursor")
                    entries.append(inbox_cursor.value())
                found = txn.cursor(db=messages).getmulti([entry[8:16] for entry in entries])
                if len(found) != len(entries):
                    raise AssertionError(f"lmdb peer: user {uid}: history entries name missing messages")
                return list(zip(entries, found))

        return read

    def get_reader(self) -> Callable[[int], bytes | None]:
        """``get(msg_id)``: the raw ``messages`` value (head and body), or None."""
        env, messages, pack = self.env, self.messages, _u64.pack

        def get(msg_id: int) -> bytes | None:
            with env.begin(db=messages, buffers=False) as txn:
                return txn.get(pack(msg_id))

        return get

    def heads_total(self, users: int | Iterable[int]) -> int:
        """Sum of the heads (last inbox dups' cursors) of ``users`` (a count: ``0..users-1``, or the ids)."""
        with self.env.begin(db=self.inbox) as txn:
            cursor = txn.cursor()
            return sum(self._head(cursor, _u64.pack(uid)) for uid in _uids(users))

    def close(self) -> None:
        """Close the environment."""
        self.env.close()


SYSTEMS: dict[str, Callable[[str], object]] = {
    "syncstore": SyncstoreSystem,
    "sqlite": SqlitePeer,
    "lmdb": LmdbCeiling,
}
