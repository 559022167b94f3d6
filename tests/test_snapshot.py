"""Incremental snapshots and restore: exactness, deltas from the log, damage, untrusted directories.

Every comparison is of a full dump of the LMDB state (every item of every
database, meta included): a restored store must be byte for byte the source
at the snapshot's LSN -- across deliveries, retries, dedup expiry (EXPIRE
records), reopens and collapses.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import threading

import pytest
from _snapshots import dump, dump_restored, tree
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import syncstore
from test_dedup import expire_all
import syncstore._fileio
from syncstore import CorruptionError, InvalidArgument, Message, StoreLocked, StoreNotFound, snapshot_chain
from syncstore import _snapdir
from syncstore import _snapformat as fmt
from syncstore import snapshot as snapshot_module
from syncstore._codec import Deliver, Expire
from syncstore._ids import msg_id_ms
from syncstore._statekeys import touched
from syncstore.snapshot import newest_snapshot

CLOCK = 1_700_000_000_000  # a fixed clock: ids borrow milliseconds, nothing ever expires


def clock() -> int:
    return CLOCK


def open_store(path: str, **options) -> syncstore.Store:
    return syncstore.open(path, clock_ms=clock, **options)


def record_of(message: Message, delivery: syncstore.Delivery) -> Deliver:
    """The DELIVER record a first delivery wrote (enough of it for its touched items)."""
    return Deliver(delivery.msg_id, message.sender, message.conv, message.client_seq, 0, 0, b"", tuple(delivery.cursors.items()))


def items_of(records) -> set:
    found = set()
    for record in records:
        found.update(touched(record))
    return found


def dump_items(state_dump) -> set:
    """The dump as touched-items: (db, key, duplicate) for DUPSORT databases, (db, key, None) otherwise."""
    items = set()
    for name, pairs in state_dump.items():
        if name == "meta":
            continue
        for key, value in pairs:
            items.add((name, key, value if name in fmt.DUP_DBS else None))
    return items


def fill(store: syncstore.Store, start: int, count: int, users: int = 12) -> list[tuple[Message, syncstore.Delivery]]:
    """``count`` messages, 1:1 and to groups, and a retry of every fifth (a duplicate)."""
    sent = []
    for seq in range(start, start + count):
        sender = seq % users
        to = [sender, (seq * 7 + 1) % users] if seq % 3 else [(sender + k) % users for k in range(5)]
        message = Message(sender, seq % 4, seq, b"body %d" % seq * (seq % 5))
        delivery = store.deliver(message, to=to)
        sent.append((message, delivery))
        if seq % 5 == 0:
            again = store.deliver(message, to=to)
            assert again.duplicate and again.msg_id == delivery.msg_id
    return sent


# --- touched items against a real store ------------------------------------------------------


def test_touched_items_are_exactly_what_the_state_holds(store_path):
    with open_store(store_path) as store:
        sent = fill(store, 1, 60)
        store._writer.apply_pending()
        state = dump(store)
        items = items_of(record_of(m, d) for m, d in sent)
        # complete: every item in LMDB was touched by some record (a touched() that forgets one fails)
        assert dump_items(state) == items
        # and each touched item re-reads as present, with the value the dump holds
        values = {(name, key): value for name, pairs in state.items() for key, value in pairs}
        for name, key, dup in items:
            assert (name, key) in values
        assert len(items) == sum(len(pairs) for name, pairs in state.items() if name != "meta")


def test_expire_touches_its_expiry_and_dedup_keys():
    items = list(touched(Expire(((5, 1, 2), (6, 3, 4)))))
    assert ("dedup", (1).to_bytes(8, "big") + (2).to_bytes(8, "big"), None) in items
    assert ("dedup_expiry", b"".join(n.to_bytes(8, "big") for n in (6, 3, 4)), None) in items
    assert len(items) == 4
    with pytest.raises(TypeError):
        list(touched(("not", "a record")))  # type: ignore[arg-type]


# --- the model: any interleaving, restore each snapshot k == the store at k -------------------


DAY = 86_400_000


class FakeClock:
    """A settable wall clock in epoch milliseconds."""

    def __init__(self, now: int = CLOCK) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


class SnapshotMachine(RuleBasedStateMachine):
    """Deliveries (1:1, groups, retries), dedup expiry, snapshots, full snapshots, reopens: each snapshot restores exactly.

    A delta must hold exactly one row per item touched by the records since the previous snapshot --
    counted from ``store.changes()``, the change log's own reader, which yields EXPIRE records too.
    """

    def __init__(self) -> None:
        super().__init__()
        self.root = None

    @initialize(tmp=st.just(None))
    def start(self, tmp) -> None:
        import tempfile

        self.root = tempfile.mkdtemp(prefix="snapmachine-")
        self.path = os.path.join(self.root, "store")
        self.dest = os.path.join(self.root, "snaps")
        self.clock = FakeClock()
        self.store = self._open()
        self.seq = 0
        self.snapshots: list[tuple[int, dict]] = []  # (lsn, dump) per snapshot in the current chain
        self.sent: dict = {}

    def _open(self) -> syncstore.Store:
        return syncstore.open(self.path, clock_ms=self.clock, dedup_window_ms=DAY, hot_window_ms=DAY)

    @rule(sender=st.integers(0, 5), peer=st.integers(0, 5), body=st.binary(max_size=40))
    def one_to_one(self, sender, peer, body) -> None:
        self._deliver(Message(sender, 100 + min(sender, peer), self._next(), body), [sender, peer])

    @rule(members=st.sets(st.integers(0, 9), min_size=1, max_size=6), body=st.binary(max_size=200))
    def group(self, members, body) -> None:
        self._deliver(Message(min(members), 7, self._next(), body), sorted(members))

    @rule(data=st.data())
    def retry(self, data) -> None:
        if not self.sent:
            return
        key = data.draw(st.sampled_from(sorted(self.sent)))
        message, to, first, expired = self.sent[key]
        again = self.store.deliver(message, to=to)
        if expired:  # the key left the dedup window: a retry is a new delivery (and a new first delivery)
            assert not again.duplicate
            self.sent[key] = (message, to, again, False)
        else:
            assert again.duplicate and again.msg_id == first.msg_id and dict(again.cursors) == dict(first.cursors)

    @rule(days=st.sampled_from([0.5, 1.5]))
    def time_passes(self, days) -> None:
        """The clock moves on; keys older than the dedup window (a day) expire through EXPIRE records."""
        self.clock.now += int(days * DAY)
        expire_all(self.store)
        for key, (message, to, first, expired) in self.sent.items():
            if self.clock.now - msg_id_ms(first.msg_id) > DAY:
                self.sent[key] = (message, to, first, True)

    @rule(full=st.booleans())
    def snapshot(self, full) -> None:
        previous = self.snapshots[-1][0] if self.snapshots else None
        info = self.store.snapshot(self.dest, full=full)
        state = dump(self.store)
        since = [] if previous is None else [change.record() for change in self.store.changes(since=previous)]
        if info.reason.startswith("nothing written"):
            assert previous is not None and not since and not full
            return
        if info.kind == "delta":
            # only the changed items: as many rows as the records since the previous snapshot touched
            assert info.rows == len(items_of(since))
            assert info.prev_lsn == previous
        else:
            self.snapshots = []
        assert info.lsn == self.store._state.applied_lsn()
        self.snapshots.append((info.lsn, state))

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = self._open()

    @invariant()
    def chain_matches(self) -> None:
        if self.root is None:
            return
        chain = snapshot_chain(self.dest)
        assert [info.lsn for info in chain] == [lsn for lsn, _state in self.snapshots]

    def teardown(self) -> None:
        if self.root is None:
            return
        try:
            self.store.close()
            for index, (lsn, expected) in enumerate(self.snapshots):
                assert dump_restored(self.dest, os.path.join(self.root, f"restored{index}"), lsn=lsn) == expected
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def _next(self) -> int:
        self.seq += 1
        return self.seq

    def _deliver(self, message: Message, to: list[int]) -> None:
        delivery = self.store.deliver(message, to=to)
        assert not delivery.duplicate
        self.sent[(message.sender, message.client_seq)] = (message, to, delivery, False)


TestSnapshotMachine = SnapshotMachine.TestCase
TestSnapshotMachine.settings = settings(max_examples=25, stateful_step_count=30, deadline=None)


# --- deltas, bases, collapse ----------------------------------------------------------------------


def test_a_delta_holds_only_the_changed_items(tmp_path):
    path, dest = str(tmp_path / "s"), str(tmp_path / "snaps")
    with open_store(path) as store:
        fill(store, 1, 300)
        base = store.snapshot(dest)
        changed = fill(store, 1000, 3)
        delta = store.snapshot(dest)
        state = dump(store)
    assert base.kind == "base" and delta.kind == "delta" and delta.prev_lsn == base.lsn
    assert delta.rows == len(items_of(record_of(m, d) for m, d in changed)) < base.rows / 20
    assert base.rows == len(dump_items(state)) - delta.rows  # a quiet store's base: one row per item
    assert dump_restored(dest, str(tmp_path / "r")) == state


def test_full_collapses_the_chain_into_a_new_base(tmp_path):
    path, dest = str(tmp_path / "s"), str(tmp_path / "snaps")
    with open_store(path) as store:
        fill(store, 1, 50)
        first = store.snapshot(dest)
        fill(store, 100, 5)
        store.snapshot(dest)
        fill(store, 200, 5)
        collapsed = store.snapshot(dest, full=True)
        state = dump(store)
    assert collapsed.kind == "base" and "full=True" in collapsed.reason
    assert [info.lsn for info in snapshot_chain(dest)] == [collapsed.lsn]
    assert sorted(os.listdir(dest)) == ["MANIFEST", os.path.basename(collapsed.file)]  # the old chain is gone
    assert not os.path.exists(first.file)
    assert dump_restored(dest, str(tmp_path / "r")) == state


def test_a_retired_log_gives_a_new_base_and_says_so(tmp_path):
    path, dest = str(tmp_path / "s"), str(tmp_path / "snaps")
    # No retention, and the snapshot's pin on the log after it is capped at two segments.
    with open_store(path, segment_bytes=4096, log_retention_bytes=0, log_retention_ms=0, max_log_bytes=8192) as store:
        fill(store, 1, 20)
        store.snapshot(dest)
        fill(store, 100, 200)  # many segments of 4 KiB: applied ones are retired, the snapshot's pin is over its cap
        store._writer.apply_pending()
        assert store._wal.first_lsn > snapshot_chain(dest)[-1].lsn + 1
        info = store.snapshot(dest)
        state = dump(store)
    assert info.kind == "base" and "WAL no longer holds" in info.reason
    assert len(snapshot_chain(dest)) == 1
    assert dump_restored(dest, str(tmp_path / "r")) == state


def test_an_unchanged_store_writes_nothing(tmp_path):
    path, dest = str(tmp_path / "s"), str(tmp_path / "snaps")
    with open_store(path) as store:
        fill(store, 1, 5)
        first = store.snapshot(dest)
        again = store.snapshot(dest)
    assert again.file == first.file and again.reason.startswith("nothing written")
    assert len(snapshot_chain(dest)) == 1


def test_an_empty_store_snapshots_and_restores(tmp_path):
    path, dest = str(tmp_path / "s"), str(tmp_path / "snaps")
    with open_store(path) as store:
        info = store.snapshot(dest)
        state = dump(store)
    assert (info.lsn, info.rows) == (0, 0)
    assert dump_restored(dest, str(tmp_path / "r")) == state
    with syncstore.open(str(tmp_path / "r")) as restored:
        assert restored.deliver(Message(1, 1, 1, b"x"), to=[1]).cursors == {1: 1}


# --- a snapshot under concurrent writes is exactly the state at its LSN ------------------------------


def test_writes_between_the_chunks_are_caught_by_the_rereads(tmp_path, monkeypatch):
    """Deterministic interleaving: after every chunk of the scan and of the re-reads (outside the read
    transactions) one more message is delivered and applied, up to the very end, so items change under the
    scan; the snapshot must still equal the final state, and no read transaction may read more than about a
    chunk of items (a snapshot that re-reads everything in its last transaction is exact, but holds it long).
    One write per two chunks of 7 items: the writer is slower than the re-reads, so their rounds shrink."""
    path, dest = str(tmp_path / "s"), str(tmp_path / "snaps")
    monkeypatch.setattr(snapshot_module, "CHUNK_ROWS", 7)
    store = open_store(path)
    fill(store, 1, 60)
    counter = iter(range(10_000, 20_000))
    flushes = []
    per_transaction = []
    real_flush, real_put_items = _snapdir.SnapWriter.flush, snapshot_module._put_items

    def flush_and_write_more(self, final=False):
        real_flush(self, final)
        flushes.append(1)
        if not final and len(flushes) % 2:  # outside every read transaction: one more message (5 items), applied
            seq = next(counter)
            store.deliver(Message(seq % 12, 1, seq, b"late"), to=[seq % 12])
            store._writer.apply_pending()

    def put_items(context, txn, items, out):
        per_transaction.append(len(items))
        real_put_items(context, txn, items, out)

    monkeypatch.setattr(_snapdir.SnapWriter, "flush", flush_and_write_more)
    monkeypatch.setattr(snapshot_module, "_put_items", put_items)
    try:
        base = store.snapshot(dest)
        assert len(flushes) > 40  # the scan really was interleaved with writes
        assert base.lsn == store._state.applied_lsn()  # nothing was applied after the final read
        assert max(per_transaction) <= 7 + 5 and len(per_transaction) > 5, str(per_transaction)  # re-read in rounds of short transactions
        state = dump(store)
        fill(store, 30_000, 40)
        per_transaction.clear()
        delta = store.snapshot(dest)  # a delta, with writes going on while it re-reads
        assert delta.kind == "delta" and delta.lsn == store._state.applied_lsn()
        assert max(per_transaction) <= 7 + 5
        later = dump(store)
    finally:
        store.close()
    assert dump_restored(dest, str(tmp_path / "r"), lsn=base.lsn) == state
    assert dump_restored(dest, str(tmp_path / "r2")) == later


def test_snapshots_under_concurrent_writers_restore_to_a_prefix_of_the_log(tmp_path, monkeypatch):
    """Writer threads and an applier loop run while snapshots are taken: each restored snapshot at LSN L must
    hold exactly the first L deliveries (LSN order is msg_id order) and pass check()."""
    path, dest = str(tmp_path / "s"), str(tmp_path / "snaps")
    monkeypatch.setattr(snapshot_module, "CHUNK_ROWS", 16)
    store = open_store(path)
    fill(store, 1, 100)
    done = threading.Event()
    acked: list[int] = []
    progress = threading.Condition()
    errors: list[BaseException] = []

    def writer(index: int) -> None:
        try:
            seq = 100_000 * (index + 1)
            while not done.is_set():
                seq += 1
                delivery = store.deliver(Message(index, 9, seq, b"w%d" % seq), to=[index, 20 + seq % 7, 30 + seq % 11])
                with progress:
                    acked.append(delivery.msg_id)
                    progress.notify_all()
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
            with progress:
                progress.notify_all()

    def applier() -> None:
        while not done.is_set():
            store._writer.apply_pending()

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(3)] + [threading.Thread(target=applier)]
    for thread in threads:
        thread.start()
    try:
        infos = []
        for _ in range(4):
            with progress:  # let the writers get ahead (no sleep: woken by each acknowledgement)
                progress.wait_for(lambda: errors or len(acked) >= 200 * (len(infos) + 1))
            infos.append(store.snapshot(dest))
    finally:
        done.set()
        for thread in threads:
            thread.join()
        store.close()
    assert not errors, errors
    with syncstore.open(path) as reopened:
        all_ids = sorted(m.msg_id for uid in range(41) for m in _all_messages(reopened, uid))
    for index, info in enumerate(infos):
        target = str(tmp_path / f"r{index}")
        syncstore.restore(dest, target, lsn=info.lsn)
        with syncstore.open(target) as restored:
            restored.check()
            ids = sorted({m.msg_id for uid in range(41) for m in _all_messages(restored, uid)})
        assert ids == sorted(set(all_ids))[: info.lsn]


def _all_messages(store, uid):
    since, out = 0, []
    while True:
        page = store.sync(uid, since=since, limit=1000)
        out.extend(page.messages)
        since = page.next
        if not page.has_more:
            return out


# --- a restored store answers as the source did -----------------------------------------------------


def test_a_restored_store_answers_sync_head_and_dedup_as_the_source(tmp_path):
    path, dest = str(tmp_path / "s"), str(tmp_path / "snaps")
    with open_store(path) as store:
        sent = fill(store, 1, 80)
        store.snapshot(dest)
        pages = {uid: list(store.sync(uid, limit=1000).messages) for uid in range(12)}
        heads = {uid: store.head(uid) for uid in range(12)}
        epoch = store.epoch
    info = syncstore.restore(dest, str(tmp_path / "r"))
    assert info.lsn == 80
    with open_store(str(tmp_path / "r")) as restored:
        assert restored.epoch != epoch  # a restore rewinds history: a new epoch
        assert {uid: restored.head(uid) for uid in range(12)} == heads
        assert {uid: list(restored.sync(uid, limit=1000).messages) for uid in range(12)} == pages
        for message, first in sent[::7]:
            again = restored.deliver(message, to=list(first.cursors))
            assert again.duplicate and again.msg_id == first.msg_id and dict(again.cursors) == dict(first.cursors)
        fresh = restored.deliver(Message(1, 1, 10**6, b"new"), to=[1])
        assert fresh.msg_id > max(d.msg_id for _m, d in sent) and fresh.cursors == {1: heads[1] + 1}
        assert restored.sync(1, since=heads[1] + 5).reset  # a client ahead of the restored history is told
    syncstore.restore(dest, str(tmp_path / "f"), follower=True)
    with open_store(str(tmp_path / "f"), follower=True) as follower:
        assert follower.epoch == epoch


def test_restore_into_an_empty_directory_and_refusals(tmp_path):
    path, dest = str(tmp_path / "s"), str(tmp_path / "snaps")
    with open_store(path) as store:
        fill(store, 1, 10)
        store.snapshot(dest)
        fill(store, 50, 3)
        store.snapshot(dest)
    empty = tmp_path / "empty"
    empty.mkdir()
    syncstore.restore(dest, str(empty), lsn=10)
    with syncstore.open(str(empty)) as restored:
        assert restored.check()["applied_lsn"] == 10
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_bytes(b"x")
    with pytest.raises(InvalidArgument, match="not empty"):
        syncstore.restore(dest, str(full))
    with pytest.raises(InvalidArgument, match="LSNs 10, 13") as caught:
        syncstore.restore(dest, str(tmp_path / "n"), lsn=11)
    assert caught.value.key == "lsn"
    with pytest.raises(StoreNotFound):
        syncstore.restore(str(tmp_path / "nothing"), str(tmp_path / "n"))
    with pytest.raises(StoreNotFound):
        syncstore.restore(str(tmp_path), str(tmp_path / "n"))  # a directory without a manifest
    for bad in ("", None, 5):
        with pytest.raises(InvalidArgument):
            syncstore.restore(bad, str(tmp_path / "n"))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        syncstore.restore(dest, str(tmp_path / "n"), follower="yes")  # type: ignore[arg-type]
    assert not os.path.exists(tmp_path / "n")


# --- damage: any byte of any file, and untrusted directories ---------------------------------------


@pytest.fixture
def small_chain(tmp_path):
    """A snapshot directory with a small base and a small delta."""
    path, dest = str(tmp_path / "s"), str(tmp_path / "snaps")
    with open_store(path) as store:
        fill(store, 1, 6, users=4)
        store.snapshot(dest)
        fill(store, 50, 2, users=4)
        store.snapshot(dest)
    return dest


def _refused(dest: str, target: str, exception=CorruptionError):
    parent = os.path.dirname(target)
    before = tree(parent)
    with pytest.raises(exception) as caught:
        syncstore.restore(dest, target)
    assert not os.path.exists(target)
    assert tree(parent) == before  # nothing written anywhere, no temporary directory either
    return caught.value


@pytest.mark.parametrize("which", ["base", "delta", "MANIFEST"])
def test_any_damaged_byte_is_refused_naming_file_and_offset(small_chain, tmp_path, which):
    name = next(n for n in os.listdir(small_chain) if n.startswith(which))
    path = os.path.join(small_chain, name)
    original = open(path, "rb").read()
    out = tmp_path / "out"
    out.mkdir()
    for at in range(len(original)):
        damaged = bytearray(original)
        damaged[at] ^= 0x5A
        with open(path, "wb") as f:
            f.write(damaged)
        error = _refused(small_chain, str(out / "r"))
        assert error.path == path and error.offset is not None, (at, error)
    with open(path, "wb") as f:
        f.write(original)
    assert syncstore.restore(small_chain, str(out / "r")).lsn == 8


def test_a_truncated_or_extended_file_is_refused(small_chain, tmp_path):
    base = next(os.path.join(small_chain, n) for n in os.listdir(small_chain) if n.startswith("base"))
    original = open(base, "rb").read()
    for data in (original[:-1], original[:100], original + b"\0", b""):
        with open(base, "wb") as f:
            f.write(data)
        assert _refused(small_chain, str(tmp_path / "r")).path == base


def test_a_manifest_naming_files_outside_is_refused_before_anything_is_written(small_chain, tmp_path):
    manifest = _snapdir.read_manifest(small_chain)
    outside = tmp_path / "outside"
    outside.mkdir()
    base = manifest.chain[0]
    shutil.copy(os.path.join(small_chain, base.name), outside / base.name)
    for name in ("../outside/" + base.name, str(outside / base.name), "/etc/passwd"):
        document = {"source": {"replica_id": manifest.replica_id, "epoch": manifest.epoch}, "chain": [{
            "name": name, "kind": "base", "lsn": base.lsn, "prev_lsn": 0, "size": base.size, "crc32c": base.crc,
            "rows": base.rows, "puts": base.puts, "deletes": base.deletes, "last_msg_id": base.last_msg_id}]}
        with open(os.path.join(small_chain, "MANIFEST"), "wb") as f:
            f.write(fmt._encode_envelope(fmt.MANIFEST_MAGIC, document))
        assert "manifest" in str(_refused(small_chain, str(tmp_path / "r")))


def test_a_symlink_leading_out_is_refused(small_chain, tmp_path):
    base = _snapdir.read_manifest(small_chain).chain[0]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.move(os.path.join(small_chain, base.name), outside / base.name)  # a valid file, but outside
    os.symlink(outside / base.name, os.path.join(small_chain, base.name))
    assert "leads out" in _refused(small_chain, str(tmp_path / "r")).message
    os.unlink(os.path.join(small_chain, base.name))
    os.symlink(outside, os.path.join(small_chain, "MANIFEST.lnk"))
    shutil.move(os.path.join(small_chain, "MANIFEST"), outside / "MANIFEST")
    os.symlink(outside / "MANIFEST", os.path.join(small_chain, "MANIFEST"))
    assert "leads out" in _refused(small_chain, str(tmp_path / "r")).message


def test_a_wrong_checksum_or_another_file_is_refused(small_chain, tmp_path):
    manifest = _snapdir.read_manifest(small_chain)
    base = manifest.chain[0]
    wrong = fmt.Manifest(manifest.replica_id, manifest.epoch, (fmt.ChainEntry(**{**{f: getattr(base, f) for f in base.__slots__}, "crc": base.crc ^ 1}),) + manifest.chain[1:])
    with open(os.path.join(small_chain, "MANIFEST"), "wb") as f:
        f.write(fmt.encode_manifest(wrong))
    assert "manifest" in _refused(small_chain, str(tmp_path / "r")).message
    other = fmt.Manifest(manifest.replica_id, manifest.epoch + 1, manifest.chain)  # files of another history
    with open(os.path.join(small_chain, "MANIFEST"), "wb") as f:
        f.write(fmt.encode_manifest(other))
    assert "not what the manifest says" in _refused(small_chain, str(tmp_path / "r")).message
    os.unlink(os.path.join(small_chain, manifest.chain[1].name))
    with open(os.path.join(small_chain, "MANIFEST"), "wb") as f:
        f.write(fmt.encode_manifest(manifest))
    assert "missing" in _refused(small_chain, str(tmp_path / "r")).message


# --- the snapshot directory and the store's record ----------------------------------------------------


def test_leftovers_of_a_crash_are_removed_by_the_next_snapshot(tmp_path):
    path, dest = str(tmp_path / "s"), str(tmp_path / "snaps")
    with open_store(path) as store:
        fill(store, 1, 5)
        store.snapshot(dest)
        for name in ("snapshot-1-2.tmp", "MANIFEST.tmp", "delta-00000000000000000005-00000000000000000009.snap"):
            (tmp_path / "snaps" / name).write_bytes(b"half")
        (tmp_path / "snaps" / "notes.txt").write_bytes(b"not ours")
        fill(store, 100, 2)
        info = store.snapshot(dest)
    assert sorted(os.listdir(dest)) == sorted(["MANIFEST", "notes.txt", "base-00000000000000000005.snap", os.path.basename(info.file)])


def test_snapshot_directory_checks(tmp_path):
    path, dest = str(tmp_path / "s"), str(tmp_path / "snaps")
    with open_store(path) as store:
        fill(store, 1, 3)
        with pytest.raises(InvalidArgument, match="inside the store"):
            store.snapshot(os.path.join(path, "snaps"))
        with pytest.raises(InvalidArgument):
            store.snapshot("")
        store.snapshot(dest)
        fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            with pytest.raises(StoreLocked, match="another snapshot"):
                store.snapshot(dest)
        finally:
            os.close(fd)
    with open_store(str(tmp_path / "other")) as other:
        fill(other, 1, 3)
        with pytest.raises(InvalidArgument, match="another store"):
            other.snapshot(dest)


def test_the_store_records_its_newest_snapshot(tmp_path):
    path = str(tmp_path / "s")
    assert newest_snapshot(path) is None
    with open_store(path) as store:
        fill(store, 1, 3)
        store.snapshot(str(tmp_path / "a"))
        fill(store, 10, 3)
        store.snapshot(str(tmp_path / "b"))
        assert newest_snapshot(path) == (6, str(tmp_path / "b"))
        store.snapshot(str(tmp_path / "a"))
    shutil.rmtree(tmp_path / "b")
    assert newest_snapshot(path) == (6, str(tmp_path / "a"))  # a directory that is gone is skipped
    syncstore.renew_epoch(path)
    assert newest_snapshot(path) is None  # snapshots of the history before a rewind do not count


def test_a_read_only_view_snapshots_what_is_applied(tmp_path):
    path, dest = str(tmp_path / "s"), str(tmp_path / "snaps")
    with open_store(path) as store:
        fill(store, 1, 20)
    with syncstore.open(path, readonly=True) as view:
        state = dump(view)
        info = view.snapshot(dest)
    assert info.kind == "base" and info.lsn == 20
    assert dump_restored(dest, str(tmp_path / "r")) == state


WRITER = r"""
import sys, syncstore
from syncstore import Message
store = syncstore.open(sys.argv[1])
seq = 0
for line in sys.stdin:
    for _ in range(int(line)):
        seq += 1
        store.deliver(Message(seq % 9, 1, seq, b"m%d" % seq), to=[seq % 9, (seq + 4) % 9])
    store._writer.apply_pending()
    print(seq, flush=True)
store.close()
"""


def test_the_cli_snapshots_a_store_another_process_writes(tmp_path):
    path, dest = str(tmp_path / "s"), str(tmp_path / "snaps")
    child = subprocess.Popen([sys.executable, "-c", WRITER, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        infos = []
        for count in (40, 7):
            child.stdin.write(f"{count}\n")
            child.stdin.flush()
            written = int(child.stdout.readline())
            done = subprocess.run([sys.executable, "-m", "syncstore.cli", "snapshot", path, dest], capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
            infos.append((written, done.stdout))
    finally:
        child.stdin.close()
        child.wait()
    assert "base" in infos[0][1] and "delta" in infos[1][1]
    assert [info.lsn for info in snapshot_chain(dest)] == [40, 47]
    done = subprocess.run([sys.executable, "-m", "syncstore.cli", "restore", dest, str(tmp_path / "r"), "--lsn", "40"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with syncstore.open(str(tmp_path / "r")) as restored:
        assert sum(restored.head(uid) for uid in range(9)) == 80
    done = subprocess.run([sys.executable, "-m", "syncstore.cli", "restore", dest, str(tmp_path / "r2"), "--lsn", "41"], capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.startswith("syncstore: error:") and "40, 47" in done.stderr


def test_a_delta_starts_at_the_recorded_wal_position_and_ignores_a_wrong_one(tmp_path, monkeypatch):
    """The store's record keeps where the WAL record after the newest snapshot is: the next delta reads from
    there, without walking its segment; a position that is wrong (stale, edited) is checked and ignored."""
    from syncstore import _walread

    path, dest = str(tmp_path / "s"), str(tmp_path / "snaps")
    walks = []
    real_skip = _walread.LogReader._skip
    monkeypatch.setattr(_walread.LogReader, "_skip", lambda self, first, target: walks.append(target) or real_skip(self, first, target))
    with open_store(path) as store:
        fill(store, 1, 200)
        store.snapshot(dest)
        walks.clear()
        fill(store, 1000, 5)
        store.snapshot(dest)
        assert walks == []  # the recorded position was right: no walk from the segment's start
        _epoch, recorded = fmt.decode_record_file(open(os.path.join(path, "SNAPSHOTS"), "rb").read())
        first, offset = recorded[dest].wal
        for index, wrong in enumerate(((first, offset + 3), (first, 24), (first + 10**6, offset))):
            data = fmt.encode_record_file(store.epoch, {dest: fmt.Recorded(recorded[dest].lsn, wrong)})
            with open(os.path.join(path, "SNAPSHOTS"), "wb") as f:
                f.write(data)
            fill(store, 2000 + 10 * index, 3)
            changed = store.snapshot(dest)
            assert changed.kind == "delta"
            _epoch, recorded = fmt.decode_record_file(open(os.path.join(path, "SNAPSHOTS"), "rb").read())
        state = dump(store)
    assert dump_restored(dest, str(tmp_path / "r")) == state


class _FullDisk(syncstore._fileio.FileSystem):
    """Fails every pwrite with ENOSPC while ``full`` is set."""

    full = False

    def pwrite(self, fd, data, offset):
        if self.full:
            import errno

            raise OSError(errno.ENOSPC, "No space left on device")
        super().pwrite(fd, data, offset)


def test_a_full_disk_fails_the_snapshot_cleanly(tmp_path):
    path, dest = str(tmp_path / "s"), str(tmp_path / "snaps")
    fs = _FullDisk()
    with open_store(path, fs=fs) as store:
        fill(store, 1, 10)
        first = store.snapshot(dest)
        fill(store, 100, 3)
        fs.full = True
        with pytest.raises(syncstore.StoreFull, match="no space"):
            store.snapshot(dest)
        fs.full = False
        assert [i.lsn for i in snapshot_chain(dest)] == [first.lsn]  # the chain as it was
        assert store.deliver(Message(1, 1, 10**6, b"still fine"), to=[1]).cursors
        store.snapshot(dest)
        assert not [n for n in os.listdir(dest) if n.endswith(".tmp")]
        state = dump(store)
    assert dump_restored(dest, str(tmp_path / "r")) == state


def test_the_cli_commands_have_examples_and_clear_errors(tmp_path, capsys):
    from syncstore.cli import main

    for command in ("snapshot", "restore"):
        assert main([command, "--help"]) == 0
        out = capsys.readouterr().out
        assert "example:" in out and f"syncstore {command} " in out
    assert main(["snapshot", str(tmp_path / "missing"), str(tmp_path / "d")]) == 1
    assert capsys.readouterr().err.startswith("syncstore: error: no store at")
    assert main(["restore", str(tmp_path / "missing"), str(tmp_path / "r")]) == 1
    assert "no snapshot directory" in capsys.readouterr().err
    assert main(["restore", str(tmp_path), str(tmp_path / "r"), "--lsn", "-1"]) == 2
    assert not os.path.exists(tmp_path / "r") and not os.path.exists(tmp_path / "d")


def test_a_delta_touching_too_many_items_is_written_as_a_base(tmp_path, monkeypatch):
    path, dest = str(tmp_path / "s"), str(tmp_path / "snaps")
    monkeypatch.setattr(snapshot_module, "MAX_DELTA_ITEMS", 30)
    with open_store(path) as store:
        fill(store, 1, 10)
        store.snapshot(dest)
        fill(store, 100, 3)  # ~21 items: a delta
        assert store.snapshot(dest).kind == "delta"
        fill(store, 200, 10)  # ~70 items: over the limit
        info = store.snapshot(dest)
        state = dump(store)
    assert info.kind == "base" and "more than 30 items" in info.reason
    assert dump_restored(dest, str(tmp_path / "r")) == state


def test_a_restore_in_progress_keeps_snapshot_writers_out(tmp_path):
    path, dest = str(tmp_path / "s"), str(tmp_path / "snaps")
    with open_store(path) as store:
        fill(store, 1, 3)
        store.snapshot(dest)
        fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_SH)  # what restore holds while it reads the directory
        try:
            fill(store, 10, 1)
            with pytest.raises(StoreLocked, match="or a restore is reading it"):
                store.snapshot(dest)
        finally:
            os.close(fd)


# --- the WAL reader ----------------------------------------------------------------------------------


def _log(directory: str, count: int, segment_bytes: int = 4096):
    """A WAL of ``count`` DELIVER records over several small segments; returns their records."""
    from syncstore import _codec
    from syncstore.wal import WriteAheadLog

    wal = WriteAheadLog.open(directory, next_lsn=1, segment_bytes=segment_bytes)
    records = []
    for lsn in range(1, count + 1):
        record = Deliver(lsn << 22, lsn % 5, 1, lsn, 0, 0, b"x" * (lsn % 300), ((lsn % 7, lsn),))
        wal.append(_codec.encode_frame(lsn, _codec.RECORD_DELIVER, _codec.encode_deliver(record), lsn), lsn, lsn)
        records.append(record)
    wal.sync()
    wal.close()
    return records


def test_the_wal_reader_reads_ranges_across_segments(tmp_path):
    from syncstore import _codec
    from syncstore._walread import LogReader, LogRetired

    directory = str(tmp_path / "wal")
    os.mkdir(directory)
    records = _log(directory, 120)
    assert len(os.listdir(directory)) >= 4
    with LogReader(directory) as reader:
        for after, upto in ((0, 3), (3, 50), (50, 51), (90, 120), (10, 20)):
            got = [_codec.decode_deliver(frame.body) for frame in reader.frames(after, upto)]
            assert got == records[after:upto]
        assert list(reader.frames(120, 120)) == []
        open_before = len(reader._fds)
        list(reader.frames(118, 120))  # segments wholly before LSN 119 are closed again
        assert len(reader._fds) < open_before
        position = reader.position(60)
    with LogReader(directory) as reader:
        assert reader.resume(60, *position)
        assert [f.lsn for f in reader.frames(60, 63)] == [61, 62, 63]
    first = sorted(os.listdir(directory))[0]
    os.unlink(os.path.join(directory, first))  # retired
    with LogReader(directory) as reader:
        with pytest.raises(LogRetired):
            list(reader.frames(0, 5))


def test_the_wal_reader_reports_a_damaged_frame_below_the_applied_lsn(tmp_path):
    from syncstore._walread import LogReader

    directory = str(tmp_path / "wal")
    os.mkdir(directory)
    _log(directory, 40)
    name = sorted(os.listdir(directory))[1]
    with open(os.path.join(directory, name), "r+b") as f:
        f.seek(24 + 30)
        f.write(b"\xff")
    with LogReader(directory) as reader:
        with pytest.raises(CorruptionError) as caught:
            list(reader.frames(0, 40))
    assert caught.value.path.endswith(name) and caught.value.offset == 24


def test_a_last_msg_id_of_zero_survives_a_snapshot(tmp_path):
    """msg_id 0 is a real id (replica 0, the first id of 2020-01-01T00:00:00Z): "no last_msg_id" is not 0."""
    from syncstore._ids import EPOCH_MS

    path, dest = str(tmp_path / "s"), str(tmp_path / "snaps")
    with syncstore.open(path, clock_ms=lambda: EPOCH_MS) as store:
        assert store.deliver(Message(1, 1, 1, b"first"), to=[1]).msg_id == 0
        store.snapshot(dest)
        state = dump(store)
    assert (b"last_msg_id", bytes(8)) in state["meta"]
    assert snapshot_chain(dest)[0].lsn == 1
    assert dump_restored(dest, str(tmp_path / "r")) == state


def test_a_restored_follower_catches_up_with_its_leader(tmp_path):
    path, dest, copy = str(tmp_path / "leader"), str(tmp_path / "snaps"), str(tmp_path / "follower")
    clock = FakeClock()
    options = dict(clock_ms=clock, dedup_window_ms=DAY, hot_window_ms=DAY)
    with syncstore.open(path, **options) as leader:
        fill(leader, 1, 40)
        base = leader.snapshot(dest)
        fill(leader, 100, 10)
        clock.now += 2 * DAY
        expire_all(leader)  # EXPIRE records after the snapshot
        fill(leader, 200, 5)
        syncstore.restore(dest, copy, follower=True)
        with syncstore.open(copy, follower=True, **options) as follower:
            assert follower.epoch == leader.epoch and follower.lsn == base.lsn
            follower.apply_changes(leader.changes(since=base.lsn))
            follower._writer.apply_pending()
            leader._writer.apply_pending()
            assert dump(follower) == dump(leader)


def test_snapshot_required_names_the_snapshot_and_a_consumer_catches_up_with_it(tmp_path):
    """A reader behind the retained log is told which snapshot bridges the gap; restoring it as a follower
    and applying the changes after its LSN gives the leader's state."""
    path, dest, copy = str(tmp_path / "leader"), str(tmp_path / "snaps"), str(tmp_path / "caught-up")
    with open_store(path, segment_bytes=4096, log_retention_bytes=0, log_retention_ms=0) as leader:
        fill(leader, 1, 60)
        leader.snapshot(dest)
        fill(leader, 500, 40)  # more segments: the first snapshot pins the log after it
        info = leader.snapshot(dest)  # so this is a delta; the log before it then goes
        assert info.kind == "delta" and info.lsn == 100
        fill(leader, 900, 1)
        leader._writer.apply_pending()
        with pytest.raises(syncstore.SnapshotRequired) as caught:
            list(leader.changes(since=0))
        error = caught.value
        assert (error.snapshot_lsn, error.snapshot_dir) == (info.lsn, dest)
        syncstore.restore(error.snapshot_dir, copy, lsn=error.snapshot_lsn, follower=True)
        with open_store(copy, follower=True) as follower:
            follower.apply_changes(leader.changes(since=error.snapshot_lsn))
            follower._writer.apply_pending()
            assert dump(follower) == dump(leader)


def test_the_newest_snapshot_pins_the_log_after_it_so_it_keeps_bridging_the_gap(tmp_path):
    path, dest = str(tmp_path / "s"), str(tmp_path / "snaps")
    with open_store(path, segment_bytes=4096, log_retention_bytes=0, log_retention_ms=0) as store:
        fill(store, 1, 200)  # several segments before the snapshot: those go
        snapped = store.snapshot(dest).lsn
        fill(store, 1000, 200)
        store._writer.apply_pending()
        assert store._wal.first_lsn <= snapped + 1  # kept: the snapshot plus the log after it reach now
        with pytest.raises(syncstore.SnapshotRequired) as caught:
            store.changes(since=0)
        assert (caught.value.snapshot_lsn, caught.value.snapshot_dir) == (snapped, os.path.abspath(dest))
        assert len(list(store.changes(since=snapped))) == store.lsn - snapped
