"""Archive segments on the fortunes corpus: encode, verify, and reads of 100 messages warm, cold and hot.

Data, per language (``_corpus``: every measured English or Chinese fortune
once, in the IM envelope; 300 users, so that inboxes hold ~200-300 entries
of the month): one segment written with the chosen options
(``syncstore._segment.write_segment``: 8 KiB blocks, zstd level 9, a 32 KiB
dictionary trained on the held-out texts), and the same deliveries in a
syncstore store (``deliver_many``, so the hot LMDB read serves the same
messages in the same order).

- **encode**: ``write_segment`` (encode, write, fsync, read back and verify
  every CRC, rename, fsync the directory): messages/s, and MB/s of message
  bytes (41-byte head + body per message, 16 bytes per inbox entry).
- **verify**: ``Segment.verify()`` (quick: every CRC, index, footer) and
  ``verify(deep=True)`` (every block decompressed, decoded, the sections
  cross-checked): MB/s of segment file.
- **read 100**: random (user, since) with at least 100 of the user's
  messages after ``since``; ``Segment.read_range(user, since, 100)`` with a
  warm cache (every block decoded and cached by a first pass) and with a
  cold one (the cache cleared before every call; the file is in the page
  cache either way), against ``store.sync(user, since, 100)`` on the hot
  store, undecoded and decoded (``tuple(page.messages)``: the segment read
  returns decoded ``StoredMessage`` s, so the decoded row is the like-for-like peer).
  Before timing, both return the same bodies for a sample of queries.
"""

from __future__ import annotations

import os
import random
import time

import pytest
from _harness import RESULTS, SECTIONS, Row, Section, Target, Throughput, scale_for, sized

import syncstore
from syncstore import Message
from syncstore import _segformat as fmt
from syncstore._segment import BlockCache, Segment, write_segment

_corpus = pytest.importorskip("_corpus")

LIMIT = 100
USERS = 300
OPTIONS = {"block_bytes": 8 * 1024, "level": 9}
DICTIONARY = 32 * 1024

for _language in _corpus.LANGUAGES:
    SECTIONS[f"archive encode {_language}"] = Section(
        f"archive encode {_language}", f"write_segment of one month ({_language} fortunes): encode, write, fsync, read back and verify, rename", "msg/s"
    )
    SECTIONS[f"archive verify {_language}"] = Section(
        f"archive verify {_language}",
        f"Segment.verify of the month's segment ({_language}): quick (every CRC) and deep (every block decoded, sections cross-checked)",
        "MB/s",
        targets=(Target("MB/s", 500, ours="verify quick"),),
    )
    SECTIONS[f"archive read {_language}"] = Section(
        f"archive read {_language}",
        f"100 messages of one user ({_language}): segment read_range with a warm and a cold block cache vs sync on hot LMDB",
        "calls/s",
        targets=(
            Target("calls/s", 0.5, "hot sync decoded", ours="archive warm"),
            Target("calls/s", 0.1, "hot sync decoded", ours="archive cold"),
            Target("calls/s", 0.5, "hot sync", ours="archive warm"),
            Target("calls/s", 0.1, "hot sync", ours="archive cold"),
        ),
        note="the segment read returns decoded StoredMessages: 'hot sync decoded' is the like-for-like peer; 'hot sync' returns undecoded pages",
    )


@pytest.fixture(scope="module", params=list(_corpus.LANGUAGES))
def month(request, tmp_path_factory):
    """(language, messages, entries, delivered, dictionary, directory, scale) of one language's month."""
    language = request.param
    try:
        held, measured = _corpus.split(language)
    except _corpus.CorpusMissing as missing:
        pytest.skip(f"{missing} (./dev bench installs it)")
    scale = scale_for(request.config.getoption("benchmark_disable", default=False))
    texts = measured[: sized(len(measured), scale, 1_500)]
    delivered = _corpus.month_of_traffic(texts, users=USERS if scale >= 0.5 else 30)
    messages = [d.message for d in delivered]
    entries = [fmt.Entry(user, cursor, d.message.msg_id) for d in delivered for user, cursor in d.pairs]
    dictionary = fmt.train_dictionary(held, DICTIONARY)
    assert dictionary is not None
    return language, messages, entries, delivered, dictionary, tmp_path_factory.mktemp(f"archive-{language}"), scale


def _describe(language, messages, entries, segment_bytes=None) -> str:
    body = sum(len(m.body) for m in messages)
    text = f"{language}: {len(messages):,} messages ({body / 1e6:.2f} MB of text), {len(entries):,} inbox entries, {len({e.user for e in entries}):,} users"
    return text + (f"; segment {segment_bytes / 1e6:.2f} MB" if segment_bytes else "")


def test_archive_encode(benchmark, month):
    language, messages, entries, _delivered, dictionary, directory, _scale = month
    options = fmt.Options(dictionary=dictionary, **OPTIONS)
    numbers = iter(range(1, 10**6))
    infos = []

    def run():
        infos.append(write_segment(str(directory), fmt.file_name(2026, 3, next(numbers)), 2026, 3, messages, entries, options))

    benchmark.pedantic(run, rounds=1 if benchmark.disabled else 3, warmup_rounds=0)
    seconds = benchmark.stats.stats.median if not benchmark.disabled else 1.0
    raw = sum(41 + len(m.body) for m in messages) + 16 * len(entries)
    info = infos[-1]
    assert info.messages == len(messages) and info.entries == len(entries)
    metrics = {"msg/s": len(messages) / seconds, "MB/s": raw / seconds / 1e6, "segment MB": info.bytes / 1e6, "B/msg": info.bytes / len(messages)}
    RESULTS.record(Row(f"archive encode {language}", "syncstore", metrics, workload=_describe(language, messages, entries, info.bytes)), benchmark)


@pytest.fixture(scope="module")
def segment(month):
    language, messages, entries, _delivered, dictionary, directory, _scale = month
    name = fmt.file_name(2026, 3, 999_999)
    write_segment(str(directory), name, 2026, 3, messages, entries, fmt.Options(dictionary=dictionary, **OPTIONS))
    opened = Segment.open(str(directory), name, BlockCache(256 << 20))
    yield opened
    opened.close()


@pytest.mark.parametrize("deep", [False, True], ids=["quick", "deep"])
def test_archive_verify(benchmark, month, segment, deep):
    language, messages, entries, *_ = month
    reports = []
    benchmark.pedantic(lambda: reports.append(segment.verify(deep=deep)), rounds=1 if benchmark.disabled else 20 if not deep else 3, warmup_rounds=0 if benchmark.disabled else 1)
    seconds = sorted(r.seconds for r in reports)[len(reports) // 2]
    metrics = {"MB/s": segment.size / seconds / 1e6, "ms": seconds * 1e3, "msg/s": len(messages) / seconds}
    RESULTS.record(Row(f"archive verify {language}", f"verify {'deep' if deep else 'quick'}", metrics, workload=_describe(language, messages, entries, segment.size)), benchmark)


@pytest.fixture(scope="module")
def hot(month, tmp_path_factory):
    """A syncstore store holding the month's deliveries, and the queries both read."""
    language, _messages, entries, delivered, _dictionary, _directory, scale = month
    path = os.fspath(tmp_path_factory.mktemp(f"hot-{language}") / "store")
    store = syncstore.open(path, durability="none")
    first = {}  # user -> the segment cursor of the user's first message of the month (hot cursors start at 1)
    for start in range(0, len(delivered), 1_000):
        batch = delivered[start : start + 1_000]
        store.deliver_many([(Message(m.sender, m.conv, m.client_seq, m.body, m.ts_ms, m.priority), [u for u, _ in d.pairs]) for d in batch for m in (d.message,)])
        for d in batch:
            for user, cursor in d.pairs:
                first.setdefault(user, cursor)
    store.flush()
    counts: dict[int, int] = {}
    for entry in entries:
        counts[entry.user] = counts.get(entry.user, 0) + 1
    eligible = [user for user, count in counts.items() if count > LIMIT]
    assert eligible, "no inbox holds more than 100 messages"
    rng = random.Random(9)
    queries = []  # (user, since in the segment, since in the hot store)
    for user in rng.choices(eligible, k=sized(1_000, scale, 30)):
        offset = rng.randrange(counts[user] - LIMIT + 1)
        queries.append((user, first[user] - 1 + offset, offset))
    yield store, queries
    store.close()


def test_archive_read_100(benchmark, month, segment, hot):
    """Warm and cold segment reads and hot syncs, one after the other in the same test: their ratios are what count."""
    language, messages, entries, *_ = month
    store, queries = hot
    for user, since, hot_since in queries[:30]:  # the same 100 messages from both
        got = segment.read_range(user, since, LIMIT)
        page = store.sync(user, since=hot_since, limit=LIMIT)
        assert len(got) == LIMIT and [m.body for m in got] == [m.body for m in page.messages], (user, since)
    cache = segment._cache
    read, sync = segment.read_range, store.sync

    def warm():
        for user, since, _ in queries:
            read(user, since, LIMIT)

    def cold():
        for user, since, _ in queries:
            cache.clear()
            read(user, since, LIMIT)

    def hot_sync():
        for user, _, since in queries:
            sync(user, since=since, limit=LIMIT)

    def hot_decoded():
        for user, _, since in queries:
            tuple(sync(user, since=since, limit=LIMIT).messages)

    warm()  # every block the queries need decoded and cached
    results = {}
    rounds = 1 if benchmark.disabled else 5
    for name, run in (("archive warm", warm), ("archive cold", cold), ("hot sync", hot_sync), ("hot sync decoded", hot_decoded)):
        best = Throughput()
        for _ in range(rounds):
            start = time.perf_counter()
            run()
            seconds = time.perf_counter() - start
            if not best.seconds or seconds < best.seconds:
                best = Throughput(len(queries), seconds)
        results[name] = best
    warm()
    benchmark.pedantic(warm, rounds=1, warmup_rounds=0)
    described = _describe(language, messages, entries, segment.size) + f"; {len(queries):,} random (user, since) returning {LIMIT} messages; best of {rounds}; 1 thread"
    for name, measured in results.items():
        RESULTS.record(Row(f"archive read {language}", name, {"calls/s": measured.rate, "us/call": 1e6 / measured.rate}, workload=described), benchmark)
