"""The merged feed: snapshot chunks then changes, one encoded stream, a follower bootstrapped by apply(event)."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import syncstore
from syncstore import Change, Message, SnapshotChunk, _bootstrap, decode_event
from syncstore._codec import Deliver, Expire
from test_changelog import dump
from test_dedup import expire_all

NO_RETENTION = dict(segment_bytes=4096, log_retention_bytes=0, log_retention_ms=0)

u64 = st.integers(0, 2**64 - 1)
pairs = st.lists(st.tuples(u64, st.integers(1, 2**64 - 1)), min_size=1, max_size=4, unique_by=lambda p: p[0]).map(tuple)
delivers = st.builds(Deliver, u64, u64, u64, u64, u64, st.integers(0, 255), st.binary(max_size=64), pairs)
expires = st.builds(Expire, st.lists(st.tuples(u64, u64, u64), min_size=1, max_size=4).map(tuple))
changes = st.builds(Change.of, st.integers(1, 2**64 - 1), delivers | expires)
rows = st.lists(
    st.one_of(
        st.tuples(st.just(1), st.sampled_from([1, 4, 5]), st.binary(min_size=1, max_size=24), st.binary(max_size=40)),
        st.tuples(st.just(1), st.sampled_from([2, 3]), st.binary(min_size=1, max_size=24), st.binary(min_size=1, max_size=16)),
        st.tuples(st.just(2), st.sampled_from([1, 4, 5]), st.binary(min_size=1, max_size=24), st.just(b"")),
    ),
    max_size=6,
).map(tuple)
chunks = st.builds(SnapshotChunk, u64, st.integers(0, 2**32 - 1), st.booleans(), u64, st.integers(0, 1023), st.none() | u64, rows)


@given(changes | chunks)
def test_events_round_trip_and_are_framed(event):
    data = event.encode()
    assert decode_event(data) == event
    assert data[:4] == b"SSEV" and data[4] == 1 and data[5] == (1 if isinstance(event, Change) else 2)
    assert int.from_bytes(data[8:12], "big") == len(data) - 16  # an identity "codec" has no such frame


@given(changes | chunks, st.data())
@settings(max_examples=50)
def test_any_damaged_byte_of_an_event_is_refused_naming_the_event(event, data):
    encoded = bytearray(event.encode())
    at = data.draw(st.integers(0, len(encoded) - 1), label="byte")
    encoded[at] ^= data.draw(st.integers(1, 255), label="xor")
    with pytest.raises(syncstore.CorruptionError) as caught:
        decode_event(bytes(encoded))
    assert caught.value.key == "event" and caught.value.offset is not None


def test_every_byte_of_a_small_event_is_checked():
    event = Change.of(7, Deliver(1, 2, 3, 4, 5, 6, b"hi", ((7, 1),)))
    encoded = event.encode()
    for at in range(len(encoded)):
        damaged = bytearray(encoded)
        damaged[at] ^= 0x40
        with pytest.raises(syncstore.CorruptionError):
            decode_event(bytes(damaged))
    with pytest.raises(syncstore.CorruptionError):
        decode_event(encoded[:-1])
    with pytest.raises(syncstore.CorruptionError):
        decode_event(encoded + b"\0")


def _leader_with_a_chain(tmp_path, snapshots: int = 3) -> tuple[syncstore.Store, str]:
    """A leader whose log no longer holds its start, with a chain of ``snapshots`` snapshots (a base and deltas)."""
    leader = syncstore.open(str(tmp_path / "leader"), **NO_RETENTION)
    snapdir = str(tmp_path / "snaps")
    seq = 0
    for round_ in range(snapshots):
        for _ in range(60):
            seq += 1
            leader.deliver(Message(sender=seq % 5, conv=seq % 3, client_seq=seq, body=b"m%d" % seq), to=[seq % 9, 100 + round_])
        leader.flush()
        leader._writer.apply_pending()
        leader.snapshot(snapdir)
    for _ in range(25):  # changes after the last snapshot
        seq += 1
        leader.deliver(Message(sender=seq % 5, conv=1, client_seq=seq, body=b"late"), to=[seq % 9])
    leader.flush()
    leader._writer.apply_pending()
    assert leader._changelog.oldest_lsn() > 1
    return leader, snapdir


def test_feed_from_0_bootstraps_an_empty_follower_through_the_encoded_stream(tmp_path):
    leader, _snapdir = _leader_with_a_chain(tmp_path)
    follower_path = str(tmp_path / "follower")
    try:
        events = [decode_event(event.encode()) for event in leader.feed(0)]
        kinds = [type(event).__name__ for event in events]
        assert kinds[:3] == ["SnapshotChunk"] * 3 and kinds[3:] == ["Change"] * 25  # base + 2 deltas, then the log
        assert [e.index for e in events[:3]] == [0, 1, 2] and events[2].final and not events[1].final
        with syncstore.open(follower_path, follower=True) as follower:
            for event in events:
                assert follower.apply(event) == 1
            assert follower.lsn == leader.lsn and follower.epoch == leader.epoch
            assert follower.apply(events[-1]) == 0  # applied twice: skipped
            follower.check()
        leader.close()
        assert dump(follower_path) == dump(str(tmp_path / "leader"))
    finally:
        leader.close()


def test_feed_from_a_retained_position_is_only_changes(tmp_path):
    leader, _snapdir = _leader_with_a_chain(tmp_path, snapshots=1)
    try:
        with syncstore.open(str(tmp_path / "follower"), follower=True) as follower:
            for event in leader.feed(0):
                follower.apply(event)
            at = follower.lsn
            leader.deliver(Message(sender=1, conv=1, client_seq=10_000, body=b"new"), to=[3])
            events = list(leader.feed(at))
            assert [type(e) for e in events] == [Change] and events[0].lsn == at + 1
            follower.apply(events[0])
            assert follower.head(3) == leader.head(3)
    finally:
        leader.close()


def test_a_bootstrap_refuses_wrong_order_a_non_empty_follower_and_reads_until_it_is_whole(tmp_path):
    leader, _snapdir = _leader_with_a_chain(tmp_path)
    try:
        events = list(leader.feed(0))
        with syncstore.open(str(tmp_path / "follower"), follower=True) as follower:
            with pytest.raises(syncstore.InvalidArgument, match="expects chunk 0"):
                follower.apply(events[1])
            follower.apply(events[0])
            with pytest.raises(syncstore.StoreNotReady):
                follower.sync(1)
            with pytest.raises(syncstore.StoreNotReady):
                follower.head(1)
            with pytest.raises(syncstore.InvalidArgument, match="expects chunk 1"):
                follower.apply(events[2])
            with pytest.raises(syncstore.InvalidArgument, match="expects chunk 1"):
                follower.apply(events[-1])  # a change in the middle of a bootstrap
            follower.apply(events[1])
            follower.apply(events[2])
            assert follower.head(100) == leader.head(100)
            with pytest.raises(syncstore.InvalidArgument, match="only an empty follower"):
                follower.apply(events[0])
        with pytest.raises(syncstore.ReadOnlyStore):
            leader.apply(events[0])
        with pytest.raises(syncstore.InvalidArgument):
            leader.feed(-1)
    finally:
        leader.close()


def test_no_bridging_snapshot_raises_snapshot_required_unless_a_directory_is_given(tmp_path):
    with syncstore.open(str(tmp_path / "leader"), **NO_RETENTION) as leader:
        for seq in range(200):
            leader.deliver(Message(sender=1, conv=1, client_seq=seq, body=b"x" * 40), to=[seq % 4])
        leader.flush()
        leader._writer.apply_pending()
        with pytest.raises(syncstore.SnapshotRequired) as caught:
            leader.feed(0)
        assert caught.value.snapshot_dir is None
        events = list(leader.feed(0, snapshot_dir=str(tmp_path / "snaps")))
        assert isinstance(events[0], SnapshotChunk) and events[0].snapshot_lsn == leader.lsn
        assert syncstore.snapshot_chain(str(tmp_path / "snaps"))[-1].lsn == leader.lsn


def test_a_follower_killed_mid_bootstrap_starts_empty_and_one_killed_after_its_rows_finishes(tmp_path):
    leader, _snapdir = _leader_with_a_chain(tmp_path)
    follower_path = str(tmp_path / "follower")
    try:
        events = list(leader.feed(0))
        follower = syncstore.open(follower_path, follower=True)
        follower.apply(events[0])
        follower.apply(events[1])
        follower._abandon()  # killed mid-bootstrap
        with syncstore.open(follower_path, follower=True) as follower:
            assert follower.lsn == 0 and follower.check()["inbox_entries"] == 0  # the partial rows are gone
            follower.apply(events[0])
            follower.apply(events[1])
            _bootstrap.apply_chunk(follower._state, events[2])  # the final chunk's rows, then killed before the log restarts
            follower._abandon()
        with syncstore.open(follower_path, follower=True) as follower:  # opening finishes it
            assert follower.lsn == events[2].snapshot_lsn
            for event in events[3:]:
                follower.apply(event)
            assert follower.lsn == leader.lsn
            follower.check()
        leader.close()
        assert dump(follower_path) == dump(str(tmp_path / "leader"))
    finally:
        leader.close()


ops = st.lists(st.sampled_from(["deliver", "group", "retry", "snapshot", "expire", "retire"]), min_size=1, max_size=25)


@given(ops, st.integers(0, 3))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_feed_0_to_an_empty_follower_and_feed_s_to_a_follower_at_s_equal_the_leader(tmp_path_factory, steps, cut):
    """For any interleaving of deliveries, retries, snapshots, expiry and retention."""
    base = tmp_path_factory.mktemp("feed")
    clock = [1_700_000_000_000]
    options = dict(NO_RETENTION, clock_ms=lambda: clock[0], dedup_window_ms=1000, hot_window_ms=1000)
    leader = syncstore.open(str(base / "leader"), **options)
    snapdir = str(base / "snaps")
    follower_at_s = None
    try:
        seq = 0
        last: tuple[Message, list[int]] | None = None
        for index, step in enumerate(steps):
            if step in ("deliver", "group"):
                seq += 1
                last = (Message(sender=seq % 3, conv=seq % 2, client_seq=seq, body=b"b%d" % seq), [seq % 4] if step == "deliver" else [1, 2, 3, 4])
                leader.deliver(*last)
            elif step == "retry" and last is not None:
                leader.deliver(*last)  # a duplicate inside the window (nothing written), or a new delivery after expiry
            elif step == "snapshot":
                leader.flush()
                leader._writer.apply_pending()
                leader.snapshot(snapdir)
            elif step == "expire":
                clock[0] += 2000
                leader.flush()
                leader._writer.apply_pending()
                expire_all(leader)
            elif step == "retire":
                leader.flush()
                leader._writer.apply_pending()
            if index == cut and follower_at_s is None:
                leader.flush()
                follower_at_s = str(base / "at-s")
                with syncstore.open(follower_at_s, follower=True) as follower:
                    for event in leader.feed(0, snapshot_dir=snapdir):
                        follower.apply(event)
        leader.flush()
        leader._writer.apply_pending()
        with syncstore.open(str(base / "from-0"), follower=True) as follower:
            for event in leader.feed(0, snapshot_dir=snapdir):
                follower.apply(decode_event(event.encode()))
            assert follower.lsn == leader.lsn
        if follower_at_s is not None:
            with syncstore.open(follower_at_s, follower=True) as follower:
                try:
                    events = list(leader.feed(follower.lsn))
                except syncstore.SnapshotRequired:
                    events = None  # the log moved past it: it would need a fresh bootstrap (another test)
                if events is not None:
                    for event in events:
                        follower.apply(event)
                    assert follower.lsn == leader.lsn
                else:
                    follower_at_s = None
        leader.close()
        expected = dump(str(base / "leader"))
        assert dump(str(base / "from-0")) == expected
        if follower_at_s is not None:
            assert dump(follower_at_s) == expected
    finally:
        leader.close()
