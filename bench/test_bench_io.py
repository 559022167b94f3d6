"""Bytes written to disk per durable message, grouped case, for syncstore and its peers.

Same workload as the durable deliver benchmark (8 threads, 1 message per
call, 1:1, 200-byte bodies), one run per system, from just after open to
just after close (so LMDB's last applies and SQLite's checkpoint count).
Sources, all deltas:

- ``wchar`` of ``/proc/self/io``: bytes passed to write()/pwrite() -- what
  the engine hands the kernel (LMDB writes whole 4 KiB pages, so this
  includes its page granularity; the WAL appends frames).  This is the
  headline number.  For syncstore it is split by thread: the WAL flusher
  thread's own counter (``/proc/self/task/<tid>/io``) is the WAL, the rest
  is LMDB.
- the block device's sectors written (``/sys/dev/block/.../stat``): what
  reached the disk, including the file system journal and the 4 KiB page
  each small synchronous WAL write costs -- but machine-wide, so anything
  else writing at the same time is counted too.
- ``write_bytes`` of ``/proc/self/io``: page-cache pages dirtied.  Shown for
  completeness: on kernels with large folios (6.x, ext4) it counts the
  whole folio a small write dirties, so it overstates (1.45x for random
  4 KiB writes on the benchmark machine).
"""

from __future__ import annotations

import pytest
from _harness import RESULTS, Row, device_sectors_written, io_counters, one_to_one_items, run_threads, sized, split, thread_id
from _peers import SYSTEMS

from syncstore import _codec

THREADS = 8
USERS = 1_000
BODY = 200
FULL_COUNT = 20_000
#: One 1:1 DELIVER frame of a BODY-byte message: frame prefix and lead, message head,
#: counts, body, one (user, cursor) pair.
FRAME_BYTES = _codec.FRAME_PREFIX_SIZE + _codec.FRAME_LEAD_SIZE + _codec.MESSAGE_HEAD_SIZE + _codec.DELIVER_COUNTS_SIZE + BODY + _codec.PAIR_SIZE


@pytest.mark.parametrize("system", list(SYSTEMS))
def test_bytes_written_per_durable_message(benchmark, system, scale, fresh_dir):
    count = sized(FULL_COUNT, scale, THREADS * 20)
    path = fresh_dir(system)
    work = split(one_to_one_items(count, USERS, BODY, seed=9), THREADS)
    metrics: dict[str, float] = {}

    def run():
        target = SYSTEMS[system](path)
        flusher = thread_id(f"syncstore-flusher:{path}")
        before, device_before = io_counters(), device_sectors_written(path)
        wal_before = io_counters(flusher) if flusher else None
        run_threads(target.writer, work)
        wal_after = io_counters(flusher) if flusher else None  # read before close ends the thread
        target.close()
        after, device_after = io_counters(), device_sectors_written(path)
        written = (after["wchar"] - before["wchar"]) / count
        if wal_before and wal_after:
            wal = (wal_after["wchar"] - wal_before["wchar"]) / count
            metrics["WAL B/msg"] = wal
            metrics["LMDB B/msg"] = written - wal
        metrics["total B/msg"] = written
        metrics["x body"] = written / BODY
        if device_before is not None and device_after is not None:
            metrics["device B/msg"] = (device_after - device_before) * 512 / count
        metrics["write_bytes B/msg"] = (after["write_bytes"] - before["write_bytes"]) / count

    benchmark.pedantic(run, rounds=1)
    # Every message's body reaches the disk at least once (less would mean lost data or a
    # broken counter); for syncstore the WAL alone carries each message's whole frame.
    assert metrics["total B/msg"] >= BODY, metrics
    if "WAL B/msg" in metrics:
        assert metrics["WAL B/msg"] >= FRAME_BYTES, metrics
    RESULTS.record(Row("bytes", system, metrics, workload=f"{count:,} messages, {THREADS} threads, open to close"), benchmark)
