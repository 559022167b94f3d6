"""The demo's reads phase (syncstore._demo_reads): it passes on a correct store and reports what is wrong."""

from __future__ import annotations

import random

import syncstore
from syncstore import Message
from syncstore._demo_reads import scroll_back_and_quote


def held(store: syncstore.Store, users) -> dict:
    return {uid: list(store.sync(uid, limit=10_000).messages) for uid in users}


def test_a_correct_store_passes_and_every_conversation_is_scrolled_to_its_start(store_path):
    with syncstore.open(store_path) as store:
        for seq in range(1, 90):
            store.deliver(Message(seq % 3, 100 + seq % 4, seq, b"m%d" % seq), to=[seq % 3, 3 + seq % 2])
        failures: list[str] = []
        result = scroll_back_and_quote(store, held(store, range(5)), random.Random(1), 5, failures.append)
    assert failures == []
    assert result.conversations > 0 and result.quotes > 0
    assert result.history_pages > result.conversations  # some conversations span several pages of 20


def test_what_a_client_holds_but_the_store_does_not_answer_is_reported(store_path):
    with syncstore.open(store_path) as store:
        for seq in range(1, 30):
            store.deliver(Message(1, 7, seq, b"m%d" % seq), to=[1, 2])
        received = held(store, (1, 2))
        received[2][5] = received[2][5]._replace(body=b"tampered")  # the client got something else than the store holds
        failures: list[str] = []
        scroll_back_and_quote(store, received, random.Random(2), 2, failures.append)
    assert any("history of conversation 7" in f for f in failures)
