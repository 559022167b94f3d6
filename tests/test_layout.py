"""State format 3 (issue #8): one body per message, reference counts, the history index, and what check() catches.

The model-based test (test_model.py) drives get/history and the reference
recount through reopens and crashes; here: the layout's byte-level promises
(each body stored once, whatever the fan-out), every kind of damage that
``check()`` must name, and the read paths' edge cases.
"""

from __future__ import annotations

import struct

import lmdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import syncstore
from syncstore import CorruptionError, InvalidArgument, Message, MessageRecord, _codec

_u64 = struct.Struct(">Q")
_pair = struct.Struct(">QQ")


def dump(path: str) -> dict[str, list[tuple[bytes, bytes]]]:
    env = lmdb.open(f"{path}/state", max_dbs=8, readonly=True, lock=False)
    try:
        out = {}
        for name in (b"messages", b"inbox", b"history"):
            with env.begin(db=env.open_db(name, create=False)) as txn:
                out[name.decode()] = list(txn.cursor())
        return out
    finally:
        env.close()


def test_a_group_message_is_stored_once_with_one_small_entry_per_recipient(store_path):
    body = b"x" * 1024
    members = list(range(100, 1100))
    with syncstore.open(store_path) as store:
        msg_id = store.deliver(Message(100, 77, 1, body), to=members).msg_id
    with syncstore.open(store_path, readonly=True) as view:
        assert view.check()["messages"] == 1
    state = dump(store_path)
    assert len(state["messages"]) == 1
    key, value = state["messages"][0]
    assert key == _u64.pack(msg_id) and value.endswith(body)
    assert _codec.unpack_stored_head(value)[0] == 1000  # refs
    assert len(state["inbox"]) == len(state["history"]) == 1000
    assert {len(v) for _k, v in state["inbox"]} == {_codec.INBOX_ENTRY_SIZE}
    assert {len(v) for _k, v in state["history"]} == {8}


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9), st.lists(st.integers(0, 9), min_size=1, max_size=10, unique=True)), min_size=1, max_size=20))
def test_reference_counts_equal_the_number_of_recipients(tmp_path_factory, sends):
    path = str(tmp_path_factory.mktemp("refs") / "store")
    with syncstore.open(path) as store:
        expected = {}
        for seq, (sender, to) in enumerate(sends):
            expected[store.deliver(Message(sender, sender, seq, b"m%d" % seq), to=to).msg_id] = len(to)
    refs = {_u64.unpack(k)[0]: _codec.unpack_stored_head(v)[0] for k, v in dump(path)["messages"]}
    assert refs == expected


# --- check() names every kind of damage --------------------------------------------------------


def damage(path: str, change) -> None:
    env = lmdb.open(f"{path}/state", max_dbs=8)
    try:
        dbs = {name: env.open_db(name.encode(), dupsort=name in ("inbox", "history"), dupfixed=name in ("inbox", "history")) for name in ("messages", "inbox", "history", "meta")}
        with env.begin(write=True) as txn:
            change(txn, dbs)
    finally:
        env.close()


@pytest.fixture
def two_messages(store_path):
    with syncstore.open(store_path) as store:
        first = store.deliver(Message(7, 42, 1, b"one"), to=[7, 9]).msg_id
        second = store.deliver(Message(7, 43, 2, b"two"), to=[7]).msg_id
    return store_path, first, second


def _refs(txn, dbs, msg_id, refs):
    key = _u64.pack(msg_id)
    txn.put(key, _codec.set_refs(txn.get(key, db=dbs["messages"]), refs), db=dbs["messages"])


DAMAGES = {
    # name: (what to do, words the error must contain)
    "refs too high": (lambda txn, dbs, a, b: _refs(txn, dbs, a, 3), "counts 3 references"),
    "refs too low (freed early)": (lambda txn, dbs, a, b: _refs(txn, dbs, a, 1), "counts 1 references"),
    "orphan body": (lambda txn, dbs, a, b: txn.put(_u64.pack(b + 1), _codec.set_refs(txn.get(_u64.pack(b), db=dbs["messages"]), 1), db=dbs["messages"]), "orphan"),
    "body missing": (lambda txn, dbs, a, b: txn.delete(_u64.pack(b), db=dbs["messages"]), "not stored"),
    "history entry missing": (lambda txn, dbs, a, b: txn.delete(_pair.pack(9, 42), _u64.pack(1), db=dbs["history"]), "no history entry"),
    "history entry extra": (lambda txn, dbs, a, b: txn.put(_pair.pack(9, 44), _u64.pack(7), db=dbs["history"]), "history index holds"),
    "history under another conv": (
        lambda txn, dbs, a, b: (txn.delete(_pair.pack(7, 43), _u64.pack(2), db=dbs["history"]), txn.put(_pair.pack(7, 44), _u64.pack(2), db=dbs["history"])),
        "no history entry (conv 43)",
    ),
    "cursor gap": (
        lambda txn, dbs, a, b: (
            txn.delete(_u64.pack(7), _codec.pack_inbox_entry(2, b), db=dbs["inbox"]),
            txn.put(_u64.pack(7), _codec.pack_inbox_entry(3, b), db=dbs["inbox"]),
        ),
        "cursor 3 follows 1",
    ),
}


@pytest.mark.parametrize("name", list(DAMAGES))
def test_check_names_each_kind_of_layout_damage(two_messages, name):
    path, first, second = two_messages
    change, words = DAMAGES[name]
    damage(path, lambda txn, dbs: change(txn, dbs, first, second))
    with syncstore.open(path, readonly=True) as view:
        with pytest.raises(CorruptionError) as raised:
            view.check()
    assert words in str(raised.value)


def test_a_missing_body_is_corruption_on_read_too(two_messages):
    path, first, second = two_messages
    damage(path, lambda txn, dbs: txn.delete(_u64.pack(second), db=dbs["messages"]))
    with syncstore.open(path, readonly=True) as view:
        assert view.sync(9).messages[0].body == b"one"
        with pytest.raises(CorruptionError) as raised:
            view.sync(7)
        assert raised.value.key == (7, 2)
        assert view.get(second) is None


# --- get() and history() ---------------------------------------------------------------------


def test_get_and_history_see_unapplied_durable_messages_and_bad_arguments_are_refused(store_path, monkeypatch):
    from syncstore import _writer

    monkeypatch.setattr(_writer, "APPLY_INTERVAL_S", {"sync": 3600.0, "interval": 3600.0, "none": 3600.0})
    with syncstore.open(store_path) as store:
        ids = [store.deliver(Message(1, 5 + i % 2, i, b"b%d" % i), to=[1, 2]).msg_id for i in range(10)]
        store._writer.apply_pending()  # the first ten in LMDB ...
        ids += [store.deliver(Message(1, 5 + i % 2, i, b"b%d" % i), to=[1, 2]).msg_id for i in range(10, 16)]  # ... six not
        assert len(store._writer.overlay) == 6
        assert store.get(ids[3]) == MessageRecord(ids[3], 1, 6, 3, store.get(ids[3]).ts_ms, 0, b"b3")
        assert store.get(ids[13]).body == b"b13"
        assert store.get(ids[-1] + 1) is None
        page = store.history(2, 5, limit=4)  # conv 5: cursors 15, 13, 11 (unapplied), 9 (applied)
        assert [m.cursor for m in page.messages] == [15, 13, 11, 9] and page.has_more and page.before == 9
        page = store.history(2, 5, before=page.before, limit=4)
        assert [m.cursor for m in page.messages] == [7, 5, 3, 1] and not page.has_more
        assert store.history(2, 5, before=1).messages == () and store.history(2, 99).messages == ()
        assert store.history(3, 5) == syncstore.HistoryPage(syncstore.Messages(), 0, False)
        for bad in ({"user": -1}, {"conv": "5"}, {"before": 2**64}, {"limit": 0}, {"limit": 10_001}):
            args = {"user": 2, "conv": 5, **bad}
            with pytest.raises(InvalidArgument):
                store.history(args.pop("user"), args.pop("conv"), **args)
        for bad_id in (-1, 2**64, "1", None):
            with pytest.raises(InvalidArgument):
                store.get(bad_id)


# --- deleting entries frees a body exactly when its last reference goes -------------------------


def test_removing_a_prefix_frees_each_body_with_its_last_reference(store_path):
    with syncstore.open(store_path) as store:
        group = store.deliver(Message(1, 50, 1, b"group"), to=[1, 2, 3]).msg_id  # cursor 1 for each
        one = store.deliver(Message(1, 60, 2, b"one"), to=[1, 2]).msg_id  # cursor 2 for users 1 and 2
        for seq in range(3, 6):  # newer messages: the heads stay
            store.deliver(Message(1, 70, seq, b"later"), to=[1, 2, 3])
        store._writer.apply_pending()
        state = store._state
        assert state.remove_prefix(1, 2) == 0  # both messages are still referenced by users 2 and 3
        assert store.get(group).body == b"group" and store.get(one).body == b"one"
        assert store.check()["messages"] == 5
        assert state.remove_prefix(2, 2) == 1  # the last reference to `one`
        assert store.get(one) is None and store.get(group).body == b"group"
        assert state.remove_prefix(3, 1) == 1  # and to `group`
        assert store.get(group) is None
        counts = store.check()  # every count still equals a recount; no orphan
        assert counts["messages"] == 3 and counts["inbox_entries"] == 9
        assert [m.cursor for m in store.history(1, 70).messages] == [5, 4, 3]
        assert store.history(1, 50).messages == () and store.history(2, 60).messages == ()
        assert (store.head(1), store.head(2), store.head(3)) == (5, 5, 4)


@pytest.mark.parametrize("upto", [5, 9])
def test_removing_the_head_entry_is_refused_and_removes_nothing(store_path, upto):
    with syncstore.open(store_path) as store:
        for seq in range(1, 6):
            store.deliver(Message(1, 70, seq, b"m"), to=[1])
        store._writer.apply_pending()
        with pytest.raises(InvalidArgument):
            store._state.remove_prefix(1, upto)
        assert len(store.sync(1).messages) == 5 and store.check()["messages"] == 5


def test_check_still_finds_a_gap_after_a_removed_prefix(store_path):
    with syncstore.open(store_path) as store:
        for seq in range(1, 8):
            store.deliver(Message(1, 70, seq, b"m"), to=[1])
        store._writer.apply_pending()
        store._state.remove_prefix(1, 2)

    def drop_cursor_5(txn, dbs):
        (entry,) = [v for k, v in txn.cursor(db=dbs["inbox"]) if k == _u64.pack(1) and v[:8] == _u64.pack(5)]
        assert txn.delete(_u64.pack(1), entry, db=dbs["inbox"])

    damage(store_path, drop_cursor_5)
    with syncstore.open(store_path, readonly=True) as view:
        with pytest.raises(CorruptionError) as raised:
            view.check()
    assert "cursor 6 follows 4" in str(raised.value)
