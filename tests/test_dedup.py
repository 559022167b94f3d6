"""Exact dedup: the window, expiry, purging, and restarts."""

from __future__ import annotations

import syncstore
from syncstore import Message

DAY = 86_400_000


class FakeClock:
    """A settable wall clock in epoch milliseconds."""

    def __init__(self, now: int = 1_800_000_000_000) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def msg(seq: int, body: bytes = b"hello") -> Message:
    return Message(sender=7, conv=1, client_seq=seq, body=body)


def test_retry_inside_the_window_is_a_duplicate_even_after_restart(store_path):
    clock = FakeClock()
    with syncstore.open(store_path, clock_ms=clock, dedup_window_ms=2 * DAY, hot_window_ms=DAY) as store:
        first = store.deliver(msg(1), to=[1, 2])
    clock.now += 2 * DAY  # exactly at the edge: still inside
    with syncstore.open(store_path, clock_ms=clock, dedup_window_ms=2 * DAY, hot_window_ms=DAY) as store:
        again = store.deliver(msg(1), to=[2, 1])  # a retry: same content (issue 7: other content is a conflict)
        assert again.duplicate and again.msg_id == first.msg_id and again.cursors == {1: 1, 2: 1}
        assert store.head(1) == 1 and store.head(2) == 1  # nothing was written for the retry
        assert store.sync(1).messages[0].body == b"hello"


def test_retry_after_the_window_is_a_new_message(store_path):
    clock = FakeClock()
    with syncstore.open(store_path, clock_ms=clock, dedup_window_ms=DAY, hot_window_ms=DAY) as store:
        first = store.deliver(msg(1), to=[1])
        clock.now += DAY + 1
        later = store.deliver(msg(1, b"again"), to=[1])
        assert not later.duplicate and later.msg_id != first.msg_id and later.cursors == {1: 2}
        # ...and the new delivery is now the one a retry gets back
        assert store.deliver(msg(1, b"again"), to=[1]) == syncstore.Delivery(later.msg_id, True, {1: 2})
        store.check()


def test_expired_entries_are_purged_and_a_redelivered_key_keeps_its_new_entry(store_path):
    clock = FakeClock()
    options = dict(clock_ms=clock, dedup_window_ms=DAY, hot_window_ms=DAY)
    with syncstore.open(store_path, **options) as store:
        for seq in range(1, 2_501):  # more than one purge batch (1,000)
            store.deliver(msg(seq), to=[seq % 5])
    assert_dedup_entries(store_path, options, 2_500)
    clock.now += DAY + 1
    with syncstore.open(store_path, **options) as store:
        renewed = store.deliver(msg(1, b"renewed"), to=[9])
    # The applier expires keys in the background; drive it to completion deterministically.
    with syncstore.open(store_path, **options) as store:
        expire_all(store)
        assert store.check()["dedup_entries"] == 1
        assert store.deliver(msg(1, b"renewed"), to=[9]) == syncstore.Delivery(renewed.msg_id, True, {9: 1})
        assert not store.deliver(msg(2), to=[9]).duplicate  # purged: accepted as new


def test_purge_is_bounded_per_call(store_path):
    clock = FakeClock()
    options = dict(clock_ms=clock, dedup_window_ms=DAY, hot_window_ms=DAY)
    with syncstore.open(store_path, **options) as store:
        store.deliver_many([(msg(seq), [1]) for seq in range(1, 301)])
    clock.now += 2 * DAY
    with syncstore.open(store_path, **options) as store:
        writer = store._writer
        with writer._apply_lock:
            assert writer.expire_dedup(100) == 100
            assert writer.expire_dedup(100) == 0  # one EXPIRE at a time: the first is not applied yet
        store.flush()
        writer.apply_pending()
        assert store.check()["dedup_entries"] == 200
        changes = list(store.changes(since=300))
        assert [(c.lsn, c.kind, len(c.data.keys)) for c in changes] == [(301, "expire", 100)]


def test_duplicates_inside_one_batch(store_path):
    with syncstore.open(store_path) as store:
        results = store.deliver_many([(msg(1), [1]), (msg(1), [1]), (msg(2), [1])])
        assert [r.duplicate for r in results] == [False, True, False]
        assert results[1].msg_id == results[0].msg_id and results[1].cursors == {1: 1}
        assert store.head(1) == 2


def expire_all(store: syncstore.Store) -> None:
    """Run the applier's expiry to completion, deterministically (each EXPIRE made durable and applied)."""
    writer = store._writer
    while True:
        with writer._apply_lock:
            expired = writer.expire_dedup()
        store.flush()
        writer.apply_pending()
        if not expired:
            return


def assert_dedup_entries(path: str, options: dict, expected: int) -> None:
    with syncstore.open(path, **options) as store:
        assert store.check()["dedup_entries"] == expected


def test_a_key_redelivered_after_expiry_in_the_same_apply_batch_keeps_its_new_entry(store_path, monkeypatch):
    # Both deliveries of the key reach LMDB in one apply transaction, into an empty dedup
    # database (where an append would be allowed): the later one must be what LMDB keeps.
    from syncstore import _writer

    monkeypatch.setattr(_writer, "APPLY_INTERVAL_S", {"sync": 3600.0, "interval": 3600.0, "none": 3600.0})
    clock = FakeClock()
    with syncstore.open(store_path, clock_ms=clock, dedup_window_ms=DAY, hot_window_ms=DAY) as store:
        first = store.deliver(msg(1), to=[1])
        clock.now += DAY + 1
        later = store.deliver(msg(1, b"again"), to=[1])
        assert later.msg_id != first.msg_id
        store._writer.apply_pending()  # one batch: both records
        assert len(store._writer.overlay) == 0
        assert store.deliver(msg(1, b"again"), to=[1]) == syncstore.Delivery(later.msg_id, True, {1: 2})
        store.check()
    with syncstore.open(store_path, clock_ms=clock, dedup_window_ms=DAY, hot_window_ms=DAY) as store:
        assert store.deliver(msg(1, b"again"), to=[1]) == syncstore.Delivery(later.msg_id, True, {1: 2})
