"""``get(msg_id)`` of random stored messages, against a raw LMDB point read.

Data set, loaded once: the sync benchmark's 1:1 data (100,000 messages among
1,000 users at scale 1, 200-byte bodies, ``deliver_many`` x 1,000); the
msg_ids come from the deliveries.  Each round looks up 20,000 of them at
random (scale 1), one call each, one thread, all in the page cache.

- **syncstore**: ``store.get(msg_id)``, a decoded ``MessageRecord``.
- **lmdb**: ``txn.get(msg_id)`` on ``messages`` in its own read transaction,
  on a byte-for-byte copy of the store's ``state/``
  (``_peers.LmdbCeiling.get_reader``): raw bytes, undecoded -- the least a
  point read from Python can do.

Before timing: every sampled message is the one delivered (sender, conv,
client_seq, body) on both systems, and ids never issued give ``None`` on both.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import time

import pytest
from _harness import RESULTS, Row, Throughput, one_to_one_items, scale_for, sized
from _peers import LmdbCeiling

import syncstore
from syncstore import Message

BODY = 200
BATCH = 1_000


@pytest.fixture(scope="module")
def get_data(request, tmp_path_factory):
    """syncstore and the raw peer holding the messages, the msg_ids to look up, and a description."""
    scale = scale_for(request.config.getoption("benchmark_disable", default=False))
    users = sized(1_000, scale, 20)
    items = one_to_one_items(sized(100_000, scale, 2_000), users, BODY, seed=11)
    root = tmp_path_factory.mktemp("get")
    path = os.fspath(root / "syncstore")
    delivered = {}  # msg_id -> (sender, conv, client_seq, body)
    with syncstore.open(path) as store:
        for start in range(0, len(items), BATCH):
            batch = items[start : start + BATCH]
            results = store.deliver_many([(Message(s, c, q, b), to) for s, c, q, b, to in batch])
            delivered.update((d.msg_id, (s, c, q, b)) for d, (s, c, q, b, _to) in zip(results, batch))
    assert len(delivered) == len(items)
    state_format = LmdbCeiling.state_format(os.path.join(path, "state"))
    assert state_format == LmdbCeiling.FORMAT, f"syncstore's state is format {state_format}: this benchmark needs format 3"
    shutil.copytree(os.path.join(path, "state"), root / "lmdb")
    store = syncstore.open(path)
    raw = LmdbCeiling(os.fspath(root / "lmdb"), readonly=True)
    rng = random.Random(3)
    ids = rng.choices(sorted(delivered), k=sized(20_000, scale, 200))
    _check(store, raw, delivered, ids[:500])
    described = f"{len(items):,} 1:1 messages among {users:,} users, {BODY}-byte bodies; {len(ids):,} random stored msg_ids per round; 1 thread"
    yield store, raw, ids, described
    store.close()
    raw.close()


def _check(store, raw, delivered, ids) -> None:
    get = raw.get_reader()
    for msg_id in ids:
        record = store.get(msg_id)
        assert record is not None and (record.msg_id, record.sender, record.conv, record.client_seq, record.body) == (msg_id, *delivered[msg_id]), msg_id
        value = get(msg_id)
        _refs, sender, conv, client_seq, ts_ms, priority = struct.unpack_from(">IQQQQB", value)
        assert (sender, conv, client_seq, ts_ms, priority, value[37:]) == (record.sender, record.conv, record.client_seq, record.ts_ms, record.priority, record.body)
    for unknown in (0, 1, min(delivered) - 1, max(delivered) + 1, 2**64 - 1):
        assert unknown in delivered or (store.get(unknown) is None and get(unknown) is None), unknown


@pytest.mark.parametrize("system", ["syncstore", "lmdb"])
def test_get_random(benchmark, system, get_data):
    store, raw, ids, described = get_data
    get = store.get if system == "syncstore" else raw.get_reader()
    total = Throughput()
    found = [0]

    def run():
        start = time.perf_counter()
        hits = 0
        for msg_id in ids:
            hits += get(msg_id) is not None
        total.add(Throughput(len(ids), time.perf_counter() - start))
        found[0] = hits

    benchmark.pedantic(run, rounds=1 if benchmark.disabled else 10, warmup_rounds=0 if benchmark.disabled else 1)
    assert found[0] == len(ids)  # every id is a stored message
    RESULTS.record(Row("get", system, {"calls/s": total.rate, "us/call": 1e6 / total.rate}, workload=described), benchmark)
