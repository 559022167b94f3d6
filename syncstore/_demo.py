"""The ``syncstore demo`` workload: a simulated IM server on an embedded store.

:func:`run_demo` plays a deterministic (seeded) day in the life of a small
messaging server and checks the store got every bit of it right:

1. *Plan.*  ``users`` users, groups of 3-50 members, ``messages`` sends
   (1:1 and group), each with its ``(sender, client_seq)`` idempotency key.
   Every message also goes to its sender's own inbox (their other devices).
2. *Deliver, first half.*  ``threads`` sender threads call ``deliver`` with
   ``durability="sync"``; each sender belongs to one thread, so its sends are
   sequential.  Some sends are retried at once with the same key (a lost
   ack), some later (after the restart); every retry must come back
   ``duplicate=True`` with the first delivery's msg_id and cursors.
   Meanwhile a client thread lets random users reconnect and catch up by
   cursor, in pages of 50, while the writes go on.
3. *Restart.*  Close the store, reopen it, carry on.
4. *Deliver, second half*, then the late retries.
5. *Catch up.*  Every client reconnects and reads from its last cursor until
   ``has_more`` is false.
6. *Verify.*  Every client holds exactly the messages the plan addressed to
   it: dense cursors 1..n, each message once, each sender's messages in send
   order, bodies intact, cursors equal to those ``deliver`` returned, heads
   matching.  Clients keep ``(epoch, cursor)`` and pass the epoch to ``sync``:
   no page of the normal run may be a reset page.
7. *Safety* (:mod:`syncstore._demo_safety`): reused idempotency keys with
   other content are refused, clients holding a cursor from the future get a
   reset page and resync, and after the store's epoch is renewed (as a restore
   does) clients of the old epoch do the same.  Then a clean reopen and
   ``store.check()``, which must count each message stored once.
8. *Reads beyond catch-up* (:mod:`syncstore._demo_reads`): sampled clients
   scroll back through conversations with ``history`` and fetch quoted
   messages with ``get``; both must match what the clients received.
9. *The change log* (:mod:`syncstore._demo_stream`): a live tail and
   long-polling clients during the second half, then a named consumer reads
   the whole log and a follower replica rebuilt from it must equal the store.
10. *asyncio* (:mod:`syncstore._demo_aio`), in a store of its own: coroutines
   deliver with ``syncstore.aio`` while an ``async for`` tail follows the log,
   every inbox is verified with ``await store.sync``; then a few WebSocket
   gateway clients on 127.0.0.1 (one dropping and resuming) must each hold
   their messages exactly once, in cursor order.

The function returns a frozen :class:`DemoResult`; :func:`format_report`
renders it.  Progress is reported through a callback so the caller decides
how (the CLI draws one updating line on stderr).
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from . import _demo_aio, _demo_reads, _demo_safety, _demo_stream, _layout
from . import store as _store
from ._demo_aio import AioResult
from ._demo_reads import ReadsResult
from ._demo_safety import SafetyResult
from ._demo_stream import StreamResult
from .errors import CorruptionError, InvalidArgument
from .model import Delivery, Message

__all__ = ["DemoConfig", "Progress", "DemoResult", "run_demo", "format_report"]

PAGE_SIZE = 50
SAFETY_SAMPLE = 50  # reused keys, clients ahead, clients of an old epoch
ONLINE_CLIENTS = 5  # devices that long-poll with wait() during the second half
AIO_USERS = 200  # coroutines of the asyncio phase (one user each)
MIN_GROUP, MAX_GROUP = 3, 50
_GROUP_CONV_BASE = 1 << 40  # conv ids of groups; 1:1 conv ids stay below
_FILLER = (
    b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut "
    b"labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco "
    b"laboris nisi ut aliquip ex ea commodo consequat. Duis aute irure dolor in reprehenderit."
)
_TICK_S = 0.1
_MAX_FAILURES = 20  # failures kept for the report; the count keeps going


@dataclass(frozen=True)
class DemoConfig:
    """What to simulate.  Defaults are the ``syncstore demo`` defaults."""

    users: int = 5_000
    messages: int = 30_000
    threads: int = 8
    seed: int = 1
    path: str | None = None  # None: a temporary directory, removed afterwards
    group_share: float = 0.25  # fraction of sends that go to a group
    retry_share: float = 0.05  # fraction of sends retried (half at once, half after the restart)

    def validate(self) -> None:
        """Raise :class:`InvalidArgument` for values the simulation cannot run with."""
        for name, value, low in (("users", self.users, 2), ("messages", self.messages, 1), ("threads", self.threads, 1)):
            if type(value) is not int or value < low:
                raise InvalidArgument(f"{name} must be an int >= {low}, got {value!r}", key=name)
        if self.threads > 1024:
            raise InvalidArgument(f"threads must be at most 1024, got {self.threads}", key="threads")
        for name, share in (("group_share", self.group_share), ("retry_share", self.retry_share)):
            if not 0.0 <= share <= 1.0:
                raise InvalidArgument(f"{name} must be in 0..1, got {share!r}", key=name)


@dataclass(frozen=True)
class Progress:
    """A progress snapshot: ``done`` of ``total`` ``unit`` in ``phase``, at ``rate`` per second."""

    phase: str
    done: int
    total: int
    unit: str
    rate: float


@dataclass(frozen=True)
class DemoResult:
    """Everything the demo measured and verified.  ``ok`` is the verdict."""

    config: DemoConfig
    path: str
    temporary: bool
    messages: int  # distinct messages delivered
    one_to_one: int
    group: int
    inbox_entries: int  # sum over messages of their recipients (fan-out)
    max_fanout: int
    retries: int
    duplicates: int  # retries that came back duplicate=True
    deliver_seconds: float  # wall time of the two delivery phases
    ack_p50_ms: float
    ack_p99_ms: float
    catchup_sessions: int
    catchup_pages: int
    catchup_messages: int
    restart_close_ms: float
    restart_open_ms: float
    check: Mapping[str, int]
    clients_verified: int
    safety: SafetyResult
    reads: ReadsResult
    stream: StreamResult
    failures: tuple[str, ...]
    failure_count: int
    total_seconds: float
    aio: AioResult | None = None

    @property
    def ok(self) -> bool:
        """True when verification found nothing wrong."""
        return self.failure_count == 0

    @property
    def throughput(self) -> float:
        """Durable messages per second over the delivery phases."""
        return self.messages / self.deliver_seconds if self.deliver_seconds > 0 else 0.0


# --- the plan -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Send:
    message: Message
    to: tuple[int, ...]
    group: bool


@dataclass
class _Plan:
    sends: list[_Send]
    # per thread: (first half, second half) of (send, retry_at_once) items
    queues: list[tuple[list[tuple[_Send, bool]], list[tuple[_Send, bool]]]]
    late_retries: list[list[_Send]]  # per thread, sent after the second half
    retries: int


def _body(rng: random.Random, sender: int, seq: int) -> bytes:
    start = rng.randrange(len(_FILLER) - 20)
    return b"%d.%d " % (sender, seq) + _FILLER[start : start + rng.randint(10, 200)]


def _make_plan(config: DemoConfig) -> _Plan:
    rng = random.Random(config.seed)
    users = config.users
    groups: list[tuple[int, ...]] = []
    if users >= MIN_GROUP:
        for _ in range(max(1, users // 25)):
            groups.append(tuple(rng.sample(range(1, users + 1), rng.randint(MIN_GROUP, min(MAX_GROUP, users)))))
    next_seq: dict[int, int] = {}
    sends: list[_Send] = []
    for _ in range(config.messages):
        if groups and rng.random() < config.group_share:
            index = rng.randrange(len(groups))
            members = groups[index]
            sender, conv, to, group = rng.choice(members), _GROUP_CONV_BASE + index, members, True
        else:
            sender = rng.randint(1, users)
            peer = rng.randint(1, users - 1)
            peer += peer >= sender  # anyone but the sender
            low, high = min(sender, peer), max(sender, peer)
            sender, conv, to, group = sender, low * (users + 1) + high, (sender, peer), False
        seq = next_seq.get(sender, 0) + 1
        next_seq[sender] = seq
        sends.append(_Send(Message(sender, conv, seq, _body(rng, sender, seq)), tuple(to), group))
    queues: list[tuple[list[tuple[_Send, bool]], list[tuple[_Send, bool]]]] = [([], []) for _ in range(config.threads)]
    late: list[list[_Send]] = [[] for _ in range(config.threads)]
    half = len(sends) // 2
    retries = 0
    for index, send in enumerate(sends):
        thread = send.message.sender % config.threads  # one thread per sender: its sends are sequential
        retry = rng.random() < config.retry_share
        at_once = retry and rng.random() < 0.5
        queues[thread][index >= half].append((send, at_once))
        if retry and not at_once:
            late[thread].append(send)
        retries += retry
    return _Plan(sends, queues, late, retries)


# --- the simulation -------------------------------------------------------------


@dataclass
class _Client:
    """A user's device: its last cursor and what it has received, in order."""

    cursor: int = 0
    epoch: int | None = None  # kept with the cursor, from the pages it read
    received: list = field(default_factory=list)


class _Run:
    """Mutable state of one demo run, shared by its threads."""

    def __init__(self, config: DemoConfig, plan: _Plan, on_progress: Callable[[Progress], None] | None) -> None:
        self.config = config
        self.plan = plan
        self.on_progress = on_progress
        self.deliveries: dict[tuple[int, int], Delivery] = {}
        self.latencies: list[list[float]] = [[] for _ in range(config.threads)]
        self.done = [0] * config.threads
        self.duplicates = 0
        self.clients = [_Client() for _ in range(config.users + 1)]  # index = uid
        self.sessions = self.pages = self.read = 0
        self.failures: list[str] = []
        self.failure_count = 0
        self.errors: list[BaseException] = []
        self._failure_lock = threading.Lock()

    def fail(self, what: str) -> None:
        """Record one verification failure."""
        with self._failure_lock:
            self.failure_count += 1
            if len(self.failures) < _MAX_FAILURES:
                self.failures.append(what)

    # --- writers ----------------------------------------------------------------

    def sender(self, store: _store.Store, thread: int, items: Sequence[tuple[_Send, bool]], retries: Sequence[_Send]) -> None:
        """One sender thread: deliver ``items`` in order, then the late ``retries``."""
        try:
            latencies, done, clock = self.latencies[thread], self.done, time.perf_counter
            for send, retry_at_once in items:
                start = clock()
                delivery = store.deliver(send.message, send.to)
                latencies.append(clock() - start)
                key = (send.message.sender, send.message.client_seq)
                if delivery.duplicate:
                    self.fail(f"first send of {key} came back duplicate=True")
                elif set(delivery.cursors) != set(send.to):
                    self.fail(f"send {key}: cursors for {sorted(delivery.cursors)}, expected {sorted(send.to)}")
                self.deliveries[key] = delivery
                if retry_at_once:
                    self._retry(store, send)
                done[thread] += 1
            for send in retries:
                self._retry(store, send)
        except BaseException as error:  # surfaced by the main thread
            self.errors.append(error)

    def _retry(self, store: _store.Store, send: _Send) -> None:
        key = (send.message.sender, send.message.client_seq)
        again = store.deliver(send.message, send.to)
        first = self.deliveries[key]
        if not again.duplicate:
            self.fail(f"retry of {key} was not recognised as a duplicate")
        elif again.msg_id != first.msg_id or dict(again.cursors) != dict(first.cursors):
            self.fail(f"retry of {key} returned msg_id/cursors different from the first delivery")
        else:
            with self._failure_lock:
                self.duplicates += 1

    # --- readers ----------------------------------------------------------------

    def catch_up(self, store: _store.Store, uid: int) -> None:
        """Client ``uid`` reconnects and reads pages from its last cursor until has_more is false."""
        client = self.clients[uid]
        self.sessions += 1
        while True:
            page = store.sync(uid, since=client.cursor, limit=PAGE_SIZE, epoch=client.epoch)
            self.pages += 1
            if page.reset:
                self.fail(f"user {uid}: a reset page ({page.reset_reason}) for cursor {client.cursor} of epoch {client.epoch}")
                return
            client.epoch = page.epoch
            for message in page.messages:
                if message.cursor != client.cursor + 1:
                    self.fail(f"user {uid}: cursor {message.cursor} follows {client.cursor} (gap or repeat)")
                client.cursor = message.cursor
                client.received.append(message)
            self.read += len(page.messages)
            if page.next != client.cursor:
                self.fail(f"user {uid}: page.next {page.next}, last cursor {client.cursor}")
            if not page.has_more:
                return
            if not page.messages:
                self.fail(f"user {uid}: empty page with has_more=True after cursor {client.cursor}")
                return

    def reconnecting_clients(self, store: _store.Store, stop: threading.Event, seed: int) -> None:
        """Random clients come back online and catch up while the senders run."""
        rng = random.Random(seed)
        try:
            while not stop.is_set():
                self.catch_up(store, rng.randint(1, self.config.users))
                stop.wait(0.002)
        except BaseException as error:
            self.errors.append(error)

    # --- progress ---------------------------------------------------------------

    def ticker(self, phase: str, total: int, unit: str, done: Callable[[], int], stop: threading.Event) -> None:
        """Report progress every 100 ms until ``stop`` is set, then once more."""
        if self.on_progress is None:
            return
        start, base = time.perf_counter(), done()
        while True:
            stopped = stop.wait(_TICK_S)
            elapsed = time.perf_counter() - start
            now = done()
            self.on_progress(Progress(phase, now, total, unit, (now - base) / elapsed if elapsed > 0 else 0.0))
            if stopped:
                return

    def progress(self, phase: str, done: int, total: int, unit: str) -> None:
        """Report a one-off progress step."""
        if self.on_progress is not None:
            self.on_progress(Progress(phase, done, total, unit, 0.0))


def _background(target: Callable[..., None], *args: object) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def _deliver_phase(run: _Run, store: _store.Store, phase: str, half: int, seed: int) -> float:
    """Run every sender thread over its ``half`` of the plan (plus late retries after half 1); return wall seconds."""
    plan, done = run.plan, run.done
    total = len(plan.sends)
    stop_ticker, stop_clients = threading.Event(), threading.Event()
    ticker = _background(run.ticker, phase, total, "msgs", lambda: sum(done), stop_ticker)
    clients = _background(run.reconnecting_clients, store, stop_clients, seed)
    start = time.perf_counter()
    senders = [
        _background(run.sender, store, thread, queue[half], plan.late_retries[thread] if half == 1 else ())
        for thread, queue in enumerate(plan.queues)
    ]
    for thread in senders:
        thread.join()
    elapsed = time.perf_counter() - start
    stop_clients.set()
    clients.join()
    stop_ticker.set()
    ticker.join()
    if run.errors:
        raise run.errors[0]
    return elapsed


def _verify(run: _Run, store: _store.Store) -> int:
    """Compare every client with the plan; return how many clients were checked."""
    plan, deliveries = run.plan, run.deliveries
    expected: list[dict[int, _Send]] = [{} for _ in run.clients]  # uid -> cursor -> send
    addressed = [0] * len(run.clients)
    for send in plan.sends:
        key = (send.message.sender, send.message.client_seq)
        delivery = deliveries.get(key)
        if delivery is None:
            run.fail(f"send {key} was never acknowledged")
            continue
        for uid in send.to:
            addressed[uid] += 1
            cursor = delivery.cursors.get(uid)
            if cursor is not None:
                expected[uid][cursor] = send
    by_id = {key: delivery.msg_id for key, delivery in deliveries.items()}
    for uid in range(1, len(run.clients)):
        client = run.clients[uid]
        received = client.received
        if len(received) != addressed[uid]:
            run.fail(f"user {uid}: received {len(received)} messages, {addressed[uid]} were sent to it")
        last_seq: dict[int, int] = {}
        for position, message in enumerate(received, 1):
            entry = expected[uid].get(message.cursor)
            if message.cursor != position:
                run.fail(f"user {uid}: message {position} has cursor {message.cursor}")
                break
            if entry is None:
                run.fail(f"user {uid}: cursor {message.cursor} matches no acknowledged delivery")
                continue
            sent = entry.message
            if (message.sender, message.client_seq, message.conv, message.body) != (sent.sender, sent.client_seq, sent.conv, sent.body):
                run.fail(f"user {uid}: cursor {message.cursor} holds the wrong message")
            elif message.msg_id != by_id[(sent.sender, sent.client_seq)]:
                run.fail(f"user {uid}: cursor {message.cursor} has msg_id {message.msg_id}, deliver returned another")
            if last_seq.get(message.sender, 0) >= message.client_seq:
                run.fail(f"user {uid}: messages of sender {message.sender} out of send order at cursor {message.cursor}")
            last_seq[message.sender] = message.client_seq
        head = store.head(uid)
        if head != len(received):
            run.fail(f"user {uid}: head {head}, but the client read {len(received)} messages")
    return len(run.clients) - 1


def _prepare_path(path: str | None) -> tuple[str, bool]:
    if path is None:
        return tempfile.mkdtemp(prefix="syncstore-demo-"), True
    if path == "":
        raise InvalidArgument("the store path is empty", key="path", hint="pass a new or empty directory, or leave out --path to use a temporary one")
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise InvalidArgument(
            f"{path} exists and is not an empty directory",
            path=path,
            hint="pass a new or empty directory, or leave out --path to use a temporary one",
        )
    os.makedirs(path, exist_ok=True)
    return path, False


def _percentile(sorted_values: Sequence[float], fraction: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


def run_demo(config: DemoConfig = DemoConfig(), on_progress: Callable[[Progress], None] | None = None) -> DemoResult:
    """Run the simulation described in the module docstring and return what it measured.

    Raises :class:`InvalidArgument` for a bad ``config`` (or a non-empty
    ``path``) and any :class:`SyncStoreError` the store raises.  Verification
    failures do not raise: they are in ``result.failures`` (``result.ok``).
    """
    config.validate()
    began = time.perf_counter()
    run = _Run(config, _make_plan(config), on_progress)
    path, temporary = _prepare_path(config.path)
    try:
        store = _store.open(path, durability="sync")
        try:
            seconds = _deliver_phase(run, store, "deliver 1/2", 0, config.seed + 1)
            run.progress("restart", 0, 1, "")
            start = time.perf_counter()
            store.close()
            closed = time.perf_counter()
            store = _store.open(path, durability="sync")
            close_ms, open_ms = (closed - start) * 1e3, (time.perf_counter() - closed) * 1e3
            tail = _demo_stream.LiveTail(store)  # downstream of the store: sees the second half live
            online = _demo_stream.OnlineClients(store, random.Random(config.seed + 4).sample(range(1, config.users + 1), min(ONLINE_CLIENTS, config.users)))
            first_half = set(run.deliveries)
            seconds += _deliver_phase(run, store, "deliver 2/2", 1, config.seed + 2)
            online_clients = online.stop_and_verify(run.fail)
            tail_upto = store.lsn  # the tail's share: the second half
            users = config.users
            for uid in range(1, users + 1):
                run.catch_up(store, uid)
                if uid % 500 == 0 or uid == users:
                    run.progress("catch-up", uid, users, "users")
            run.progress("verify", 0, 1, "")
            clients = _verify(run, store)
            run.progress("safety", 0, 1, "")
            rng = random.Random(config.seed + 3)
            received = {uid: run.clients[uid].received for uid in range(1, users + 1)}
            sample = rng.sample(run.plan.sends, min(SAFETY_SAMPLE, len(run.plan.sends)))
            refused = _demo_safety.reused_keys(store, [(s.message, s.to) for s in sample], run.deliveries, run.fail)
            ahead = _demo_safety.clients_ahead(store, received, rng, SAFETY_SAMPLE, run.fail)
            run.progress("history", 0, 1, "")
            reads = _demo_reads.scroll_back_and_quote(store, received, rng, SAFETY_SAMPLE, run.fail)
            run.progress("change log", 0, 1, "")
            consumed, replicated, replica_users, restored_users = _demo_stream.consume_and_replicate(store, run.deliveries, users, rng, run.fail)
            old_epoch = store.epoch
        finally:
            store.close()
        second_half = {key: delivery for key, delivery in run.deliveries.items() if key not in first_half}
        stream = _demo_stream.StreamResult(tail.verify(second_half, tail_upto, run.fail), online_clients, online.wakeups, consumed, replicated, replica_users, restored_users)
        _layout.renew_epoch(path)  # as restoring an older copy would (syncstore.renew_epoch)
        with _store.open(path, durability="sync") as store:
            epoch_resets = _demo_safety.clients_of_an_old_epoch(store, old_epoch, received, rng, SAFETY_SAMPLE, run.fail)
            safety = SafetyResult(refused, ahead, epoch_resets)
            try:
                check = store.check()
            except CorruptionError as error:
                run.fail(f"store.check(): {error}")
                check = {}
        extra = _demo_stream.SNAPSHOT_WRITES  # the snapshot phase's writes to the audit inbox, one recipient each
        entries, stored = sum(len(s.to) for s in run.plan.sends) + extra, len(run.plan.sends) + extra
        if check and check.get("inbox_entries") != entries:
            run.fail(f"store.check() counts {check.get('inbox_entries')} inbox entries, expected {entries}")
        if check and check.get("messages") != stored:
            run.fail(f"store.check() counts {check.get('messages')} stored messages, expected one per delivery: {stored}")
        if check and check.get("dedup_entries") != stored:
            run.fail(f"store.check() counts {check.get('dedup_entries')} dedup entries, expected {stored}")
        run.progress("asyncio", 0, 1, "")
        aio = _demo_aio.run_aio_phase(min(config.users, AIO_USERS), config.seed + 5, run.fail)
    finally:
        if temporary:
            shutil.rmtree(path, ignore_errors=True)
    latencies = sorted(x for per_thread in run.latencies for x in per_thread)
    sends = run.plan.sends
    return DemoResult(
        config=config,
        path=path,
        temporary=temporary,
        messages=len(run.deliveries),
        one_to_one=sum(not s.group for s in sends),
        group=sum(s.group for s in sends),
        inbox_entries=sum(len(s.to) for s in sends),
        max_fanout=max((len(s.to) for s in sends), default=0),
        retries=run.plan.retries,
        duplicates=run.duplicates,
        deliver_seconds=seconds,
        ack_p50_ms=_percentile(latencies, 0.50) * 1e3,
        ack_p99_ms=_percentile(latencies, 0.99) * 1e3,
        catchup_sessions=run.sessions,
        catchup_pages=run.pages,
        catchup_messages=run.read,
        restart_close_ms=close_ms,
        restart_open_ms=open_ms,
        check=MappingProxyType(dict(check)),
        clients_verified=clients,
        safety=safety,
        reads=reads,
        stream=stream,
        failures=tuple(run.failures),
        failure_count=run.failure_count,
        total_seconds=time.perf_counter() - began,
        aio=aio,
    )


def format_report(result: DemoResult) -> str:
    """The human-readable report ``syncstore demo`` prints."""
    c = result.config
    fanout = result.inbox_entries / result.messages if result.messages else 0.0
    where = f"{result.path} ({'temporary, removed' if result.temporary else 'kept'})"
    lines = [
        f"syncstore demo: {c.users:,} users, {c.messages:,} messages, {c.threads} sender threads, seed {c.seed}",
        f"  store          {where}",
        f"  delivered      {result.messages:,} messages ({result.one_to_one:,} 1:1, {result.group:,} group)"
        f" to {result.inbox_entries:,} inboxes (fan-out {fanout:.1f} avg, {result.max_fanout} max)",
        f"  retried sends  {result.retries:,} retries, {result.duplicates:,} duplicates suppressed",
        f"  throughput     {result.throughput:,.0f} msg/s durable (fdatasync'd), {result.deliver_seconds:.2f} s delivering",
        f"  ack latency    p50 {result.ack_p50_ms:.2f} ms, p99 {result.ack_p99_ms:.2f} ms",
        f"  catch-up       {result.catchup_sessions:,} sessions, {result.catchup_pages:,} pages of <= {PAGE_SIZE},"
        f" {result.catchup_messages:,} messages read",
        f"  restart        close {result.restart_close_ms:.1f} ms, reopen (recovery) {result.restart_open_ms:.1f} ms",
    ]
    s = result.safety
    lines.append(
        f"  safety         {s.reused_keys_refused} reused keys with other content refused (IdempotencyConflict);"
        f" {s.ahead_resets} clients ahead of the store and {s.epoch_resets} of an old epoch reset and resynced"
    )
    r = result.reads
    lines.append(
        f"  history        {r.conversations} conversations scrolled back to their start ({r.history_pages} pages,"
        f" {r.history_messages:,} messages); {r.quotes} quoted messages fetched with get(msg_id)"
    )
    t = result.stream
    lines.append(
        f"  change log     a live tail got {t.tail_changes:,} changes as they were written; {t.online_clients} online clients"
        f" long-polled (woken {t.wakeups:,} times); a named consumer read and acknowledged {t.consumer_changes:,};"
        f" a follower applied {t.follower_changes:,} (restarted half-way), {t.follower_users:,} inboxes equal the leader's"
    )
    lines.append(f"  snapshots      a base, 3 writes, a delta, restored into a new store: {t.restored_users:,} heads equal, check() clean, new epoch")
    a = result.aio
    if a is not None:
        gateway = (
            f"; gateway on 127.0.0.1: {a.gateway_clients} WebSocket clients sent {a.gateway_messages}, {a.reconnects} dropped and resumed, each got its pushes once, in order"
            if a.gateway_clients
            else "; gateway skipped (pip install 'syncstore[gateway]')"
        )
        lines.append(
            f"  asyncio        {a.coroutines} coroutines delivered {a.messages:,} ({a.rate:,.0f} msg/s durable), {a.duplicates} retries"
            f" answered duplicate; an async follow got {a.tail_changes:,}; {a.inboxes} inboxes exact{gateway}"
        )
    if result.check:
        lines.append(
            f"  store.check()  {result.check['users']:,} users, {result.check['inbox_entries']:,} inbox entries referencing"
            f" {result.check['messages']:,} messages stored once, {result.check['dedup_entries']:,} dedup entries"
        )
    if result.ok:
        lines.append(
            f"  verification   OK: {result.clients_verified:,} clients hold exactly their messages,"
            " in order, no gaps, no duplicates"
        )
    else:
        lines.append(f"  verification   FAILED: {result.failure_count:,} problem(s)")
        lines.extend(f"    - {failure}" for failure in result.failures)
        if result.failure_count > len(result.failures):
            lines.append(f"    ... and {result.failure_count - len(result.failures):,} more")
    lines.append(f"  total time     {result.total_seconds:.1f} s")
    return "\n".join(lines)
