"""Incremental snapshots of a store's state: take one (base or delta), list a chain, find a store's newest.

``Store.snapshot(dest_dir)`` calls :func:`take`.  The first snapshot into a
directory is a **base** (the whole state); later ones are **deltas** that
hold only the items that WAL records since the previous snapshot touched
(``_statekeys.touched``), each re-read from the state -- found from the log,
never by scanning.  When the log no longer holds those records (their
segments were retired), or with ``full=True``, a new base starts a new chain
and the old chain's files are removed.  :func:`syncstore.restore` builds a
store from a chain (``_restore``).  Formats: ``_snapformat`` and
docs/format.md; the design and the consistency argument: docs/design.md,
"Snapshots".

**Consistency without a long read transaction.**  A read transaction held
for the whole copy of a big store would keep LMDB from reusing pages (the file
grows under load) and hold back the map resize gate (``state._Gate``), so the
state is read in short transactions of a bounded number of items.  Each one
reads ``applied_lsn`` with its items; after each, the WAL records up to that
LSN are read and the items they touched collected.  Every item read in a
transaction at applied LSN A is exact at any later LSN unless a record after A
touched it, so re-reading the collected items -- in rounds of short
transactions while many are left, then in one last short transaction that
first reads the final LSN L and the last few records up to it -- leaves every
item as it is at L: the snapshot is exactly the state at L.  The re-reads are
appended after the scan; rows apply in file order, so the last row of an item
is its value.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from typing import Any

from itertools import islice
from operator import itemgetter

import lmdb

from . import _codec, _layout
from . import _snapformat as fmt
from ._fileio import OS_FS, FileSystem
from ._snapdir import SnapshotInfo, SnapWriter, io_error, is_ours, read_manifest, write_manifest
from ._snapformat import BASE, DELTA, DB_IDS, DUP_DBS, ChainEntry, Header, Manifest
from ._statekeys import DB_ORDER, Item, item_order, touched
from ._walread import LogReader, LogRetired
from .errors import InvalidArgument, StoreLocked, SyncStoreError
from .state import LAST_ID_KEY, State
from ._restore import restore

__all__ = ["SnapshotInfo", "take", "snapshot_chain", "newest_snapshot", "restore", "RECORD_FILE"]

log = logging.getLogger("syncstore.snapshot")

#: Items read per short read transaction (and at most CHUNK_BYTES of them).  A chunk of 4,096
#: items holds a transaction open for ~2 ms (docs/design.md, "Snapshots", has the measurements).
CHUNK_ROWS = 4_096
CHUNK_BYTES = 4 << 20
_STEP = 64  # items taken at a time while a chunk is read (its bytes are checked between steps)
_value = itemgetter(1)
#: Rounds of re-reads in short transactions before the last one reads whatever is left (each round
#: re-reads what the writers touched during the one before, so they shrink unless writes keep pace).
_MAX_ROUNDS = 32
#: A delta touching more items than this is written as a base instead: the items are held in memory
#: (~170 bytes each), and a change that large costs about what a base does anyway.
MAX_DELTA_ITEMS = 1_000_000
#: Attempts at a base before giving up because the log was retired under it faster than it read.
_BASE_ATTEMPTS = 3
#: The store's record of where its snapshots were written (in the store directory).
RECORD_FILE = "SNAPSHOTS"
RECORD_TEMP = "SNAPSHOTS.tmp"
_RECORD_KEEP = 16  # directories remembered


# --- taking a snapshot ----------------------------------------------------------------------------


def take(state: State, wal_dir: str, dest_dir: str | os.PathLike[str], *, store_path: str, full: bool = False, fs: FileSystem = OS_FS) -> SnapshotInfo:
    """Write a snapshot of ``state`` (whose log is in ``wal_dir``) into ``dest_dir``; see :meth:`syncstore.Store.snapshot`.

    A failed file operation is a :class:`SyncStoreError` (:class:`StoreFull`
    for no space): the store is unaffected and the directory's chain is as
    it was (a temporary file may remain; the next snapshot removes it).
    """
    try:
        return _take(state, wal_dir, dest_dir, store_path=store_path, full=full, fs=fs)
    except OSError as error:
        raise io_error(error, "writing the snapshot", os.fspath(dest_dir), "the snapshot directory's chain is as it was") from error


def _take(state: State, wal_dir: str, dest_dir: str | os.PathLike[str], *, store_path: str, full: bool, fs: FileSystem) -> SnapshotInfo:
    if not isinstance(dest_dir, (str, os.PathLike)) or not os.fspath(dest_dir):
        raise InvalidArgument(f"dest_dir must name a directory, got {dest_dir!r}", key="dest_dir")
    if type(full) is not bool:
        raise InvalidArgument(f"full must be True or False, got {full!r}", key="full")
    dest = os.path.abspath(os.fspath(dest_dir))
    store = os.path.realpath(store_path)
    real = os.path.realpath(dest)
    if real == store or real.startswith(store + os.sep):
        raise InvalidArgument(f"the snapshot directory {dest} is inside the store {store_path}", key="dest_dir", hint="write snapshots outside the store directory (another disk, ideally)")
    marker = _layout.read_marker(store_path)
    file_mode = _layout.store_file_mode(store_path)
    if not os.path.isdir(dest):
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with contextlib.suppress(FileExistsError):
            _layout.make_dir(dest, file_mode)
    lock = _lock(dest)
    try:
        manifest = read_manifest(dest)
        if manifest is not None and (manifest.epoch, manifest.replica_id) != (marker.epoch, marker.replica_id):
            raise InvalidArgument(
                f"{dest} holds snapshots of another store or history (replica {manifest.replica_id}, epoch {manifest.epoch}; "
                f"this store is replica {marker.replica_id}, epoch {marker.epoch})",
                path=dest,
                key="dest_dir",
                hint="write into another directory, or move the old snapshots away",
            )
        _remove_leftovers(fs, dest, manifest)
        context = _Context(state, fs, dest, file_mode, marker.replica_id, marker.epoch)
        with LogReader(wal_dir) as wal:
            hint = _recorded(store_path, marker.epoch).get(dest)
            if manifest is not None and hint is not None and hint.wal is not None and hint.lsn == manifest.chain[-1].lsn:
                wal.resume(hint.lsn, *hint.wal)  # checked there; a wrong hint is ignored
            info, chain = _write(context, wal, manifest, full)
            position = wal.position(info.lsn)
        if chain is not None:
            write_manifest(fs, dest, Manifest(marker.replica_id, marker.epoch, chain), file_mode)
            if manifest is not None and chain[0] != manifest.chain[0]:  # a new base: the old chain goes
                _remove_leftovers(fs, dest, Manifest(marker.replica_id, marker.epoch, chain))
    finally:
        os.close(lock)
    _record(fs, store_path, dest, fmt.Recorded(info.lsn, position), marker.epoch, file_mode)
    return info


def _lock(dest: str) -> int:
    """``flock`` the snapshot directory (one snapshot writer at a time); return the descriptor."""
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreLocked(
            f"another snapshot is being written into {dest}, or a restore is reading it",
            path=dest,
            holder="a snapshot writer or a restore",
            hint="wait for it to finish; nothing was written",
        ) from None
    return fd


def _remove_leftovers(fs: FileSystem, dest: str, manifest: Manifest | None) -> None:
    """Remove what a crash (or a replaced chain) left: temp files, snapshot files the manifest does not name."""
    named = {entry.name for entry in manifest.chain} if manifest is not None else set()
    removed = []
    for name in sorted(os.listdir(dest)):
        if is_ours(name) and name not in named and not os.path.isdir(os.path.join(dest, name)):
            fs.unlink(os.path.join(dest, name))
            removed.append(name)
    if removed:
        fs.fsync_dir(dest)
        log.info("snapshot directory %s: removed %s", dest, ", ".join(removed))


class _Context:
    """What writing one snapshot needs: the state and where to write, and the source store's identity."""

    def __init__(self, state: State, fs: FileSystem, dest: str, file_mode: int, replica_id: int, epoch: int) -> None:
        self.state, self.fs, self.dest, self.file_mode = state, fs, dest, file_mode
        self.replica_id, self.epoch = replica_id, epoch
        self.dbs = {name: getattr(state, name) for name in DB_ORDER}


def _write(context: _Context, wal: LogReader, manifest: Manifest | None, full: bool) -> tuple[SnapshotInfo, tuple[ChainEntry, ...] | None]:
    """Write a delta, or a base; return its info and the new chain (None: nothing written)."""
    state = context.state
    if manifest is None:
        reason = "the first snapshot in this directory"
    elif full:
        reason = "full=True: a new base replaces the chain"
    else:
        newest = manifest.chain[-1]
        if state.applied_lsn() <= newest.lsn:  # nothing applied since (or a view that lags the writer that took it)
            return SnapshotInfo.of(context.dest, newest, "nothing written: the store has not changed since this snapshot"), None
        try:
            entry = _delta(context, wal, newest)
            return SnapshotInfo.of(context.dest, entry), manifest.chain + (entry,)
        except LogRetired as error:
            reason = f"a base, not a delta: the WAL no longer holds the records after LSN {newest.lsn} ({error.message})"
        except _TooLarge as error:
            reason = f"a base, not a delta: the records after LSN {newest.lsn} touch more than {error.args[0]:,} items"
        log.info("snapshot into %s: %s", context.dest, reason)
    for attempt in range(1, _BASE_ATTEMPTS + 1):
        try:
            entry = _base(context, wal)
            return SnapshotInfo.of(context.dest, entry, reason), (entry,)
        except LogRetired as error:
            if attempt == _BASE_ATTEMPTS:
                raise SyncStoreError(
                    f"the store's WAL was retired faster than the snapshot could follow it, {attempt} times ({error.message})",
                    path=context.dest,
                    hint="take the snapshot again, at a quieter time or with larger WAL segments (segment_bytes); nothing was changed",
                ) from None
            log.info("snapshot into %s: starting the base again (%s)", context.dest, error.message)
    raise AssertionError("unreachable")


def _base(context: _Context, wal: LogReader) -> ChainEntry:
    """Scan the whole state in short transactions, then re-read what changed meanwhile: a base at the final LSN."""
    state = context.state
    out = SnapWriter(context.fs, context.dest, context.file_mode)
    try:
        changes = _Changes(wal, state.applied_lsn())
        for name in DB_ORDER:
            _scan(context, name, out, changes)
        lsn, last_msg_id = _reread(context, out, changes)
        return out.finish(Header(BASE, context.replica_id, lsn, 0, context.epoch), last_msg_id)
    except BaseException:
        out.abort()
        raise


def _delta(context: _Context, wal: LogReader, previous: ChainEntry) -> ChainEntry:
    """Re-read every item that the WAL records after ``previous`` touched: a delta at the final LSN."""
    state = context.state
    changes = _Changes(wal, previous.lsn, limit=MAX_DELTA_ITEMS)
    changes.collect(state.applied_lsn())  # LogRetired or _TooLarge here: the caller writes a base instead
    changes.limit = None
    out = SnapWriter(context.fs, context.dest, context.file_mode)
    try:
        lsn, last_msg_id = _reread(context, out, changes)
        return out.finish(Header(DELTA, context.replica_id, lsn, previous.lsn, context.epoch), last_msg_id)
    except BaseException:
        out.abort()
        raise


class _TooLarge(Exception):
    """A delta would touch more items than its limit (``args[0]``)."""


class _Changes:
    """The items touched by WAL records after :attr:`lsn` was reached, collected as the applied LSN moves on."""

    def __init__(self, wal: LogReader, lsn: int, limit: int | None = None) -> None:
        self.wal = wal
        self.lsn = lsn  # records up to here have been collected
        self.items: set[Item] = set()
        self.limit = limit  # raise _TooLarge beyond this many items (None: no limit)

    def collect(self, upto: int) -> None:
        """Add the items touched by the records in (:attr:`lsn`, ``upto``]."""
        for frame in self.wal.frames(self.lsn, upto):
            record = _codec.decode_record(frame.rtype, frame.body, frame.lsn, self.wal.directory, frame.offset)
            self.items.update(touched(record))
            if self.limit is not None and len(self.items) > self.limit:
                raise _TooLarge(self.limit)
        self.lsn = max(self.lsn, upto)

    def take(self) -> list[Item]:
        """The items collected so far, in snapshot order, forgetting them."""
        items, self.items = self.items, set()
        return sorted(items, key=item_order)


def _scan(context: _Context, name: str, out: SnapWriter, changes: _Changes) -> None:
    """Write every item of database ``name`` as a put, reading it in chunks of short transactions.

    Inside a transaction only LMDB's own iteration runs (``islice`` over
    ``iternext``, in C); the chunk is encoded after the transaction ends.
    """
    state, db, db_id, dup = context.state, context.dbs[name], DB_IDS[name], name in DUP_DBS
    last: tuple[bytes, bytes] | None = None
    while True:
        items: list[tuple[bytes, bytes]] = []
        ended = True
        with state.read() as txn:
            applied = state.applied_lsn(txn)
            cursor = txn.cursor(db=db)
            if _seek_after(cursor, last, dup):
                found = cursor.iternext()
                size = 0
                while len(items) < CHUNK_ROWS and size < CHUNK_BYTES:
                    step = min(_STEP, CHUNK_ROWS - len(items))
                    batch: list[tuple[bytes, bytes]] = list(islice(found, step))  # type: ignore[arg-type]  # bytes: buffers=False
                    items += batch
                    size += sum(map(len, map(_value, batch)))
                    if len(batch) < step:
                        break
                else:
                    ended = False
        out.rows.put_all(db_id, items)
        out.flush()
        changes.collect(applied)  # the WAL, read outside the transaction
        if ended:
            return
        last = items[-1]


def _seek_after(cursor: lmdb.Cursor, last: tuple[bytes, bytes] | None, dup: bool) -> bool:
    """Position ``cursor`` on the first item after ``last`` (the first item if None); False if there is none."""
    if last is None:
        return cursor.first()
    key, value = last
    if not dup:
        if not cursor.set_range(key):
            return False
        return cursor.next() if cursor.key() == key else True
    if cursor.set_range_dup(key, value):
        return cursor.next() if cursor.value() == value else True
    if not cursor.set_range(key):  # the key's duplicates all sort before `value` (or the key is gone)
        return False
    return cursor.next_nodup() if cursor.key() == key else True


def _reread(context: _Context, out: SnapWriter, changes: _Changes) -> tuple[int, int | None]:
    """Re-read every collected item until none is left to re-read; return the final LSN and last_msg_id (None: none).

    While many items are waiting, they are re-read in short transactions
    (collecting what changes meanwhile); the last few are re-read in one
    short transaction together with the final applied LSN, after collecting
    the records up to it -- there the state cannot move.
    """
    state = context.state
    previous = None
    for _round in range(_MAX_ROUNDS):
        items = changes.take()
        if len(items) <= CHUNK_ROWS or (previous is not None and len(items) >= previous):
            changes.items.update(items)  # few left, or the writers keep pace: more rounds would not help
            break
        previous = len(items)
        for start in range(0, len(items), CHUNK_ROWS):
            with state.read() as txn:
                applied = state.applied_lsn(txn)
                _put_items(context, txn, items[start : start + CHUNK_ROWS], out)
            out.flush()
            changes.collect(applied)
    with state.read() as txn:
        lsn = state.applied_lsn(txn)
        changes.collect(lsn)
        _put_items(context, txn, changes.take(), out)
        stored = txn.get(LAST_ID_KEY, db=state.meta)
    return lsn, None if stored is None else _codec.unpack_u64(stored)


def _put_items(context: _Context, txn: lmdb.Transaction, items: list[Item], out: SnapWriter) -> None:
    """One row per item, as it is in ``txn``: a put if present, else a delete."""
    rows = out.rows
    cursors: dict[str, Any] = {}
    for name, key, dup in items:
        db_id = DB_IDS[name]
        if dup is None:
            value = txn.get(key, db=context.dbs[name])
            if value is None:
                rows.delete(db_id, key)
            else:
                rows.put(db_id, key, value)  # type: ignore[arg-type]  # bytes: buffers=False
            continue
        cursor = cursors.get(name)
        if cursor is None:
            cursor = cursors[name] = txn.cursor(db=context.dbs[name])
        if cursor.set_key_dup(key, dup):
            rows.put(db_id, key, dup)
        else:
            rows.delete(db_id, key, dup)


# --- a directory's chain, a store's record ------------------------------------------------------------


def snapshot_chain(dest_dir: str | os.PathLike[str]) -> list[SnapshotInfo]:
    """The snapshots in ``dest_dir``, base first, then each delta in order (``syncstore.snapshot_chain``).

    Reads only the manifest (its CRC and chain checked); an empty list if
    the directory has none.  Raises :class:`CorruptionError` if the manifest
    is damaged, :class:`InvalidArgument` for a bad path.
    """
    if not isinstance(dest_dir, (str, os.PathLike)) or not os.fspath(dest_dir):
        raise InvalidArgument(f"dest_dir must name a directory, got {dest_dir!r}", key="dest_dir")
    directory = os.path.abspath(os.fspath(dest_dir))
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise InvalidArgument(f"{directory} is not a directory: snapshots are a directory", key="dest_dir", path=directory)
    if not os.path.isdir(directory):
        return []
    try:
        manifest = read_manifest(directory)
    except OSError as error:
        raise io_error(error, "reading the snapshot manifest", directory, "nothing was changed") from error
    return [] if manifest is None else [SnapshotInfo.of(directory, entry) for entry in manifest.chain]


def _recorded(store_path: str, epoch: int) -> dict[str, fmt.Recorded]:
    """The store's record of its snapshot directories (empty if missing, damaged, or of another epoch)."""
    path = os.path.join(store_path, RECORD_FILE)
    try:
        with open(path, "rb") as f:
            recorded_epoch, snapshots = fmt.decode_record_file(f.read(1 << 20), path)
    except FileNotFoundError:
        return {}
    except (OSError, SyncStoreError) as error:
        log.warning("store %s: its snapshot record cannot be read and will be replaced: %s", store_path, error)
        return {}
    return snapshots if recorded_epoch == epoch else {}  # another epoch: recorded before the history was rewound


def _record(fs: FileSystem, store_path: str, dest: str, recorded: fmt.Recorded, epoch: int, file_mode: int) -> None:
    """Note in the store's ``SNAPSHOTS`` record that ``dest`` holds a snapshot at ``recorded.lsn`` (atomically replaced).

    Best effort: a process that may not write the store directory (a
    read-only operator) logs a warning; the snapshot itself is complete.
    Two processes recording at the same moment may lose one note (the
    last rename wins); the snapshot directories stay authoritative.
    """
    path, temp = os.path.join(store_path, RECORD_FILE), os.path.join(store_path, RECORD_TEMP)
    snapshots = _recorded(store_path, epoch)
    snapshots[dest] = recorded
    keep = dict(sorted(snapshots.items(), key=lambda item: item[1].lsn)[-_RECORD_KEEP:])
    try:
        fd = _layout.create_file(fs, temp, os.O_WRONLY | os.O_TRUNC, file_mode)
        try:
            fs.pwrite(fd, fmt.encode_record_file(epoch, keep), 0)
            fs.fsync(fd)
        finally:
            fs.close(fd)
        fs.rename(temp, path)
        fs.fsync_dir(store_path)
    except OSError as error:
        log.warning("store %s: could not record the snapshot in %s (%s); it is complete in %s", store_path, RECORD_FILE, error, dest)


def newest_snapshot(store_path: str | os.PathLike[str]) -> tuple[int, str] | None:
    """(LSN, directory) of the newest snapshot written from the store at ``store_path``, or None.

    From the store's record of where its snapshots went, each directory's
    manifest read again (a directory that is gone, damaged, or holds
    another history is skipped), and only snapshots of the store's current
    epoch.  This is what ``SnapshotRequired`` names.
    """
    store = os.fspath(store_path)
    path = os.path.join(store, RECORD_FILE)
    try:
        with open(path, "rb") as f:
            epoch, snapshots = fmt.decode_record_file(f.read(1 << 20), path)
        current = _layout.read_marker(store)
    except (OSError, SyncStoreError):
        return None
    if epoch != current.epoch:
        return None
    best: tuple[int, str] | None = None
    for directory in snapshots:
        try:
            manifest = read_manifest(directory)
        except (OSError, SyncStoreError):
            continue
        if manifest is None or manifest.epoch != current.epoch or manifest.replica_id != current.replica_id:
            continue
        lsn = manifest.chain[-1].lsn
        if best is None or lsn > best[0]:
            best = (lsn, directory)
    return best

