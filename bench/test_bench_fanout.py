"""Group fan-out: store growth, speed and bytes written for one message delivered to F members.

Issue #8's row "50 messages of 1 KiB, each to 1,000 recipients: store growth
<= body + 64 B per recipient per message (~3.3 MB)", for fan-outs F of 10,
100, 1,000 and 10,000.  For each F: a fresh store (``durability="sync"``),
N messages of 1 KiB (distinct random bodies), each with ``deliver`` (one
message per call, one thread) to the same group of F users ``0..F-1``; user
0 sends.  N at scale 1 (``FULL_MESSAGES``) keeps N x F between 50,000 and
200,000 inbox entries; ``SYNCSTORE_BENCH_SCALE`` scales N (at least 2), never F.

Measured, each a delta from the empty store (created, closed, reopened) to
after ``close()`` (so every record is applied to LMDB):

- **store growth on disk**: ``st_blocks * 512`` summed over every file under
  the store directory (WAL segments, which are preallocated, and
  ``state/data.mdb``, ...): what the store occupies.
- **LMDB used pages**: ``(last_pgno + 1) * psize`` of ``state/``, read with a
  read-only, lock-free LMDB environment after close (free pages still inside
  the file count: the file does not shrink).
- **LMDB live pages**: the pages LMDB's B-trees hold after close (meta, main
  and every named database, DUPSORT sub-databases included), i.e. used pages
  without the free list -- what the data needs, apart from how the apply
  transactions happened to free and reuse pages (``_sustained.lmdb_sizes``).
- **B/rcpt**: ``(growth / N - body) / F``, the bytes per recipient per message
  beyond one copy of the body, for disk (the target: <= 64), LMDB used pages
  and LMDB live pages.
- **msg/s** and **entries/s** (= msg/s x F) from the first ``deliver`` to the
  end of ``close()``, which waits for the applier to catch up; **ack msg/s**
  stops at the last ``deliver``'s return (durable in the WAL, maybe not yet
  applied).
- **bytes written**: ``/proc/self/io`` ``wchar`` (bytes handed to
  write()/pwrite()) and ``write_bytes`` (page-cache bytes dirtied; it
  overstates on large-folio kernels, see docs/benchmarks.md) per message, from
  after the reopen to after close; **WAL wchar** is the WAL flusher thread's
  own ``wchar`` (``/proc/self/task/<tid>/io``), the rest is LMDB.

Correctness (checked after reopening): every member's head is N, and one
member's ``sync`` returns the N messages in order with the right bodies.
"""

from __future__ import annotations

import random
import time

import pytest
from _harness import RESULTS, SECTIONS, Row, Section, Target, io_counters, read_inbox, sized, thread_id
from _sustained import disk_bytes, lmdb_sizes

import syncstore
from syncstore import Message

BODY = 1024
FANOUTS = (10, 100, 1_000, 10_000)
#: Messages per fan-out at scale 1: N x F = 50,000 / 100,000 / 50,000 (the issue's row) / 200,000 entries.
FULL_MESSAGES = {10: 5_000, 100: 1_000, 1_000: 50, 10_000: 20}
MIN_MESSAGES = 2
PER_RECIPIENT_GOAL = 64  # bytes per recipient per message beyond the body
CONV = 1


def system_name(fanout: int) -> str:
    """The row's system: ``syncstore fan-out 1000`` (rows sort by fan-out as text, which is numeric order here)."""
    return f"syncstore fan-out {fanout}"


SECTION = Section(
    "fanout",
    f"group fan-out: {BODY:,}-byte messages, each to the same F-member group, deliver one per call, durable",
    "B/rcpt",
    higher_is_better=False,
    targets=tuple(Target("B/rcpt", PER_RECIPIENT_GOAL, higher_is_better=False, ours=system_name(f)) for f in FANOUTS),
    note=f"target: store growth <= body + {PER_RECIPIENT_GOAL} B per recipient per message; B/rcpt = (growth on disk / messages - body) / fan-out",
)
SECTIONS.setdefault(SECTION.key, SECTION)  # so that the tables after ./dev bench show it


def bodies(count: int, seed: int) -> list[bytes]:
    """``count`` distinct random BODY-byte bodies."""
    rng = random.Random(seed)
    return [rng.randbytes(BODY) for _ in range(count)]


@pytest.mark.parametrize("fanout", FANOUTS)
def test_group_fanout(benchmark, fanout, scale, fresh_dir):
    messages = sized(FULL_MESSAGES[fanout], scale, MIN_MESSAGES)
    members = list(range(fanout))
    sender = members[0]
    payloads = bodies(messages, seed=fanout)
    path = fresh_dir(f"fanout{fanout}-")
    measured: dict[str, float] = {}

    def run():
        syncstore.open(path, durability="sync").close()  # the empty store: the baseline
        disk_before, (lmdb_before, live_before) = disk_bytes(path), lmdb_sizes(path)
        store = syncstore.open(path, durability="sync")
        flusher = thread_id(f"syncstore-flusher:{path}")
        io_before = io_counters()
        wal_before = io_counters(flusher) if flusher else None
        start = time.perf_counter()
        for seq, body in enumerate(payloads, start=1):
            store.deliver(Message(sender, CONV, seq, body), members)
        acked = time.perf_counter()
        wal_after = io_counters(flusher) if flusher else None  # read before close ends the thread
        store.close()
        ended = time.perf_counter()
        io_after = io_counters()
        lmdb_after, live_after = lmdb_sizes(path)
        disk_growth, lmdb_growth, live_growth = disk_bytes(path) - disk_before, lmdb_after - lmdb_before, live_after - live_before
        measured.update(
            {
                "fan-out": fanout,
                "messages": messages,
                "body B": BODY,
                "growth MB": disk_growth / 1e6,
                "LMDB MB": lmdb_growth / 1e6,
                "B/msg": disk_growth / messages,
                "LMDB B/msg": lmdb_growth / messages,
                "B/rcpt": (disk_growth / messages - BODY) / fanout,
                "LMDB B/rcpt": (lmdb_growth / messages - BODY) / fanout,
                "live B/rcpt": (live_growth / messages - BODY) / fanout,
                "msg/s": messages / (ended - start),
                "entries/s": messages * fanout / (ended - start),
                "ack msg/s": messages / (acked - start),
                "wchar B/msg": (io_after["wchar"] - io_before["wchar"]) / messages,
                "write_bytes B/msg": (io_after["write_bytes"] - io_before["write_bytes"]) / messages,
            }
        )
        if wal_before and wal_after:
            measured["WAL wchar B/msg"] = (wal_after["wchar"] - wal_before["wchar"]) / messages

    benchmark.pedantic(run, rounds=1)

    with syncstore.open(path, durability="sync") as store:
        heads = {uid: store.head(uid) for uid in members}
        wrong = {uid: head for uid, head in heads.items() if head != messages}
        assert not wrong, f"{len(wrong)} of {fanout} members have a head other than {messages}, e.g. {list(wrong.items())[:5]}"
        got = read_inbox(store, members[-1])
    assert [m.cursor for m in got] == list(range(1, messages + 1))
    assert [(m.sender, m.conv, m.client_seq) for m in got] == [(sender, CONV, seq) for seq in range(1, messages + 1)]
    assert [m.body for m in got] == payloads, "a member's sync returned wrong bodies"
    assert len({m.msg_id for m in got}) == messages

    RESULTS.record(
        Row("fanout", system_name(fanout), measured, workload=f"N messages x F recipients, {BODY:,}-byte bodies, 1 thread, durability='sync'"),
        benchmark,
    )
