"""Bad input: every public argument is validated, raises InvalidArgument (a ValueError and a
SyncStoreError) naming the argument, and leaves the store exactly as it was.  Also closed and
read-only stores."""

from __future__ import annotations

import glob
import hashlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import syncstore
from syncstore import InvalidArgument, Message, ReadOnlyStore, StoreClosed, SyncStoreError

MAX_U64 = 2**64 - 1
SEGMENT = 1 << 16  # keeps the WAL file small enough to fingerprint cheaply
USERS = (1, 2, 3, 4, 99)

NOT_U64 = [-1, 2**64, 2**64 + 5, -(2**70), True, False, 1.0, 3.5, "1", b"1", None, [1]]


def msg(seq=1, body=b"hello", sender=7, **kw):
    return Message(sender=sender, conv=3, client_seq=seq, body=body, **kw)


def assert_invalid(info, *names):
    """The error is an InvalidArgument (and a ValueError and a SyncStoreError) mentioning one of ``names``."""
    error = info.value
    assert type(error) is InvalidArgument
    assert isinstance(error, ValueError) and isinstance(error, SyncStoreError)
    text = str(error)
    assert text.strip() and error.message.strip()
    assert any(name in text for name in names), (text, names)


# --- a populated store, and a fingerprint of everything observable about it -------------------


def _wal_digest(path):
    h = hashlib.sha256()
    for name in sorted(glob.glob(os.path.join(path, "wal", "*"))):
        h.update(os.path.basename(name).encode())
        with open(name, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def fingerprint(store):
    pages = {u: (store.head(u), tuple(store.sync(u, 0, 10_000).messages)) for u in USERS}
    counts = store.check()
    return pages, counts, _wal_digest(store.path)


@pytest.fixture
def store(tmp_path):
    """A store holding a few messages, reopened so that everything is applied and nothing pends."""
    path = str(tmp_path / "store")
    with syncstore.open(path, segment_bytes=SEGMENT, max_body_bytes=100) as s:
        s.deliver(msg(1, b"a"), to=[1, 2])
        s.deliver(msg(2, b"b"), to=[2, 3])
        s.deliver_many([(msg(3, b"c"), [1]), (msg(4, b"d"), [3, 1])])
    s = syncstore.open(path, segment_bytes=SEGMENT, max_body_bytes=100)
    yield s
    s.close()


def assert_unchanged_and_usable(store, before):
    assert fingerprint(store) == before
    # Still fully usable, and the next write continues the cursors densely (no LSN or cursor hole).
    heads = {u: store.head(u) for u in (1, 2)}
    d = store.deliver(msg(1000, b"after"), to=[1, 2])
    assert not d.duplicate
    assert d.cursors == {1: heads[1] + 1, 2: heads[2] + 1}
    store.check()


# --- syncstore.open ------------------------------------------------------------------------------


def expect_open_invalid(path, **options):
    """``syncstore.open`` must raise InvalidArgument; a store it wrongly opened is closed again."""
    with pytest.raises(InvalidArgument) as info:
        syncstore.open(path, **options).close()
    return info


OPEN_BAD = [
    ("durability", "SYNC"),
    ("durability", "fsync"),
    ("durability", ""),
    ("durability", None),
    ("durability", 1),
    ("replica_id", -1),
    ("replica_id", 1024),
    ("replica_id", 2**64),
    ("replica_id", 1.0),
    ("replica_id", "0"),
    ("replica_id", None),
    ("replica_id", True),
    ("map_size", 0),
    ("map_size", -1),
    ("map_size", 1000),
    ("map_size", float(1 << 30)),
    ("map_size", "1G"),
    ("map_size", None),
    ("map_size", True),
    ("hot_window_ms", 0),
    ("hot_window_ms", -5),
    ("hot_window_ms", "7d"),
    ("dedup_window_ms", 0),
    ("dedup_window_ms", -1),
    ("dedup_window_ms", 86_400_000.0),
    ("max_body_bytes", -1),
    ("max_body_bytes", (64 << 20) + 1),
    ("max_body_bytes", 1.5),
    ("max_body_bytes", None),
    ("segment_bytes", 0),
    ("segment_bytes", 4095),
    ("segment_bytes", -4096),
    ("segment_bytes", "64M"),
    ("segment_bytes", 8192.0),
    ("readonly", "no"),
    ("readonly", 1),
    ("readonly", None),
    ("clock_ms", 123),
    ("clock_ms", "now"),
]


@pytest.mark.parametrize(("name", "value"), OPEN_BAD, ids=[f"{n}={v!r}" for n, v in OPEN_BAD])
def test_open_rejects_bad_option_on_a_new_path(tmp_path, name, value):
    path = tmp_path / "new"
    info = expect_open_invalid(str(path), **{name: value})
    assert_invalid(info, name)
    assert info.value.key == name
    # Nothing created (at most an empty directory).
    assert not path.exists() or os.listdir(path) == []


@pytest.mark.parametrize(("name", "value"), OPEN_BAD, ids=[f"{n}={v!r}" for n, v in OPEN_BAD])
def test_open_rejects_bad_option_on_an_existing_store(tmp_path, name, value):
    path = str(tmp_path / "s")
    with syncstore.open(path, segment_bytes=SEGMENT) as s:
        s.deliver(msg(1), to=[1])
    digest = _wal_digest(path)
    info = expect_open_invalid(path, **{name: value})
    assert_invalid(info, name)
    assert _wal_digest(path) == digest
    # The failed open released everything: a good open works and sees the data.
    with syncstore.open(path, segment_bytes=SEGMENT) as s:
        assert s.head(1) == 1
        assert s.deliver(msg(2), to=[1]).cursors == {1: 2}


@pytest.mark.parametrize(("hot", "dedup"), [(1000, 999), (7 * 86_400_000, 86_400_000), (2, 1)])
def test_open_rejects_dedup_window_shorter_than_hot_window(tmp_path, hot, dedup):
    with pytest.raises(InvalidArgument) as info:
        syncstore.open(str(tmp_path / "s"), hot_window_ms=hot, dedup_window_ms=dedup)
    assert_invalid(info, "dedup_window_ms")
    # Equal windows are fine.
    syncstore.open(str(tmp_path / "s"), hot_window_ms=hot, dedup_window_ms=hot).close()


def test_open_accepts_option_boundaries(tmp_path):
    with syncstore.open(
        str(tmp_path / "s"),
        durability="none",
        replica_id=1023,
        map_size=1 << 20,
        hot_window_ms=1,
        dedup_window_ms=1,
        max_body_bytes=0,
        segment_bytes=4096,
    ) as s:
        assert s.deliver(msg(1, b""), to=[1]).cursors == {1: 1}
    for mode in ("sync", "interval", "none"):
        syncstore.open(str(tmp_path / mode), durability=mode, max_body_bytes=64 << 20).close()


def test_open_rejects_replica_id_other_than_the_one_recorded(tmp_path):
    path = str(tmp_path / "s")
    with syncstore.open(path, replica_id=5, segment_bytes=SEGMENT) as s:
        s.deliver(msg(1), to=[1])
    digest = _wal_digest(path)
    with pytest.raises(InvalidArgument) as info:
        syncstore.open(path, replica_id=6, segment_bytes=SEGMENT)
    assert_invalid(info, "replica_id")
    assert "5" in str(info.value)  # says which one to use
    assert _wal_digest(path) == digest
    with syncstore.open(path, replica_id=5, segment_bytes=SEGMENT) as s:
        assert s.head(1) == 1


@pytest.mark.parametrize("path", [123, None, 4.5, ["a"]])
def test_open_rejects_a_path_that_is_not_a_path(path):
    info = expect_open_invalid(path)
    assert_invalid(info, "path")


def test_open_rejects_a_path_that_is_a_regular_file(tmp_path):
    target = tmp_path / "file"
    target.write_bytes(b"not a store")
    with pytest.raises(InvalidArgument) as info:
        syncstore.open(str(target))
    assert_invalid(info, "path", str(target))
    assert target.read_bytes() == b"not a store"


def test_open_accepts_a_pathlike(tmp_path):
    with syncstore.open(tmp_path / "s") as s:
        assert s.deliver(msg(1), to=[1]).cursors == {1: 1}


def test_readonly_on_a_path_without_a_store(tmp_path):
    for path in (tmp_path / "missing", tmp_path):
        with pytest.raises(syncstore.StoreNotFound) as info:  # issue 7: StoreNotFound, no longer InvalidArgument
            syncstore.open(str(path), readonly=True)
        assert "no store" in str(info.value) and "readonly" in str(info.value)
    assert not (tmp_path / "missing").exists()
    assert not (tmp_path / "state").exists() and not (tmp_path / "wal").exists()


# --- Message(...) ------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["sender", "conv", "client_seq"])
@pytest.mark.parametrize("value", NOT_U64, ids=repr)
def test_message_rejects_bad_ids(field, value):
    fields = {"sender": 1, "conv": 2, "client_seq": 3, "body": b"x", field: value}
    with pytest.raises(InvalidArgument) as info:
        Message(**fields)
    assert_invalid(info, field)
    assert info.value.key == field


@pytest.mark.parametrize("body", ["text", bytearray(b"x"), memoryview(b"x"), None, 5, [b"x"]], ids=repr)
def test_message_rejects_non_bytes_body(body):
    with pytest.raises(InvalidArgument) as info:
        Message(sender=1, conv=2, client_seq=3, body=body)
    assert_invalid(info, "body")


@pytest.mark.parametrize("priority", [-1, 256, 1000, True, 1.0, "1", None], ids=repr)
def test_message_rejects_bad_priority(priority):
    with pytest.raises(InvalidArgument) as info:
        Message(sender=1, conv=2, client_seq=3, body=b"", priority=priority)
    assert_invalid(info, "priority")


@pytest.mark.parametrize("ts_ms", [-1, 2**64, True, 1.5, "5", b"5"], ids=repr)
def test_message_rejects_bad_ts_ms(ts_ms):
    with pytest.raises(InvalidArgument) as info:
        Message(sender=1, conv=2, client_seq=3, body=b"", ts_ms=ts_ms)
    assert_invalid(info, "ts_ms")


@given(
    st.sampled_from(["sender", "conv", "client_seq", "ts_ms"]),
    st.one_of(st.integers(max_value=-1), st.integers(min_value=2**64)),
)
def test_message_rejects_any_out_of_range_int(field, value):
    fields = {"sender": 1, "conv": 2, "client_seq": 3, "body": b"x", field: value}
    with pytest.raises(InvalidArgument):
        Message(**fields)


@given(
    st.integers(0, MAX_U64),
    st.integers(0, MAX_U64),
    st.integers(0, MAX_U64),
    st.one_of(st.none(), st.integers(0, MAX_U64)),
    st.integers(0, 255),
    st.binary(max_size=20),
)
def test_message_accepts_every_valid_value(sender, conv, client_seq, ts_ms, priority, body):
    m = Message(sender=sender, conv=conv, client_seq=client_seq, body=body, ts_ms=ts_ms, priority=priority)
    assert (m.sender, m.conv, m.client_seq, m.ts_ms, m.priority, m.body) == (sender, conv, client_seq, ts_ms, priority, body)


# --- deliver ----------------------------------------------------------------------------------


@pytest.mark.parametrize("message", [None, "hello", b"hello", (7, 3, 1, b"x"), {"sender": 7}, 5], ids=repr)
def test_deliver_rejects_non_message(store, message):
    before = fingerprint(store)
    with pytest.raises(InvalidArgument) as info:
        store.deliver(message, to=[1])
    assert_invalid(info, "message")
    assert_unchanged_and_usable(store, before)


def test_deliver_rejects_body_over_the_limit(store):
    before = fingerprint(store)
    with pytest.raises(InvalidArgument) as info:
        store.deliver(msg(50, b"x" * 101), to=[1])
    assert_invalid(info, "body")
    assert "100" in str(info.value)
    assert_unchanged_and_usable(store, before)
    # Exactly the limit is fine, and the rejected key was not consumed.
    assert store.deliver(msg(50, b"x" * 100), to=[1]).duplicate is False


@pytest.mark.parametrize("to", [[], (), set(), iter(()), {}], ids=["list", "tuple", "set", "iter", "dict"])
def test_deliver_rejects_no_recipients(store, to):
    before = fingerprint(store)
    with pytest.raises(InvalidArgument) as info:
        store.deliver(msg(60), to=to)
    assert_invalid(info, "to", "recipient")
    assert_unchanged_and_usable(store, before)


@pytest.mark.parametrize("to", ["12", "", b"\x01", bytearray(b"\x01"), 5, None, 1.5, object()], ids=repr)
def test_deliver_rejects_to_that_is_not_a_list_of_ids(store, to):
    before = fingerprint(store)
    with pytest.raises(InvalidArgument) as info:
        store.deliver(msg(61), to=to)
    assert_invalid(info, "to")
    assert_unchanged_and_usable(store, before)


BAD_RECIPIENTS = [
    [-1],
    [2**64],
    [1.0],
    ["1"],
    [None],
    [True],
    [2, -1],
    [2, 3, 2**70],
    [[1]],
    [(1, 2)],
    [1, True],  # True == 1: must not be silently merged into recipient 1
    [5, 5.0],  # 5.0 == 5: likewise
]


@pytest.mark.parametrize("to", BAD_RECIPIENTS, ids=repr)
def test_deliver_rejects_bad_recipient_ids(store, to):
    before = fingerprint(store)
    with pytest.raises(InvalidArgument) as info:
        store.deliver(msg(62), to=to)
    assert_invalid(info, "recipient", "to")
    assert_unchanged_and_usable(store, before)


def test_deliver_rejects_too_many_recipients(store):
    before = fingerprint(store)
    with pytest.raises(InvalidArgument) as info:
        store.deliver(msg(63), to=list(range(100_001)))
    assert_invalid(info, "to", "recipients")
    assert_unchanged_and_usable(store, before)


def test_deliver_repeated_recipients_count_once(store):
    head = store.head(1)
    assert store.deliver(msg(64), to=[1, 1, 1]).cursors == {1: head + 1}
    assert store.head(1) == head + 1


# --- deliver_many ---------------------------------------------------------------------------------


@pytest.mark.parametrize("items", [None, 5, "ab", b"ab", msg(70)], ids=repr)
def test_deliver_many_rejects_non_iterable_items(store, items):
    before = fingerprint(store)
    with pytest.raises(InvalidArgument) as info:
        store.deliver_many(items)
    assert_invalid(info, "items")
    assert_unchanged_and_usable(store, before)


BAD_ITEMS = {
    "bare message": msg(71),
    "1-tuple": (msg(71),),
    "3-tuple": (msg(71), [1], 0),
    "None": None,
    "swapped": ([1], msg(71)),
    "str message": ("hi", [1]),
    "empty to": (msg(71), []),
    "str to": (msg(71), "1"),
    "bad recipient": (msg(71), [1, -1]),
    "float recipient": (msg(71), [1.0]),
    "body too big": (msg(71, b"y" * 101), [1]),
}


@pytest.mark.parametrize("position", [0, 1, 3])
@pytest.mark.parametrize("bad", list(BAD_ITEMS), ids=str)
def test_deliver_many_one_bad_item_writes_nothing(store, bad, position):
    before = fingerprint(store)
    good = [(msg(80 + i, b"g%d" % i), [1, 2]) for i in range(3)]
    items = good[:position] + [BAD_ITEMS[bad]] + good[position:]
    with pytest.raises(InvalidArgument) as info:
        store.deliver_many(items)
    assert_invalid(info, "items", "to", "recipient", "message", "body")
    assert_unchanged_and_usable(store, before)
    # None of the good items' idempotency keys was consumed.
    results = store.deliver_many(good)
    assert [r.duplicate for r in results] == [False, False, False]


def test_deliver_many_bad_item_at_the_end_of_a_generator_writes_nothing(store):
    before = fingerprint(store)

    def items():
        for i in range(50):
            yield (msg(200 + i), [4])
        yield (msg(250), [])

    with pytest.raises(InvalidArgument):
        store.deliver_many(items())
    assert_unchanged_and_usable(store, before)
    assert store.head(4) == 0


# --- sync and head --------------------------------------------------------------------------------


@pytest.mark.parametrize("user", NOT_U64, ids=repr)
def test_sync_and_head_reject_bad_user(store, user):
    before = fingerprint(store)
    with pytest.raises(InvalidArgument) as info:
        store.sync(user)
    assert_invalid(info, "user")
    with pytest.raises(InvalidArgument) as info:
        store.head(user)
    assert_invalid(info, "user")
    assert_unchanged_and_usable(store, before)


@pytest.mark.parametrize("since", [-1, 2**64, 2**100, True, 1.5, "0", None], ids=repr)
def test_sync_rejects_bad_since(store, since):
    before = fingerprint(store)
    with pytest.raises(InvalidArgument) as info:
        store.sync(1, since=since)
    assert_invalid(info, "since")
    assert_unchanged_and_usable(store, before)


@pytest.mark.parametrize("limit", [0, -1, 10_001, 2**64, True, 1.5, "10", None], ids=repr)
def test_sync_rejects_bad_limit(store, limit):
    before = fingerprint(store)
    with pytest.raises(InvalidArgument) as info:
        store.sync(1, since=0, limit=limit)
    assert_invalid(info, "limit")
    assert "10000" in str(info.value) or "10,000" in str(info.value)
    assert_unchanged_and_usable(store, before)


def test_sync_accepts_boundaries(store):
    assert [m.cursor for m in store.sync(1, 0, 1).messages] == [1]
    assert len(store.sync(1, 0, 10_000).messages) == store.head(1)
    assert store.sync(1, MAX_U64, 10).messages == ()
    assert store.sync(MAX_U64, 0, 10).messages == ()
    assert store.head(MAX_U64) == 0


@settings(max_examples=40)
@given(st.one_of(st.integers(max_value=-1), st.integers(min_value=2**64)), st.sampled_from(["user", "since"]))
def test_sync_rejects_any_out_of_range_int(store, value, which):
    args = {"user": 1, "since": 0, which: value}
    with pytest.raises(InvalidArgument):
        store.sync(args["user"], since=args["since"])


# --- closed and read-only stores ---------------------------------------------------------------------


def _every_method(store):
    return {
        "deliver": lambda: store.deliver(msg(500), to=[1]),
        "deliver_many": lambda: store.deliver_many([(msg(501), [1])]),
        "sync": lambda: store.sync(1),
        "head": lambda: store.head(1),
        "check": lambda: store.check(),
    }


def test_closed_store_raises_store_closed(tmp_path):
    s = syncstore.open(str(tmp_path / "s"))
    s.deliver(msg(1), to=[1])
    s.close()
    for name, call in _every_method(s).items():
        with pytest.raises(StoreClosed) as info:
            call()
        assert isinstance(info.value, SyncStoreError), name
        assert str(info.value).strip()
    s.close()  # idempotent
    with syncstore.open(str(tmp_path / "s")) as again:
        assert again.head(1) == 1


def test_closed_store_deliver_many_of_nothing_raises_store_closed(tmp_path):
    s = syncstore.open(str(tmp_path / "s"))
    s.close()
    with pytest.raises(StoreClosed):
        s.deliver_many([])


def test_readonly_store_refuses_writes_and_reads(tmp_path):
    path = str(tmp_path / "s")
    with syncstore.open(path) as w:
        w.deliver(msg(1, b"one"), to=[1, 2])
        w.deliver(msg(2, b"two"), to=[1])
    with syncstore.open(path) as w:  # reopened: everything applied, nothing pending
        counts = w.check()
        assert counts["pending"] == 0 and counts["inbox_entries"] == 3
    with syncstore.open(path, readonly=True) as r:
        for call in (lambda: r.deliver(msg(3), to=[1]), lambda: r.deliver_many([(msg(3), [1])])):
            with pytest.raises(ReadOnlyStore) as info:
                call()
            assert isinstance(info.value, SyncStoreError) and str(info.value).strip()
        assert r.head(1) == 2 and r.head(2) == 1
        assert [m.body for m in r.sync(1).messages] == [b"one", b"two"]
        got = r.check()
        assert {k: got[k] for k in ("users", "inbox_entries", "dedup_entries")} == {
            k: counts[k] for k in ("users", "inbox_entries", "dedup_entries")
        }
    with syncstore.open(path) as w:  # the refused writes left nothing behind
        assert w.head(1) == 2
        assert not w.deliver(msg(3), to=[1]).duplicate


def test_readonly_store_deliver_many_of_nothing_raises_read_only(tmp_path):
    path = str(tmp_path / "s")
    syncstore.open(path).close()
    with syncstore.open(path, readonly=True) as r:
        with pytest.raises(ReadOnlyStore):
            r.deliver_many([])
