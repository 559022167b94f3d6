"""64-bit message ids: ordering, layout, clock steps, borrowing, floors -- and through a Store."""

from __future__ import annotations

import shutil
import threading
import time
from datetime import datetime, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import syncstore
from syncstore import InvalidArgument, Message, SyncStoreError
from syncstore._ids import EPOCH_MS, MAX_REPLICA, MessageIds, msg_id_ms, msg_id_replica

NOW = 1_700_000_000_000  # 2023-11-14, a realistic wall-clock value
LAST_MS = EPOCH_MS + (1 << 42) - 1  # the last millisecond the layout can encode
REPLICAS = st.integers(0, MAX_REPLICA)


class FakeClock:
    """A settable clock: ``clock.now`` is what it returns."""

    def __init__(self, now: int = NOW) -> None:
        self.now = now
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        return self.now


def seq(msg_id: int) -> int:
    return msg_id & 0xFFF


# --- layout ------------------------------------------------------------------------------


@given(REPLICAS, st.integers(EPOCH_MS + 1, LAST_MS))
def test_replica_and_timestamp_are_encoded(replica, now):
    ids = MessageIds(replica, FakeClock(now))
    first = ids.next()
    assert msg_id_replica(first) == replica
    assert msg_id_ms(first) == now
    assert seq(first) == 0
    assert 0 < first < 2**64
    second = ids.next()
    assert msg_id_replica(second) == replica and msg_id_ms(second) == now and seq(second) == 1


def test_layout_bits():
    ids = MessageIds(5, FakeClock(EPOCH_MS + 3))
    assert ids.next() == (3 << 22) | (5 << 12) | 0
    assert ids.next() == (3 << 22) | (5 << 12) | 1


def test_id_time_zero_is_2020_01_01_utc():
    """The epoch is pinned by exact ids for exact clock readings (literals, not EPOCH_MS:
    a changed constant would otherwise move the test along with the code)."""
    epoch = int(datetime(2020, 1, 1, tzinfo=timezone.utc).timestamp()) * 1000
    assert epoch == 1_577_836_800_000 == EPOCH_MS
    # Time 0, replica 0, sequence 0 is the integer 0; the next id is sequence 1.
    first = MessageIds(0, FakeClock(1_577_836_800_000))
    assert (first.next(), first.next()) == (0, 1)
    assert MessageIds(5, FakeClock(1_577_836_800_003)).next() == (3 << 22) | (5 << 12)
    assert MessageIds(1023, FakeClock(1_700_000_000_000)).next() == (122_163_200_000 << 22) | (1023 << 12)
    assert msg_id_ms(0) == 1_577_836_800_000
    assert msg_id_ms((122_163_200_000 << 22) | 0xFFF) == 1_700_000_000_000


def test_a_clock_before_2020_counts_as_2020_01_01():
    for reading in (0, 1_000, 1_577_836_799_999):
        gen = MessageIds(2, FakeClock(reading))
        assert [gen.next() for _ in range(3)] == [(2 << 12) | n for n in range(3)], reading


def test_replicas_never_collide_at_the_same_instant():
    clock = FakeClock()
    seen = set()
    for replica in (0, 1, 2, 511, 1023):
        gen = MessageIds(replica, clock)
        for _ in range(100):
            seen.add(gen.next())
    assert len(seen) == 500


@pytest.mark.parametrize("replica", [-1, 1024, 2**20, -(2**63)])
def test_invalid_replica_id_rejected(replica):
    with pytest.raises(InvalidArgument) as info:
        MessageIds(replica, FakeClock())
    assert isinstance(info.value, ValueError) and isinstance(info.value, SyncStoreError)
    assert "replica_id" in str(info.value)


@pytest.mark.parametrize("replica", [-1, 1024, 5000, 1.0, "3", None, True])
def test_store_rejects_invalid_replica_id(tmp_path, replica):
    with pytest.raises(InvalidArgument) as info:
        syncstore.open(str(tmp_path / "s"), replica_id=replica)
    assert "replica_id" in str(info.value)
    assert not (tmp_path / "s").exists()


# --- monotonicity ------------------------------------------------------------------------


def test_strictly_increasing_with_the_real_clock():
    gen = MessageIds(7, lambda: time.time_ns() // 1_000_000)
    ids = [gen.next() for _ in range(50_000)]
    assert all(a < b for a, b in zip(ids, ids[1:]))
    assert {msg_id_replica(i) for i in ids} == {7}


@given(REPLICAS, st.lists(st.integers(EPOCH_MS + 1, EPOCH_MS + 10**9), min_size=1, max_size=300))
def test_monotonic_under_arbitrary_clock_steps(replica, readings):
    clock = FakeClock()
    gen = MessageIds(replica, clock)
    previous = -1
    previous_ms = EPOCH_MS
    highest = 0
    for reading in readings:
        clock.now = reading
        msg_id = gen.next()
        assert msg_id > previous
        assert msg_id_replica(msg_id) == replica
        # Never timestamped before the clock reading, nor ahead of the highest one
        # (<= 300 ids here: no borrowing of later milliseconds).
        assert msg_id_ms(msg_id) >= reading
        highest = max(highest, reading)
        assert msg_id_ms(msg_id) == highest
        if reading > previous_ms:  # the clock moved forward: a fresh millisecond
            assert msg_id_ms(msg_id) == reading and seq(msg_id) == 0
        previous, previous_ms = msg_id, msg_id_ms(msg_id)


def test_clock_stepping_back_keeps_the_last_millisecond():
    clock = FakeClock(NOW)
    gen = MessageIds(3, clock)
    a = gen.next()
    clock.now = NOW - 60_000  # NTP steps the clock back a minute
    b = gen.next()
    c = gen.next()
    assert a < b < c
    assert msg_id_ms(b) == msg_id_ms(c) == NOW
    assert (seq(b), seq(c)) == (1, 2)
    clock.now = NOW + 1
    d = gen.next()
    assert d > c and msg_id_ms(d) == NOW + 1 and seq(d) == 0


def test_borrows_the_next_millisecond_past_4096_ids():
    clock = FakeClock(NOW)
    gen = MessageIds(9, clock)
    ids = [gen.next() for _ in range(3 * 4096 + 10)]
    assert all(a < b for a, b in zip(ids, ids[1:]))
    assert [msg_id_ms(i) for i in ids[:4096]] == [NOW] * 4096
    assert [seq(i) for i in ids[:4096]] == list(range(4096))
    assert msg_id_ms(ids[4096]) == NOW + 1 and seq(ids[4096]) == 0
    assert msg_id_ms(ids[8192]) == NOW + 2 and seq(ids[8192]) == 0
    assert msg_id_ms(ids[-1]) == NOW + 3
    # When the real clock reaches a borrowed millisecond, ids still increase.
    clock.now = NOW + 2
    later = gen.next()
    assert later > ids[-1] and msg_id_ms(later) == NOW + 3
    clock.now = NOW + 10
    assert msg_id_ms(gen.next()) == NOW + 10


# --- floors (restart) --------------------------------------------------------------------


@given(REPLICAS, st.integers(EPOCH_MS + 1, EPOCH_MS + 10**10), st.integers(0, 4095), st.integers(0, 10**9))
def test_floor_is_honoured_when_the_clock_is_earlier(replica, floor_ms, floor_seq, behind):
    floor = ((floor_ms - EPOCH_MS) << 22) | (replica << 12) | floor_seq
    gen = MessageIds(replica, FakeClock(max(EPOCH_MS + 1, floor_ms - behind)), floor=floor)
    a = gen.next()
    b = gen.next()
    assert floor < a < b
    assert msg_id_replica(a) == replica
    # The same millisecond with the next sequence number; the next millisecond only
    # when the floor's sequence is exhausted.
    if floor_seq < 4095:
        assert (msg_id_ms(a), seq(a)) == (floor_ms, floor_seq + 1)
    else:
        assert (msg_id_ms(a), seq(a)) == (floor_ms + 1, 0)
    assert b == a + 1 or (seq(a) == 4095 and (msg_id_ms(b), seq(b)) == (msg_id_ms(a) + 1, 0))


@pytest.mark.parametrize(("floor_seq", "expected_ms", "expected_seq"), [(0, NOW, 1), (4094, NOW, 4095), (4095, NOW + 1, 0)])
def test_floor_with_the_clock_behind_takes_the_next_sequence_number(floor_seq, expected_ms, expected_seq):
    floor = ((NOW - EPOCH_MS) << 22) | (6 << 12) | floor_seq
    msg_id = MessageIds(6, FakeClock(NOW - 1_000), floor=floor).next()
    assert msg_id == ((expected_ms - 1_577_836_800_000) << 22) | (6 << 12) | expected_seq


def test_floor_continues_above_the_previous_generator():
    clock = FakeClock(NOW)
    first = MessageIds(4, clock)
    issued = [first.next() for _ in range(5000)]  # spills into NOW + 1
    clock.now = NOW - 3_600_000  # restarted with the clock an hour behind
    second = MessageIds(4, clock, floor=issued[-1])
    more = [second.next() for _ in range(5000)]
    assert more[0] > issued[-1]
    assert all(a < b for a, b in zip(more, more[1:]))


def test_floor_at_the_very_first_id_is_honoured():
    """An id with time 0, replica 0 and sequence 0 is the integer 0; a floor of 0 must not
    make a restarted generator hand out 0 again."""
    clock = FakeClock(EPOCH_MS)
    first = MessageIds(0, clock).next()
    again = MessageIds(0, clock, floor=first).next()
    assert again > first


def test_ids_never_exceed_64_bits():
    """Past the layout's last millisecond (year 2159, or a clock in microseconds by mistake)
    the generator must refuse rather than hand out an id that no u64 field can store."""
    gen = MessageIds(0, FakeClock(LAST_MS))
    assert gen.next() == ((1 << 42) - 1) << 22  # the last millisecond is still an id
    for bad in (LAST_MS + 1, time.time_ns() // 1000):
        clock = FakeClock(bad)
        gen = MessageIds(1, clock)
        with pytest.raises(SyncStoreError, match="beyond the message id range") as info:
            gen.next()
        assert "milliseconds" in info.value.hint
        clock.now = NOW  # the refusal issued nothing and wedged nothing
        assert gen.next() == ((NOW - EPOCH_MS) << 22) | (1 << 12)
    # Borrowing past the last millisecond is refused too, also without a state change.
    clock = FakeClock(LAST_MS)
    gen = MessageIds(3, clock)
    ids = [gen.next() for _ in range(4096)]
    assert msg_id_ms(ids[-1]) == LAST_MS and seq(ids[-1]) == 4095
    with pytest.raises(SyncStoreError):
        gen.next()
    with pytest.raises(SyncStoreError):
        gen.next()


def test_thread_safe_under_the_stores_lock():
    """The store calls next() under its sequencing lock; concurrent locked callers get unique ids."""
    gen = MessageIds(2, FakeClock(NOW))
    lock = threading.Lock()
    out: list[list[int]] = [[] for _ in range(4)]

    def worker(i):
        for _ in range(3000):
            with lock:
                out[i].append(gen.next())

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [x for part in out for x in part]
    assert len(set(flat)) == len(flat) == 12_000
    for part in out:
        assert all(a < b for a, b in zip(part, part[1:]))


# --- through a Store ---------------------------------------------------------------------


def _deliver(store, seqno, to=(1,)):
    return store.deliver(Message(sender=42, conv=1, client_seq=seqno, body=b"b%d" % seqno), to=list(to))


def test_store_ids_increase_when_the_clock_steps_back_and_across_reopen(tmp_path):
    path = str(tmp_path / "s")
    clock = FakeClock(NOW)
    ids = []
    with syncstore.open(path, replica_id=77, clock_ms=clock) as store:
        for i, step in enumerate([0, -5_000, 3, -86_400_000, 0, 10]):
            clock.now += step
            d = _deliver(store, i)
            ids.append(d.msg_id)
            assert msg_id_replica(d.msg_id) == 77
        high = max(NOW, clock.now)
    assert all(a < b for a, b in zip(ids, ids[1:]))
    # Reopen with the clock a day earlier than anything issued so far.
    clock.now = NOW - 86_400_000
    with syncstore.open(path, replica_id=77, clock_ms=clock) as store:
        later = [_deliver(store, 100 + i).msg_id for i in range(3)]
    assert ids[-1] < later[0] < later[1] < later[2]
    assert all(msg_id_ms(x) <= high + 1 for x in later)
    # And after a full replay from the WAL (the floor then comes from replayed records).
    shutil.rmtree(str(tmp_path / "s" / "state"))
    with syncstore.open(path, replica_id=77, clock_ms=clock) as store:
        final = _deliver(store, 200).msg_id
        page = store.sync(1, 0, 100)
    assert final > later[-1]
    assert [m.msg_id for m in page.messages] == ids + later + [final]


def test_store_message_timestamp_defaults_to_the_id_time(tmp_path):
    clock = FakeClock(NOW)
    with syncstore.open(str(tmp_path / "s"), clock_ms=clock) as store:
        a = _deliver(store, 1)
        clock.now = NOW + 1234
        b = store.deliver(Message(sender=42, conv=1, client_seq=2, body=b"x", ts_ms=5), to=[1])
        page = store.sync(1, 0, 10)
    assert msg_id_ms(a.msg_id) == NOW and msg_id_ms(b.msg_id) == NOW + 1234
    assert [m.ts_ms for m in page.messages] == [NOW, 5]


def test_store_ids_unique_when_the_clock_is_frozen(tmp_path):
    clock = FakeClock(NOW)
    with syncstore.open(str(tmp_path / "s"), clock_ms=clock) as store:
        results = store.deliver_many([(Message(sender=1, conv=1, client_seq=i, body=b""), [i % 7]) for i in range(5000)])
    ids = [r.msg_id for r in results]
    assert all(a < b for a, b in zip(ids, ids[1:]))
    assert msg_id_ms(ids[4095]) == NOW and msg_id_ms(ids[4096]) == NOW + 1


def test_store_ids_unique_across_reopen_with_a_clock_before_2020(tmp_path):
    """A clock before the id epoch (a bad RTC at boot) must still yield distinct, increasing ids."""
    path = str(tmp_path / "s")
    clock = FakeClock(1_000)  # 1970
    with syncstore.open(path, clock_ms=clock) as store:
        first = _deliver(store, 1).msg_id
    with syncstore.open(path, clock_ms=clock) as store:
        second = _deliver(store, 2).msg_id
        page = store.sync(1, 0, 10)
    assert second > first
    assert len({m.msg_id for m in page.messages}) == 2


def test_store_clock_beyond_the_id_range_fails_cleanly(tmp_path):
    """A clock the ids cannot encode must give a SyncStoreError and leave the store consistent:
    no hole in the WAL's LSNs, close() returns, and a reopen sees exactly what was acknowledged."""
    path = str(tmp_path / "s")
    clock = FakeClock(NOW)
    store = syncstore.open(path, clock_ms=clock)
    refused = False
    try:
        _deliver(store, 1)
        clock.now = time.time_ns() // 1000  # microseconds passed as milliseconds
        with pytest.raises(SyncStoreError):
            _deliver(store, 2)
        refused = True
    finally:
        if not refused:
            store._abandon()  # the test failed already; do not leave a wedged store behind
    clock.now = NOW + 1
    # close() must not wait forever for an LSN that was reserved but never written.
    closer = threading.Thread(target=store.close, daemon=True)
    closer.start()
    closer.join(30)  # a guard against a hang, not a timing assertion
    hung = closer.is_alive()
    if hung:
        store._abandon()
    assert not hung, "close() hangs after a failed deliver"
    shutil.rmtree(str(tmp_path / "s" / "state"))
    with syncstore.open(path, clock_ms=clock) as store:
        assert store.head(1) == 1
        assert [m.body for m in store.sync(1, 0, 10).messages] == [b"b1"]
        assert store.deliver(Message(sender=42, conv=1, client_seq=2, body=b"b2"), to=[1]).cursors == {1: 2}
        store.check()
