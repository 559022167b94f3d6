"""Sustained bulk ingest, run as a child process: ``deliver_many`` into a growing store, rates per quarter, as JSON.

    python bench/_sustained.py --path DIR --messages 1000000 --users 200000 [--batch 10000] [--body 200]

Issue #8's row: 1M 1:1 messages (``to=[sender, recipient]``, random users
among ``--users``, one 200-byte body), ``durability="none"``, batches of
10,000 per ``deliver_many`` call.  The run is cut into four quarters (250k
messages each at 1M; a quarter ends with the first batch that reaches its
mark, so quarters are equal when the batch divides a quarter) and the rate
of each is reported, so a store that slows down as it grows shows it.

Rates.  After every batch the driver samples the time, the messages
acknowledged and the records still waiting for the applier
(``len(store._writer.overlay)``, a private attribute: this is a benchmark
probe); applied = acknowledged - waiting.

- **overall** (``msg_per_s``): all messages / time from the first call to the
  end of ``close()``, everything applied.
- **quarters** (``quarter_msg_per_s``, ``quarter_basis: "applied"``): applied
  messages per second in each quarter, in steady state.  The writer lets
  65,536 records (plus the batch in flight) wait for the applier before it
  blocks the caller; until that backlog has filled, the caller sequences
  without the applier keeping pace, and after the last call ``close()`` only
  applies.  Counting either transient would skew the slowdown (format 2,
  300k messages: the first quarter's acknowledged rate was 44k msg/s, its
  applied rate 4.5k, the steady rate ~15k).  So the first quarter's window starts at
  the first sample where the backlog has reached 90 % of its plateau (the
  median backlog over all samples), and the last quarter's window ends at
  the last acknowledgement: both ends then have about the same backlog, and
  in between, acknowledged and applied advance at the same pace.
- **ack** (``quarter_ack_msg_per_s``): acknowledged messages per second per
  quarter, from the start (what the caller sees, transients included).  The
  quarters fall back to these (``quarter_basis: "ack"``) when the probe is
  missing, a steady window applied nothing, or the first quarter's steady
  window is shorter than half a quarter -- at small scales, where the
  backlog (~70k messages) is a large part of the run: the benchmark then
  leaves the slowdown out (it would measure the backlog, not the store).
  With a ~70k backlog, 1M messages give a first window of ~70k..250k.

The slowdown is 1 - (rate of the last quarter / rate of the first).

Every number is wall time, message construction included (a server builds
its messages); the random senders and recipients are drawn before the clock
starts (two ``array('I')``, 8 bytes per message, counted in RssAnon).

Also reported: the store's size after close, as LMDB's used pages
(``(last_pgno + 1) * psize`` read with a read-only, lock-free environment),
LMDB's live pages (those the B-trees hold, without the free list; see
:func:`lmdb_sizes`) and as the bytes its files occupy on disk
(``st_blocks * 512`` of every file, preallocated WAL segments included); RssAnon before the ingest and its peak
(sampled every 50 ms, and at the end), in KiB.  After the report's numbers
are taken the store is reopened and checked: the heads of all users add up
to 2 x messages, and for a sample of users ``sync`` returns exactly the
messages sent to or by them, in order, with the right bodies.  A failed
check is reported in ``check_errors`` (the benchmark asserts it is empty).

:func:`disk_bytes` and :func:`lmdb_sizes` are also used by
``test_bench_fanout.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
from array import array

import lmdb

import syncstore
from syncstore import Message

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script: its siblings
from _harness import read_inbox  # noqa: E402
from _ingest import status_kb  # noqa: E402

SAMPLE_USERS = 50


def disk_bytes(path: str) -> int:
    """Bytes that the files under ``path`` occupy on disk (``st_blocks * 512``; preallocated space counts)."""
    total = 0
    for folder, _, names in os.walk(path):
        for name in names:
            total += os.lstat(os.path.join(folder, name)).st_blocks * 512
    return total


def lmdb_sizes(store_path: str) -> tuple[int, int]:
    """(used, live) bytes of the store's LMDB state (``state/``); the store must be closed.

    *used* is ``(last_pgno + 1) * psize``: every page up to the highest one
    ever written, free ones included (what the file needs).  *live* counts
    only the pages the B-trees hold now -- the two meta pages, the main
    database and every named database's branch, leaf and overflow pages
    (sub-databases of DUPSORT keys included) -- so ``used - live`` is LMDB's
    free list plus pages freed by transactions still being reused.
    """
    env = lmdb.open(os.path.join(store_path, "state"), readonly=True, lock=False, max_dbs=64)
    try:
        psize = env.stat()["psize"]
        used = (env.info()["last_pgno"] + 1) * psize
        with env.begin() as txn:
            names = [key for key, _ in txn.cursor()]
        dbs = [env.stat()]
        for name in names:
            try:
                db = env.open_db(name, create=False)  # outside a txn: py-lmdb 3 ties handles opened in a read txn to it
            except lmdb.Error:  # a plain key of the main database, not a named one
                continue
            with env.begin() as txn:
                dbs.append(txn.stat(db))
        live = (2 + sum(d["branch_pages"] + d["leaf_pages"] + d["overflow_pages"] for d in dbs)) * psize
        return used, live
    finally:
        env.close()




def pending_records(store: syncstore.Store) -> int | None:
    """Records acknowledged but not yet applied to LMDB (a private probe; None if the store has no such attribute)."""
    try:
        return len(store._writer.overlay)  # type: ignore[union-attr]
    except (AttributeError, TypeError):
        return None


def check(path: str, messages: int, users: int, senders: array, offsets: array, body: bytes, sample: int) -> list[str]:
    """Reopen the store and verify heads and a sample of inboxes; return the problems found."""
    errors: list[str] = []
    rng = random.Random(2)
    sampled = set(rng.sample(range(users), min(sample, users)))
    expected: dict[int, list[int]] = {uid: [] for uid in sampled}
    for seq in range(messages):
        sender = senders[seq]
        recipient = (sender + 1 + offsets[seq]) % users
        if sender in sampled:
            expected[sender].append(seq)
        if recipient in sampled:
            expected[recipient].append(seq)
    with syncstore.open(path, durability="none") as store:
        total = sum(store.head(uid) for uid in range(users))
        if total != 2 * messages:
            errors.append(f"heads add up to {total}, expected {2 * messages}")
        for uid in sorted(sampled):
            got = read_inbox(store, uid)
            if [m.client_seq for m in got] != expected[uid]:
                errors.append(f"user {uid}: sync returned client_seqs {[m.client_seq for m in got][:10]}..., expected {expected[uid][:10]}...")
            elif [m.cursor for m in got] != list(range(1, len(got) + 1)):
                errors.append(f"user {uid}: cursors not dense: {[m.cursor for m in got][:10]}...")
            elif any(m.body != body for m in got):
                errors.append(f"user {uid}: a message has the wrong body")
    return errors


def quarter_rates(samples: list[tuple[float, int, int | None]], start: float, messages: int) -> tuple[list[float], list[float], str, int | None]:
    """(rates, ack rates, basis, steady_from) of the four quarters, from per-batch ``(time, acknowledged, waiting)`` samples.

    See the module docstring: quarter q ends with the first sample that
    reaches ``q/4`` of the messages (the last with the last sample);
    ``basis`` is "applied" (steady-state applied rates; ``steady_from`` is
    the index of the sample where the first window starts) or "ack".
    """
    ends = [next(i for i, (_, acked, _) in enumerate(samples) if acked >= messages * q // 4) for q in (1, 2, 3)] + [len(samples) - 1]
    ack_points = [(start, 0), *((samples[i][0], samples[i][1]) for i in ends)]
    ack_rates = [(ack_points[q + 1][1] - ack_points[q][1]) / (ack_points[q + 1][0] - ack_points[q][0]) for q in range(4)]
    if any(waiting is None for _, _, waiting in samples):
        return ack_rates, ack_rates, "ack", None
    plateau = statistics.median(waiting for _, _, waiting in samples)  # type: ignore[type-var]
    steady_from = next(i for i, (_, _, waiting) in enumerate(samples) if waiting >= 0.9 * plateau)  # type: ignore[operator]
    if samples[ends[0]][1] - samples[steady_from][1] < messages // 8:  # Q1's window: at least half a quarter
        return ack_rates, ack_rates, "ack", steady_from
    points = [(samples[i][0], samples[i][1] - samples[i][2]) for i in (steady_from, *ends)]  # type: ignore[operator]
    if any(points[q + 1][1] <= points[q][1] for q in range(4)):
        return ack_rates, ack_rates, "ack", steady_from
    return [(points[q + 1][1] - points[q][1]) / (points[q + 1][0] - points[q][0]) for q in range(4)], ack_rates, "applied", steady_from


def main(argv: list[str] | None = None) -> int:
    """Ingest, measure, check, then print the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", required=True)
    parser.add_argument("--messages", type=int, required=True, help="at least 4 x --batch")
    parser.add_argument("--users", type=int, required=True)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--body", type=int, default=200)
    parser.add_argument("--durability", default="none")
    args = parser.parse_args(argv)
    messages, users, batch = args.messages, args.users, args.batch
    if users < 2 or batch < 1 or messages < 4 * batch:
        parser.error(f"--messages ({messages}) must be at least 4 x --batch ({batch}), and --users >= 2")

    rng = random.Random(1)
    body = rng.randbytes(args.body)
    senders = array("I", (rng.randrange(users) for _ in range(messages)))
    offsets = array("I", (rng.randrange(users - 1) for _ in range(messages)))  # recipient = (sender + 1 + offset) % users

    peaks = {"RssAnon": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peaks["RssAnon"] = max(peaks["RssAnon"], status_kb("RssAnon")["RssAnon"])

    rss_before = status_kb("RssAnon")["RssAnon"]
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    samples: list[tuple[float, int, int | None]] = []  # after each batch: time, acknowledged, waiting
    store = syncstore.open(args.path, durability=args.durability)
    start = time.perf_counter()
    for first in range(0, messages, batch):
        items = []
        end = min(first + batch, messages)
        for seq in range(first, end):
            sender = senders[seq]
            recipient = (sender + 1 + offsets[seq]) % users
            low, high = (sender, recipient) if sender < recipient else (recipient, sender)
            items.append((Message(sender, low * users + high, seq, body), (sender, recipient)))
        store.deliver_many(items)
        samples.append((time.perf_counter(), end, pending_records(store)))
    store.close()
    closed = time.perf_counter()
    done.set()
    sampler.join()
    peaks["RssAnon"] = max(peaks["RssAnon"], status_kb("RssAnon")["RssAnon"])

    rates, ack_rates, basis, steady_from = quarter_rates(samples, start, messages)
    lmdb_used, lmdb_live = lmdb_sizes(args.path)
    report = {
        "messages": messages,
        "users": users,
        "batch": batch,
        "body": args.body,
        "durability": args.durability,
        "seconds": closed - start,
        "close_seconds": closed - samples[-1][0],
        "msg_per_s": messages / (closed - start),
        "quarter_msg_per_s": rates,
        "quarter_ack_msg_per_s": ack_rates,
        "quarter_basis": basis,
        "steady_from_acked": None if steady_from is None else samples[steady_from][1],
        "samples": [(round(t - start, 4), acked, waiting) for t, acked, waiting in samples],
        "slowdown": 1 - rates[3] / rates[0],
        "lmdb_bytes": lmdb_used,
        "lmdb_live_bytes": lmdb_live,
        "disk_bytes": disk_bytes(args.path),
        "state_disk_bytes": disk_bytes(os.path.join(args.path, "state")),
        "rss_anon_before_kb": rss_before,
        "peak_rss_anon_kb": peaks["RssAnon"],
    }
    report["check_errors"] = check(args.path, messages, users, senders, offsets, body, SAMPLE_USERS)
    json.dump(report, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
