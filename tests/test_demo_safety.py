"""The demo's safety phase (syncstore._demo_safety): it passes on a real store, and it notices a store
that gets any of the three situations wrong."""

from __future__ import annotations

import random

import syncstore
from syncstore import Message, _demo_safety, _layout
from syncstore.model import Delivery, Messages, Page


def _store_with_messages(path: str) -> tuple[syncstore.Store, list[tuple[Message, list[int]]], dict, dict]:
    store = syncstore.open(path)
    sent, deliveries = [], {}
    for seq in range(1, 31):
        message, to = Message(seq % 3 + 1, 5, seq, b"body %d" % seq), [1, 2, seq % 4 + 3]
        deliveries[(message.sender, seq)] = store.deliver(message, to)
        sent.append((message, to))
    received = {uid: list(store.sync(uid, limit=1000).messages) for uid in range(1, 7)}
    return store, sent, deliveries, received


def test_a_real_store_passes_every_check(tmp_path):
    path = str(tmp_path / "s")
    failures: list[str] = []
    store, sent, deliveries, received = _store_with_messages(path)
    with store:
        assert _demo_safety.reused_keys(store, sent[:10], deliveries, failures.append) == 10
        assert _demo_safety.clients_ahead(store, received, random.Random(1), 4, failures.append) == 4
        old = store.epoch
    _layout.renew_epoch(path)
    with syncstore.open(path) as store:
        assert _demo_safety.clients_of_an_old_epoch(store, old, received, random.Random(2), 4, failures.append) == 4
    assert failures == []


class _Careless:
    """A store that accepts reused keys and never answers with a reset page."""

    def __init__(self, store: syncstore.Store) -> None:
        self._store = store
        self.epoch = store.epoch

    def head(self, uid: int) -> int:
        return self._store.head(uid)

    def deliver(self, message: Message, to) -> Delivery:
        return Delivery.of(1, False, ((uid, 99) for uid in to))

    def sync(self, uid: int, since: int = 0, limit: int = 100, epoch: int | None = None) -> Page:
        return Page(Messages(), since, False, epoch=self.epoch)


def test_a_careless_store_fails_every_check(tmp_path):
    store, sent, deliveries, received = _store_with_messages(str(tmp_path / "s"))
    with store:
        careless = _Careless(store)
        failures: list[str] = []
        assert _demo_safety.reused_keys(careless, sent[:3], deliveries, failures.append) == 0
        assert len(failures) == 3 and all("was accepted" in f for f in failures)
        failures.clear()
        assert _demo_safety.clients_ahead(careless, received, random.Random(1), 2, failures.append) == 0
        assert len(failures) == 2 and all("no 'ahead' reset page" in f for f in failures)
        failures.clear()
        careless.epoch += 1
        assert _demo_safety.clients_of_an_old_epoch(careless, store.epoch, received, random.Random(1), 2, failures.append) == 0
        assert len(failures) == 2 and all("no 'epoch' reset page" in f for f in failures)
