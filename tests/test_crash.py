"""Crash test: SIGKILL a real writer process at random points; nothing acknowledged may be lost.

The writer, the verifier and the kill loop live in ``tools/crashtest.py`` (also
a CLI for long runs); this test runs it for ``SYNCSTORE_CRASH_KILLS`` kills
(default 50) with a random seed, printed on failure (``SYNCSTORE_CRASH_SEED``
replays it).  See the tool's docstring for what is verified after each kill.
"""

from __future__ import annotations

import importlib.util
import os
import random
import sys
import threading
from pathlib import Path

import syncstore
from syncstore import Message
from syncstore._fileio import FileSystem

TOOL = Path(__file__).resolve().parent.parent / "tools" / "crashtest.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("syncstore_crashtest", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


crashtest = _load_tool()


def _report(harness) -> str:
    return f"seed {harness.seed} (replay with SYNCSTORE_CRASH_SEED={harness.seed}):\n" + "\n".join(harness.failures[:30])


def test_sigkill_at_random_points_keeps_every_acknowledged_write(tmp_path):
    kills = int(os.environ.get("SYNCSTORE_CRASH_KILLS", "50"))
    seed = int(os.environ.get("SYNCSTORE_CRASH_SEED", random.SystemRandom().randrange(2**32)))
    harness = crashtest.run(kills, str(tmp_path / "store"), seed)
    assert not harness.failures, _report(harness)
    assert harness.kills >= kills
    # the writers really acknowledged writes, and the verifier really checked them
    assert len(harness.acked) >= kills and harness.acks_verified >= len(harness.acked)


def test_verifier_catches_a_lost_or_changed_write(tmp_path):
    """The harness is only worth something if it fails: plant wrong expectations and see it notice."""
    harness = crashtest.Harness(str(tmp_path / "store"), seed=7)
    while harness.kills < 2 and not harness.failures:
        harness.round()
    assert not harness.failures, _report(harness)
    key = next(iter(sorted(harness.acked)))
    msg_id, pairs = harness.known[key]

    harness.known[key] = (msg_id + 1, pairs)  # "acknowledged" under another msg_id
    harness.known[(3, 10**9)] = (1, ((3, 1),))  # "acknowledged" but never written
    harness.acked.add((3, 10**9))
    harness.verify(in_place=False)
    assert any(f"key {key}: acknowledged as msg_id {msg_id + 1}" in f for f in harness.failures), harness.failures
    assert any("(3, 1000000000)" in f and "missing" in f for f in harness.failures), harness.failures

    harness.failures.clear()
    line = f"A {key[0]} {key[1]} {msg_id} 0 " + ",".join(f"{u}:{c}" for u, c in pairs)
    harness._absorb([line], harness.runs)  # the same key acknowledged as a new delivery again
    assert any("delivered a second time" in f for f in harness.failures), harness.failures


class _SyncRecorder(FileSystem):
    """Notes every WAL fdatasync made once ``abandoning`` is set (and by which thread)."""

    def __init__(self) -> None:
        self.abandoning = False
        self.during_abandon: list[str] = []

    def fdatasync(self, fd: int) -> None:
        if self.abandoning:
            self.during_abandon.append(threading.current_thread().name)
        super().fdatasync(fd)


def test_abandon_leaves_recovery_to_the_wal(store_path):
    """``_abandon()`` must drop the store like a SIGKILL: no flush, no sync, no apply on the way out.

    Otherwise every in-process "crash" (test_model's crash rule) finds the state
    already applied and never exercises WAL replay.  durability="none": the
    applier's next periodic pass (which syncs the WAL, then applies) is a
    second away, so in this test nothing but ``_abandon()`` itself can start one.
    """
    fs = _SyncRecorder()
    store = syncstore.open(store_path, durability="none", fs=fs)
    sent = [store.deliver(Message(1, 1, seq, b"m%d" % seq), to=[1, 2]) for seq in range(3)]
    fs.abandoning = True
    store._abandon()
    fs.abandoning = False
    assert not fs.during_abandon, f"_abandon() let {fs.during_abandon} fdatasync the WAL (and apply it to LMDB) after the 'kill'"
    with syncstore.open(store_path, durability="none") as store:
        assert [m.msg_id for m in store.sync(2).messages] == [d.msg_id for d in sent]
        store.check()
