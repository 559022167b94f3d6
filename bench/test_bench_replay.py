"""WAL replay on open: delete a closed store's LMDB ``state/``, reopen, count records per second.

A store is filled once (1:1 messages, 200-byte bodies, all in one WAL
segment), closed, and its ``wal/`` directory kept.  Each round copies that
log into a fresh directory (not timed) and times ``syncstore.open``, which
scans and CRC-checks every frame, decodes it and applies it to a new LMDB
environment.
"""

from __future__ import annotations

import os
import shutil
import time

import syncstore
from _harness import RESULTS, Row, one_to_one_items, sized
from _peers import SyncstoreSystem

USERS = 1_000
BODY = 200
BATCH = 1_000
FULL_COUNT = 200_000
SEGMENT_BYTES = 256 << 20  # one segment holds them all, so nothing is retired before the replay


def test_wal_replay_on_open(benchmark, scale, fresh_dir):
    count = sized(FULL_COUNT, scale, 2_000)
    source = fresh_dir("source")
    items = one_to_one_items(count, USERS, BODY, seed=3)
    filled = SyncstoreSystem(source, segment_bytes=SEGMENT_BYTES)
    for start in range(0, count, BATCH):
        filled.deliver_batch(items[start : start + BATCH])
    filled.close()
    wal = os.path.join(source, "wal")
    open_seconds: list[float] = []
    replayed: list[str] = []

    def setup():
        target = fresh_dir("replay")
        shutil.copytree(wal, os.path.join(target, "wal"))
        shutil.copy2(os.path.join(source, "SYNCSTORE"), target)  # a store is a directory with its marker (issue 7)
        replayed.append(target)
        return (target,), {}

    def run(target):
        start = time.perf_counter()
        store = syncstore.open(target)
        open_seconds.append(time.perf_counter() - start)
        store.close()

    benchmark.pedantic(run, setup=setup, rounds=1 if benchmark.disabled else 3)
    with syncstore.open(replayed[-1]) as store:
        assert sum(store.head(uid) for uid in range(USERS)) == 2 * count  # every record came back
    best = sorted(open_seconds)[len(open_seconds) // 2]
    RESULTS.record(
        Row(
            "replay",
            "syncstore",
            {"records/s": count / best, "open s": best},
            workload=f"{count:,} records; median of {len(open_seconds)} opens",
        ),
        benchmark,
    )
