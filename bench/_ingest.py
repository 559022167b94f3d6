"""Memory probe, run as a child process: ingest messages with ``deliver_many`` and report RSS as JSON.

    python bench/_ingest.py --path DIR --messages 2000000 --users 1000000

Messages are 1:1 (``to=[sender, recipient]``, random users), 200-byte
bodies, built batch by batch so the driver itself holds little memory.
Prints one JSON object: ``ru_maxrss`` (peak resident set, which counts the
LMDB pages mapped into the process), ``RssAnon``/``RssFile`` at the end and
their peaks sampled every 50 ms, all in KiB, plus the time taken.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import threading
import time

import syncstore
from syncstore import Message

BATCH = 10_000


def status_kb(*names: str) -> dict[str, int]:
    """Fields (in kB) of /proc/self/status."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in names:
                out[key] = int(rest.split()[0])
    return out


def main(argv: list[str] | None = None) -> int:
    """Ingest, then print the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", required=True)
    parser.add_argument("--messages", type=int, required=True)
    parser.add_argument("--users", type=int, required=True)
    parser.add_argument("--body", type=int, default=200)
    args = parser.parse_args(argv)
    peaks = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            for key, value in status_kb("RssAnon", "RssFile").items():
                peaks[key] = max(peaks[key], value)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rng = random.Random(1)
    body = bytes(rng.randrange(256) for _ in range(args.body))
    users = args.users
    start = time.perf_counter()
    with syncstore.open(args.path, durability="sync") as store:
        for first in range(0, args.messages, BATCH):
            batch = []
            for seq in range(first, min(first + BATCH, args.messages)):
                sender = rng.randrange(users)
                recipient = (sender + 1 + rng.randrange(users - 1)) % users
                batch.append((Message(sender, 1, seq, body), (sender, recipient)))
            store.deliver_many(batch)
        ingest_seconds = time.perf_counter() - start
        at_end = status_kb("RssAnon", "RssFile", "VmHWM")
    done.set()
    sampler.join()
    for key in peaks:
        peaks[key] = max(peaks[key], at_end[key])
    report = {
        "messages": args.messages,
        "users": users,
        "seconds": time.perf_counter() - start,
        "ingest_seconds": ingest_seconds,
        "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "rss_anon_end_kb": at_end["RssAnon"],
        "rss_file_end_kb": at_end["RssFile"],
        "peak_rss_anon_kb": peaks["RssAnon"],
        "peak_rss_file_kb": peaks["RssFile"],
        "state_bytes": sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(os.path.join(args.path, "state")) for n in ns),
    }
    json.dump(report, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
