"""fork() of a process whose store is open and busy (issue 7, section 1).

A store is open and loaded: three threads ``deliver``, one walks users with
``sync``/``head``, and one holds a read snapshot open throughout (``with
store._state.read() as txn``).  The main thread forks again and again while
the load runs.  The children:

- ``exit``: ``os._exit(0)`` at once;
- ``use``: every store method raises ``UsedAfterFork``, ``close()`` and a
  ``with`` exit are no-ops, reopening the store raises ``UsedAfterFork``; then
  the child drops its references, runs ``gc.collect()`` and exits;
- ``shutdown`` (in a fresh interpreter, see below): as ``use``, then exits by
  ``SystemExit`` through the normal interpreter shutdown (atexit handlers,
  module teardown), not ``os._exit``;
- through ``multiprocessing`` with the fork start method: a Process doing
  unrelated work, a Process and a Pool task that try the store (and report
  ``UsedAfterFork``), a Pool mapping unrelated work.

After every fork the parent requires: the child exited with status 0 (a hung
child fails the test, it never hangs it); the held snapshot reads exactly the
bytes it read before the first fork (every head, every inbox entry, the applied
LSN); the snapshot's reader slot is still registered in the LMDB lock file under
the parent's pid.  At the end: the load threads finished without an error, every
acknowledged delivery is readable through ``sync`` with dense cursors,
``check()`` passes, and so it does after a reopen.

The bug this guards against (fixed in d2c9c83): the child's after-fork handler
closed the inherited LMDB environment, which aborted the inherited read
transactions and so freed the *parent's* reader slots in the shared lock file
(the parent's open snapshot then read recycled pages), and it closed the WAL,
taking a lock held by a parent thread that does not exist in the child (the
child hung inside ``fork()``).

The fork count is 100, or 1,000 with ``SYNCSTORE_SLOW=1`` (``SYNCSTORE_FORKS``
sets it directly).  Hung children: a child arms ``signal.alarm`` as soon as it
runs its own code, but a child stuck inside ``fork()`` itself (in an after-fork
handler) never gets there and no alarm crosses ``fork()``; so the parent also
waits for each child on a pidfd with a bound, and a child still alive then is
killed with SIGABRT (faulthandler, when enabled, prints where it hung) and
reported.  These bounds are guards, not timing assertions.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import queue
import resource
import select
import signal
import subprocess
import sys
import textwrap
import threading
import traceback

import pytest

import syncstore
from syncstore import Message, UsedAfterFork

FORKS = int(os.environ.get("SYNCSTORE_FORKS") or (1000 if os.environ.get("SYNCSTORE_SLOW") == "1" else 100))
GUARD_SECONDS = 60  # a guard against a hung child or thread, not a timing assertion
HELD = 9  # the user the held snapshot reads: head 50 when it starts
HELD_MESSAGES = 50
DELIVERERS = 3
OWN = 100  # deliverer t also delivers to user OWN + t
USERS = (HELD, *(OWN + t for t in range(DELIVERERS)))
TOKENS_PER_FORK = 2  # operations each load thread may do per fork: load in step with forks
MP_EVERY = 25  # a multiprocessing round every this many forks

pytestmark = pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")


def populate(path: str) -> None:
    """A store with HELD at head 50 and each deliverer's own user at head 10, all applied to LMDB."""
    with syncstore.open(path) as store:
        for seq in range(1, HELD_MESSAGES + 1):
            store.deliver(Message(sender=1, conv=1, client_seq=seq, body=b"before-%d" % seq), to=[HELD])
        for t in range(DELIVERERS):
            for seq in range(1, 11):
                store.deliver(Message(sender=2, conv=2, client_seq=t * 100 + seq, body=b"own-%d-%d" % (t, seq)), to=[OWN + t])


def snapshot_view(state, txn) -> dict:
    """Everything the snapshot sees of heads and inboxes, as bytes (small: read before any load)."""
    return {
        "head": state.head(txn, HELD),
        "applied_lsn": state.applied_lsn(txn),
        "heads": list(state.iter_heads(txn)),
        "inbox": [(k.hex(), v.hex()) for k, v in txn.cursor(db=state.inbox)],
        "messages": [(k.hex(), v.hex()) for k, v in txn.cursor(db=state.messages)],
    }


def reader_slots(env) -> list[tuple[int, str]]:
    """(pid, txnid) of every occupied slot of the LMDB reader table; txnid "-" is an idle slot."""
    slots = []
    for line in env.readers().splitlines()[1:]:  # after the header, or "(no active readers)"
        fields = line.split()
        if len(fields) == 3 and fields[0].isdigit():
            slots.append((int(fields[0]), fields[2]))
    return slots


class HeldSnapshot(threading.Thread):
    """Holds one read transaction open for its whole life; re-reads through it on request."""

    def __init__(self, store) -> None:
        super().__init__(name="held-snapshot", daemon=True)
        self.state = store._state
        self.requests: queue.SimpleQueue = queue.SimpleQueue()
        self.replies: queue.SimpleQueue = queue.SimpleQueue()
        self.txn_id = None

    def run(self) -> None:
        try:
            with self.state.read() as txn:
                self.txn_id = txn.id()
                while True:
                    try:
                        self.replies.put(snapshot_view(self.state, txn))
                    except Exception as error:  # noqa: BLE001 - MDB_PAGE_NOTFOUND and kin are the finding
                        self.replies.put(f"{type(error).__name__}: {error}")
                    if self.requests.get() is None:
                        return
        except BaseException as error:  # noqa: BLE001
            self.replies.put(f"snapshot thread failed: {error!r}")

    def view(self) -> dict | str:
        self.requests.put("read")
        return self.replies.get(timeout=GUARD_SECONDS)

    def release(self) -> None:
        self.requests.put(None)
        if self.ident is not None:  # started
            self.join(GUARD_SECONDS)


class Load:
    """DELIVERERS threads calling deliver and one calling sync/head, paced by tokens per fork."""

    def __init__(self, store) -> None:
        self.store = store
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.acked: list[tuple[int, dict[int, int], bytes]] = []  # (msg_id, cursors, body)
        self.tokens = [threading.Semaphore(0) for _ in range(DELIVERERS + 1)]
        self.threads = [threading.Thread(target=self._guarded, args=(self._deliverer, t), daemon=True) for t in range(DELIVERERS)]
        self.threads.append(threading.Thread(target=self._guarded, args=(self._reader, DELIVERERS), daemon=True))
        self.reads = 0

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def tick(self) -> None:
        for tokens in self.tokens:
            tokens.release(TOKENS_PER_FORK)

    def finish(self) -> list[str]:
        """Stop the threads; return the names of those still alive after the guard."""
        self.stop.set()
        for tokens in self.tokens:
            tokens.release()
        for thread in self.threads:
            if thread.ident is not None:  # started
                thread.join(GUARD_SECONDS)
        return [thread.name for thread in self.threads if thread.is_alive()]

    def _guarded(self, body, index: int) -> None:
        try:
            body(index)
        except BaseException:  # noqa: BLE001 - reported by the test
            self.errors.append(f"load thread {index}: {traceback.format_exc()}")

    def _deliverer(self, t: int) -> None:
        seq = 0
        while True:
            self.tokens[t].acquire()
            if self.stop.is_set():
                return
            seq += 1
            body = b"load-%d-%d" % (t, seq)
            delivery = self.store.deliver(Message(sender=1000 + t, conv=3, client_seq=seq, body=body), to=[HELD, OWN + t])
            if delivery.duplicate:
                raise AssertionError(f"fresh key ({1000 + t}, {seq}) delivered as a duplicate")
            self.acked.append((delivery.msg_id, dict(delivery.cursors), body))

    def _reader(self, index: int) -> None:
        since = dict.fromkeys(USERS, 0)
        while True:
            self.tokens[index].acquire()
            if self.stop.is_set():
                return
            for user in USERS:
                head = self.store.head(user)
                page = self.store.sync(user, since[user], limit=20)
                cursors = [m.cursor for m in page.messages]
                if cursors != list(range(since[user] + 1, since[user] + 1 + len(cursors))):
                    raise AssertionError(f"user {user}: page after {since[user]} has cursors {cursors}")
                if head < since[user] or (user == HELD and head < HELD_MESSAGES):
                    raise AssertionError(f"user {user}: head {head} after reading up to {since[user]}")
                since[user] = page.next
                self.reads += 1


def _outcome(call) -> str:
    try:
        result = call()
    except UsedAfterFork:
        return "UsedAfterFork"
    except BaseException as error:  # noqa: BLE001
        return f"{type(error).__name__}: {error}"
    return f"returned {result!r}"


def misuse_inherited_store(store, path: str) -> list[str]:
    """In a forked child: what the inherited store did that it should not have (empty: all good)."""
    problems = []
    calls = {
        "head": lambda: store.head(HELD),
        "sync": lambda: store.sync(HELD),
        "deliver": lambda: store.deliver(Message(sender=5, conv=5, client_seq=1, body=b"child"), to=[HELD]),
        "deliver_many": lambda: store.deliver_many([(Message(sender=5, conv=5, client_seq=2, body=b"child"), [HELD])]),
        "check": store.check,
        "reopen": lambda: syncstore.open(path),
        "reopen readonly": lambda: syncstore.open(path, readonly=True),
    }
    for name, call in calls.items():
        if (outcome := _outcome(call)) != "UsedAfterFork":
            problems.append(f"{name}: {outcome}")

    def with_exit():
        with store:
            pass

    for name, call in (("close", store.close), ("with", with_exit), ("close again", store.close)):
        if (outcome := _outcome(call)) != "returned None":
            problems.append(f"{name}: {outcome}")
    if (outcome := _outcome(lambda: store.head(HELD))) != "UsedAfterFork":
        problems.append(f"head after close: {outcome}")
    return problems


def wait_for_child(pid: int, what: str) -> int:
    """Reap ``pid``; a child still alive after the guard is killed (SIGABRT: faulthandler shows where) and reported."""
    pidfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], GUARD_SECONDS)
    finally:
        os.close(pidfd)
    if not ready:
        os.kill(pid, signal.SIGABRT)
        os.waitpid(pid, 0)
        raise AssertionError(f"{what}: child {pid} hung (killed after the {GUARD_SECONDS} s guard)")
    return os.waitpid(pid, 0)[1]


def describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        return f"killed by {name}" + (" (its own alarm: it hung)" if name == "SIGALRM" else "")
    return f"exit status {os.WEXITSTATUS(status)}"


@contextlib.contextmanager
def no_core_dumps():
    """A hung child is killed with SIGABRT: leave no core file behind."""
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))


# --- multiprocessing targets (module level: a Pool pickles its functions by name) -------------

_adopted = None


def _adopt(store) -> None:  # Pool initializer: runs in the forked worker
    global _adopted
    _adopted = store


def _adopted_store_outcome() -> str:
    return _outcome(lambda: _adopted.head(HELD))


def _square(x: int) -> int:
    return x * x


def _send_unrelated(conn, store) -> None:
    conn.send(sum(_square(x) for x in range(100)))
    conn.close()


def _send_store_outcome(conn, store) -> None:
    conn.send(_outcome(lambda: store.head(HELD)))
    conn.close()


class ForkUnderLoad:
    """The scenario: ``start()``, then ``fork(i, kind)`` and ``multiprocessing_round()`` at will, then ``finish()``."""

    def __init__(self, store, path: str) -> None:
        self.store = store
        self.path = path
        self.pid = os.getpid()
        self.snapshot = HeldSnapshot(store)
        self.load = Load(store)
        self.before: dict | str | None = None
        self.kinds: dict[str, int] = {}

    def start(self) -> None:
        self.snapshot.start()
        self.before = self.snapshot.replies.get(timeout=GUARD_SECONDS)
        assert isinstance(self.before, dict) and self.before["head"] == HELD_MESSAGES, self.before
        self.slots_before = reader_slots(self.store._state.env)
        assert (self.pid, str(self.snapshot.txn_id)) in self.slots_before, self.slots_before
        self.load.start()

    def check_parent(self, after: str) -> None:
        """The held snapshot reads what it read before the first fork, and its reader slot is registered."""
        view = self.snapshot.view()
        if view != self.before:
            head = view["head"] if isinstance(view, dict) else view
            raise AssertionError(f"after {after}: the held snapshot changed (head {head}, was {HELD_MESSAGES}): {str(view)[:500]}")
        slots = reader_slots(self.store._state.env)
        mine = (self.pid, str(self.snapshot.txn_id))
        assert mine in slots, f"after {after}: the held snapshot's reader slot {mine} is gone from the lock file: {slots}"

    def fork(self, i: int, kind: str) -> None:
        """Fork one child doing ``kind`` while the load runs; check the child's exit and the parent."""
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        read_fd, write_fd = os.pipe()
        self.load.tick()
        pid = os.fork()
        if pid == 0:
            if kind == "exit":
                os._exit(0)
            self._child(kind, write_fd)  # never returns
        os.close(write_fd)
        status = wait_for_child(pid, f"fork {i} ({kind})")
        with os.fdopen(read_fd, "rb") as report:
            problems = report.read().decode(errors="replace")
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"fork {i} ({kind}): child {describe(status)}: {problems}"
        self.check_parent(f"fork {i} ({kind})")

    def _child(self, kind: str, write_fd: int) -> None:
        """A forked child that uses the inherited store; exits with 0 if it behaved, 1 if not."""
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(GUARD_SECONDS)  # a guard: a child hung from here on dies of SIGALRM
        status = 1
        try:
            problems = misuse_inherited_store(self.store, self.path)
            os.write(write_fd, "\n".join(problems).encode())
            status = 1 if problems else 0
            # Drop what this frame and the scenario reference; whatever is collected now, or at
            # interpreter exit, must leave the inherited environment alone.
            self.store = self.snapshot = self.load = None
            gc.collect()
        except BaseException:  # noqa: BLE001 - reported to the parent
            os.write(write_fd, traceback.format_exc().encode())
        if kind == "shutdown":  # normal interpreter shutdown: unwinds every frame, atexit, module teardown
            os.close(write_fd)
            raise SystemExit(status)
        os._exit(status)

    def multiprocessing_round(self, i: int) -> None:
        """Processes and a Pool forked with multiprocessing's fork start method while the load runs."""
        import multiprocessing

        context = multiprocessing.get_context("fork")
        self.kinds["multiprocessing"] = self.kinds.get("multiprocessing", 0) + 1
        for target, expected in ((_send_unrelated, sum(x * x for x in range(100))), (_send_store_outcome, "UsedAfterFork")):
            receiver, sender = context.Pipe(duplex=False)
            self.load.tick()
            process = context.Process(target=target, args=(sender, self.store), daemon=True)
            process.start()
            sender.close()
            try:
                assert receiver.poll(GUARD_SECONDS), f"round {i}: {target.__name__} child sent nothing (hung?)"
                assert receiver.recv() == expected, f"round {i}: {target.__name__}"
                process.join(GUARD_SECONDS)
                assert process.exitcode == 0, f"round {i}: {target.__name__} child: exit code {process.exitcode}"
            finally:
                if process.exitcode is None:
                    process.kill()
                    process.join()
                receiver.close()
            self.check_parent(f"multiprocessing round {i} ({target.__name__})")
        self.load.tick()
        with context.Pool(2, initializer=_adopt, initargs=(self.store,)) as pool:
            assert pool.map_async(_square, range(50)).get(GUARD_SECONDS) == [x * x for x in range(50)]
            assert pool.apply_async(_adopted_store_outcome).get(GUARD_SECONDS) == "UsedAfterFork"
            pool.close()
            pool.join()
        self.check_parent(f"multiprocessing round {i} (Pool)")

    def finish(self) -> dict:
        """Stop the load and check everything; return counts for the report."""
        stuck = self.load.finish()
        assert not self.load.errors, "\n".join(self.load.errors)
        assert not stuck, f"load threads stuck: {stuck}"
        self.check_parent("the load stopped")
        slots_after = reader_slots(self.store._state.env)
        mine_before = [slot for slot in self.slots_before if slot[0] == self.pid]
        mine_after = [slot for slot in slots_after if slot[0] == self.pid]
        assert len(mine_after) >= len(mine_before), f"the parent's reader slots went from {mine_before} to {mine_after}"
        self.snapshot.release()
        assert not self.snapshot.is_alive(), "the held snapshot's thread is stuck"
        pages = {user: self.read_all(user) for user in USERS}
        for msg_id, cursors, body in self.load.acked:
            for user, cursor in cursors.items():
                got = pages[user][cursor - 1]
                assert (got.msg_id, got.body) == (msg_id, body), f"user {user} cursor {cursor}: {got}, acknowledged {msg_id} {body!r}"
        deliveries = len(self.load.acked)
        assert len(pages[HELD]) == HELD_MESSAGES + deliveries
        assert deliveries >= DELIVERERS, "the load never ran"
        counts = self.store.check()
        return {"deliveries": deliveries, "reads": self.load.reads, "kinds": self.kinds, "check": counts,
                "heads": {user: len(messages) for user, messages in pages.items()}}

    def read_all(self, user: int) -> list:
        messages, since = [], 0
        while True:
            page = self.store.sync(user, since, limit=1000)
            messages.extend(page.messages)
            since = page.next
            if not page.has_more:
                break
        assert [m.cursor for m in messages] == list(range(1, len(messages) + 1)), f"user {user}: cursors not dense"
        assert len(messages) == self.store.head(user)
        return messages

    def abandon(self) -> None:
        """After a failure: stop the threads (boundedly) so that the store can close.

        The snapshot first: its open read transaction is what would make
        ``close()`` wait forever.
        """
        self.snapshot.release()
        self.load.finish()


def test_forks_under_load_leave_the_parent_intact(tmp_path):
    """FORKS children forked from the main thread while the store is busy, half exiting at once,
    half misusing the inherited store, plus multiprocessing rounds: no hang, no harm to the parent."""
    path = str(tmp_path / "store")
    populate(path)
    with no_core_dumps(), syncstore.open(path) as store:
        run = ForkUnderLoad(store, path)
        try:
            run.start()  # inside: if its first snapshot read fails, abandon() still ends the snapshot's read
            for i in range(FORKS):
                run.fork(i, "exit" if i % 2 == 0 else "use")
                if i % MP_EVERY == MP_EVERY // 2:
                    run.multiprocessing_round(i)
            report = run.finish()
        except BaseException:
            run.abandon()
            raise
    print(report)
    assert report["kinds"]["exit"] + report["kinds"]["use"] == FORKS
    with syncstore.open(path) as again:  # what the parent wrote is on disk, whole
        again.check()
        assert {user: again.head(user) for user in USERS} == report["heads"]


# The children of this one end through the normal interpreter shutdown, which a child forked
# from inside pytest cannot do (SystemExit would unwind into pytest, and it would carry on
# running tests in the child): the scenario runs in a fresh interpreter, whose children raise
# SystemExit up to the top level.  Nothing at that level may catch it or run parent-only
# cleanup in the child: hence no try/finally around the fork loop.
SHUTDOWN_DRIVER = textwrap.dedent(
    """
    import faulthandler, json, os, sys, traceback
    sys.path.insert(0, sys.argv[1])
    faulthandler.enable()
    import syncstore
    import test_fork

    path, forks = sys.argv[2], int(sys.argv[3])
    test_fork.populate(path)
    try:
        with test_fork.no_core_dumps(), syncstore.open(path) as store:
            run = test_fork.ForkUnderLoad(store, path)
            run.start()
            for i in range(forks):
                run.fork(i, "exit" if i % 2 == 0 else "shutdown")
            report = run.finish()
    except Exception:  # not SystemExit: a "shutdown" child's exit passes through untouched
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    print(json.dumps(report), flush=True)
    """
)


def test_forked_children_exiting_through_interpreter_shutdown(tmp_path):
    """As above, in a fresh interpreter whose children (every other one) use the inherited store,
    drop every reference and exit through SystemExit: atexit handlers, module teardown and the
    final garbage collection must leave the inherited environment (and so the parent) alone."""
    path = str(tmp_path / "store")
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ)
    root = os.path.dirname(tests)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, "-c", SHUTDOWN_DRIVER, tests, path, str(FORKS)],
        capture_output=True,
        text=True,
        env=env,
        timeout=GUARD_SECONDS * 4 + FORKS,  # a guard against a hung parent, not a timing assertion
    )
    assert proc.returncode == 0, f"exit status {proc.returncode}\n{proc.stderr[-5000:]}"
    report = json.loads(proc.stdout.splitlines()[-1])
    print(report)
    assert report["kinds"] == {"exit": (FORKS + 1) // 2, "shutdown": FORKS // 2}, report
    with syncstore.open(path) as again:
        again.check()
        assert {str(user): again.head(user) for user in USERS} == report["heads"]
