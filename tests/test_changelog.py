"""The change log as a stream: changes(), follow, wait, consumers, retention, followers."""

from __future__ import annotations

import logging
import os
import threading

import lmdb
import pytest
from hypothesis import given, strategies as st

import syncstore
from syncstore import Change, Delivered, Expired, Message
from syncstore.changelog import Segment, retire_upto

DAY = 86_400_000
SMALL = dict(segment_bytes=4096, log_retention_bytes=0, log_retention_ms=0)  # retire every applied segment at once


def msg(seq: int, body: bytes = b"hello", sender: int = 1, conv: int = 42) -> Message:
    return Message(sender=sender, conv=conv, client_seq=seq, body=body)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000_000

    def __call__(self) -> int:
        return self.now


def retire_now(store: syncstore.Store) -> None:
    """Drive the applier's apply-and-retire pass deterministically."""
    store.flush()
    store._writer.apply_pending()


def test_changes_are_every_delivery_in_lsn_order_with_every_recipients_cursor(store_path):
    with syncstore.open(store_path) as store:
        first = store.deliver(msg(1), to=[7, 9])
        store.deliver(msg(2, b"\xff\x00"), to=[9])
        store.deliver(msg(1), to=[9, 7])  # a duplicate writes nothing: no change
        assert store.lsn == 2
        changes = list(store.changes())
        assert [c.lsn for c in changes] == [1, 2]
        assert changes[0].kind == "deliver" and isinstance(changes[0].data, Delivered)
        assert changes[0].data.message.msg_id == first.msg_id and changes[0].data.message.body == b"hello"
        assert dict(changes[0].data.cursors) == {7: 1, 9: 1}
        assert dict(changes[1].data.cursors) == {9: 2}
        assert [c.lsn for c in store.changes(since=1)] == [2]
        assert list(store.changes(since=2)) == []
        assert [c.lsn for c in store.changes(limit=1)] == [1]
        assert changes[1].to_json()["body_encoding"] == "base64" and changes[0].to_json()["body"] == "hello"
        assert changes[0].to_json()["cursors"] == {"7": 1, "9": 1}


def test_changes_survive_reopen_and_read_across_segments(store_path):
    with syncstore.open(store_path, segment_bytes=4096) as store:
        for seq in range(1, 201):
            store.deliver(msg(seq, b"x" * 100), to=[seq % 7, 100])
    with syncstore.open(store_path, segment_bytes=4096) as store:
        assert len(os.listdir(os.path.join(store_path, "wal"))) > 5  # kept by retention, across segments
        changes = list(store.changes(since=3))
        assert [c.lsn for c in changes] == list(range(4, 201))
        assert [c.data.message.client_seq for c in changes] == list(range(4, 201))
        assert [c.data.cursors[100] for c in changes] == list(range(4, 201))


def test_bad_arguments_are_refused(store_path):
    with syncstore.open(store_path) as store:
        store.deliver(msg(1), to=[1])
        with pytest.raises(syncstore.InvalidArgument, match="beyond the end"):
            store.changes(since=5)
        for bad in (dict(since=-1), dict(limit=0), dict(limit=1.5), dict(follow=1), dict(timeout=-1), dict(timeout="1")):
            with pytest.raises(syncstore.InvalidArgument):
                store.changes(**bad)
        with pytest.raises(syncstore.InvalidArgument):
            store.wait(1, -1)
        with pytest.raises(syncstore.InvalidArgument):
            store.consumer("../x")
        with pytest.raises(syncstore.ReadOnlyStore):
            store.apply_changes([])


def test_a_position_below_the_retained_log_raises_snapshot_required_never_a_silent_restart(store_path):
    with syncstore.open(store_path, **SMALL) as store:
        for seq in range(1, 101):
            store.deliver(msg(seq, b"x" * 200), to=[1])
        retire_now(store)
        oldest = store._changelog.oldest_lsn()
        assert oldest > 1
        with pytest.raises(syncstore.SnapshotRequired) as caught:
            store.changes(since=0)
        error = caught.value
        assert (error.requested_lsn, error.oldest_lsn, error.snapshot_lsn, error.snapshot_dir) == (0, oldest, None, None)
        assert "store.snapshot" in str(error)
        assert [c.lsn for c in store.changes(since=oldest - 1)][0] == oldest


def test_a_damaged_frame_is_named_with_its_file_and_offset(store_path):
    with syncstore.open(store_path) as store:
        for seq in range(1, 4):
            store.deliver(msg(seq), to=[1])
        store.flush()
        segment = store._wal.segment_paths()[-1]
        frames = list(store._wal.frames(0))
        with open(segment, "r+b") as f:  # one byte of the second frame's body
            f.seek(frames[1].end - 1)
            byte = f.read(1)
            f.seek(frames[1].end - 1)
            f.write(bytes([byte[0] ^ 0xFF]))
        with pytest.raises(syncstore.CorruptionError) as caught:
            list(store.changes())
        assert caught.value.path == segment and caught.value.offset == frames[1].offset
        with open(segment, "r+b") as f:  # put it back, so that close is clean
            f.seek(frames[1].end - 1)
            f.write(byte)


def test_a_follow_tail_gets_every_change_exactly_once_in_order_while_4_threads_write_and_wait_wakes(store_path):
    writers, per_writer = 4, 150
    total = writers * per_writer + 1
    with syncstore.open(store_path) as store:
        received: list[Change] = []
        woke: list[bool] = []

        def tail() -> None:
            received.extend(store.changes(since=0, follow=True, limit=total))

        def long_poll() -> None:
            woke.append(store.wait(999, since=0))  # no timeout: only the delivery to 999 ends it

        def write(w: int) -> None:
            for seq in range(per_writer):
                store.deliver(msg(seq, sender=w + 1), to=[w + 1, 500])

        tailer, poller = threading.Thread(target=tail), threading.Thread(target=long_poll)
        tailer.start()
        poller.start()
        threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert poller.is_alive() and not woke  # nothing reached user 999 yet
        store.deliver(msg(1, sender=999), to=[999])
        tailer.join()
        poller.join()
        assert woke == [True]
        assert [c.lsn for c in received] == list(range(1, total + 1))
        assert sorted(c.data.cursors[500] for c in received[:-1]) == list(range(1, total))
        # per sender, in the order each writer sent
        for w in range(writers):
            seqs = [c.data.message.client_seq for c in received if c.data.message.sender == w + 1]
            assert seqs == list(range(per_writer))


def test_follow_ends_quietly_at_the_timeout_and_wait_returns_false(store_path):
    with syncstore.open(store_path) as store:
        store.deliver(msg(1), to=[1])
        assert [c.lsn for c in store.changes(follow=True, timeout=0.05)] == [1]
        assert store.wait(1, since=1, timeout=0.01) is False
        assert store.wait(1, since=0, timeout=0) is True


def test_follow_and_wait_end_when_the_store_closes(store_path):
    store = syncstore.open(store_path)
    results: list[object] = []

    def tail() -> None:
        results.append(list(store.changes(follow=True)))

    def long_poll() -> None:
        results.append(store.wait(5, since=0))

    threads = [threading.Thread(target=tail), threading.Thread(target=long_poll)]
    for thread in threads:
        thread.start()
    assert store._writer.watchers.wait_registered(2, timeout=60)  # both are waiting now
    store.close()
    for thread in threads:
        thread.join()
    assert sorted(map(repr, results)) == ["False", "[]"]


def test_expiry_is_a_change_like_any_other(store_path):
    clock = FakeClock()
    options = dict(clock_ms=clock, dedup_window_ms=DAY, hot_window_ms=DAY)
    with syncstore.open(store_path, **options) as store:
        store.deliver(msg(1), to=[1])
        store.deliver(msg(2), to=[1])
        retire_now(store)  # expiry reads the applied state
        clock.now += DAY + 1
        with store._writer._apply_lock:
            assert store._writer.expire_dedup() == 2
        retire_now(store)
        change = list(store.changes(since=2))[0]
        assert change.kind == "expire" and isinstance(change.data, Expired)
        assert [key[1:] for key in change.data.keys] == [(1, 1), (1, 2)]
        assert change.to_json()["keys"] == [list(key) for key in change.data.keys]
        assert store.check()["dedup_entries"] == 0
        assert not store.deliver(msg(1), to=[1]).duplicate
    with syncstore.open(store_path, **options) as store:  # replayed or applied: the same state
        assert store.check()["dedup_entries"] == 1


def test_a_consumer_pins_the_log_until_it_acks_and_its_position_persists(store_path):
    with syncstore.open(store_path, **SMALL) as store:
        consumer = store.consumer("search-indexer", start=0)
        for seq in range(1, 101):
            store.deliver(msg(seq, b"x" * 200), to=[1])
        retire_now(store)
        assert store._changelog.oldest_lsn() == 1  # pinned
        assert [c.lsn for c in consumer.changes(limit=3)] == [1, 2, 3]
        assert consumer.lag == 100
        consumer.ack(60)
        with pytest.raises(syncstore.InvalidArgument, match="forward only"):
            consumer.ack(10)
        with pytest.raises(syncstore.InvalidArgument, match="ends at"):
            consumer.ack(101)
        retire_now(store)
        oldest = store._changelog.oldest_lsn()
        assert 1 < oldest <= 61
        (status,) = store.consumers()
        assert (status.name, status.position, status.lag, status.dropped) == ("search-indexer", 60, 40, None)
        assert status.pinned_bytes > 0
    with syncstore.open(store_path, **SMALL) as store:
        consumer = store.consumer("search-indexer")
        assert consumer.position == 60
        assert consumer.changes(limit=1).__next__().lsn == 61
        assert store.drop_consumer("search-indexer") and store.consumers() == []
        assert not store.drop_consumer("search-indexer")
        with pytest.raises(syncstore.InvalidArgument, match="removed"):
            consumer.ack(70)


def test_a_consumer_beyond_max_log_bytes_is_dropped_with_a_log_line_and_stays_listed(store_path, caplog):
    with syncstore.open(store_path, max_log_bytes=3 * 4096, **SMALL) as store:
        slow = store.consumer("slow", start=0)
        for seq in range(1, 101):
            store.deliver(msg(seq, b"x" * 200), to=[1])
        with caplog.at_level(logging.WARNING, logger="syncstore.changelog"):
            retire_now(store)
        assert "slow" in caplog.text and "max_log_bytes" in caplog.text
        (status,) = store.consumers()
        assert status.dropped is not None and "max_log_bytes" in status.dropped and status.pinned_bytes == 0
        assert slow.dropped == status.dropped
        with pytest.raises(syncstore.SnapshotRequired):
            slow.changes()
        store.drop_consumer("slow")
        assert store.consumers() == []


def test_a_damaged_consumers_file_is_named(store_path):
    with syncstore.open(store_path) as store:
        store.consumer("a")
    path = os.path.join(store_path, "consumers")
    with open(path, "r+b") as f:
        f.seek(20)
        f.write(b"9")
    with syncstore.open(store_path) as store:
        with pytest.raises(syncstore.CorruptionError) as caught:
            store.consumers()
        assert caught.value.path == path


def dump(path: str) -> dict[str, list[tuple[bytes, bytes]]]:
    """Every item of the state's databases except the meta bookkeeping."""
    env = lmdb.open(os.path.join(path, "state"), readonly=True, lock=False, max_dbs=8)
    try:
        out = {}
        with env.begin() as txn:
            for name in ("messages", "inbox", "history", "dedup", "dedup_expiry"):
                db = env.open_db(name.encode(), txn=txn, create=False)
                out[name] = list(txn.cursor(db=db).iternext())
        return out
    finally:
        env.close()


def test_a_follower_applying_the_leaders_changes_equals_the_leader(tmp_path):
    clock = FakeClock()
    options = dict(clock_ms=clock, dedup_window_ms=DAY, hot_window_ms=DAY)
    leader_path, follower_path = str(tmp_path / "leader"), str(tmp_path / "follower")
    with syncstore.open(leader_path, **options) as leader, syncstore.open(follower_path, follower=True, **options) as follower:
        for seq in range(1, 30):
            leader.deliver(msg(seq, sender=seq % 3), to=[seq % 5, 10, 11][: 1 + seq % 3])
        retire_now(leader)
        clock.now += DAY + 1
        with leader._writer._apply_lock:
            assert leader._writer.expire_dedup() == 29
        leader.deliver(msg(1, b"again", sender=1), to=[10])
        leader.flush()
        changes = list(leader.changes())
        assert {c.kind for c in changes} == {"deliver", "expire"}
        assert follower.apply_changes(changes[:10]) == 10
        assert follower.apply_changes(changes[5:]) == len(changes) - 10  # repeats skipped
        assert follower.lsn == leader.lsn
        with pytest.raises(syncstore.ReadOnlyStore, match="follower"):
            follower.deliver(msg(99), to=[1])
        for user in (0, 1, 2, 3, 4, 10, 11):
            assert follower.head(user) == leader.head(user)
            assert list(follower.sync(user).messages) == list(leader.sync(user).messages)
        follower.check()
    assert dump(follower_path) == dump(leader_path)


def test_a_follower_refuses_a_gap_and_a_divergent_change_and_applies_nothing(tmp_path):
    with syncstore.open(str(tmp_path / "leader")) as leader, syncstore.open(str(tmp_path / "f"), follower=True) as follower:
        for seq in range(1, 6):
            leader.deliver(msg(seq), to=[1])
        changes = list(leader.changes())
        with pytest.raises(syncstore.LogGap) as caught:
            follower.apply_changes(changes[2:])
        assert caught.value.missing == (1, 2) and follower.lsn == 0
        with pytest.raises(syncstore.InvalidArgument, match="without gaps"):
            follower.apply_changes([changes[0], changes[2]])
        follower.apply_changes(changes[:1])
        forged = Change(2, "deliver", Delivered(changes[1].data.message, {1: 5}))
        with pytest.raises(syncstore.CorruptionError, match="diverged"):
            follower.apply_changes([forged])
        assert follower.lsn == 1 and follower.head(1) == 1
        with pytest.raises(syncstore.InvalidArgument):
            follower.apply_changes([object()])  # type: ignore[list-item]


segments_strategy = st.lists(st.tuples(st.integers(1, 50), st.integers(1, 10_000), st.integers(0, 10_000)), min_size=1, max_size=8)


@given(segments_strategy, st.integers(0, 400), st.integers(0, 40_000), st.integers(0, 10_000), st.none() | st.integers(0, 400))
def test_retention_deletes_only_applied_unpinned_segments_beyond_the_setting_oldest_first(spec, applied, keep_bytes, keep_ms, pin):
    segments, first = [], 1
    for count, size, age in spec:
        segments.append(Segment(first, first + count - 1, size, age))
        first += count
    upto = retire_upto(segments, applied, keep_bytes, keep_ms, pin)
    gone = [s for s in segments if s.last_lsn <= upto]
    kept = segments[len(gone) :]
    assert kept, "the segment being written to always stays"
    assert upto == (gone[-1].last_lsn if gone else 0)
    for segment in gone:
        assert segment.last_lsn <= applied and (pin is None or segment.last_lsn <= pin)
    # Nothing was deleted that the setting keeps: after deletion each deleted one was over it.
    remaining = sum(s.size for s in segments)
    for segment in gone:
        assert remaining > keep_bytes or segment.age_ms > keep_ms
        remaining -= segment.size
    # And the first kept (sealed) segment really had to stay.
    if len(kept) > 1:
        head = kept[0]
        assert head.last_lsn > applied or (pin is not None and head.last_lsn > pin) or (remaining <= keep_bytes and head.age_ms <= keep_ms)


def test_a_followers_role_is_in_its_marker_and_promote_makes_it_a_leader_with_a_new_epoch(tmp_path):
    leader_path, follower_path = str(tmp_path / "leader"), str(tmp_path / "follower")
    with syncstore.open(leader_path) as leader:
        leader.deliver(msg(1), to=[1, 2])
        leader.deliver(msg(2), to=[2])
        changes = list(leader.changes())
    with syncstore.open(follower_path, follower=True) as follower:
        follower.apply_changes(changes)
    with pytest.raises(syncstore.InvalidArgument, match="follower"):
        syncstore.open(follower_path)  # a follower opened as a leader would fork its leader's history
    with pytest.raises(syncstore.InvalidArgument, match="leader"):
        syncstore.open(leader_path, follower=True)
    with syncstore.open(follower_path, readonly=True) as view:  # views may read either
        assert view.head(2) == 2
    with syncstore.open(follower_path, follower=True) as follower:
        old_epoch = follower.epoch
        epoch = follower.promote()
        assert epoch == follower.epoch != old_epoch and not follower.follower
        with pytest.raises(syncstore.ReadOnlyStore, match="for followers"):
            follower.apply_changes(changes)
        with pytest.raises(syncstore.ReadOnlyStore):
            follower.promote()
        after = follower.deliver(msg(3), to=[2])
        assert after.cursors == {2: 3} and after.msg_id > changes[-1].data.message.msg_id
        assert follower.sync(2, since=2, epoch=old_epoch).reset  # clients of the old history resync
    with syncstore.open(follower_path) as promoted:  # a leader now, for good
        assert promoted.epoch == epoch and promoted.head(2) == 3


def test_a_follower_never_expires_keys_on_its_own_clock_it_applies_its_leaders_expiry(tmp_path):
    clock = FakeClock()
    options = dict(clock_ms=clock, dedup_window_ms=DAY, hot_window_ms=DAY)
    with syncstore.open(str(tmp_path / "leader"), **options) as leader, syncstore.open(str(tmp_path / "f"), follower=True, **options) as follower:
        leader.deliver(msg(1), to=[1])
        follower.apply_changes(leader.changes())
        follower._writer.apply_pending()
        clock.now += 2 * DAY
        with follower._writer._apply_lock:
            assert follower._writer.expire_dedup() == 0  # its log is its leader's
        assert follower.lsn == 1
        retire_now(leader)
        with leader._writer._apply_lock:
            assert leader._writer.expire_dedup() == 1
        leader.flush()
        follower.apply_changes(leader.changes(since=1))
        follower._writer.apply_pending()
        assert follower.lsn == 2 and follower.check()["dedup_entries"] == 0
        follower.promote()
        follower.deliver(msg(7), to=[1])
        retire_now(follower)
        clock.now += 2 * DAY
        with follower._writer._apply_lock:
            assert follower._writer.expire_dedup() == 1  # a leader now: it expires its own keys


def test_fresh_user_findings_are_clear_errors(tmp_path):
    """What a first user ran into: handles of a closed store, huge timeouts, timeouts without follow, wrong store kinds."""
    path = str(tmp_path / "s")
    store = syncstore.open(path)
    store.deliver(msg(1), to=[1])
    consumer = store.consumer("c", start=0)
    for bad in (float("inf"), 1e20, 2**70):
        with pytest.raises(syncstore.InvalidArgument, match="timeout"):
            store.wait(1, 5, timeout=bad)
        with pytest.raises(syncstore.InvalidArgument, match="timeout"):
            store.changes(follow=True, timeout=bad)
    with pytest.raises(syncstore.InvalidArgument, match="follow=True"):
        store.changes(timeout=5)
    with pytest.raises(syncstore.ReadOnlyStore, match="for followers"):
        store.promote()
    with pytest.raises(syncstore.InvalidArgument):
        syncstore.decode_event("garbage")  # type: ignore[arg-type]
    with pytest.raises(syncstore.InvalidArgument, match="inside the store"):
        store.feed(0, snapshot_dir=os.path.join(path, "snaps"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(syncstore.InvalidArgument):
        store.snapshot(str(tmp_path / "file"))
    with pytest.raises(syncstore.InvalidArgument):
        syncstore.snapshot_chain(str(tmp_path / "file"))
    store.close()
    with pytest.raises(syncstore.StoreClosed):
        consumer.ack(1)
    with pytest.raises(syncstore.StoreClosed):
        consumer.lag


def test_a_dropped_consumer_pins_again_once_it_acks(store_path):
    with syncstore.open(store_path, max_log_bytes=3 * 4096, **SMALL) as store:
        slow = store.consumer("slow", start=0)
        for seq in range(1, 101):
            store.deliver(msg(seq, b"x" * 200), to=[1])
        retire_now(store)
        assert slow.dropped is not None
        slow.ack(store.lsn)  # caught up (from a snapshot, say)
        assert slow.dropped is None and store.consumers()[0].dropped is None


def test_a_bootstrapping_follower_is_not_promoted_and_takes_no_changes(tmp_path):
    from test_feed import _leader_with_a_chain

    leader, _snapdir = _leader_with_a_chain(tmp_path)
    try:
        events = list(leader.feed(0))
        with syncstore.open(str(tmp_path / "f"), follower=True) as follower:
            follower.apply(events[0])
            with pytest.raises(syncstore.StoreNotReady):
                follower.promote()
            with pytest.raises(syncstore.InvalidArgument, match="bootstrapping"):
                follower.apply_changes([events[-1]])
            assert follower.follower
    finally:
        leader.close()
