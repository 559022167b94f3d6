"""Bulk ingest: ``deliver_many`` with 1,000 messages per call, durable, one thread.

The raw-LMDB peer writes the same messages in state format 3 (issue #8) the
fastest way py-lmdb allows: per batch one transaction, one ``getmulti`` for the
dedup keys, every record encoded and sorted, one ``putmulti`` per database
(append mode for ``messages``, ``inbox`` and ``history``).  Target: syncstore
>= 0.9x that peer.

The peers commit each batch as one transaction.  Message construction and
validation are inside the timed loop for syncstore (a server builds them).
"""

from __future__ import annotations

import time

import pytest
from _harness import RESULTS, Row, Throughput, one_to_one_items, sized
from _peers import SYSTEMS

USERS = 1_000
BODY = 200
BATCH = 1_000
FULL_COUNT = 100_000  # messages per round at scale 1


@pytest.mark.parametrize("system", list(SYSTEMS))
def test_deliver_many_bulk(benchmark, system, scale, fresh_dir):
    count = sized(FULL_COUNT, scale, 2 * BATCH)
    rounds = 1 if benchmark.disabled else 3
    total = Throughput()
    opened: list = []
    seeds = iter(range(1, 1000))

    def setup():
        for target in opened:
            target.close()
        opened.clear()
        target = SYSTEMS[system](fresh_dir(system))
        opened.append(target)
        items = one_to_one_items(count, USERS, BODY, seed=next(seeds))
        return (target, [items[i : i + BATCH] for i in range(0, count, BATCH)]), {}

    def run(target, batches):
        start = time.perf_counter()
        for batch in batches:
            target.deliver_batch(batch)
        total.add(Throughput(count, time.perf_counter() - start))

    benchmark.pedantic(run, setup=setup, rounds=rounds)
    last = opened[0]
    try:
        assert last.heads_total(USERS) == 2 * count
    finally:
        last.close()
    RESULTS.record(
        Row("bulk", system, {"msg/s": total.rate}, workload=f"{rounds} rounds x {count:,} messages in batches of {BATCH:,}"),
        benchmark,
    )
