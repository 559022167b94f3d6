"""Lifecycle races yield only SyncStoreError, and the LMDB reader table cannot fill up.

``close()`` racing readers and writers: reads in progress finish, later ones
raise ``StoreClosed`` (never a raw ``lmdb.Error``); every delivery acknowledged
before ``close`` returns is durable, and a delivery refused with
``StoreClosed`` left nothing behind.  Reader slots of SIGKILLed processes are
cleared when the table is full; a table full of live readers is a
``ReadersFull`` error with a hint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

import syncstore
from syncstore import Message, ReadersFull, StoreClosed, SyncStoreError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(syncstore.__file__)))
ROUNDS = 40


def msg(sender: int, seq: int) -> Message:
    return Message(sender=sender, conv=1, client_seq=seq, body=b"m%d" % seq)


def _until_closed(call, outcomes: list, started: threading.Barrier) -> None:
    started.wait()
    try:
        while True:
            call()
    except BaseException as error:  # noqa: BLE001 - what escapes is the point of the test
        outcomes.append(error)


@pytest.mark.parametrize("durability", ["sync", "interval"])
def test_close_while_reading_raises_only_store_closed(tmp_path, durability):
    for round_ in range(ROUNDS):
        store = syncstore.open(str(tmp_path / f"s{round_}"), durability=durability)
        for seq in range(1, 51):
            store.deliver(msg(1, seq), to=[1, 2])
        outcomes: list = []
        started = threading.Barrier(5)
        calls = [lambda: store.sync(1, since=0, limit=100), lambda: store.head(2), lambda: store.sync(2, since=10), lambda: store.check()]
        threads = [threading.Thread(target=_until_closed, args=(call, outcomes, started)) for call in calls]
        for thread in threads:
            thread.start()
        started.wait()
        store.close()
        for thread in threads:
            thread.join()
        assert len(outcomes) == 4
        assert all(isinstance(error, StoreClosed) for error in outcomes), [repr(e) for e in outcomes]


@pytest.mark.parametrize("durability", ["sync", "interval", "none"])
def test_close_with_deliveries_in_flight(tmp_path, durability):
    """Every delivery that returned is durable and visible after reopen; one refused with
    StoreClosed left nothing; close() itself does not raise."""
    for round_ in range(ROUNDS // 2):
        path = str(tmp_path / f"s{round_}")
        store = syncstore.open(path, durability=durability)
        results: dict[int, list] = {w: [] for w in range(4)}
        started = threading.Barrier(5)

        def write(worker: int) -> None:
            started.wait()
            seq = 0
            while True:
                seq += 1
                try:
                    if seq % 5 == 0:
                        batch = [(msg(worker, seq * 100 + i), [worker, 9]) for i in range(20)]
                        results[worker].extend(zip(batch, store.deliver_many(batch)))
                    else:
                        results[worker].append(((msg(worker, seq), [worker, 9]), store.deliver(msg(worker, seq), to=[worker, 9])))
                except StoreClosed:
                    results[worker].append(("refused", seq))
                    return
                except BaseException as error:  # noqa: BLE001
                    results[worker].append(("error", repr(error)))
                    return

        threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
        for thread in threads:
            thread.start()
        started.wait()
        store.close()  # must not raise
        for thread in threads:
            thread.join()
        with syncstore.open(path) as reopened:
            reopened.check()
            for worker, outcome in results.items():
                assert outcome[-1][0] == "refused", outcome[-1]
                acked = outcome[:-1]
                assert [m.msg_id for m in reopened.sync(worker, limit=10_000).messages] == [d.msg_id for _, d in acked]
                # the refused delivery (single or the whole batch) is not there: a retry is new
                refused_seq = outcome[-1][1]
                keys = [refused_seq * 100] if refused_seq % 5 == 0 else [refused_seq]
                for key in keys:
                    assert not reopened.deliver(msg(worker, key), to=[worker]).duplicate


def test_writes_and_reads_after_close_raise_store_closed(store_path):
    store = syncstore.open(store_path)
    store.deliver(msg(1, 1), to=[1])
    store.close()
    for call in (lambda: store.deliver(msg(1, 2), to=[1]), lambda: store.sync(1), lambda: store.head(1), store.check, store.flush):
        with pytest.raises(StoreClosed):
            call()
    store.close()  # idempotent


# --- the reader table ------------------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import sys
    import syncstore
    store = syncstore.open(sys.argv[1], readonly=True, max_readers=int(sys.argv[3]))
    held = [store._state.env.begin() for _ in range(int(sys.argv[2]))]  # raw LMDB read transactions
    print("ready", flush=True)
    sys.stdin.read()  # until killed, or until the test closes our stdin
    """
)


def _holders(path: str, count: int, each: int, max_readers: int) -> list[subprocess.Popen]:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [
        subprocess.Popen([sys.executable, "-c", HOLDER, path, str(each), str(max_readers)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        for _ in range(count)
    ]
    for proc in procs:
        line = proc.stdout.readline()
        assert line == b"ready\n", f"holder failed to start: {line!r}"
    return procs


def test_reader_slots_of_killed_processes_are_cleared_when_the_table_is_full(store_path):
    """8 read-only processes take 64 read transactions each -- the whole table of 512 slots --
    and are SIGKILLed.  The writer's deliver, sync and head go on (stale slots are cleared on
    demand), with no reopen."""
    store = syncstore.open(store_path)
    try:
        for seq in range(1, 21):
            store.deliver(msg(1, seq), to=[1, 2])
        procs = _holders(store_path, 8, 64, 512)
        for proc in procs:
            proc.send_signal(signal.SIGKILL)
        for proc in procs:
            proc.wait()
        assert store.deliver(msg(1, 21), to=[1]).cursors == {1: 21}
        assert [m.cursor for m in store.sync(2, limit=100).messages] == list(range(1, 21))
        assert store.head(1) == 21
        store.check()
    finally:
        store.close()


def test_a_table_full_of_live_readers_is_readers_full_with_a_hint(store_path):
    with syncstore.open(store_path, max_readers=16) as store:
        store.deliver(msg(1, 1), to=[1])
        procs = _holders(store_path, 1, 16, 16)
        try:
            with pytest.raises(ReadersFull) as full:
                store.sync(1)
            assert "max_readers" in str(full.value)
            assert isinstance(full.value, SyncStoreError)
        finally:
            for proc in procs:
                proc.stdin.close()
                proc.wait()
        assert store.head(1) == 1  # the store goes on once readers finish
