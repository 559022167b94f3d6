"""Nth-operation fault injection through the I/O seam.

For N = 1, 2, ... until the workload runs clean, the Nth file operation of the
store's own writers fails (EIO or ENOSPC), either once or from then on.  Each
time: the failing call raises a SyncStoreError, nothing acknowledged is lost,
the store reopens (on a healthy file system) to a state that is a prefix of
the operations that includes everything acknowledged, and check() passes.
"""

from __future__ import annotations

import errno
import os
import shutil

import pytest

import syncstore
from syncstore import Message, SyncStoreError
from syncstore._fileio import FileSystem

OPERATIONS = ("open", "close", "pwrite", "write", "allocate", "fdatasync", "fsync", "truncate", "rename", "unlink", "fsync_dir", "read_file", "listdir")


class NthFaultFS(FileSystem):
    """Counts every operation; the ``fail_at``-th (1-based) fails, once or persistently."""

    def __init__(self, fail_at: int | None, error: int, persistent: bool) -> None:
        self.fail_at = fail_at
        self.error = error
        self.persistent = persistent
        self.count = 0
        self.injected: str | None = None

    def _tick(self, name: str) -> None:
        self.count += 1
        if self.fail_at is None or self.count < self.fail_at:
            return
        if self.count == self.fail_at or self.persistent:
            self.injected = self.injected or name
            raise OSError(self.error, f"injected {os.strerror(self.error)} in {name}")


def _counted(name: str):
    def method(self, *args, **kwargs):
        self._tick(name)
        return getattr(FileSystem, name)(self, *args, **kwargs)

    method.__name__ = name
    return method


for _name in OPERATIONS:
    setattr(NthFaultFS, _name, _counted(_name))


def workload(path: str, fs: FileSystem, acked: dict[tuple[int, int], syncstore.Delivery]) -> None:
    """A small realistic run: 1:1 and group sends, a retry, a bulk load, a reopen, rotation."""
    options = dict(fs=fs, segment_bytes=4096, log_retention_bytes=0, log_retention_ms=0)  # segments retire as soon as applied
    store = syncstore.open(path, **options)
    try:
        for seq in range(1, 13):
            message = Message(sender=1, conv=seq % 3, client_seq=seq, body=b"x" * 150)
            acked[(1, seq)] = store.deliver(message, to=[1, 2] if seq % 2 else [1, 2, 3, 4])
        acked[(1, 5)] = store.deliver(Message(sender=1, conv=2, client_seq=5, body=b"x" * 150), to=[2, 1])  # a retry
        batch = [(Message(sender=2, conv=9, client_seq=seq, body=b"y" * 100), [3, 5]) for seq in range(1, 25)]
        for (message, _to), delivery in zip(batch, store.deliver_many(batch)):
            acked[(2, message.client_seq)] = delivery
    finally:
        store.close()
    store = syncstore.open(path, **options)
    try:
        for seq in range(13, 30):
            message = Message(sender=1, conv=1, client_seq=seq, body=b"z" * 300)
            acked[(1, seq)] = store.deliver(message, to=[2, 6])
    finally:
        store.close()


def verify(path: str, acked: dict[tuple[int, int], syncstore.Delivery]) -> None:
    with syncstore.open(path) as store:
        store.check()  # dense cursors, heads, dedup index consistent
        for (sender, seq), delivery in acked.items():
            for uid, cursor in delivery.cursors.items():
                page = store.sync(uid, cursor - 1, 1)
                assert page.messages and page.messages[0].msg_id == delivery.msg_id, (sender, seq, uid, cursor)
            first = store.sync(uid, cursor - 1, 1).messages[0]  # a retry repeats the content (issue 7)
            retry = store.deliver(Message(sender=sender, conv=first.conv, client_seq=seq, body=first.body), to=list(delivery.cursors))
            assert retry.duplicate and retry.msg_id == delivery.msg_id


def clean_run_operations(tmp_path) -> int:
    fs = NthFaultFS(None, errno.EIO, False)
    workload(str(tmp_path / "clean"), fs, {})
    return fs.count


@pytest.mark.parametrize("error", [errno.EIO, errno.ENOSPC])
@pytest.mark.parametrize("persistent", [False, True], ids=["once", "from-then-on"])
def test_nth_operation_fault(tmp_path, error, persistent):
    # How many operations a run takes varies a little (the background applier retires WAL
    # segments when it gets to it), so N runs until the workload runs clean, not to a count.
    total = clean_run_operations(tmp_path)
    assert total > 50  # the seam really sees the workload's file operations
    injected_kinds = set()
    for n in range(1, 4 * total):
        path = str(tmp_path / f"n{n}")
        fs = NthFaultFS(n, error, persistent)
        acked: dict[tuple[int, int], syncstore.Delivery] = {}
        try:
            workload(path, fs, acked)
        except SyncStoreError:
            pass  # the failing call must raise a SyncStoreError: anything else fails the test
        if fs.injected is None:  # operation n was never reached: every earlier one was tried
            assert n > total // 2, f"the workload ran clean after only {n - 1} operations (a clean run took {total})"
            verify(path, acked)
            break
        injected_kinds.add(fs.injected)
        if os.path.isdir(os.path.join(path, "state")):
            verify(path, acked)
        else:
            assert not acked
        shutil.rmtree(path)
    else:
        pytest.fail(f"the workload never ran clean within {4 * total} operations")
    assert {"pwrite", "fsync", "fsync_dir", "allocate", "read_file", "unlink"} <= injected_kinds
