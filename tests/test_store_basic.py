"""The public contract, end to end, on a real store."""

from __future__ import annotations

import syncstore
from syncstore import Message


def test_contract_example(store_path):
    with syncstore.open(store_path, durability="sync") as store:
        d = store.deliver(Message(sender=7, conv=42, client_seq=1, body=b"hi"), to=[7, 9])
        assert d.cursors == {7: 1, 9: 1} and not d.duplicate
        page = store.sync(9, since=0, limit=100)
        assert [(m.cursor, m.body, m.msg_id) for m in page.messages] == [(1, b"hi", d.msg_id)]
        assert page.next == 1 and not page.has_more
        assert store.head(9) == 1 and store.head(8) == 0
        again = store.deliver(Message(sender=7, conv=42, client_seq=1, body=b"hi"), to=[7, 9])
        assert again.duplicate and again.msg_id == d.msg_id and again.cursors == d.cursors
        store.check()


def test_state_survives_reopen_and_cursors_continue(store_path):
    with syncstore.open(store_path) as store:
        for seq in range(1, 6):
            store.deliver(Message(sender=1, conv=2, client_seq=seq, body=b"m%d" % seq), to=[5])
    with syncstore.open(store_path) as store:
        assert store.head(5) == 5
        dup = store.deliver(Message(sender=1, conv=2, client_seq=3, body=b"m3"), to=[5])
        assert dup.duplicate and dup.cursors == {5: 3}
        assert store.deliver(Message(sender=1, conv=2, client_seq=6, body=b"m6"), to=[5]).cursors == {5: 6}
        page = store.sync(5, since=2, limit=2)
        assert [m.cursor for m in page.messages] == [3, 4] and page.next == 4 and page.has_more
        assert store.check()["inbox_entries"] + store.check()["pending"] >= 1
