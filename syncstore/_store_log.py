"""The change-log face of :class:`~syncstore.store.Store`: lsn, changes, wait, consumers, followers.

A mixin, split from the facade by capability: like the rest of the facade it
validates arguments, then delegates -- to :class:`syncstore.changelog.ChangeLog`
(reading, waiting, retention, consumers) and to the writer (a follower's
``apply_changes``).  docs/design.md, "The change log", tells the design.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from . import _bootstrap, _layout
from ._codec import Record
from .changelog import ChangeLog, Consumer, Consumers, ConsumerStatus, segment_infos
from .errors import InvalidArgument
from .feed import feed
from .model import Change, Event, SnapshotChunk, check_u64

if TYPE_CHECKING:
    from ._fileio import FileSystem
    from ._writer import Writer
    from .state import State

__all__ = ["ChangeLogFacade"]

log = logging.getLogger("syncstore.store")


def _check_timeout(timeout: object) -> None:
    if timeout is not None and (type(timeout) not in (int, float) or not 0 <= timeout <= threading.TIMEOUT_MAX):  # type: ignore[operator]
        raise InvalidArgument(
            f"timeout must be None (no limit) or seconds in 0..{threading.TIMEOUT_MAX:.0f}, got {timeout!r}", key="timeout", hint="pass None to wait without a limit"
        )



class ChangeLogFacade:
    """The change-log methods of Store (see the module docstring); relies on the Store's attributes and guards."""

    path: str
    follower: bool
    _changelog: ChangeLog
    _writer: Writer | None
    _state: State | None
    _fs: FileSystem
    _epoch: int
    _clock: Callable[[], int]
    _bootstrap: tuple[int, int] | None

    if TYPE_CHECKING:

        def _check_usable(self, *, bootstrapping: bool = False) -> None: ...
        def _check_writer(self, *, leader: bool = True) -> Writer: ...
        def snapshot(self, dest_dir: str | os.PathLike[str], *, full: bool = False) -> object: ...

    def _visible_lsn(self) -> int:
        if self._writer is not None:
            return self._writer.synced_lsn
        assert self._state is not None
        return self._state.applied_lsn()

    @property
    def lsn(self) -> int:
        """The last durable LSN: every change up to it can be read with :meth:`changes`.

        In a read-only view, the last LSN the writer applied to LMDB (at most
        one apply interval behind).
        """
        self._check_usable(bootstrapping=True)  # 0 while a follower bootstraps: where its feed starts
        return self._visible_lsn()

    def changes(self, since: int = 0, limit: int | None = None, follow: bool = False, timeout: float | None = None) -> Iterator[Change]:
        """The change log after ``since``: :class:`Change` records in LSN order (durable ones only).

        ``limit`` caps how many (None: all).  ``follow=True`` keeps waiting
        for new changes -- woken by the group commit, no polling, no LMDB
        transaction held -- until ``timeout`` seconds in all have passed
        (None: until the store closes); the iteration then ends quietly.
        Raises :class:`SnapshotRequired` (at the call, or later if retention
        overtakes a slow reader) when the log no longer holds ``since + 1``,
        naming the newest recorded snapshot that bridges the gap;
        :class:`InvalidArgument` for a ``since`` beyond :attr:`lsn`.  Change
        kinds and their fields: :class:`Change`; format: docs/format.md.
        """
        self._check_changes(since, limit, follow, timeout)
        return self._changelog.changes(since, limit, follow, timeout)

    def _check_changes(self, since: int, limit: int | None, follow: bool, timeout: float | None) -> None:
        """Validate :meth:`changes`' arguments (no I/O: ``syncstore.aio`` calls it on the event loop)."""
        self._check_usable()
        check_u64("since", since)
        if limit is not None and (type(limit) is not int or limit < 1):
            raise InvalidArgument(f"limit must be None or an int >= 1, got {limit!r}", key="limit")
        if type(follow) is not bool:
            raise InvalidArgument(f"follow must be True or False, got {follow!r}", key="follow")
        _check_timeout(timeout)
        if timeout is not None and not follow:
            raise InvalidArgument("timeout is how long follow=True waits for new changes: pass follow=True too, or no timeout", key="timeout")

    def wait(self, user: int, since: int, timeout: float | None = None) -> bool:
        """Block until ``head(user) > since`` (True), or ``timeout`` seconds pass (False): an IM gateway's long-poll.

        Woken by the durable write that reaches ``user``, not by polling (a
        read-only view, which has no writer to wake it, re-checks every 50 ms).
        Returns False too if the store closes meanwhile.
        """
        self._check_wait(user, since, timeout)
        return self._changelog.wait(user, since, timeout)

    def _check_wait(self, user: int, since: int, timeout: float | None) -> None:
        """Validate :meth:`wait`'s arguments (no I/O)."""
        self._check_usable()
        check_u64("user", user)
        check_u64("since", since)
        _check_timeout(timeout)

    def consumer(self, name: str, start: int | None = None) -> Consumer:
        """The named, persistent consumer ``name``, created at position ``start`` (None: :attr:`lsn`) if new.

        It pins the log after its acknowledged position (``consumer.ack``)
        up to ``max_log_bytes``; see :class:`~syncstore.changelog.Consumer`.
        ``start`` is ignored for an existing consumer.
        """
        self._check_writer(leader=not self.follower)
        name = Consumers.check_name(name)
        if start is not None:
            check_u64("start", start)
            if start > self.lsn:
                raise InvalidArgument(f"start={start} is beyond the end of the change log ({self.lsn})", key="start")
        self._changelog.consumers.create(name, self.lsn if start is None else start)
        return Consumer(self._changelog, name)

    def consumers(self) -> list[ConsumerStatus]:
        """Every named consumer: position, lag, WAL bytes it pins, and whether (why) it was dropped."""
        self._check_usable()
        end = self._visible_lsn()
        segments = segment_infos(self._changelog.wal_dir, self._clock())
        out = []
        for name, position, dropped in self._changelog.consumers.items():
            pinned = 0 if dropped is not None else sum(s.size for s in segments[:-1] if s.last_lsn > position)
            out.append(ConsumerStatus(name, position, max(0, end - position), pinned, dropped))
        return out

    def drop_consumer(self, name: str) -> bool:
        """Remove consumer ``name`` (it no longer pins anything); False if there was none."""
        self._check_writer(leader=not self.follower)
        return self._changelog.consumers.remove(Consumers.check_name(name))

    def apply_changes(self, changes: Iterable[Change]) -> int:
        """A follower takes its leader's changes (from ``leader.changes(...)``, in LSN order); returns how many were new.

        Each change is appended to this store's own log at the leader's LSN
        and applied like a local write: after restoring a snapshot at LSN S
        and applying ``leader.changes(since=S)``, inboxes, heads, cursors and
        dedup index equal the leader's.  A change at or below :attr:`lsn` is
        skipped (applied twice is harmless); one that leaves a gap raises
        :class:`LogGap` naming the missing LSNs, and a delivery that does not
        continue a user's cursors raises :class:`CorruptionError` (the
        follower diverged) -- in both cases nothing of the call is applied.
        Durable and visible on return, in every durability mode.  Only on a store opened with ``follower=True``.
        """
        writer = self._check_writer(leader=False)
        if self._bootstrap is not None:
            raise InvalidArgument(
                f"this follower is bootstrapping: it expects chunk {self._bootstrap[1]} of snapshot {self._bootstrap[0]}, not changes", key="changes"
            )
        if isinstance(changes, (str, bytes)) or not isinstance(changes, Iterable):
            raise InvalidArgument(f"changes must be an iterable of syncstore.Change, got {type(changes).__name__}", key="changes")
        items: list[tuple[int, Record]] = []
        for index, change in enumerate(changes):
            if not isinstance(change, Change):
                raise InvalidArgument(f"changes[{index}] is a {type(change).__name__}, not a syncstore.Change", key="changes")
            if items and change.lsn != items[-1][0] + 1:
                raise InvalidArgument(f"changes must be in LSN order without gaps: {change.lsn} after {items[-1][0]}", key="changes")
            items.append((change.lsn, change.record()))
        applied = writer.append_records(items)
        writer.flush()  # durable and visible on return, whatever the durability mode: lsn and sync show them
        return applied

    def apply(self, event: Event) -> int:
        """A follower takes one feed event (:meth:`feed`, or ``syncstore.decode_event`` of its bytes); returns 1 if it was new, else 0.

        A :class:`Change` goes as in :meth:`apply_changes`.  A
        :class:`SnapshotChunk` bootstraps an empty follower (LSN 0): chunks
        must come in order from index 0 (another order raises
        :class:`InvalidArgument` naming the chunk expected, changing
        nothing); until the final one the follower answers no read
        (:class:`StoreNotReady`), and with it the follower holds exactly the
        snapshot's state at its LSN, takes the source's epoch, and continues
        with the changes after it.  A follower killed mid-bootstrap starts
        empty again on its next open: feed it again from the first chunk
        (docs/design.md, "The merged feed").
        """
        self._check_writer(leader=False)
        if isinstance(event, Change):
            return self.apply_changes([event])
        if not isinstance(event, SnapshotChunk):
            raise InvalidArgument(f"event must be a syncstore.Change or SnapshotChunk, got {type(event).__name__}", key="event")
        writer = self._check_writer(leader=False)
        assert self._state is not None
        with writer.apply_lock:  # the applier stays out of LMDB meanwhile
            if event.index == 0 and (writer.synced_lsn or len(writer.overlay)):
                raise InvalidArgument(
                    f"this follower is at LSN {writer.synced_lsn}: a snapshot bootstraps only an empty follower",
                    key="event",
                    hint=f"feed it from its own position: leader.feed(since={writer.synced_lsn})",
                )
            _bootstrap.apply_chunk(self._state, event)
            self._bootstrap = None if event.final else (event.snapshot_lsn, event.index + 1)
            if event.final:
                marker = _layout.read_marker(self.path, self._fs)
                _layout.write_marker(self.path, dataclasses.replace(marker, epoch=event.epoch), _layout.store_file_mode(self.path), self._fs)
                self._epoch = event.epoch  # the leader's history, continued
                writer.restart_log(event.snapshot_lsn)
                _bootstrap.finish(self._state, event.snapshot_lsn)
                if event.last_msg_id is not None:
                    writer.observe_msg_id(event.last_msg_id)
                log.info("store %s: bootstrapped from snapshot %d (%d chunks)", self.path, event.snapshot_lsn, event.index + 1)
        return 1

    def feed(self, since: int = 0, follow: bool = False, timeout: float | None = None, snapshot_dir: str | None = None) -> Iterator[Event]:
        """One stream that brings any consumer from ``since`` to now (and on, with ``follow=True``).

        If the log holds ``since + 1``: the changes after ``since``.
        Otherwise the newest recorded snapshot that bridges the gap as
        :class:`SnapshotChunk` events, then the changes after its LSN.  With
        no such snapshot, one is taken now into ``snapshot_dir`` if given
        (outside the store; a writable store only), else
        :class:`SnapshotRequired` is raised -- never a silent restart.
        ``follow`` and ``timeout`` as in :meth:`changes`.  Every event has
        ``encode()``; a follower takes each with :meth:`apply`.
        """
        return feed(self._changelog, since, follow, timeout, self._check_feed(since, follow, timeout, snapshot_dir))

    def _check_feed(self, since: int, follow: bool, timeout: float | None, snapshot_dir: str | None) -> Callable[[], object] | None:
        """Validate :meth:`feed`'s arguments (no I/O); return how to take a snapshot into ``snapshot_dir`` (None: not given)."""
        self._check_usable()
        check_u64("since", since)
        if type(follow) is not bool:
            raise InvalidArgument(f"follow must be True or False, got {follow!r}", key="follow")
        _check_timeout(timeout)
        take = None
        if snapshot_dir is not None:
            if not isinstance(snapshot_dir, (str, os.PathLike)) or not os.fspath(snapshot_dir):
                raise InvalidArgument(f"snapshot_dir must name a directory, got {snapshot_dir!r}", key="snapshot_dir")
            inside = os.path.realpath(snapshot_dir)
            if os.path.commonpath([inside, os.path.realpath(self.path)]) == os.path.realpath(self.path):
                raise InvalidArgument(f"snapshot_dir {snapshot_dir} is inside the store", key="snapshot_dir", hint="write snapshots outside the store directory (another disk, ideally)")
            take = functools.partial(self.snapshot, os.fspath(snapshot_dir))
        return take

    def promote(self) -> int:
        """Turn this follower into a writable leader (failover); return its new epoch.

        The store takes local writes from now on and stops taking
        ``apply_changes``.  It gets a new epoch, written to its marker before
        this returns: its history forks from the old leader's here, so a
        client holding the old leader's epoch resyncs (a reset page) instead
        of silently mixing two histories.  Promote only once the old leader
        is gone for good: both share the replica id, so message ids stay
        unique only while one of them writes.
        """
        writer = self._check_writer(leader=False)
        self._check_usable()  # a follower in the middle of a bootstrap is not promoted: StoreNotReady
        with writer.lock:  # no apply_changes meanwhile
            marker = _layout.read_marker(self.path, self._fs)
            promoted = dataclasses.replace(marker, epoch=_layout.new_epoch(), follower=False)
            _layout.write_marker(self.path, promoted, _layout.store_file_mode(self.path), self._fs)
            self.follower, self._epoch = False, promoted.epoch
            writer.leader = True
        log.warning("store %s promoted from follower to leader at LSN %d: new epoch %d", self.path, self.lsn, promoted.epoch)
        return promoted.epoch

