"""Snapshots (issue 9): a full base vs ``env.copy(compact=True)``, a delta after 1% of users changed, restore.

Data set, loaded once (not timed): 200,000 1:1 messages (scale 1) among
10,000 users, 200-byte bodies (``one_to_one_items``: one random body repeated,
as in the other benchmarks -- so they compress extremely well: the base file is
~15 MB for a ~210 MB state), loaded with ``deliver_many`` x 10,000,
``durability="none"``, then closed and reopened so everything is in LMDB and in
the page cache.

Each round, on that store:

- **full**: ``store.snapshot(fresh_dir)`` -- the first snapshot into a
  directory is a base: the whole state read in short transactions of 4,096
  items, written as zstd blocks with CRCs;
- **syncstore (one txn per database)**: the same with the chunking disabled
  (each database read in one read transaction): what chunking costs;
- **lmdb copy**: ``env.copy(path, compact=True)`` of the same LMDB
  environment (C, one read transaction, no compression): the floor for
  getting the state out;
- **delta**: 1% of users (100) exchange 10 messages each (500 messages,
  delivered, synced and applied untimed), then ``store.snapshot`` into the
  same directory: a delta of only the items those records touched, found
  from the WAL (target <= 5% of the full snapshot's time);
- **restore**: ``syncstore.restore`` of base + delta into a new path: every
  file checked, the store built, ``State.check()`` run, renamed into place.

MB/s is the LMDB state's used bytes (``(last_pgno + 1) * psize``) per
second, the same numerator for the snapshot and the copy.  "longest txn ms"
is the longest read transaction the snapshot (or the copy) held open: what
it can hold back map growth and page reuse for.  Medians of the rounds.
"""

from __future__ import annotations

import os
import random
import statistics
import time

from _harness import RESULTS, Row, one_to_one_items, sized

import syncstore
from syncstore import Message
from syncstore import snapshot as snapshot_module

USERS = 10_000
BODY = 200
BATCH = 10_000
FULL_COUNT = 200_000
CHANGED_USERS = 0.01
MESSAGES_PER_CHANGED_USER = 10


def _load(path: str, count: int) -> syncstore.Store:
    store = syncstore.open(path, durability="none")
    items = one_to_one_items(count, USERS, BODY, seed=9)
    for start in range(0, count, BATCH):
        store.deliver_many([(Message(s, c, q, b), to) for s, c, q, b, to in items[start : start + BATCH]])
    store.close()
    return syncstore.open(path, durability="none")


class _TimedReads:
    """Wraps ``state.read`` to record how long each read transaction stayed open."""

    def __init__(self, state) -> None:
        self.state, self.real, self.longest = state, state.read, 0.0

    def __enter__(self):
        timed = self

        class Read:
            def __enter__(self_inner):
                self_inner.inner = timed.real()
                self_inner.start = time.perf_counter()
                return self_inner.inner.__enter__()

            def __exit__(self_inner, *exc):
                timed.longest = max(timed.longest, time.perf_counter() - self_inner.start)
                return self_inner.inner.__exit__(*exc)

        self.state.read = Read
        return self

    def __exit__(self, *exc):
        del self.state.read  # back to the class's method


def test_snapshot_full_delta_restore(benchmark, scale, fresh_dir, monkeypatch):
    count = sized(FULL_COUNT, scale, 2_000)
    store = _load(fresh_dir("source"), count)
    state = store._state
    used = (state.env.info()["last_pgno"] + 1) * state.env.stat()["psize"]
    changed = random.Random(5).sample(range(USERS), max(2, int(USERS * CHANGED_USERS)))
    seqs = iter(range(10**9, 2 * 10**9))
    times: dict[str, list[float]] = {k: [] for k in ("full", "unchunked", "copy", "delta", "restore", "full txn", "unchunked txn", "copy txn")}
    delta_rows: list[int] = []

    def one_round():
        dest = fresh_dir("snaps")
        with _TimedReads(state) as reads:
            start = time.perf_counter()
            base = store.snapshot(dest)
            times["full"].append(time.perf_counter() - start)
        times["full txn"].append(reads.longest)
        assert base.kind == "base" and base.lsn == state.applied_lsn()

        copy_dir = fresh_dir("copy")
        os.mkdir(copy_dir)
        start = time.perf_counter()
        state.env.copy(copy_dir, compact=True)  # one read transaction for the whole copy
        times["copy"].append(time.perf_counter() - start)
        times["copy txn"].append(times["copy"][-1])

        with monkeypatch.context() as patch, _TimedReads(state) as reads:
            patch.setattr(snapshot_module, "CHUNK_ROWS", 1 << 62)
            patch.setattr(snapshot_module, "CHUNK_BYTES", 1 << 62)
            start = time.perf_counter()
            store.snapshot(fresh_dir("unchunked"))
            times["unchunked"].append(time.perf_counter() - start)
        times["unchunked txn"].append(reads.longest)

        for user in changed:  # 1% of users get messages: not timed
            for _ in range(MESSAGES_PER_CHANGED_USER // 2):
                peer = random.choice(changed)
                store.deliver(Message(user, user * USERS + peer, next(seqs), b"d" * BODY), to=[user, peer])
        store.flush()
        store._writer.apply_pending()
        start = time.perf_counter()
        delta = store.snapshot(dest)
        times["delta"].append(time.perf_counter() - start)
        assert delta.kind == "delta" and delta.prev_lsn == base.lsn
        delta_rows.append(delta.rows)

        target = fresh_dir("restored")
        start = time.perf_counter()
        syncstore.restore(dest, target)
        times["restore"].append(time.perf_counter() - start)
        with syncstore.open(target) as restored:  # exactly the source: every head (not timed)
            assert all(restored.head(uid) == store.head(uid) for uid in range(0, USERS, max(1, USERS // 500)))

    benchmark.pedantic(one_round, rounds=1 if benchmark.disabled else 3)
    per_restore = count + len(changed) * (MESSAGES_PER_CHANGED_USER // 2)  # messages in each round's restored store (about)
    store.close()
    med = {key: statistics.median(values) for key, values in times.items()}
    mb = used / 1e6
    workload = f"{count:,} 1:1 messages, {USERS:,} users, {BODY}-byte bodies; LMDB state {mb:,.0f} MB; median of {len(times['full'])} rounds"
    RESULTS.record(Row("snapshot", "syncstore", {"MB/s": mb / med["full"], "msg/s": count / med["full"], "s": med["full"], "longest txn ms": med["full txn"] * 1e3}, workload=workload), benchmark)
    RESULTS.record(Row("snapshot", "syncstore (one txn per database)", {"MB/s": mb / med["unchunked"], "msg/s": count / med["unchunked"], "s": med["unchunked"], "longest txn ms": med["unchunked txn"] * 1e3}), benchmark)
    RESULTS.record(Row("snapshot", "lmdb copy", {"MB/s": mb / med["copy"], "msg/s": count / med["copy"], "s": med["copy"], "longest txn ms": med["copy txn"] * 1e3}), benchmark)
    RESULTS.record(
        Row(
            "snapshot delta",
            "syncstore",
            {"delta % of full": 100 * med["delta"] / med["full"], "delta s": med["delta"], "full s": med["full"], "delta rows": statistics.median(delta_rows)},
            workload=f"{len(changed)} of {USERS:,} users, {len(changed) * (MESSAGES_PER_CHANGED_USER // 2)} messages since the base",
        ),
        benchmark,
    )
    RESULTS.record(Row("restore", "syncstore", {"MB/s": mb / med["restore"], "msg/s": per_restore / med["restore"], "s": med["restore"]}, workload=workload), benchmark)


def test_long_read_transaction_grows_the_file(benchmark, scale, fresh_dir):
    """Why snapshots read in short transactions: a read transaction pins the pages it sees, so every page the
    writers free meanwhile cannot be reused and the file grows.  Same store, same writes (25% more
    messages, applied in batches), once with one read transaction held open throughout (what one long
    snapshot transaction does), once without (the snapshot's transactions last ~1-5 ms)."""
    count = sized(FULL_COUNT, scale, 2_000)
    growth: dict[str, float] = {}

    def measure(mode: str) -> None:
        store = _load(fresh_dir(mode), count)
        data = os.path.join(store.path, "state", "data.mdb")
        before = os.stat(data).st_size
        held = store._state.env.begin() if mode == "long" else None
        items = one_to_one_items(count // 4, USERS, BODY, seed=11, first_seq=10**9)
        for start in range(0, len(items), BATCH):
            store.deliver_many([(Message(s, c, q, b), to) for s, c, q, b, to in items[start : start + BATCH]])
            store.flush()
            store._writer.apply_pending()
        if held is not None:
            held.abort()
        growth[mode] = (os.stat(data).st_size - before) / 1e6
        store.close()

    benchmark.pedantic(lambda: [measure("short"), measure("long")], rounds=1)
    workload = f"{count:,} messages loaded, {count // 4:,} more written in batches of {BATCH:,}"
    RESULTS.record(Row("snapshot pinning", "short read transactions", {"growth MB": growth["short"]}, workload=workload), benchmark)
    RESULTS.record(Row("snapshot pinning", "one read transaction held", {"growth MB": growth["long"]}), benchmark)
