"""Model-based test: the store against a plain-dict model, through reopens and crashes.

A hypothesis state machine delivers (alone and in batches), retries earlier
idempotency keys with the same content (a duplicate, also with the recipients
in another order and a new ts_ms) or with another conv, body or recipients (an
``IdempotencyConflict`` that writes nothing), reads pages with random
``since``/``limit``, closes and reopens, and "crashes" (``Store._abandon()``,
which drops the store like a SIGKILL, then ``open`` recovers from the WAL).
After every step the store's own ``check()`` must pass -- it recounts every
message's references, so a body orphaned or freed early fails it -- and every
head must match the model; ``history`` (paged back from random points) and
``get`` are checked against the model too.  A small user-id and client_seq space makes collisions (and
so duplicates) frequent.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import defaultdict

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import syncstore
from syncstore import IdempotencyConflict, InvalidArgument, Message, MessageRecord, StoreClosed, StoredMessage
from syncstore._ids import msg_id_ms
from syncstore.wal import DEFAULT_SEGMENT_BYTES

USER_IDS = range(6)
users = st.integers(0, 5)
MAX_BODY = 16
messages = st.builds(
    Message,
    sender=users,
    conv=st.integers(0, 3),
    client_seq=st.integers(0, 12),
    body=st.binary(max_size=6),
    ts_ms=st.none() | st.integers(0, 2**64 - 1),
    priority=st.integers(0, 255),
)
recipient_lists = st.lists(users, min_size=1, max_size=7)  # repeats allowed: they count once; up to all six users (a group)
batches = st.lists(st.tuples(messages, recipient_lists), min_size=1, max_size=6)
limits = st.integers(1, 8) | st.just(10_000)
# Small WAL segments make rotation and retirement frequent; the default (64 MiB) is the real thing.
segment_sizes = st.sampled_from([4096, 16_384, 1 << 20, DEFAULT_SEGMENT_BYTES])

Key = tuple[int, int]
#: What a retry of a key must repeat: conv, body and the set of recipients.
Content = tuple[int, bytes, frozenset[int]]


def content(message: Message, to: list[int]) -> Content:
    return message.conv, message.body, frozenset(to)


class FakeClock:
    """A wall clock the machine steps, backwards too (msg_ids must stay monotonic)."""

    def __init__(self) -> None:
        self.now = 1_700_000_000_000

    def __call__(self) -> int:
        return self.now


class StoreMachine(RuleBasedStateMachine):
    durability = "sync"

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="syncstore-model-")
        self.path = f"{self.dir}/store"
        self.clock = FakeClock()
        self.store: syncstore.Store | None = None
        self.inbox: dict[int, list[StoredMessage]] = defaultdict(list)
        self.first: dict[Key, tuple[int, dict[int, int]]] = {}  # key -> (msg_id, cursors) of the first delivery
        self.contents: dict[Key, Content] = {}  # key -> content of the first delivery
        self.last_msg_id = 0
        # Readers see durable writes only: in "interval"/"none" mode a user's visible head lies
        # between what was last made durable (flush, reopen) and what was acknowledged, and
        # never goes back.
        self.durable: dict[int, int] = defaultdict(int)
        self.seen: dict[int, int] = defaultdict(int)
        # The change log: (msg_id, cursors) of every first delivery, in LSN order (LSN k is log[k - 1]).
        self.log: list[tuple[int, dict[int, int]]] = []
        self.follower: syncstore.Store | None = None  # follows the store by apply_changes(store.changes(...))

    def _open(self, segment_bytes: int) -> syncstore.Store:
        return syncstore.open(
            self.path, durability=self.durability, clock_ms=self.clock, max_body_bytes=MAX_BODY, segment_bytes=segment_bytes
        )

    @initialize(segment_bytes=segment_sizes)
    def open_store(self, segment_bytes):
        self.store = self._open(segment_bytes)

    def _open_follower(self) -> syncstore.Store:
        return syncstore.open(f"{self.dir}/follower", follower=True, durability=self.durability, clock_ms=self.clock, max_body_bytes=MAX_BODY)

    def teardown(self) -> None:
        try:
            if self.follower is not None:
                self.follower.close()
            if self.store is not None:
                self.store.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    # --- the model ---------------------------------------------------------------------

    def _expect(self, message: Message, to: list[int], delivery: syncstore.Delivery) -> None:
        """Check one Delivery against the model and apply it there."""
        key = (message.sender, message.client_seq)
        first = self.first.get(key)
        if first is not None:
            assert delivery.duplicate, f"retry of {key} was delivered again: {delivery}"
            assert (delivery.msg_id, dict(delivery.cursors)) == first, f"retry of {key}: {delivery}, first was {first}"
            return
        assert not delivery.duplicate, f"first delivery of {key} reported as duplicate: {delivery}"
        recipients = list(dict.fromkeys(to))
        expected = {uid: len(self.inbox[uid]) + 1 for uid in recipients}
        assert dict(delivery.cursors) == expected
        assert list(delivery.cursors) == recipients  # in the order given, repeats dropped
        assert delivery.msg_id > self.last_msg_id, "msg_ids must increase, across restarts and clock steps"
        self.last_msg_id = delivery.msg_id
        self.first[key] = (delivery.msg_id, expected)
        self.log.append((delivery.msg_id, expected))
        self.contents[key] = content(message, to)
        ts = msg_id_ms(delivery.msg_id) if message.ts_ms is None else message.ts_ms
        for uid, cursor in expected.items():
            self.inbox[uid].append(
                StoredMessage(cursor, delivery.msg_id, message.sender, message.conv, message.client_seq, ts, message.priority, message.body)
            )

    def _all_durable(self) -> None:
        for uid in USER_IDS:
            self.durable[uid] = len(self.inbox[uid])

    def _visible_head(self, uid: int) -> int:
        """The store's head of ``uid``, checked against the model's bounds."""
        head = self.store.head(uid)
        if self.durability == "sync":
            assert head == len(self.inbox[uid])
        assert max(self.durable[uid], self.seen[uid]) <= head <= len(self.inbox[uid]), f"user {uid}: head {head}"
        self.seen[uid] = head
        return head

    def _conflict(self, items: list[tuple[Message, list[int]]]) -> tuple[Key, int | None] | None:
        """The (key, first msg_id or None) an IdempotencyConflict must name for these items, or None if they are fine."""
        batch: dict[Key, Content] = {}
        for message, to in items:
            key = (message.sender, message.client_seq)
            if key in self.contents:
                if self.contents[key] != content(message, to):
                    return key, self.first[key][0]
            elif batch.setdefault(key, content(message, to)) != content(message, to):
                return key, None  # two items of one batch disagree; neither is delivered yet
        return None

    def _deliver_or_conflict(self, items: list[tuple[Message, list[int]]], batch: bool) -> None:
        """Deliver ``items`` (one with deliver(), or with deliver_many()) and check the outcome against the model."""
        conflict = self._conflict(items)
        if conflict is not None:
            self.store.flush()  # every acknowledged write visible: a timer sync cannot move a head below
            self._all_durable()
            heads = {uid: self.store.head(uid) for uid in USER_IDS}
            with pytest.raises(IdempotencyConflict) as raised:
                if batch:
                    self.store.deliver_many(items)
                else:
                    self.store.deliver(items[0][0], to=items[0][1])
            assert (raised.value.key, raised.value.msg_id) == conflict
            assert {uid: self.store.head(uid) for uid in USER_IDS} == heads, "a conflict wrote something"
            return
        if batch:
            results = self.store.deliver_many(items)
            assert len(results) == len(items)
        else:
            results = [self.store.deliver(items[0][0], to=items[0][1])]
        for (message, to), delivery in zip(items, results):
            self._expect(message, to, delivery)

    def _check_everything(self) -> None:
        self._all_durable()
        for uid in USER_IDS:
            page = self.store.sync(uid, since=0, limit=10_000)
            assert list(page.messages) == self.inbox[uid], f"user {uid}"
            assert not page.has_more and page.next == len(self.inbox[uid])
            for conv in {m.conv for m in self.inbox[uid]}:
                assert list(self.store.history(uid, conv, limit=10_000).messages) == self._history(uid, conv, None)
        for msg_id, _cursors in self.first.values():
            assert self.store.get(msg_id) == self._record(msg_id)

    def _history(self, uid: int, conv: int, before: int | None) -> list[StoredMessage]:
        """The model's answer to history(): the user's messages of ``conv`` below ``before``, newest first."""
        return [m for m in reversed(self.inbox[uid]) if m.conv == conv and (before is None or m.cursor < before)]

    def _record(self, msg_id: int) -> MessageRecord | None:
        for inbox in self.inbox.values():
            for m in inbox:
                if m.msg_id == msg_id:
                    return MessageRecord(*m[1:])
        return None

    # --- rules -------------------------------------------------------------------------

    @rule(message=messages, to=recipient_lists)
    def deliver(self, message, to):
        self._deliver_or_conflict([(message, to)], batch=False)

    @rule(items=batches)
    def deliver_many(self, items):
        self._deliver_or_conflict(items, batch=True)

    @precondition(lambda self: self.first)
    @rule(data=st.data(), same=st.booleans(), body=st.binary(max_size=6), to=recipient_lists, conv=st.integers(0, 3), batch=st.booleans())
    def retry(self, data, same, body, to, conv, batch):
        """A client retries an earlier key: with its content (recipients reordered or repeated, a new ts_ms), or with other content."""
        key = data.draw(st.sampled_from(sorted(self.first)), label="key")
        if same:
            conv, body, users = self.contents[key]
            to = data.draw(st.permutations(sorted(users)), label="recipient order") + data.draw(st.lists(st.sampled_from(sorted(users)), max_size=2), label="repeats")
        ts_ms = data.draw(st.none() | st.integers(0, 2**64 - 1), label="ts_ms")
        message = Message(key[0], conv, key[1], body, ts_ms=ts_ms, priority=data.draw(st.integers(0, 255), label="priority"))
        self._deliver_or_conflict([(message, to)], batch=batch)

    @rule(items=batches, bad=st.sampled_from(["no recipients", "negative recipient", "body too large", "not a pair"]), where=st.integers(0, 6))
    def deliver_many_rejected(self, items, bad, where):
        """One invalid item anywhere in a batch: InvalidArgument, and nothing is written."""
        item: object
        if bad == "no recipients":
            item = (items[0][0], [])
        elif bad == "negative recipient":
            item = (items[0][0], [1, -1])
        elif bad == "body too large":
            item = (Message(1, 1, 99, b"x" * (MAX_BODY + 1)), [1])
        else:
            item = (items[0][0],)
        items = list(items)
        items.insert(min(where, len(items)), item)
        with pytest.raises(InvalidArgument):
            self.store.deliver_many(items)

    @rule(user=users, data=st.data(), limit=limits)
    def sync(self, user, data, limit):
        inbox = self.inbox[user]
        since = data.draw(st.integers(0, len(inbox) + 2), label="since")
        low = max(self.durable[user], self.seen[user])  # visible for sure
        page = self.store.sync(user, since=since, limit=limit)
        # A cursor beyond the visible head gets a reset page (resync from 0).  The visible head
        # lies between `low` and what was acknowledged ("interval"/"none": between syncs).
        if page.reset:
            assert (page.reset_reason, len(page.messages), page.next) == ("ahead", 0, 0)
            assert since > low, f"reset for cursor {since}, within the durable head {low}"
            assert self.durability != "sync" or since > len(inbox)
            assert page.has_more or not low
            return
        assert since <= len(inbox), "a cursor beyond every acknowledged message must get a reset page"
        expected = [m for m in inbox if m.cursor > since][:limit]
        got = list(page.messages)
        assert got == expected[: len(got)], "a page is a prefix of what was acknowledged"
        assert len(got) >= min(limit, max(0, low - since)), "a durable message is missing"
        assert page.next == (got[-1].cursor if got else since)
        if got:
            self.seen[user] = max(self.seen[user], got[-1].cursor)
        if self.durability == "sync":
            assert got == expected
            assert page.has_more == (page.next < len(inbox))

    @rule(user=users, conv=st.integers(0, 3), data=st.data(), limit=limits)
    def history(self, user, conv, data, limit):
        """Scroll back page by page from a random point: every page newest first, nothing skipped or repeated."""
        if self.durability != "sync":
            self.store.flush()  # then every acknowledged message is visible, as in "sync" mode
            self._all_durable()
        before = data.draw(st.none() | st.integers(0, len(self.inbox[user]) + 2), label="before")
        expected = self._history(user, conv, before)
        got: list[StoredMessage] = []
        while True:
            page = self.store.history(user, conv, before=before, limit=limit)
            assert len(page.messages) <= limit
            got += page.messages
            if not page.has_more:
                break
            assert page.messages and page.before == page.messages[-1].cursor
            before = page.before
        assert got == expected

    @rule(data=st.data())
    def get(self, data):
        """get(msg_id): a delivered message (without cursor), or None for an id never delivered."""
        if self.durability != "sync":
            self.store.flush()
            self._all_durable()
        known = [msg_id for msg_id, _cursors in self.first.values()]
        msg_id = data.draw(st.sampled_from(known) if known else st.just(12345), label="msg_id") if data.draw(st.booleans()) else self.last_msg_id + 1
        assert self.store.get(msg_id) == self._record(msg_id)

    @rule(user=users)
    def head(self, user):
        self._visible_head(user)

    @rule()
    def flush(self):
        self.store.flush()
        self._all_durable()
        for uid in USER_IDS:
            assert self._visible_head(uid) == len(self.inbox[uid])

    @rule(data=st.data())
    def changes(self, data):
        """The change log is every first delivery, in order, with each recipient's cursor."""
        self.store.flush()
        since = data.draw(st.integers(0, len(self.log)), label="since")
        limit = data.draw(st.none() | st.integers(1, 5), label="limit")
        got = list(self.store.changes(since=since, limit=limit))
        expected = self.log[since:] if limit is None else self.log[since : since + limit]
        assert [c.lsn for c in got] == list(range(since + 1, since + 1 + len(expected)))
        assert [(c.data.message.msg_id, dict(c.data.cursors)) for c in got] == expected
        assert self.store.lsn == len(self.log)

    @rule(crash=st.booleans())
    def follow(self, crash):
        """A follower applying the store's changes from its own position ends up with the same inboxes."""
        if self.follower is None:
            self.follower = self._open_follower()
        self.store.flush()
        self.follower.apply_changes(self.store.changes(since=self.follower.lsn))
        assert self.follower.lsn == self.store.lsn
        for uid in USER_IDS:
            assert list(self.follower.sync(uid, since=0, limit=10_000).messages) == self.inbox[uid], f"follower, user {uid}"
        if crash:
            self.follower._abandon()
        else:
            self.follower.close()
        self.follower = self._open_follower()
        assert self.follower.lsn == self.store.lsn
        self.follower.check()

    @rule(delta=st.integers(-5_000, 5_000))
    def step_clock(self, delta):
        self.clock.now += delta

    @rule(segment_bytes=segment_sizes)
    def reopen(self, segment_bytes):
        self.store.close()
        self.store = self._open(segment_bytes)
        self._check_everything()

    @rule(segment_bytes=segment_sizes)
    def crash(self, segment_bytes):
        """A process crash: nothing is flushed, applied or synced; open recovers from the WAL."""
        old = self.store
        old._abandon()
        with pytest.raises(StoreClosed):
            old.head(0)
        self.store = self._open(segment_bytes)
        self._check_everything()

    # --- invariants ----------------------------------------------------------------------

    @invariant()
    def store_checks_itself(self):
        self.store.check()

    @invariant()
    def heads_match(self):
        for uid in USER_IDS:
            self._visible_head(uid)


def budget(max_examples: int) -> settings:
    """``max_examples`` under the default "ci" profile; a bigger profile (SYNCSTORE_HYPOTHESIS=long) wins."""
    profile = settings.default
    return settings(
        profile,
        max_examples=max(max_examples, profile.max_examples if profile.max_examples > 100 else 0),
        stateful_step_count=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


TestSyncDurability = StoreMachine.TestCase
TestSyncDurability.settings = budget(60)


class NoneDurabilityMachine(StoreMachine):
    """durability="none": a process crash still keeps everything acknowledged (it reached the OS)."""

    durability = "none"


TestNoneDurability = NoneDurabilityMachine.TestCase
TestNoneDurability.settings = budget(20)


class IntervalDurabilityMachine(StoreMachine):
    durability = "interval"


TestIntervalDurability = IntervalDurabilityMachine.TestCase
TestIntervalDurability.settings = budget(10)
