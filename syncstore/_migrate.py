"""Migrate an LMDB state of format 1 or 2 to format 3 (one body per message), crash-safely.

The old formats kept a full copy of the message in every recipient's inbox
entry.  Their byte formats (all integers unsigned big-endian)::

    named db      key                      value
    inbox         user | cursor            cursor u64 | msg_id u64 | sender u64 | conv u64 | client_seq u64
                                           | ts_ms u64 | priority u8 | body     (49-byte head, then the body)
    heads         user                     head cursor u64
    dedup         sender | client_seq      format 2: as format 3 (msg_id | fingerprint | R | pairs)
                                           format 1: msg_id u64 | R u32 | R x (user u64, cursor u64)
    dedup_expiry  ms | sender | client_seq empty (unchanged in format 3)
    meta          as format 3

How, so that a crash at any point loses nothing:

1. build the new state in ``state.migrating/`` (a leftover of an earlier
   attempt is removed first), from a read-only view of the old one; verify
   it with the full ``check()`` and against the old heads; sync it;
2. rename ``state/`` to ``state.legacy/``;
3. rename ``state.migrating/`` to ``state/``; fsync the store directory;
4. remove ``state.legacy/``.

:func:`build` is step 1, done while opening validates the store (it writes
only its own directory, and removes it if it fails); :func:`swap` steps 2-4,
once the open is validated.  :func:`live_state_dir` says, without writing,
which directory holds the state (after a crash between steps 2 and 3 it is
``state.migrating/``, complete since step 2 follows step 1); :func:`finish`
completes an interrupted swap.
The WAL is untouched throughout: records after the applied LSN are replayed
into the new state as usual.  Needs free space for a second copy of the state
(the new one is smaller: bodies are stored once).
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
from typing import Any

import lmdb

from . import _codec, _statecheck
from ._codec import DedupEntry
from ._fileio import FileSystem
from ._layout import MARKER, STATE_DIR, make_dir, read_marker
from .errors import CorruptionError
from .state import STATE_FORMAT, State

__all__ = ["MIGRATING_DIR", "LEGACY_DIR", "live_state_dir", "inspect", "leftovers", "finish", "build", "swap"]

log = logging.getLogger("syncstore.migrate")

MIGRATING_DIR = "state.migrating"
LEGACY_DIR = "state.legacy"

LEGACY_INBOX_HEAD_FMT = ">QQQQQQB"  # cursor, msg_id, sender, conv, client_seq, ts_ms, priority
LEGACY_INBOX_HEAD_SIZE = 49
assert struct.calcsize(LEGACY_INBOX_HEAD_FMT) == LEGACY_INBOX_HEAD_SIZE
DEDUP_V1_HEAD_FMT = ">QI"  # format 1: msg_id, recipient count
DEDUP_V1_HEAD_SIZE = 12
assert struct.calcsize(DEDUP_V1_HEAD_FMT) == DEDUP_V1_HEAD_SIZE

_legacy_head = struct.Struct(LEGACY_INBOX_HEAD_FMT)
_dedup_v1_head = struct.Struct(DEDUP_V1_HEAD_FMT)
_u64 = struct.Struct(">Q")
_pair = struct.Struct(">QQ")
_stored_head = struct.Struct(_codec.STORED_HEAD_FMT)
_BATCH = 65_536  # inbox entries per write transaction (bounds its dirty pages and the bodies held)


def live_state_dir(store: str) -> str:
    """The directory holding the store's LMDB state now, without changing anything."""
    state, migrating = os.path.join(store, STATE_DIR), os.path.join(store, MIGRATING_DIR)
    if not os.path.exists(state) and os.path.isdir(os.path.join(store, LEGACY_DIR)) and os.path.isdir(migrating):
        return migrating  # a migration crashed between its two renames: the new state is complete
    return state


def inspect(store: str) -> tuple[int | None, int | None]:
    """(state format, replica id) of a store, read without writing anything (None: not recorded / no state).

    For tools (``syncstore upgrade``); it takes no lock, so a store being
    migrated by another process at that moment may give a stale answer.
    """
    replica = None
    if os.path.exists(os.path.join(store, MARKER)):
        replica = read_marker(store).replica_id
    path = live_state_dir(store)
    if not os.path.isfile(os.path.join(path, "data.mdb")):
        return None, replica
    state = State(path, readonly=True, lock=False, map_size=1 << 20)
    try:
        if not state.initialised:
            return None, replica
        return state.format, replica if replica is not None else state.replica_id()
    finally:
        state.close()


def leftovers(store: str) -> list[str]:
    """The directories a migration interrupted by a crash left in ``store`` (empty if none): :func:`finish` deals with them."""
    return [name for name in (MIGRATING_DIR, LEGACY_DIR) if os.path.isdir(os.path.join(store, name))]


def finish(store: str, fs: FileSystem) -> None:
    """Complete or clean up a migration interrupted by a crash (see the module docstring)."""
    state, migrating, legacy = (os.path.join(store, name) for name in (STATE_DIR, MIGRATING_DIR, LEGACY_DIR))
    if not os.path.exists(state) and os.path.isdir(legacy) and os.path.isdir(migrating):
        fs.rename(migrating, state)
        fs.fsync_dir(store)
        log.warning("store %s: finished a migration interrupted after its new state was complete", store)
    for leftover in (legacy, migrating):
        if os.path.isdir(leftover):
            shutil.rmtree(leftover)
            fs.fsync_dir(store)


def build(store: str, *, map_size: int, file_mode: int, replica_id: int) -> dict[str, int]:
    """Steps 1 of the migration: write and verify the format-3 state in ``state.migrating/``; return its counts.

    Changes nothing else: on any error (:class:`CorruptionError` if the old
    state is inconsistent) the partial new state is removed again, so a
    refused open leaves the store as it was.  The caller holds the store's
    lock and has validated the rest of the store.
    """
    old_dir, new_dir = os.path.join(store, STATE_DIR), os.path.join(store, MIGRATING_DIR)
    if os.path.isdir(new_dir):
        shutil.rmtree(new_dir)  # an attempt a crash interrupted
    make_dir(new_dir, file_mode)
    try:
        old = lmdb.open(old_dir, readonly=True, lock=False, max_dbs=8, map_size=map_size, readahead=False)
        try:
            new = State(new_dir, readonly=False, map_size=map_size, file_mode=file_mode, replica_id=replica_id)
            try:
                counts = _copy(old, new, old_dir)
                new.sync()
            finally:
                new.close()
        finally:
            old.close()
    except BaseException:
        shutil.rmtree(new_dir, ignore_errors=True)
        raise
    return counts


def swap(store: str, fs: FileSystem) -> None:
    """Steps 2-4: put the state :func:`build` wrote in place of the old one, then remove the old one."""
    old_dir, legacy = os.path.join(store, STATE_DIR), os.path.join(store, LEGACY_DIR)
    fs.fsync_dir(store)  # state.migrating/ is durable before anything points at it
    fs.rename(old_dir, legacy)
    fs.rename(os.path.join(store, MIGRATING_DIR), old_dir)
    fs.fsync_dir(store)
    shutil.rmtree(legacy)
    fs.fsync_dir(store)
    log.info("store %s: LMDB state migrated to format %d", store, STATE_FORMAT)


def _copy(old: Any, new: State, path: str) -> dict[str, int]:
    """Copy everything from the old environment into ``new`` (format 3) and verify the result."""
    names = (b"inbox", b"heads", b"dedup", b"dedup_expiry", b"meta")
    inbox, heads, dedup, expiry, meta = (old.open_db(name, create=False) for name in names)
    with old.begin(buffers=False) as txn:
        old_format = _u64.unpack(txn.get(b"format_version", db=meta))[0]
        # Format 1 had no fingerprints; a 1 -> 2 upgrade interrupted half-way left the
        # dedup keys after this one still in format 1 (format 2 + b"dedup_v1_after").
        v1_after = b"" if old_format == 1 else txn.get(b"dedup_v1_after", db=meta)
        _copy_inboxes(txn, inbox, new, path)
        _copy_dedup(txn, dedup, new, path, v1_after)
        new._write(lambda out: out.cursor(db=new.dedup_expiry).putmulti(txn.cursor(db=expiry).iternext(), append=True))
        carried = [(key, txn.get(key, db=meta)) for key in (b"applied_lsn", b"last_msg_id", b"replica_id")]
        new._write(lambda out: [out.put(key, value, db=new.meta) for key, value in carried if value is not None])
        expected_heads = {_u64.unpack(key)[0]: _u64.unpack(value)[0] for key, value in txn.cursor(db=heads)}
    with new.read() as txn:
        counts = _statecheck.check(new, txn, 2**64 - 1)
        found_heads = dict(new.iter_heads(txn))
    if found_heads != expected_heads:
        wrong = next(uid for uid in set(found_heads) | set(expected_heads) if found_heads.get(uid) != expected_heads.get(uid))
        raise CorruptionError(
            f"user {wrong}: the old heads database says {expected_heads.get(wrong)}, its inbox ends at {found_heads.get(wrong)}",
            path=path,
            key=wrong,
        )
    return counts


def _copy_inboxes(txn: Any, inbox: Any, new: State, path: str) -> None:
    """Each old inbox entry becomes an inbox and a history entry; each message is stored once, with its count."""
    entries: list[tuple[bytes, bytes]] = []
    history: list[tuple[bytes, bytes]] = []
    bodies: dict[bytes, list[Any]] = {}  # msg_id key -> [value without refs, references in this batch]
    for key, value in txn.cursor(db=inbox):
        uid, cursor = _pair.unpack(key)
        if len(value) < LEGACY_INBOX_HEAD_SIZE:
            raise CorruptionError("inbox value is truncated", path=path, key=(uid, cursor))
        stored_cursor, msg_id, sender, conv, client_seq, ts_ms, priority = _legacy_head.unpack_from(value)
        if stored_cursor != cursor:
            raise CorruptionError(f"inbox value names cursor {stored_cursor}", path=path, key=(uid, cursor))
        entries.append((_u64.pack(uid), _codec.pack_inbox_entry(cursor, msg_id)))
        history.append((_pair.pack(uid, conv), _u64.pack(cursor)))
        content = _stored_head.pack(0, sender, conv, client_seq, ts_ms, priority)[4:] + value[LEGACY_INBOX_HEAD_SIZE:]
        seen = bodies.get(_u64.pack(msg_id))
        if seen is None:
            bodies[_u64.pack(msg_id)] = [content, 1]
        elif seen[0] != content:
            raise CorruptionError(f"two inbox entries of message {msg_id} hold different messages", path=path, key=(uid, cursor))
        else:
            seen[1] += 1
        if len(entries) >= _BATCH:
            _write_batch(new, entries, history, bodies, path)
            entries, history, bodies = [], [], {}
    _write_batch(new, entries, history, bodies, path)


def _write_batch(new: State, entries: list[tuple[bytes, bytes]], history: list[tuple[bytes, bytes]], bodies: dict[bytes, list[Any]], path: str) -> None:
    """One transaction: the entries (appends, in key order) and the messages, adding to counts of earlier batches."""

    def write(txn: Any) -> None:
        for db, items in ((new.inbox, entries), (new.history, sorted(history))):
            if items and txn.cursor(db=db).putmulti(items, dupdata=True, append=True)[1] != len(items):
                raise CorruptionError("old inbox keys are out of order", path=path)
        for key in sorted(bodies):
            content, refs = bodies[key]
            earlier = txn.get(key, db=new.messages)
            if earlier is not None:
                if earlier[4:] != content:
                    raise CorruptionError(f"two inbox entries of message {_u64.unpack(key)[0]} hold different messages", path=path)
                refs += _stored_head.unpack_from(earlier)[0]
            txn.put(key, _codec.set_refs(b"\0\0\0\0" + content, refs), db=new.messages)

    new._write(write)


def _copy_dedup(txn: Any, dedup: Any, new: State, path: str, v1_after: bytes | None) -> None:
    """Format 2 dedup values are format 3's; format 1 ones (keys after ``v1_after``) gain the fingerprint of their message."""
    items: list[tuple[bytes, bytes]] = []
    with new.read() as out:
        for key, value in txn.cursor(db=dedup):
            if v1_after is None or key <= v1_after:
                items.append((key, value))
                continue
            msg_id, pairs = _decode_dedup_v1(value, path, _pair.unpack(key))
            stored = new.message(out, msg_id)
            if stored is None and pairs:
                raise CorruptionError(f"dedup entry names message {msg_id}, which no inbox holds", path=path, key=_pair.unpack(key))
            fingerprint = bytes(_codec.FINGERPRINT_SIZE) if stored is None else _codec.dedup_fingerprint(
                _stored_head.unpack_from(stored)[2], stored[_codec.STORED_HEAD_SIZE :]
            )
            items.append((key, _codec.encode_dedup(*DedupEntry(msg_id, fingerprint, pairs))))
    for start in range(0, len(items), _BATCH):
        chunk = items[start : start + _BATCH]
        new._write(lambda out: out.cursor(db=new.dedup).putmulti(chunk, append=True))


def _decode_dedup_v1(value: bytes, path: str, key: tuple[int, int]) -> tuple[int, _codec.Pairs]:
    """A format-1 dedup value: (msg_id, pairs)."""
    if len(value) < DEDUP_V1_HEAD_SIZE:
        raise CorruptionError("format-1 dedup entry is truncated", path=path, key=key)
    msg_id, count = _dedup_v1_head.unpack_from(value, 0)
    if len(value) != DEDUP_V1_HEAD_SIZE + _codec.PAIR_SIZE * count:
        raise CorruptionError("format-1 dedup entry lengths do not add up", path=path, key=key)
    return msg_id, _codec.unpack_pairs(value, DEDUP_V1_HEAD_SIZE, count)
