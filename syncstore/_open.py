"""Opening a store: create it, or validate an existing one, then repair, migrate, replay and start it.

One job: turn a directory into the running parts of an open store -- the held
lock, the recovered WAL, the LMDB state, the :class:`~syncstore._writer.Writer`
and the epoch -- or into a read-only view of its LMDB state.  Everything is
validated before anything is changed: a refused open leaves the tree exactly
as it found it.  The :class:`~syncstore.store.Store` facade validates the
options, calls :func:`open_writable` or :func:`open_view`, and owns what they
return (recorded in an :class:`Opened` as it is acquired, so that a failed
open releases exactly what it took).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable

from . import _bootstrap, _codec, _layout, _migrate
from ._codec import FRAME_HEAD_SIZE, FRAME_PREFIX_SIZE, RECORD_DELIVER
from ._fileio import FileSystem
from ._ids import MessageIds
from ._layout import DEFAULT_FILE_MODE, Found, Marker
from ._writer import Writer, _gc_paused
from .errors import CorruptionError, InvalidArgument, LayoutError, StoreNotFound
from .state import STATE_FORMAT, State, state_dir
from ._walread import segment_files
from .wal import FrameRun, WriteAheadLog, segment_name

__all__ = ["Opened", "open_writable", "open_view"]

# The facade's logger: what opening logs has always come from "syncstore.store".
log = logging.getLogger("syncstore.store")

_REPLAY_BATCH = 16_384  # records per LMDB transaction of the replay on open, as the applier's


class Opened:
    """What opening acquired, recorded as soon as it is acquired.

    The caller owns it: on success it holds the running store, and if
    opening raises, the caller releases whatever it holds so far.
    """

    __slots__ = ("lock_fd", "wal", "state", "writer", "epoch", "lock_free")

    def __init__(self) -> None:
        self.lock_fd = -1
        self.wal: WriteAheadLog | None = None
        self.state: State | None = None
        self.writer: Writer | None = None
        self.epoch = 0
        self.lock_free = False  # a read-only view without an LMDB reader slot (docs/reliability.md)


def open_writable(
    path: str,
    opened: Opened,
    *,
    create: bool,
    durability: str,
    replica_id: int,
    map_size: int,
    max_map_size: int | None,
    segment_bytes: int,
    file_mode: int | None,
    max_readers: int,
    dedup_window_ms: int,
    clock: Callable[[], int],
    fs: FileSystem,
    retain: Callable[[int], int],
    follower: bool = False,
) -> None:
    """Open (creating it if ``create``) the store at ``path`` for writing; fill ``opened``.

    ``follower``: open (or create) a follower; a store's role is in its
    marker, and opening it in the other role is refused.

    ``retain(applied)`` is the retention policy: up to which LSN WAL
    segments may be deleted (:meth:`syncstore.changelog.ChangeLog.retire_upto`).
    """
    found = _layout.inspect(path)
    if found.kind == "missing":
        if not create:
            raise StoreNotFound(f"no store at {path}: the directory does not exist", path=path)
        parent = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(parent, exist_ok=True)  # parents keep the default mode; the store itself is private
        except PermissionError as error:
            raise _layout.permission_denied(error, "write and search (-wx) access to create the directories above the store") from None
        except OSError as error:
            raise LayoutError(f"cannot create the directories above the store {path}: {error.strerror}", path=parent) from None
        with contextlib.suppress(FileExistsError):  # created meanwhile by another process: the lock decides
            _layout.make_dir(path, file_mode or DEFAULT_FILE_MODE)
    # Hold the directory while validating: nobody else opens or creates the store
    # meanwhile, and no LOCK file had to be created for it.
    dir_fd = _layout.lock_directory(path)
    try:
        found = _layout.inspect(path)  # again: another process may have created it
        if found.kind != "store" and found.kind != "legacy":
            if not create:
                raise StoreNotFound(f"no store at {path}: the directory is empty", path=path)
            _create(path, replica_id, file_mode or DEFAULT_FILE_MODE, fs, follower)
            found = Found("store")
        existing_mode = _layout.store_file_mode(path)
        _open_existing(
            path,
            opened,
            found,
            durability=durability,
            replica_id=replica_id,
            map_size=map_size,
            max_map_size=max_map_size,
            segment_bytes=segment_bytes,
            file_mode=file_mode or existing_mode,
            max_readers=max_readers,
            dedup_window_ms=dedup_window_ms,
            clock=clock,
            fs=fs,
            retain=retain,
            follower=follower,
        )
        if file_mode is not None and file_mode != existing_mode:  # opened fine: now share (or unshare) it all
            _layout.apply_file_mode(path, file_mode)
            log.info("store %s: files now mode %04o", path, file_mode)
    finally:
        os.close(dir_fd)


def _create(path: str, replica_id: int, file_mode: int, fs: FileSystem, follower: bool = False) -> None:
    """Start a new store: make the directory private and write the marker, first.

    The rest of creation -- the WAL directory and first segment, then the
    LMDB state, forced durable -- is what opening a store whose state was
    never initialised does (:func:`_open_existing`), so a crash anywhere in
    creation is finished by the next open.
    """
    # Private whatever the umask, or the mode of the empty directory (and the empty
    # wal/ and state/ mount points) we were given.
    for directory in (path, os.path.join(path, _layout.WAL_DIR), state_dir(path)):
        if os.path.isdir(directory):
            os.chmod(directory, _layout.dir_mode(file_mode))
    marker = Marker(replica_id, _layout.new_epoch(), follower=follower)
    _layout.write_marker(path, marker, file_mode, fs)
    log.info("created %s %s (replica %d, epoch %d)", "follower" if follower else "store", path, replica_id, marker.epoch)


def _open_existing(
    path: str,
    opened: Opened,
    found: Found,
    *,
    durability: str,
    replica_id: int,
    map_size: int,
    max_map_size: int | None,
    segment_bytes: int,
    file_mode: int,
    max_readers: int,
    dedup_window_ms: int,
    clock: Callable[[], int],
    fs: FileSystem,
    retain: Callable[[int], int],
    follower: bool = False,
) -> None:
    """Validate everything, then (and only then) repair, migrate, replay and start.

    Nothing before the "validated" line below writes a byte or creates a
    directory entry: a refused open leaves the tree as it found it.
    """
    wal_dir, lmdb_dir = os.path.join(path, _layout.WAL_DIR), state_dir(path)
    _layout.check_access(path, write=True)
    # A store's LOCK also keeps out writers of syncstore versions that flock only it.
    opened.lock_fd = _layout.hold_lock_file(path, create=False)
    marker = None if found.kind == "legacy" else _layout.read_marker(path, fs)
    if marker is not None and marker.follower != follower:
        raise InvalidArgument(
            f"this store is {'a follower' if marker.follower else 'a leader'}: open it with follower={marker.follower}",
            key="follower",
            hint="promote() turns a follower into a leader; a leader becomes a follower only by restoring a snapshot with follower=True"
            if marker.follower
            else "a leader becomes a follower only by restoring a snapshot with syncstore.restore(..., follower=True) into a new path",
        )
    if marker is not None and marker.replica_id != replica_id:
        raise InvalidArgument(
            f"this store was created with replica_id {marker.replica_id}, not {replica_id}",
            key="replica_id",
            hint=f"open it with replica_id={marker.replica_id}",
        )
    probe = _probe_state(_migrate.live_state_dir(path), map_size, max_map_size)
    legacy_format = probe.format if probe is not None and probe.legacy else None
    bootstrap = _bootstrap.progress(probe) if probe is not None and not probe.legacy else None
    if bootstrap is not None and bootstrap[2] == _bootstrap.COMPLETE:
        # A follower's bootstrap got its every row in but crashed before its log restarted at the
        # snapshot's LSN + 1: the log holds no frame by construction; finish the restart here.
        _restart_empty_log(wal_dir, bootstrap[0] + 1, fs)
    try:
        applied = probe.applied_lsn() if probe is not None else 0
        recorded = probe.replica_id() if probe is not None else None
        if recorded is not None and recorded != replica_id:
            if marker is not None:
                raise CorruptionError(
                    f"the store marker says replica {marker.replica_id} but the LMDB state says {recorded}",
                    path=lmdb_dir,
                    hint="the state belongs to another store; restore the store's own state directory",
                )
            raise InvalidArgument(
                f"this store was created with replica_id {recorded}, not {replica_id}", key="replica_id", hint=f"open it with replica_id={recorded}"
            )
        # One pass over the log: recovery verifies each segment's frames, and the records
        # replay will apply are checked there too (_ReplayCheck), while the segment is in memory.
        with _gc_paused, _ReplayCheck(probe) as check:  # the check keeps a head per user: keep the collector out
            wal = opened.wal = WriteAheadLog.recover(
                wal_dir,
                next_lsn=(bootstrap[0] if bootstrap is not None and bootstrap[2] == _bootstrap.COMPLETE else applied) + 1,
                fs=fs,
                segment_bytes=segment_bytes,
                sync_writes=durability == "sync",
                # An initialised state needs its log: missing evidence is corruption (but a finished bootstrap's was just emptied).
                existing=probe is not None and (bootstrap is None or bootstrap[2] != _bootstrap.COMPLETE),
                file_mode=file_mode,
                inspect=check,
            )
            check.raise_first()  # after recovery's own verdict, which comes first
    finally:
        if probe is not None:
            probe.close()
    if legacy_format is not None:  # validates the old state as it copies it; writes only state.migrating/
        log.warning("store %s: migrating its LMDB state from format %d to %d", path, legacy_format, STATE_FORMAT)
        _migrate.build(path, map_size=map_size, file_mode=file_mode, replica_id=replica_id)
    # --- validated: from here on, opening changes files ----------------------------
    if marker is None:
        marker = Marker(replica_id, _layout.new_epoch())
        _layout.write_marker(path, marker, file_mode, fs)
        log.warning("store %s predates the store marker: marker written (replica %d, epoch %d)", path, replica_id, marker.epoch)
    elif found.temp_marker:
        fs.unlink(os.path.join(path, _layout.MARKER_TEMP))  # a crashed epoch change; the marker itself is whole
    opened.epoch = marker.epoch
    if opened.lock_fd < 0:
        opened.lock_fd = _layout.hold_lock_file(path, create=True, file_mode=file_mode)
    _layout.write_holder(opened.lock_fd)
    # Creation order is marker, WAL (first segment durable), LMDB state (forced
    # durable): an initialised state therefore proves its log existed.  The
    # directories are missing only when creation never finished.
    _make_dir(path, wal_dir, file_mode, fs)
    wal.start()
    if legacy_format is not None:
        _migrate.swap(path, fs)
    else:
        _migrate.finish(path, fs)  # a migration a crash interrupted
    _make_dir(path, lmdb_dir, file_mode, fs)
    state = opened.state = State(
        lmdb_dir, readonly=False, map_size=map_size, max_map_size=max_map_size, file_mode=file_mode, replica_id=replica_id, max_readers=max_readers
    )
    if bootstrap is not None:
        if bootstrap[2] == _bootstrap.COMPLETE:
            _bootstrap.finish(state, bootstrap[0])
            applied = bootstrap[0]
            log.warning("store %s: finished a follower bootstrap from snapshot %d that a crash interrupted", path, bootstrap[0])
        else:
            _bootstrap.wipe(state)
            log.warning(
                "store %s: a follower bootstrap from snapshot %d was interrupted at chunk %d: its rows were removed; feed it again from 0",
                path,
                *bootstrap[:2],
            )
    if state.created:
        state.sync()
    elif state.replica_id() is None:  # a state made before replica ids were recorded with the format
        state.set_replica_id(replica_id)
    # Recovered frames may never have been fsynced ("none" mode before a crash):
    # make them durable before LMDB, which must never be ahead of the durable WAL, gets them.
    wal.sync()
    with _gc_paused:
        _replay(path, wal, state, applied)
    state.sync()
    wal.retire(retain(wal.end_lsn))
    ids = MessageIds(replica_id, clock, floor=state.last_msg_id())
    opened.writer = Writer(
        path,
        state,
        wal,
        ids,
        durability=durability,
        clock_ms=clock,
        dedup_window_ms=dedup_window_ms,
        retain=retain,
    )


def _restart_empty_log(wal_dir: str, first_lsn: int, fs: FileSystem) -> None:
    """Remove a follower's empty WAL segments so that recovery starts the log at ``first_lsn``.

    Refuses (:class:`CorruptionError`, nothing removed) if any segment holds
    a frame: a bootstrap only runs on a follower whose log is empty.
    """
    paths = [path for _first, path in segment_files(wal_dir)]
    if paths == [os.path.join(wal_dir, segment_name(first_lsn))]:
        return
    for path in paths:
        if fs.read_file(path)[_codec.SEGMENT_HEADER_SIZE :].strip(b"\0"):
            raise CorruptionError("a follower bootstrap was interrupted, but its WAL holds frames", path=path, offset=_codec.SEGMENT_HEADER_SIZE)
    for path in paths:
        fs.unlink(path)
    fs.fsync_dir(wal_dir)


def _make_dir(path: str, directory: str, file_mode: int, fs: FileSystem) -> None:
    """Create ``directory`` of the store at ``path`` if missing, and make its entry durable."""
    if not os.path.isdir(directory):
        _layout.make_dir(directory, file_mode)
        fs.fsync_dir(path)


def _probe_state(lmdb_dir: str, map_size: int, max_map_size: int | None) -> State | None:
    """The LMDB state opened read-only and lock-free (writing nothing), or None if it was never initialised.

    Lock-free is safe here: we hold the store, so no writer runs.
    """
    try:
        if os.path.getsize(os.path.join(lmdb_dir, "data.mdb")) == 0:
            return None  # created by LMDB, never written: a crash while creating the store
    except FileNotFoundError:
        return None
    probe = State(lmdb_dir, readonly=True, lock=False, map_size=map_size)
    if not probe.initialised:
        probe.close()
        return None
    used = (probe.env.info()["last_pgno"] + 1) * probe.env.stat()["psize"]
    if max_map_size is not None and used > max_map_size:
        probe.close()
        raise InvalidArgument(
            f"max_map_size={max_map_size} is smaller than the {used} bytes of data the store already holds",
            key="max_map_size",
            hint=f"open it with max_map_size >= {used}, or None (no limit)",
        )
    return probe


def open_view(path: str, opened: Opened, *, map_size: int, max_readers: int, fs: FileSystem) -> None:
    """A read-only view: the LMDB state only, with a reader slot -- or lock-free on files it may not write."""
    found = _layout.inspect(path)
    if found.kind in ("missing", "empty"):
        raise StoreNotFound(f"no store at {path}", path=path, hint="open it once without readonly=True to create it")
    if found.kind == "legacy":
        raise LayoutError(
            f"the store at {path} was written by a syncstore before the store marker",
            path=path,
            hint=f"open it once without readonly=True, or run `syncstore upgrade {path}`: a writer adds the marker and migrates its LMDB state to the current format; nothing was changed",
        )
    _layout.check_access(path, write=False)
    marker = _layout.read_marker(path, fs)
    lmdb_dir = _migrate.live_state_dir(path)
    data = os.path.join(lmdb_dir, "data.mdb")
    if not os.path.isfile(data) or os.path.getsize(data) == 0:
        raise StoreNotFound(f"the store at {path} was never completely created", path=path, hint="open it once without readonly=True to finish creating it")
    lock_file = os.path.join(lmdb_dir, "lock.mdb")
    usable = os.access(lock_file, os.R_OK | os.W_OK) if os.path.exists(lock_file) else os.access(lmdb_dir, os.W_OK | os.X_OK)
    if not usable:
        # No write access to LMDB's lock file, so no reader slot: a writer could reuse
        # the pages this view reads.  Hold the store shared instead, which keeps every
        # writer out while the view is open (and refuses if one runs now).
        dir_fd = _layout.lock_directory(path, shared=True)
        try:
            fd = _layout.hold_lock_file(path, create=False, shared=True)
            if fd < 0:  # no LOCK file yet: keep holding the directory itself
                fd, dir_fd = dir_fd, -1
            opened.lock_fd = fd
        finally:
            if dir_fd >= 0:
                os.close(dir_fd)
        opened.lock_free = True
        log.info("read-only view of %s in lock-free mode (no write access to %s): writers are kept out while it is open", path, lock_file)
    state = opened.state = State(lmdb_dir, readonly=True, lock=usable, map_size=map_size, max_readers=max_readers)
    if not state.initialised:
        raise StoreNotFound(f"the store at {path} was never completely created", path=path, hint="open it once without readonly=True to finish creating it")
    if state.legacy:
        raise LayoutError(
            f"the store at {path} has LMDB state format {state.format}; this syncstore reads format {STATE_FORMAT}",
            path=path,
            hint=f"migrate it once: open it without readonly=True, or run `syncstore upgrade {path}`; nothing was changed",
        )
    opened.epoch = marker.epoch


class _ReplayCheck:
    """The replay rule, checked on every WAL record after the applied LSN before anything is applied.

    A CRC-valid record of an unknown type, with no recipient (a DELIVER),
    with lengths that do not add up, or whose cursors do not densely
    continue its recipients' heads (the LMDB heads, then the records before
    it) cannot have been written by this store: it is corruption, reported
    with its file and frame offset.  Called by :meth:`WriteAheadLog.recover`
    with each segment's verified frames (``inspect``), so the log is read
    once for both; only the pairs of each record are decoded here, the rest
    when :func:`_replay` applies it.  The first violation is kept and raised
    by :meth:`raise_first` once recovery has finished: recovery's own errors
    (a gap, missing evidence) take precedence, as they did when this was a
    second pass.
    """

    def __init__(self, probe: State | None) -> None:
        self.heads: dict[int, int] = {}  # users' heads as of the records checked so far
        self.error: CorruptionError | None = None
        # The probe is lock-free and no writer runs: one read transaction for all head lookups.
        self._txn = probe.env.begin() if probe is not None else None
        self._head_of = probe.head_reader(self._txn) if probe is not None and self._txn is not None else (lambda uid: 0)

    def __enter__(self) -> _ReplayCheck:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._txn is not None:
            self._txn.abort()
            self._txn = None

    def raise_first(self) -> None:
        if self.error is not None:
            raise self.error

    def __call__(self, run: FrameRun) -> None:
        if self.error is not None:
            return  # the first violation is the one to report
        try:
            self._check(run)
        except CorruptionError as error:
            self.error = error

    def _check(self, run: FrameRun) -> None:
        path, data, offset, end, lsn = run
        heads, head_of = self.heads, self._head_of
        unpack_head, pairs_at = _codec.unpack_frame_head, _codec.deliver_pairs_at
        while offset < end:
            length, _crc, _lsn, rtype, _synced = unpack_head(data, offset)
            frame_end = offset + FRAME_PREFIX_SIZE + length
            if rtype != RECORD_DELIVER:  # rare: an unknown type or bad lengths raise, naming the file and offset
                _codec.decode_record(rtype, data[offset + FRAME_HEAD_SIZE : frame_end], lsn, path, offset)
            else:
                flat = pairs_at(data, offset + FRAME_HEAD_SIZE, frame_end, path, offset)
                if not flat:  # deliver() refuses an empty recipient list: no store of ours wrote this
                    raise CorruptionError(f"WAL record {lsn} delivers to no recipient", path=path, offset=offset)
                pairs = iter(flat)
                for uid, cursor in zip(pairs, pairs):
                    head = heads.get(uid)
                    if head is None:
                        head = head_of(uid)
                    if cursor != head + 1:
                        raise CorruptionError(f"WAL record {lsn} gives user {uid} cursor {cursor}, but the user's head is {head}", path=path, offset=offset)
                    heads[uid] = cursor
            offset = frame_end
            lsn += 1


def _replay(path: str, wal: WriteAheadLog, state: State, applied: int) -> None:
    """Apply the WAL records after ``applied`` (checked by :class:`_ReplayCheck`) to LMDB, in batches.

    Each record is decoded once, in place in its segment's data
    (``_codec.decode_frames``: a DELIVER directly, any other type through
    ``_codec.decode_record``).
    """
    batch: list[_codec.Record] = []  # across segments: a transaction per _REPLAY_BATCH records
    last = applied
    for segment, data, offset, end, lsn in wal.runs(applied):  # LSNs are dense: the k-th has LSN applied + k
        while offset < end:
            records, offset = _codec.decode_frames(data, offset, end, lsn, _REPLAY_BATCH - len(batch), segment)
            lsn += len(records)
            batch += records
            if len(batch) >= _REPLAY_BATCH:
                last += len(batch)
                state.apply(batch, last)
                batch = []
    if batch:
        last += len(batch)
        state.apply(batch, last)
    if last != applied:
        log.info("replayed WAL records %d..%d into %s", applied + 1, last, path)
