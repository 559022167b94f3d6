"""``sync(uid, since, 100)`` on hot data, against a raw LMDB range read and SQLite.

One data set, loaded once: 1:1 messages among 1,000 users (about 200 inbox
entries each at scale 1), all in the page cache.  The raw LMDB reader runs on
a byte-for-byte copy of the store's ``state/`` directory (LMDB forbids opening
one environment twice in a process): a read transaction, ``set_range`` to
(uid, since+1) and 100 ``next`` calls returning raw (key, value) bytes -- the
ceiling for a read from Python.  SQLite holds the same messages with the same
cursors (same deliveries in the same order) and answers
``SELECT ... WHERE uid=? AND cursor>? ORDER BY cursor LIMIT 100``.

``sync`` returns a page whose messages are decoded on access; the
``syncstore-decoded`` row also decodes all 100 (``tuple(page.messages)``),
which is the fair comparison with SQLite's decoded rows.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import time

import pytest
from _harness import RESULTS, Row, Throughput, one_to_one_items, scale_for, sized
from _peers import LmdbCeiling, SqlitePeer, SyncstoreSystem

LIMIT = 100
BODY = 200
BATCH = 1_000


@pytest.fixture(scope="module")
def hot_data(request, tmp_path_factory):
    """The three systems holding the same inboxes, and the queries (uid, since) to run."""
    scale = scale_for(request.config.getoption("benchmark_disable", default=False))
    users = sized(1_000, scale, 20)
    items = one_to_one_items(sized(100_000, scale, 2_000), users, BODY, seed=11)
    root = tmp_path_factory.mktemp("sync")
    ours = SyncstoreSystem(os.fspath(root / "syncstore"))
    for start in range(0, len(items), BATCH):
        ours.deliver_batch(items[start : start + BATCH])
    ours.close()  # everything applied to LMDB; then copy the state for the raw reader
    shutil.copytree(root / "syncstore" / "state", root / "lmdb")
    ours = SyncstoreSystem(os.fspath(root / "syncstore"))
    raw = LmdbCeiling(os.fspath(root / "lmdb"), readonly=True)
    sqlite = SqlitePeer(os.fspath(root / "sqlite"))
    for start in range(0, len(items), BATCH):
        sqlite.deliver_batch(items[start : start + BATCH])
    rng = random.Random(5)
    heads = {uid: ours.store.head(uid) for uid in range(users)}
    eligible = [uid for uid, head in heads.items() if head > LIMIT]
    queries = [(uid, rng.randint(0, heads[uid] - LIMIT)) for uid in rng.choices(eligible, k=sized(2_000, scale, 50))]
    systems = {"syncstore": ours, "lmdb": raw, "sqlite": sqlite}
    _check_same_answers(systems, queries[:50] + [(uid, heads[uid] - 3) for uid in eligible[:5]])
    yield systems, queries
    for system in systems.values():
        system.close()


def _cursors(system_name: str, page) -> list[int]:
    if system_name == "syncstore":
        return [m.cursor for m in page]
    if system_name == "sqlite":
        return [row[0] for row in page]
    return [struct.unpack_from(">Q", value)[0] for value in page]  # raw inbox values start with the cursor


def _check_same_answers(systems, queries) -> None:
    """The comparison is only fair if every system returns the same 100 messages."""
    readers = {name: system.reader() for name, system in systems.items()}
    for uid, since in queries:
        expected = list(range(since + 1, min(since + LIMIT, systems["syncstore"].store.head(uid)) + 1))
        for name, read in readers.items():
            assert _cursors(name, read(uid, since, LIMIT)) == expected, (name, uid, since)


@pytest.mark.parametrize("system", ["syncstore", "syncstore-decoded", "lmdb", "sqlite"])
def test_sync_hot_100(benchmark, system, hot_data):
    systems, queries = hot_data
    read = systems["syncstore"].reader(decode=True) if system == "syncstore-decoded" else systems[system].reader()
    total = Throughput()

    def run():
        start = time.perf_counter()
        for uid, since in queries:
            read(uid, since, LIMIT)
        total.add(Throughput(len(queries), time.perf_counter() - start))

    benchmark.pedantic(run, rounds=1 if benchmark.disabled else 10, warmup_rounds=0 if benchmark.disabled else 1)
    RESULTS.record(
        Row(
            "sync",
            system,
            {"calls/s": total.rate, "us/call": 1e6 / total.rate, "msg/s": total.rate * LIMIT},
            workload=f"{len(queries):,} random (uid, since) per round, each returning {LIMIT} messages; 1 thread",
        ),
        benchmark,
    )
