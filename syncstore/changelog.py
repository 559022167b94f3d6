"""The change log as a stream: reading it from files, retention, and named consumers.

The WAL already is the change log -- every write is one record with a dense
LSN -- so this module adds no second copy of anything.  It owns:

* :class:`LogReader`: reads frames after an LSN from the WAL directory's
  segment files, up to a bound the caller gives (the high watermark in the
  writing process, the applied LSN in a read-only view: never an unsynced
  frame).  It keeps its position, so a tail that follows the log reads each
  frame once, and it keeps the segment it reads open, so retention deleting
  the file meanwhile does not cut a read short.
* Retention (:func:`retire_upto`, pure): a WAL segment goes once it is
  applied *and* beyond the retention setting (older than ``retention_ms`` or
  beyond ``retention_bytes`` of log, whichever comes first) *and* no consumer
  pins it.  A snapshot is not needed for that: a consumer that falls behind
  what is retained is told so (:class:`SnapshotRequired`), never restarted
  silently (Kafka's ``auto.offset.reset=latest`` is exactly what we never do).
* :class:`Consumers`: named, persistent positions (file ``consumers`` in the
  store directory, format below).  A consumer pins the log from its
  acknowledged position, up to ``max_log_bytes`` of log behind it; beyond
  that it is *dropped* (unpinned, with a log line and a reason in its
  status), and stays listed until removed.

File ``consumers`` (JSON, replaced atomically: temp file, fsync, rename,
fsync of the directory)::

    {"version": 1,
     "consumers": {"<name>": {"position": <acked LSN>, "dropped": null | "<reason>"}},
     "crc32c": <CRC-32C of the canonical JSON of "consumers" (sorted keys, no spaces)>}
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from crc32c import crc32c

from . import _codec, _layout
from ._codec import FRAME_PREFIX_SIZE, SEGMENT_HEADER_SIZE, Frame
from ._fileio import FileSystem
from .errors import CorruptionError, InvalidArgument, SnapshotRequired
from ._watch import Watchers
from .model import Change, check_u64

__all__ = ["LogReader", "Segment", "retire_upto", "Consumers", "ConsumerStatus", "CONSUMERS_FILE", "DEFAULT_RETENTION_BYTES", "DEFAULT_RETENTION_MS", "DEFAULT_MAX_LOG_BYTES"]

log = logging.getLogger("syncstore.changelog")

CONSUMERS_FILE = "consumers"
DEFAULT_RETENTION_BYTES = 256 << 20  # of applied log kept for consumers and followers
DEFAULT_RETENTION_MS = 24 * 3_600_000
DEFAULT_MAX_LOG_BYTES = 4 << 30  # a consumer pins at most this much log behind its position
_READ_CHUNK = 1 << 20
_NO_LAST = 2**64
_FOLLOW_BATCH = 1024
#: How often a read-only view re-checks for new changes (it has no writer to wake it).
VIEW_POLL_S = 0.05
ReadFn = Callable[[int, int], list[Change]]
WaitFn = Callable[[int, float | None], bool]
ClockFn = Callable[[], float]  # the last LSN of the segment being written to: open-ended
_length = struct.Struct(">I")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


@dataclass(frozen=True, slots=True)
class Segment:
    """A WAL segment as retention sees it: LSN range, bytes, age."""

    first_lsn: int
    last_lsn: int
    size: int
    age_ms: int


def retire_upto(segments: list[Segment], applied: int, retention_bytes: int, retention_ms: int, pin: int | None) -> int:
    """The LSN up to which WAL segments may be deleted (every frame <= it); pure.

    ``segments`` oldest first, the last one being written to (never deleted).
    A segment may go when all its frames are applied, when either the log
    is over ``retention_bytes`` or the segment is older than ``retention_ms``,
    and when its frames are all at or below ``pin`` (the lowest position of a
    consumer that pins the log; None: nobody pins).  Deletion is oldest
    first: the first segment that must stay keeps every later one.
    """
    total = sum(s.size for s in segments)
    upto = 0
    for segment in segments[:-1]:
        if segment.last_lsn > applied or (pin is not None and segment.last_lsn > pin):
            break
        if total <= retention_bytes and segment.age_ms <= retention_ms:
            break
        upto = segment.last_lsn
        total -= segment.size
    return upto


class LogReader:
    """Reads the change log from the segment files of a WAL directory; keeps its position between reads.

    Not thread-safe: one per consumer of the stream.  ``close`` releases
    the segment file it holds open.
    """

    def __init__(self, wal_dir: str) -> None:
        self._dir = wal_dir
        self._fd = -1
        self._path = ""
        self._offset = 0  # of the next frame in the open segment
        self._next = 0  # LSN of the frame at _offset (0: no position)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd, self._next = -1, 0

    def segments(self) -> list[tuple[int, str]]:
        """(first LSN, path) of every segment, oldest first."""
        try:
            names = os.listdir(self._dir)
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            if len(name) == 28 and name.startswith("wal-") and name.endswith(".log") and name[4:24].isdigit():
                out.append((int(name[4:24]), os.path.join(self._dir, name)))
        out.sort()
        return out

    def oldest_lsn(self) -> int:
        """The oldest LSN the log can still yield (the first LSN of its oldest segment; 1 with no segment)."""
        segments = self.segments()
        return segments[0][0] if segments else 1

    def read(self, after: int, upto: int, limit: int) -> list[Frame]:
        """Up to ``limit`` frames with LSN in (``after``, ``upto``], in order, CRCs checked.

        Raises :class:`SnapshotRequired` (without snapshot details: the
        caller adds them) if the log no longer holds LSN ``after + 1``, and
        :class:`CorruptionError` naming the file and offset for a damaged
        frame below ``upto``.
        """
        if after >= upto or limit <= 0:
            return []
        if self._next != after + 1:
            self.seek(after + 1)
        out: list[Frame] = []
        while self._next <= upto and len(out) < limit:
            frames = self._read_segment(upto, limit - len(out))
            out.extend(frames)
            if not frames and self._next <= upto:
                self._open_next()
        return out

    def seek(self, lsn: int) -> None:
        """Position at frame ``lsn`` (which must be written): open the segment holding it, skip the frames before it.

        Raises :class:`SnapshotRequired` if the log no longer holds it.
        """
        self.close()
        segments = self.segments()
        holding = [(first, path) for first, path in segments if first <= lsn]
        if not holding:
            oldest = segments[0][0] if segments else 1
            raise SnapshotRequired(
                f"the change log starts at LSN {oldest}: changes after {lsn - 1} are no longer retained",
                requested_lsn=lsn - 1,
                oldest_lsn=oldest,
            )
        first, path = holding[-1]
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # retired since it was listed: only older segments go, so LSN lsn went with it
            raise SnapshotRequired(f"the change log no longer holds LSN {lsn}", requested_lsn=lsn - 1, oldest_lsn=self.oldest_lsn()) from None
        self._path, self._offset, self._next = path, SEGMENT_HEADER_SIZE, first
        header = os.pread(self._fd, SEGMENT_HEADER_SIZE, 0)
        if _codec.decode_segment_header(header, path) != first:
            raise CorruptionError(f"WAL segment header does not say first LSN {first}", path=path, offset=12)
        while self._next < lsn:  # skip by length: the frames yielded later are the ones whose CRC matters
            prefix = os.pread(self._fd, 4, self._offset)
            length = _length.unpack(prefix)[0] if len(prefix) == 4 else 0
            if length == 0:
                raise SnapshotRequired(
                    f"the change log does not hold LSN {lsn}", requested_lsn=lsn - 1, oldest_lsn=self.oldest_lsn()
                )
            self._offset += FRAME_PREFIX_SIZE + length
            self._next += 1

    def _read_segment(self, upto: int, limit: int) -> list[Frame]:
        """Frames from the current position in the open segment (empty at its end)."""
        out: list[Frame] = []
        data = os.pread(self._fd, _READ_CHUNK, self._offset)
        pos = 0
        while self._next <= upto and len(out) < limit:
            if len(data) - pos < FRAME_PREFIX_SIZE:
                if pos == 0:
                    break
                data, pos = os.pread(self._fd, _READ_CHUNK, self._offset), 0
                continue
            length = _length.unpack_from(data, pos)[0]
            if length == 0:
                break  # the end of this segment's frames
            if pos + FRAME_PREFIX_SIZE + length > len(data):
                if pos == 0:  # one frame larger than the chunk
                    data = os.pread(self._fd, FRAME_PREFIX_SIZE + length, self._offset)
                    if len(data) < FRAME_PREFIX_SIZE + length:
                        break
                else:
                    data, pos = os.pread(self._fd, max(_READ_CHUNK, FRAME_PREFIX_SIZE + length), self._offset), 0
                continue
            frame = _codec.decode_frame(data, pos)
            if frame is None or frame.lsn != self._next:
                raise CorruptionError(f"WAL frame {self._next} unreadable", path=self._path, offset=self._offset)
            out.append(frame._replace(offset=self._offset, end=self._offset + FRAME_PREFIX_SIZE + length))
            pos += FRAME_PREFIX_SIZE + length
            self._offset += FRAME_PREFIX_SIZE + length
            self._next += 1
        return out

    def _open_next(self) -> None:
        """The open segment ended before ``upto``: continue in the segment that starts at the next LSN."""
        path = os.path.join(self._dir, f"wal-{self._next:020d}.log")
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise CorruptionError(
                f"WAL frame {self._next} is neither in {os.path.basename(self._path)} nor in a segment of its own", path=self._path, offset=self._offset
            ) from None
        os.close(self._fd)
        self._fd, self._path, self._offset = fd, path, SEGMENT_HEADER_SIZE

    def changes(self, after: int, upto: int, limit: int) -> list[Change]:
        """:meth:`read`, decoded into :class:`Change` values."""
        return [
            Change.of(frame.lsn, _codec.decode_record(frame.rtype, frame.body, frame.lsn, self._path, frame.offset))
            for frame in self.read(after, upto, limit)
        ]


def segment_infos(wal_dir: str, now_ms: int) -> list[Segment]:
    """The segments of a WAL directory as retention sees them (sizes are of written frames only)."""
    reader = LogReader(wal_dir)
    segments = reader.segments()
    out = []
    for index, (first, path) in enumerate(segments):
        try:
            stat = os.stat(path)
        except FileNotFoundError:  # retired meanwhile
            continue
        last = segments[index + 1][0] - 1 if index + 1 < len(segments) else _NO_LAST
        # st_size: segments are preallocated, so this is what each one holds on disk.
        out.append(Segment(first, last, stat.st_size, max(0, now_ms - stat.st_mtime_ns // 1_000_000)))
    return out


@dataclass(frozen=True, slots=True)
class ConsumerStatus:
    """A named consumer as ``Store.consumers()`` lists it.

    ``position``: the LSN it acknowledged (it has processed every change up
    to it); ``lag``: changes it has not acknowledged (``store.lsn -
    position``); ``pinned_bytes``: WAL bytes kept because of it (0 when
    dropped or when retention keeps them anyway); ``dropped``: None, or why
    it no longer pins the log.
    """

    name: str
    position: int
    lag: int
    pinned_bytes: int
    dropped: str | None


class Consumers:
    """The persistent named consumers of one store (file :data:`CONSUMERS_FILE`); thread-safe."""

    def __init__(self, store_path: str, file_mode: int, fs: FileSystem, *, readonly: bool = False) -> None:
        self._dir = store_path
        self._path = os.path.join(store_path, CONSUMERS_FILE)
        self._file_mode = file_mode
        self._fs = fs
        self._readonly = readonly
        self._lock = threading.Lock()
        self._table: dict[str, dict[str, object]] = self._load()

    def _load(self) -> dict[str, dict[str, object]]:
        try:
            data = self._fs.read_file(self._path)
        except FileNotFoundError:
            return {}
        try:
            document = json.loads(data)
            table = document["consumers"]
            if document.get("version") != 1 or document.get("crc32c") != crc32c(_canonical(table)):
                raise ValueError("bad version or CRC")
            for name, entry in table.items():
                if not _NAME.fullmatch(name) or type(entry["position"]) is not int or not (entry["dropped"] is None or type(entry["dropped"]) is str):
                    raise ValueError(f"bad entry {name!r}")
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise CorruptionError(
                f"the consumers file is damaged ({error})", path=self._path, offset=0, hint="restore it, or delete it to forget every consumer (their positions are lost)"
            ) from None
        return table  # type: ignore[no-any-return]

    def _save(self) -> None:
        document = {"version": 1, "consumers": self._table, "crc32c": crc32c(_canonical(self._table))}
        _layout.write_atomically(self._dir, CONSUMERS_FILE, json.dumps(document, indent=1, sort_keys=True).encode() + b"\n", self._file_mode, self._fs)

    @staticmethod
    def check_name(name: object) -> str:
        if type(name) is not str or not _NAME.fullmatch(name):
            raise InvalidArgument(
                f"a consumer name is 1..128 characters of letters, digits and . _ : - (starting with a letter or digit), got {name!r}", key="name"
            )
        return name

    def get(self, name: str) -> tuple[int, str | None] | None:
        """(position, dropped) of consumer ``name``, or None if there is none."""
        with self._lock:
            entry = self._table.get(name)
            return None if entry is None else (entry["position"], entry["dropped"])  # type: ignore[return-value]

    def create(self, name: str, position: int) -> tuple[int, str | None]:
        """Consumer ``name``, created at ``position`` if new (durably); its (position, dropped)."""
        with self._lock:
            entry = self._table.get(name)
            if entry is None:
                entry = self._table[name] = {"position": position, "dropped": None}
                self._save()
            return entry["position"], entry["dropped"]  # type: ignore[return-value]

    def ack(self, name: str, lsn: int) -> None:
        """Record durably that ``name`` processed every change up to ``lsn`` (forward only)."""
        with self._lock:
            entry = self._table.get(name)
            if entry is None:
                raise InvalidArgument(f"no consumer named {name!r}: it was removed", key=name, hint="store.consumer(name) creates it again")
            if lsn < entry["position"]:  # type: ignore[operator]
                raise InvalidArgument(
                    f"consumer {name!r} acknowledged {entry['position']} already; an ack moves forward only, got {lsn}", key="lsn"
                )
            if lsn != entry["position"]:
                entry["position"] = lsn
                self._save()

    def drop(self, name: str, reason: str) -> None:
        """Unpin consumer ``name`` (it stays listed, with ``reason``), durably."""
        with self._lock:
            entry = self._table.get(name)
            if entry is not None and entry["dropped"] is None:
                entry["dropped"] = reason
                self._save()
                log.warning("store %s: consumer %r dropped: %s", self._dir, name, reason)

    def remove(self, name: str) -> bool:
        """Forget consumer ``name``; False if there was none."""
        with self._lock:
            if self._table.pop(name, None) is None:
                return False
            self._save()
            return True

    def items(self) -> list[tuple[str, int, str | None]]:
        """(name, position, dropped) of every consumer, by name."""
        with self._lock:
            return [(name, e["position"], e["dropped"]) for name, e in sorted(self._table.items())]  # type: ignore[misc]

    def pin(self, segments: list[Segment], max_log_bytes: int) -> int | None:
        """The lowest position of a consumer that pins the log (None: none does); drops those over the cap.

        A consumer at position P needs every frame after P: the segments
        from the one holding P + 1 on.  If those hold more than
        ``max_log_bytes``, it is dropped instead of pinning them.
        """
        pin = None
        for name, position, dropped in self.items():
            if dropped is not None:
                continue
            behind = sum(s.size for s in segments if s.last_lsn > position)
            if behind > max_log_bytes:
                self.drop(name, f"it fell {behind} bytes of log behind, over max_log_bytes={max_log_bytes}")
                continue
            pin = position if pin is None else min(pin, position)
        return pin


def _canonical(table: object) -> bytes:
    return json.dumps(table, sort_keys=True, separators=(",", ":")).encode()


def follow(read: ReadFn, wait: WaitFn, since: int, limit: int | None, timeout: float | None, clock: ClockFn) -> Iterator[Change]:
    """The changes after ``since`` (at most ``limit``), waiting for new ones until ``timeout`` (total) passes.

    ``read(after, limit)`` returns the changes available now after
    ``after``; ``wait(after, remaining)`` blocks until one after ``after``
    may be available (True), or returns False when the time is up or the
    store stops.  No LMDB transaction is held: the log is files.
    """
    deadline = None if timeout is None else clock() + timeout
    position, left = since, limit
    while left is None or left > 0:
        batch = read(position, _FOLLOW_BATCH if left is None else min(left, _FOLLOW_BATCH))
        if batch:
            yield from batch
            position = batch[-1].lsn
            if left is not None:
                left -= len(batch)
            continue
        remaining = None if deadline is None else deadline - clock()
        if (remaining is not None and remaining <= 0) or not wait(position, remaining):
            return


class ChangeLog:
    """The stream side of one open store: ``changes``, ``wait``, consumers and retention.

    ``visible()`` is the high watermark (the last LSN a reader may see);
    ``watchers()`` the writer's :class:`Watchers` (None in a read-only view,
    which then re-checks every :data:`VIEW_POLL_S`); ``head(user)`` is the
    store's.  The Store facade validates arguments and
    delegates here.
    """

    def __init__(
        self,
        store_path: str,
        *,
        visible: Callable[[], int],
        head: Callable[[int], int],
        watchers: Callable[[], Watchers | None],
        fs: FileSystem,
        readonly: bool,
        retention_bytes: int,
        retention_ms: int,
        max_log_bytes: int,
        clock_ms: Callable[[], int],
        monotonic: ClockFn = time.monotonic,
    ) -> None:
        self.wal_dir = os.path.join(store_path, _layout.WAL_DIR)
        self._store_path = store_path
        self.visible = visible
        self._head = head
        self._watchers = watchers
        self._fs = fs
        self._readonly = readonly
        self.retention_bytes = retention_bytes
        self.retention_ms = retention_ms
        self.max_log_bytes = max_log_bytes
        self._clock_ms = clock_ms
        self._monotonic = monotonic
        self._consumers: Consumers | None = None
        self._consumers_lock = threading.Lock()

    @property
    def consumers(self) -> Consumers:
        with self._consumers_lock:
            if self._consumers is None:
                self._consumers = Consumers(self._store_path, _layout.store_file_mode(self._store_path), self._fs, readonly=self._readonly)
            return self._consumers

    # --- retention ------------------------------------------------------------------

    def retire_upto(self, applied: int) -> int:
        """Up to which LSN the writer may delete WAL segments now (called by the applier and on open)."""
        segments = segment_infos(self.wal_dir, self._clock_ms())
        if len(segments) <= 1:
            return 0
        pin = self.consumers.pin(segments, self.max_log_bytes)
        return retire_upto(segments, applied, self.retention_bytes, self.retention_ms, pin)

    # --- reading ----------------------------------------------------------------------

    def oldest_lsn(self) -> int:
        return LogReader(self.wal_dir).oldest_lsn()

    def changes(self, since: int, limit: int | None, follow: bool, timeout: float | None) -> Iterator[Change]:
        """See :meth:`Store.changes`.  Checks the position now; the iterator reads lazily."""
        end = self.visible()
        if since > end:
            raise InvalidArgument(
                f"since={since} is beyond the end of the change log ({end})",
                key="since",
                hint="a position from another history (a restored or another store): start again from a snapshot",
            )
        reader = LogReader(self.wal_dir)
        if since < end:
            try:
                reader.seek(since + 1)  # raises if the log no longer holds since + 1
            except SnapshotRequired as error:
                reader.close()
                raise self.snapshot_required(error) from None
        return self._iterate(reader, since, limit, follow, timeout)

    def _iterate(self, reader: LogReader, since: int, limit: int | None, follow_: bool, timeout: float | None) -> Iterator[Change]:
        try:
            if not follow_:
                position, left = since, limit
                while left is None or left > 0:
                    batch = reader.changes(position, self.visible(), _FOLLOW_BATCH if left is None else min(left, _FOLLOW_BATCH))
                    if not batch:
                        return
                    yield from batch
                    position = batch[-1].lsn
                    if left is not None:
                        left -= len(batch)
                return
            watchers = self._watchers()
            event = watchers.watch_log() if watchers is not None else None
            try:
                yield from follow(lambda after, n: reader.changes(after, self.visible(), n), functools.partial(self._wait, event), since, limit, timeout, self._monotonic)
            finally:
                if event is not None and watchers is not None:
                    watchers.unwatch(event)
        except SnapshotRequired as error:  # retention overtook a slow reader between two batches
            raise self.snapshot_required(error) from None
        finally:
            reader.close()

    def _wait(self, event: threading.Event | None, after: int, timeout: float | None) -> bool:
        """Block until a change after ``after`` is visible (True), or the timeout passes or the store stops (False)."""
        if event is None:  # a read-only view has no writer to wake it: re-check the applied LSN
            time.sleep(VIEW_POLL_S if timeout is None else min(VIEW_POLL_S, timeout))
            return True
        watchers = self._watchers()
        event.clear()  # before reading the watermark: a write after the read sets it again
        if self.visible() > after:
            return True
        if watchers is None or watchers.closed:
            return False
        if not event.wait(timeout):
            return self.visible() > after
        # Woken: by a write, or by the store closing -- what was written before it closed is still read.
        return self.visible() > after or not watchers.closed

    def wait(self, user: int, since: int, timeout: float | None) -> bool:
        """See :meth:`Store.wait`."""
        deadline = None if timeout is None else self._monotonic() + timeout
        watchers = self._watchers()
        event = watchers.watch_user(user) if watchers is not None else None
        try:
            while True:
                if event is not None:
                    event.clear()  # before reading the head: a record arriving after the read sets it again
                if self._head(user) > since:
                    return True
                remaining = None if deadline is None else deadline - self._monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                if event is None:
                    time.sleep(VIEW_POLL_S if remaining is None else min(VIEW_POLL_S, remaining))
                elif not event.wait(remaining):
                    return self._head(user) > since
                elif watchers is not None and watchers.closed:
                    return False
        finally:
            if event is not None and watchers is not None:
                watchers.unwatch(event, user)

    # --- snapshots ------------------------------------------------------------------------

    def snapshot_required(self, error: SnapshotRequired) -> SnapshotRequired:
        """``error`` with the newest recorded snapshot that bridges the gap, if any."""
        found = newest_snapshot(self._store_path)
        oldest = self.oldest_lsn()
        if found is not None and found[0] >= oldest - 1:
            lsn, where = found
            return SnapshotRequired(
                f"{error.message}; snapshot {lsn} at {where} bridges the gap",
                requested_lsn=error.requested_lsn,
                oldest_lsn=oldest,
                snapshot_lsn=lsn,
                snapshot_dir=where,
                hint=f"restore {where} (syncstore.restore) or read it, then read changes(since={lsn})",
            )
        return SnapshotRequired(error.message, requested_lsn=error.requested_lsn, oldest_lsn=oldest)


class Consumer:
    """A named, persistent reader of the change log, from ``Store.consumer(name)``.

    ``position`` is the last LSN it acknowledged (``ack``): it pins the log
    after it (up to the store's ``max_log_bytes``) and ``changes()`` reads on
    from it.  ``dropped`` is None, or why it no longer pins the log (it stays
    listed until ``Store.drop_consumer``); a dropped consumer can still read
    while the log holds its position, and gets :class:`SnapshotRequired`
    after.
    """

    def __init__(self, changelog: ChangeLog, name: str) -> None:
        self._log = changelog
        self.name = name

    def _entry(self) -> tuple[int, str | None]:
        entry = self._log.consumers.get(self.name)
        if entry is None:
            raise InvalidArgument(f"no consumer named {self.name!r}: it was removed", key=self.name, hint="store.consumer(name) creates it again")
        return entry

    @property
    def position(self) -> int:
        return self._entry()[0]

    @property
    def dropped(self) -> str | None:
        return self._entry()[1]

    @property
    def lag(self) -> int:
        """Changes not acknowledged yet: the store's LSN minus ``position``."""
        return max(0, self._log.visible() - self.position)

    def ack(self, lsn: int) -> None:
        """Record, durably, that every change up to ``lsn`` is processed.  Forward only; ``lsn`` <= ``store.lsn``."""
        check_u64("lsn", lsn)
        end = self._log.visible()
        if lsn > end:
            raise InvalidArgument(f"cannot acknowledge {lsn}: the change log ends at {end}", key="lsn")
        self._log.consumers.ack(self.name, lsn)

    def changes(self, limit: int | None = None, follow: bool = False, timeout: float | None = None) -> Iterator[Change]:
        """``store.changes(since=position, ...)``; acknowledging is up to the caller (``ack``)."""
        return self._log.changes(self.position, limit, follow, timeout)

    def __repr__(self) -> str:
        return f"<syncstore.Consumer {self.name!r}>"


def newest_snapshot(store_path: str) -> tuple[int, str] | None:
    """(LSN, directory) of the newest snapshot recorded for the store at ``store_path``, or None."""
    import importlib  # noqa: PLC0415 - snapshot builds on the change log, not the other way round

    try:
        snapshot = importlib.import_module("syncstore.snapshot")
    except ImportError:  # until snapshots land
        return None
    return snapshot.newest_snapshot(store_path)  # type: ignore[no-any-return]
