"""The LMDB items each WAL record changes -- pure, no I/O.

An *item* is ``(database name, key, duplicate)``: in the DUPSORT databases
(``inbox``, ``history``) one duplicate of a key is an item of its own, and
``duplicate`` is its bytes; in the plain databases an item is a key, and
``duplicate`` is None.  A snapshot delta holds exactly the items that the WAL
records since the previous snapshot touched, each re-read from the state
(docs/design.md, "Snapshots"): that needs, per record kind, the items its
apply function may have put or deleted.  When a record kind is added, its
items are added here (tests/test_snapshot.py checks this module against a
real store: every item in LMDB is touched by some record).

The key layout has one owner, ``state.py`` (and ``_codec`` for the values):
the keys are packed with its structs, not copied formats.

=============  ============================================================
record         items
=============  ============================================================
DELIVER        ``messages[msg_id]``; per recipient ``inbox[user]`` duplicate
               ``cursor | msg_id`` and ``history[user | conv]`` duplicate
               ``cursor``; ``dedup[sender | client_seq]``;
               ``dedup_expiry[ms of msg_id | sender | client_seq]``
EXPIRE         per key ``dedup_expiry[ms | sender | client_seq]`` and
               ``dedup[sender | client_seq]`` (deleted, or kept when the key
               was delivered again: re-reading the item tells which)
=============  ============================================================
"""

from __future__ import annotations

from collections.abc import Iterator

from ._codec import Deliver, Expire, Record, pack_inbox_entry, pack_u64
from ._ids import msg_id_ms
from .state import EXPIRY_KEY, PAIR_KEY  # the key structs of state.py's layout (user|conv, sender|client_seq; the expiry key)

__all__ = ["Item", "touched", "DB_ORDER"]

#: ``(database name, key, duplicate or None)``.
Item = tuple[str, bytes, bytes | None]

#: The state's databases in the order snapshots write them (a sort key for items).
DB_ORDER = {"messages": 0, "inbox": 1, "history": 2, "dedup": 3, "dedup_expiry": 4}


def touched(record: Record) -> Iterator[Item]:
    """Every LMDB item that applying ``record`` may put or delete (repeats possible)."""
    if type(record) is Deliver:
        msg_id = record.msg_id
        yield "messages", pack_u64(msg_id), None
        for uid, cursor in record.pairs:
            user = pack_u64(uid)
            yield "inbox", user, pack_inbox_entry(cursor, msg_id)
            yield "history", PAIR_KEY.pack(uid, record.conv), pack_u64(cursor)
        yield "dedup", PAIR_KEY.pack(record.sender, record.client_seq), None
        yield "dedup_expiry", EXPIRY_KEY.pack(msg_id_ms(msg_id), record.sender, record.client_seq), None
    elif type(record) is Expire:
        for ms, sender, client_seq in record.keys:
            yield "dedup_expiry", EXPIRY_KEY.pack(ms, sender, client_seq), None
            yield "dedup", PAIR_KEY.pack(sender, client_seq), None
    else:  # a record kind without an entry here would make deltas silently miss its changes
        raise TypeError(f"no touched items are known for record {type(record).__name__}")


def item_order(item: Item) -> tuple[int, bytes, bytes]:
    """Sort key: database in snapshot order, then key, then duplicate (LMDB's order within a database)."""
    return DB_ORDER[item[0]], item[1], item[2] or b""
