"""The demo's safety phase: what clients and senders get wrong in production, and how the store answers.

After the main run of ``syncstore demo`` is verified, three situations an IM
server meets sooner or later, each checked on the demo's own data:

1. *A reused idempotency key.*  A buggy client sends a different message
   with a ``(sender, client_seq)`` it already used.  The store must refuse it
   with :class:`IdempotencyConflict` naming the first delivery's msg_id, and
   write nothing (the recipients' heads do not move).
2. *A client from the future.*  A device holds a cursor beyond what the
   store has (the store was restored from an older copy under it).  Its
   ``sync`` gets a reset page (``reset_reason="ahead"``, ``next=0``); it drops
   what it holds, resyncs from ``next`` and must end with exactly its
   messages again.
3. *A new epoch.*  The store is closed and its epoch renewed, as a restore
   does.  Clients that kept the old epoch with their cursor get a reset page
   (``"epoch"``) and resync the same way.

Pure orchestration over the public API; failures are reported through the
``fail`` callback, like the rest of the demo.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from . import store as _store
from .errors import IdempotencyConflict
from .model import Delivery, Message, StoredMessage

__all__ = ["SafetyResult", "reused_keys", "clients_ahead", "clients_of_an_old_epoch"]

PAGE_SIZE = 50
Fail = Callable[[str], None]


@dataclass(frozen=True)
class SafetyResult:
    """What the safety phase exercised (each one verified, or a failure was reported)."""

    reused_keys_refused: int
    ahead_resets: int
    epoch_resets: int


def reused_keys(store: _store.Store, sent: Sequence[tuple[Message, Sequence[int]]], deliveries: Mapping[tuple[int, int], Delivery], fail: Fail) -> int:
    """Resend each of ``sent`` with its key but another body: every one must be refused, writing nothing."""
    refused = 0
    for message, to in sent:
        key = (message.sender, message.client_seq)
        heads = {uid: store.head(uid) for uid in to}
        other = Message(message.sender, message.conv, message.client_seq, message.body + b" (edited)")
        try:
            store.deliver(other, to)
        except IdempotencyConflict as error:
            if error.msg_id != deliveries[key].msg_id:
                fail(f"reused key {key}: the conflict names msg_id {error.msg_id}, the first delivery was {deliveries[key].msg_id}")
            refused += 1
        else:
            fail(f"reused key {key} with a different body was accepted")
        if {uid: store.head(uid) for uid in to} != heads:
            fail(f"reused key {key}: a refused send moved a recipient's head")
    return refused


def _resync(store: _store.Store, uid: int, expected: Sequence[StoredMessage], epoch: int, fail: Fail) -> None:
    """A client that was told to reset reads everything again from 0; it must get exactly ``expected``."""
    since = 0
    received: list[StoredMessage] = []
    while True:
        page = store.sync(uid, since=since, limit=PAGE_SIZE, epoch=epoch)
        if page.reset:
            fail(f"user {uid}: reset again ({page.reset_reason}) while resyncing from 0")
            return
        received.extend(page.messages)
        since = page.next
        if not page.has_more:
            break
    if received != list(expected):
        fail(f"user {uid}: resynced {len(received)} messages after a reset, expected its {len(expected)}")


def clients_ahead(store: _store.Store, received: Mapping[int, Sequence[StoredMessage]], rng: random.Random, count: int, fail: Fail) -> int:
    """``count`` users' devices hold a cursor beyond the store's head: reset ("ahead"), then a full resync."""
    resets = 0
    for uid in rng.sample(sorted(received), min(count, len(received))):
        stale_cursor = store.head(uid) + rng.randint(1, 5)
        page = store.sync(uid, since=stale_cursor, limit=PAGE_SIZE, epoch=store.epoch)
        if not (page.reset and page.reset_reason == "ahead" and page.next == 0 and not page.messages):
            fail(f"user {uid}: cursor {stale_cursor} beyond the head {store.head(uid)} got no 'ahead' reset page: {page}")
            continue
        resets += 1
        _resync(store, uid, received[uid], page.epoch, fail)
    return resets


def clients_of_an_old_epoch(
    store: _store.Store, old_epoch: int, received: Mapping[int, Sequence[StoredMessage]], rng: random.Random, count: int, fail: Fail
) -> int:
    """``count`` users' devices kept the epoch from before it was renewed: reset ("epoch"), then a full resync."""
    if store.epoch == old_epoch:
        fail("the epoch did not change when it was renewed")
        return 0
    resets = 0
    for uid in rng.sample(sorted(received), min(count, len(received))):
        cursor = len(received[uid])  # a perfectly valid cursor, but of the old history
        page = store.sync(uid, since=cursor, limit=PAGE_SIZE, epoch=old_epoch)
        if not (page.reset and page.reset_reason == "epoch" and page.next == 0 and page.epoch == store.epoch):
            fail(f"user {uid}: a cursor of the old epoch got no 'epoch' reset page: {page}")
            continue
        resets += 1
        _resync(store, uid, received[uid], page.epoch, fail)
    return resets
