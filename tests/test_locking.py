"""One writer per store: in-process and cross-process locking, read-only readers in other
processes, and refusal to use a store across fork()."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

import syncstore
from syncstore import Message, StoreLocked, SyncStoreError, UsedAfterFork

REPO = os.path.dirname(os.path.dirname(os.path.abspath(syncstore.__file__)))
CHILD_TIMEOUT = 120  # a guard against a hung child, not a timing assertion

# Imported by every child script.
PRELUDE = textwrap.dedent(
    """
    import json, os, sys
    import syncstore
    from syncstore import Message

    def emit(**fields):
        print(json.dumps(fields), flush=True)
    """
)


def child_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_child(script: str, *args: str) -> list[dict]:
    """Run ``script`` in a fresh interpreter; return the JSON lines it emitted."""
    proc = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
        env=child_env(),
    )
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def start_child(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(script), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )


def read_event(proc: subprocess.Popen) -> dict:
    """The next JSON line from ``proc`` (blocks until it is written; fails if the child died)."""
    line = proc.stdout.readline()
    if not line:
        proc.wait(CHILD_TIMEOUT)
        pytest.fail(f"child exited ({proc.returncode}) without reporting: {proc.stderr.read()}")
    return json.loads(line)


def finish(proc: subprocess.Popen) -> None:
    try:
        proc.communicate(timeout=CHILD_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def msg(seq, body=b"x"):
    return Message(sender=1, conv=1, client_seq=seq, body=body)


TRY_OPEN = """
    try:
        store = syncstore.open(sys.argv[1])
    except Exception as error:
        emit(type=type(error).__name__, message=str(error), holder=getattr(error, "holder", None),
             is_syncstore=isinstance(error, syncstore.SyncStoreError))
    else:
        store.deliver(Message(sender=2, conv=2, client_seq=int(sys.argv[2]), body=b"child"), to=[50])
        emit(type=None, head=store.head(50), pid=os.getpid())
        store.close()
"""

HOLD_WRITER = """
    store = syncstore.open(sys.argv[1])
    for i in range(int(sys.argv[2])):
        store.deliver(Message(sender=3, conv=3, client_seq=i, body=b"held%d" % i), to=[60])
    emit(event="ready", pid=os.getpid())
    sys.stdin.readline()          # hold the store until told to close
    store.close()
    emit(event="closed")
"""

READER = """
    path, user, expected = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    reader = syncstore.open(path, readonly=True)
    emit(event="open", head=reader.head(user))
    for phase in range(2):
        if phase:
            expected = int(sys.stdin.readline())
        # The reader sees what the writer's applier committed to LMDB, which lags its
        # acknowledgements by up to one apply interval: poll with real reads, boundedly.
        attempts = 0
        while reader.head(user) < expected and attempts < 2_000_000:
            attempts += 1
        page = reader.sync(user, 0, 10_000)
        emit(event="read", head=reader.head(user), bodies=[m.body.decode() for m in page.messages],
             cursors=[m.cursor for m in page.messages], attempts=attempts)
    reader.close()
"""


# --- in one process ----------------------------------------------------------------------------


def test_second_writer_in_the_same_process_is_refused(tmp_path):
    path = str(tmp_path / "s")
    first = syncstore.open(path)
    first.deliver(msg(1), to=[1])
    for spelling in (path, path + "/", os.path.join(path, ".", "")):
        with pytest.raises(StoreLocked) as info:
            syncstore.open(spelling)
        assert isinstance(info.value, SyncStoreError)
        assert str(info.value).strip()
        assert str(os.getpid()) in info.value.holder
    # The refused opens did not disturb the first writer.
    assert first.deliver(msg(2), to=[1]).cursors == {1: 2}
    first.close()
    with syncstore.open(path) as second:
        assert second.head(1) == 2
        assert second.deliver(msg(3), to=[1]).cursors == {1: 3}


def test_second_writer_through_a_symlink_is_refused(tmp_path):
    path = tmp_path / "s"
    link = tmp_path / "link"
    with syncstore.open(str(path)) as first:
        link.symlink_to(path)
        with pytest.raises(StoreLocked):
            syncstore.open(str(link))
        first.deliver(msg(1), to=[1])


def test_readonly_open_in_the_writers_process_is_refused(tmp_path):
    """LMDB must not be opened twice in one process: the second open is StoreLocked, not a crash."""
    path = str(tmp_path / "s")
    with syncstore.open(path) as writer:
        writer.deliver(msg(1), to=[1])
        with pytest.raises(StoreLocked):
            syncstore.open(path, readonly=True)
        assert writer.head(1) == 1


def test_reopen_after_close_many_times(tmp_path):
    path = str(tmp_path / "s")
    for i in range(5):
        with syncstore.open(path) as s:
            assert s.deliver(msg(i), to=[1]).cursors == {1: i + 1}


# --- across processes ------------------------------------------------------------------------------


def test_second_writer_in_another_process_gets_store_locked_naming_the_holder(tmp_path):
    path = str(tmp_path / "s")
    with syncstore.open(path) as writer:
        writer.deliver(msg(1), to=[1])
        (result,) = run_child(TRY_OPEN, path, "1")
        assert result["type"] == "StoreLocked" and result["is_syncstore"]
        assert f"pid={os.getpid()}" in result["holder"]
        assert f"pid={os.getpid()}" in result["message"]
        # The refused child did not disturb the writer.
        assert writer.deliver(msg(2), to=[1]).cursors == {1: 2}
    # Once the writer has closed, the other process can write.
    (result,) = run_child(TRY_OPEN, path, "2")
    assert result["type"] is None and result["head"] == 1
    with syncstore.open(path) as again:
        assert again.head(1) == 2 and again.head(50) == 1


def test_writer_in_another_process_blocks_this_one_until_it_closes(tmp_path):
    path = str(tmp_path / "s")
    holder = start_child(HOLD_WRITER, path, "3")
    try:
        ready = read_event(holder)
        assert ready["event"] == "ready"
        with pytest.raises(StoreLocked) as info:
            syncstore.open(path)
        assert f"pid={ready['pid']}" in info.value.holder
        assert f"pid={ready['pid']}" in str(info.value)
        holder.stdin.write("close\n")
        holder.stdin.flush()
        assert read_event(holder)["event"] == "closed"
    finally:
        finish(holder)
    with syncstore.open(path) as store:
        assert [m.body for m in store.sync(60).messages] == [b"held0", b"held1", b"held2"]


def test_lock_is_released_when_the_writer_process_is_killed(tmp_path):
    path = str(tmp_path / "s")
    holder = start_child(HOLD_WRITER, path, "4")
    try:
        assert read_event(holder)["event"] == "ready"  # four deliveries acknowledged
        holder.send_signal(signal.SIGKILL)
        holder.wait(CHILD_TIMEOUT)
    finally:
        finish(holder)
    with syncstore.open(path) as store:  # no stale lock, and every acknowledged write survived
        assert store.head(60) == 4
        assert [m.cursor for m in store.sync(60).messages] == [1, 2, 3, 4]
        store.check()


def test_readonly_reader_in_another_process_after_the_writer_closed(tmp_path):
    path = str(tmp_path / "s")
    with syncstore.open(path) as writer:
        for i in range(5):
            writer.deliver(msg(i, b"w%d" % i), to=[7])
    reader = start_child(READER, path, "7", "5")
    try:
        opened = read_event(reader)
        assert opened["head"] == 5
        first = read_event(reader)
        assert first["head"] == 5
        assert first["bodies"] == ["w0", "w1", "w2", "w3", "w4"]
        assert first["cursors"] == [1, 2, 3, 4, 5]
        reader.stdin.write("5\n")
        reader.stdin.flush()
        assert read_event(reader)["head"] == 5
    finally:
        finish(reader)
    assert reader.returncode == 0


def test_readonly_reader_in_another_process_while_the_writer_runs(tmp_path):
    path = str(tmp_path / "s")
    writer = syncstore.open(path)
    try:
        for i in range(3):
            writer.deliver(msg(i, b"a%d" % i), to=[8])
        reader = start_child(READER, path, "8", "3")
        try:
            assert read_event(reader)["event"] == "open"
            seen = read_event(reader)
            assert seen["head"] == 3, seen
            assert seen["bodies"] == ["a0", "a1", "a2"]
            # More writes while the reader stays open: it sees them too.
            for i in range(3, 7):
                writer.deliver(msg(i, b"a%d" % i), to=[8])
            reader.stdin.write("7\n")
            reader.stdin.flush()
            seen = read_event(reader)
            assert seen["head"] == 7, seen
            assert seen["bodies"] == [f"a{i}" for i in range(7)]
            assert seen["cursors"] == list(range(1, 8))
        finally:
            finish(reader)
        assert reader.returncode == 0
        # The reader took no lock: the writer is unaffected.
        assert writer.deliver(msg(100), to=[8]).cursors == {8: 8}
    finally:
        writer.close()


def test_readonly_reader_does_not_block_a_new_writer(tmp_path):
    path = str(tmp_path / "s")
    with syncstore.open(path) as w:
        w.deliver(msg(1), to=[9])
    reader = start_child(READER, path, "9", "1")
    try:
        assert read_event(reader)["event"] == "open"
        with syncstore.open(path) as w:  # a reader is not a writer
            w.deliver(msg(2), to=[9])
        assert read_event(reader)["head"] >= 1
        reader.stdin.write("2\n")
        reader.stdin.flush()
        assert read_event(reader)["head"] == 2
    finally:
        finish(reader)


# --- fork ---------------------------------------------------------------------------------------

EXIT_USED_AFTER_FORK, EXIT_OTHER_ERROR, EXIT_NO_ERROR = 0, 1, 2


def _run_in_fork(body) -> tuple[int, dict]:
    """Run ``body()`` (returning a JSON-able dict and an exit status) in a forked child."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        status = 3
        try:
            os.close(read_fd)
            signal.alarm(60)  # a guard: a deadlocked child dies instead of hanging the suite
            report, status = body()
            os.write(write_fd, json.dumps(report).encode())
        except BaseException as error:  # noqa: BLE001 - report anything
            os.write(write_fd, json.dumps({"crash": repr(error)}).encode())
        finally:
            os._exit(status)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.close(read_fd)
    _pid, wait_status = os.waitpid(pid, 0)
    assert os.WIFEXITED(wait_status), f"child killed by signal {os.WTERMSIG(wait_status)}"
    return os.WEXITSTATUS(wait_status), json.loads(b"".join(chunks) or b"{}")


def _outcome(call):
    try:
        call()
    except UsedAfterFork:
        return "UsedAfterFork"
    except Exception as error:  # noqa: BLE001
        return f"{type(error).__name__}: {error}"
    return None


def test_store_used_in_a_forked_child_raises_used_after_fork(tmp_path):
    path = str(tmp_path / "s")
    with syncstore.open(path) as store:
        store.deliver(msg(1), to=[1])

        def child():
            outcomes = {
                "head": _outcome(lambda: store.head(1)),
                "sync": _outcome(lambda: store.sync(1)),
                "check": _outcome(store.check),
                "deliver": _outcome(lambda: store.deliver(msg(2), to=[1])),
                "deliver_many": _outcome(lambda: store.deliver_many([(msg(3), [1])])),
            }
            head = outcomes["head"]
            status = EXIT_USED_AFTER_FORK if head == "UsedAfterFork" else EXIT_NO_ERROR if head is None else EXIT_OTHER_ERROR
            store.close()  # closing the inherited store in the child must not touch the parent's files
            return outcomes, status

        status, outcomes = _run_in_fork(child)
        assert status == EXIT_USED_AFTER_FORK, outcomes
        assert outcomes == {name: "UsedAfterFork" for name in ("head", "sync", "check", "deliver", "deliver_many")}
        # The parent's store is unaffected by the child.
        assert store.head(1) == 1
        assert store.deliver(msg(4), to=[1]).cursors == {1: 2}
    with syncstore.open(path) as again:
        assert again.head(1) == 2
        again.check()


def test_forked_child_cannot_reopen_the_parents_store_but_can_open_another(tmp_path):
    """py-lmdb refuses a second environment on the same files in one process, and the inherited
    one must never be closed: reopening the parent's store in the child is a clear UsedAfterFork
    (not a raw LMDB error), while any other store opens normally there."""
    path = str(tmp_path / "s")
    other = str(tmp_path / "other")
    with syncstore.open(path) as store:
        store.deliver(msg(1, b"parent"), to=[1])

        def child():
            report = {
                "writer": _outcome(lambda: syncstore.open(path).close()),
                "readonly": _outcome(lambda: syncstore.open(path, readonly=True).close()),
            }
            with syncstore.open(other) as mine:
                mine.deliver(msg(1, b"child"), to=[5])
                report["other_head"] = mine.head(5)
            return report, 0

        status, report = _run_in_fork(child)
        assert status == 0, report
        assert report["writer"].startswith("UsedAfterFork"), report
        assert report["readonly"].startswith("UsedAfterFork"), report
        assert report["other_head"] == 1, report
        assert store.deliver(msg(2), to=[1]).cursors == {1: 2}
