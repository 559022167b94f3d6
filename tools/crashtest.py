#!/usr/bin/env python3
"""Crash harness: SIGKILL a syncstore writer process at random points and verify after each kill.

    python tools/crashtest.py [--kills N] [--path DIR] [--seed S] [--durability sync]

Each round spawns a *writer* process (this file with ``--writer``) on the same
store directory.  The writer runs a realistic IM workload from several threads
(1:1 and group messages, retries of earlier client_seqs, ``deliver_many``
batches) and writes one line per completed delivery to its stdout (a pipe to
this process), flushed immediately::

    A <sender> <client_seq> <msg_id> <duplicate 0|1> <uid>:<cursor>,<uid>:<cursor>...

The parent reads a random number of those acknowledgements (or only the
writer's "opening" line, to kill it inside recovery), SIGKILLs it, drains what
is left in the pipe, and verifies the store:

* it opens (recovering from the WAL) and ``check()`` passes;
* every user's cursors are exactly 1..head, pages are well formed;
* every acknowledged delivery is there exactly once per recipient, at its
  acknowledged cursor, with its msg_id and content;
* no phantom or half-applied message: every stored message's content and
  recipient set match what its writer sent, under one msg_id;
* retries (within a run, or of keys from earlier runs) came back
  ``duplicate=True`` with the first delivery's msg_id and cursors, and a key
  is never delivered twice -- also when its first delivery was never
  acknowledged but survived the crash.

Verification runs either on the store itself (so the next writer opens an
already recovered store) or on a copy (so the next writer performs recovery,
and may be killed inside it).  Every message's content and recipients derive
from its key ``(sender, client_seq)`` alone, so messages whose
acknowledgement was lost can be verified too.

The writer and verifier are also used by ``tests/test_crash.py``.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

try:
    import syncstore
except ImportError:  # run from a source checkout without PYTHONPATH
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import syncstore

from syncstore import Message
from syncstore._ids import msg_id_ms

# --- the workload: everything about a message derives from its key -----------------

USERS = 24
GROUPS = ((0, 1, 2), (3, 4, 5, 6, 7), (8, 9, 10, 11, 12, 13, 14, 15), (16, 18, 20, 22), (1, 5, 9, 13, 17, 21))
WRITER_THREADS = 4
RUN_SPAN = 1_000_000  # run r uses client_seqs (r + 1) * RUN_SPAN + 1 ...
SEGMENT_CHOICES = (4096, 16_384, 1 << 20, 64 << 20)  # small ones force WAL rotation and retirement
WRITER_MAX_SECONDS = 120.0  # a writer nobody kills gives up (and the parent reports it)
WATCHDOG_SECONDS = 60.0  # a writer that stops acknowledging is killed and reported

#: What recovery logs when it had real work: counted to show the kills hit those paths.
RECOVERY_EVENTS = {
    "replayed WAL records": "verifier opens that replayed the WAL",
    "truncating torn WAL tail": "torn tails truncated",
    "removing incomplete WAL segment": "incomplete segments removed",
}

Key = tuple[int, int]
Pairs = tuple[tuple[int, int], ...]  # sorted (uid, cursor)


@dataclass(frozen=True)
class Spec:
    """What the writer sends for a key, every time (retries included)."""

    message: Message
    to: tuple[int, ...]  # as passed to deliver (may repeat a user)
    recipients: frozenset[int]


@functools.lru_cache(maxsize=1 << 17)
def spec_for(sender: int, client_seq: int) -> Spec:
    """The message (and recipients) a client sends as ``(sender, client_seq)``."""
    rng = random.Random(f"syncstore-crash/{sender}/{client_seq}")
    if rng.random() < 0.7:  # 1:1 message; the sender's own devices get a copy
        peer = rng.choice([u for u in range(USERS) if u != sender])
        to: tuple[int, ...] = (sender, peer)
        if rng.random() < 0.05:
            to = (peer, sender, peer)  # repeated recipient counts once
        conv = 10_000 + min(sender, peer) * USERS + max(sender, peer)
    else:  # group message
        index = rng.randrange(len(GROUPS))
        to = tuple(dict.fromkeys((*GROUPS[index], sender)))
        conv = 1 + index
    body = b"%d:%d:" % (sender, client_seq) + rng.randbytes(rng.choice((0, 8, 40, 300)))
    ts_ms = None if rng.random() < 0.5 else 1_700_000_000_000 + client_seq
    message = Message(sender, conv, client_seq, body, ts_ms=ts_ms, priority=rng.randrange(3))
    return Spec(message, to, frozenset(to))


# --- the writer process ---------------------------------------------------------------


def _format_ack(key: Key, delivery: syncstore.Delivery) -> str:
    pairs = ",".join(f"{uid}:{cursor}" for uid, cursor in delivery.cursors.items())
    return f"A {key[0]} {key[1]} {delivery.msg_id} {int(delivery.duplicate)} {pairs}\n"


def writer_main() -> None:
    """Run the workload until killed; configuration comes as one JSON line on stdin."""
    config = json.loads(sys.stdin.readline())
    out_lock = threading.Lock()

    def emit(text: str) -> None:
        data = text.encode()
        with out_lock:
            while data:
                data = data[os.write(1, data) :]

    def die(what: str, error: BaseException) -> None:
        try:
            emit(f"E {what}: {error!r}\n".replace("\n", " ").rstrip() + "\n")
        finally:
            os._exit(2)

    emit("O\n")  # opening: a kill now lands in recovery
    try:
        store = syncstore.open(config["path"], durability=config["durability"], segment_bytes=config["segment_bytes"])
    except BaseException as error:  # noqa: BLE001 - reported to the parent
        die("open", error)
    emit("R\n")
    deadline = time.monotonic() + config.get("max_seconds", WRITER_MAX_SECONDS)
    retry_pool = [tuple(k) for k in config["retry"]]
    base = config["base"]

    def work(index: int) -> None:
        rng = random.Random(f"{config['seed']}/{config['run']}/{index}")
        senders = [u for u in range(USERS) if u % WRITER_THREADS == index]
        next_seq = dict.fromkeys(senders, base)
        mine: list[Key] = []  # keys this thread saw acknowledged in this run

        def new_key() -> Key:
            sender = rng.choice(senders)
            next_seq[sender] += 1
            return sender, next_seq[sender]

        def old_key() -> Key | None:
            if retry_pool and (not mine or rng.random() < 0.5):
                return rng.choice(retry_pool)
            return rng.choice(mine) if mine else None

        try:
            while time.monotonic() < deadline:
                roll = rng.random()
                if roll < 0.15:
                    key = old_key() or new_key()
                    spec = spec_for(*key)
                    emit(_format_ack(key, store.deliver(spec.message, spec.to)))
                    mine.append(key)
                elif roll < 0.3:
                    keys = [new_key() for _ in range(rng.randrange(2, 9))]
                    if rng.random() < 0.3:
                        keys.append(rng.choice(keys))  # the same key twice in one batch
                    if rng.random() < 0.3 and (extra := old_key()) is not None:
                        keys.insert(rng.randrange(len(keys) + 1), extra)
                    results = store.deliver_many([(spec_for(*k).message, spec_for(*k).to) for k in keys])
                    emit("".join(_format_ack(k, d) for k, d in zip(keys, results)))
                    mine.extend(keys)
                else:
                    key = new_key()
                    spec = spec_for(*key)
                    emit(_format_ack(key, store.deliver(spec.message, spec.to)))
                    mine.append(key)
        except BrokenPipeError:
            os._exit(3)  # the parent is gone
        except BaseException as error:  # noqa: BLE001 - reported to the parent
            die("deliver", error)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(WRITER_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    emit("X writer ran out of time without being killed\n")
    os._exit(4)


# --- the parent: kill, verify, repeat -------------------------------------------------


@dataclass(frozen=True)
class Ack:
    key: Key
    msg_id: int
    duplicate: bool
    pairs: Pairs


def parse_ack(line: str) -> Ack:
    """Parse one ``A ...`` line of the writer."""
    _tag, sender, seq, msg_id, dup, pairs = line.split(" ")
    cursors = tuple(sorted((int(u), int(c)) for u, c in (p.split(":") for p in pairs.split(","))))
    return Ack((int(sender), int(seq)), int(msg_id), dup == "1", cursors)


def child_env() -> dict[str, str]:
    """This process's environment, with the imported syncstore importable in the child too."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(syncstore.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


@dataclass
class Harness:
    """Runs writer rounds against one store directory and keeps what was acknowledged."""

    path: str
    seed: int
    durability: str = "sync"
    max_acks: int = 600
    verbose: bool = False
    rng: random.Random = field(init=False)
    #: key -> (msg_id, sorted cursor pairs) of its first delivery: acknowledged, or found in the store
    known: dict[Key, tuple[int, Pairs]] = field(default_factory=dict)
    acked: set[Key] = field(default_factory=set)  # keys with an acknowledgement
    delivered: set[Key] = field(default_factory=set)  # keys whose first delivery happened (no second one allowed)
    max_seq: dict[int, int] = field(default_factory=dict)  # sender -> largest acknowledged client_seq of the last run
    failures: list[str] = field(default_factory=list)
    kills: int = 0
    early_kills: int = 0
    ack_lines: int = 0
    acks_verified: int = 0  # acknowledged writes checked, summed over verifications
    runs: int = 0
    recovery_events: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def note_recovery(self, text: str) -> None:
        for marker, name in RECOVERY_EVENTS.items():
            if (count := text.count(marker)):
                self.recovery_events[name] = self.recovery_events.get(name, 0) + count

    def fail(self, text: str) -> None:
        self.failures.append(f"round {self.runs}: {text}")

    # --- one round -------------------------------------------------------------------

    def round(self) -> None:
        """Spawn a writer, kill it at a random point, verify.  Failures go to ``self.failures``."""
        run = self.runs
        self.runs += 1
        retry = self._retry_keys(run)
        config = {
            "path": self.path,
            "durability": self.durability,
            "seed": self.seed,
            "run": run,
            "base": (run + 1) * RUN_SPAN,
            "retry": retry,
            "segment_bytes": self.rng.choice(SEGMENT_CHOICES),
        }
        roll = self.rng.random()
        if roll < 0.08:
            target = -1  # kill as soon as the writer starts opening (recovery)
        elif roll < 0.12:
            target = 0  # kill once it is open, before any acknowledgement
        else:  # log-uniform: many short runs, some long ones
            target = int(math.exp(self.rng.uniform(0, math.log(self.max_acks))))
        lines, killed, stderr = self._run_writer(config, target)
        self.kills += killed
        self.early_kills += killed and target < 0
        acks = self._absorb(lines, run)
        if not killed:
            self.fail(f"writer exited before it was killed (target {target} acks, got {len(acks)}): {stderr[-2000:]}")
        if not self.failures:
            self.verify(in_place=self.rng.random() < 0.5)

    def _retry_keys(self, run: int) -> list[Key]:
        """Keys the next writer retries: known ones (must be duplicates) and the last run's frontier."""
        keys = self.rng.sample(sorted(self.known), min(48, len(self.known)))
        # Keys just past the last acknowledged one: their first delivery may have been in
        # flight at the kill (then they are in the store, hence in known) or not.
        for sender, seq in self.max_seq.items():
            if self.rng.random() < 0.3:
                keys.append((sender, seq + 1))
        self.max_seq = {}
        return keys

    def _run_writer(self, config: dict, target: int) -> tuple[list[str], bool, str]:
        with tempfile.TemporaryFile() as errfile:
            proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--writer"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errfile,
                env=child_env(),
            )
            hung = threading.Event()

            def watchdog() -> None:
                hung.set()
                proc.kill()

            timer = threading.Timer(WATCHDOG_SECONDS, watchdog)
            timer.start()
            lines: list[str] = []
            killed = False
            try:
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write(json.dumps(config).encode() + b"\n")
                proc.stdin.close()
                acks = 0
                for raw in proc.stdout:
                    if not raw.endswith(b"\n"):
                        break  # a torn last line: the kill interrupted it
                    line = raw.decode().rstrip("\n")
                    lines.append(line)
                    if line.startswith("A "):
                        acks += 1
                    if not killed and (
                        (target < 0 and line == "O") or (target == 0 and line == "R") or (target > 0 and acks >= target)
                    ):
                        os.kill(proc.pid, signal.SIGKILL)
                        killed = True
                    # after the kill: keep draining what the writer wrote before it died
                rc = proc.wait()
            finally:
                timer.cancel()
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            errfile.seek(0)
            stderr = errfile.read().decode("utf-8", "replace")
        self.note_recovery(stderr)
        if hung.is_set():
            self.fail(f"writer hung: no progress for {WATCHDOG_SECONDS} s (config {config['run']}); stderr: {stderr[-2000:]}")
            return lines, False, stderr
        if killed and rc != -signal.SIGKILL:
            killed = False  # it died of something else first
        for line in lines:
            if line.startswith(("E ", "X ")):
                self.fail(f"writer reported: {line[2:]}")
        return lines, killed, stderr

    def _absorb(self, lines: list[str], run: int) -> list[Ack]:
        """Check the acknowledgements of one run against each other and against ``known``."""
        acks = [parse_ack(line) for line in lines if line.startswith("A ")]
        self.ack_lines += len(acks)
        for ack in acks:
            key = ack.key
            expected_recipients = spec_for(*key).recipients
            if {uid for uid, _ in ack.pairs} != expected_recipients:
                self.fail(f"ack for {key} names recipients {ack.pairs}, sent to {sorted(expected_recipients)}")
            first = self.known.get(key)
            if first is None:
                self.known[key] = (ack.msg_id, ack.pairs)
            elif first != (ack.msg_id, ack.pairs):
                self.fail(f"key {key} acknowledged as msg_id {ack.msg_id} cursors {ack.pairs}, earlier as {first[0]} {first[1]}")
            if not ack.duplicate:
                if key in self.delivered:
                    self.fail(f"key {key} delivered a second time (duplicate=False), msg_id {ack.msg_id} {ack.pairs}")
                self.delivered.add(key)
            self.acked.add(key)
            if key[1] > (run + 1) * RUN_SPAN:  # a key of this run
                self.max_seq[key[0]] = max(self.max_seq.get(key[0], 0), key[1])
        return acks

    # --- verification ------------------------------------------------------------------

    def verify(self, in_place: bool) -> None:
        """Open the store (or a copy of it), check it against everything known, close it."""
        target = self.path
        if not in_place:
            target = self.path + ".verify"
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(self.path, target)
        try:
            try:
                store = syncstore.open(target, durability=self.durability)
            except syncstore.SyncStoreError as error:
                self.fail(f"open after kill failed: {error}")
                return
            try:
                self._verify_open(store)
            finally:
                store.close()
        finally:
            if not in_place:
                shutil.rmtree(target, ignore_errors=True)

    def _verify_open(self, store: syncstore.Store) -> None:
        try:
            store.check()
        except syncstore.CorruptionError as error:
            self.fail(f"check() after recovery: {error}")
        found: dict[Key, dict[int, tuple[int, int]]] = {}  # key -> uid -> (cursor, msg_id)
        for uid in range(USERS):
            head = store.head(uid)
            since, cursors = 0, []
            while True:
                limit = self.rng.choice((1, 5, 64, 1000))
                page = store.sync(uid, since=since, limit=limit)
                got = [m.cursor for m in page.messages]
                if got != list(range(since + 1, since + 1 + len(got))) or len(got) > limit:
                    self.fail(f"user {uid}: sync(since={since}, limit={limit}) returned cursors {got[:10]}...")
                    return
                if page.next != (got[-1] if got else since):
                    self.fail(f"user {uid}: page.next {page.next} after cursors ending {got[-1:]} (since {since})")
                for m in page.messages:
                    self._check_message(uid, m, found)
                cursors.extend(got)
                if not page.has_more:
                    break
                if not got:
                    self.fail(f"user {uid}: has_more with an empty page at since={since}")
                    return
                since = page.next
            if cursors != list(range(1, head + 1)):
                self.fail(f"user {uid}: head {head} but cursors {cursors[:5]}..{cursors[-5:]} ({len(cursors)} messages)")
        for key, where in found.items():
            ids = {msg_id for _cursor, msg_id in where.values()}
            recipients = spec_for(*key).recipients
            if len(ids) != 1 or set(where) != recipients:
                self.fail(f"key {key}: stored for users {sorted(where)} with msg_ids {sorted(ids)}; sent to {sorted(recipients)}")
                continue
            pairs = tuple(sorted((uid, cursor) for uid, (cursor, _) in where.items()))
            first = self.known.get(key)
            if first is None:  # survived the crash without an acknowledgement: fine, now it must stay
                if not (RUN_SPAN < key[1] <= (self.runs + 1) * RUN_SPAN):
                    self.fail(f"phantom message {key} in the store")
                self.known[key] = (ids.pop(), pairs)
                self.delivered.add(key)
            elif first != (ids.pop(), pairs):
                self.fail(f"key {key}: acknowledged as msg_id {first[0]} cursors {first[1]}, stored as {sorted(where.items())}")
        missing = [key for key in self.known if key not in found]
        for key in missing[:20]:
            what = "acknowledged" if key in self.acked else "recovered earlier"
            self.fail(f"{what} key {key} (msg_id {self.known[key][0]}, cursors {self.known[key][1]}) is missing")
        self.acks_verified += sum(1 for key in self.acked if key in found)
        try:
            store.check()
        except syncstore.CorruptionError as error:
            self.fail(f"check() after reading: {error}")

    def _check_message(self, uid: int, m: syncstore.StoredMessage, found: dict[Key, dict[int, tuple[int, int]]]) -> None:
        key = (m.sender, m.client_seq)
        spec = spec_for(*key)
        sent = spec.message
        ts = msg_id_ms(m.msg_id) if sent.ts_ms is None else sent.ts_ms
        if (m.conv, m.body, m.priority, m.ts_ms) != (sent.conv, sent.body, sent.priority, ts):
            self.fail(f"user {uid} cursor {m.cursor}: message {key} stored as {m!r}, sent as {sent!r}")
        where = found.setdefault(key, {})
        if uid in where:
            self.fail(f"user {uid}: key {key} stored twice, at cursors {where[uid][0]} and {m.cursor}")
        where[uid] = (m.cursor, m.msg_id)


class _RecoveryLog(logging.Handler):
    """Counts the recovery events of the stores this process opens (the verifier's)."""

    def __init__(self, harness: Harness) -> None:
        super().__init__(logging.INFO)
        self.harness = harness

    def emit(self, record: logging.LogRecord) -> None:
        self.harness.note_recovery(record.getMessage())


def run(kills: int, path: str, seed: int, durability: str = "sync", progress: bool = False, max_acks: int = 600) -> Harness:
    """Kill a writer ``kills`` times on the store at ``path``; stop at the first failing round."""
    harness = Harness(path, seed, durability, max_acks=max_acks)
    handler = _RecoveryLog(harness)
    logger = logging.getLogger("syncstore")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    # On a terminal one line redrawn in place; in a log file a plain line every tenth of the run.
    terminal = sys.stderr.isatty()
    every = max(1, kills // 10)
    try:
        while harness.kills < kills and not harness.failures:
            harness.round()
            if progress and (terminal or harness.kills % every == 0 or harness.kills == kills):
                line = f"kills {harness.kills}/{kills}  acks {harness.ack_lines}  keys {len(harness.known)}  failures {len(harness.failures)}"
                sys.stderr.write(f"\r{line} " if terminal else line + "\n")
                sys.stderr.flush()
            if harness.runs > 2 * kills + 10:
                harness.fail(f"only {harness.kills} kills in {harness.runs} rounds")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    if progress and terminal:
        sys.stderr.write("\n")
    return harness


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--writer"]:
        writer_main()
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=100, help="how many times to SIGKILL the writer (default 100)")
    parser.add_argument("--path", help="store directory (must not exist or be empty; default: a temp dir)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    parser.add_argument("--durability", default="sync", choices=syncstore.DURABILITY_MODES)
    parser.add_argument("--max-acks", type=int, default=600, help="largest number of acknowledgements before a kill")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    owned = args.path is None
    base = tempfile.mkdtemp(prefix="syncstore-crash-") if owned else os.path.abspath(args.path)
    path = os.path.join(base, "store") if owned else base
    if not owned and os.path.exists(path) and os.listdir(path):
        parser.error(f"{path} is not empty: the harness must know every acknowledged write of its store")
    print(f"crashtest: seed {seed}, durability {args.durability}, store {path}", file=sys.stderr)
    started = time.monotonic()
    harness = run(args.kills, path, seed, args.durability, progress=True, max_acks=args.max_acks)
    print(f"kills: {harness.kills} ({harness.early_kills} during open/recovery)")
    print(
        f"acknowledged writes checked: {harness.ack_lines} acks of {len(harness.acked)} distinct keys"
        f" (each re-verified after every later kill: {harness.acks_verified} checks)"
    )
    print(f"messages in store: {len(harness.known)} keys ({len(harness.known) - len(harness.acked)} recovered without an ack)")
    events = ", ".join(f"{n} {name}" for name, n in sorted(harness.recovery_events.items())) or "none logged"
    print(f"recovery work seen: {events}")
    print(f"failures: {len(harness.failures)}")
    for failure in harness.failures[:50]:
        print(f"  {failure}")
    print(f"time: {time.monotonic() - started:.1f} s, seed {seed}")
    if harness.failures:
        print(f"store kept for inspection: {path}")
        return 1
    if owned:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
