"""Durable ``deliver`` from 1,000 asyncio coroutines (``syncstore.aio``) against the 8-thread API, same run.

The workload of ``test_bench_deliver.py``: 1:1 messages (``to=[sender,
recipient]``, 1,000 users, 200-byte bodies), ``durability="sync"``, a fresh
store per round.  **async**: one event loop, 1,000 coroutines each awaiting
``store.deliver`` for its share, one message per call.  **threads**: 8
threads calling ``Store.deliver``.  Rounds alternate between the two, so
load from other processes hits both alike.  Messages are built inside the
timed loop in both.  Every message must reach both inboxes.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import syncstore
import syncstore.aio
from _harness import RESULTS, Row, Throughput, one_to_one_items, run_threads, sized, split
from syncstore import Message

COROUTINES = 1_000
THREADS = 8
USERS = 1_000
BODY = 200
FULL_COUNT = 20_000  # messages per round at scale 1


async def _async_round(path: str, work: list[list]) -> tuple[Throughput, int]:
    """Deliver ``work`` (one list per coroutine) through an AsyncStore; (throughput, thread count while running)."""
    latencies: list[float] = []
    async with await syncstore.aio.open(path) as store:
        threads_open = threading.active_count()
        clock = time.perf_counter

        async def client(items: list) -> None:
            deliver, record = store.deliver, latencies.append
            for sender, conv, seq, body, to in items:
                began = clock()
                await deliver(Message(sender, conv, seq, body), to)
                record(clock() - began)

        start = clock()
        await asyncio.gather(*(client(items) for items in work))
        seconds = clock() - start
        heads = sum([await store.head(uid) for uid in range(USERS)])
        assert threading.active_count() == threads_open  # no thread per pending call
    assert heads == 2 * sum(len(items) for items in work)
    return Throughput(sum(len(items) for items in work), seconds, latencies), threads_open


def _threads_round(path: str, work: list[list]) -> Throughput:
    with syncstore.open(path) as store:
        deliver = store.deliver

        def make_call():
            def call(item) -> object:
                sender, conv, seq, body, to = item
                return deliver(Message(sender, conv, seq, body), to)

            return call

        result = run_threads(make_call, work)
        assert sum(store.head(uid) for uid in range(USERS)) == 2 * result.operations
    return result


def test_deliver_async_vs_threads(benchmark, scale, fresh_dir):
    count = sized(FULL_COUNT, scale, COROUTINES)
    rounds = 1 if benchmark.disabled else 3
    by_api = {"async": Throughput(), "threads": Throughput()}
    seeds = iter(range(100, 1000))

    def run() -> None:
        items = one_to_one_items(count, USERS, BODY, seed=next(seeds))
        result, _threads = asyncio.run(_async_round(fresh_dir("aio"), split(items, COROUTINES)))
        by_api["async"].add(result)
        by_api["threads"].add(_threads_round(fresh_dir("threads"), split(one_to_one_items(count, USERS, BODY, seed=next(seeds)), THREADS)))

    benchmark.pedantic(run, rounds=rounds)
    workload = f"{rounds} rounds x {count:,} messages each way, fresh store per round, alternating"
    for system, result, how in (("syncstore", by_api["async"], f"{COROUTINES:,} coroutines"), ("threads", by_api["threads"], f"{THREADS} threads")):
        RESULTS.record(
            Row(
                "aio",
                system,
                {"msg/s": result.rate, "p50 ms": result.latency_ms(0.50), "p99 ms": result.latency_ms(0.99)},
                workload=f"{workload}; {how}",
            ),
            benchmark,
        )
