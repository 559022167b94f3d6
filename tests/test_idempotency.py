"""Issue 7, section 9: an idempotency key reused for different content is an error, not a duplicate.

``(sender, client_seq)`` is the idempotency key.  A retry must repeat the first
delivery's conv, body and *set* of recipients (ts_ms, priority and the order or
repeats of ``to`` may differ); anything else raises ``IdempotencyConflict``
naming the key and the first msg_id, and writes nothing.  Covered here: the
check against a first delivery still in the overlay (not yet applied), one in
LMDB, after a reopen and after a crash (replay rebuilds the entries); expiry;
``deliver_many`` (its pre-pass, repeats within a batch, chunks and the claims
that guard later chunks); ``check()`` verifying fingerprints; the dedup value's
codec.  The migration of stores written before the fingerprint existed is
in ``test_migrate.py``.
"""

from __future__ import annotations

import struct
import threading

import hypothesis.strategies as st
import lmdb
import pytest
from hypothesis import given

import syncstore
from syncstore import CorruptionError, Delivery, IdempotencyConflict, Message, SyncStoreError, _codec, _writer
from syncstore._ids import msg_id_ms

DAY = 86_400_000
_pair = struct.Struct(">QQ")


class FakeClock:
    """A settable wall clock in epoch milliseconds."""

    def __init__(self, now: int = 1_800_000_000_000) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def no_background_apply(monkeypatch):
    """The applier only runs when a test calls ``apply_pending()`` (or at close): which path a retry takes is then certain."""
    monkeypatch.setattr(_writer, "APPLY_INTERVAL_S", {"sync": 3600.0, "interval": 3600.0, "none": 3600.0})


def first_message(seq: int = 1, **changes) -> Message:
    fields = dict(sender=7, conv=42, client_seq=seq, body=b"hi")
    fields.update(changes)
    return Message(**fields)


def written(store: syncstore.Store) -> tuple:
    """Everything a delivery could change: the next LSN, every head, the pending records."""
    return store._writer._next_lsn, {uid: store.head(uid) for uid in range(20)}, len(store._writer.overlay)


def make_applied(store: syncstore.Store) -> None:
    store._writer.apply_pending()
    assert store._writer.overlay.dedup(7, 1) is None


# --- the issue's case, on every path a first delivery can be found ---------------------------

WHERE = ["pending", "applied", "reopened", "crashed"]


def first_delivery_at(where: str, path: str, clock: FakeClock) -> tuple[syncstore.Store, Delivery]:
    """Deliver the issue's first message; leave it unapplied, applied, or behind a reopen or a crash."""
    store = syncstore.open(path, clock_ms=clock)
    first = store.deliver(first_message(), to=[7, 9])
    if where == "pending":
        assert store._writer.overlay.dedup(7, 1) is not None, "the first delivery must still be unapplied"
    elif where == "applied":
        make_applied(store)
    elif where == "reopened":
        store.close()
        store = syncstore.open(path, clock_ms=clock)
    else:  # crashed: nothing applied, the entry is rebuilt by replay from the WAL record
        store._abandon()
        store = syncstore.open(path, clock_ms=clock)
    return store, first


@pytest.mark.parametrize("where", WHERE)
def test_the_issue_case_raises_idempotency_conflict_and_writes_nothing(store_path, no_background_apply, where):
    store, first = first_delivery_at(where, store_path, FakeClock())
    try:
        before = written(store)
        with pytest.raises(IdempotencyConflict) as raised:
            store.deliver(Message(sender=7, conv=43, client_seq=1, body=b"other"), to=[7, 11])
        error = raised.value
        assert isinstance(error, SyncStoreError) and not isinstance(error, ValueError)
        assert error.key == (7, 1) and error.msg_id == first.msg_id
        assert str(first.msg_id) in str(error) and "(7, 1)" in str(error) and "client_seq" in error.hint
        assert written(store) == before  # nothing sequenced, no cursor taken
        assert store.head(11) == 0
        assert [m.body for m in store.sync(7).messages] == [b"hi"]
        # The store goes on: the same retry with the first content is a duplicate, a new key is delivered.
        assert store.deliver(first_message(), to=[9, 7]) == Delivery(first.msg_id, True, {7: 1, 9: 1})
        assert store.deliver(Message(sender=7, conv=43, client_seq=2, body=b"other"), to=[7, 11]).cursors == {7: 2, 11: 1}
        store.check()
    finally:
        store.close()


CONFLICTS = {
    "conv": (first_message(conv=43), [7, 9]),
    "body": (first_message(body=b"hi!"), [7, 9]),
    "empty body": (first_message(body=b""), [7, 9]),
    "a recipient less": (first_message(), [7]),
    "a recipient more": (first_message(), [7, 9, 11]),
    "another recipient": (first_message(), [7, 11]),
}


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("change", list(CONFLICTS))
def test_each_part_of_the_content_is_checked(store_path, no_background_apply, where, change):
    store, first = first_delivery_at(where, store_path, FakeClock())
    try:
        message, to = CONFLICTS[change]
        with pytest.raises(IdempotencyConflict) as raised:
            store.deliver(message, to=to)
        assert (raised.value.key, raised.value.msg_id) == ((7, 1), first.msg_id)
        with pytest.raises(IdempotencyConflict):
            store.deliver_many([(message, to)])
        assert store.head(7) == 1 and store.head(9) == 1 and store.head(11) == 0
    finally:
        store.close()


RETRIES = {
    "the same": (first_message(), [7, 9]),
    "recipients in another order": (first_message(), [9, 7]),
    "a repeated recipient": (first_message(), [9, 7, 9]),
    "a new timestamp and priority": (first_message(ts_ms=123, priority=9), [7, 9]),
}


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("retry", list(RETRIES))
def test_a_retry_with_the_same_content_is_a_duplicate(store_path, no_background_apply, where, retry):
    """ts_ms, priority and the order or repeats of ``to`` are not part of the content; one byte more of body is."""
    store, first = first_delivery_at(where, store_path, FakeClock())
    try:
        message, to = RETRIES[retry]
        assert store.deliver(message, to=to) == Delivery(first.msg_id, True, {7: 1, 9: 1})
        assert store.deliver_many([(message, to)]) == [Delivery(first.msg_id, True, {7: 1, 9: 1})]
        assert store.sync(9).messages[0].ts_ms == msg_id_ms(first.msg_id)  # the first delivery's, kept
        with pytest.raises(IdempotencyConflict):
            store.deliver(Message(message.sender, message.conv, 1, message.body + b"!", message.ts_ms, message.priority), to=to)
        store.check()
    finally:
        store.close()


@pytest.mark.parametrize("where", ["pending", "applied"])
def test_an_expired_key_is_a_new_delivery_not_a_conflict(store_path, no_background_apply, where):
    clock = FakeClock()
    with syncstore.open(store_path, clock_ms=clock, dedup_window_ms=DAY, hot_window_ms=DAY) as store:
        first = store.deliver(first_message(), to=[7, 9])
        if where == "applied":
            make_applied(store)
        clock.now += DAY  # at the edge: still the same key
        with pytest.raises(IdempotencyConflict):
            store.deliver(first_message(body=b"other"), to=[7, 11])
        clock.now += 1
        later = store.deliver(first_message(body=b"other"), to=[7, 11])
        assert not later.duplicate and later.msg_id != first.msg_id and later.cursors == {7: 2, 11: 1}
        # From now on the newer delivery is the one a retry must match.
        assert store.deliver(first_message(body=b"other"), to=[11, 7]).msg_id == later.msg_id
        with pytest.raises(IdempotencyConflict) as raised:
            store.deliver(first_message(), to=[7, 9])
        assert raised.value.msg_id == later.msg_id
        store.check()


class SteppingBackClock(FakeClock):
    """Once armed, the next reading is ``ahead``, every later one ``now`` again: a wall clock stepping back."""

    ahead: int | None = None

    def __call__(self) -> int:
        if self.ahead is not None:
            ahead, self.ahead = self.ahead, None
            return ahead
        return self.now


@pytest.mark.parametrize("where", ["pending", "applied"])
def test_a_clock_stepping_back_inside_a_batch_does_not_revive_an_expired_key(store_path, no_background_apply, where):
    """deliver_many's pre-pass finds the key expired; then the clock steps back.  Sequencing must agree with
    the pre-pass (dedup's clock never goes backwards), or it would raise after writing the batch's first item."""
    clock = SteppingBackClock()
    with syncstore.open(store_path, clock_ms=clock, dedup_window_ms=DAY, hot_window_ms=DAY) as store:
        first = store.deliver(first_message(), to=[7])
        if where == "applied":
            make_applied(store)
        clock.ahead = clock.now + DAY + 1  # read once, by the pre-pass's look at key (7, 1)
        results = store.deliver_many([(first_message(seq=2), [7]), (first_message(body=b"new"), [7])])
        assert [r.duplicate for r in results] == [False, False] and results[1].msg_id != first.msg_id
        assert [m.body for m in store.sync(7).messages] == [b"hi", b"hi", b"new"]
        store.check()


# --- deliver_many --------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["pending", "applied"])
@pytest.mark.parametrize("position", [0, 2, 4])
def test_deliver_many_with_a_conflicting_item_writes_nothing(store_path, no_background_apply, where, position):
    store, first = first_delivery_at(where, store_path, FakeClock())
    try:
        items = [(first_message(seq=10 + i, body=b"new %d" % i), [9, 11]) for i in range(4)]
        items.insert(position, (first_message(body=b"other"), [7, 9]))
        before = written(store)
        with pytest.raises(IdempotencyConflict) as raised:
            store.deliver_many(items)
        assert (raised.value.key, raised.value.msg_id) == ((7, 1), first.msg_id)
        assert written(store) == before
        # None of the other items was delivered: each is new now.
        assert not any(d.duplicate for d in store.deliver_many([item for item in items if item[0].client_seq != 1]))
    finally:
        store.close()


@pytest.mark.parametrize("other", [(first_message(body=b"other"), [7, 9]), (first_message(conv=1), [7, 9]), (first_message(), [7, 11])])
def test_two_items_of_one_batch_with_one_key_and_different_content(store_path, no_background_apply, other):
    with syncstore.open(store_path) as store:
        before = written(store)
        items = [(first_message(seq=1), [7, 9]), (first_message(seq=2), [7]), other]
        with pytest.raises(IdempotencyConflict) as raised:
            store.deliver_many(items)
        assert raised.value.key == (7, 1) and raised.value.msg_id is None  # neither was delivered
        assert "items[0] and items[2]" in str(raised.value)
        assert written(store) == before
        # Repeats with the same content (in any recipient order) are duplicates of the first item.
        results = store.deliver_many([(first_message(seq=1), [7, 9]), (first_message(seq=1, ts_ms=5), [9, 7, 7])])
        assert results[1] == Delivery(results[0].msg_id, True, {7: 1, 9: 1}) and not results[0].duplicate


def test_a_repeat_in_a_batch_of_a_stored_key_names_the_stored_delivery(store_path, no_background_apply):
    with syncstore.open(store_path) as store:
        first = store.deliver(first_message(), to=[7, 9])
        with pytest.raises(IdempotencyConflict) as raised:
            store.deliver_many([(first_message(), [7, 9]), (first_message(body=b"other"), [7, 9])])
        assert raised.value.msg_id == first.msg_id


def test_a_conflict_in_the_last_chunk_is_found_before_the_first_chunk_is_written(store_path, no_background_apply, monkeypatch):
    monkeypatch.setattr(_writer, "BULK_CHUNK", 4)
    with syncstore.open(store_path) as store:
        first = store.deliver(first_message(), to=[7, 9])
        items = [(first_message(seq=10 + i), [9]) for i in range(10)] + [(first_message(body=b"other"), [7, 9])]
        before = written(store)
        with pytest.raises(IdempotencyConflict) as raised:
            store.deliver_many(items)
        assert raised.value.msg_id == first.msg_id
        assert written(store) == before and store._writer._idempotency._claims == {}
        results = store.deliver_many(items[:-1] + [(first_message(), [7, 9])])  # 3 chunks, all new but the retry
        assert [r.duplicate for r in results] == [False] * 10 + [True]
        assert store.head(9) == 11
        store.check()


def between_chunks(monkeypatch, action) -> list:
    """Run ``action(chunk_number)`` where deliver_many waits before each chunk (outside the lock); return its results."""
    original = _writer.Writer._backpressure
    calls: list = []
    busy = []  # the action's own deliveries pass here too: they are not chunks

    def hooked(self):
        if not busy:
            busy.append(True)
            try:
                calls.append(action(len(calls) + 1))
            finally:
                busy.clear()
        original(self)

    monkeypatch.setattr(_writer.Writer, "_backpressure", hooked)
    return calls


def test_a_concurrent_delivery_of_a_key_claimed_by_a_later_chunk(store_path, no_background_apply, monkeypatch):
    """The race deliver_many's pre-pass cannot see: another caller delivers a key of a later chunk meanwhile.

    Other content: that caller gets the conflict (the batch claims the key), and the batch goes through.
    The same content: that caller delivers first, and the batch's item is its duplicate.
    """
    monkeypatch.setattr(_writer, "BULK_CHUNK", 2)
    with syncstore.open(store_path) as store:
        items = [(first_message(seq=seq, body=b"m%d" % seq), [9]) for seq in range(1, 7)]  # 3 chunks

        def meanwhile(chunk):
            if chunk != 2:
                return None
            assert set(store._writer._idempotency._claims) == {(7, 3), (7, 4), (7, 5), (7, 6)}
            with pytest.raises(IdempotencyConflict) as raised:
                store.deliver(first_message(seq=5, body=b"other"), to=[9])
            assert raised.value.key == (7, 5) and raised.value.msg_id is None
            with pytest.raises(IdempotencyConflict):
                store.deliver_many([(first_message(seq=6), [9, 11])])  # another batch: refused by its pre-pass
            return store.deliver(first_message(seq=6, body=b"m6", ts_ms=1), to=[9])

        calls = between_chunks(monkeypatch, meanwhile)
        results = store.deliver_many(items)
        concurrent = calls[1]
        assert concurrent.cursors == {9: 3} and not concurrent.duplicate
        assert results[5] == Delivery(concurrent.msg_id, True, {9: 3})
        assert [m.body for m in store.sync(9).messages] == [b"m1", b"m2", b"m6", b"m3", b"m4", b"m5"]
        assert store._writer._idempotency._claims == {}
        store.check()


def test_claims_are_released_when_a_batch_fails_midway(store_path, no_background_apply, monkeypatch):
    monkeypatch.setattr(_writer, "BULK_CHUNK", 2)
    with syncstore.open(store_path) as store:

        def fail(chunk):
            if chunk == 2:
                raise syncstore.StoreClosed("simulated close between chunks")

        between_chunks(monkeypatch, fail)
        with pytest.raises(syncstore.StoreClosed):
            store.deliver_many([(first_message(seq=seq), [9]) for seq in range(1, 7)])
        assert store._writer._idempotency._claims == {}
        monkeypatch.undo()
        # The unwritten keys are free: other content for them is no conflict.
        assert not store.deliver(first_message(seq=5, body=b"other"), to=[9]).duplicate


def test_racing_senders_of_one_key_with_two_contents(store_path):
    """Threads race one key with content A or B: one wins; same content gets its duplicate, the other a conflict."""
    threads = 6
    with syncstore.open(store_path) as store:
        for seq in range(1, 21):
            barrier = threading.Barrier(threads)
            outcomes: list = [None] * threads

            def send(index: int, seq: int = seq, barrier: threading.Barrier = barrier, outcomes: list = outcomes) -> None:
                message, to = (first_message(seq=seq, body=b"A"), [1, 2]) if index % 2 else (first_message(seq=seq, body=b"B"), [2, 3])
                barrier.wait(60)
                try:
                    if index % 3 == 0:
                        outcomes[index] = (index % 2, store.deliver_many([(message, to)])[0])
                    else:
                        outcomes[index] = (index % 2, store.deliver(message, to=to))
                except IdempotencyConflict as error:
                    outcomes[index] = (index % 2, error)

            workers = [threading.Thread(target=send, args=(i,)) for i in range(threads)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join(60)
            assert all(outcome is not None for outcome in outcomes)
            winners = [(variant, d) for variant, d in outcomes if isinstance(d, Delivery) and not d.duplicate]
            assert len(winners) == 1
            won, first = winners[0]
            for variant, outcome in outcomes:
                if variant == won:
                    assert isinstance(outcome, Delivery) and (outcome.msg_id, outcome.cursors) == (first.msg_id, first.cursors)
                else:
                    assert isinstance(outcome, IdempotencyConflict) and outcome.msg_id == first.msg_id
        store.check()


# --- check() -------------------------------------------------------------------------------------


def rewrite_lmdb(path: str, db: bytes, key: bytes, change) -> None:
    env = lmdb.open(f"{path}/state", max_dbs=8)
    try:
        handle = env.open_db(db)
        with env.begin(write=True, db=handle) as txn:
            txn.put(key, change(txn.get(key)))
    finally:
        env.close()


@pytest.mark.parametrize("damage", ["fingerprint", "message body", "message conv and entries"])
def test_check_verifies_every_fingerprint_against_the_message(store_path, damage):
    with syncstore.open(store_path) as store:
        msg_id = store.deliver(first_message(), to=[7, 9]).msg_id
        store.deliver(first_message(seq=2), to=[7, 9])
    key = struct.pack(">Q", msg_id)
    if damage == "fingerprint":
        rewrite_lmdb(store_path, b"dedup", _pair.pack(7, 1), lambda v: v[:8] + bytes(16) + v[24:])
    elif damage == "message body":  # the body is stored once: only the fingerprint can tell
        rewrite_lmdb(store_path, b"messages", key, lambda v: v[:-2] + b"HI")
    else:  # conv changed consistently in the message and both history entries
        rewrite_lmdb(store_path, b"messages", key, lambda v: v[:12] + struct.pack(">Q", 43) + v[20:])
        env = lmdb.open(f"{store_path}/state", max_dbs=8)
        try:
            history = env.open_db(b"history", dupsort=True, dupfixed=True)
            with env.begin(write=True) as txn:
                for uid in (7, 9):
                    assert txn.delete(_pair.pack(uid, 42), struct.pack(">Q", 1), db=history)
                    txn.put(_pair.pack(uid, 43), struct.pack(">Q", 1), db=history)
        finally:
            env.close()
    with syncstore.open(store_path) as store:
        with pytest.raises(CorruptionError) as raised:
            store.check()
        assert raised.value.key == (7, 1)


# --- the dedup value's codec ---------------------------------------------------------------------

u64s = st.integers(0, 2**64 - 1)
pairs_of = st.lists(st.tuples(u64s, u64s), max_size=20).map(tuple)
fingerprints = st.binary(min_size=16, max_size=16)


@given(u64s, fingerprints, pairs_of)
def test_dedup_value_round_trip(msg_id, fingerprint, pairs):
    value = _codec.encode_dedup(msg_id, fingerprint, pairs)
    assert len(value) == 28 + 16 * len(pairs)
    assert value[:8] == struct.pack(">Q", msg_id) and value[8:24] == fingerprint and value[24:28] == struct.pack(">I", len(pairs))
    assert _codec.decode_dedup(value) == (msg_id, fingerprint, pairs)


@given(u64s, fingerprints, pairs_of, st.integers(1, 40), st.binary(min_size=1, max_size=40))
def test_dedup_decoder_refuses_every_wrong_length(msg_id, fingerprint, pairs, cut, extra):
    value = _codec.encode_dedup(msg_id, fingerprint, pairs)
    with pytest.raises(CorruptionError):
        _codec.decode_dedup(value[: max(0, len(value) - cut)])
    with pytest.raises(CorruptionError):
        _codec.decode_dedup(value + extra)


@given(st.tuples(u64s, st.binary(max_size=64)), st.tuples(u64s, st.binary(max_size=64)))
def test_fingerprints_match_exactly_when_conv_and_body_do(first, second):
    one, other = _codec.dedup_fingerprint(*first), _codec.dedup_fingerprint(*second)
    assert len(one) == 16
    assert (one == other) == (first == second)


@given(u64s, st.binary(max_size=64), st.integers(0, 63), st.integers(0, 7))
def test_a_fingerprint_changes_with_any_bit_of_conv_or_body(conv, body, bit, byte):
    assert _codec.dedup_fingerprint(conv ^ (1 << bit), body) != _codec.dedup_fingerprint(conv, body)
    if body:
        flipped = bytearray(body)
        flipped[byte % len(body)] ^= 1 << (bit % 8)
        assert _codec.dedup_fingerprint(conv, bytes(flipped)) != _codec.dedup_fingerprint(conv, body)
    # conv is fixed-width: moving a byte between conv and body is another content
    assert _codec.dedup_fingerprint(conv >> 8, bytes([conv & 0xFF]) + body) != _codec.dedup_fingerprint(conv, body)


@pytest.mark.parametrize("size", [0, 8, 15, 17, 32])
def test_encode_dedup_refuses_a_fingerprint_of_another_size(size):
    with pytest.raises(ValueError):
        _codec.encode_dedup(1, bytes(size), ((1, 1),))
