"""Where WAL replay on open spends its time: wall and CPU seconds per phase of ``syncstore.open``.

    .venv/bin/python tools/replay_phases.py                      # 200,000 records, 5 opens
    .venv/bin/python tools/replay_phases.py --records 20000 --opens 3 --markdown

The workload is ``bench/test_bench_replay.py``'s: 1:1 messages among 1,000
users, 200-byte bodies, written with ``deliver_many`` into one 256 MiB
segment; the store is closed and each open gets a fresh copy of its ``wal/``
and marker (no ``state/``), so every record is replayed.  The phases are
timed by wrapping the functions that do them (no profiler, so no profiler
overhead): recovery (reading the newest segment, the CRC/LSN scan, the replay
check it hands each segment to), making the log durable (``WriteAheadLog.start``),
then the replay: decoding, ``State.apply``'s encoding (``_encode_batch``), its
LMDB transaction (puts and commit), and what ``apply`` does besides (freeing
the batch's items).  ``wall - cpu`` is time spent waiting (``fsync``s).  The
machine's timings are noisy: compare runs made back to back (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import syncstore
from syncstore import Message, _codec, _open, state, wal

USERS = 1_000
BODY = 200
SEGMENT_BYTES = 256 << 20


class Phases:
    """Wall and CPU seconds per phase, summed over the opens."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = {}

    def timed(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def call(*args: Any, **kwargs: Any) -> Any:
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return function(*args, **kwargs)
            finally:
                spent = self.seconds.setdefault(name, [0.0, 0.0])
                spent[0] += time.perf_counter() - wall
                spent[1] += time.process_time() - cpu

        return call

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Wrap the phase functions (module attributes, looked up at call time) while in the ``with``; rows in this order."""
        targets = [
            (wal.WriteAheadLog, "recover", "recovery (with the replay check)"),
            (wal.WriteAheadLog, "_read_last", "  read the newest segment"),
            (_codec, "scan_frames", "  CRC and LSN scan"),
            (_open._ReplayCheck, "__call__", "  replay check (pairs, cursor density)"),
            (wal.WriteAheadLog, "start", "WAL made durable (start: fsync)"),
            (_open, "_replay", "replay"),
            (_codec, "decode_frames", "  decode (decode_frames)"),
            (state.State, "apply", "  State.apply"),
            (state, "_encode_batch", "    encode (_encode_batch)"),
            (state.State, "_write", "    LMDB transaction (puts, commit)"),
        ]
        saved = [(owner, attribute, owner.__dict__[attribute]) for owner, attribute, _name in targets]
        try:
            for owner, attribute, name in targets:
                self.seconds.setdefault(name, [0.0, 0.0])
                original = owner.__dict__[attribute]
                if isinstance(original, classmethod):
                    setattr(owner, attribute, classmethod(self.timed(name, original.__func__)))
                else:
                    setattr(owner, attribute, self.timed(name, original))
            yield
        finally:
            for owner, attribute, original in saved:
                setattr(owner, attribute, original)


def fill(source: str, records: int, segment_bytes: int = SEGMENT_BYTES) -> None:
    """The benchmark's store: ``records`` 1:1 messages among USERS users (in one WAL segment, if it holds them)."""
    rng = random.Random(3)
    body = bytes(rng.randrange(256) for _ in range(BODY))
    with syncstore.open(source, segment_bytes=segment_bytes) as store:
        for start in range(0, records, 1_000):
            batch = []
            for seq in range(start + 1, min(records, start + 1_000) + 1):
                sender = rng.randrange(USERS)
                recipient = (sender + 1 + rng.randrange(USERS - 1)) % USERS
                conv = min(sender, recipient) * USERS + max(sender, recipient)
                batch.append((Message(sender, conv, seq, body), (sender, recipient)))
            store.deliver_many(batch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000, help="records in the log (default 200,000, the benchmark's)")
    parser.add_argument("--opens", type=int, default=5, help="opens to time (default 5); the table shows the mean per open")
    parser.add_argument("--segment-bytes", type=int, default=SEGMENT_BYTES, help="WAL segment size (default 256 MiB, the benchmark's)")
    parser.add_argument("--dir", help="work directory (default: a new temporary one, removed at the end)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)
    work = args.dir or tempfile.mkdtemp(prefix="replay-phases-")
    os.makedirs(work, exist_ok=True)
    os.chmod(work, 0o700)
    try:
        source = os.path.join(work, "source")
        fill(source, args.records, args.segment_bytes)
        phases = Phases()
        totals = [0.0, 0.0]
        for round_ in range(args.opens):
            target = os.path.join(work, f"open{round_}")
            os.makedirs(target, mode=0o700)  # private, as a store must be
            shutil.copytree(os.path.join(source, "wal"), os.path.join(target, "wal"))
            shutil.copy2(os.path.join(source, "SYNCSTORE"), target)
            with phases.installed():
                wall, cpu = time.perf_counter(), time.process_time()
                store = syncstore.open(target, segment_bytes=args.segment_bytes)
                totals[0] += time.perf_counter() - wall
                totals[1] += time.process_time() - cpu
            store.close()
            shutil.rmtree(target)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    rows = [(name, wall / args.opens, cpu / args.opens) for name, (wall, cpu) in phases.seconds.items()]
    rows.append(("open, in all", totals[0] / args.opens, totals[1] / args.opens))
    rate = args.records / (totals[0] / args.opens)
    if args.markdown:
        print("| phase | wall s | CPU s | µs per record (wall) |\n|---|---:|---:|---:|")
        for name, wall_s, cpu_s in rows:
            print(f"| {name.strip()} | {wall_s:.3f} | {cpu_s:.3f} | {wall_s / args.records * 1e6:.2f} |")
    else:
        print(f"{'phase (mean per open)':42s} {'wall s':>8s} {'CPU s':>8s} {'us/record':>10s}")
        for name, wall_s, cpu_s in rows:
            print(f"{name:42s} {wall_s:8.3f} {cpu_s:8.3f} {wall_s / args.records * 1e6:10.2f}")
    print(f"{args.records:,} records, {args.opens} opens: {rate:,.0f} records/s (wall), {args.records / (totals[1] / args.opens):,.0f} per CPU second")
    return 0


if __name__ == "__main__":
    sys.exit(main())
