"""The demo's change-log checks catch what they are there to catch (they can fail)."""

from __future__ import annotations

import random

import syncstore
from syncstore import _demo_stream
from syncstore.model import Delivery, Message


def test_the_live_tail_check_reports_a_missing_and_a_wrong_delivery(store_path):
    failures: list[str] = []
    with syncstore.open(store_path) as store:
        tail = _demo_stream.LiveTail(store)
        made = {}
        for seq in range(1, 4):
            made[(1, seq)] = store.deliver(Message(sender=1, conv=1, client_seq=seq, body=b"x"), to=[1, 2])
        assert store._writer.watchers.wait_registered(1, timeout=60)
    expected = dict(made)
    expected[(1, 99)] = Delivery.of(1, False, ((1, 9),))  # made "while it ran" but never seen by the tail
    first = made[(1, 1)]
    expected[(1, 1)] = Delivery.of(first.msg_id, False, ((1, 1), (2, 7)))  # another cursor than the log's
    assert tail.verify(expected, 3, failures.append) == 3
    assert any("received 3 deliveries, 4 were made" in f for f in failures)
    assert any("other ids or cursors" in f for f in failures)


def test_consume_and_replicate_agree_with_the_deliveries_and_report_a_wrong_one(store_path):
    with syncstore.open(store_path) as store:
        made = {(1, seq): store.deliver(Message(sender=1, conv=1, client_seq=seq, body=b"x"), to=[1 + seq % 3, 9]) for seq in range(1, 40)}
        ok: list[str] = []
        assert _demo_stream.consume_and_replicate(store, made, 10, random.Random(1), ok.append) == (39, 39, 10, 11)
        assert ok == []
        wrong = dict(made)
        wrong[(1, 5)] = Delivery.of(123, False, ((2, 1),))
        failures: list[str] = []
        _demo_stream.consume_and_replicate(store, wrong, 10, random.Random(1), failures.append)
        assert any("(1, 5)" in f for f in failures)
