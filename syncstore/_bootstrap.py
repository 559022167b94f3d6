"""A follower's bootstrap from a feed's snapshot chunks: the LMDB side, crash-safe.

A follower that is empty (LSN 0) takes a snapshot's chunks in order
(``Store.apply``); their rows go straight into LMDB, one transaction per
chunk, while the meta key ``bootstrap`` records the progress::

    meta "bootstrap" (13 bytes):  snapshot LSN u64 | next chunk index u32 | state u8 (0 in progress, 1 rows complete)

The final chunk runs three steps: (1) its rows and state "complete" in one
transaction; (2) the follower's WAL, which holds no frame, restarted at
snapshot LSN + 1 (``WriteAheadLog.restart``); (3) ``applied_lsn`` =
snapshot LSN and the key removed, in one transaction.  Until (3) the
follower shows nothing of the snapshot (its reads refuse while a bootstrap
runs in the process).  After a crash, opening finds the key
(:func:`interrupted`): "in progress" means the rows are partial -- they are
wiped and the follower is empty again (the feed restarts the bootstrap,
documented); "complete" means only steps (2) and (3) were missing -- they
are finished.  Never half a snapshot applied as a whole.
"""

from __future__ import annotations

import struct

import lmdb

from ._codec import pack_u64
from ._restore import _apply_rows
from ._snapformat import DB_NAMES, DUP_DBS
from .errors import InvalidArgument
from .model import SnapshotChunk
from .state import APPLIED_KEY, LAST_ID_KEY, State

__all__ = ["progress", "apply_chunk", "finish", "wipe", "Progress"]

BOOTSTRAP_KEY = b"bootstrap"
_PROGRESS_FMT = ">QIB"  # snapshot LSN, next chunk index, state
_PROGRESS_SIZE = 13
assert struct.calcsize(_PROGRESS_FMT) == _PROGRESS_SIZE
_progress = struct.Struct(_PROGRESS_FMT)
IN_PROGRESS, COMPLETE = 0, 1

#: (snapshot LSN, next chunk index, IN_PROGRESS or COMPLETE)
Progress = tuple[int, int, int]


def progress(state: State, txn: lmdb.Transaction | None = None) -> Progress | None:
    """The bootstrap recorded in ``state``, or None if none is under way."""
    if txn is None:
        with state.read() as fresh:
            value = fresh.get(BOOTSTRAP_KEY, db=state.meta)
    else:
        value = txn.get(BOOTSTRAP_KEY, db=state.meta)
    return None if value is None else _progress.unpack(value)  # type: ignore[return-value]


def apply_chunk(state: State, chunk: SnapshotChunk) -> None:
    """Step (1) for one chunk: its rows and the progress, in one transaction.

    Chunk 0 starts a bootstrap (wiping the rows of an unfinished one);
    every other must be the next of the same snapshot, else
    :class:`InvalidArgument` naming the chunk expected, and nothing changes.
    """
    dbs = {db_id: getattr(state, name) for db_id, name in DB_NAMES.items()}
    dup_ids = {db_id for db_id, name in DB_NAMES.items() if name in DUP_DBS}

    def write(txn: lmdb.Transaction) -> None:
        current = progress(state, txn)
        if chunk.index == 0:
            if current is not None:
                _wipe(state, txn)
        elif current is None or current[2] != IN_PROGRESS or (current[0], current[1]) != (chunk.snapshot_lsn, chunk.index):
            expected = "chunk 0 of a snapshot" if current is None or current[2] != IN_PROGRESS else f"chunk {current[1]} of snapshot {current[0]}"
            raise InvalidArgument(
                f"snapshot chunk {chunk.index} of snapshot {chunk.snapshot_lsn} does not continue this follower's bootstrap: it expects {expected}",
                key="event",
                hint="restart the feed from the snapshot's first chunk (store.feed(since=0))",
            )
        _apply_rows(txn, dbs, dup_ids, list(chunk.rows))
        if chunk.final and chunk.last_msg_id is not None:
            txn.put(LAST_ID_KEY, pack_u64(chunk.last_msg_id), db=state.meta)
        txn.put(BOOTSTRAP_KEY, _progress.pack(chunk.snapshot_lsn, chunk.index + 1, COMPLETE if chunk.final else IN_PROGRESS), db=state.meta)

    state._write(write)


def finish(state: State, snapshot_lsn: int) -> None:
    """Step (3): the snapshot's LSN becomes the applied LSN, and the bootstrap is over."""

    def write(txn: lmdb.Transaction) -> None:
        if snapshot_lsn:
            txn.put(APPLIED_KEY, pack_u64(snapshot_lsn), db=state.meta)
        txn.delete(BOOTSTRAP_KEY, db=state.meta)

    state._write(write)
    state.sync()


def wipe(state: State) -> None:
    """Forget an unfinished bootstrap: every row it wrote, and its progress (the follower is empty again)."""
    state._write(lambda txn: _wipe(state, txn))
    state.sync()


def _wipe(state: State, txn: lmdb.Transaction) -> None:
    for name in DB_NAMES.values():
        txn.drop(getattr(state, name), delete=False)
    txn.delete(LAST_ID_KEY, db=state.meta)
    txn.delete(BOOTSTRAP_KEY, db=state.meta)
