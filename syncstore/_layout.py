"""The store directory: its marker file, private files and directories, locks, and
what a path holds before anything is opened.

A store directory (docs/format.md)::

    <path>/
      SYNCSTORE       the marker (below): written first, atomically, when the store is created
      LOCK            "pid=... host=... cmd=..." of the writer holding the store (flock(2)-ed)
      wal/            write-ahead log segments (syncstore.wal)
      state/          the LMDB environment (syncstore.state)

Marker file ``SYNCSTORE`` (28 bytes; integers unsigned big-endian)::

    offset  size  field
    0       8     magic b"SSTORE\\r\\n" (the CR/LF catch text-mode copies)
    8       2     marker format version, 1
    10      2     replica id, 0..1023 (fixed when the store is created)
    12      4     reserved, 0
    16      8     epoch: a random 64-bit id of this store's history, made at
                  creation and replaced by anything that rewinds history (a
                  restore); clients keep it with their cursors
    24      4     CRC-32C of bytes 0..23

The marker makes "is this a store?" a question with an answer: a mistyped
path or an unmounted volume is not silently turned into a fresh store, and a
directory that holds something else is never adopted.  It is written to
``SYNCSTORE.tmp``, fsynced, renamed and the directory fsynced, so a crash
leaves either no marker (a directory holding only the temp file counts as
empty) or a whole one.

Private files: a store holds private messages, so it is created private
whatever the umask -- directories 0700, files 0600 (or the ``file_mode`` the
caller chose to let an operators' group read, 0640, with directories 0750).
The umask can only remove bits, so modes are set explicitly (``fchmod``/
``chmod``) after creation.  Every file the engine creates later (WAL segments,
archives, snapshots) goes through :func:`create_file` and :func:`make_dir`.

Locks: the writer holds ``flock(LOCK_EX)`` on ``LOCK`` for the life of the
store.  While it opens (validating before it may change anything) it also
holds ``flock(LOCK_EX)`` on the store *directory*, which needs no file to be
created: a refused open leaves the directory as it found it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import secrets
import socket
import stat
import struct
import sys
from dataclasses import dataclass

from crc32c import crc32c

from ._fileio import OS_FS, FileSystem
from .errors import CorruptionError, InvalidArgument, LayoutError, PermissionDenied, StoreLocked, StoreNotFound

__all__ = [
    "MARKER",
    "MARKER_TEMP",
    "LOCK_FILE",
    "WAL_DIR",
    "STATE_DIR",
    "DEFAULT_FILE_MODE",
    "Marker",
    "Found",
    "encode_marker",
    "decode_marker",
    "read_marker",
    "write_marker",
    "new_epoch",
    "renew_epoch",
    "check_file_mode",
    "dir_mode",
    "make_dir",
    "create_file",
    "store_file_mode",
    "inspect",
    "check_access",
    "exposed_entries",
    "lock_directory",
    "hold_lock_file",
    "write_holder",
    "permission_denied",
    "is_empty_dir",
    "LOST_FOUND",
]

log = logging.getLogger("syncstore.layout")

MARKER = "SYNCSTORE"
MARKER_TEMP = "SYNCSTORE.tmp"
LOCK_FILE = "LOCK"
WAL_DIR = "wal"
STATE_DIR = "state"

MARKER_MAGIC = b"SSTORE\r\n"
MARKER_VERSION = 1
MARKER_BODY_FMT = ">8sHHIQ"  # magic, version, replica id, flags, epoch (CRC follows)
MARKER_BODY_SIZE = 24
assert struct.calcsize(MARKER_BODY_FMT) == MARKER_BODY_SIZE
MARKER_CRC_FMT = ">I"
MARKER_SIZE = MARKER_BODY_SIZE + struct.calcsize(MARKER_CRC_FMT)
assert MARKER_SIZE == 28
_marker = struct.Struct(MARKER_BODY_FMT)
_marker_crc = struct.Struct(MARKER_CRC_FMT)
#: Marker flag bit: the store is a follower (takes only its leader's changes; ``promote()`` clears it).
FLAG_FOLLOWER = 1
_KNOWN_FLAGS = FLAG_FOLLOWER
_MAX_REPLICA = 1023  # as syncstore._ids.MAX_REPLICA (not imported: the layout sits below the id module)

DEFAULT_FILE_MODE = 0o600
_ALLOWED_MODE_BITS = 0o660  # owner rw (required) and, optionally, group r/w; never others, never x


# --- the marker -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Marker:
    """The decoded store marker."""

    replica_id: int
    epoch: int
    version: int = MARKER_VERSION
    follower: bool = False  # flag bit 0


def encode_marker(marker: Marker) -> bytes:
    """The 28 bytes of ``marker``."""
    body = _marker.pack(MARKER_MAGIC, marker.version, marker.replica_id, FLAG_FOLLOWER if marker.follower else 0, marker.epoch)
    return body + _marker_crc.pack(crc32c(body))


def decode_marker(data: bytes, path: str | None = None) -> Marker:
    """Decode a marker; :class:`CorruptionError` (with the offset of the failed check) if it is not one.

    Checked in order: magic (offset 0), version (8), length (28), CRC (24),
    then the fields (reserved at 12, replica id at 10).
    """
    if data[:8] != MARKER_MAGIC:
        raise CorruptionError("the store marker does not start with the marker magic", path=path, offset=0)
    if len(data) >= 10 and struct.unpack_from(">H", data, 8)[0] != MARKER_VERSION:
        version = struct.unpack_from(">H", data, 8)[0]
        raise CorruptionError(
            f"store marker format version {version} is not supported (this syncstore reads version {MARKER_VERSION})",
            path=path,
            offset=8,
            hint="open the store with the syncstore version that wrote it",
        )
    if len(data) != MARKER_SIZE:
        raise CorruptionError(f"the store marker is {len(data)} bytes, not {MARKER_SIZE}", path=path, offset=min(len(data), MARKER_SIZE))
    (stored,) = _marker_crc.unpack_from(data, MARKER_BODY_SIZE)
    if stored != crc32c(data[:MARKER_BODY_SIZE]):
        raise CorruptionError("the store marker fails its CRC-32C", path=path, offset=MARKER_BODY_SIZE)
    _magic, version, replica_id, flags, epoch = _marker.unpack_from(data)
    if flags & ~_KNOWN_FLAGS:
        raise CorruptionError(
            f"the store marker has flags {flags:#x}, of which this syncstore knows only {_KNOWN_FLAGS:#x}",
            path=path,
            offset=12,
            hint="open the store with the syncstore version that wrote it",
        )
    if replica_id > _MAX_REPLICA:
        raise CorruptionError(f"the store marker names replica id {replica_id}, beyond {_MAX_REPLICA}", path=path, offset=10)
    return Marker(replica_id, epoch, version, follower=bool(flags & FLAG_FOLLOWER))


def read_marker(store: str, fs: FileSystem = OS_FS) -> Marker:
    """The marker of the store in directory ``store``."""
    path = os.path.join(store, MARKER)
    return decode_marker(fs.read_file(path), path)


def write_marker(store: str, marker: Marker, file_mode: int, fs: FileSystem = OS_FS) -> None:
    """Write the marker atomically (:func:`write_atomically`)."""
    write_atomically(store, MARKER, encode_marker(marker), file_mode, fs, temp_name=MARKER_TEMP)


def write_atomically(directory: str, name: str, data: bytes, file_mode: int, fs: FileSystem = OS_FS, *, temp_name: str | None = None) -> None:
    """Replace ``directory/name`` with ``data`` atomically: temp file, fsync, rename over, fsync the directory.

    A crash leaves the old file or the new one, never a mix; at worst a
    leftover temp file (``name + ".tmp"`` unless ``temp_name`` is given).
    """
    temp, final = os.path.join(directory, temp_name or name + ".tmp"), os.path.join(directory, name)
    fd = create_file(fs, temp, os.O_WRONLY | os.O_TRUNC, file_mode)
    try:
        fs.pwrite(fd, data, 0)
        fs.fsync(fd)
    finally:
        fs.close(fd)
    fs.rename(temp, final)
    fs.fsync_dir(directory)


def new_epoch() -> int:
    """A fresh random epoch (64 bits from the OS's CSPRNG; never 0, which no store has)."""
    while True:
        epoch = secrets.randbits(64)
        if epoch:
            return epoch


def renew_epoch(store: str | os.PathLike[str], fs: FileSystem = OS_FS) -> int:
    """Give the closed store in directory ``store`` a new epoch and return it (``syncstore.renew_epoch``).

    Anything that rewinds the store's history -- restoring an older copy --
    must call this before the store serves clients again: a client holding
    a cursor of the old history then gets a reset page (``reset_reason ==
    "epoch"``) instead of silently missing what the rewind took back.
    Raises :class:`InvalidArgument` for an empty path, :class:`StoreLocked`
    if the store is open, :class:`StoreNotFound` if there is no store
    marker, :class:`CorruptionError` if the marker is damaged; the marker is
    then unchanged.
    """
    if not isinstance(store, (str, os.PathLike)) or not os.fspath(store):
        raise InvalidArgument(f"renew_epoch needs the path of a store directory, got {store!r}", key="store")
    store = os.fspath(store)
    if not os.path.isfile(os.path.join(store, MARKER)):
        raise StoreNotFound(
            f"no store at {store}: there is no {MARKER} marker",
            path=store,
            hint="pass the directory of a store (one that syncstore.open has opened as a writer)",
        )
    try:
        dir_fd = lock_directory(store)
    except StoreLocked as error:
        raise StoreLocked(error.message, holder=error.holder, path=error.path, hint="close the store first: an epoch is renewed on a closed store") from None
    try:
        try:
            lock_fd = hold_lock_file(store, create=False)
        except StoreLocked as error:
            raise StoreLocked(error.message, holder=error.holder, path=error.path, hint="close the store first: an epoch is renewed on a closed store") from None
        try:
            marker = read_marker(store, fs)
            renewed = dataclasses.replace(marker, epoch=new_epoch())
            write_marker(store, renewed, store_file_mode(store), fs)
        finally:
            if lock_fd >= 0:
                os.close(lock_fd)
    finally:
        os.close(dir_fd)
    log.info("store %s has a new epoch %d (was %d): clients will resync", store, renewed.epoch, marker.epoch)
    return renewed.epoch


# --- private files ----------------------------------------------------------------------


def check_file_mode(mode: object) -> int:
    """``mode`` if it is a valid ``file_mode`` (0600, 0640 or 0660), else :class:`InvalidArgument`."""
    if type(mode) is not int or mode not in (0o600, 0o640, 0o660):
        shown = f"{mode:#o}" if type(mode) is int else repr(mode)
        raise InvalidArgument(
            f"file_mode must be 0o600, or 0o640/0o660 to let the files' group read/write, got {shown}",
            key="file_mode",
            hint="the owner needs read and write; others get nothing (private messages)",
        )
    return mode  # type: ignore[return-value]


def dir_mode(file_mode: int) -> int:
    """The mode of a store directory whose files have ``file_mode``: x wherever r is (0600 -> 0700, 0640 -> 0750)."""
    return file_mode | (file_mode & 0o444) >> 2


def make_dir(path: str, file_mode: int) -> None:
    """Create directory ``path`` (not its parents) with the mode matching ``file_mode``, whatever the umask."""
    mode = dir_mode(file_mode)
    try:
        os.mkdir(path, mode)
    except PermissionError as error:
        parent = os.path.dirname(os.path.abspath(path))
        raise permission_denied(PermissionError(error.errno, error.strerror, parent), f"write and search (-wx) access to create the store directory {path} in it") from None
    except FileNotFoundError:
        raise LayoutError(f"cannot create the store directory {path}: its parent does not exist and could not be made", path=path) from None
    os.chmod(path, mode)


def apply_file_mode(store: str, file_mode: int) -> None:
    """Give every directory and file of an existing store the modes matching ``file_mode`` (``open(file_mode=...)``)."""
    directories = [store, os.path.join(store, WAL_DIR), os.path.join(store, STATE_DIR)]
    for directory in directories:
        os.chmod(directory, dir_mode(file_mode))
        for name in os.listdir(directory):
            entry = os.path.join(directory, name)
            if os.path.isfile(entry) and not os.path.islink(entry):
                os.chmod(entry, file_mode)


def create_file(fs: FileSystem, path: str, flags: int, file_mode: int) -> int:
    """Open ``path`` with ``O_CREAT`` (plus ``flags``) through ``fs``; set ``file_mode`` whatever the umask.

    The one way syncstore creates a file, so that every file of a store
    (segments, marker, later archives and snapshots) is private.
    """
    fd = fs.open(path, flags | os.O_CREAT, file_mode)
    try:
        os.fchmod(fd, file_mode)
    except BaseException:
        fs.close(fd)
        raise
    return fd


def store_file_mode(store: str) -> int:
    """The file mode for new files of an existing store: its marker's group bits (an operator may
    have chmod-ed it to share with a group), never any bit for others; 0600 without a marker."""
    try:
        return stat.S_IMODE(os.stat(os.path.join(store, MARKER)).st_mode) & _ALLOWED_MODE_BITS | 0o600
    except FileNotFoundError:
        return DEFAULT_FILE_MODE


def exposed_entries(store: str) -> list[str]:
    """Paths in the store (itself, its files, ``wal/`` and ``state/`` and their files) that other users may access."""
    exposed = []
    for directory in (store, os.path.join(store, WAL_DIR), os.path.join(store, STATE_DIR)):
        try:
            names = os.listdir(directory)
            if stat.S_IMODE(os.stat(directory).st_mode) & 0o007:
                exposed.append(directory)
        except OSError:
            continue
        for name in sorted(names):
            path = os.path.join(directory, name)
            try:
                info = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode) and info.st_mode & 0o007:
                exposed.append(path)
    return exposed


# --- what a path holds ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Found:
    """What :func:`inspect` found at a store path.

    ``kind``: ``"missing"`` (no such directory), ``"empty"`` (nothing, or only
    our temp marker: a crash while creating the store), ``"store"`` (has the
    marker) or ``"legacy"`` (a store written before the marker existed:
    ``state/data.mdb`` and segment files in ``wal/``).  ``temp_marker``: a
    temp marker was left behind.
    """

    kind: str
    temp_marker: bool = False


def _is_segment_name(name: str) -> bool:
    return len(name) == 28 and name.startswith("wal-") and name.endswith(".log") and name[4:24].isascii() and name[4:24].isdigit()


def permission_denied(error: OSError, access: str) -> PermissionDenied:
    """The :class:`PermissionDenied` for ``error`` (EACCES/EPERM), naming its path, the ``access`` needed and the path's owner and mode."""
    path = error.filename if isinstance(error.filename, str) else None
    owner = ""
    if path is not None:
        with contextlib.suppress(OSError):
            info = os.stat(path)
            owner = f"; it is owned by uid {info.st_uid}, gid {info.st_gid}, mode {stat.S_IMODE(info.st_mode):04o}"
    return PermissionDenied(f"permission denied: {path} needs {access} (running as uid {os.geteuid()}{owner})", path=path)


def inspect(path: str) -> Found:
    """Classify ``path`` without changing anything.

    Raises :class:`InvalidArgument` if it is not a directory,
    :class:`LayoutError` for a non-empty directory that is not a store or an
    entry of the wrong kind, :class:`PermissionDenied` if it cannot be read.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return Found("missing")
    except NotADirectoryError:
        raise LayoutError(f"a component of {path} is a file, not a directory", path=path) from None
    except PermissionError as error:
        raise permission_denied(error, "search (x) access to every directory above it") from None
    if not stat.S_ISDIR(info.st_mode):
        raise InvalidArgument(f"{path} exists and is not a directory", path=path, key="path")
    try:
        names = set(os.listdir(path))
    except PermissionError as error:
        raise permission_denied(error, "read and search (r-x) access") from None
    temp = MARKER_TEMP in names
    names.discard(MARKER_TEMP)
    for name, want_dir in ((MARKER, False), (LOCK_FILE, False), (WAL_DIR, True), (STATE_DIR, True)):
        if name in names:
            entry = os.path.join(path, name)
            is_dir = os.path.isdir(entry)  # a symlink to a directory (the WAL on another disk) is fine
            if want_dir and not is_dir:
                raise LayoutError(f"{entry} is not a directory: a store keeps its {'write-ahead log' if name == WAL_DIR else 'LMDB state'} there", path=entry)
            if not want_dir and not os.path.isfile(entry):
                raise LayoutError(f"{entry} is not a regular file", path=entry)
    if MARKER in names:
        return Found("store", temp)
    if not names or all(name in (WAL_DIR, STATE_DIR) and is_empty_dir(os.path.join(path, name)) for name in names):
        # Empty -- or holding only empty wal/ and state/ directories: mount points
        # prepared for a new store (the WAL on its own disk).
        return Found("empty", temp)
    if _looks_legacy(path, names):
        return Found("legacy", temp)
    shown = ", ".join(sorted(names)[:6]) + (", ..." if len(names) > 6 else "")
    raise LayoutError(
        f"{path} is not empty and is not a syncstore store (no {MARKER} marker; it holds: {shown})",
        path=path,
    )


LOST_FOUND = "lost+found"  # what mkfs puts at the root of a volume mounted as wal/ or state/


def is_empty_dir(path: str) -> bool:
    """True for a directory holding nothing (or only the ``lost+found`` of a volume mounted there)."""
    try:
        return all(name == LOST_FOUND and os.path.isdir(os.path.join(path, name)) for name in os.listdir(path))
    except PermissionError as error:
        raise permission_denied(error, "read and search (r-x) access") from None


def _looks_legacy(path: str, names: set[str]) -> bool:
    """A store written before the marker existed: ``state/data.mdb`` and WAL segment files (their headers are validated by recovery)."""
    if WAL_DIR not in names or STATE_DIR not in names:
        return False
    if not os.path.isfile(os.path.join(path, STATE_DIR, "data.mdb")):
        return False
    try:
        return any(_is_segment_name(name) for name in os.listdir(os.path.join(path, WAL_DIR)))
    except PermissionError as error:
        raise permission_denied(error, "read and search (r-x) access") from None


def check_access(store: str, *, write: bool) -> None:
    """Raise :class:`PermissionDenied` naming the first entry of the store this process cannot use as it must.

    A writer needs read, write and search access to the store directory,
    ``wal/`` and ``state/``, read and write access to every segment, ``LOCK``
    and LMDB's files, and read access to the marker.  A read-only view needs
    read and search access to the store directory and ``state/`` and read
    access to the marker and ``data.mdb`` (``lock.mdb`` decides between a
    reader slot and the lock-free mode).  Checked up front, so that an open
    refused for lack of access has changed nothing.
    """
    rw, r = os.R_OK | os.W_OK, os.R_OK
    wal, lmdb_dir = os.path.join(store, WAL_DIR), os.path.join(store, STATE_DIR)
    needs: list[tuple[str, int]] = [(store, (rw if write else r) | os.X_OK), (os.path.join(store, MARKER), r)]
    if write:
        needs += [(os.path.join(store, LOCK_FILE), rw), (wal, rw | os.X_OK)]
        if os.access(wal, os.R_OK | os.X_OK):
            needs += [(os.path.join(wal, name), rw) for name in sorted(os.listdir(wal)) if _is_segment_name(name)]
    needs += [(lmdb_dir, (rw if write else r) | os.X_OK), (os.path.join(lmdb_dir, "data.mdb"), rw if write else r)]
    if write:
        needs.append((os.path.join(lmdb_dir, "lock.mdb"), rw))
    for path, need in needs:
        if not os.path.lexists(path) or os.access(path, need):
            continue
        info = os.stat(path)
        words = {r: "read", rw: "read and write"}[need & rw]
        kind = "directory" if stat.S_ISDIR(info.st_mode) else "file"
        raise PermissionDenied(
            f"permission denied: {kind} {path} needs {words}{' and search' if need & os.X_OK else ''} access "
            f"(running as uid {os.geteuid()}; it is owned by uid {info.st_uid}, gid {info.st_gid}, mode {stat.S_IMODE(info.st_mode):04o})",
            path=path,
        )


# --- locks ------------------------------------------------------------------------------


def lock_directory(store: str, *, shared: bool = False) -> int:
    """``flock`` the store directory itself (exclusive, or shared); return the fd.

    Needs no file: held by a writer while it validates and opens, by a
    lock-free read-only view while it opens.  Raises :class:`StoreLocked` if
    another process holds it.
    """
    try:
        fd = os.open(store, os.O_RDONLY | os.O_DIRECTORY)
    except PermissionError as error:
        raise permission_denied(error, "read and search (r-x) access") from None
    except (FileNotFoundError, NotADirectoryError):
        raise StoreNotFound(f"no store at {store}", path=store) from None
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreLocked(
            "another process is opening the store (or holds it in a lock-free read-only view)",
            path=store,
            holder="a process opening the store",
            hint="try again once it has opened or closed",
        ) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def hold_lock_file(store: str, *, create: bool, file_mode: int = DEFAULT_FILE_MODE, shared: bool = False) -> int:
    """``flock`` ``LOCK`` (exclusive for a writer, shared for a lock-free view); return its fd, or -1 if it does not exist and ``create`` is false.

    Raises :class:`StoreLocked` naming the holder if another process holds it.
    """
    path = os.path.join(store, LOCK_FILE)
    flags = os.O_RDONLY if shared else os.O_RDWR
    try:
        if create:
            try:
                fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, file_mode)
                os.fchmod(fd, file_mode)
            except FileExistsError:
                fd = os.open(path, flags)
        else:
            fd = os.open(path, flags)
    except FileNotFoundError:
        return -1
    except PermissionError as error:
        raise permission_denied(error, "read access" if shared else "read and write access") from None
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        readers_only = False
        if not shared:
            try:  # held shared: only lock-free read-only views, no writer
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                readers_only = True
            except BlockingIOError:
                pass
        os.close(fd)
        if readers_only:
            raise StoreLocked(
                "lock-free read-only views hold the store",
                path=path,
                holder="read-only view(s) in lock-free mode",
                hint="close them first: without LMDB reader slots a writer could overwrite the pages they read",
            ) from None
        holder = _holder(store, "unknown")
        if shared:
            raise StoreLocked(
                f"a writer holds the store ({holder}), and this read-only view cannot take an LMDB reader slot "
                f"(no write access to {os.path.join(store, STATE_DIR, 'lock.mdb')})",
                path=path,
                holder=holder,
                hint="give this user write access to the lock file (file_mode=0o660 and its group), or read while no writer runs",
            ) from None
        raise StoreLocked(f"another writer holds the store: {holder}", path=path, holder=holder) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _holder(store: str, default: str) -> str:
    try:
        with open(os.path.join(store, LOCK_FILE), "rb") as f:
            return f.read(4096).decode("utf-8", "replace").strip() or default
    except OSError:
        return default


def write_holder(fd: int) -> None:
    """Record this process in the held ``LOCK`` file (``StoreLocked`` messages quote it)."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid={os.getpid()} host={socket.gethostname()} cmd={' '.join(sys.argv)[:200]}\n".encode(), 0)

