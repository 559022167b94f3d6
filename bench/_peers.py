"""The systems the benchmarks compare syncstore with, doing the same job.

- :class:`SqlitePeer`: what one would build on SQLite: WAL journal,
  ``synchronous=FULL``, a per-user cursor table (``heads``), inboxes keyed by
  (uid, cursor), a unique dedup key on (sender, client_seq) with an expiry
  index, one transaction per message, one connection per thread,
  ``busy_timeout`` set.
- :class:`LmdbCeiling`: raw py-lmdb writing exactly syncstore's keys and
  values (same named databases, same key encodings and value sizes), one write transaction per
  message with LMDB's default durability (``sync=True, metasync=True``), and
  reading with ``set_range`` + N ``next``.  No overlay, no WAL, no
  validation: what the LMDB layer alone costs.

Every system exposes the same small surface, used by the workloads in
``_harness``: ``writer()`` returns a per-thread ``deliver(item)`` callable,
``deliver_batch(items)`` (one transaction), ``reader()`` returns a per-thread
``sync(uid, since, limit)`` callable, and ``close()``.  An *item* is a tuple
``(sender, conv, client_seq, body, to)``.
"""

from __future__ import annotations

import itertools
from itertools import islice
import os
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Sequence

import lmdb

import syncstore
from syncstore import Message

Item = tuple[int, int, int, bytes, tuple[int, ...]]
_pair = struct.Struct(">QQ")
_triple = struct.Struct(">QQQ")
_u64 = struct.Struct(">Q")
# The peers encode values with the sizes of syncstore's (docs/format.md) but
# their own code, so they do not depend on syncstore internals.
_inbox_head = struct.Struct(">QQQQQQB")  # cursor, msg_id, sender, conv, client_seq, ts_ms, priority
_dedup_head = struct.Struct(">QI")  # msg_id, recipient count


def encode_pairs(msg_id: int, pairs: Sequence[tuple[int, int]]) -> bytes:
    """A dedup value: msg_id, count, (uid, cursor) pairs."""
    flat = [n for pair in pairs for n in pair]
    return _dedup_head.pack(msg_id, len(pairs)) + struct.pack(f">{len(flat)}Q", *flat)


def decode_pairs(value: bytes) -> tuple[int, tuple[tuple[int, int], ...]]:
    """Inverse of :func:`encode_pairs`."""
    msg_id, count = _dedup_head.unpack_from(value)
    flat = struct.unpack_from(f">{2 * count}Q", value, _dedup_head.size)
    return msg_id, tuple(zip(flat[0::2], flat[1::2]))


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

    def heads_total(self, users: int) -> int:
        """Sum of every user's head cursor = inbox entries (users ``0..users-1``)."""
        return sum(self.store.head(uid) for uid in range(users))

    def close(self) -> None:
        """Close the store (flushes and applies everything)."""
        self.store.close()


class SqlitePeer:
    """The same job on SQLite (see the module docstring)."""

    name = "sqlite"
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
        pairs = []
        for uid in dict.fromkeys(to):
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
        """``SELECT ... WHERE uid=? AND cursor>? ORDER BY cursor LIMIT ?`` on its own connection."""
        conn = self._connect()
        query = (
            "SELECT cursor, msg_id, sender, conv, client_seq, ts_ms, priority, body FROM inbox"
            " WHERE uid = ? AND cursor > ? ORDER BY cursor LIMIT ?"
        )
        execute = conn.execute
        return lambda uid, since, limit: execute(query, (uid, since, limit)).fetchall()

    def heads_total(self, users: int) -> int:
        """Sum of every user's head cursor = inbox entries."""
        conn = self._connect()
        return conn.execute("SELECT coalesce(sum(head), 0) FROM heads WHERE uid < ?", (users,)).fetchone()[0]

    def close(self) -> None:
        """Close every connection (the last one checkpoints the WAL)."""
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()


class LmdbCeiling:
    """Raw py-lmdb with syncstore's layout (see the module docstring)."""

    name = "lmdb"

    def __init__(self, path: str, *, sync: bool = True, metasync: bool = True, readonly: bool = False) -> None:
        self.env = lmdb.open(path, map_size=64 << 30, max_dbs=5, sync=sync, metasync=metasync, readahead=False, readonly=readonly, max_readers=512)
        names = (b"inbox", b"heads", b"dedup", b"dedup_expiry", b"meta")
        if readonly:  # handles opened inside a read-only txn die with it (py-lmdb 3): no txn here
            dbs = [self.env.open_db(name, create=False) for name in names]
        else:
            with self.env.begin(write=True) as txn:
                dbs = [self.env.open_db(name, txn=txn) for name in names]
        self.inbox, self.heads, self.dedup, self.expiry, self.meta = dbs
        self._ids = itertools.count(1)

    def _deliver(self, txn: lmdb.Transaction, item: Item) -> tuple[int, bool, tuple[tuple[int, int], ...]]:
        sender, conv, client_seq, body, to = item
        dedup_key = _pair.pack(sender, client_seq)
        seen = txn.get(dedup_key, db=self.dedup)
        if seen is not None:
            msg_id, pairs = decode_pairs(seen)
            return msg_id, True, pairs
        msg_id, ts_ms = next(self._ids), _now_ms()
        heads, get, put = self.heads, txn.get, txn.put
        pairs_list = []
        for uid in dict.fromkeys(to):
            head = get(_u64.pack(uid), db=heads)
            pairs_list.append((uid, (0 if head is None else _u64.unpack(head)[0]) + 1))
        pairs = tuple(pairs_list)
        for uid, cursor in pairs:
            put(_pair.pack(uid, cursor), _inbox_head.pack(cursor, msg_id, sender, conv, client_seq, ts_ms, 0) + body, db=self.inbox)
            put(_u64.pack(uid), _u64.pack(cursor), db=heads)
        put(dedup_key, encode_pairs(msg_id, pairs), db=self.dedup)
        put(_triple.pack(ts_ms, sender, client_seq), b"", db=self.expiry)
        return msg_id, False, pairs

    def writer(self) -> Callable[[Item], object]:
        """A ``deliver(item)`` callable: one write transaction (and LMDB's syncs) per message."""

        def call(item: Item) -> object:
            with self.env.begin(write=True) as txn:
                return self._deliver(txn, item)

        return call

    def deliver_batch(self, items: Sequence[Item]) -> object:
        """All ``items`` in one write transaction."""
        with self.env.begin(write=True) as txn:
            return [self._deliver(txn, item) for item in items]

    def reader(self) -> Callable[[int, int, int], Sequence[object]]:
        """A read transaction, ``set_range`` to (uid, since+1), then ``limit`` values read in C.

        Returns the raw values, undecoded, after checking that the last key
        read still belongs to ``uid``: the least a range read from Python can
        do, hence the ceiling.
        """
        env, inbox, pack = self.env, self.inbox, _pair.pack

        def sync(uid: int, since: int, limit: int) -> list[bytes]:
            with env.begin(db=inbox, buffers=False) as txn:
                cursor = txn.cursor()
                if not cursor.set_range(pack(uid, since + 1)):
                    return []
                values = list(islice(cursor.iternext(keys=False, values=True), limit))
                if values and cursor.key()[:8] != _u64.pack(uid):  # ran into the next user
                    values = []  # rare (the user has fewer than limit left): redo key by key
                    cursor.set_range(pack(uid, since + 1))
                    for key, value in cursor:
                        if key[:8] != _u64.pack(uid) or len(values) >= limit:
                            break
                        values.append(value)
                return values

        return sync

    def heads_total(self, users: int) -> int:
        """Sum of every user's head cursor = inbox entries."""
        with self.env.begin(db=self.heads) as txn:
            return sum(_u64.unpack(value)[0] for key, value in txn.cursor() if _u64.unpack(key)[0] < users)

    def close(self) -> None:
        """Close the environment."""
        self.env.close()


SYSTEMS: dict[str, Callable[[str], object]] = {
    "syncstore": SyncstoreSystem,
    "sqlite": SqlitePeer,
    "lmdb": LmdbCeiling,
}
