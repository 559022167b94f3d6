"""The change log as a stream: deliver-acknowledgement-to-tail latency, and reading throughput.

Latency: 4 writer threads deliver durably (1:1, 200-byte bodies); one
``changes(follow=True)`` tail stamps when each change reaches it.  A change
can reach the tail before its ``deliver`` call returns (the tail is woken
when the record becomes durable, the caller a moment later), so the latency
is ``received - acknowledged`` clamped at 0 -- what a consumer downstream of
an acknowledged send waits.  Reading: ``list(store.changes(since=0))`` over
a closed store's retained log, changes per second.
"""

from __future__ import annotations

import threading
import time

import syncstore
from _harness import RESULTS, Row, one_to_one_items, percentile, sized, split
from syncstore import Message

USERS = 1_000
BODY = 200
FULL_COUNT = 20_000
READ_COUNT = 200_000


def test_deliver_to_tail_latency(benchmark, scale, fresh_dir):
    count = sized(FULL_COUNT, scale, 200)
    items = one_to_one_items(count, USERS, BODY, seed=11)
    results: list[dict[str, float]] = []

    def run() -> None:
        acked: dict[int, float] = {}
        received: dict[int, float] = {}
        with syncstore.open(fresh_dir("tail")) as store:

            def tail() -> None:
                for change in store.changes(since=0, follow=True, limit=count):
                    received[change.data.message.client_seq] = time.perf_counter()

            def write(part) -> None:
                for sender, conv, seq, body, to in part:
                    store.deliver(Message(sender=sender, conv=conv, client_seq=seq, body=body), to=to)
                    acked[seq] = time.perf_counter()

            tailer = threading.Thread(target=tail)
            tailer.start()
            start = time.perf_counter()
            writers = [threading.Thread(target=write, args=(part,)) for part in split(items, 4)]
            for thread in writers:
                thread.start()
            for thread in writers:
                thread.join()
            tailer.join()
            seconds = time.perf_counter() - start
        delays = sorted(max(0.0, received[seq] - acked[seq]) for seq in acked)
        assert len(received) == count
        results.append({"p50 ms": percentile(delays, 0.5) * 1e3, "p99 ms": percentile(delays, 0.99) * 1e3, "msg/s": count / seconds})

    benchmark.pedantic(run, rounds=1 if benchmark.disabled else 3)
    best = sorted(results, key=lambda r: r["p99 ms"])[len(results) // 2]
    RESULTS.record(Row("deliver -> follow tail", "syncstore", best, workload=f"{count:,} durable 1:1 deliveries from 4 threads; median of {len(results)} runs"), benchmark)


def test_changes_read_throughput(benchmark, scale, fresh_dir):
    count = sized(READ_COUNT, scale, 2_000)
    path = fresh_dir("read")
    items = one_to_one_items(count, USERS, BODY, seed=12)
    with syncstore.open(path, durability="none") as store:
        for start in range(0, count, 1_000):
            store.deliver_many([(Message(sender=s, conv=c, client_seq=q, body=b), to) for s, c, q, b, to in items[start : start + 1_000]])
    seconds: list[float] = []

    def run() -> None:
        with syncstore.open(path) as store:
            start = time.perf_counter()
            got = sum(1 for _change in store.changes(since=0))
            seconds.append(time.perf_counter() - start)
        assert got == count

    benchmark.pedantic(run, rounds=1 if benchmark.disabled else 3)
    best = sorted(seconds)[len(seconds) // 2]
    RESULTS.record(Row("changes() read", "syncstore", {"changes/s": count / best}, workload=f"{count:,} retained changes (1:1, 200-byte bodies); median of {len(seconds)}"), benchmark)
