"""``syncstore.restore``: build a new store from a snapshot chain (a base and the deltas up to an LSN).

Check everything, then build beside, then rename:

1. The arguments, and the target path (missing, or an empty directory).
2. The snapshot directory, as untrusted input: the manifest's CRC and chain,
   each needed file's name (a plain snapshot file name, resolving -- symlinks
   followed -- to a regular file inside the directory), size, header, every
   block's CRC, every row, the trailer, and the checksums and counts the
   manifest holds.  Any failure raises before anything is written.
3. Build the store in a temporary directory beside ``path``: the marker (a new
   epoch, or the source's with ``follower=True``), ``wal/`` whose first
   segment starts at LSN + 1, and the LMDB ``state/`` with every row applied in
   order and ``applied_lsn`` = LSN; then ``State.check`` -- the restored state
   must satisfy every invariant of a store.
4. Make it durable and rename it to ``path``.  Any failure removes the
   temporary directory: a failed restore leaves nothing at ``path``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from collections.abc import Iterable
from typing import Any

import lmdb

from . import _layout
from ._codec import pack_u64
from ._fileio import OS_FS, FileSystem
from ._ids import MAX_REPLICA
from ._layout import DEFAULT_FILE_MODE, Marker
from ._snapdir import SnapshotInfo, entry_path, io_error, read_blocks, read_manifest
from ._snapformat import DB_NAMES, DELETE, DUP_DBS, ChainEntry, Manifest, Row
from .errors import InvalidArgument, LayoutError, StoreFull, StoreNotFound, SyncStoreError
from .state import APPLIED_KEY, LAST_ID_KEY, State
from .wal import WriteAheadLog

__all__ = ["restore"]

log = logging.getLogger("syncstore.snapshot")

#: Rows per LMDB write transaction of a restore (bounds the dirty pages one holds in memory).
_TXN_ROWS = 100_000
_MIN_MAP = 64 << 30  # as a new store's default map: virtual, the file grows as used


def restore(
    snapshot_dir: str | os.PathLike[str],
    path: str | os.PathLike[str],
    lsn: int | None = None,
    follower: bool = False,
    *,
    replica_id: int | None = None,
    fs: FileSystem = OS_FS,
) -> SnapshotInfo:
    """Build a new store at ``path`` from the snapshots in ``snapshot_dir`` (``syncstore.restore``).

    The store holds exactly the state of the snapshot at ``lsn`` (default:
    the newest), which must be the LSN of a snapshot of the chain
    (:class:`InvalidArgument` lists them).  Its log continues at ``lsn + 1``.
    It gets a new epoch -- restoring rewinds history, so clients holding
    cursors of the source get a reset page -- or, with ``follower=True``,
    the source store's epoch (a follower continues its leader's history).
    ``replica_id`` defaults to the source's; give a restored copy that will
    accept writes beside its source a replica id of its own.

    ``path`` must not exist or be an empty directory.  Everything in
    ``snapshot_dir`` is checked before anything is written
    (:class:`CorruptionError` names the file and offset of the first damage,
    or the manifest entry that names a file outside the directory); a
    failure at any point leaves nothing at ``path``.  Returns the info of the
    snapshot restored.
    """
    directory, target = _check_paths(snapshot_dir, path)
    if type(follower) is not bool:
        raise InvalidArgument(f"follower must be True or False, got {follower!r}", key="follower")
    if replica_id is not None and (type(replica_id) is not int or not 0 <= replica_id <= MAX_REPLICA):
        raise InvalidArgument(f"replica_id must be an int in 0..{MAX_REPLICA} or None, got {replica_id!r}", key="replica_id")
    try:
        return _restore(directory, target, lsn, follower, replica_id, fs)
    except OSError as error:
        raise io_error(error, "restoring snapshots", directory, "nothing was left at the target") from error


def _restore(directory: str, target: str, lsn: int | None, follower: bool, replica_id: int | None, fs: FileSystem) -> SnapshotInfo:
    # Shared flock on the directory: a snapshot being written into it (which holds it exclusively, and may
    # replace the chain and remove its files) finishes first, and none starts while this restore reads it.
    lock = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(lock, fcntl.LOCK_SH)
        return _restore_locked(directory, target, lsn, follower, replica_id, fs)
    finally:
        os.close(lock)


def _restore_locked(directory: str, target: str, lsn: int | None, follower: bool, replica_id: int | None, fs: FileSystem) -> SnapshotInfo:
    manifest = read_manifest(directory)
    if manifest is None:
        raise StoreNotFound(f"{directory} holds no snapshot (no MANIFEST)", path=directory, hint="pass the directory that Store.snapshot wrote into")
    chain = _chain_upto(manifest, lsn, directory)
    paths = [entry_path(directory, entry) for entry in chain]  # every name resolves inside the directory
    file_bytes = 0
    for file, entry in zip(paths, chain):  # every byte checked, nothing written yet
        for _rows in read_blocks(file, entry, manifest):
            pass
        file_bytes += entry.size
    epoch = manifest.epoch if follower else _layout.new_epoch()
    rid = manifest.replica_id if replica_id is None else replica_id
    _build(target, zip(paths, chain), manifest, chain[-1], Marker(rid, epoch, follower=follower), file_bytes, fs)
    log.info("restored %s from %s: LSN %d (%d files), epoch %d%s", target, directory, chain[-1].lsn, len(chain), epoch, " (the source's: a follower)" if follower else "")
    return SnapshotInfo.of(directory, chain[-1])


def _check_paths(snapshot_dir: object, path: object) -> tuple[str, str]:
    for name, value in (("snapshot_dir", snapshot_dir), ("path", path)):
        if not isinstance(value, (str, os.PathLike)) or not isinstance(os.fspath(value), str) or not os.fspath(value):
            raise InvalidArgument(f"{name} must name a directory, got {value!r}", key=name)
    directory = os.path.abspath(os.fspath(snapshot_dir))  # type: ignore[call-overload]
    target = os.path.abspath(os.fspath(path))  # type: ignore[call-overload]
    if not os.path.isdir(directory):
        raise StoreNotFound(f"no snapshot directory at {directory}", path=directory, hint="pass the directory that Store.snapshot wrote into")
    if os.path.lexists(target):
        if not os.path.isdir(target) or os.path.islink(target):
            raise InvalidArgument(f"{target} exists and is not a directory", path=target, key="path", hint="restore into a new or empty directory; nothing was written")
        if os.listdir(target):
            raise InvalidArgument(f"{target} is not empty", path=target, key="path", hint="restore into a new or empty directory; nothing was written")
    return directory, target


def _chain_upto(manifest: Manifest, lsn: object, directory: str) -> tuple[ChainEntry, ...]:
    """The base and the deltas up to the snapshot at ``lsn`` (None: the newest)."""
    lsns = [entry.lsn for entry in manifest.chain]
    if lsn is None:
        return manifest.chain
    if type(lsn) is int and lsn in lsns:
        return manifest.chain[: lsns.index(lsn) + 1]
    raise InvalidArgument(
        f"lsn must be the LSN of a snapshot in {directory}, got {lsn!r}; the chain holds LSNs {', '.join(map(str, lsns))}",
        key="lsn",
        hint="pick one of those (or leave lsn out -- no --lsn on the command line -- for the newest); nothing was written",
    )


def _build(target: str, files: Iterable[tuple[str, ChainEntry]], manifest: Manifest, last: ChainEntry, marker: Marker, file_bytes: int, fs: FileSystem) -> None:
    """Build the store in a temporary directory beside ``target``, then rename it there."""
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    temp = os.path.join(parent, f".{os.path.basename(target)}.restoring-{os.getpid()}")
    if os.path.lexists(temp):
        shutil.rmtree(temp)  # a crashed restore of this same process id: nothing of ours uses it
    mode = DEFAULT_FILE_MODE
    _layout.make_dir(temp, mode)
    try:
        _layout.write_marker(temp, marker, mode, fs)
        wal_dir, lmdb_dir = os.path.join(temp, _layout.WAL_DIR), os.path.join(temp, _layout.STATE_DIR)
        _layout.make_dir(wal_dir, mode)
        WriteAheadLog.open(wal_dir, next_lsn=last.lsn + 1, fs=fs, file_mode=mode).close()  # the first segment, durable
        _layout.make_dir(lmdb_dir, mode)
        state = State(lmdb_dir, readonly=False, map_size=max(_MIN_MAP, 16 * file_bytes), replica_id=marker.replica_id, file_mode=mode)
        try:
            _fill(state, files, manifest, last)
            state.check(last.lsn)
        finally:
            state.close()  # syncs
        fs.fsync_dir(lmdb_dir)
        fs.fsync_dir(temp)
        try:
            if os.path.isdir(target):
                os.rmdir(target)  # empty (checked): replaced by the rename
            fs.rename(temp, target)
        except OSError as error:
            raise LayoutError(
                f"cannot put the restored store at {target}: {error.strerror}",
                path=target,
                hint="restore into a new directory on the same file system as its parent (not a mount point itself); nothing was left there",
            ) from error
        fs.fsync_dir(parent)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def _fill(state: State, files: Iterable[tuple[str, ChainEntry]], manifest: Manifest, last: ChainEntry) -> None:
    """Apply every row of every file in order, in write transactions of bounded size; then the meta keys."""
    env = state.env
    dbs = {db_id: getattr(state, name) for db_id, name in DB_NAMES.items()}
    dup_ids = {db_id for db_id, name in DB_NAMES.items() if name in DUP_DBS}
    txn = env.begin(write=True)
    try:
        pending = 0
        for file, entry in files:
            for rows in read_blocks(file, entry, manifest):
                _apply_rows(txn, dbs, dup_ids, rows)
                pending += len(rows)
                if pending >= _TXN_ROWS:
                    txn.commit()
                    txn, pending = env.begin(write=True), 0
        if last.lsn:  # a store that never applied a record has no applied_lsn key (it reads as 0)
            txn.put(APPLIED_KEY, pack_u64(last.lsn), db=state.meta)
        if last.last_msg_id is not None:  # msg_id 0 exists; None: the source had applied no message
            txn.put(LAST_ID_KEY, pack_u64(last.last_msg_id), db=state.meta)
        txn.commit()
    except lmdb.MapFullError as error:
        txn.abort()
        raise StoreFull(f"the restored state does not fit its LMDB map: {error}", path=state.path, hint="free disk space; nothing was left at the target") from error
    except lmdb.Error as error:
        txn.abort()
        raise SyncStoreError(f"writing the restored state failed: {error}", path=state.path, hint="check the disk; nothing was left at the target") from error
    except BaseException:
        txn.abort()
        raise


def _apply_rows(txn: lmdb.Transaction, dbs: dict[int, Any], dup_ids: set[int], rows: list[Row]) -> None:
    """Apply ``rows`` in order: runs of puts into one database with one ``putmulti``, deletes one by one."""
    start, count = 0, len(rows)
    while start < count:
        op, db_id = rows[start][0], rows[start][1]
        end = start + 1
        while end < count and rows[end][0] == op and rows[end][1] == db_id:
            end += 1
        cursor = txn.cursor(db=dbs[db_id])
        dup = db_id in dup_ids
        if op == DELETE:
            for _op, _db, key, value in rows[start:end]:
                if (cursor.set_key_dup(key, value) if dup else cursor.set_key(key)):
                    cursor.delete()
        else:
            cursor.putmulti([(key, value) for _op, _db, key, value in rows[start:end]], dupdata=dup, overwrite=True)
        start = end

