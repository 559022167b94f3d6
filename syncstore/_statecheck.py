"""``State.check``: verify every invariant of an LMDB state of format 3 (layout in ``state.py``).

Read-only and exhaustive -- cost is proportional to the state's size, and the
reference recount holds one counter per stored message in memory.  Every
violation raises :class:`CorruptionError` naming the key that breaks it.

Invariants:

- every user's inbox cursors are dense up to its head, from 1 or from where a
  removed prefix ends (``State.remove_prefix``);
- every inbox entry references a stored message, and has its history entry
  (user | conv of that message -> cursor); the history index holds nothing else;
- every stored message's ``refs`` equals the number of inbox entries that
  reference it, and none is unreferenced (an orphan body: never freed);
- every dedup entry names inbox entries holding its msg_id (or below the
  user's first entry: removed, while the key stays recognised), its
  fingerprint matches the stored message's conv and body, and it has an
  expiry entry;
- the applied LSN is not beyond the WAL's end.
"""

from __future__ import annotations

import struct
from collections import Counter
from typing import TYPE_CHECKING

import lmdb

from . import _codec
from ._codec import STORED_HEAD_SIZE, unpack_inbox_entry, unpack_stored_head
from ._ids import msg_id_ms
from .errors import CorruptionError

if TYPE_CHECKING:
    from .state import State

_u64 = struct.Struct(">Q")


def check(state: State, txn: lmdb.Transaction, wal_end_lsn: int) -> dict[str, int]:
    """Verify ``state`` as seen by ``txn``; return counts (users, inbox_entries, messages, dedup_entries, applied_lsn)."""
    path = state.path
    applied = state.applied_lsn(txn)
    if applied > wal_end_lsn:
        raise CorruptionError(f"applied LSN {applied} is beyond the WAL end {wal_end_lsn}", path=path)
    users, refs = _check_inboxes(state, txn)
    entries = sum(refs.values())
    indexed = txn.stat(state.history)["entries"]
    if indexed != entries:
        raise CorruptionError(f"the history index holds {indexed} entries for {entries} inbox entries", path=path)
    messages = _check_refs(state, txn, refs)
    dedups = _check_dedup(state, txn)
    return {"users": users, "inbox_entries": entries, "messages": messages, "dedup_entries": dedups, "applied_lsn": applied}


def _check_inboxes(state: State, txn: lmdb.Transaction) -> tuple[int, Counter[int]]:
    """Check every inbox entry; return the number of users and the references counted per msg_id."""
    path = state.path
    refs: Counter[int] = Counter()
    history = txn.cursor(db=state.history)
    users = 0
    uid, expected = -1, 0  # the user whose entries are being read, and its last cursor seen
    for key, entry in txn.cursor(db=state.inbox):
        user = _u64.unpack(key)[0]
        if len(entry) != _codec.INBOX_ENTRY_SIZE:
            raise CorruptionError(f"inbox entry of {len(entry)} bytes", path=path, key=user)
        cursor, msg_id = unpack_inbox_entry(entry)
        if user != uid:  # the user's first entry: cursor 1, or the first after a removed prefix
            uid, expected = user, max(cursor, 1) - 1
            users += 1
        if cursor != expected + 1:
            raise CorruptionError(f"user {uid}: cursor {cursor} follows {expected}", path=path, key=(uid, cursor))
        expected = cursor
        value = state.message(txn, msg_id)
        if value is None:
            raise CorruptionError(f"inbox entry references message {msg_id}, which is not stored", path=path, key=(uid, cursor))
        if len(value) < STORED_HEAD_SIZE:
            raise CorruptionError(f"message {msg_id} is truncated", path=path, key=msg_id)
        conv = unpack_stored_head(value)[2]
        if not history.set_key_dup(_codec.PAIR_KEY.pack(uid, conv), _u64.pack(cursor)):
            raise CorruptionError(f"inbox entry has no history entry (conv {conv})", path=path, key=(uid, cursor))
        refs[msg_id] += 1
    return users, refs


def _check_refs(state: State, txn: lmdb.Transaction, refs: Counter[int]) -> int:
    """Check every stored message's reference count against the recount; return how many messages there are."""
    count = 0
    for key, value in txn.cursor(db=state.messages):
        msg_id = _u64.unpack(key)[0]
        if len(value) < STORED_HEAD_SIZE:
            raise CorruptionError(f"message {msg_id} is truncated", path=state.path, key=msg_id)
        stored = unpack_stored_head(value)[0]
        counted = refs.get(msg_id, 0)
        if counted == 0:
            raise CorruptionError(f"message {msg_id} is referenced by no inbox entry (an orphan body)", path=state.path, key=msg_id)
        if stored != counted:
            raise CorruptionError(f"message {msg_id} counts {stored} references, the inboxes hold {counted}", path=state.path, key=msg_id)
        count += 1
    return count


def _check_dedup(state: State, txn: lmdb.Transaction) -> int:
    """Check every dedup entry against the inboxes, the message it names and the expiry index; return how many."""
    path = state.path
    inbox = txn.cursor(db=state.inbox)
    count = 0
    for key, value in txn.cursor(db=state.dedup):
        sender, client_seq = _codec.PAIR_KEY.unpack(key)
        where = (sender, client_seq)
        try:
            msg_id, fingerprint, pairs = _codec.decode_dedup(value)
        except CorruptionError as error:
            raise CorruptionError(error.message, path=path, key=where) from None
        present = 0  # pairs whose inbox entry is still in LMDB (a removed prefix took the others)
        for uid, cursor in pairs:
            user = _u64.pack(uid)
            if not inbox.set_key(user) or cursor < _u64.unpack_from(inbox.value())[0]:
                continue  # removed with its inbox's prefix: the dedup entry outlives it, by design
            if not inbox.set_range_dup(user, _u64.pack(cursor)) or unpack_inbox_entry(inbox.value()) != (cursor, msg_id):
                raise CorruptionError(f"dedup entry points at a missing inbox entry ({uid}, {cursor})", path=path, key=where)
            present += 1
        stored = state.message(txn, msg_id)
        if present and stored is None:
            raise CorruptionError(f"dedup entry names message {msg_id}, which is not stored", path=path, key=where)
        if stored is not None:
            conv = unpack_stored_head(stored)[2]
            if _codec.dedup_fingerprint(conv, stored[STORED_HEAD_SIZE:]) != fingerprint:
                raise CorruptionError("dedup entry's fingerprint does not match the message it points at", path=path, key=where)
        if txn.get(_codec.EXPIRY_KEY.pack(msg_id_ms(msg_id), sender, client_seq), db=state.dedup_expiry) is None:
            raise CorruptionError("dedup entry has no expiry index entry", path=path, key=where)
        count += 1
    return count
