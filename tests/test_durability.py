"""Durability policies and the failed-fsync rule, through the I/O seam."""

from __future__ import annotations

import errno
import os
import threading

import pytest

import syncstore
from syncstore import DurabilityError, Message, StoreFull
from syncstore._fileio import FileSystem


class FailingFS(FileSystem):
    """Fails one kind of file operation with ``error`` from its ``fail_at``-th call on."""

    def __init__(self, operation: str, error: int) -> None:
        self.operation = operation
        self.error = error
        self.fail_at: int | None = None  # armed later, after open
        self.calls: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if name == self.operation and self.fail_at is not None and self.calls[name] >= self.fail_at:
            raise OSError(self.error, os.strerror(self.error))

    def arm(self) -> None:
        """Fail the next call of the operation, and every later one."""
        self.fail_at = self.calls.get(self.operation, 0) + 1

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        self._count("pwrite")
        super().pwrite(fd, data, offset)

    def fdatasync(self, fd: int) -> None:
        self._count("fdatasync")
        super().fdatasync(fd)


def msg(seq: int) -> Message:
    return Message(sender=3, conv=1, client_seq=seq, body=b"m%d" % seq)


def test_failed_log_write_stops_writes_until_reopen(store_path):
    fs = FailingFS("pwrite", errno.EIO)
    store = syncstore.open(store_path, fs=fs)
    acked = [store.deliver(msg(seq), to=[1]) for seq in range(1, 6)]
    fs.arm()
    with pytest.raises(DurabilityError) as failed:
        store.deliver(msg(6), to=[1])
    assert not isinstance(failed.value, StoreFull)
    assert "reopen" in str(failed.value)
    attempts = fs.calls["pwrite"]
    with pytest.raises(DurabilityError):  # refused at once, without touching the log again
        store.deliver(msg(7), to=[1])
    with pytest.raises(DurabilityError):
        store.deliver_many([(msg(8), [1])])
    assert fs.calls["pwrite"] == attempts
    # reads keep working and see everything acknowledged
    assert [m.cursor for m in store.sync(1).messages] == [1, 2, 3, 4, 5]
    assert store.head(1) == 5
    store.close()
    with syncstore.open(store_path) as reopened:
        assert reopened.head(1) == 5
        assert [m.msg_id for m in reopened.sync(1).messages] == [d.msg_id for d in acked]
        assert reopened.deliver(msg(6), to=[1]).cursors == {1: 6}
        reopened.check()


@pytest.mark.parametrize("durability", ["sync", "interval", "none"])
def test_log_write_on_a_full_disk_is_refused_and_heals_without_reopen(store_path, durability):
    """ENOSPC from a WAL write is transient: the write is refused (nothing of it kept, its
    cursor not consumed), every later write re-probes, and once space is back the store
    goes on -- no reopen, nothing acknowledged lost, check() clean."""
    fs = FailingFS("pwrite", errno.ENOSPC)
    store = syncstore.open(store_path, fs=fs, durability=durability)
    acked = [store.deliver(msg(seq), to=[1, 2]) for seq in range(1, 6)]
    fs.arm()
    with pytest.raises(StoreFull) as failed:
        store.deliver(msg(6), to=[1, 2])
    assert "reopen" not in str(failed.value)
    assert not isinstance(failed.value, DurabilityError)  # the store is not broken
    attempts = fs.calls["pwrite"]
    with pytest.raises(StoreFull):
        store.deliver_many([(msg(7), [1]), (msg(8), [2])])
    assert fs.calls["pwrite"] > attempts  # a later write probes the disk again
    fs.fail_at = None  # space is back
    healed = [store.deliver(msg(seq), to=[1, 2]) for seq in range(6, 26)]
    assert [d.cursors for d in healed] == [{1: c, 2: c} for c in range(6, 26)]  # refused writes took no cursor
    assert not any(d.duplicate for d in healed)  # and left no dedup entry behind
    store.flush()  # readers see only durable writes
    assert [m.msg_id for m in store.sync(1).messages] == [d.msg_id for d in acked + healed]
    store.check()
    store.close()
    with syncstore.open(store_path) as reopened:
        assert [m.msg_id for m in reopened.sync(2).messages] == [d.msg_id for d in acked + healed]
        reopened.check()


def test_failed_fdatasync_is_never_retried(store_path):
    fs = FailingFS("fdatasync", errno.EIO)
    store = syncstore.open(store_path, durability="interval", fs=fs)
    store.deliver(msg(1), to=[1])
    fs.arm()
    # The background flusher syncs at least every 100 ms; keep writing until the
    # failure surfaces (bounded by the number of attempts, not by time).
    with pytest.raises(DurabilityError):
        for seq in range(2, 1_000_000):
            store.deliver(msg(seq), to=[1])
    syncs = fs.calls["fdatasync"]
    with pytest.raises(DurabilityError):
        store.deliver(msg(10**9), to=[1])
    store.close()
    assert fs.calls["fdatasync"] == syncs  # no second attempt, ever
    with syncstore.open(store_path) as reopened:
        reopened.check()
        assert reopened.head(1) >= 1


@pytest.mark.parametrize("durability", ["sync", "interval", "none"])
def test_every_mode_survives_a_process_crash(store_path, durability):
    store = syncstore.open(store_path, durability=durability)
    acked = [store.deliver(msg(seq), to=[1, 2]) for seq in range(1, 50)]
    store._abandon()  # as SIGKILL: what reached the OS stays, nothing else happens
    with syncstore.open(store_path, durability=durability) as store:
        assert store.head(1) == store.head(2) == 49
        assert [m.msg_id for m in store.sync(2, 0, 100).messages] == [d.msg_id for d in acked]
        store.check()


def test_sync_mode_appends_with_o_dsync_and_other_modes_call_fdatasync(store_path):
    fs = FailingFS("none", 0)
    with syncstore.open(store_path, durability="sync", fs=fs) as store:
        before = fs.calls.get("fdatasync", 0)
        for seq in range(1, 20):
            store.deliver(msg(seq), to=[1])
        assert fs.calls.get("fdatasync", 0) == before  # durability came from O_DSYNC writes
    fs2 = FailingFS("none", 0)
    with syncstore.open(store_path + "2", durability="interval", fs=fs2) as store:
        store.deliver(msg(1), to=[1])
    assert fs2.calls["fdatasync"] >= 1  # at the latest when closing


def test_deliver_many_whose_write_hits_a_full_disk_raises_and_a_retry_completes_it(store_path, monkeypatch):
    """Whatever the grouping of its chunks into writes, a deliver_many one of whose writes failed
    for space raises StoreFull (never returns deliveries that were dropped); a retry of the batch
    finds the written items as duplicates and delivers the rest, each message once."""
    from syncstore import _writer

    monkeypatch.setattr(_writer, "BULK_CHUNK", 10)
    fs = FailingFS("pwrite", errno.ENOSPC)
    real_count = FailingFS._count

    def once(self, name):  # fail exactly one write; space is back after it
        try:
            real_count(self, name)
        finally:
            if name == "pwrite" and self.fail_at is not None and self.calls[name] >= self.fail_at:
                self.fail_at = None

    monkeypatch.setattr(FailingFS, "_count", once)
    with syncstore.open(store_path, fs=fs) as store:
        store.deliver(msg(1), to=[1])
        batch = [(msg(seq), [1, 2]) for seq in range(100, 160)]  # six chunks
        fs.arm()
        with pytest.raises(StoreFull):
            store.deliver_many(batch)
        again = store.deliver_many(batch)
        assert any(not d.duplicate for d in again)
        store.check()
        inbox = store.sync(2, limit=1000).messages
        assert [m.cursor for m in inbox] == list(range(1, len(batch) + 1))  # each message once, dense
        assert sorted(m.client_seq for m in inbox) == [m.client_seq for m, _ in batch]


def test_a_rollback_after_a_chunk_was_sequenced_fails_the_batch(store_path):
    """The check behind the test above, deterministically: deliver_many waits only for its last
    LSN, so a rollback that dropped an earlier chunk (its LSNs beyond the written end at the
    rollback, which later chunks then reuse) must fail the call."""
    with syncstore.open(store_path) as store:
        writer = store._writer
        writer._check_chunks([(writer._rollbacks, 50)])  # no rollback since: fine
        with writer.lock:
            writer._rollbacks += 1
            writer._rollback_log.append(40)  # a rollback dropped everything after LSN 40
        writer._check_chunks([(writer._rollbacks - 1, 40)])  # that chunk ended at 40: written, fine
        writer._check_chunks([(writer._rollbacks, 60)])  # sequenced after the rollback: fine
        with pytest.raises(StoreFull):
            writer._check_chunks([(writer._rollbacks - 1, 45), (writer._rollbacks, 60)])  # chunk 1 dropped
