"""The demo's change-log phase: a live tail, long-polling clients, a named consumer, a follower replica.

What an IM server does with the change log besides serving clients:

1. *A live tail* (``changes(follow=True)``) runs while the second half of the
   messages is delivered -- a search indexer or a push service downstream.
   It must receive every first delivery of that half exactly once, in LSN
   order, with the cursors ``deliver`` returned, and end quietly when the
   store closes.
2. *Online clients* long-poll with ``wait(user, since)`` instead of polling
   ``sync``: woken by the durable write that reaches them, they read the new
   page.  At the end each holds exactly its inbox.
3. *A named consumer* (``store.consumer("demo-indexer")``) reads the whole
   log from 0 -- every delivery once, in order -- acknowledges it and is
   then listed with no lag.
4. *A follower replica* in another directory takes the store's changes
   with ``apply_changes`` in batches, is closed and reopened half-way (it
   resumes from its own ``lsn``), and must end with every user's inbox, head
   and ``check()`` equal to the leader's.
5. *Snapshots*: a full snapshot, three more writes (to a system "audit"
   inbox beyond the demo's users, so no client's inbox changes), a delta
   (which must be small), then ``restore`` into a new store: every head
   equal, ``check()`` clean, a new epoch.

Pure orchestration over the public API; failures go through ``fail``.
"""

from __future__ import annotations

import itertools
import random
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from . import store as _store
from ._restore import restore
from .model import Change, Delivered, Delivery, Message

__all__ = ["StreamResult", "LiveTail", "OnlineClients", "consume_and_replicate"]

Fail = Callable[[str], None]
Key = tuple[int, int]
_FOLLOWER_BATCH = 2_000
#: Writes between the base and the delta snapshot, to a system inbox (user ``users + 1``): the demo's counts add them.
SNAPSHOT_WRITES = 3
_POLL_S = 0.25  # an online client re-checks its stop flag this often (the wait itself is woken by writes)


@dataclass(frozen=True)
class StreamResult:
    """What the change-log phase exercised (each verified, or a failure was reported)."""

    tail_changes: int  # changes the live tail received during the second delivery half
    online_clients: int
    wakeups: int  # wait() calls that returned True
    consumer_changes: int  # changes the named consumer read and acknowledged
    follower_changes: int  # changes the follower applied
    follower_users: int  # users whose inbox on the follower equals the leader's
    restored_users: int  # users whose head in a store restored from a base + delta snapshot equals the store's


class LiveTail:
    """A ``changes(follow=True)`` tail from the store's current LSN, in a thread, until the store closes."""

    def __init__(self, store: _store.Store) -> None:
        self.since = store.lsn
        self.received: list[Change] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(store,), daemon=True)
        self._thread.start()

    def _run(self, store: _store.Store) -> None:
        try:
            self.received.extend(store.changes(since=self.since, follow=True))
        except BaseException as error:  # reported by verify
            self.error = error

    def verify(self, expected: Mapping[Key, Delivery], upto: int, fail: Fail) -> int:
        """After the store closed: up to LSN ``upto``, the tail got exactly ``expected`` (first deliveries), once each, in LSN order."""
        self._thread.join()
        if self.error is not None:
            fail(f"live tail failed: {self.error!r}")
            return 0
        self.received = [change for change in self.received if change.lsn <= upto]  # later writes are another phase's
        lsns = [change.lsn for change in self.received]
        if lsns != list(range(self.since + 1, self.since + 1 + len(lsns))):
            fail(f"live tail: LSNs not dense from {self.since + 1}")
        got: dict[Key, Delivered] = {}
        for change in self.received:
            data = change.data
            if isinstance(data, Delivered):
                key = (data.message.sender, data.message.client_seq)
                if key in got:
                    fail(f"live tail: delivery {key} received twice")
                got[key] = data
        if set(got) != set(expected):
            fail(f"live tail: received {len(got)} deliveries, {len(expected)} were made while it ran")
        for key, data in got.items():
            delivery = expected.get(key)
            if delivery is not None and (data.message.msg_id, dict(data.cursors)) != (delivery.msg_id, dict(delivery.cursors)):
                fail(f"live tail: delivery {key} has other ids or cursors than deliver returned")
        return len(self.received)


class OnlineClients:
    """A few connected devices that long-poll ``wait(user, since)`` and read what woke them."""

    def __init__(self, store: _store.Store, users: Iterable[int]) -> None:
        self.store = store
        self.cursors = {uid: store.head(uid) for uid in users}
        self.wakeups = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(uid,), daemon=True) for uid in self.cursors]
        for thread in self._threads:
            thread.start()

    def _run(self, uid: int) -> None:
        try:
            while not self._stop.is_set():
                if self.store.wait(uid, since=self.cursors[uid], timeout=_POLL_S):
                    with self._lock:
                        self.wakeups += 1
                    self._read(uid)
        except BaseException as error:
            self.error = error

    def _read(self, uid: int) -> None:
        while True:
            page = self.store.sync(uid, since=self.cursors[uid], limit=100)
            self.cursors[uid] = page.next
            if not page.has_more:
                return

    def stop_and_verify(self, fail: Fail) -> int:
        """Stop polling (store still open); each client must have read up to its head."""
        self._stop.set()
        for thread in self._threads:
            thread.join()
        if self.error is not None:
            fail(f"online client failed: {self.error!r}")
        for uid, cursor in self.cursors.items():
            head = self.store.head(uid)
            if cursor != head:
                fail(f"online client {uid}: long-polling left it at cursor {cursor}, its head is {head}")
        return len(self.cursors)


def consume_and_replicate(store: _store.Store, deliveries: Mapping[Key, Delivery], users: int, rng: random.Random, fail: Fail) -> tuple[int, int, int, int]:
    """Steps 3 to 5: the named consumer, the follower replica, a snapshot restored; returns (consumed, applied, users matching, users restored)."""
    consumer = store.consumer("demo-indexer", start=0)
    seen: set[Key] = set()
    last = 0
    for change in consumer.changes():
        if change.lsn != last + 1:
            fail(f"consumer: change {change.lsn} after {last}")
        last = change.lsn
        if isinstance(change.data, Delivered):
            message = change.data.message
            key = (message.sender, message.client_seq)
            delivery = deliveries.get(key)
            if key in seen or delivery is None or delivery.msg_id != message.msg_id or dict(delivery.cursors) != dict(change.data.cursors):
                fail(f"consumer: delivery {key} repeated, unknown, or with other ids or cursors")
            seen.add(key)
    consumer.ack(last)
    if len(seen) != len(deliveries):
        fail(f"consumer: read {len(seen)} deliveries from the log, {len(deliveries)} were made")
    listed = {status.name: status for status in store.consumers()}
    if "demo-indexer" not in listed or listed["demo-indexer"].lag != 0 or listed["demo-indexer"].position != store.lsn:
        fail(f"consumer: listed as {listed.get('demo-indexer')!r} after acknowledging {last}")
    store.drop_consumer("demo-indexer")  # an operator removes it; the log is no longer pinned

    directory = tempfile.mkdtemp(prefix="syncstore-demo-follower-")
    path = f"{directory}/follower"
    applied = 0
    try:
        follower = _store.open(path, follower=True)
        try:
            stop_at = rng.randint(1, max(1, store.lsn))  # close and reopen the follower around here
            while follower.lsn < store.lsn:
                if follower.lsn >= stop_at:
                    follower.close()  # a follower restart: it resumes from its own lsn
                    follower = _store.open(path, follower=True)
                    stop_at = store.lsn + 1
                batch = list(itertools.islice(store.changes(since=follower.lsn), _FOLLOWER_BATCH))
                applied += follower.apply_changes(batch)
            matching = 0
            for uid in range(1, users + 1):
                ours = [(m.cursor, m.msg_id) for m in store.sync(uid, 0, 10_000).messages]
                theirs = [(m.cursor, m.msg_id) for m in follower.sync(uid, 0, 10_000).messages]
                if ours != theirs or follower.head(uid) != store.head(uid):
                    fail(f"follower: user {uid}'s inbox differs from the leader's")
                else:
                    matching += 1
            follower.check()
        finally:
            follower.close()
        restored = _snapshot_and_restore(store, directory, users, fail)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return len(seen), applied, matching, restored


def _snapshot_and_restore(store: _store.Store, directory: str, users: int, fail: Fail) -> int:
    """Step 5: a full snapshot and a delta of a few more writes, restored into a new store; returns the users compared.

    The restored store must hold exactly the store's state at the delta's
    LSN (every head equal, ``check()`` clean) under a new epoch.
    """
    snapshots = f"{directory}/snapshots"
    store.snapshot(snapshots)
    # To a system inbox beyond the demo's users (an audit trail), so that no client's inbox changes.
    audit = users + 1
    extra = [store.deliver(Message(sender=audit, conv=0, client_seq=n + 1, body=b"audit: snapshot %d" % n), to=[audit]) for n in range(SNAPSHOT_WRITES)]
    store.flush()
    delta = store.snapshot(snapshots)
    if delta.kind != "delta" or delta.rows == 0:
        fail(f"snapshot after 3 writes was a {delta.kind} of {delta.rows} rows, expected a small delta")
    restore(snapshots, f"{directory}/restored")
    with _store.open(f"{directory}/restored") as copy:
        if copy.epoch == store.epoch:
            fail("a restored store kept its source's epoch")
        compared = 0
        for uid in range(1, users + 2):
            if copy.head(uid) != store.head(uid):
                fail(f"restored store: user {uid} has head {copy.head(uid)}, the store {store.head(uid)}")
            compared += 1
        copy.check()
    if any(delivery.duplicate for delivery in extra):
        fail("a snapshot demo write came back as a duplicate")
    return compared
