"""SIGKILL a real follower process while it applies its leader's changes; it resumes and converges.

Every ``apply_changes`` that returned (the child prints its ``lsn`` then) is
durable: after the kill, reopening the follower shows at least that LSN, its
state checks itself, and applying the rest of the leader's log from its own
``lsn`` makes it equal the leader, item for item.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys

import syncstore
from syncstore import Message
from test_changelog import dump

CHILD = r"""
import sys, itertools, syncstore
leader_path, follower_path, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
leader = syncstore.open(leader_path, readonly=True)
follower = syncstore.open(follower_path, follower=True, durability=sys.argv[4])
while follower.lsn < leader.lsn:
    follower.apply_changes(list(itertools.islice(leader.changes(since=follower.lsn), batch)))
    print(follower.lsn, flush=True)
print("done", flush=True)
"""


def test_a_follower_killed_while_applying_resumes_from_its_own_lsn_and_equals_the_leader(tmp_path):
    rng = random.Random(int(os.environ.get("SYNCSTORE_CRASH_SEED", random.SystemRandom().randrange(2**32))))
    leader_path, follower_path = str(tmp_path / "leader"), str(tmp_path / "follower")
    with syncstore.open(leader_path, durability="none") as leader:
        for start in range(0, 3_000, 100):
            leader.deliver_many(
                [(Message(sender=seq % 17, conv=seq % 5, client_seq=seq, body=b"m%d" % seq), [seq % 40, 40 + seq % 3]) for seq in range(start, start + 100)]
            )
    kills = 0
    acked = 0
    while kills < 12:
        durability = rng.choice(["sync", "interval", "none"])
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, leader_path, follower_path, str(rng.choice([7, 50, 400])), durability],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        wait_for = rng.randint(1, 6)
        done = False
        for _ in range(wait_for):
            line = child.stdout.readline().strip()
            if line == "done" or not line:
                done = True
                break
            acked = int(line)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()
        kills += 1
        with syncstore.open(follower_path, follower=True) as follower:
            assert follower.lsn >= acked, f"an applied batch up to {acked} was lost (follower at {follower.lsn})"
            follower.check()
        if done:
            break
    with syncstore.open(leader_path, readonly=True) as leader, syncstore.open(follower_path, follower=True) as follower:
        follower.apply_changes(leader.changes(since=follower.lsn))
        assert follower.lsn == leader.lsn == 3_000
    assert dump(follower_path) == dump(leader_path)


BOOTSTRAP_CHILD = r"""
import struct, sys, syncstore
events_path, follower_path = sys.argv[1], sys.argv[2]
data = open(events_path, "rb").read()
follower = syncstore.open(follower_path, follower=True)
at, index = 0, 0
while at < len(data):
    (size,) = struct.unpack_from(">I", data, at)
    event = syncstore.decode_event(data[at + 4 : at + 4 + size])
    at += 4 + size
    if isinstance(event, syncstore.SnapshotChunk) and follower.lsn > 0:
        continue  # bootstrapped already: only the changes after it
    follower.apply(event)
    print(index, flush=True)
    index += 1
follower.close()
print("done", flush=True)
"""


def test_a_follower_killed_while_bootstrapping_from_a_feed_starts_over_and_never_shows_half_a_snapshot(tmp_path):
    from test_feed import _leader_with_a_chain

    rng = random.Random(int(os.environ.get("SYNCSTORE_CRASH_SEED", random.SystemRandom().randrange(2**32))))
    leader, _snapdir = _leader_with_a_chain(tmp_path, snapshots=4)
    events = [event.encode() for event in leader.feed(0)]
    snapshot_lsn, leader_lsn = syncstore.decode_event(events[0]).snapshot_lsn, leader.lsn
    leader.close()
    events_path = str(tmp_path / "events")
    with open(events_path, "wb") as f:  # the transport: a file of length-prefixed events
        for data in events:
            f.write(len(data).to_bytes(4, "big") + data)
    follower_path = str(tmp_path / "follower")
    for _kill in range(8):
        child = subprocess.Popen([sys.executable, "-c", BOOTSTRAP_CHILD, events_path, follower_path], stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        for _ in range(rng.randint(0, 6)):
            if child.stdout.readline().strip() in ("done", ""):
                break
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()
        with syncstore.open(follower_path, follower=True) as follower:
            lsn = follower.lsn
            counts = follower.check()
            assert lsn == 0 and counts["inbox_entries"] == 0 or lsn >= snapshot_lsn, f"half a snapshot shown: lsn {lsn}, {counts}"
    finished = subprocess.run([sys.executable, "-c", BOOTSTRAP_CHILD, events_path, follower_path], capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0 and finished.stdout.strip().endswith("done"), finished.stderr
    with syncstore.open(follower_path, follower=True) as follower:
        assert follower.lsn == leader_lsn
    assert dump(follower_path) == dump(str(tmp_path / "leader"))
