"""``sync(uid, since, 100)`` on hot data, 1:1 and group inboxes, against a raw LMDB read and SQLite.

Two data sets, each loaded once (module fixture, one after the other), all in
the page cache:

- **1:1**: 100,000 1:1 messages among 1,000 users (about 200 inbox entries
  each at scale 1), 200-byte bodies, loaded with ``deliver_many`` x 1,000.
- **group**: 3,000 messages to groups of 100 members -- 100 groups drawn at
  random from 1,000 users, so each user is in about 10 groups and holds about
  300 entries from several conversations -- 1 KiB bodies (distinct per
  message), loaded with ``deliver_many`` x 100.

Systems, each holding the same messages with the same cursors (same
deliveries in the same order):

- **syncstore**: ``store.sync(uid, since, 100).messages`` (decoded on access);
  **syncstore-decoded** also decodes all 100 (``tuple(page.messages)``), the
  fair comparison with SQLite's decoded rows.
- **lmdb**: the format-3 read from Python with nothing around it
  (``_peers.LmdbCeiling.reader``): a read transaction, ``set_range_dup`` to
  (uid, since+1), 100 inbox dups read in C, their msg_ids sliced out and the
  bodies fetched with one ``getmulti`` on ``messages``; raw bytes, undecoded.
  It runs on a byte-for-byte copy of the store's ``state/`` directory (LMDB
  forbids opening one environment twice in a process), which must be
  format 3.
- **sqlite**: ``SELECT ... WHERE uid=? AND cursor>? ORDER BY cursor LIMIT 100``
  (group messages' bodies from its ``messages`` table; see ``_peers``).

Before timing, every system's answers are compared (cursors, conv and body of
every message) on a sample of the queries.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import time
from dataclasses import dataclass

import pytest
from _harness import RESULTS, Row, Throughput, group_items, one_to_one_items, scale_for, sized
from _peers import LmdbCeiling, SqlitePeer, SyncstoreSystem

LIMIT = 100


@dataclass(frozen=True)
class DataSet:
    section: str
    describe: str
    batch: int


DATA_SETS = {
    "1:1": DataSet("sync", "1:1 messages, 200-byte bodies", 1_000),
    "group": DataSet("sync group", "group messages (100 members), 1 KiB bodies", 100),
}


def _items(kind: str, scale: float) -> tuple[list, int]:
    """The deliveries of a data set and its number of users (``0..users-1``)."""
    if kind == "1:1":
        users = sized(1_000, scale, 20)
        return one_to_one_items(sized(100_000, scale, 2_000), users, 200, seed=11), users
    users = sized(1_000, scale, 100)
    groups = sized(100, scale, 2)
    return group_items(sized(3_000, scale, 150), users, groups, 100, 1_024, seed=12), users


@pytest.fixture(scope="module", params=list(DATA_SETS), ids=["1to1", "group"])
def hot_data(request, tmp_path_factory):
    """The three systems holding the same inboxes, the queries (uid, since) to run, and a description."""
    kind = request.param
    data_set = DATA_SETS[kind]
    scale = scale_for(request.config.getoption("benchmark_disable", default=False))
    items, users = _items(kind, scale)
    batches = [items[start : start + data_set.batch] for start in range(0, len(items), data_set.batch)]
    root = tmp_path_factory.mktemp("sync")
    ours = SyncstoreSystem(os.fspath(root / "syncstore"))
    for batch in batches:
        ours.deliver_batch(batch)
    ours.close()  # everything applied to LMDB; then copy the state for the raw reader
    state_format = LmdbCeiling.state_format(os.fspath(root / "syncstore" / "state"))
    assert state_format == LmdbCeiling.FORMAT, f"syncstore's state is format {state_format}: the raw reader needs format 3"
    shutil.copytree(root / "syncstore" / "state", root / "lmdb")
    ours = SyncstoreSystem(os.fspath(root / "syncstore"))
    raw = LmdbCeiling(os.fspath(root / "lmdb"), readonly=True)
    sqlite = SqlitePeer(os.fspath(root / "sqlite"))
    for batch in batches:
        sqlite.deliver_batch(batch)
    rng = random.Random(5)
    heads = {uid: ours.store.head(uid) for uid in range(users)}
    entries = sum(len(set(to)) for *_, to in items)
    systems = {"syncstore": ours, "lmdb": raw, "sqlite": sqlite}
    for name, system in systems.items():  # counts add up: every recipient got every message
        assert system.heads_total(users) == entries, name
    eligible = [uid for uid, head in heads.items() if head > LIMIT]
    assert eligible, "no inbox holds more than one page"
    queries = [(uid, rng.randint(0, heads[uid] - LIMIT)) for uid in rng.choices(eligible, k=sized(2_000, scale, 50))]
    _check_same_answers(systems, heads, queries[:50] + [(uid, heads[uid] - 3) for uid in eligible[:5]])
    described = (
        f"{kind}: {len(items):,} {data_set.describe}, {users:,} users, {entries:,} inbox entries; "
        f"{len(queries):,} random (uid, since) per round, each returning {LIMIT} messages; 1 thread"
    )
    yield kind, systems, queries, described
    for system in systems.values():
        system.close()


def _answers(system_name: str, page) -> list[tuple[int, int, bytes]]:
    """(cursor, conv, body) of every message of a page, whatever the system's page type."""
    if system_name == "syncstore":
        return [(m.cursor, m.conv, m.body) for m in page]
    if system_name == "sqlite":
        return [(row[0], row[3], row[7]) for row in page]
    # raw format 3: inbox entry (cursor, msg_id), then (msg_id, messages value: refs u32, sender, conv, ...)
    return [(struct.unpack_from(">Q", entry)[0], struct.unpack_from(">Q", value, 12)[0], value[37:]) for entry, (_key, value) in page]


def _check_same_answers(systems, heads, queries) -> None:
    """The comparison is only fair if every system returns the same 100 messages."""
    readers = {name: system.reader() for name, system in systems.items()}
    for uid, since in queries:
        expected = list(range(since + 1, min(since + LIMIT, heads[uid]) + 1))
        answers = {name: _answers(name, read(uid, since, LIMIT)) for name, read in readers.items()}
        for name, answer in answers.items():
            assert [cursor for cursor, _conv, _body in answer] == expected, (name, uid, since)
            assert answer == answers["syncstore"], (name, uid, since)


@pytest.mark.parametrize("system", ["syncstore", "syncstore-decoded", "lmdb", "sqlite"])
def test_sync_hot_100(benchmark, system, hot_data):
    kind, systems, queries, described = hot_data
    read = systems["syncstore"].reader(decode=True) if system == "syncstore-decoded" else systems[system].reader()
    total = Throughput()

    def run():
        start = time.perf_counter()
        for uid, since in queries:
            read(uid, since, LIMIT)
        total.add(Throughput(len(queries), time.perf_counter() - start))

    benchmark.pedantic(run, rounds=1 if benchmark.disabled else 10, warmup_rounds=0 if benchmark.disabled else 1)
    RESULTS.record(
        Row(DATA_SETS[kind].section, system, {"calls/s": total.rate, "us/call": 1e6 / total.rate, "msg/s": total.rate * LIMIT}, workload=described),
        benchmark,
    )
