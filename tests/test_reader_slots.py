"""Process hygiene: readers SIGKILLed in the middle of a read leave no stale LMDB reader slots.

A process that dies inside an LMDB read transaction leaves its slot in the
reader table (``state/lock.mdb``) marked with its pid.  Such a slot pins the
snapshot it was reading, so the file can only grow, and the table has
``max_readers`` (512) slots: enough killed readers and every further open or
read fails with ``MDB_READERS_FULL``.  docs/design.md promises that ``open``
clears the slots of dead processes (``reader_check()``).

The test keeps the environment open in a long-lived reader process throughout
(as a running server would; were no process left holding it, LMDB would reset
the whole table at the next open), then, in waves, forks readers that open the
store ``readonly=True``, verify a ``sync`` page, start another read and block
in it, and SIGKILLs them.  After every wave it first confirms, through a bare
LMDB handle, that the dead readers' slots really are left behind, then opens
the store as a writer and requires the table to hold none of them.  In all,
more readers are killed than the table has slots, and no open or read ever
fails.  (Fork safety and the refusal of a second writer are tested in
tests/test_locking.py.)
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap

import lmdb

import syncstore
from syncstore import Message
from syncstore.state import state_dir

WAVES = 15
WAVE = 40  # 600 killed readers in all: more than the reader table's 512 slots
MAX_READERS = 512  # what syncstore.state opens LMDB with
GUARD_SECONDS = 120  # a guard against a hung child, not a timing assertion
USER = 1

HOLDER = textwrap.dedent(
    """
    import sys
    import syncstore
    store = syncstore.open(sys.argv[1], readonly=True)
    store.head(1)
    print("ready", flush=True)
    sys.stdin.read()  # until the test closes our stdin
    store.close()
    """
)


def reader_pids(env: lmdb.Environment) -> list[int]:
    """The pid of every occupied slot in the reader table (``mdb_reader_list``)."""
    pids = []
    for line in env.readers().splitlines()[1:]:  # after the header, or "(no active readers)"
        fields = line.split()
        if fields and fields[0].isdigit():
            pids.append(int(fields[0]))
    return pids


def bare_env(path: str) -> lmdb.Environment:
    """The store's LMDB environment opened directly: no reader_check(), unlike syncstore.open."""
    return lmdb.open(state_dir(path), readonly=True, max_dbs=5, max_readers=MAX_READERS, lock=True)


def fork_reader(path: str, expected: list[int], ready_w: int, block_r: int, block_w: int) -> int:
    """Fork a reader that verifies a sync page, blocks inside a read transaction and waits to be killed."""
    pid = os.fork()
    if pid:
        return pid
    # --- the child: never returns into pytest -------------------------------------
    os.close(block_w)  # so that our read below ends (EOF) should the test process die
    try:
        store = syncstore.open(path, readonly=True)
        page = store.sync(USER, since=0, limit=10_000)
        got = [m.msg_id for m in page.messages]
        txn = store._state.env.begin()  # a read in progress when the kill comes
        cursor = txn.cursor(db=store._state.inbox)
        cursor.first()
        line = "ok\n" if got == expected and cursor.key() else f"bad page: {len(got)} messages, expected {len(expected)}\n"
    except BaseException as error:  # noqa: BLE001 - reported to the parent
        line = "error " + repr(error).replace("\n", " ")[:3000] + "\n"
    os.write(ready_w, line.encode())
    os.read(block_r, 1)  # blocks until SIGKILL
    os._exit(3)


def read_lines(fd: int, count: int) -> list[str]:
    """``count`` lines from the shared pipe (each child writes one line in one atomic write)."""
    buffer = b""
    while buffer.count(b"\n") < count:
        readable, _, _ = select.select([fd], [], [], GUARD_SECONDS)
        assert readable, f"readers hung: {len(buffer.splitlines())} of {count} reported"
        chunk = os.read(fd, 65536)
        assert chunk, "reader pipe closed early"
        buffer += chunk
    return buffer.decode().splitlines()


def start_holder(path: str) -> subprocess.Popen:
    """A process keeping the store open read-only (as a running server would), until its stdin closes."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(syncstore.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    assert holder.stdout is not None and holder.stdout.readline() == b"ready\n"
    return holder


def stop_holder(holder: subprocess.Popen) -> None:
    if holder.stdin is not None:
        holder.stdin.close()
    holder.wait(timeout=GUARD_SECONDS)
    assert holder.returncode == 0


def test_killed_readers_leave_no_stale_slots_after_a_writer_opens(tmp_path):
    path = str(tmp_path / "store")
    expected: list[int] = []
    with syncstore.open(path) as store:
        for seq in range(1, 51):
            expected.append(store.deliver(Message(2, 1, seq, b"m%d" % seq), to=[USER, 3]).msg_id)

    holder = start_holder(path)
    ready_r, ready_w = os.pipe()
    block_r, block_w = os.pipe()
    children: list[int] = []
    try:
        killed: set[int] = set()
        stale_seen = 0
        most_slots = 0
        for wave in range(WAVES):
            pids = [fork_reader(path, expected, ready_w, block_r, block_w) for _ in range(WAVE)]
            children.extend(pids)
            lines = read_lines(ready_r, WAVE)
            assert lines == ["ok"] * WAVE, [line for line in lines if line != "ok"][:5]
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            for pid in pids:
                _, status = os.waitpid(pid, 0)
                children.remove(pid)
                assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
            killed.update(pids)

            # The kills really left the slots behind (the test would prove nothing otherwise).
            bare = bare_env(path)
            try:
                slots = reader_pids(bare)
            finally:
                bare.close()
            stale = [pid for pid in slots if pid in killed]
            assert set(stale) == set(pids), f"wave {wave}: {len(set(stale))} stale slots of {WAVE} killed readers"
            stale_seen += len(stale)
            most_slots = max(most_slots, len(slots))
            assert len(slots) < MAX_READERS

            # A writer's open clears them: none of the dead readers' slots remain.
            with syncstore.open(path) as store:
                left = [pid for pid in reader_pids(store._state.env) if pid in killed]
                assert not left, f"wave {wave}: {len(left)} slots of killed readers survived a writer's open"
                assert store._state.env.reader_check() == 0
                store.check()
                expected.append(store.deliver(Message(2, 1, 1000 + wave, b"wave %d" % wave), to=[USER]).msg_id)

        assert len(killed) == WAVES * WAVE
        assert stale_seen > MAX_READERS  # without the cleanup the table would have overflowed
        assert most_slots <= WAVE + 1  # the killed readers of one wave, and the holder
    finally:
        for pid in children:  # only if the test failed half-way
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        for fd in (ready_r, ready_w, block_r, block_w):
            os.close(fd)
        stop_holder(holder)


def test_a_reader_killed_inside_a_read_does_not_block_readers_after_it(tmp_path):
    """Without a writer in between: the next reader's own open clears the dead reader's slot."""
    path = str(tmp_path / "store")
    with syncstore.open(path) as store:
        expected = [store.deliver(Message(2, 1, 1, b"x"), to=[USER]).msg_id]
    holder = start_holder(path)  # keeps the environment open, so the table is never reset
    ready_r, ready_w = os.pipe()
    block_r, block_w = os.pipe()
    try:
        first = fork_reader(path, expected, ready_w, block_r, block_w)
        assert read_lines(ready_r, 1) == ["ok"]
        os.kill(first, signal.SIGKILL)
        os.waitpid(first, 0)
        bare = bare_env(path)
        try:
            assert first in reader_pids(bare)
        finally:
            bare.close()
        with syncstore.open(path, readonly=True) as reader:
            assert first not in reader_pids(reader._state.env)
            assert [m.msg_id for m in reader.sync(USER).messages] == expected
    finally:
        for fd in (ready_r, ready_w, block_r, block_w):
            os.close(fd)
        stop_holder(holder)
