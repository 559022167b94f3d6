"""Read WAL records by LSN from a log that another thread or process may be writing and retiring.

The snapshot writer needs the records in an LSN range -- all of them at or
below the state's applied LSN, so durable and complete in the segment files
-- while the store's own writer goes on appending, rotating and retiring
segments, possibly in another process (a read-only view).  ``WriteAheadLog``
is the writer's object (recovery validates and repairs the whole log); this is
a reader only: it lists ``wal-*.log``, keeps every segment it has seen open
(so a segment retired meanwhile stays readable through its descriptor), and
decodes frames with ``_codec`` starting where the previous call stopped.

A range the log no longer holds (its segment retired before the reader saw
it) raises :class:`LogRetired`; a frame inside the range that does not decode
is corruption.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from . import _codec
from ._codec import FRAME_PREFIX_SIZE, SEGMENT_HEADER_SIZE, Frame
from ._layout import permission_denied
from .errors import CorruptionError, SyncStoreError

__all__ = ["LogReader", "LogRetired", "segment_files"]

_READ = 1 << 20  # bytes per pread


class LogRetired(SyncStoreError):
    """The log no longer holds the records asked for (their segment was retired)."""


def _segment_first_lsn(name: str) -> int | None:
    if len(name) == 28 and name.startswith("wal-") and name.endswith(".log") and name[4:24].isascii() and name[4:24].isdigit():
        return int(name[4:24])
    return None


def segment_files(directory: str) -> list[tuple[int, str]]:
    """(first LSN, path) of every segment in the WAL directory, oldest first (none if it is missing)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted((first, os.path.join(directory, name)) for name in names if (first := _segment_first_lsn(name)) is not None)


class LogReader:
    """Frames by LSN from the WAL directory ``directory``; :meth:`close` when done."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._fds: dict[int, int] = {}  # first LSN -> open descriptor
        self._paths: dict[int, str] = {}
        # Where the last read stopped: (segment first LSN, offset of the next frame, its LSN).
        self._at: tuple[int, int, int] | None = None
        self._window: tuple[int, int, bytes] = (-1, 0, b"")  # (segment, file offset, bytes): read ahead

    def refresh(self, need: int = 0) -> None:
        """Open the segments not yet open that may hold LSN ``need`` or later; close those entirely before it.

        Call it often: an open segment survives its retirement.
        """
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            names = []
        except PermissionError as error:
            raise permission_denied(error, "read and search (r-x) access to the WAL directory, to read the records a snapshot needs") from None
        listed = {first: name for name in names if (first := _segment_first_lsn(name)) is not None}
        # The segment holding `need` starts at the largest first LSN at or below it; nothing before it is read again.
        floor = max((f for f in (*listed, *self._fds) if f <= need), default=0)
        for first in [f for f in self._fds if f < floor]:
            with contextlib.suppress(OSError):
                os.close(self._fds.pop(first))
            self._paths.pop(first, None)
        for first, name in listed.items():
            if first < floor or first in self._fds:
                continue
            path = os.path.join(self.directory, name)
            try:
                self._fds[first] = os.open(path, os.O_RDONLY)
            except FileNotFoundError:  # retired between the listing and the open
                continue
            except PermissionError as error:
                raise permission_denied(error, "read access to the WAL segments, to read the records a snapshot needs") from None
            self._paths[first] = path

    def frames(self, after: int, upto: int) -> Iterator[Frame]:
        """Every frame with ``after`` < LSN <= ``upto``, in order (the caller knows they are durable)."""
        if upto <= after:
            return
        self.refresh(after + 1)
        if self._at is not None and self._at[2] == after + 1:
            first, offset, lsn = self._at
        else:
            starts = [f for f in self._fds if f <= after + 1]
            if not starts:
                oldest = min(self._fds, default=None)
                raise LogRetired(
                    f"the WAL no longer holds LSN {after + 1} (its oldest segment starts at {oldest})", path=self.directory
                )
            first = max(starts)
            self._check_header(first)
            offset, lsn = self._skip(first, after + 1)
        while lsn <= upto:
            frame = self._frame(first, offset)
            if frame is None:  # the end of this segment's frames: the next segment starts at `lsn`
                if lsn not in self._fds:
                    self.refresh(lsn)
                    if lsn not in self._fds:
                        raise LogRetired(f"the WAL no longer holds LSN {lsn}", path=self.directory)
                first, offset = lsn, SEGMENT_HEADER_SIZE
                self._check_header(first)
                continue
            if frame.lsn != lsn:
                raise CorruptionError(f"WAL frame has LSN {frame.lsn} where {lsn} belongs", path=self._paths[first], offset=offset)
            offset = frame.end
            lsn += 1
            self._at = (first, offset, lsn)
            if frame.lsn > after:
                yield frame

    def path_of(self, lsn: int) -> str:
        """The segment file holding ``lsn`` among those open (the directory if none), for errors."""
        starts = [first for first in self._paths if first <= lsn]
        return self._paths[max(starts)] if starts else self.directory

    def position(self, after: int) -> tuple[int, int] | None:
        """(segment first LSN, offset) where frame ``after + 1`` starts (or will), or None if the log no longer reaches it.

        Kept by a snapshot so that the next delta starts reading right
        there (:meth:`resume`) instead of walking its segment from the start.
        """
        if self._at is not None and self._at[2] == after + 1:
            return self._at[0], self._at[1]
        try:
            self.refresh(after + 1)
            starts = [f for f in self._fds if f <= after + 1]
            if not starts:
                return None
            first = max(starts)
            offset, lsn = self._skip(first, after + 1)
        except (OSError, SyncStoreError):  # only a hint: a view that may not read the WAL goes without
            return None
        return (first, offset) if lsn == after + 1 else None

    def resume(self, after: int, first: int, offset: int) -> bool:
        """Continue after LSN ``after`` at a remembered :meth:`position`, if frame ``after + 1`` really is there.

        The frame found there must pass its CRC and carry LSN ``after + 1``
        (LSNs are unique in a log), so a stale or foreign position is
        harmless: it is ignored (False) and :meth:`frames` finds the record
        from the segment's start.
        """
        self.refresh(after + 1)
        if first not in self._fds:
            return False
        try:
            frame = self._frame(first, offset)
        except (CorruptionError, OSError):
            return False
        if frame is None or frame.lsn != after + 1:
            return False
        self._at = (first, offset, after + 1)
        return True

    def _skip(self, first: int, target: int) -> tuple[int, int]:
        """(offset, LSN) of frame ``target`` in segment ``first``, or of the segment's end if it ends before.

        Walks the length words only -- no CRC, no decoding -- so finding the
        first record a delta needs costs ~0.2 us per earlier frame of its
        segment; the frame it lands on is then read and checked in full
        (its CRC, and that its LSN is ``target``).
        """
        fd = self._fds[first]
        offset, lsn = SEGMENT_HEADER_SIZE, first
        start, data = offset, b""
        while lsn < target:
            at = offset - start
            if at + FRAME_PREFIX_SIZE > len(data):
                start, data, at = offset, os.pread(fd, _READ, offset), 0
                if len(data) < FRAME_PREFIX_SIZE:
                    break
            length = int.from_bytes(data[at : at + 4], "big")
            if length == 0:
                break
            offset += FRAME_PREFIX_SIZE + length
            lsn += 1
        return offset, lsn

    def _check_header(self, first: int) -> None:
        path = self._paths[first]
        header = os.pread(self._fds[first], SEGMENT_HEADER_SIZE, 0)
        if _codec.decode_segment_header(header, path) != first:
            raise CorruptionError(f"WAL segment header does not say first LSN {first}", path=path, offset=12)

    def _frame(self, first: int, offset: int) -> Frame | None:
        """The frame at ``offset`` of segment ``first``; None at the clean end of its frames (a zero word, or the file's end).

        Frames are decoded from a window of the file read ahead; what looks
        like the end or a damaged frame there is read again from the file
        first (the writer may have written it since the window was read).
        Anything that still does not decode is corruption: every frame asked
        for is at or below the applied LSN, so durable and whole.
        """
        frame = self._decode_window(first, offset)
        if frame is not None:
            return frame
        self._window = (first, offset, os.pread(self._fds[first], _READ, offset))
        if len(self._window[2]) < FRAME_PREFIX_SIZE or self._window[2][:4] == b"\0\0\0\0":
            return None
        frame = self._decode_window(first, offset)
        if frame is None:
            raise CorruptionError("WAL frame unreadable (bad length or CRC) at or below the applied LSN", path=self._paths[first], offset=offset)
        return frame

    def _decode_window(self, first: int, offset: int) -> Frame | None:
        """The frame at ``offset`` from the read-ahead window (read more if it is longer), or None if the window cannot tell."""
        segment, start, data = self._window
        if segment != first or not start <= offset or offset + FRAME_PREFIX_SIZE > start + len(data):
            return None
        at = offset - start
        length = int.from_bytes(data[at : at + 4], "big")
        if length == 0:
            return None
        if at + FRAME_PREFIX_SIZE + length > len(data):  # longer than the window: read the frame whole
            data, at = os.pread(self._fds[first], FRAME_PREFIX_SIZE + length, offset), 0
            if len(data) < FRAME_PREFIX_SIZE + length:
                return None
            self._window = (first, offset, data)
        frame = _codec.decode_frame(data, at)
        if frame is None:
            return None
        return Frame(offset, offset + frame.end - at, frame.lsn, frame.rtype, frame.body, frame.synced)

    def close(self) -> None:
        """Close every segment descriptor."""
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        self._paths.clear()
        self._at = None

    def __enter__(self) -> LogReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
