"""Workload drivers, I/O and memory probes, and the ratio tables of the benchmarks.

Benchmarks record one :class:`Row` per (section, system); at the end of the
session ``conftest.py`` prints every section as a table with each peer's
ratio and the targets met or missed.  The same rows travel in each
benchmark's ``extra_info``, so ``tools/bench_report.py`` can rebuild the
tables (as Markdown) from ``--benchmark-json`` output.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

#: ``SYNCSTORE_BENCH_SCALE`` multiplies every workload size: 1 = the sizes in
#: docs/benchmarks.md (the default when benchmarking); with
#: ``--benchmark-disable`` (CI) it defaults to TINY, enough to exercise the code.
SCALE_ENV = "SYNCSTORE_BENCH_SCALE"
TINY = 0.01


def scale_for(disabled: bool) -> float:
    """The workload scale: ``$SYNCSTORE_BENCH_SCALE``, else 1 (benchmarking) or TINY (disabled)."""
    text = os.environ.get(SCALE_ENV)
    if text:
        value = float(text)
        if value <= 0:
            raise ValueError(f"{SCALE_ENV} must be > 0, got {text!r}")
        return value
    return TINY if disabled else 1.0


def sized(full: int, scale: float, minimum: int = 1) -> int:
    """``full`` scaled, never below ``minimum``."""
    return max(minimum, int(full * scale))


# --- workloads ------------------------------------------------------------------

Item = tuple[int, int, int, bytes, tuple[int, ...]]


def one_to_one_items(count: int, users: int, body_bytes: int, seed: int, first_seq: int = 1) -> list[Item]:
    """``count`` 1:1 messages among ``users`` users: ``to=[sender, recipient]``, unique client_seq."""
    rng = random.Random(seed)
    body = bytes(rng.randrange(256) for _ in range(body_bytes))
    items = []
    for seq in range(first_seq, first_seq + count):
        sender = rng.randrange(users)
        recipient = (sender + 1 + rng.randrange(users - 1)) % users
        items.append((sender, min(sender, recipient) * users + max(sender, recipient), seq, body, (sender, recipient)))
    return items


#: Group conversations get conv ids above every 1:1 conv id of ``one_to_one_items`` (< users**2).
GROUP_CONV_BASE = 1 << 48


def group_items(count: int, users: int, groups: int, members: int, body_bytes: int, seed: int, first_seq: int = 1) -> list[Item]:
    """``count`` group messages: ``groups`` groups of ``members`` users drawn at random from ``users``.

    Each message goes to every member of a random group (the sender, a random
    member, included), conv ``GROUP_CONV_BASE + group``; bodies are
    ``body_bytes`` long and distinct (they start with the client_seq), so a
    read that returns another message's body is caught.
    """
    rng = random.Random(seed)
    filler = bytes(rng.randrange(256) for _ in range(body_bytes))
    member_lists = [tuple(sorted(rng.sample(range(users), members))) for _ in range(groups)]
    items = []
    for seq in range(first_seq, first_seq + count):
        group = rng.randrange(groups)
        to = member_lists[group]
        body = (seq.to_bytes(8, "big") + filler)[:body_bytes]
        items.append((rng.choice(to), GROUP_CONV_BASE + group, seq, body, to))
    return items


def read_inbox(store: object, uid: int, page_size: int = 1_000) -> list:
    """Every message of ``uid``, read with ``store.sync`` page by page from cursor 0."""
    got: list = []
    since = 0
    while True:
        page = store.sync(uid, since=since, limit=page_size)  # type: ignore[attr-defined]
        got.extend(page.messages)
        since = page.next
        if not page.has_more:
            return got


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile of already sorted values (nearest rank)."""
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


@dataclass
class Throughput:
    """What a threaded run measured: operations, wall seconds, per-call latencies (seconds)."""

    operations: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)

    def add(self, other: Throughput) -> None:
        """Accumulate another round."""
        self.operations += other.operations
        self.seconds += other.seconds
        self.latencies.extend(other.latencies)

    @property
    def rate(self) -> float:
        """Operations per second."""
        return self.operations / self.seconds if self.seconds else 0.0

    def latency_ms(self, fraction: float) -> float:
        """Latency quantile in milliseconds."""
        return percentile(sorted(self.latencies), fraction) * 1e3


def run_threads(make_call: Callable[[], Callable[[Item], object]], work: Sequence[Sequence[Item]]) -> Throughput:
    """One thread per list in ``work``, each calling its own ``make_call()`` on every item, timed.

    Threads start together (a barrier); the wall time runs from the barrier
    to the last thread's end.  Every call's latency is recorded.
    """
    barrier = threading.Barrier(len(work) + 1)
    latencies: list[list[float]] = [[] for _ in work]
    errors: list[BaseException] = []
    ended = [0.0] * len(work)

    def worker(index: int, items: Sequence[Item]) -> None:
        try:
            call = make_call()
        except BaseException as error:
            errors.append(error)
            barrier.abort()
            return
        clock, record = time.perf_counter, latencies[index].append
        barrier.wait()
        try:
            for item in items:
                start = clock()
                call(item)
                record(clock() - start)
        except BaseException as error:
            errors.append(error)
        ended[index] = clock()

    threads = [threading.Thread(target=worker, args=(i, items)) for i, items in enumerate(work)]
    for thread in threads:
        thread.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return Throughput(sum(len(items) for items in work), max(ended) - start, [x for per in latencies for x in per])


def split(items: Sequence[Item], parts: int) -> list[list[Item]]:
    """Deal ``items`` round-robin into ``parts`` lists."""
    return [list(items[i::parts]) for i in range(parts)]


# --- I/O and memory probes --------------------------------------------------------


def io_counters(tid: int | None = None) -> dict[str, int]:
    """``/proc/self/io`` (or one thread's ``/proc/self/task/<tid>/io``) as a dict."""
    path = "/proc/self/io" if tid is None else f"/proc/self/task/{tid}/io"
    with open(path) as f:
        return {key: int(value) for key, value in (line.split(": ") for line in f if line.strip())}


def device_sectors_written(path: str) -> int | None:
    """Sectors written so far by the block device holding ``path`` (machine-wide), if readable."""
    st = os.stat(path)
    try:
        with open(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/stat") as f:
            return int(f.read().split()[6])
    except (OSError, IndexError, ValueError):
        return None


def thread_id(prefix: str) -> int | None:
    """Native id of the live thread whose name starts with ``prefix``."""
    for thread in threading.enumerate():
        if thread.name.startswith(prefix):
            return thread.native_id
    return None


# --- results and ratio tables --------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A goal for one metric of syncstore: absolute (``peer`` None) or a ratio over ``peer``."""

    metric: str
    goal: float
    peer: str | None = None
    higher_is_better: bool = True
    ours: str = "syncstore"  # the row judged (a syncstore variant)

    def describe(self) -> str:
        """E.g. ``msg/s >= 30,000`` or ``msg/s >= 3x sqlite``."""
        op = ">=" if self.higher_is_better else "<="
        who = "" if self.ours == "syncstore" else f"{self.ours}: "
        if self.peer is None:
            return f"{who}{self.metric} {op} {self.goal:,g}"
        return f"{who}{self.metric} {op} {self.goal:g}x {self.peer}"


@dataclass(frozen=True)
class Section:
    """One table: a title, the metric the ratios use, and its targets."""

    key: str
    title: str
    ratio_metric: str
    higher_is_better: bool = True
    targets: tuple[Target, ...] = ()
    note: str = ""


SECTIONS: dict[str, Section] = {
    s.key: s
    for s in (
        Section(
            "deliver",
            "durable deliver: 8 threads, 1 message per call, 1,000 users, 200-byte bodies, 1:1",
            "msg/s",
            targets=(Target("msg/s", 30_000), Target("msg/s", 3.0, "sqlite"), Target("p99 ms", 5.0, higher_is_better=False)),
        ),
        Section(
            "bulk",
            "bulk deliver_many: 1,000 messages per call, 1 thread, durable, 1,000 users, 200-byte bodies",
            "msg/s",
            targets=(Target("msg/s", 100_000), Target("msg/s", 0.9, "lmdb")),
            note="lmdb: raw py-lmdb writing state format 3, one putmulti per database per batch",
        ),
        Section(
            "sync",
            "sync(uid, since, 100) on hot data, 1:1 inboxes (200-byte bodies): 100 messages per call",
            "calls/s",
            targets=(
                Target("calls/s", 0.8, "lmdb"),
                Target("calls/s", 1.5, "sqlite"),
                Target("calls/s", 1.5, "sqlite", ours="syncstore-decoded"),
            ),
        ),
        Section(
            "sync group",
            "sync(uid, since, 100) on hot data, group inboxes (groups of 100 members, 1 KiB bodies): 100 messages per call",
            "calls/s",
            targets=(
                Target("calls/s", 0.8, "lmdb"),
                Target("calls/s", 1.5, "sqlite"),
                Target("calls/s", 1.5, "sqlite", ours="syncstore-decoded"),
            ),
        ),
        Section(
            "history",
            "history(user, conv, before, 50): one conversation holding 1% of a user's inbox",
            "calls/s",
            targets=(Target("calls/s", 20, "filtering"), Target("calls/s", 20, "filtering", ours="syncstore-decoded")),
            note="filtering: the same answer from sync pages of 1,000 walked back from before, keeping conv's messages",
        ),
        Section(
            "get",
            "get(msg_id) of random stored messages",
            "calls/s",
        ),
        Section("replay", "WAL replay on open (state/ deleted): 1:1 records, 200-byte bodies", "records/s", targets=(Target("records/s", 120_000),)),  # issue 8
        Section(  # before issue 8 (kept to render older runs): wchar headline, 1,000 users
            "bytes",
            "bytes written per durable message (8 threads, 1:1, 200-byte bodies): write()/pwrite() bytes (wchar), device sectors",
            "total B/msg",
            higher_is_better=False,
            targets=(Target("total B/msg", 600, higher_is_better=False),),
            note="target: <= 3x the 200-byte body",
        ),
        *(
            Section(
                f"bytes {population}",
                f"bytes written per durable message, {users:,} users (8 threads, 1:1, 200-byte bodies): write_bytes (block layer), WAL / LMDB",
                "write_bytes/msg",
                higher_is_better=False,
                targets=(Target("write_bytes/msg", 1_000, higher_is_better=False),),
                note="target: <= 5x the 200-byte body; a durable WAL group rewrites at least one 4 KiB page (WAL write_bytes/group)",
            )
            for population, users in (("5k", 5_000), ("1M", 1_000_000))
        ),
        Section(
            "interval sync gap",
            'durability="interval" under bulk load: longest wait of a written WAL frame for its fdatasync (4 threads of deliver_many)',
            "max gap ms",
            higher_is_better=False,
            targets=(Target("max gap ms", 150, higher_is_better=False),),
            note="promise: 100 ms after the write, plus the write in progress when the timer falls due",
        ),
        Section(  # issue 9
            "snapshot",
            "full snapshot (base) of a store's state vs copying its LMDB file with env.copy(compact=True), same store, same run",
            "MB/s",
            note="MB/s: the LMDB state's used bytes per second; 'longest txn ms': the longest read transaction the copy held open",
        ),
        Section(  # issue 9
            "snapshot delta",
            "delta snapshot after 1% of users received messages, vs the full snapshot of the same store",
            "delta % of full",
            higher_is_better=False,
            targets=(Target("delta % of full", 5, higher_is_better=False),),
        ),
        Section(  # issue 9
            "snapshot pinning",
            "LMDB file growth while writers add 25% more messages during a read transaction held open (a one-transaction copy) vs short ones",
            "growth MB",
            higher_is_better=False,
        ),
        Section("restore", "restore a base + one delta into a new store (every file checked first, then built, then check())", "MB/s"),  # issue 9
        Section(  # issue 13
            "aio",
            "durable deliver from 1,000 asyncio coroutines (syncstore.aio) vs 8 threads (Store.deliver), same run; 1:1, 1,000 users, 200-byte bodies",
            "msg/s",
            targets=(Target("msg/s", 25_000), Target("msg/s", 30_000), Target("msg/s", 1.3, "threads")),
            note="threads: the threaded API's row of this same run (8 threads, one message per call)",
        ),
        Section(  # issue 13
            "gateway",
            "WebSocket gateway on loopback: send -> push latency with 1,000 connected clients; memory per connected client",
            "p50 ms",
            higher_is_better=False,
        ),
        Section(
            "memory",
            "memory: ingest with deliver_many into a fresh store (subprocess)",
            "peak RssAnon MB",
            higher_is_better=False,
            targets=(Target("ru_maxrss MB", 300, higher_is_better=False), Target("peak RssAnon MB", 300, higher_is_better=False)),
        ),
    )
}


@dataclass
class Row:
    """One system's numbers in one section."""

    section: str
    system: str
    metrics: dict[str, float]
    workload: str = ""

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form (for ``benchmark.extra_info``)."""
        return asdict(self)


class Results:
    """Rows recorded during the session, rendered as ratio tables."""

    def __init__(self) -> None:
        self.rows: list[Row] = []

    def record(self, row: Row, benchmark: object | None = None) -> Row:
        """Keep ``row`` (replacing an earlier one of the same section and system) and attach it to ``benchmark``."""
        self.rows = [r for r in self.rows if (r.section, r.system) != (row.section, row.system)]
        self.rows.append(row)
        if benchmark is not None:  # one benchmark may record several rows (a system and its peers in one run)
            benchmark.extra_info["syncstore_row"] = row.as_dict()  # type: ignore[attr-defined]
            benchmark.extra_info.setdefault("syncstore_rows", []).append(row.as_dict())  # type: ignore[attr-defined]
        return row


RESULTS = Results()


def _fmt(value: float) -> str:
    if value != value:  # NaN
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if value else "0"


def _verdict(target: Target, rows: dict[str, Row]) -> str:
    ours = rows.get(target.ours)
    if ours is None or target.metric not in ours.metrics:
        return f"{target.describe()}: not measured"
    value = ours.metrics[target.metric]
    if target.peer is not None:
        peer = rows.get(target.peer)
        if peer is None or not peer.metrics.get(target.metric):
            return f"{target.describe()}: {target.peer} not measured"
        value = value / peer.metrics[target.metric] if target.higher_is_better else peer.metrics[target.metric] / value
        shown = f"{value:.2f}x"
    else:
        shown = _fmt(value)
    higher = target.higher_is_better or target.peer is not None  # ratios are always "higher is better"
    if value >= target.goal if higher else value <= target.goal:
        return f"{target.describe()}: {shown} -- met"
    if higher:
        return f"{target.describe()}: {shown} -- MISSED by {1 - value / target.goal:.0%} (reaches {value / target.goal:.0%} of the goal)"
    return f"{target.describe()}: {shown} -- MISSED by {value / target.goal - 1:.0%} (over the limit)"


def render(rows: Iterable[Row], markdown: bool = False) -> str:
    """Every section as a table (syncstore first, then peers with ``syncstore / peer`` ratios) plus target verdicts."""
    by_section: dict[str, dict[str, Row]] = {}
    for row in rows:
        by_section.setdefault(row.section, {})[row.system] = row
    out: list[str] = []
    for key, section in SECTIONS.items():
        section_rows = by_section.get(key)
        if not section_rows:
            continue
        ordered = sorted(section_rows.values(), key=lambda r: (not r.system.startswith("syncstore"), r.system))
        metrics = list(dict.fromkeys(m for r in ordered for m in r.metrics))
        ours = section_rows.get("syncstore")
        header = ["system", *metrics, "syncstore vs this"]
        table = []
        for row in ordered:
            ratio = "-"
            base = ours.metrics.get(section.ratio_metric) if ours else None
            value = row.metrics.get(section.ratio_metric)
            if not row.system.startswith("syncstore") and base and value:
                ratio = f"{(base / value if section.higher_is_better else value / base):.2f}x"
            table.append([row.system, *(_fmt(row.metrics.get(m, float("nan"))) for m in metrics), ratio])
        workload = next((r.workload for r in ordered if r.workload), "")
        if markdown:
            out.append(f"### {section.title}\n")
            if workload:
                out.append(f"Workload: {workload}\n")
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "|".join("---" for _ in header) + "|")
            out.extend("| " + " | ".join(cells) + " |" for cells in table)
            out.append("")
            out.extend(f"- {_verdict(t, section_rows)}" for t in section.targets)
            if section.note:
                out.append(f"- ({section.note})")
            out.append("")
        else:
            widths = [max(len(str(line[i])) for line in [header, *table]) for i in range(len(header))]
            out.append(f"== {section.title}" + (f"\n   workload: {workload}" if workload else ""))
            for line in [header, *table]:
                out.append("   " + "  ".join(str(cell).rjust(w) if i else str(cell).ljust(w) for i, (cell, w) in enumerate(zip(line, widths))))
            out.extend(f"   target {_verdict(t, section_rows)}" for t in section.targets)
            if section.note:
                out.append(f"   ({section.note})")
            out.append("")
    return "\n".join(out).rstrip() + "\n"
