"""Bytes written to disk per durable message, for syncstore and its peers, at 5,000 and 1,000,000 users.

Same workload as the durable deliver benchmark (8 threads, 1 message per
call, 1:1, 200-byte bodies, ``durability="sync"``) over two user populations
(the same messages for every system of a population), one run per system,
from just after open to just after close -- close applies what is left to
LMDB and syncs it, SQLite checkpoints, so everything the run wrote is
counted.  Sources, all deltas:

- ``write_bytes`` of ``/proc/self/io`` -- the headline, as issue #8 asks:
  bytes of page-cache pages this process dirtied, i.e. what the block layer
  gets to write back (a page dirtied twice before write-back counts once; a
  page written with ``O_DSYNC`` or synced, then written again, counts again).
  Counted when a page is dirtied, so "after the final sync" only matters for
  the device column.  For syncstore it is split by thread: the WAL flusher's
  own counter (``/proc/self/task/<tid>/io`` of ``syncstore-flusher:<path>``,
  read just before close -- in "sync" mode every frame is written by then) is
  **WAL**; the rest of the process (the applier ``syncstore-applier:<path>``,
  and close's last apply and sync in the calling thread) is **LMDB**.
  Caveat: on kernels with large folios a small write into a large folio
  dirties (and counts) the whole folio.
- ``wchar``: bytes passed to write()/pwrite(), split the same way -- what the
  engine hands the kernel (LMDB writes whole 4 KiB pages; the WAL appends
  frames, so WAL wchar is its logical size).
- the block device's sectors written (``/sys/dev/block/.../stat``): what
  reached the disk, including the file system journal -- but machine-wide, so
  anything else writing at the same time is counted too.
- **WAL groups**: write syscalls of the flusher thread (``syscw``); the
  flusher writes each group commit with one ``pwrite``, so this counts the
  groups (plus one per WAL segment created: none at scale 1, whose 6 MB of
  frames fit in the first 16 MiB segment).
  **msg/group** = messages / groups; **WAL write_bytes/group** shows the floor:
  a durable group dirties -- and rewrites -- at least the 4 KiB page the log's
  tail is on, however few bytes it appends, so the WAL costs at least
  4,096 / (msg/group) bytes per message.
"""

from __future__ import annotations

import pytest
from _harness import RESULTS, Row, device_sectors_written, io_counters, one_to_one_items, run_threads, sized, split
from _peers import SYSTEMS

THREADS = 8
BODY = 200
FULL_COUNT = 20_000
POPULATIONS = {"5k": 5_000, "1M": 1_000_000}


@pytest.mark.parametrize("population", list(POPULATIONS))
@pytest.mark.parametrize("system", list(SYSTEMS))
def test_bytes_written_per_durable_message(benchmark, system, population, scale, fresh_dir):
    users = POPULATIONS[population]
    count = sized(FULL_COUNT, scale, THREADS * 20)
    path = fresh_dir(system)
    items = one_to_one_items(count, users, BODY, seed=9)
    work = split(items, THREADS)
    metrics: dict[str, float] = {}

    def run():
        target = SYSTEMS[system](path)
        threads = target.thread_ids() if hasattr(target, "thread_ids") else {}
        flusher = threads.get("flusher")
        if hasattr(target, "thread_ids"):
            assert flusher is not None and threads["applier"] is not None, f"syncstore's threads not found: {threads}"
        before, device_before = io_counters(), device_sectors_written(path)
        wal_before = io_counters(flusher) if flusher else None
        run_threads(target.writer, work)
        wal_after = io_counters(flusher) if flusher else None  # read before close ends the thread
        target.close()
        after, device_after = io_counters(), device_sectors_written(path)
        delta = {key: after[key] - before[key] for key in after}
        if wal_before and wal_after:
            wal = {key: wal_after[key] - wal_before[key] for key in wal_after}
            metrics["WAL write_bytes/msg"] = wal["write_bytes"] / count
            metrics["LMDB write_bytes/msg"] = (delta["write_bytes"] - wal["write_bytes"]) / count
        metrics["write_bytes/msg"] = delta["write_bytes"] / count
        metrics["x body"] = delta["write_bytes"] / count / BODY
        if delta.get("cancelled_write_bytes"):  # dirtied, then truncated or deleted before write-back
            metrics["cancelled/msg"] = delta["cancelled_write_bytes"] / count
        if wal_before and wal_after:
            metrics["WAL wchar/msg"] = wal["wchar"] / count
            metrics["LMDB wchar/msg"] = (delta["wchar"] - wal["wchar"]) / count
        metrics["wchar/msg"] = delta["wchar"] / count
        if device_before is not None and device_after is not None:
            metrics["device B/msg"] = (device_after - device_before) * 512 / count
        if wal_before and wal_after:
            metrics["WAL groups"] = wal["syscw"]
            metrics["msg/group"] = count / wal["syscw"] if wal["syscw"] else float("nan")
            metrics["WAL write_bytes/group"] = wal["write_bytes"] / wal["syscw"] if wal["syscw"] else float("nan")

    benchmark.pedantic(run, rounds=1)
    # Counts add up: every message reached both inboxes (checked on a reopened copy, not measured).
    recipients = sorted({uid for *_, to in items for uid in to})
    reopened = SYSTEMS[system](path)
    try:
        assert reopened.heads_total(recipients) == 2 * count
    finally:
        reopened.close()
    # Every message's body reaches the kernel at least once (less would mean lost data or a
    # broken counter); for syncstore the WAL alone carries every body, and each group
    # write carries at least one frame.
    assert metrics["wchar/msg"] >= BODY, metrics
    assert metrics["write_bytes/msg"] > 0, metrics
    if "WAL wchar/msg" in metrics:
        assert metrics["WAL wchar/msg"] >= BODY, metrics
        assert 1 <= metrics["WAL groups"] <= count, metrics
    RESULTS.record(
        Row(
            f"bytes {population}",
            system,
            metrics,
            workload=f"{count:,} 1:1 messages among {users:,} users, {THREADS} threads, durable, open to close",
        ),
        benchmark,
    )
