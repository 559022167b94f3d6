"""Durable ``deliver``, one message per call from 8 threads, against SQLite and raw LMDB.

Each round opens a fresh store (not timed), then 8 threads deliver their
share of 1:1 messages (``to=[sender, recipient]``, 1,000 users, 200-byte
bodies) with ``durability="sync"``: a call returns only once the message is
fdatasync'd.  Throughput is messages over wall time; latency is per call.
The peers do the same job (see ``_peers``).
"""

from __future__ import annotations

import pytest
from _harness import RESULTS, Row, Throughput, one_to_one_items, sized, split, run_threads
from _peers import SYSTEMS

THREADS = 8
USERS = 1_000
BODY = 200
FULL_COUNT = 20_000  # messages per round at scale 1


@pytest.mark.parametrize("system", list(SYSTEMS))
def test_deliver_durable_8_threads(benchmark, system, scale, fresh_dir):
    count = sized(FULL_COUNT, scale, THREADS * 20)
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
        return (target, split(one_to_one_items(count, USERS, BODY, seed=next(seeds)), THREADS)), {}

    def run(target, work):
        total.add(run_threads(target.writer, work))

    benchmark.pedantic(run, setup=setup, rounds=rounds)
    last = opened[0]
    try:
        assert last.heads_total(USERS) == 2 * count  # every message reached both inboxes
    finally:
        last.close()
    RESULTS.record(
        Row(
            "deliver",
            system,
            {"msg/s": total.rate, "p50 ms": total.latency_ms(0.50), "p99 ms": total.latency_ms(0.99), "max ms": total.latency_ms(1.0)},
            workload=f"{rounds} rounds x {count:,} messages, fresh store per round, {THREADS} threads",
        ),
        benchmark,
    )
