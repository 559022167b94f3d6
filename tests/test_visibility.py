"""What a reader has seen is never taken back, in every durability mode (Kafka's high watermark).

Readers (``sync``, ``head``) see only records whose WAL frames are durable.  In
"interval"/"none" mode an acknowledgement may be lost by a power cut, but a
cursor that a reader saw never is, so it can never be handed out again.  Also
here: the "interval" mode's own sync timer, and the durable-prefix evidence
that the flusher stamps into each frame when it writes it.
"""

from __future__ import annotations

import os
import random
import threading

import pytest
from test_power_loss import PowerLossFS, lmdb_snapshots  # noqa: F401 - a fixture, used by name

import syncstore
from syncstore import CorruptionError, Message, SyncStoreError
from syncstore import _codec, _writer
from syncstore._codec import SEGMENT_HEADER_SIZE
from syncstore._fileio import FileSystem


def msg(seq: int, body: bytes = b"") -> Message:
    return Message(sender=5, conv=1, client_seq=seq, body=body or b"m%d" % seq)


@pytest.fixture
def no_timer_sync(monkeypatch):
    """The sync timer never fires on its own: only flush() and close() make writes durable."""
    monkeypatch.setitem(_writer.SYNC_INTERVAL_S, "interval", 3600.0)
    monkeypatch.setitem(_writer.SYNC_INTERVAL_S, "none", 3600.0)


# --- the case ---------------------------------------------------------------------


@pytest.mark.parametrize("durability", ["interval", "none"])
def test_an_acknowledged_unsynced_write_is_not_shown_and_its_cursor_never_seen_twice(tmp_path, durability, no_timer_sync, lmdb_snapshots):  # noqa: F811
    path = str(tmp_path / "s")
    fs = PowerLossFS(random.Random(1))
    store = syncstore.open(path, durability=durability, fs=fs)
    m1 = store.deliver(msg(1), to=[9])
    store.flush()  # m1 is durable
    m2 = store.deliver(msg(2), to=[9])  # acknowledged, not yet synced
    assert m2.cursors == {9: 2}  # tentative until durable
    page = store.sync(9, since=0)
    assert [m.msg_id for m in page.messages] == [m1.msg_id]  # m2 is not shown yet
    assert store.head(9) == 1
    client_cursor = page.next
    fs.off = True  # the power fails: unsynced writes are dropped
    store._abandon()
    fs.crash(drop_all=True)
    lmdb_snapshots(os.path.join(path, "state"))
    with syncstore.open(path, durability=durability) as store:
        m3 = store.deliver(msg(3), to=[9])
        store.flush()
        resumed = store.sync(9, since=client_cursor)
        # The client gets every message it has not seen: m3 (cursor 2, since m2 was lost), never a gap.
        assert [m.msg_id for m in resumed.messages] == [m3.msg_id]
        store.check()


def test_flush_makes_acknowledged_writes_visible(store_path, no_timer_sync):
    with syncstore.open(store_path, durability="interval") as store:
        sent = [store.deliver(msg(seq), to=[1]) for seq in range(1, 6)]
        assert store.head(1) == 0
        store.flush()
        assert store.head(1) == 5
        assert [m.msg_id for m in store.sync(1).messages] == [d.msg_id for d in sent]


def test_sync_mode_shows_every_acknowledged_write_at_once(store_path):
    with syncstore.open(store_path, durability="sync") as store:
        for seq in range(1, 30):
            delivery = store.deliver(msg(seq), to=[1, 2])
            assert store.head(1) == store.head(2) == seq
            assert store.sync(2, since=seq - 1).messages[0].msg_id == delivery.msg_id


# --- the property: in every mode, power cuts, no cursor a reader saw is reassigned ---------


@pytest.mark.parametrize("durability", ["sync", "interval", "none"])
def test_no_cursor_a_reader_saw_is_ever_reassigned(tmp_path, durability, lmdb_snapshots):  # noqa: F811
    rng = random.Random(f"visibility-{durability}")
    users = range(1, 6)
    seen_total = 0
    for run in range(8):
        path = str(tmp_path / f"r{run}")
        seen: dict[tuple[int, int], int] = {}  # (user, cursor) -> msg_id, as any reader saw it
        seq = 0
        for _cut in range(3):
            fs = PowerLossFS(rng, cut_at_write=rng.choice((None, rng.randrange(1, 80))))
            try:
                store = syncstore.open(path, durability=durability, fs=fs, segment_bytes=8192)
            except SyncStoreError:
                assert fs.off
            else:
                try:
                    for _step in range(rng.randrange(20, 150)):
                        seq += 1
                        action = rng.random()
                        if action < 0.5:
                            store.deliver(msg(seq, os.urandom(rng.randrange(1, 300))), to=rng.sample(users, rng.choice((1, 2, 3))))
                        elif action < 0.6:
                            store.deliver_many([(msg(seq * 1000 + i), rng.sample(users, 2)) for i in range(rng.randrange(1, 20))])
                        elif action < 0.65 and durability != "sync":
                            store.flush()
                        else:  # a client reads: everything it sees is now promised
                            user = rng.choice(users)
                            head = store.head(user)
                            for m in store.sync(user, since=max(0, head - 5), limit=10).messages:
                                assert seen.setdefault((user, m.cursor), m.msg_id) == m.msg_id
                except SyncStoreError:
                    assert fs.off  # only the power cut may fail an operation
                fs.off = True
                store._abandon()
            fs.crash(drop_all=rng.random() < 0.5)
            lmdb_snapshots(os.path.join(path, "state"))
            with syncstore.open(path, durability=durability) as store:  # recover, then keep writing
                for user in users:
                    store.deliver(msg(10**9 + seq * 10 + user), to=[user])
                    seq += 1
                store.flush()
                for (user, cursor), msg_id in seen.items():
                    page = store.sync(user, since=cursor - 1, limit=1)
                    assert page.messages and page.messages[0].msg_id == msg_id, f"user {user} cursor {cursor} was reassigned"
                store.check()
        seen_total += len(seen)
    assert seen_total > 100  # readers really saw things


# --- the "interval" sync timer --------------------------------------------------------------


class TimedFS(FileSystem):
    """A fake clock that writes advance (each WAL write 'takes' 30 ms), and a log of writes and syncs."""

    WRITE_S = 0.03

    def __init__(self) -> None:
        self.now = 0.0
        self.events: list[tuple[str, float]] = []
        self.lock = threading.Lock()
        self.wal_fds: set[int] = set()

    def clock(self) -> float:
        with self.lock:
            self.now += 0.0001  # time passes a little on every look, so an idle flusher's timer fires too
            return self.now

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        fd = super().open(path, flags, mode)
        if os.path.basename(path).startswith("wal-"):
            self.wal_fds.add(fd)
        return fd

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        super().pwrite(fd, data, offset)
        if fd in self.wal_fds and offset >= SEGMENT_HEADER_SIZE:
            with self.lock:
                self.now += self.WRITE_S
                self.events.append(("write", self.now))

    def fdatasync(self, fd: int) -> None:
        super().fdatasync(fd)
        with self.lock:
            self.events.append(("sync", self.now))


def test_interval_mode_syncs_on_its_own_timer_under_bulk_load(store_path, monkeypatch):
    """Four threads of bulk deliver_many: no written frame stays unsynced longer than the
    interval (100 ms) plus the one write in progress when it fell due -- by the injected clock,
    so the bound is checked without any timing assumption about this machine."""
    fs = TimedFS()
    monkeypatch.setattr(_writer, "_monotonic", fs.clock)
    store = syncstore.open(store_path, durability="interval", fs=fs)

    def load(worker: int) -> None:
        for batch in range(25):
            store.deliver_many([(Message(worker, 1, batch * 1000 + i, b"x" * 100), [worker, 9]) for i in range(200)])

    threads = [threading.Thread(target=load, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store.close()
    events = list(fs.events)
    writes = [t for kind, t in events if kind == "write"]
    assert len(writes) > 10
    bound = _writer.SYNC_INTERVAL_S["interval"] + TimedFS.WRITE_S + 0.01
    first_unsynced = None
    worst = 0.0
    for kind, t in events:
        if kind == "write" and first_unsynced is None:
            first_unsynced = t
        elif kind == "sync" and first_unsynced is not None:
            worst = max(worst, t - first_unsynced)
            first_unsynced = None
    assert first_unsynced is None, "close() left written frames unsynced"
    assert worst <= bound, f"a write waited {worst:.3f} s (fake clock) for its sync; the bound is {bound:.3f} s"
    syncs = sum(kind == "sync" for kind, _ in events)
    assert syncs <= len(writes), "one sync per timer tick at most, not one per write"


# --- the durable-prefix evidence is written when the data is written ------------------------


def _frame_offsets(path: str) -> list[tuple[int, int]]:
    """(offset, lsn) of every valid frame of a WAL segment."""
    with open(path, "rb") as f:
        data = f.read()
    out, offset = [], SEGMENT_HEADER_SIZE
    while (frame := _codec.decode_frame(data, offset)) is not None:
        out.append((offset, frame.lsn))
        offset = frame.end
    return out


def _flip_bit(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))


@pytest.mark.parametrize("where", ["end of chunk 1", "start of chunk 2", "middle of chunk 3", "a later group", "the group before the last"])
@pytest.mark.parametrize("durability", ["sync", "interval"])
def test_damage_in_an_acknowledged_frame_vouched_for_by_a_later_write_is_corruption(tmp_path, monkeypatch, where, durability, no_timer_sync):
    """deliver_many chunks are written while the next chunk is sequenced, and groups are
    sequenced while the previous one is written: each frame must still record the durable prefix
    as of its *write*, or recovery would take a bit flip in an acknowledged frame for a torn tail
    and drop it (and everything after it), reusing their cursors."""
    monkeypatch.setattr(_writer, "BULK_CHUNK", 40)
    path = str(tmp_path / "s")
    store = syncstore.open(path, durability=durability)
    store.deliver_many([(msg(seq), [1, 2]) for seq in range(1, 201)])  # five chunks of 40
    if durability != "sync":
        store.flush()
    for seq in range(201, 206):  # five more groups, one message each, each made durable
        store.deliver(msg(seq), to=[1])
        if durability != "sync":
            store.flush()
    store._abandon()  # a process crash: everything written stays
    segment = os.path.join(path, "wal", sorted(os.listdir(os.path.join(path, "wal")))[0])
    frames = dict((lsn, offset) for offset, lsn in _frame_offsets(segment))
    lsn = {"end of chunk 1": 40, "start of chunk 2": 41, "middle of chunk 3": 100, "a later group": 202, "the group before the last": 204}[where]
    _flip_bit(segment, frames[lsn] + 40)  # inside the record body
    before = open(segment, "rb").read()
    with pytest.raises(CorruptionError) as refused:
        syncstore.open(path, durability=durability)
    assert refused.value.path == segment and refused.value.offset == frames[lsn]
    assert open(segment, "rb").read() == before  # nothing truncated


def test_damage_in_the_last_group_is_a_torn_tail(tmp_path):
    """The one case no later write vouches for: the last group.  It is cut off as a torn tail
    (in "sync" mode it was acknowledged: a bit flip there is indistinguishable from a torn write)."""
    path = str(tmp_path / "s")
    store = syncstore.open(path)
    for seq in range(1, 11):
        store.deliver(msg(seq), to=[1])
    store._abandon()
    segment = os.path.join(path, "wal", sorted(os.listdir(os.path.join(path, "wal")))[0])
    offset = dict((lsn, off) for off, lsn in _frame_offsets(segment))[10]
    _flip_bit(segment, offset + 40)
    with syncstore.open(path) as store:
        assert store.head(1) == 9
        store.check()
