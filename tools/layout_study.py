"""Issue #8 layout study: fan-out by copy vs one body per message, measured on raw LMDB.

    .venv/bin/python tools/layout_study.py                     # full size (state the counts it prints)
    .venv/bin/python tools/layout_study.py --scale 0.1 --json study.json
    .venv/bin/python tools/layout_study.py --fanouts 2,1000 --layouts copy,ref-dupfixed

Method
------
One run builds each workload once (a list of messages with their recipients'
cursors already assigned, as syncstore's sequencer does) and writes the very
same messages into a fresh LMDB environment per candidate layout, with raw
py-lmdb -- not syncstore's store -- so that only the key layout differs:

- ``copy``: state format 2 as in syncstore at c17a0e9: ``inbox`` user|cursor ->
  cursor | msg_id | sender | conv | client_seq | ts_ms | priority | body, and
  ``heads`` user -> cursor.  No history index.
- ``ref-dupfixed``: the lead's format 3 (/work/shared-notes/layout-v3.md): the
  body once in ``messages`` msg_id -> refs | head | body; ``inbox`` DUPSORT|DUPFIXED
  user -> cursor|msg_id|conv|priority (25 B); ``history`` DUPSORT|DUPFIXED
  user|conv -> cursor; no heads db (head = last dup).
- ``ref-dupfixed-16`` (opt-in): the same with 16-byte inbox dups cursor|msg_id.
- ``ref-plain``: ``messages`` as in format 3; ``inbox`` plain user|cursor ->
  msg_id|conv|priority (17 B); ``history`` plain user|conv|cursor -> empty; ``heads``.
- ``hybrid-T``: ref-plain, but a message with fan-out <= T is stored inline in
  each inbox value (msg_id|conv|priority|sender|client_seq|ts_ms|body, told apart
  from a 17-byte reference by its length); ``messages`` then holds only a 16-byte
  locator user|cursor of its first recipient, so ``get(msg_id)`` still works.

Every layout also writes ``dedup`` (sender|client_seq -> msg_id | fingerprint |
R | R x (user, cursor)), ``dedup_expiry`` and ``meta`` exactly as format 2/3 do,
so totals are realistic while the layouts differ only in their inbox/body part;
``dedup-only`` writes just those shared dbs: the baseline the others add to.

Writing mimics syncstore's applier: batches of ``--batch`` (4,096) messages per
write transaction, every db's items encoded first (inside the timed section),
sorted, and written with one ``Cursor.putmulti`` per db (APPEND/APPENDDUP where
the layout allows); ``added`` is checked against the item count, since py-lmdb
silently skips an item that fails the append check.  The environment is opened
``sync=True, metasync=False, readahead=False`` (each commit fdatasyncs), on the
OS page size (4 KiB).  The garbage collector is off in timed sections.

Measures per (layout, workload):

- store size: ``(info()['last_pgno'] + 1) * psize`` after the writes, per message,
  per recipient-entry, over the body bytes, and per db (``txn.stat(db)`` pages,
  which include a DUPSORT db's sub-databases; "other" = meta and free pages);
- bytes written: deltas of ``wchar`` (bytes handed to write()/pwrite()) and
  ``write_bytes`` (page-cache bytes sent towards the block layer) of
  ``/proc/self/io`` around the writes plus a final ``env.sync(True)``;
- apply speed: messages/s of the writes (encoding + putmulti + commits);
- ``sync(user, since, 100)``: calls/s over random (user, since) with a full page
  (users with >= 100 entries), one read transaction per call as the store does;
  "raw" returns the stored values (inbox values, plus message values fetched with
  ``Cursor.getmulti`` where the layout references them), "decoded" builds a tuple
  (cursor, msg_id, sender, conv, client_seq, ts_ms, priority, body) per message;
- ``history(user, conv, before, 50)``: calls/s, decoded, for layouts with a
  history index, over (user, conv) pairs holding >= 50 entries.

Timings are best of ``--rounds`` and depend on the machine and its load; the
sizes and byte counts are deterministic for a seed (the byte counts up to the
file system).  Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import functools
import gc
import hashlib
import json
import math
import os
import random
import shutil
import struct
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import accumulate, islice
from typing import Any, NamedTuple

import lmdb

# --- byte formats (all integers unsigned big-endian: byte order = numeric order) ----------

U64 = struct.Struct(">Q")
PAIR = struct.Struct(">QQ")  # user|cursor keys, user|conv keys, dedup keys, (user, cursor) pairs
TRIPLE = struct.Struct(">QQQ")  # dedup_expiry keys, ref-plain history keys user|conv|cursor
#: Format 2 inbox value head: cursor, msg_id, sender, conv, client_seq, ts_ms, priority; then the body.
COPY_VALUE = struct.Struct(">QQQQQQB")
COPY_SHARED = struct.Struct(">QQQQQB")  # the part after the cursor, same for every recipient
#: Format 3 ``messages`` value head: refs, sender, conv, client_seq, ts_ms, priority; then the body.
MESSAGE_HEAD = struct.Struct(">IQQQQB")
#: Format 3 inbox dup: cursor, msg_id, conv, priority.
DUP_ENTRY = struct.Struct(">QQQB")
#: ref-dupfixed-16 inbox dup: cursor, msg_id (conv and priority are in the message).
DUP_ENTRY_16 = struct.Struct(">QQ")
CURSOR_MSG_ID = DUP_ENTRY_16  # the first 16 bytes of either dup
#: ref-plain / hybrid inbox value by reference: msg_id, conv, priority.
REF_ENTRY = struct.Struct(">QQB")
#: hybrid inbox value inline: msg_id, conv, priority, sender, client_seq, ts_ms; then the body.
INLINE_HEAD = struct.Struct(">QQBQQQ")
#: hybrid ``messages`` value of an inline message: its first recipient's user|cursor.
LOCATOR = PAIR
#: dedup value head: msg_id, fingerprint, recipient count; then count x (user, cursor).
DEDUP_HEAD = struct.Struct(">Q16sI")
FINGERPRINT_SIZE = 16
FINGERPRINT_PERSON = b"syncstore-dedup"
assert (COPY_VALUE.size, MESSAGE_HEAD.size, DUP_ENTRY.size, REF_ENTRY.size, INLINE_HEAD.size) == (49, 37, 25, 17, 41)
assert LOCATOR.size < MESSAGE_HEAD.size and REF_ENTRY.size < INLINE_HEAD.size  # lengths tell the kinds apart

APPLIED_LSN = b"applied_lsn"
LAST_MSG_ID = b"last_msg_id"

# --- message ids (as syncstore._ids: 42 bits of ms since 2020, 10 replica, 12 sequence) -------

ID_EPOCH_MS = 1_577_836_800_000
ID_TIME_SHIFT = 22
ID_SEQUENCE = 1 << 12
STUDY_START_MS = 1_767_225_600_000  # 2026-01-01: the workload's first message


def make_msg_id(index: int) -> int:
    """The ``index``-th message id of a replica sending 4,096 messages per millisecond."""
    return ((STUDY_START_MS - ID_EPOCH_MS + index // ID_SEQUENCE) << ID_TIME_SHIFT) | (index % ID_SEQUENCE)


def msg_id_ms(msg_id: int) -> int:
    """Unix milliseconds of ``msg_id``."""
    return (msg_id >> ID_TIME_SHIFT) + ID_EPOCH_MS


# --- defaults ---------------------------------------------------------------------------------

DEFAULT_FANOUTS = (1, 2, 10, 100, 1000)
DEFAULT_LAYOUTS = ("dedup-only", "copy", "ref-dupfixed", "ref-plain")
DEFAULT_HYBRIDS = (2,)
ENTRIES = 100_000  # recipient-entries per workload at scale 1
POPULATION = 5_000  # users
PAIRS_PER_USER = 4  # 1:1 conversations = PAIRS_PER_USER x population pairs, Zipf-popular
ZIPF_S = 1.0
GROUP_MESSAGES = 100  # messages per group: each member gets >= 100 entries
SMALL_BODY = 200  # fan-out 1 and 2
GROUP_BODY = 1024  # fan-out > 2
BATCH = 4_096  # messages per write transaction (syncstore's applier)
SYNC_LIMIT = 100
HISTORY_LIMIT = 50
SYNC_CALLS = 2_000
HISTORY_CALLS = 1_000
ROUNDS = 3
MAP_SIZE = 4 << 30
SEED = 8

# --- workloads --------------------------------------------------------------------------------


class Msg(NamedTuple):
    """One delivered message with its recipients' cursors (as sequenced)."""

    msg_id: int
    sender: int
    conv: int
    client_seq: int
    ts_ms: int
    priority: int
    body: bytes
    pairs: tuple[tuple[int, int], ...]  # (user, cursor) per recipient


#: What sync/history/get return per message, in every layout.
Row = tuple[int, int, int, int, int, int, int, bytes]  # cursor, msg_id, sender, conv, client_seq, ts_ms, priority, body


@dataclass
class Workload:
    """The messages of one workload and what the queries need to know about them."""

    name: str
    fanout: int
    body_size: int
    population: int
    conversations: int
    messages: list[Msg]
    heads: dict[int, int]  # user -> last cursor
    conv_cursors: dict[tuple[int, int], list[int]]  # (user, conv) -> that user's cursors in conv, ascending

    @property
    def entries(self) -> int:
        return sum(len(m.pairs) for m in self.messages)

    @property
    def body_bytes(self) -> int:
        return sum(len(m.body) for m in self.messages)

    def counts(self) -> dict[str, int]:
        """The sizes to state next to the results."""
        return {
            "messages": len(self.messages),
            "entries": self.entries,
            "users": len(self.heads),
            "conversations": self.conversations,
            "users with >= 100 entries": sum(1 for h in self.heads.values() if h >= SYNC_LIMIT),
            "max entries per user": max(self.heads.values(), default=0),
        }


def _zipf_cum_weights(n: int, s: float) -> list[float]:
    return list(accumulate(1.0 / (rank + 1) ** s for rank in range(n)))


def _pair_picker(rng: random.Random, population: int, n_pairs: int) -> Callable[[], tuple[int, int, int]]:
    """A function returning (conv, sender, recipient) of a 1:1 message: Zipf-popular conversations."""
    pairs = []
    for _ in range(n_pairs):
        a, b = rng.sample(range(1, population + 1), 2)
        pairs.append((a, b))
    cum = _zipf_cum_weights(n_pairs, ZIPF_S)
    conv_ids = list(range(n_pairs))

    def pick() -> tuple[int, int, int]:
        index = rng.choices(conv_ids, cum_weights=cum)[0]
        a, b = pairs[index]
        sender, recipient = (a, b) if rng.random() < 0.5 else (b, a)
        return 1_000_000 + index, sender, recipient

    return pick


def make_workload(fanout: int, entries: int, population: int, seed: int, group_messages: int = GROUP_MESSAGES) -> Workload:
    """``entries // fanout`` messages of fan-out ``fanout`` among ``population`` users.

    Fan-out 1 (``to=[recipient]``) and 2 (``to=[sender, recipient]``): 200-byte
    bodies in PAIRS_PER_USER x population conversations between random pairs,
    their popularity Zipf(1) (a few busy chats, a long tail).  Fan-out > 2:
    1 KiB bodies, to all members of one of ``messages // group_messages`` fixed
    groups (random members), the group picked at random per message.
    """
    rng = random.Random(f"{seed}:{fanout}")
    count = max(1, entries // fanout)
    body_size = SMALL_BODY if fanout <= 2 else GROUP_BODY
    if fanout <= 2:
        n_convs = PAIRS_PER_USER * population
        pick_pair = _pair_picker(rng, population, n_convs)
    else:
        n_convs = max(1, count // group_messages)
        groups = [tuple(rng.sample(range(1, population + 1), fanout)) for _ in range(n_convs)]
    heads: dict[int, int] = defaultdict(int)
    seqs: dict[int, int] = defaultdict(int)
    conv_cursors: dict[tuple[int, int], list[int]] = defaultdict(list)
    messages = []
    for index in range(count):
        if fanout <= 2:
            conv, sender, recipient = pick_pair()
            to: tuple[int, ...] = (recipient,) if fanout == 1 else (sender, recipient)
        else:
            g = rng.randrange(n_convs)
            conv, to = 2_000_000 + g, groups[g]
            sender = rng.choice(to)
        pairs = []
        for user in to:
            heads[user] += 1
            pairs.append((user, heads[user]))
            conv_cursors[(user, conv)].append(heads[user])
        seqs[sender] += 1
        msg_id = make_msg_id(index)
        priority = 1 if rng.random() < 0.1 else 0
        messages.append(Msg(msg_id, sender, conv, seqs[sender], msg_id_ms(msg_id), priority, rng.randbytes(body_size), tuple(pairs)))
    name = f"fan-out {fanout}" + (" (1:1)" if fanout == 2 else "")
    return Workload(name, fanout, body_size, population, n_convs, messages, dict(heads), dict(conv_cursors))


def sync_queries(wl: Workload, calls: int, limit: int, seed: int) -> list[tuple[int, int]]:
    """(user, since) with a full page after ``since``: users with >= ``limit`` entries (else the fullest users)."""
    rng = random.Random(seed)
    users = sorted(u for u, h in wl.heads.items() if h >= limit)
    if not users:
        users = sorted(wl.heads, key=lambda u: -wl.heads[u])[:10]
    return [(u, rng.randint(0, max(0, wl.heads[u] - limit))) for u in (rng.choice(users) for _ in range(calls))]


def history_queries(wl: Workload, calls: int, limit: int, seed: int) -> list[tuple[int, int, int]]:
    """(user, conv, before) with ``limit`` entries below ``before`` (or the fullest pairs' all)."""
    rng = random.Random(seed)
    keys = sorted(k for k, cursors in wl.conv_cursors.items() if len(cursors) >= limit)
    if not keys:
        keys = sorted(wl.conv_cursors, key=lambda k: -len(wl.conv_cursors[k]))[:10]
    out = []
    for _ in range(calls):
        user, conv = rng.choice(keys)
        cursors = wl.conv_cursors[(user, conv)]
        k = rng.randint(min(limit, len(cursors)), len(cursors))
        out.append((user, conv, cursors[k] if k < len(cursors) else cursors[-1] + 1))
    return out


# --- layouts ----------------------------------------------------------------------------------

Put = tuple[Any, list[tuple[bytes, bytes]], bool]  # (db handle, sorted items, append)


def fingerprint(conv: int, body: bytes) -> bytes:
    """syncstore's dedup fingerprint: BLAKE2b-128 of conv | body."""
    digest = hashlib.blake2b(U64.pack(conv), digest_size=FINGERPRINT_SIZE, person=FINGERPRINT_PERSON)
    digest.update(body)
    return digest.digest()


def dedup_value(m: Msg) -> bytes:
    """The dedup value of ``m`` (format 2/3): msg_id, fingerprint, R, R x (user, cursor)."""
    flat = [x for pair in m.pairs for x in pair]
    return DEDUP_HEAD.pack(m.msg_id, fingerprint(m.conv, m.body), len(m.pairs)) + struct.pack(f">{len(flat)}Q", *flat)


class Layout:
    """A key layout in one LMDB environment: its dbs, how a batch is encoded, and its reads.

    Subclasses set ``name`` and ``specs`` (db name -> open_db flags) and
    implement ``encode``, ``sync_raw``, ``sync_decoded`` and, if they have a
    history index, ``history``; ``get`` where messages are addressable.
    """

    name = ""
    specs: dict[str, dict[str, bool]] = {}
    has_sync = True
    has_history = False
    common_specs = {"dedup": {}, "dedup_expiry": {}, "meta": {}}

    def __init__(self, env: lmdb.Environment) -> None:
        self.env = env
        with env.begin(write=True) as txn:
            self.dbs = {name: env.open_db(name.encode(), txn=txn, **flags) for name, flags in {**self.specs, **self.common_specs}.items()}
        self.lsn = 0

    # writes
    def encode(self, txn: lmdb.Transaction, batch: Sequence[Msg]) -> list[Put]:
        raise NotImplementedError

    def encode_common(self, batch: Sequence[Msg]) -> list[Put]:
        """dedup, dedup_expiry and meta items: the same in every layout."""
        self.lsn += len(batch)
        dedup = sorted((PAIR.pack(m.sender, m.client_seq), dedup_value(m)) for m in batch)
        expiry = sorted((TRIPLE.pack(msg_id_ms(m.msg_id), m.sender, m.client_seq), b"") for m in batch)
        meta = [(APPLIED_LSN, U64.pack(self.lsn)), (LAST_MSG_ID, U64.pack(batch[-1].msg_id))]
        return [(self.dbs["dedup"], dedup, False), (self.dbs["dedup_expiry"], expiry, False), (self.dbs["meta"], meta, False)]

    def apply(self, batch: Sequence[Msg]) -> None:
        """One write transaction for ``batch``: encode every db's items, putmulti each, commit."""
        with self.env.begin(write=True) as txn:
            for db, items, append in self.encode(txn, batch) + self.encode_common(batch):
                if items:
                    _consumed, added = txn.cursor(db=db).putmulti(items, dupdata=True, append=append)
                    if added != len(items):
                        raise RuntimeError(f"{self.name}: putmulti wrote {added} of {len(items)} items (append={append})")

    def messages_items(self, txn: lmdb.Transaction, items: list[tuple[bytes, bytes]]) -> Put:
        """``messages`` items, appended when all keys are above the db's last key (time-ordered msg_ids)."""
        cursor = txn.cursor(db=self.dbs["messages"])
        append = not cursor.last() or cursor.key() < items[0][0]
        return (self.dbs["messages"], items, append)

    # reads
    def head(self, txn: lmdb.Transaction, user: int) -> int:
        value = txn.get(U64.pack(user), db=self.dbs["heads"])
        return 0 if value is None else U64.unpack(value)[0]

    def sync_raw(self, txn: lmdb.Transaction, user: int, since: int, limit: int) -> tuple[int, Any]:
        raise NotImplementedError

    def sync_decoded(self, txn: lmdb.Transaction, user: int, since: int, limit: int) -> tuple[int, list[Row]]:
        raise NotImplementedError

    def history(self, txn: lmdb.Transaction, user: int, conv: int, before: int, limit: int) -> list[Row]:
        raise NotImplementedError

    def get(self, txn: lmdb.Transaction, msg_id: int) -> Row | None:
        """The message (cursor 0) or None."""
        raise NotImplementedError

    def _plain_scan(self, txn: lmdb.Transaction, user: int, since: int, limit: int) -> tuple[int, list[bytes]]:
        """(head, inbox values after ``since``) for plain user|cursor keys: dense cursors, one C loop."""
        head = self.head(txn, user)
        count = min(limit, head - since)
        if count <= 0:
            return head, []
        cursor = txn.cursor(db=self.dbs["inbox"])
        if not cursor.set_range(PAIR.pack(user, since + 1)):
            return head, []
        values = list(islice(cursor.iternext(keys=False, values=True), count))
        if len(values) != count or cursor.key() != PAIR.pack(user, since + count):
            raise RuntimeError(f"{self.name}: inbox of user {user} is not dense after {since}")
        return head, values

    def _messages(self, txn: lmdb.Transaction, msg_ids: Sequence[bytes]) -> list[tuple[bytes, bytes]]:
        """(msg_id, value) of ``msg_ids`` from ``messages`` in one getmulti (which skips missing keys: checked)."""
        if not msg_ids:
            return []
        found = txn.cursor(db=self.dbs["messages"]).getmulti(msg_ids)
        if len(found) != len(msg_ids):
            raise RuntimeError(f"{self.name}: {len(msg_ids) - len(found)} referenced messages missing")
        return found


@functools.lru_cache(maxsize=None)
def _ids_struct(entry: struct.Struct, offset: int, count: int) -> struct.Struct:
    """Unpacks the 8-byte msg_id at ``offset`` of ``count`` concatenated ``entry`` values in one C call."""
    return struct.Struct(f"{offset}x8s{entry.size - offset - 8}x" * count)


def msg_id_keys(entry: struct.Struct, offset: int, entries: list[bytes]) -> tuple[bytes, ...]:
    """The msg_id keys of fixed-size inbox ``entries`` (no per-entry Python loop: ~4x faster than slicing)."""
    return _ids_struct(entry, offset, len(entries)).unpack(b"".join(entries))


class DedupOnlyLayout(Layout):
    """Only the dbs every layout shares (dedup, dedup_expiry, meta): the baseline the others add to."""

    name = "dedup-only"
    has_sync = False

    def encode(self, txn: lmdb.Transaction, batch: Sequence[Msg]) -> list[Put]:
        return []


def _message_row(cursor: int, msg_id: int, value: bytes) -> Row:
    _refs, sender, conv, client_seq, ts_ms, priority = MESSAGE_HEAD.unpack_from(value)
    return (cursor, msg_id, sender, conv, client_seq, ts_ms, priority, value[MESSAGE_HEAD.size :])


class CopyLayout(Layout):
    """State format 2: a copy of head and body in every recipient's inbox value."""

    name = "copy"
    specs = {"inbox": {}, "heads": {}}

    def encode(self, txn: lmdb.Transaction, batch: Sequence[Msg]) -> list[Put]:
        inbox, heads = [], {}
        for m in batch:
            shared = COPY_SHARED.pack(m.msg_id, m.sender, m.conv, m.client_seq, m.ts_ms, m.priority) + m.body
            for user, cursor in m.pairs:
                inbox.append((PAIR.pack(user, cursor), U64.pack(cursor) + shared))
                heads[user] = cursor
        inbox.sort()
        return [(self.dbs["inbox"], inbox, False), (self.dbs["heads"], sorted((U64.pack(u), U64.pack(c)) for u, c in heads.items()), False)]

    def sync_raw(self, txn: lmdb.Transaction, user: int, since: int, limit: int) -> tuple[int, list[bytes]]:
        return self._plain_scan(txn, user, since, limit)

    def sync_decoded(self, txn: lmdb.Transaction, user: int, since: int, limit: int) -> tuple[int, list[Row]]:
        head, values = self._plain_scan(txn, user, since, limit)
        unpack, size = COPY_VALUE.unpack_from, COPY_VALUE.size
        return head, [unpack(v) + (v[size:],) for v in values]


class RefDupfixedLayout(Layout):
    """Format 3 (layout-v3.md): one body in ``messages``; DUPSORT|DUPFIXED inbox and history."""

    name = "ref-dupfixed"
    specs = {"messages": {}, "inbox": {"dupsort": True, "dupfixed": True}, "history": {"dupsort": True, "dupfixed": True}}
    has_history = True
    entry = DUP_ENTRY

    def pack_entry(self, cursor: int, m: Msg) -> bytes:
        """One inbox dup."""
        return DUP_ENTRY.pack(cursor, m.msg_id, m.conv, m.priority)

    def encode(self, txn: lmdb.Transaction, batch: Sequence[Msg]) -> list[Put]:
        messages, inbox, history = [], [], []
        for m in batch:
            messages.append((U64.pack(m.msg_id), MESSAGE_HEAD.pack(len(m.pairs), m.sender, m.conv, m.client_seq, m.ts_ms, m.priority) + m.body))
            for user, cursor in m.pairs:
                inbox.append((U64.pack(user), self.pack_entry(cursor, m)))
                history.append((PAIR.pack(user, m.conv), U64.pack(cursor)))
        inbox.sort()
        history.sort()
        return [self.messages_items(txn, messages), (self.dbs["inbox"], inbox, True), (self.dbs["history"], history, True)]

    def _entries(self, txn: lmdb.Transaction, user: int, since: int, limit: int) -> tuple[int, list[bytes]]:
        cursor = txn.cursor(db=self.dbs["inbox"])
        key = U64.pack(user)
        if not cursor.set_key(key):
            return 0, []
        cursor.last_dup()
        head = U64.unpack_from(cursor.value())[0]
        count = min(limit, head - since)
        if count <= 0 or not cursor.set_range_dup(key, U64.pack(since + 1)):
            return head, []
        return head, list(islice(cursor.iternext_dup(keys=False, values=True), count))

    def sync_raw(self, txn: lmdb.Transaction, user: int, since: int, limit: int) -> tuple[int, tuple[list[bytes], list[bytes]]]:
        head, entries = self._entries(txn, user, since, limit)
        return head, (entries, self._messages(txn, msg_id_keys(self.entry, 8, entries)))

    def sync_decoded(self, txn: lmdb.Transaction, user: int, since: int, limit: int) -> tuple[int, list[Row]]:
        head, entries = self._entries(txn, user, since, limit)
        return head, self._rows(txn, entries)

    def _rows(self, txn: lmdb.Transaction, entries: list[bytes]) -> list[Row]:
        found = self._messages(txn, msg_id_keys(self.entry, 8, entries))
        return [_message_row(cursor, msg_id, v) for (cursor, msg_id), (_, v) in zip(map(CURSOR_MSG_ID.unpack_from, entries), found)]

    def history(self, txn: lmdb.Transaction, user: int, conv: int, before: int, limit: int) -> list[Row]:
        hist = txn.cursor(db=self.dbs["history"])
        key = PAIR.pack(user, conv)
        if not hist.set_key(key):
            return []
        if hist.set_range_dup(key, U64.pack(before)):
            if not hist.prev_dup():
                return []
        else:
            hist.last_dup()
        cursors = list(islice(hist.iterprev_dup(keys=False, values=True), limit))
        inbox, ukey, entries = txn.cursor(db=self.dbs["inbox"]), U64.pack(user), []
        for c in cursors:
            if not inbox.set_range_dup(ukey, c):  # MDB_GET_BOTH_RANGE: looks the key up too
                raise RuntimeError(f"{self.name}: history cursor {U64.unpack(c)[0]} of user {user} not in the inbox")
            entries.append(inbox.value())
        return self._rows(txn, entries)

    def get(self, txn: lmdb.Transaction, msg_id: int) -> Row | None:
        value = txn.get(U64.pack(msg_id), db=self.dbs["messages"])
        return None if value is None else _message_row(0, msg_id, value)


class RefDupfixed16Layout(RefDupfixedLayout):
    """ref-dupfixed with 16-byte inbox dups (cursor | msg_id): sync and history read conv and priority from the message."""

    name = "ref-dupfixed-16"
    entry = DUP_ENTRY_16

    def pack_entry(self, cursor: int, m: Msg) -> bytes:
        return DUP_ENTRY_16.pack(cursor, m.msg_id)


class RefPlainLayout(Layout):
    """One body in ``messages``; plain-key inbox user|cursor -> 17-byte reference, plain history, heads."""

    name = "ref-plain"
    specs = {"messages": {}, "inbox": {}, "history": {}, "heads": {}}
    has_history = True

    def inline(self, m: Msg) -> bool:
        """Whether ``m``'s body goes into each inbox value (never here; see HybridLayout)."""
        return False

    def encode(self, txn: lmdb.Transaction, batch: Sequence[Msg]) -> list[Put]:
        messages, inbox, history, heads = [], [], [], {}
        for m in batch:
            if self.inline(m):
                value = INLINE_HEAD.pack(m.msg_id, m.conv, m.priority, m.sender, m.client_seq, m.ts_ms) + m.body
                messages.append((U64.pack(m.msg_id), LOCATOR.pack(*m.pairs[0])))
            else:
                value = REF_ENTRY.pack(m.msg_id, m.conv, m.priority)
                messages.append((U64.pack(m.msg_id), MESSAGE_HEAD.pack(len(m.pairs), m.sender, m.conv, m.client_seq, m.ts_ms, m.priority) + m.body))
            for user, cursor in m.pairs:
                inbox.append((PAIR.pack(user, cursor), value))
                history.append((TRIPLE.pack(user, m.conv, cursor), b""))
                heads[user] = cursor
        inbox.sort()
        history.sort()
        return [
            self.messages_items(txn, messages),
            (self.dbs["inbox"], inbox, False),
            (self.dbs["history"], history, False),
            (self.dbs["heads"], sorted((U64.pack(u), U64.pack(c)) for u, c in heads.items()), False),
        ]

    def sync_raw(self, txn: lmdb.Transaction, user: int, since: int, limit: int) -> tuple[int, tuple[list[bytes], list[bytes]]]:
        head, entries = self._plain_scan(txn, user, since, limit)
        return head, (entries, self._messages(txn, self._refs(entries)))

    def _refs(self, entries: list[bytes]) -> Sequence[bytes]:
        """The msg_id keys of the entries that reference their message."""
        return msg_id_keys(REF_ENTRY, 0, entries)

    def sync_decoded(self, txn: lmdb.Transaction, user: int, since: int, limit: int) -> tuple[int, list[Row]]:
        head, entries = self._plain_scan(txn, user, since, limit)
        return head, self._rows(txn, range(since + 1, since + 1 + len(entries)), entries)

    def _rows(self, txn: lmdb.Transaction, cursors: Iterable[int], entries: list[bytes]) -> list[Row]:
        """Decode inbox values (inline or by reference) of the given cursors."""
        size = REF_ENTRY.size
        values = (v for _, v in self._messages(txn, self._refs(entries)))
        rows: list[Row] = []
        for cursor, e in zip(cursors, entries):
            if len(e) == size:
                rows.append(_message_row(cursor, U64.unpack_from(e)[0], next(values)))
            else:
                msg_id, conv, priority, sender, client_seq, ts_ms = INLINE_HEAD.unpack_from(e)
                rows.append((cursor, msg_id, sender, conv, client_seq, ts_ms, priority, e[INLINE_HEAD.size :]))
        return rows

    def history(self, txn: lmdb.Transaction, user: int, conv: int, before: int, limit: int) -> list[Row]:
        hist = txn.cursor(db=self.dbs["history"])
        prefix = PAIR.pack(user, conv)
        found = hist.prev() if hist.set_range(TRIPLE.pack(user, conv, before)) else hist.last()
        keys: list[bytes] = []
        if found:
            for key in hist.iterprev(keys=True, values=False):
                if key[:16] != prefix or len(keys) == limit:
                    break
                keys.append(key)
        inbox_keys = [k[:8] + k[16:] for k in keys]
        entries = [v for _, v in txn.cursor(db=self.dbs["inbox"]).getmulti(inbox_keys)]
        if len(entries) != len(inbox_keys):
            raise RuntimeError(f"{self.name}: history of user {user} references missing inbox entries")
        return self._rows(txn, [TRIPLE.unpack(k)[2] for k in keys], entries)

    def get(self, txn: lmdb.Transaction, msg_id: int) -> Row | None:
        value = txn.get(U64.pack(msg_id), db=self.dbs["messages"])
        if value is None:
            return None
        if len(value) != LOCATOR.size:
            return _message_row(0, msg_id, value)
        entry = txn.get(value, db=self.dbs["inbox"])  # an inline message: its first recipient's entry
        if entry is None:
            raise RuntimeError(f"{self.name}: locator of message {msg_id} points at no inbox entry")
        return (0,) + self._rows(txn, [0], [entry])[0][1:]


class HybridLayout(RefPlainLayout):
    """ref-plain with the body inline in every inbox value when the fan-out is <= ``threshold``."""

    def __init__(self, env: lmdb.Environment, threshold: int) -> None:
        self.threshold = threshold
        self.name = f"hybrid-{threshold}"
        super().__init__(env)

    def inline(self, m: Msg) -> bool:
        return len(m.pairs) <= self.threshold

    def _refs(self, entries: list[bytes]) -> Sequence[bytes]:
        size = REF_ENTRY.size
        return [e[:8] for e in entries if len(e) == size]


def make_layout(name: str, env: lmdb.Environment) -> Layout:
    """The layout called ``name`` (copy, ref-dupfixed, ref-plain, hybrid-T) in ``env``."""
    fixed: dict[str, Callable[[lmdb.Environment], Layout]] = {"dedup-only": DedupOnlyLayout, "copy": CopyLayout, "ref-dupfixed": RefDupfixedLayout, "ref-dupfixed-16": RefDupfixed16Layout, "ref-plain": RefPlainLayout}
    if name in fixed:
        return fixed[name](env)
    if name.startswith("hybrid-") and name[7:].isdigit():
        return HybridLayout(env, int(name[7:]))
    raise ValueError(f"unknown layout {name!r}: dedup-only, copy, ref-dupfixed, ref-dupfixed-16, ref-plain or hybrid-T")


# --- measuring --------------------------------------------------------------------------------


def io_counters() -> dict[str, int]:
    """This process's /proc/self/io counters."""
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(":") for line in f)}


def open_env(path: str) -> lmdb.Environment:
    """An environment opened like syncstore's state (each commit fdatasyncs data, not meta)."""
    return lmdb.open(path, map_size=MAP_SIZE, max_dbs=8, sync=True, metasync=False, readahead=False)


def write_workload(layout: Layout, messages: Sequence[Msg], batch: int) -> dict[str, float]:
    """Apply ``messages`` in batches; return apply seconds and the I/O counter deltas (after env.sync)."""
    gc.collect()
    gc.disable()
    try:
        before = io_counters()
        start = time.perf_counter()
        for i in range(0, len(messages), batch):
            layout.apply(messages[i : i + batch])
        seconds = time.perf_counter() - start
        layout.env.sync(True)
        after = io_counters()
    finally:
        gc.enable()
    return {"apply_s": seconds, "wchar": after["wchar"] - before["wchar"], "write_bytes": after["write_bytes"] - before["write_bytes"]}


def store_sizes(layout: Layout) -> dict[str, int]:
    """Total bytes of the store and the bytes of each db's pages; 'other' is meta and free pages."""
    env = layout.env
    psize = env.stat()["psize"]
    total = (env.info()["last_pgno"] + 1) * psize
    sizes = {"total": total}
    with env.begin() as txn:
        for name, db in layout.dbs.items():
            s = txn.stat(db)
            sizes[name] = (s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"]) * psize
            sizes[name + " entries"] = s["entries"]
    sizes["other"] = total - sum(sizes[name] for name in layout.dbs)
    sizes["psize"] = psize
    return sizes


def calls_per_second(env: lmdb.Environment, fn: Callable[..., Any], queries: Sequence[tuple[int, ...]], rounds: int) -> float:
    """Best-of-``rounds`` rate of ``fn(txn, *query)``, one read transaction per call (GC off)."""
    if not queries:
        return math.nan
    best = math.inf
    gc.collect()
    gc.disable()
    try:
        for _ in range(rounds):
            start = time.perf_counter()
            for q in queries:
                with env.begin() as txn:
                    fn(txn, *q)
            best = min(best, time.perf_counter() - start)
    finally:
        gc.enable()
    return len(queries) / best


@dataclass
class Result:
    """One (layout, workload) measurement."""

    layout: str
    workload: str
    fanout: int
    messages: int
    entries: int
    body_bytes: int
    size: int
    wchar: int
    write_bytes: int
    apply_s: float
    sync_calls_s: float | None
    sync_decoded_calls_s: float | None
    history_calls_s: float | None
    db_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def size_per_entry(self) -> float:
        return self.size / self.entries

    @property
    def live_per_entry(self) -> float:
        """Bytes per recipient-entry of the dbs' own pages (the total less meta and free pages)."""
        return (self.size - self.db_bytes.get("other", 0)) / self.entries

    @property
    def overhead_per_entry(self) -> float | None:
        """(store size - body bytes) per recipient-entry: issue #8's "body + 64 B per recipient" target."""
        if self.layout == DedupOnlyLayout.name:  # stores no bodies
            return None
        return (self.size - self.body_bytes) / self.entries

    @property
    def written_per_msg(self) -> float:
        return self.wchar / self.messages

    @property
    def written_x_body(self) -> float:
        return self.wchar / self.body_bytes

    @property
    def apply_msg_s(self) -> float:
        return self.messages / self.apply_s

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            size_per_entry=self.size_per_entry,
            size_per_msg=self.size / self.messages,
            size_x_body=self.size / self.body_bytes,
            live_per_entry=self.live_per_entry,
            overhead_per_entry=self.overhead_per_entry,
            wchar_per_msg=self.written_per_msg,
            write_bytes_per_msg=self.write_bytes / self.messages,
            written_x_body=self.written_x_body,
            apply_msg_s=self.apply_msg_s,
        )
        return d


@dataclass
class Config:
    """What one run measures."""

    fanouts: tuple[int, ...] = DEFAULT_FANOUTS
    layouts: tuple[str, ...] = DEFAULT_LAYOUTS + tuple(f"hybrid-{t}" for t in DEFAULT_HYBRIDS)
    entries: int = ENTRIES
    population: int = POPULATION
    batch: int = BATCH
    sync_calls: int = SYNC_CALLS
    history_calls: int = HISTORY_CALLS
    rounds: int = ROUNDS
    seed: int = SEED
    directory: str | None = None  # where the stores are made (a real disk, not tmpfs, for the byte counts)

    @classmethod
    def scaled(cls, scale: float, **overrides: Any) -> Config:
        """Entries, population and call counts times ``scale`` (fan-outs capped at the population)."""
        population = max(20, int(POPULATION * scale))
        base = cls(
            entries=max(100, int(ENTRIES * scale)),
            population=population,
            sync_calls=max(20, int(SYNC_CALLS * scale)),
            history_calls=max(20, int(HISTORY_CALLS * scale)),
        )
        for key, value in overrides.items():
            setattr(base, key, value)
        base.fanouts = tuple(min(f, base.population) for f in base.fanouts)
        return base


def measure(layout_name: str, wl: Workload, cfg: Config, base_dir: str, inspect: Callable[[Layout], None] | None = None) -> Result:
    """Write ``wl`` in a fresh environment with ``layout_name`` and measure it; ``inspect`` sees the filled layout."""
    path = tempfile.mkdtemp(prefix=f"{layout_name}-", dir=base_dir)
    env = open_env(path)
    try:
        layout = make_layout(layout_name, env)
        io = write_workload(layout, wl.messages, cfg.batch)
        sizes = store_sizes(layout)
        syncs = sync_queries(wl, cfg.sync_calls, SYNC_LIMIT, cfg.seed)
        sync_args = [(u, s, SYNC_LIMIT) for u, s in syncs]
        raw = decoded = None
        if layout.has_sync:
            raw = calls_per_second(env, layout.sync_raw, sync_args, cfg.rounds)
            decoded = calls_per_second(env, layout.sync_decoded, sync_args, cfg.rounds)
        history = None
        if layout.has_history:
            hist_args = [(u, c, b, HISTORY_LIMIT) for u, c, b in history_queries(wl, cfg.history_calls, HISTORY_LIMIT, cfg.seed)]
            history = calls_per_second(env, layout.history, hist_args, cfg.rounds)
        if inspect is not None:
            inspect(layout)
        return Result(
            layout_name, wl.name, wl.fanout, len(wl.messages), wl.entries, wl.body_bytes,
            sizes["total"], io["wchar"], io["write_bytes"], io["apply_s"], raw, decoded, history, sizes,
        )
    finally:
        env.close()
        shutil.rmtree(path, ignore_errors=True)


def run(cfg: Config, progress: Callable[[str], None] = lambda s: None, inspect: Callable[[Layout, Workload], None] | None = None) -> tuple[list[dict[str, Any]], list[Result]]:
    """Every layout on every workload: (workload counts, results)."""
    base = tempfile.mkdtemp(prefix="layout-study-", dir=cfg.directory)
    workloads, results = [], []
    try:
        for fanout in cfg.fanouts:
            wl = make_workload(fanout, cfg.entries, cfg.population, cfg.seed)
            workloads.append({"workload": wl.name, "fanout": fanout, "body": wl.body_size, "population": wl.population, **wl.counts()})
            progress(f"{wl.name}: {wl.counts()}")
            for name in cfg.layouts:
                hook = None if inspect is None else (lambda layout, wl=wl: inspect(layout, wl))
                result = measure(name, wl, cfg, base, hook)
                results.append(result)
                progress(f"  {name}: {result.size_per_entry:,.0f} B/entry, {result.written_per_msg:,.0f} B/msg written, {result.apply_msg_s:,.0f} msg/s")
            del wl
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return workloads, results


# --- output -----------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:,.{digits}f}"


def markdown_table(results: Sequence[Result]) -> str:
    """The main table: one row per layout x workload."""
    head = (
        "| workload | layout | size B/entry | live B/entry | overhead B/entry | size ×body | written B/msg (wchar) | write_bytes B/msg "
        "| written ×body | apply msg/s | sync calls/s | sync decoded calls/s | history calls/s |"
    )
    lines = [head, "|" + "---|" * 2 + "---:|" * 11]
    for r in results:
        lines.append(
            f"| {r.workload} | {r.layout} | {_fmt(r.size_per_entry)} | {_fmt(r.live_per_entry)} | {_fmt(r.overhead_per_entry)} | {_fmt(r.size / r.body_bytes, 2)} "
            f"| {_fmt(r.written_per_msg)} | {_fmt(r.write_bytes / r.messages)} | {_fmt(r.written_x_body, 1)} | {_fmt(r.apply_msg_s)} "
            f"| {_fmt(r.sync_calls_s)} | {_fmt(r.sync_decoded_calls_s)} | {_fmt(r.history_calls_s)} |"
        )
    return "\n".join(lines)


DB_COLUMNS = ("messages", "inbox", "history", "heads", "dedup", "dedup_expiry", "other")


def db_table(results: Sequence[Result]) -> str:
    """Store bytes per recipient-entry by db (pages, including DUPSORT sub-databases)."""
    lines = ["| workload | layout | " + " | ".join(DB_COLUMNS) + " |", "|---|---|" + "---:|" * len(DB_COLUMNS)]
    for r in results:
        cells = [_fmt(r.db_bytes[c] / r.entries, 1) if c in r.db_bytes else "—" for c in DB_COLUMNS]
        lines.append(f"| {r.workload} | {r.layout} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def workload_table(workloads: Sequence[dict[str, Any]]) -> str:
    """The workloads' counts."""
    keys = ["workload", "body", "population", "conversations", "messages", "entries", "users", "users with >= 100 entries", "max entries per user"]
    lines = ["| " + " | ".join(keys) + " |", "|---|" + "---:|" * (len(keys) - 1)]
    for w in workloads:
        lines.append("| " + " | ".join(str(w[k]) if k == "workload" else f"{w[k]:,}" for k in keys) + " |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> tuple[Config, argparse.Namespace]:
    parser = argparse.ArgumentParser(description="Measure issue #8's candidate LMDB layouts on raw py-lmdb.")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply entries, population and call counts (default 1)")
    parser.add_argument("--fanouts", default=",".join(map(str, DEFAULT_FANOUTS)), help="comma-separated fan-outs")
    parser.add_argument("--layouts", default=",".join(DEFAULT_LAYOUTS), help="comma-separated: dedup-only, copy, ref-dupfixed, ref-dupfixed-16 (opt-in), ref-plain")
    parser.add_argument("--hybrid", type=int, action="append", help=f"hybrid threshold T (repeatable; default {DEFAULT_HYBRIDS})")
    parser.add_argument("--entries", type=int, help=f"recipient-entries per workload (default {ENTRIES:,} x scale)")
    parser.add_argument("--population", type=int, help=f"users (default {POPULATION:,} x scale)")
    parser.add_argument("--batch", type=int, default=BATCH, help="messages per write transaction")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="timed rounds per read measure (best is kept)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--dir", help="directory for the temporary stores (default: the system temp dir)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    hybrids = DEFAULT_HYBRIDS if args.hybrid is None else tuple(args.hybrid)
    layouts = tuple(x for x in args.layouts.split(",") if x) + tuple(f"hybrid-{t}" for t in hybrids)
    sizes = {k: v for k, v in (("entries", args.entries), ("population", args.population)) if v is not None}
    cfg = Config.scaled(
        args.scale,
        **sizes,
        fanouts=tuple(int(x) for x in args.fanouts.split(",")),
        layouts=layouts,
        batch=args.batch,
        rounds=args.rounds,
        seed=args.seed,
        directory=args.dir,
    )
    return cfg, args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the study; print the tables (Markdown) and optionally write JSON."""
    cfg, args = parse_args(argv)
    started = time.perf_counter()
    workloads, results = run(cfg, progress=lambda line: print(line, file=sys.stderr, flush=True))
    seconds = time.perf_counter() - started
    print(f"## Layout study (lmdb {lmdb.__version__}, LMDB {'.'.join(map(str, lmdb.version()))}, {os.cpu_count()} CPUs, {seconds:.0f} s)\n")
    print(f"config: {asdict(cfg)}\n")
    print(workload_table(workloads) + "\n")
    print(markdown_table(results) + "\n")
    print("Store bytes per recipient-entry, by db:\n")
    print(db_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": asdict(cfg), "workloads": workloads, "results": [r.as_dict() for r in results], "seconds": seconds}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
