"""The change log as a stream: reading it from files, retention, and named consumers.

The WAL already is the change log -- every write is one record with a dense
LSN -- so this module adds no second copy of anything.  It owns:

* Reading: :class:`~syncstore._walread.LogReader` (shared with snapshots)
  reads frames after an LSN from the WAL directory's segment files, up to a
  bound given here (the high watermark in the writing process, the applied
  LSN in a read-only view: never an unsynced frame).  It keeps its position,
  so a tail that follows the log reads each frame once, and keeps the
  segments it reads open, so retention deleting a file meanwhile does not
  cut a read short.
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
import itertools
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from crc32c import crc32c

from . import _codec, _layout
from ._walread import LogReader, LogRetired, segment_files
from .snapshot import newest_snapshot
from ._fileio import FileSystem
from .errors import CorruptionError, InvalidArgument, SnapshotRequired, SyncStoreError
from ._watch import Watchers
from .model import Change, check_u64

__all__ = ["ChangeLog", "Consumer", "Segment", "retire_upto", "Consumers", "ConsumerStatus", "CONSUMERS_FILE", "DEFAULT_RETENTION_BYTES", "DEFAULT_RETENTION_MS", "DEFAULT_MAX_LOG_BYTES"]

log = logging.getLogger("syncstore.changelog")

CONSUMERS_FILE = "consumers"
DEFAULT_RETENTION_BYTES = 256 << 20  # of applied log kept for consumers and followers
DEFAULT_RETENTION_MS = 24 * 3_600_000
DEFAULT_MAX_LOG_BYTES = 4 << 30  # a consumer pins at most this much log behind its position
_NO_LAST = 2**64
_FOLLOW_BATCH = 1024
#: How often a read-only view re-checks for new changes (it has no writer to wake it).
VIEW_POLL_S = 0.05
ReadFn = Callable[[int, int], list[Change]]
WaitFn = Callable[[int, float | None], bool]
ClockFn = Callable[[], float]  # the last LSN of the segment being written to: open-ended
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


def segment_infos(wal_dir: str, now_ms: int) -> list[Segment]:
    """The segments of a WAL directory as retention sees them (sizes are of written frames only)."""
    segments = segment_files(wal_dir)
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
                raise InvalidArgument(f"no consumer named {name!r}: it was removed", key="name", hint="store.consumer(name) creates it again")
            if lsn < entry["position"]:  # type: ignore[operator]
                raise InvalidArgument(
                    f"consumer {name!r} acknowledged {entry['position']} already; an ack moves forward only, got {lsn}", key="lsn"
                )
            if lsn != entry["position"] or entry["dropped"] is not None:
                if entry["dropped"] is not None:  # it caught up (from a snapshot): it pins again, within the cap
                    log.info("store %s: consumer %r acknowledged %d and pins the log again", self._dir, name, lsn)
                entry["position"], entry["dropped"] = lsn, None
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
        check_usable: Callable[[], None] = lambda: None,
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
        self.check_usable = check_usable  # the store's guard: a consumer handle of a closed store raises StoreClosed
        self._monotonic = monotonic
        self._consumers: Consumers | None = None
        self._retention_problem = ""  # the last retention error logged (each distinct one once)
        self._consumers_lock = threading.Lock()

    @property
    def consumers(self) -> Consumers:
        with self._consumers_lock:
            if self._consumers is None:
                self._consumers = Consumers(self._store_path, _layout.store_file_mode(self._store_path), self._fs, readonly=self._readonly)
            return self._consumers

    # --- retention ------------------------------------------------------------------

    def retire_upto(self, applied: int) -> int:
        """Up to which LSN the writer may delete WAL segments now (called by the applier and on open).

        Retention is housekeeping: if the policy cannot be read (a damaged
        consumers file, an I/O error), nothing is deleted -- the safe side --
        and the problem is logged once per distinct error, never raised into
        the applier or an open.
        """
        try:
            return self._retire_upto(applied)
        except (OSError, SyncStoreError) as error:
            if str(error) != self._retention_problem:
                self._retention_problem = str(error)
                log.warning("store %s: WAL retention skipped (nothing deleted): %s", self._store_path, error)
            return 0

    def _retire_upto(self, applied: int) -> int:
        segments = segment_infos(self.wal_dir, self._clock_ms())
        if len(segments) <= 1:
            return 0
        pin = self.consumers.pin(segments, self.max_log_bytes)
        # The log after the newest recorded snapshot stays too (up to the same cap), so that the
        # snapshot keeps bridging the gap for a feed or a consumer that falls behind.
        snapshot = newest_snapshot(self._store_path)
        if snapshot is not None and sum(s.size for s in segments if s.last_lsn > snapshot[0]) <= self.max_log_bytes:
            pin = snapshot[0] if pin is None else min(pin, snapshot[0])
        return retire_upto(segments, applied, self.retention_bytes, self.retention_ms, pin)

    # --- reading ----------------------------------------------------------------------

    def oldest_lsn(self) -> int:
        """The oldest LSN the log still holds (the first LSN of its oldest segment; 1 with none)."""
        segments = segment_files(self.wal_dir)
        return segments[0][0] if segments else 1

    def changes(self, since: int, limit: int | None, follow: bool, timeout: float | None) -> Iterator[Change]:
        """See :meth:`Store.changes`.  Checks the position now; the iterator reads lazily."""
        return self._iterate(self.open_reader(since), since, limit, follow, timeout)

    def open_reader(self, since: int) -> LogReader:
        """A reader positioned after ``since`` (:meth:`read` reads on); raises as :meth:`Store.changes` does for a bad position.

        The caller closes it.  (:mod:`syncstore.aio` follows the log with it, waiting on the event loop.)
        """
        end = self.visible()
        if since > end:
            raise InvalidArgument(
                f"since={since} is beyond the end of the change log ({end})",
                key="since",
                hint="a position from another history (a restored or another store): start again from a snapshot",
            )
        reader = LogReader(self.wal_dir)
        if since < end and reader.position(since) is None:  # the log no longer holds since + 1
            reader.close()
            raise self.snapshot_required(since)
        return reader

    def read(self, reader: LogReader, after: int, limit: int) -> list[Change]:
        """Up to ``limit`` visible changes after ``after`` (the reader resumes where it stopped).

        Raises :class:`LogRetired` if retention overtook the reader (callers turn it into :meth:`snapshot_required`).
        """
        return [
            Change.of(frame.lsn, _codec.decode_record(frame.rtype, frame.body, frame.lsn, reader.path_of(frame.lsn), frame.offset))
            for frame in itertools.islice(reader.frames(after, self.visible()), limit)
        ]

    def _iterate(self, reader: LogReader, since: int, limit: int | None, follow_: bool, timeout: float | None) -> Iterator[Change]:
        try:
            if not follow_:  # the same loop, with nothing to wait for
                yield from follow(functools.partial(self.read, reader), lambda _after, _remaining: False, since, limit, None, self._monotonic)
                return
            watchers = self._watchers()
            event = watchers.watch_log() if watchers is not None else None
            try:
                yield from follow(functools.partial(self.read, reader), functools.partial(self._wait, event), since, limit, timeout, self._monotonic)
            finally:
                if event is not None and watchers is not None:
                    watchers.unwatch(event)
        except LogRetired:  # retention overtook a slow reader between two batches
            raise self.snapshot_required(since) from None
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

    def snapshot_required(self, since: int) -> SnapshotRequired:
        """The error for a position the log no longer holds, naming the newest recorded snapshot that bridges the gap, if any."""
        found = newest_snapshot(self._store_path)
        oldest = self.oldest_lsn()
        message = f"the change log starts at LSN {oldest}: changes after {since} are no longer retained"
        if found is not None and found[0] >= oldest - 1:
            lsn, where = found
            return SnapshotRequired(
                f"{message}; snapshot {lsn} at {where} bridges the gap",
                requested_lsn=since,
                oldest_lsn=oldest,
                snapshot_lsn=lsn,
                snapshot_dir=where,
                hint=f"restore {where} (syncstore.restore) or read it, then read changes(since={lsn})",
            )
        return SnapshotRequired(message, requested_lsn=since, oldest_lsn=oldest)


class Consumer:
    """A named, persistent reader of the change log, from ``Store.consumer(name)``.

    ``position`` is the last LSN it acknowledged (``ack``): it pins the log
    after it (up to the store's ``max_log_bytes``) and ``changes()`` reads on
    from it.  ``dropped`` is None, or why it no longer pins the log (it stays
    listed until ``Store.drop_consumer``); a dropped consumer can still read
    while the log holds its position, and gets :class:`SnapshotRequired`
    after.  Its next ``ack`` (e.g. after catching up from a snapshot) makes
    it pin the log again.  Every call raises :class:`StoreClosed` once the
    store is closed.
    """

    def __init__(self, changelog: ChangeLog, name: str) -> None:
        self._log = changelog
        self.name = name

    def _entry(self) -> tuple[int, str | None]:
        self._log.check_usable()
        entry = self._log.consumers.get(self.name)
        if entry is None:
            raise InvalidArgument(f"no consumer named {self.name!r}: it was removed", key="name", hint="store.consumer(name) creates it again")
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
        self._entry()  # usable, and not removed
        end = self._log.visible()
        if lsn > end:
            raise InvalidArgument(f"cannot acknowledge {lsn}: the change log ends at {end}", key="lsn")
        self._log.consumers.ack(self.name, lsn)

    def changes(self, limit: int | None = None, follow: bool = False, timeout: float | None = None) -> Iterator[Change]:
        """``store.changes(since=position, ...)``; acknowledging is up to the caller (``ack``)."""
        return self._log.changes(self.position, limit, follow, timeout)

    def __repr__(self) -> str:
        return f"<syncstore.Consumer {self.name!r}>"
