"""The one exception tree of syncstore.

Every error raised by the library is a :class:`SyncStoreError`.  Each carries
what makes it actionable -- the file and byte offset for corruption, the key or
argument for bad input, the lock holder for a locked store -- and a ``hint``
that says what to do.  ``str(error)`` renders all of it on one line.

Whether the store is still usable after each error is documented in
``docs/errors.md``.
"""

from __future__ import annotations

__all__ = [
    "SyncStoreError",
    "InvalidArgument",
    "StoreNotFound",
    "LayoutError",
    "PermissionDenied",
    "StoreLocked",
    "StoreClosed",
    "ReadOnlyStore",
    "CorruptionError",
    "DurabilityError",
    "StoreFull",
    "ReadersFull",
    "UsedAfterFork",
    "IdempotencyConflict",
    "SnapshotRequired",
    "LogGap",
    "StoreNotReady",
]


class SyncStoreError(Exception):
    """Base class of every syncstore error.

    Attributes: ``path`` (file involved, or None), ``offset`` (byte offset in
    that file, or None), ``key`` (record key or argument name, or None) and
    ``hint`` (what to do about it).
    """

    default_hint = ""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        offset: int | None = None,
        key: object = None,
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.path = path
        self.offset = offset
        self.key = key
        self.hint = self.default_hint if hint is None else hint
        super().__init__(self._render())

    def _render(self) -> str:
        text = self.message
        where = []
        if self.path is not None:
            where.append(f"file {self.path}")
        if self.offset is not None:
            where.append(f"offset {self.offset}")
        if self.key is not None:
            where.append(f"key {self.key!r}")
        if where:
            text += f" ({', '.join(where)})"
        if self.hint:
            text += f"; {self.hint}"
        return text


class InvalidArgument(SyncStoreError, ValueError):
    """An argument is out of range or of the wrong type; nothing was written.

    The store stays fully usable: fix the argument and call again.
    """

    default_hint = "nothing was written; fix the argument and retry"


class StoreNotFound(SyncStoreError):
    """There is no store at the path (``open(create=False)``, or ``readonly=True``).

    Nothing was created.  A mistyped path or an unmounted volume shows up
    here instead of as a fresh, empty store.
    """

    default_hint = "check the path (and that its volume is mounted); open(path, create=True) creates a new store"


class LayoutError(SyncStoreError):
    """The path is not laid out as a store: a non-empty directory without the
    store marker, or a store entry of the wrong kind (a plain file named
    ``wal``).  ``path`` names the offending entry; nothing was changed.
    """

    default_hint = "pass the store's own directory, or a new or empty one to create a store; nothing was changed"


class PermissionDenied(SyncStoreError):
    """The process may not access a file or directory of the store as it must.

    The message names the path and the access needed (a writer needs read and
    write access to every file and directory of the store; a read-only view
    needs read access, see docs/reliability.md).  Nothing was changed.
    """

    default_hint = "run as the store's owner or fix the permissions (docs/reliability.md, Security); nothing was changed"


class StoreLocked(SyncStoreError):
    """Another writer (process or ``Store`` object) already holds the store.

    ``holder`` describes it (pid, host, command line) as recorded in the lock
    file.
    """

    default_hint = "close the other writer first, or open with readonly=True"

    def __init__(self, message: str, *, holder: str = "", **kwargs: object) -> None:
        self.holder = holder
        super().__init__(message, **kwargs)  # type: ignore[arg-type]


class StoreClosed(SyncStoreError):
    """The store was closed; open it again with ``syncstore.open``."""

    default_hint = "open the store again with syncstore.open()"


class ReadOnlyStore(SyncStoreError):
    """A write was attempted on a store opened with ``readonly=True``."""

    default_hint = "open the store without readonly=True to write"


class CorruptionError(SyncStoreError):
    """On-disk or received bytes fail validation (CRC, magic, structure).

    ``path`` and ``offset`` name where.  The store refuses to open rather than
    silently dropping data.
    """

    default_hint = (
        "the data is damaged; restore the named file from a replica or backup "
        "(nothing was dropped silently)"
    )


class DurabilityError(SyncStoreError):
    """An ``fsync``/``fdatasync`` or write of the log failed.

    The outcome of the unacknowledged writes is unknown; the store refuses all
    further writes until it is closed and reopened (reopening recovers from
    the log).  Reads keep working.
    """

    default_hint = "check the disk, then close and reopen the store; unacknowledged writes may or may not be present"


class StoreFull(SyncStoreError):
    """The disk or the LMDB map is full; the write was not acknowledged.

    Not a broken store: everything acknowledged before is kept, reads go on,
    and a disk that runs out of space heals by itself -- the store re-probes
    on later writes and resumes once space is back, with no reopen.  A map
    capped by ``max_map_size`` stays full until the store is reopened with a
    larger one (the hint says which case it is).
    """

    default_hint = "free disk space and retry the write; acknowledged data is safe"


class ReadersFull(SyncStoreError):
    """Every LMDB reader slot is held by a live read transaction (stale ones were cleared).

    The store stays usable: retry once readers finish, or reopen with a larger
    ``max_readers``.
    """

    default_hint = "raise the max_readers option of syncstore.open, or hold fewer read transactions at once"


class UsedAfterFork(SyncStoreError):
    """A store opened in a parent process was used in a forked child.

    LMDB environments and file locks must not cross ``fork()``: in the child
    the inherited store only raises this error.  It cannot be reopened in the
    same child either (py-lmdb refuses a second environment on the same files,
    and the inherited one must never be closed).
    """

    default_hint = (
        "use the store from the parent, or open it in a process started with the 'spawn' or "
        "'forkserver' multiprocessing method (or fork before opening it)"
    )

class IdempotencyConflict(SyncStoreError):
    """An idempotency key ``(sender, client_seq)`` was reused for different content.

    A retry must repeat the first delivery's ``conv``, ``body`` and set of
    recipients (``ts_ms`` and ``priority`` may differ).  ``key`` is
    ``(sender, client_seq)``; ``msg_id`` is the first delivery's msg_id, or
    None when the first delivery is another item of the same ``deliver_many``
    batch (or one a concurrent ``deliver_many`` is still writing).  Nothing
    was written and the store stays fully usable.
    """

    default_hint = (
        "nothing was written; a new message needs a new client_seq (client_seq is unique per sender), "
        "and a retry must repeat the first delivery's conv, body and recipients"
    )

    def __init__(self, message: str, *, msg_id: int | None = None, **kwargs: object) -> None:
        self.msg_id = msg_id
        super().__init__(message, **kwargs)  # type: ignore[arg-type]


class SnapshotRequired(SyncStoreError):
    """The change log no longer holds what was asked for: catch up from a snapshot, then follow the log.

    ``requested_lsn`` is the ``since`` that was asked for; ``oldest_lsn`` the
    oldest LSN the log still holds (changes after ``oldest_lsn - 1`` can be
    read).  ``snapshot_lsn`` and ``snapshot_dir`` name the newest recorded
    snapshot that bridges the gap (taken at ``snapshot_lsn >= oldest_lsn - 1``),
    or are both None when none does: then take a fresh one
    (``store.snapshot(dir)``).  Never a silent restart (docs/design.md, "Change log").
    The store stays fully usable.
    """

    default_hint = "restore the named snapshot (syncstore.restore) or read its contents, then read changes(since=snapshot_lsn)"

    def __init__(
        self,
        message: str,
        *,
        requested_lsn: int,
        oldest_lsn: int,
        snapshot_lsn: int | None = None,
        snapshot_dir: str | None = None,
        **kwargs: object,
    ) -> None:
        self.requested_lsn = requested_lsn
        self.oldest_lsn = oldest_lsn
        self.snapshot_lsn = snapshot_lsn
        self.snapshot_dir = snapshot_dir
        if snapshot_dir is None and "hint" not in kwargs:
            kwargs["hint"] = "no recorded snapshot covers the gap: take one with store.snapshot(dir) (or `syncstore snapshot PATH DIR`), restore it, then read changes(since=its lsn)"
        super().__init__(message, **kwargs)  # type: ignore[arg-type]


class LogGap(SyncStoreError):
    """A follower was given a change that does not follow its log: ``missing`` = (first, last) LSN missing.

    Nothing of the batch was applied and the follower stays usable: feed it
    the missing changes first.
    """

    default_hint = "feed the follower the missing changes first"

    def __init__(self, message: str, *, missing: tuple[int, int], **kwargs: object) -> None:
        self.missing = missing
        super().__init__(message, **kwargs)  # type: ignore[arg-type]


class StoreNotReady(SyncStoreError):
    """A follower is bootstrapping from a snapshot: its state is incomplete and it answers no read.

    Not a failure: apply the rest of the feed (``follower.apply(event)``);
    the store reads normally once the final snapshot chunk is applied.
    """

    default_hint = "apply the rest of the feed; reads work once its final chunk is applied"
