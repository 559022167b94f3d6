"""Stores written by earlier syncstore versions migrate to state format 3 on open (issue #8), crash-safely.

Test data, each with a README naming the commit and the workload:

- ``tests/data/format2-stores-c17a0e9.tar.gz``: format 2 (a copy of the
  message per inbox entry), closed cleanly and SIGKILLed; ``expected.json``
  holds what the old version answered, which the migrated store must repeat.
- ``tests/data/legacy-stores-38dff88.tar.gz``: format 1 (no dedup fingerprint).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import lmdb
import pytest
from _tree import tree_digest

import syncstore
from syncstore import CorruptionError, Delivery, IdempotencyConflict, LayoutError, Message
from syncstore._ids import msg_id_ms
from syncstore._migrate import LEGACY_DIR, MIGRATING_DIR

DATA = Path(__file__).parent / "data"
CLOCK_MS = 1_800_000_000_000  # the clock the format-2 stores were written with
_u64 = struct.Struct(">Q")
_pair = struct.Struct(">QQ")


def extract(archive: Path, where: Path) -> Path:
    with tarfile.open(archive) as tar:
        tar.extractall(where, filter="data")
    return where


@pytest.fixture
def format2(tmp_path) -> Path:
    return extract(DATA / "format2-stores-c17a0e9.tar.gz", tmp_path)


@pytest.fixture
def format1(tmp_path) -> Path:
    return extract(DATA / "legacy-stores-38dff88.tar.gz", tmp_path)


def meta(path: Path) -> dict[bytes, bytes]:
    env = lmdb.open(str(path / "state"), max_dbs=8, readonly=True, lock=False)
    try:
        with env.begin(db=env.open_db(b"meta", create=False)) as txn:
            return dict(txn.cursor())
    finally:
        env.close()


def format_of(path: Path) -> int:
    return _u64.unpack(meta(path)[b"format_version"])[0]


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in set(before) | set(after) if before.get(k) != after.get(k)}


def open_f2(path: Path, **options) -> syncstore.Store:
    return syncstore.open(path, clock_ms=lambda: CLOCK_MS, dedup_window_ms=2**40, **options)


def assert_answers_as_before(store: syncstore.Store, path: Path) -> None:
    """Every user's inbox and every idempotency key give what the format-2 version answered."""
    expected = json.loads((path / "expected.json").read_text())
    for uid, messages in expected["inboxes"].items():
        got = [[*m[:7], m.body.hex()] for m in store.sync(int(uid), limit=10_000).messages]
        assert got == messages, f"user {uid}"
        for m in store.sync(int(uid), limit=10_000).messages:
            assert store.get(m.msg_id) == syncstore.MessageRecord(*m[1:])
    for key, first in expected["keys"].items():
        sender, seq = map(int, key.split(","))
        original = next(m for m in store.sync(sender if str(sender) in first["cursors"] else int(next(iter(first["cursors"]))), limit=10_000).messages if m.msg_id == first["msg_id"])
        again = store.deliver(Message(sender, original.conv, seq, original.body), to=[int(u) for u in first["cursors"]])
        assert again == Delivery(first["msg_id"], True, {int(k): v for k, v in first["cursors"].items()})
        with pytest.raises(IdempotencyConflict):
            store.deliver(Message(sender, original.conv, seq, original.body + b"!"), to=[int(u) for u in first["cursors"]])


def assert_history_matches_inboxes(store: syncstore.Store, path: Path) -> None:
    """history(user, conv) is that user's inbox filtered by conv, newest first -- now from the migrated index."""
    expected = json.loads((path / "expected.json").read_text())
    for uid in map(int, expected["inboxes"]):
        inbox = list(store.sync(uid, limit=10_000).messages)
        for conv in {m.conv for m in inbox}:
            assert list(store.history(uid, conv, limit=10_000).messages) == [m for m in reversed(inbox) if m.conv == conv]


@pytest.mark.parametrize("name", ["format2-closed", "format2-crashed"])
def test_a_format_2_store_migrates_on_open_and_answers_as_before(format2, name):
    path = format2 / name
    assert format_of(path) == 2
    size_before = os.path.getsize(path / "state" / "data.mdb")
    with open_f2(path) as store:
        counts = store.check()
        assert counts["inbox_entries"] == sum(len(m) for m in json.loads((path / "expected.json").read_text())["inboxes"].values())
        assert counts["messages"] == 200  # each message once, whatever its fan-out
        assert_answers_as_before(store, path)
        assert_history_matches_inboxes(store, path)
        assert store.deliver(Message(1, 9, 10_001, b"after"), to=[1, 2]).cursors == {1: store.head(1), 2: store.head(2)}
        store.check()
    assert format_of(path) == 3
    assert sorted(os.listdir(path)) == ["LOCK", "SYNCSTORE", "expected.json", "state", "wal"]  # no leftovers
    assert os.path.getsize(path / "state" / "data.mdb") <= size_before
    before = tree_digest(str(path / "state"))
    with open_f2(path) as store:  # a second open migrates nothing
        store.check()
    assert set(tree_digest(str(path / "state"))) == set(before)


def test_a_read_only_view_of_an_old_format_is_refused_naming_the_tool_and_changes_nothing(format2):
    path = format2 / "format2-closed"
    before = tree_digest(str(path))
    with pytest.raises(LayoutError) as raised:
        syncstore.open(path, readonly=True)
    assert "format 2" in str(raised.value) and "syncstore upgrade" in str(raised.value)
    # The view took (and gave back) an LMDB reader slot, in LMDB's lock file; nothing else changed.
    assert changed(before, tree_digest(str(path))) <= {"state/lock.mdb"}


def test_the_upgrade_command_migrates(format2):
    path = format2 / "format2-closed"
    done = subprocess.run([sys.executable, "-m", "syncstore.cli", "upgrade", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "format 2" in done.stdout and "format 3" in done.stdout
    assert format_of(path) == 3
    done = subprocess.run([sys.executable, "-m", "syncstore.cli", "upgrade", str(path)], capture_output=True, text=True)
    assert done.returncode == 0 and "already" in done.stdout
    with syncstore.open(path, readonly=True) as view:
        assert view.check()["messages"] == 200


def test_a_newer_state_format_is_refused_naming_it(store_path):
    with syncstore.open(store_path) as store:
        store.deliver(Message(7, 42, 1, b"hi"), to=[7])
    env = lmdb.open(f"{store_path}/state", max_dbs=8)
    with env.begin(write=True, db=env.open_db(b"meta")) as txn:
        txn.put(b"format_version", _u64.pack(4))
    env.close()
    before = tree_digest(store_path)
    for readonly in (False, True):
        with pytest.raises(CorruptionError) as raised:
            syncstore.open(store_path, readonly=readonly)
        assert "format 4" in str(raised.value) and "1 to 3" in str(raised.value)
    assert changed(before, tree_digest(store_path)) <= {"state/lock.mdb"}  # a view's reader slot, as above


# --- crash safety: a SIGKILL at every step of the migration ------------------------------------

_CHILD = r"""
import os, signal, sys
import syncstore
from syncstore import _migrate
from syncstore._fileio import OS_FS, FileSystem

path, point = sys.argv[1], sys.argv[2]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)

class KillAt(FileSystem):
    renames = 0
    def rename(self, src, dst):
        super().rename(src, dst)
        KillAt.renames += 1
        if point == f"rename{KillAt.renames}":
            die()

if point == "build":
    _migrate._BATCH = 40
    write_batch, batches = _migrate._write_batch, []
    def killing(*args):
        write_batch(*args)
        batches.append(1)
        if len(batches) == 3:
            die()
    _migrate._write_batch = killing
if point == "cleanup":
    import shutil, types
    _migrate.shutil = types.SimpleNamespace(rmtree=lambda path, **kw: die() if path.endswith("state.legacy") else shutil.rmtree(path, **kw))
syncstore.open(path, fs=KillAt(), clock_ms=lambda: 1_800_000_000_000, dedup_window_ms=2**40)
print("not killed")
"""


@pytest.mark.parametrize("point", ["build", "rename1", "rename2", "cleanup"])
def test_a_migration_killed_at_any_step_is_finished_by_the_next_open(format2, point):
    path = format2 / "format2-crashed"  # with an unapplied WAL tail, which must survive too
    killed = subprocess.run([sys.executable, "-c", _CHILD, str(path), point], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stdout + killed.stderr
    left = set(os.listdir(path))
    expected_left = {"build": {MIGRATING_DIR}, "rename1": {MIGRATING_DIR, LEGACY_DIR}, "rename2": {LEGACY_DIR}, "cleanup": {LEGACY_DIR}}[point]
    assert expected_left <= left
    if point == "rename1":  # no state/ at all: a read-only view finds the complete new one
        with syncstore.open(path, readonly=True) as view:
            assert view.check()["messages"] > 0
    with open_f2(path) as store:
        store.check()
        assert_answers_as_before(store, path)
    assert format_of(path) == 3
    assert not {MIGRATING_DIR, LEGACY_DIR} & set(os.listdir(path))


# --- a damaged old state is refused, unchanged ----------------------------------------------------


def rewrite(path: Path, db: bytes, key: bytes, value: bytes) -> None:
    env = lmdb.open(str(path / "state"), max_dbs=8)
    try:
        with env.begin(write=True, db=env.open_db(db)) as txn:
            txn.put(key, value)
    finally:
        env.close()


@pytest.mark.parametrize("damage", ["head", "copy"])
def test_a_damaged_format_2_state_is_refused_and_left_as_it_was(format2, damage):
    path = format2 / "format2-closed"
    if damage == "head":  # the heads db and the inbox disagree
        rewrite(path, b"heads", _u64.pack(5), _u64.pack(999))
    else:  # two recipients' copies of one message differ
        env = lmdb.open(str(path / "state"), max_dbs=8)
        with env.begin(write=True, db=env.open_db(b"inbox")) as txn:
            key = _pair.pack(3, 1)
            txn.put(key, txn.get(key)[:-1] + b"?")
        env.close()
    before = tree_digest(str(path))
    with pytest.raises(CorruptionError):
        open_f2(path)
    assert tree_digest(str(path)) == before  # the refused migration removed its own directory again
    assert format_of(path) == 2


# --- format 1 (before the dedup fingerprint) ------------------------------------------------------


def assert_retries_are_checked(store: syncstore.Store, sender: int, users) -> None:
    """40 keys: the same content is a duplicate of the first delivery; another body, conv or recipients a conflict."""
    first: dict = {}
    for uid in users:
        for m in store.sync(uid, limit=10_000).messages:
            first.setdefault((m.sender, m.client_seq), (m, {}))[1][uid] = m.cursor
    assert sorted(first) == [(sender, seq) for seq in range(1, 41)]
    for (snd, seq), (m, cursors) in first.items():
        to = sorted(cursors, reverse=True)
        assert store.deliver(Message(snd, m.conv, seq, m.body, ts_ms=1), to=to) == Delivery(m.msg_id, True, cursors)
        for other, other_to in ((Message(snd, m.conv, seq, m.body + b"!"), to), (Message(snd, m.conv + 1, seq, m.body), to), (Message(snd, m.conv, seq, m.body), to[1:])):
            with pytest.raises(IdempotencyConflict) as raised:
                store.deliver(other, to=other_to)
            assert (raised.value.key, raised.value.msg_id) == ((snd, seq), m.msg_id)


def test_a_format_1_store_migrates_and_checks_retries(format1):
    path = format1 / "legacy-closed"
    assert format_of(path) == 1
    newest = _u64.unpack(meta(path)[b"last_msg_id"])[0]
    clock = lambda: msg_id_ms(newest) + 3_600_000  # noqa: E731 - the keys are then inside the window
    with syncstore.open(path, clock_ms=clock) as store:
        assert store.check()["dedup_entries"] == 40
        assert_retries_are_checked(store, 7, (7, 9, 11))
        assert store.deliver(Message(7, 42, 41, b"new"), to=[7, 11]).cursors == {7: 41, 11: 14}
        store.check()
    assert format_of(path) == 3


def test_a_crashed_format_1_store_replays_into_format_3(format1):
    path = format1 / "legacy-crashed"
    with syncstore.open(path, clock_ms=lambda: CLOCK_MS, dedup_window_ms=2**40) as store:
        store.check()
        assert_retries_are_checked(store, 8, (8, 12))
    assert format_of(path) == 3


def test_a_damaged_format_1_dedup_entry_is_refused(format1):
    path = format1 / "legacy-closed"
    key = _pair.pack(7, 40)
    env = lmdb.open(str(path / "state"), max_dbs=8)
    with env.begin(write=True, db=env.open_db(b"dedup")) as txn:
        value = txn.get(key)
        txn.put(key, value[:12] + _pair.pack(9, 999) + value[28:])  # points at a cursor that does not exist
    env.close()
    with pytest.raises(CorruptionError) as raised:
        syncstore.open(path)
    assert raised.value.key == (7, 40)
    assert format_of(path) == 1 and not (path / MIGRATING_DIR).exists()


@pytest.mark.parametrize("left", ["after the first rename", "after the second rename"])
def test_the_upgrade_command_finishes_a_migration_a_crash_interrupted(format2, left):
    path = format2 / "format2-closed"
    with open_f2(path):
        pass  # migrated: state/ is format 3 now
    (path / "state").rename(path / MIGRATING_DIR)  # what the swap leaves after its first rename ...
    os.mkdir(path / LEGACY_DIR)  # ... with the old state beside it
    if left == "after the second rename":
        (path / MIGRATING_DIR).rename(path / "state")
    done = subprocess.run([sys.executable, "-m", "syncstore.cli", "upgrade", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "finished a migration" in done.stdout
    assert not {MIGRATING_DIR, LEGACY_DIR} & set(os.listdir(path)) and format_of(path) == 3
    with syncstore.open(path, readonly=True) as view:
        assert view.check()["messages"] == 200


@pytest.mark.parametrize("where", ["", "a file", "not a store", "missing"])
def test_the_upgrade_command_names_what_is_wrong_with_a_path(tmp_path, where):
    target = {"": "", "a file": tmp_path / "f", "not a store": tmp_path / "d", "missing": tmp_path / "nope"}[where]
    if where == "a file":
        target.write_text("x")
    elif where == "not a store":
        target.mkdir()
    done = subprocess.run([sys.executable, "-m", "syncstore.cli", "upgrade", str(target)], capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert {"": "path is empty", "a file": "is not a directory", "not a store": "no store at", "missing": "no store at"}[where] in done.stderr


def test_the_upgrade_command_on_a_held_store_says_to_stop_the_holder(format2):
    path = format2 / "format2-closed"
    with open_f2(path):
        done = subprocess.run([sys.executable, "-m", "syncstore.cli", "upgrade", str(path)], capture_output=True, text=True)
    assert done.returncode == 0 and "nothing to do" in done.stdout  # migrated by the open above
    (path / "state").rename(path / MIGRATING_DIR)
    os.mkdir(path / LEGACY_DIR)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, syncstore; s = syncstore.open(sys.argv[1], dedup_window_ms=2**40); print('open', flush=True); sys.stdin.read()", str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"open"
        (path / LEGACY_DIR).mkdir()  # the holder finished the swap; make it look interrupted again
        done = subprocess.run([sys.executable, "-m", "syncstore.cli", "upgrade", str(path)], capture_output=True, text=True)
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode == 1 and "stop the process that holds the store" in done.stderr and "readonly" not in done.stderr
