"""Writer.append_local: a local write of a non-delivery kind, built under the sequencing lock."""

from __future__ import annotations

import pytest

import syncstore
from syncstore._codec import Expire
from syncstore._ids import msg_id_ms
from syncstore.errors import InvalidArgument, StoreClosed


def test_append_local_sequences_applies_and_shows_in_the_change_log(store_path: str) -> None:
    with syncstore.open(store_path) as store:
        delivery = store.deliver(syncstore.Message(sender=1, conv=2, client_seq=3, body=b"hi"), to=[4])
        writer = store._writer
        assert writer is not None
        key = (msg_id_ms(delivery.msg_id), 1, 3)
        seen = []

        def build(txn: object) -> Expire:
            seen.append(txn)
            return Expire((key,))

        assert writer.append_local(build) == Expire((key,))
        assert len(seen) == 1 and store.lsn == 2
        assert [change.kind for change in store.changes(since=0)] == ["deliver", "expire"]
        writer.apply_pending()  # the overlay holds the delivery's dedup until it is applied
        assert store.deliver(syncstore.Message(sender=1, conv=2, client_seq=3, body=b"hi"), to=[4]).duplicate is False


def test_append_local_writes_nothing_when_build_refuses_or_returns_none(store_path: str) -> None:
    with syncstore.open(store_path) as store:
        writer = store._writer
        assert writer is not None
        assert writer.append_local(lambda txn: None) is None

        def refuse(txn: object) -> Expire:
            raise InvalidArgument("no")

        with pytest.raises(InvalidArgument):
            writer.append_local(refuse)
        assert store.lsn == 0
    with syncstore.open(store_path) as store:
        assert store.lsn == 0


def test_append_local_after_close_raises_store_closed(store_path: str) -> None:
    store = syncstore.open(store_path)
    writer = store._writer
    assert writer is not None
    store.close()
    with pytest.raises(StoreClosed):
        writer.append_local(lambda txn: None)
