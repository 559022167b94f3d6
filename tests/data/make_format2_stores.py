"""Write the format-2 test stores (tests/data/format2-stores-c17a0e9.tar.gz) with the syncstore of commit c17a0e9.

    git worktree add /tmp/old c17a0e9
    PYTHONPATH=/tmp/old python tests/data/make_format2_stores.py OUT_DIR
    tar czf tests/data/format2-stores-c17a0e9.tar.gz -C OUT_DIR .

State format 2 kept a copy of the message in every recipient's inbox entry.
Two stores, each with ``expected.json``: what ``sync`` returned for every
user, and the Delivery of every idempotency key, before the store was closed
(or killed) -- what the migrated store must still answer.

- ``format2-closed``: 1:1 messages among users 1..30, group messages to
  users 1..12 (conv 500), priorities 0..3, retried sends; closed cleanly.
- ``format2-crashed``: the same workload, then SIGKILLed before closing, so
  the WAL tail may be unapplied (durability "sync": all of it acknowledged).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys

import syncstore
from syncstore import Message
from syncstore.state import STATE_FORMAT

CLOCK_MS = 1_800_000_000_000


def workload(store: syncstore.Store) -> dict:
    rng = random.Random(2)
    keys = {}
    for seq in range(1, 201):
        sender = rng.randint(1, 30)
        if seq % 5 == 0:
            to, conv = list(range(1, 13)), 500
        else:
            peer = rng.choice([u for u in range(1, 31) if u != sender])
            to, conv = [sender, peer], 1000 + min(sender, peer) * 100 + max(sender, peer)
        message = Message(sender, conv, seq, (b"body %d " % seq) * rng.randint(0, 30) + bytes([rng.randrange(256)]), priority=seq % 4)
        delivery = store.deliver(message, to=to)
        if seq % 7 == 0:
            assert store.deliver(message, to=to).duplicate
        keys[f"{sender},{seq}"] = {"msg_id": delivery.msg_id, "cursors": {str(k): v for k, v in delivery.cursors.items()}}
    inboxes = {str(uid): [[*m[:7], m.body.hex()] for m in store.sync(uid, limit=10_000).messages] for uid in range(1, 31)}
    return {"keys": keys, "inboxes": inboxes}


def write(path: str) -> None:
    with syncstore.open(path, clock_ms=lambda: CLOCK_MS, dedup_window_ms=2**40, segment_bytes=65_536) as store:
        expected = workload(store)
    with open(os.path.join(path, "expected.json"), "w") as out:
        json.dump(expected, out)


def write_and_die(path: str) -> None:
    store = syncstore.open(path, clock_ms=lambda: CLOCK_MS, dedup_window_ms=2**40, segment_bytes=65_536)
    expected = workload(store)
    with open(os.path.join(path, "expected.json"), "w") as out:
        json.dump(expected, out)
    print("ready", flush=True)
    sys.stdin.read()  # the parent SIGKILLs us here


def main() -> None:
    assert STATE_FORMAT == 2, "run this with the syncstore of commit c17a0e9 (see the docstring)"
    if sys.argv[1] == "--child":
        write_and_die(sys.argv[2])
        return
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    write(os.path.join(out, "format2-closed"))
    child = subprocess.Popen([sys.executable, __file__, "--child", os.path.join(out, "format2-crashed")], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdout is not None and child.stdout.readline().strip() == b"ready"
    child.send_signal(signal.SIGKILL)
    child.wait()
    with open(os.path.join(out, "README.txt"), "w") as readme:
        readme.write(__doc__ or "")


if __name__ == "__main__":
    main()
