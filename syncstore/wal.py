"""The write-ahead log: segment files of CRC-framed records with dense LSNs.

The byte layout is in :mod:`syncstore._codec` and ``docs/format.md``.  This
module owns the files: recovery on open (truncating a torn tail, refusing to
open on corruption), appending grouped frames, ``fdatasync``, rotating to a new
segment and retiring segments nothing needs any more.

Segments are preallocated with ``posix_fallocate`` to their full size when
created, and frames are written with ``pwrite`` at the end of the valid
content: an ``fdatasync`` then has no block allocation or file-size change to
journal, which measured ~20 % faster per sync here (docs/benchmarks.md).  The
unwritten remainder reads as zeros, which recovery treats as the clean end.  It knows nothing of
messages or LMDB; group commit and durability policy live in the store.

Failure policy: a write that finds the disk full (ENOSPC from creating,
preallocating or writing a segment) raises :class:`StoreFull` and leaves the
log as it was, so it heals once space is back.  After any other failed write,
and after any failed ``fsync``/``fdatasync`` (ENOSPC included), the log is
*broken*: every later append or sync raises :class:`DurabilityError` until the
store is reopened.  A failed ``fsync`` must not be retried -- the kernel may
have dropped the dirty pages and a second call would falsely report success.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from . import _codec
from ._codec import FRAME_HEAD_SIZE, FRAME_LEAD_FMT, FRAME_LEAD_SIZE, FRAME_PREFIX_SIZE, SEGMENT_HEADER_SIZE, Frame
from ._fileio import OS_FS, FileSystem
from ._layout import DEFAULT_FILE_MODE, LOST_FOUND, create_file, permission_denied
from .errors import CorruptionError, DurabilityError, StoreFull, SyncStoreError

__all__ = ["WriteAheadLog", "FrameRun", "segment_name", "DEFAULT_SEGMENT_BYTES"]

log = logging.getLogger("syncstore.wal")

DEFAULT_SEGMENT_BYTES = 16 << 20
_LEAD = struct.Struct(FRAME_LEAD_FMT)
_TAIL_BLOCK = 1 << 20  # recovery checks a segment's zero tail in blocks of this many bytes
_PREFIX = "wal-"
_SUFFIX = ".log"


def segment_name(first_lsn: int) -> str:
    """File name of the segment whose first frame has LSN ``first_lsn`` (sorts by LSN)."""
    return f"{_PREFIX}{first_lsn:020d}{_SUFFIX}"


def _is_segment_name(name: str) -> bool:
    return len(name) == len(_PREFIX) + 20 + len(_SUFFIX) and name.startswith(_PREFIX) and name.endswith(_SUFFIX) and name[4:24].isascii() and name[4:24].isdigit()


def _segment_lsn(name: str) -> int:
    return int(name[len(_PREFIX) : len(_PREFIX) + 20])


class FrameRun(NamedTuple):
    """Frames ``first_lsn, first_lsn + 1, ...`` lying back to back in ``data[start:end]``, read from the segment ``path``.

    Their CRCs and LSNs were verified by recovery; read each frame's header
    with :func:`syncstore._codec.unpack_frame_head` (the next starts where it ends).
    """

    path: str
    data: bytes
    start: int
    end: int
    first_lsn: int


@dataclass(slots=True)
class _Segment:
    path: str
    first_lsn: int
    last_lsn: int  # first_lsn - 1 while empty
    size: int  # bytes of valid content (header + whole frames)


def _vouching_frame(data: bytes, start: int, bad_lsn: int) -> int | None:
    """Offset of a valid frame after ``start`` that proves frame ``bad_lsn`` was durable, or None.

    Every frame records the LSN up to which the log was synced when it was
    written.  A later valid frame whose synced LSN reaches ``bad_lsn`` proves
    the bad frame had been durable: it is corruption.  Without such a frame the
    damage lies in the unsynced tail -- a torn write, possibly with later pages
    of the same unsynced writes surviving a power loss out of order -- and the
    tail is truncated.  Rather than trying every byte offset, the search looks
    for the high bytes of plausible LSNs (at offset 8 of every frame).
    """
    # Only the written part can hold a frame; without this bound, the zero bytes
    # of a preallocated tail would all match the zero high bytes of small LSNs.  A
    # frame may itself end in zero bytes (an empty body, a synced LSN with zero low
    # bytes), so the search reaches one frame lead past the last non-zero byte.
    written = len(data.rstrip(b"\0"))
    end = min(len(data), written + FRAME_PREFIX_SIZE + FRAME_LEAD_SIZE)
    # A later frame's LSN can exceed bad_lsn by at most the number of frames that fit.
    highest = bad_lsn + (written - start) // (FRAME_PREFIX_SIZE + FRAME_LEAD_SIZE) + 1
    # The high 5 bytes of bad_lsn and of the next 2**24 LSNs (none beyond the 64-bit range).
    prefixes = {((bad_lsn >> 24) + k).to_bytes(5, "big") for k in (0, 1) if (bad_lsn >> 24) + k < 1 << 40}
    for prefix in prefixes:
        hit = data.find(prefix, start + FRAME_PREFIX_SIZE, end)
        while hit != -1:
            candidate = hit - FRAME_PREFIX_SIZE
            # Cheap header checks before any CRC, so that body bytes which merely look
            # like an LSN cost O(1) each rather than a CRC over a claimed length.
            if candidate + FRAME_PREFIX_SIZE + FRAME_LEAD_SIZE <= len(data):
                lsn, _rtype, synced = _LEAD.unpack_from(data, candidate + FRAME_PREFIX_SIZE)
                if bad_lsn < lsn <= highest and bad_lsn <= synced < lsn:
                    frame = _codec.decode_frame(data, candidate)
                    if frame is not None:
                        return candidate
            hit = data.find(prefix, hit + 1, end)
    return None


def _out_of_space(error: OSError) -> bool:
    return error.errno in (errno.ENOSPC, errno.EDQUOT)


def _disk_full(what: str, error: OSError, path: str) -> StoreFull:
    """The transient StoreFull of a write that found no space (nothing was written)."""
    return StoreFull(f"{what} failed: disk full ({error})", path=path)


def io_failure(error: OSError, what: str, path: str) -> SyncStoreError:
    """The SyncStoreError for a failed file operation outside the write path (opening, recovery, retirement).

    A full disk is :class:`StoreFull`; anything else is :class:`DurabilityError`.
    """
    if _out_of_space(error):
        return StoreFull(f"{what} failed: disk full ({error})", path=path, hint="free disk space, then try again")
    return DurabilityError(f"{what} failed: {error}", path=path)


class WriteAheadLog:
    """A directory of WAL segments; use :meth:`open`.

    Not thread-safe by itself except that :meth:`append`, :meth:`sync` and
    :meth:`retire` serialise on an internal lock, so a background flusher may
    ``sync`` while the group-commit leader appends.
    """

    def __init__(self, directory: str, fs: FileSystem, segment_bytes: int, sync_writes: bool, file_mode: int = DEFAULT_FILE_MODE) -> None:
        self.directory = directory
        self._file_mode = file_mode  # of every segment created (syncstore._layout: private files)
        self._fs = fs
        self._segment_bytes = segment_bytes
        # O_DSYNC: each append is durable when pwrite returns.  One syscall
        # instead of write + fdatasync means one GIL re-acquisition less per
        # group commit, which is what limits throughput under many threads.
        self._write_flags = os.O_RDWR | (os.O_DSYNC if sync_writes else 0)
        self._segments: list[_Segment] = []
        self._fd = -1
        self._io_lock = threading.Lock()
        self._broken: SyncStoreError | None = None
        self._allocated = True  # False after a write failed for space: preallocate again first
        self._torn: tuple[str, int, int] | None = None  # (path, offset, bytes) to truncate
        self._incomplete: tuple[str, int] | None = None  # (path, bytes) of a half-created segment to remove
        self._next_lsn = 1
        self._listing: list[str] = []  # the WAL directory's entries, and what recovery found in each
        self._found: dict[str, str] = {}
        self._unsynced = True  # recovered frames may not be durable yet
        self._kept: tuple[str, bytes] | None = None  # (path, bytes) of the newest segment as recovery read it, for replay's runs()

    # --- opening and recovery -------------------------------------------------

    @classmethod
    def open(
        cls,
        directory: str,
        *,
        next_lsn: int,
        fs: FileSystem = OS_FS,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        sync_writes: bool = False,
        existing: bool = False,
        file_mode: int = DEFAULT_FILE_MODE,
    ) -> WriteAheadLog:
        """Recover the log in ``directory`` and position it for appending: :meth:`recover`, then :meth:`start`."""
        wal = cls.recover(
            directory, next_lsn=next_lsn, fs=fs, segment_bytes=segment_bytes, sync_writes=sync_writes, existing=existing, file_mode=file_mode
        )
        wal.start()
        return wal

    @classmethod
    def recover(
        cls,
        directory: str,
        *,
        next_lsn: int,
        fs: FileSystem = OS_FS,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        sync_writes: bool = False,
        existing: bool = False,
        file_mode: int = DEFAULT_FILE_MODE,
        inspect: Callable[[FrameRun], None] | None = None,
    ) -> WriteAheadLog:
        """Validate the log in ``directory`` without changing a byte; :meth:`start` then repairs it.

        ``next_lsn`` is the first LSN the caller's state still needs (applied
        LSN + 1).  ``existing`` says that state was initialised with this log,
        so the log must exist and reach from ``next_lsn`` to its end; without
        it (a store whose creation never finished) an empty directory or a
        lone incomplete first segment is a crash during creation.  Every way
        the log can fail to reach ``next_lsn - 1`` raises
        :class:`CorruptionError` naming the LSNs needed and the files found;
        so does a bad frame with valid frames after it.  A torn tail of the
        last segment and an incomplete segment left by a crash during rotation
        are noted for :meth:`start` to repair.  With ``sync_writes`` every
        :meth:`append` is durable on return (O_DSYNC).

        ``inspect``, if given, is called with each segment's verified frames
        from ``next_lsn`` on, in LSN order, while recovery holds them in
        memory: the store checks the records it will replay there, in the
        same pass over the log.  An exception it raises propagates as is.
        """
        wal = cls(directory, fs, segment_bytes, sync_writes, file_mode)
        try:
            wal._recover(next_lsn, existing, inspect)
        except CorruptionError as error:
            # Whatever the damage, say what the state needs and what is there: the
            # operator restoring files needs both.
            raise CorruptionError(f"{error.message}; {wal._evidence()}", path=error.path, offset=error.offset, key=error.key, hint=error.hint) from None
        except PermissionError as error:
            raise permission_denied(error, "read access (write access too, for a writer)") from error
        except OSError as error:
            raise io_failure(error, "WAL recovery", directory) from error
        return wal

    def _recover(self, next_lsn: int, existing: bool, inspect: Callable[[FrameRun], None] | None = None) -> None:
        # Validate only.  Repairs (removing a half-created segment, truncating a torn
        # tail) wait for start(), which the store calls once everything else -- the
        # records' continuity with the state included -- has validated too: an open
        # that raises must leave the files as they were.
        self._next_lsn = next_lsn
        try:
            entries = sorted(self._fs.listdir(self.directory))
        except FileNotFoundError:
            entries = []
            self._found[""] = "nothing: the directory does not exist"
        # The lost+found of a volume mounted as the WAL directory is not part of the log.
        entries = [n for n in entries if not (n == LOST_FOUND and os.path.isdir(os.path.join(self.directory, n)))]
        names = [n for n in entries if _is_segment_name(n)]
        strays = [n for n in entries if not _is_segment_name(n)]
        self._listing = entries
        self._found.update({n: f"{n} (not a segment name)" for n in strays})
        if strays:
            raise CorruptionError(
                f"unexpected entries in the WAL directory ({', '.join(strays)}): a misnamed or foreign file may be part of the log",
                path=self.directory,
                hint="move the named entries out of the WAL directory (or rename a segment back to wal-<first LSN:020d>.log), then open again",
            )
        incomplete = None
        last_data, last_size = None, 0  # the newest segment, read once (up to its zero tail)
        if names:
            path = os.path.join(self.directory, names[-1])
            data, last_size = self._read_last(path)
            last_data = data
            if len(data) < SEGMENT_HEADER_SIZE or _codec.zeros_from(data, 0):
                # A segment whose header never became durable: a crash while creating it -- or
                # a segment that was cut or zeroed, which the checks below must tell apart.
                incomplete = (path, len(data), _segment_lsn(names[-1]))
                last_data = None
                zeros = "all zeros, " if data else ""
                self._found[names.pop()] = f"{os.path.basename(path)} ({zeros}{len(data)} bytes: no valid header)"
        for index, name in enumerate(names):
            path = os.path.join(self.directory, name)
            is_last = index == len(names) - 1
            data = last_data if is_last and last_data is not None else self._fs.read_file(path)
            size = last_size if is_last and last_data is not None else len(data)  # data may stop short of the zero tail
            self._found[name] = f"{name} ({size} bytes, bad header)"
            first_lsn = _codec.decode_segment_header(data, path)
            if name != segment_name(first_lsn):
                raise CorruptionError(f"WAL segment header says first LSN {first_lsn}", path=path, offset=12)
            expected = self._segments[-1].last_lsn + 1 if self._segments else first_lsn
            if first_lsn != expected:
                raise CorruptionError(f"WAL gap: expected a segment starting at LSN {expected}", path=path, offset=12)
            segment = _Segment(path, first_lsn, first_lsn - 1, SEGMENT_HEADER_SIZE)
            self._found[name] = f"{name} (LSNs from {first_lsn}, damaged)"
            starts, data = self._scan(segment, data, is_last, size)
            self._segments.append(segment)
            if is_last:
                self._kept = (path, data)  # replay reads it next (runs())
            skip = max(0, next_lsn - first_lsn)  # frames the state already has
            if inspect is not None and skip < len(starts):
                inspect(FrameRun(path, data, starts[skip], segment.size, first_lsn + skip))
            self._found[name] = f"{name} (LSNs {first_lsn}..{segment.last_lsn})" if segment.last_lsn >= first_lsn else f"{name} (no frames)"
        if incomplete is not None:
            path, size, lsn = incomplete
            if self._segments:
                # Legitimate only as a crash during rotation: the previous segment was
                # fdatasynced before this one was created, so it must end just before it.
                if lsn != self.end_lsn + 1:
                    raise CorruptionError(
                        f"the last WAL segment has no valid header and does not follow the segment before it (which ends at LSN {self.end_lsn})",
                        path=path,
                    )
            elif existing or lsn != next_lsn:
                # The state was initialised after the first segment was durable: if that
                # segment is now short or zero, records may have been lost with it.
                raise CorruptionError("the only WAL segment has no valid header (cut short or zeroed)", path=path)
        if not self._segments:
            if existing:
                raise CorruptionError("the WAL holds no segment", path=self.directory)
        else:
            first = self._segments[0]
            if first.first_lsn > next_lsn:
                raise CorruptionError(f"the WAL starts at LSN {first.first_lsn}, after LSN {next_lsn}", path=first.path, offset=0)
            if self.end_lsn < next_lsn - 1:
                raise CorruptionError(
                    f"the WAL ends at LSN {self.end_lsn}, before the applied LSN {next_lsn - 1}",
                    path=self._segments[-1].path,
                    hint="the log was truncated or replaced; restore it from a backup or replica",
                )
        self._incomplete = None if incomplete is None else incomplete[:2]

    def _evidence(self) -> str:
        """What the state needs and what the WAL directory holds, for recovery's errors."""
        found = [self._found.get(name, name) for name in self._listing] or ([self._found[""]] if "" in self._found else [])
        if len(found) > 12:
            found = found[:12] + [f"... and {len(found) - 12} more"]
        return (
            f"the state needs WAL records from LSN {self._next_lsn} on (applied LSN {self._next_lsn - 1}); "
            f"{self.directory} holds: {'; '.join(found) if found else 'nothing'}"
        )

    def start(self) -> None:
        """Make the validated log appendable: repair what :meth:`recover` noted, open or create the current segment."""
        try:
            if self._incomplete is not None:
                log.warning("removing incomplete WAL segment %s (%d bytes)", *self._incomplete)
                self._fs.unlink(self._incomplete[0])
                self._fs.fsync_dir(self.directory)
                self._incomplete = None
            if self._torn is not None:
                self._truncate(*self._torn)
                self._torn = None
            if not self._segments:
                self._create_segment(self._next_lsn)
            else:
                self._fd = self._fs.open(self._segments[-1].path, self._write_flags)
                self._fs.allocate(self._fd, self._segment_bytes)
                self._fs.fsync(self._fd)
        except PermissionError as error:
            self.close()
            raise permission_denied(error, "read and write access") from error
        except OSError as error:
            self.close()
            raise io_failure(error, "WAL recovery", self.directory) from error

    def _read_last(self, path: str) -> tuple[bytes, int]:
        """The newest segment up to the end of its last block holding a non-zero byte, and the file's size.

        What follows -- the preallocated, never written part: most of a
        segment just created, and most of a large one -- is checked to be
        zeros a block at a time, never held whole (reading a 256 MiB segment
        into one buffer cost more than scanning its frames).  A file that is
        all zeros (or shorter than a header) is read whole.  The blocks are
        read with plain ``os`` calls, not through the file-system seam: they
        only decide how much of the file ``read_file`` (the seam's) returns,
        and the seam's callers count on one ``open`` of a segment.
        """
        fd = os.open(path, os.O_RDONLY)
        try:
            size = end = os.fstat(fd).st_size
            while end > 0:
                start = (end - 1) // _TAIL_BLOCK * _TAIL_BLOCK
                block = os.pread(fd, end - start, start)
                if len(block) != end - start or not _codec.zeros_from(block, 0):
                    break
                end = start
        finally:
            os.close(fd)
        return self._fs.read_file(path) if end == size or end < SEGMENT_HEADER_SIZE else self._fs.read_file(path, end), size

    def _scan(self, segment: _Segment, data: bytes, is_last: bool, size: int) -> tuple[list[int], bytes]:
        """Verify the segment's frames; return their offsets (up to a torn tail, which is noted) and the data read.

        ``data`` may stop short of the file's ``size`` if the rest is zeros
        (:meth:`_read_last`); anything but a clean end of the frames in it has
        the whole file read and judged.
        """
        starts, offset, wrong_lsn = _codec.scan_frames(data, SEGMENT_HEADER_SIZE, segment.first_lsn)
        expected = segment.first_lsn + len(starts)
        if offset < len(data) and (wrong_lsn or not _codec.zeros_from(data, offset)):
            if len(data) < size:  # a frame may run into the zeros, a later one vouch from there: read it all
                whole = self._fs.read_file(segment.path)
                return self._scan(segment, whole, is_last, len(whole))
            self._bad_frame(segment, data, offset, expected, is_last, wrong_lsn)
            return starts, data
        # Anything after the frames is preallocated, never written: the clean end of the log.
        segment.last_lsn = expected - 1
        segment.size = offset
        return starts, data

    def _bad_frame(
        self, segment: _Segment, data: bytes, offset: int, expected: int, is_last: bool, wrong_lsn: bool
    ) -> None:
        segment.last_lsn = expected - 1
        segment.size = offset
        if wrong_lsn:
            raise CorruptionError(f"WAL frame has a valid CRC but not the expected LSN {expected}", path=segment.path, offset=offset)
        if not is_last:
            raise CorruptionError("bad WAL frame inside a sealed segment", path=segment.path, offset=offset)
        later = _vouching_frame(data, offset, expected)
        if later is not None:
            raise CorruptionError(
                f"bad WAL frame {expected}, which the valid frame at offset {later} records as durable: not a torn tail",
                path=segment.path,
                offset=offset,
            )
        self._torn = (segment.path, offset, len(data) - offset)

    def _truncate(self, path: str, offset: int, dropped: int) -> None:
        log.warning("truncating torn WAL tail of %s at offset %d (%d bytes dropped)", path, offset, dropped)
        fd = self._fs.open(path, os.O_WRONLY)
        try:
            self._fs.truncate(fd, offset)
            self._fs.fsync(fd)
        finally:
            self._fs.close(fd)

    def _create_segment(self, first_lsn: int) -> None:
        self._fd = self._new_segment(first_lsn)

    def _new_segment(self, first_lsn: int) -> int:
        """Create, preallocate and durably record segment ``first_lsn``; return its descriptor.

        On failure the half-made file is removed (best effort; a leftover is
        overwritten by the next attempt, as no frame of it was ever written)
        and the log is unchanged.
        """
        path = os.path.join(self.directory, segment_name(first_lsn))
        self._kept = None  # a segment of this name may be made anew: recovery's copy is stale
        fd = create_file(self._fs, path, self._write_flags | os.O_TRUNC, self._file_mode)
        try:
            self._fs.pwrite(fd, _codec.encode_segment_header(first_lsn), 0)
            self._fs.allocate(fd, self._segment_bytes)
            self._fs.fsync(fd)
            self._fs.fsync_dir(self.directory)
        except BaseException:
            self._fs.close(fd)
            with contextlib.suppress(OSError):
                self._fs.unlink(path)
            raise
        self._segments.append(_Segment(path, first_lsn, first_lsn - 1, SEGMENT_HEADER_SIZE))
        self._allocated = True
        return fd

    # --- properties -------------------------------------------------------------

    @property
    def end_lsn(self) -> int:
        """LSN of the last frame in the log (written, not necessarily synced)."""
        return self._segments[-1].last_lsn

    @property
    def first_lsn(self) -> int:
        """LSN of the oldest retained frame's slot (first LSN of the oldest segment)."""
        return self._segments[0].first_lsn

    @property
    def fileno(self) -> int:
        """Descriptor of the segment being appended to (-1 if none); for the fork handler."""
        return self._fd

    def segment_paths(self) -> list[str]:
        """Paths of the retained segments, oldest first."""
        return [s.path for s in self._segments]

    # --- writing ----------------------------------------------------------------

    def _check(self) -> None:
        if self._broken is not None:
            raise type(self._broken)(
                "the write-ahead log failed earlier and accepts no more writes: " + self._broken.message,
                path=self._broken.path,
                hint="close and reopen the store",
            )

    def _fail(self, error: OSError, what: str) -> DurabilityError:
        # Sticky whatever the errno: after a failed fsync the kernel may have dropped
        # the dirty pages, so nothing written since the last good sync can be trusted.
        self._broken = DurabilityError(f"{what} failed: {error}", path=self._segments[-1].path)
        return self._broken

    def append(self, data: bytes | bytearray, last_lsn: int, first_lsn: int) -> None:
        """Write frames ``first_lsn .. last_lsn`` (already encoded, back to back) to the log.

        Rotates to a new segment first when the current one is full.  The
        data reaches the OS, not necessarily the disk: call :meth:`sync`.

        A full disk (ENOSPC from creating or preallocating a segment, or from
        the write) raises :class:`StoreFull` and leaves the log exactly as it
        was -- a partial write is cut off again -- so the caller may drop the
        frames and later appends may reuse their LSNs: the condition heals once
        space is back.  Any other failure breaks the log (:class:`DurabilityError`
        now and on every later call).
        """
        with self._io_lock:
            self._check()
            self._kept = None  # writing: recovery's copy of the segment is stale from now on
            current = self._segments[-1]
            if first_lsn != current.last_lsn + 1:
                raise AssertionError(f"WAL append out of order: {first_lsn} after {current.last_lsn}")
            if current.size + len(data) > self._segment_bytes and current.last_lsn >= current.first_lsn:
                self._rotate(first_lsn)
                current = self._segments[-1]
            try:
                if not self._allocated:  # a write failed for space earlier: probe again
                    self._fs.allocate(self._fd, self._segment_bytes)
                    self._allocated = True
                self._fs.pwrite(self._fd, data, current.size)
            except OSError as error:
                if not _out_of_space(error):
                    raise self._fail(error, "WAL write") from error
                self._cut_back(current)
                raise _disk_full("WAL write", error, current.path) from error
            current.size += len(data)
            current.last_lsn = last_lsn
            self._unsynced = not self._write_flags & os.O_DSYNC

    def _cut_back(self, segment: _Segment) -> None:
        """Remove whatever part of a failed write reached the file (its frames must not be replayed)."""
        self._allocated = False
        try:
            self._fs.truncate(self._fd, segment.size)
        except OSError as error:
            raise self._fail(error, "cutting back a failed WAL write") from error

    def _rotate(self, first_lsn: int) -> None:
        # Seal the old segment durably before a new one can hold acknowledged frames
        # (recovery treats a gap before a later segment as corruption, not a torn tail).
        try:
            self._fs.fdatasync(self._fd)
        except OSError as error:
            raise self._fail(error, "WAL fdatasync") from error
        self._unsynced = False
        try:
            fd = self._new_segment(first_lsn)
        except OSError as error:
            if not _out_of_space(error):
                raise self._fail(error, "WAL segment creation") from error
            raise _disk_full("WAL segment creation", error, self.directory) from error
        old, self._fd = self._fd, fd
        try:
            self._fs.close(old)
        except OSError:  # sealed above: nothing to lose
            log.warning("closing WAL segment failed", exc_info=True)

    def sync(self) -> None:
        """``fdatasync`` the current segment; raises :class:`DurabilityError` on failure (never retried)."""
        with self._io_lock:
            self._check()
            if not self._unsynced:
                return
            try:
                self._fs.fdatasync(self._fd)
            except OSError as error:
                raise self._fail(error, "WAL fdatasync") from error
            self._unsynced = False

    def restart(self, first_lsn: int) -> None:
        """Start the log over at ``first_lsn`` (a follower bootstrapped from a snapshot at ``first_lsn - 1``).

        Only for a log that holds no frame: a new empty segment is created
        (durably) and the old empty ones removed.  A failure breaks the log
        (:class:`DurabilityError` from then on), as any failed write does.
        """
        with self._io_lock:
            self._check()
            if any(s.last_lsn >= s.first_lsn for s in self._segments):
                raise AssertionError("the WAL holds frames: it cannot restart")
            old, old_fd = self._segments, self._fd
            self._segments = []
            try:
                self._fd = self._new_segment(first_lsn)
            except OSError as error:
                self._segments, self._fd = old, old_fd
                raise self._fail(error, "WAL restart") from error
            try:
                if old_fd >= 0:
                    self._fs.close(old_fd)
                for segment in old:
                    if segment.path != self._segments[0].path:
                        self._fs.unlink(segment.path)
                self._fs.fsync_dir(self.directory)
            except OSError as error:
                raise self._fail(error, "WAL restart") from error
            self._unsynced = False

    def retire(self, upto_lsn: int) -> list[str]:
        """Delete sealed segments whose every frame has LSN <= ``upto_lsn``; return their paths.

        The caller guarantees the state covering ``upto_lsn`` is durable.
        """
        with self._io_lock:
            removed = []
            try:
                while len(self._segments) > 1 and self._segments[0].last_lsn <= upto_lsn:
                    self._fs.unlink(self._segments[0].path)
                    removed.append(self._segments.pop(0).path)
                if removed:
                    self._fs.fsync_dir(self.directory)
            except OSError as error:
                raise self._fail(error, "WAL segment retirement") from error
            return removed

    # --- reading ------------------------------------------------------------------

    def runs(self, after_lsn: int) -> Iterator[FrameRun]:
        """Every retained frame with LSN > ``after_lsn``, a segment at a time, read but not checked again.

        Only for frames :meth:`recover` verified in this same open, with the
        store locked (replay): the reader walks the frames itself and should
        still check each LSN, which costs nothing and catches a file that
        changed since recovery read it.
        """
        unpack = _codec.unpack_frame_head
        kept, self._kept = self._kept, None  # recovery's copy of the newest segment: used once
        for segment in list(self._segments):
            if segment.last_lsn <= after_lsn:
                continue
            if kept is not None and kept[0] == segment.path and len(kept[1]) >= segment.size:
                data = kept[1]  # may hold more than the frames (zeros, a torn tail): the run ends at segment.size
            else:
                data = self._fs.read_file(segment.path, segment.size)  # its frames, not the preallocated rest
            offset, lsn = SEGMENT_HEADER_SIZE, segment.first_lsn
            while lsn <= after_lsn:  # skip what the state already has
                if offset + FRAME_HEAD_SIZE > len(data):
                    raise CorruptionError(f"WAL frame {lsn} unreadable", path=segment.path, offset=offset)
                offset += FRAME_PREFIX_SIZE + unpack(data, offset)[0]
                lsn += 1
            if len(data) < segment.size or offset > segment.size:
                raise CorruptionError(f"WAL frame {lsn} unreadable", path=segment.path, offset=min(offset, len(data)))
            yield FrameRun(segment.path, data, offset, segment.size, lsn)

    def frames(self, after_lsn: int, check_crc: bool = True) -> Iterator[Frame]:
        """Yield every retained frame with LSN > ``after_lsn``, in order, with CRCs checked.

        ``check_crc=False`` skips the CRCs: only for the frames :meth:`recover`
        verified in this same open, with the store locked (replay).
        """
        for segment in list(self._segments):
            if segment.last_lsn <= after_lsn:
                continue
            data = self._fs.read_file(segment.path, segment.size)  # its frames, not the preallocated rest
            offset = SEGMENT_HEADER_SIZE
            expected = segment.first_lsn
            while expected <= segment.last_lsn:
                frame = _codec.decode_frame(data, offset, check_crc)
                if frame is None or frame.lsn != expected:
                    raise CorruptionError(f"WAL frame {expected} unreadable", path=segment.path, offset=offset)
                if frame.lsn > after_lsn:
                    yield frame
                offset = frame.end
                expected += 1

    def close(self) -> None:
        """Close the current segment file (does not sync)."""
        with self._io_lock:
            if self._fd >= 0:
                fd, self._fd = self._fd, -1
                try:
                    self._fs.close(fd)
                except OSError:  # nothing to lose: writes were synced or are reported failed
                    log.warning("closing WAL segment failed", exc_info=True)

