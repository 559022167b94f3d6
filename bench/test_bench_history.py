"""``history(user, conv, before, 50)`` from the history index, against filtering the inbox.

Data set, loaded once: one user's inbox of 1,000,000 messages (scale 1)
spread at random over 100 conversations -- each holds about 1% of the inbox --
100-byte bodies (distinct per message), loaded with ``deliver_many`` x 10,000
into a store opened with ``durability="none"`` (the load is not timed), then
closed and reopened so everything is in LMDB.

Queries: random (conv, before), ``before`` uniform over the inbox's cursors,
one in ten ``before=None`` (the newest page).  Each asks for the 50 newest
messages of ``conv`` with cursor < ``before``.  Systems:

- **syncstore**: ``store.history(user, conv, before, 50).messages`` as
  returned (decoded on access); **syncstore-decoded** also decodes all of
  them (``tuple(page.messages)``), which is what the filter hands back.
- **filtering**: the same answer without an index, through the public API:
  walk back from ``before`` through the inbox with ``store.sync`` pages of
  1,000 (cursors ``before-1000 .. before-1``, then the 1,000 below, ...),
  keeping the messages of ``conv`` newest first, until 50 are found or the
  inbox's start is reached.  With the conversation at 1% of the inbox that
  reads about 5,000 messages per call.  Walking back in windows is the best a
  filter can do with ``sync`` (cursors are dense, so any window can be read
  directly); paging forward from cursor 0 would read the whole inbox below
  ``before``.
- **lmdb**: the raw format-3 history read on a byte-for-byte copy of the
  store's ``state/`` (``_peers.LmdbCeiling.history_reader``): ``iterprev_dup``
  on ``history[user|conv]`` below ``before``, each cursor's inbox entry by
  ``set_range_dup``, the bodies by one ``getmulti``; raw bytes, undecoded.

Before timing, all three give the same messages (cursor, msg_id, conv, body)
for a sample of the queries, and paging one conversation to its start with
``page.before`` finds every message a full scan counts for it (the per-conv
counts of the full scan add up to the inbox's head).
"""

from __future__ import annotations

import collections
import os
import random
import shutil
import struct
import time

import pytest
from _harness import RESULTS, Row, Throughput, scale_for, sized
from _peers import LmdbCeiling

import syncstore
from syncstore import Message

USER = 7
CONVS = 100
LIMIT = 50
WINDOW = 1_000  # sync page size of the filtering walk
BODY = 100
BATCH = 10_000


def filtered_history(store: syncstore.Store, user: int, conv: int, before: int | None, limit: int) -> list:
    """The messages ``history`` returns, by walking the inbox back with ``sync`` and keeping ``conv``'s."""
    end = store.head(user) + 1 if before is None else before  # answer: cursors < end
    found: list = []
    while end > 1 and len(found) < limit:
        since = max(0, end - 1 - WINDOW)
        page = store.sync(user, since, end - 1 - since)
        found.extend(m for m in reversed(page.messages) if m.conv == conv)
        end = since + 1
    return found[:limit]


def _items(count: int, seed: int) -> list[tuple[Message, tuple[int]]]:
    rng = random.Random(seed)
    filler = bytes(rng.randrange(256) for _ in range(BODY))
    items = []
    for seq in range(1, count + 1):
        conv = rng.randrange(CONVS)
        body = (seq.to_bytes(8, "big") + filler)[:BODY]
        items.append((Message(sender=1_000 + conv, conv=conv, client_seq=seq, body=body), (USER,)))
    return items


@pytest.fixture(scope="module")
def history_data(request, tmp_path_factory):
    """syncstore and the raw peer holding the inbox, the queries, and a description."""
    scale = scale_for(request.config.getoption("benchmark_disable", default=False))
    count = sized(1_000_000, scale, 5_000)
    root = tmp_path_factory.mktemp("history")
    path = os.fspath(root / "syncstore")
    with syncstore.open(path, durability="none") as store:
        items = _items(count, seed=21)
        for start in range(0, count, BATCH):
            store.deliver_many(items[start : start + BATCH])
        del items
    state_format = LmdbCeiling.state_format(os.path.join(path, "state"))
    assert state_format == LmdbCeiling.FORMAT, f"syncstore's state is format {state_format}: this benchmark needs format 3"
    shutil.copytree(os.path.join(path, "state"), root / "lmdb")
    store = syncstore.open(path)
    raw = LmdbCeiling(os.fspath(root / "lmdb"), readonly=True)
    head = store.head(USER)
    assert head == count
    rng = random.Random(8)
    queries = [(rng.randrange(CONVS), None if rng.random() < 0.1 else rng.randint(1, head + 1)) for _ in range(sized(1_000, scale, 20))]
    _check(store, raw, queries[:50] + [(0, None), (1, 1), (2, 2), (3, head + 1)])
    described = (
        f"one user's inbox of {count:,} messages over {CONVS} conversations (~1% each), {BODY}-byte bodies; "
        f"{len(queries):,} random (conv, before) per round, {LIMIT} messages asked; filtering walks back with sync pages of {WINDOW:,}"
    )
    yield store, raw, queries, described
    store.close()
    raw.close()


def _key(m) -> tuple[int, int, int, bytes]:
    return (m.cursor, m.msg_id, m.conv, m.body)


def _raw_key(ref) -> tuple[int, int, int, bytes]:
    entry, (_key, value) = ref
    cursor, msg_id = struct.unpack(">QQ", entry)
    conv = struct.unpack_from(">Q", value, 12)[0]  # the message value's conv (after refs and sender)
    return (cursor, msg_id, conv, value[37:])


def _check(store: syncstore.Store, raw: LmdbCeiling, queries) -> None:
    """Same answers from the index, the filter and the raw read; paging reaches every message."""
    raw_history = raw.history_reader()
    for conv, before in queries:
        page = store.history(USER, conv, before, LIMIT)
        ours = [_key(m) for m in page.messages]
        assert ours == [_key(m) for m in filtered_history(store, USER, conv, before, LIMIT)], (conv, before)
        assert ours == [_raw_key(ref) for ref in raw_history(USER, conv, before, LIMIT)], (conv, before)
        assert all(c == conv for _cursor, _id, c, _body in ours), (conv, before)
        assert [cursor for cursor, *_ in ours] == sorted((cursor for cursor, *_ in ours), reverse=True), (conv, before)
        assert all(cursor < before for cursor, *_ in ours) if before is not None else True, (conv, before)
    # Counts add up: a full scan's per-conversation counts sum to the head, and paging two
    # conversations to their start with page.before finds exactly their messages, newest first.
    per_conv: dict[int, list[int]] = collections.defaultdict(list)
    since = 0
    while True:
        page = store.sync(USER, since, 10_000)
        for m in page.messages:
            per_conv[m.conv].append(m.cursor)
        if not page.has_more:
            break
        since = page.next
    assert sum(len(cursors) for cursors in per_conv.values()) == store.head(USER)
    for conv in (0, CONVS - 1):
        walked, before = [], None
        while True:
            page = store.history(USER, conv, before, LIMIT)
            walked.extend(m.cursor for m in page.messages)
            if not page.has_more:
                break
            before = page.before
        assert walked == per_conv[conv][::-1], conv


@pytest.mark.parametrize("system", ["syncstore", "syncstore-decoded", "filtering", "lmdb"])
def test_history_50(benchmark, system, history_data):
    store, raw, queries, described = history_data
    if system == "syncstore":
        history = store.history
        read = lambda conv, before: history(USER, conv, before, LIMIT).messages  # noqa: E731
    elif system == "syncstore-decoded":
        history = store.history
        read = lambda conv, before: tuple(history(USER, conv, before, LIMIT).messages)  # noqa: E731
    elif system == "filtering":
        read = lambda conv, before: filtered_history(store, USER, conv, before, LIMIT)  # noqa: E731
    else:
        raw_history = raw.history_reader()
        read = lambda conv, before: raw_history(USER, conv, before, LIMIT)  # noqa: E731
    run_queries = queries  # the same queries for every system
    total = Throughput()
    returned = [0]

    def run():
        start = time.perf_counter()
        got = 0
        for conv, before in run_queries:
            got += len(read(conv, before))
        total.add(Throughput(len(run_queries), time.perf_counter() - start))
        returned[0] = got

    # The filter reads ~100x more messages per call: 2 rounds, no warm-up, keep it within ~20 s at scale 1.
    rounds, warmup = (1, 0) if benchmark.disabled else (2, 0) if system == "filtering" else (5, 1)
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=warmup)
    RESULTS.record(
        Row(
            "history",
            system,
            {"calls/s": total.rate, "us/call": 1e6 / total.rate, "msg/call": returned[0] / len(run_queries)},
            workload=described,
        ),
        benchmark,
    )
