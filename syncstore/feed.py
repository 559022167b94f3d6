"""The merged feed: one stream that bootstraps a consumer from any position (the design's two sync modes).

``Store.feed(since)`` yields, when the log still holds ``since + 1``, the
changes after it (and, with ``follow=True``, live ones); otherwise the
newest recorded snapshot that bridges the gap as :class:`SnapshotChunk`
events (one per block of its base and deltas, the last one ``final``), then
the changes after the snapshot's LSN.  With no such snapshot it takes one
into the directory the caller names, or raises :class:`SnapshotRequired`.  Each event has ``encode()``;
``syncstore.decode_event(bytes)`` reverses it (``_events``), so any transport
carries the one stream, and a follower takes every event with
``follower.apply(event)`` (``Store.apply``).

The snapshot's files are opened while its directory is held shared (no
snapshot replaces the chain meanwhile), then read through the open
descriptors, so a slow consumer never holds up the next snapshot.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator

from ._restore import _chain_upto
from ._snapdir import entry_path, read_blocks, read_manifest
from ._snapformat import ChainEntry, Manifest
from .changelog import ChangeLog
from .errors import SnapshotRequired, StoreNotFound
from .model import Change, Event, SnapshotChunk

__all__ = ["feed"]


def feed(changelog: ChangeLog, since: int, follow: bool, timeout: float | None, take_snapshot: Callable[[], object] | None) -> Iterator[Event]:
    """See :meth:`Store.feed`.  Positions now; streams lazily.  ``take_snapshot``: None, or takes a snapshot where the caller said."""
    try:
        return iter(changelog.changes(since, None, follow, timeout))
    except SnapshotRequired as error:
        if error.snapshot_dir is None:
            if take_snapshot is None:
                raise
            take_snapshot()
            try:
                return iter(changelog.changes(since, None, follow, timeout))
            except SnapshotRequired as again:
                error = again
        if error.snapshot_dir is None or error.snapshot_lsn is None:
            raise error from None
        chunks = _chunks(error.snapshot_dir, error.snapshot_lsn)
        return _then(chunks, lambda lsn: changelog.changes(lsn, None, follow, timeout), error.snapshot_lsn)


def _then(chunks: Iterator[SnapshotChunk], changes: Callable[[int], Iterator[Change]], lsn: int) -> Iterator[Event]:
    yield from chunks
    yield from changes(lsn)


def _chunks(directory: str, lsn: int) -> Iterator[SnapshotChunk]:
    """The snapshot at ``lsn`` in ``directory`` (its base and deltas up to it) as chunks, one per block, in order."""
    lock = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    opened: list[tuple[int, ChainEntry]] = []
    try:
        fcntl.flock(lock, fcntl.LOCK_SH)
        manifest = read_manifest(directory)
        if manifest is None:
            raise StoreNotFound(f"{directory} holds no snapshot (no MANIFEST)", path=directory)
        chain = _chain_upto(manifest, lsn, directory)
        for entry in chain:
            opened.append((os.open(entry_path(directory, entry), os.O_RDONLY), entry))
    except BaseException:
        for fd, _entry in opened:
            os.close(fd)
        raise
    finally:
        os.close(lock)  # the files stay readable through their descriptors, whatever replaces them
    return _stream(opened, manifest, lsn)


def _stream(opened: list[tuple[int, ChainEntry]], manifest: Manifest, lsn: int) -> Iterator[SnapshotChunk]:
    try:
        last_id = opened[-1][1].last_msg_id
        index, pending = 0, None
        for fd, entry in opened:
            for rows in read_blocks(f"/proc/self/fd/{fd}", entry, manifest):  # Linux: the open file, whatever its name is now
                if pending is not None:
                    yield SnapshotChunk(lsn, index, False, manifest.epoch, manifest.replica_id, None, tuple(pending))
                    index += 1
                pending = rows
        yield SnapshotChunk(lsn, index, True, manifest.epoch, manifest.replica_id, last_id, tuple(pending or ()))
    finally:
        for fd, _entry in opened:
            with contextlib.suppress(OSError):
                os.close(fd)
