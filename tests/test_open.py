"""Issue 7, section 11: open() at the edges -- the store marker, create=False, layout errors,
migration of stores written before the marker, finishing an interrupted creation, max_map_size,
recipients read once, and clock_ms validated."""

from __future__ import annotations

import errno
import fcntl
import os
import tarfile
import types

import pytest

import syncstore
from syncstore import InvalidArgument, LayoutError, Message, StoreLocked, StoreNotFound, SyncStoreError
from syncstore._fileio import FileSystem
from syncstore._layout import MARKER, MARKER_SIZE, MARKER_TEMP, decode_marker, encode_marker, Marker
from syncstore.state import State
from syncstore.wal import segment_name

from _tree import read_bytes, tree_digest, write_bytes

LEGACY = os.path.join(os.path.dirname(__file__), "data", "legacy-stores-38dff88.tar.gz")


def msg(seq: int, body: bytes = b"x", sender: int = 1) -> Message:
    return Message(sender=sender, conv=1, client_seq=seq, body=body)


# --- the path ------------------------------------------------------------------------------------


def test_empty_path_is_invalid_and_creates_nothing_in_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidArgument) as info:
        syncstore.open("")
    assert info.value.key == "path" and "empty" in str(info.value)
    assert os.listdir(tmp_path) == []


def test_create_false_on_a_missing_path(tmp_path):
    path = tmp_path / "mistyped"
    with pytest.raises(StoreNotFound) as info:
        syncstore.open(str(path), create=False)
    assert str(path) in str(info.value) and isinstance(info.value, SyncStoreError)
    assert not path.exists()


def test_create_false_opens_an_existing_store(tmp_path):
    path = str(tmp_path / "s")
    with syncstore.open(path) as store:
        store.deliver(msg(1), to=[5])
    with syncstore.open(path, create=False) as store:
        assert store.head(5) == 1


@pytest.mark.parametrize("value", [0, 1, None, "yes"])
def test_create_must_be_a_bool(tmp_path, value):
    with pytest.raises(InvalidArgument) as info:
        syncstore.open(str(tmp_path / "s"), create=value)
    assert info.value.key == "create"
    assert not (tmp_path / "s").exists()


def test_a_component_of_the_path_is_a_file(tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(LayoutError):
        syncstore.open(str(tmp_path / "file" / "store"))


def test_marker_that_is_a_directory(tmp_path):
    path = str(tmp_path / "s")
    syncstore.open(path).close()
    os.unlink(os.path.join(path, MARKER))
    os.mkdir(os.path.join(path, MARKER))
    with pytest.raises(LayoutError) as info:
        syncstore.open(path)
    assert info.value.path == os.path.join(path, MARKER)


def test_non_empty_directory_that_is_not_a_store_names_what_it_holds(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(LayoutError) as info:
        syncstore.open(str(tmp_path))
    assert "notes.txt" in str(info.value) and "not a syncstore store" in str(info.value)
    assert os.listdir(tmp_path) == ["notes.txt"]


# --- the marker ---------------------------------------------------------------------------------


def test_new_store_has_a_marker_with_its_replica_and_a_random_epoch(tmp_path):
    epochs = set()
    for i, replica in enumerate((0, 7, 1023)):
        path = str(tmp_path / f"s{i}")
        with syncstore.open(path, replica_id=replica) as store:
            data = read_bytes(os.path.join(path, MARKER))
            assert len(data) == MARKER_SIZE == 28
            marker = decode_marker(data)
            assert marker.replica_id == replica and marker.version == 1
            assert marker.epoch == store.epoch != 0
            epochs.add(marker.epoch)
        with syncstore.open(path, replica_id=replica) as store:
            assert store.epoch == marker.epoch  # stable across reopens
    assert len(epochs) == 3


def test_marker_layout_is_pinned():
    """The byte layout of docs/format.md: magic, version, replica, flags, epoch, CRC-32C."""
    data = encode_marker(Marker(replica_id=0x0102, epoch=0x1122334455667788))
    assert data[:8] == b"SSTORE\r\n"
    assert data[8:10] == b"\x00\x01"
    assert data[10:12] == b"\x01\x02"
    assert data[12:16] == b"\x00" * 4
    assert data[16:24] == bytes.fromhex("1122334455667788")
    from crc32c import crc32c

    assert data[24:28] == crc32c(data[:24]).to_bytes(4, "big")
    assert decode_marker(data) == Marker(0x0102, 0x1122334455667788)
    follower = encode_marker(Marker(replica_id=0x0102, epoch=0x1122334455667788, follower=True))
    assert follower[12:16] == b"\x00\x00\x00\x01" and decode_marker(follower).follower


class RecordingFS(FileSystem):
    """Records (operation, path) of the seam's calls, and whether LMDB's data file existed at each."""

    def __init__(self, store: str) -> None:
        self.store = store
        self.calls: list[tuple[str, str, bool]] = []
        self.paths: dict[int, str] = {}

    def _note(self, op: str, path: str) -> None:
        self.calls.append((op, os.path.relpath(path, self.store), os.path.exists(os.path.join(self.store, "state", "data.mdb"))))

    def open(self, path, flags, mode=0o644):
        fd = super().open(path, flags, mode)
        self.paths[fd] = path
        self._note("open", path)
        return fd

    def fsync(self, fd):
        super().fsync(fd)
        self._note("fsync", self.paths[fd])

    def rename(self, src, dst):
        super().rename(src, dst)
        self._note("rename", dst)

    def fsync_dir(self, path):
        super().fsync_dir(path)
        self._note("fsync_dir", path)


def test_creation_order_marker_then_durable_first_segment_then_durable_state(tmp_path, monkeypatch):
    path = str(tmp_path / "s")
    fs = RecordingFS(path)
    forced: list[bool] = []
    real_sync = State.sync

    def sync(self):
        forced.append(self.created)
        fs.calls.append(("State.sync", "state", True))
        real_sync(self)

    monkeypatch.setattr(State, "sync", sync)
    syncstore.open(path, fs=fs).close()
    ops = [(op, where) for op, where, _lmdb in fs.calls]
    marker_durable = ops.index(("fsync_dir", "."))
    assert ops.index(("rename", MARKER)) < marker_durable
    segment = os.path.join("wal", segment_name(1))
    assert marker_durable < ops.index(("open", segment)) < ops.index(("fsync", segment)) < ops.index(("fsync_dir", "wal"))
    # The LMDB state did not exist until the first segment was durable, and was forced durable at once.
    assert not any(lmdb for op, where, lmdb in fs.calls[: ops.index(("fsync_dir", "wal")) + 1])
    assert forced[0] is True
    assert ops.index(("fsync_dir", "wal")) < ops.index(("State.sync", "state"))


class FailAt(FileSystem):
    """The Nth operation (and every later one) fails, as a crash at that point would leave things."""

    def __init__(self, n: int) -> None:
        self.n, self.count = n, 0

    def __getattribute__(self, name):
        attr = super().__getattribute__(name)
        if name in ("open", "pwrite", "write", "allocate", "fsync", "fdatasync", "rename", "fsync_dir", "unlink", "truncate", "read_file", "listdir"):

            def failing(*args, **kwargs):
                self.count += 1
                if self.count >= self.n:
                    raise OSError(errno.EIO, f"crash at operation {self.n}")
                return attr(*args, **kwargs)

            return failing
        return attr


def test_creation_interrupted_at_every_step_is_finished_by_the_next_open(tmp_path):
    reached_the_end = False
    for n in range(1, 40):
        path = str(tmp_path / f"n{n}")
        try:
            syncstore.open(path, fs=FailAt(n)).close()
            reached_the_end = True
            break
        except SyncStoreError:
            pass
        with syncstore.open(path) as store:  # a healthy open finishes (or redoes) the creation
            assert store.epoch != 0
            assert store.deliver(msg(1), to=[3]).cursors == {3: 1}
        with syncstore.open(path, create=False) as store:
            assert store.head(3) == 1
            store.check()
    assert reached_the_end


def test_directory_holding_only_a_temp_marker_counts_as_empty(tmp_path):
    path = tmp_path / "s"
    path.mkdir()
    write_bytes(str(path / MARKER_TEMP), b"SSTORE\r\n\x00")  # a crash while writing the marker
    with pytest.raises(StoreNotFound):
        syncstore.open(str(path), create=False)
    with syncstore.open(str(path)) as store:
        assert store.deliver(msg(1), to=[1]).cursors == {1: 1}
    assert sorted(os.listdir(path)) == ["LOCK", MARKER, "state", "wal"]


@pytest.mark.parametrize("left", ["marker only", "empty wal dir", "incomplete first segment", "zeroed first segment", "empty state dir", "empty data.mdb"])
def test_store_whose_creation_did_not_finish_opens(tmp_path, left):
    """After the marker, nothing can have been acknowledged until the LMDB state was initialised."""
    template = str(tmp_path / "template")
    syncstore.open(template).close()
    path = str(tmp_path / "s")
    os.makedirs(path)
    write_bytes(os.path.join(path, MARKER), read_bytes(os.path.join(template, MARKER)))
    if left != "marker only":
        os.makedirs(os.path.join(path, "wal"))
    first = os.path.join(path, "wal", segment_name(1))
    if left == "incomplete first segment":
        write_bytes(first, read_bytes(os.path.join(template, "wal", segment_name(1)))[:10])
    elif left == "zeroed first segment":
        write_bytes(first, bytes(4096))
    elif left in ("empty state dir", "empty data.mdb"):
        write_bytes(first, read_bytes(os.path.join(template, "wal", segment_name(1))))
        os.makedirs(os.path.join(path, "state"))
        if left == "empty data.mdb":
            write_bytes(os.path.join(path, "state", "data.mdb"), b"")
    with syncstore.open(path) as store:
        assert store.epoch == decode_marker(read_bytes(os.path.join(template, MARKER))).epoch
        assert store.deliver(msg(1), to=[1]).cursors == {1: 1}
    with syncstore.open(path, create=False) as store:
        assert store.head(1) == 1
        store.check()


# --- stores written before the marker ------------------------------------------------------------


def _legacy(tmp_path, name: str) -> str:
    with tarfile.open(LEGACY) as tar:
        tar.extractall(tmp_path, filter="data")
    return str(tmp_path / name)


def test_legacy_closed_store_opens_and_gains_the_marker(tmp_path):
    path = _legacy(tmp_path, "legacy-closed")
    assert not os.path.exists(os.path.join(path, MARKER))
    with syncstore.open(path, segment_bytes=65536, create=False) as store:
        epoch = store.epoch
        assert epoch != 0
        assert store.head(7) == store.head(9) == 40
        assert 13 <= store.head(11) <= 14
        assert [m.client_seq for m in store.sync(9, 0, 100).messages] == list(range(1, 41))
        assert store.deliver(Message(7, 42, 1, b"hello 1"), to=[7, 9]).duplicate  # a retry: same content
        assert store.check()["inbox_entries"] == 80 + store.head(11)
        assert store.deliver(Message(7, 42, 41, b"new"), to=[9]).cursors == {9: 41}
    marker = decode_marker(read_bytes(os.path.join(path, MARKER)))
    assert marker.epoch == epoch and marker.replica_id == 0
    assert os.stat(os.path.join(path, MARKER)).st_mode & 0o777 == 0o600
    with syncstore.open(path, segment_bytes=65536) as store:
        assert store.epoch == epoch and store.head(9) == 41


def test_legacy_crashed_store_replays_its_unapplied_tail_and_gains_the_marker(tmp_path):
    path = _legacy(tmp_path, "legacy-crashed")
    with syncstore.open(path, segment_bytes=65536) as store:
        assert store.head(8) == store.head(12) == 40
        assert [m.client_seq for m in store.sync(12, 0, 100).messages] == list(range(1, 41))
        store.check()
    assert os.path.exists(os.path.join(path, MARKER))
    with syncstore.open(path, readonly=True) as view:
        assert view.head(12) == 40


def test_legacy_store_opened_with_another_replica_id_is_refused_and_not_migrated(tmp_path):
    path = _legacy(tmp_path, "legacy-closed")
    before = tree_digest(path)
    with pytest.raises(InvalidArgument) as info:
        syncstore.open(path, replica_id=5)
    assert "replica_id 0" in str(info.value)
    assert tree_digest(path) == before


def test_legacy_store_held_by_an_older_writer_is_refused(tmp_path):
    """Writers of syncstore before the marker flock only LOCK: a new writer must respect that lock."""
    path = _legacy(tmp_path, "legacy-closed")
    fd = os.open(os.path.join(path, "LOCK"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a 38dff88 writer holds
        before = tree_digest(path)
        with pytest.raises(StoreLocked):
            syncstore.open(path)
        assert tree_digest(path) == before
    finally:
        os.close(fd)


def test_new_writer_keeps_an_older_writer_out(tmp_path):
    """The other way round: while a new writer runs, LOCK is held, as older versions expect."""
    path = str(tmp_path / "s")
    with syncstore.open(path):
        fd = os.open(os.path.join(path, "LOCK"), os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)


# --- options --------------------------------------------------------------------------------------


def test_max_map_size_at_least_the_stored_data_is_accepted(tmp_path):
    path = str(tmp_path / "s")
    with syncstore.open(path, map_size=1 << 20) as store:
        store.deliver_many([(Message(1, 1, i, b"x" * 2000), [1, 2, 3]) for i in range(1, 400)])
    used = os.path.getsize(os.path.join(path, "state", "data.mdb"))
    with pytest.raises(InvalidArgument) as info:
        syncstore.open(path, map_size=1 << 20, max_map_size=used - 4096)
    assert info.value.key == "max_map_size" and str(used) in str(info.value)
    with syncstore.open(path, map_size=1 << 20, max_map_size=used) as store:
        assert store.head(1) == 399


@pytest.mark.parametrize("value", [1.5, 1_700_000_000_000.0, "1700000000000", None, True, -1, 2**64], ids=repr)
def test_clock_returning_a_non_int_is_refused_at_open(tmp_path, value):
    path = tmp_path / "s"
    with pytest.raises(InvalidArgument) as info:
        syncstore.open(str(path), clock_ms=lambda: value)
    assert info.value.key == "clock_ms" and repr(value) in str(info.value)
    assert not path.exists() or os.listdir(path) == []


def test_clock_raising_is_refused_at_open(tmp_path):
    def broken() -> int:
        raise RuntimeError("no time source")

    with pytest.raises(InvalidArgument) as info:
        syncstore.open(str(tmp_path / "s"), clock_ms=broken)
    assert "no time source" in str(info.value)


def test_clock_turning_bad_later_is_a_clear_error_and_writes_nothing(tmp_path):
    reading: list[object] = [1_700_000_000_000]
    with syncstore.open(str(tmp_path / "s"), clock_ms=lambda: reading[0]) as store:
        assert store.deliver(msg(1), to=[4]).cursors == {4: 1}
        reading[0] = 1_700_000_000_001.5
        with pytest.raises(InvalidArgument) as info:
            store.deliver(msg(2), to=[4])
        assert not isinstance(info.value, TypeError) and info.value.key == "clock_ms"
        assert store.head(4) == 1
        reading[0] = 1_700_000_000_002
        assert store.deliver(msg(2), to=[4]).cursors == {4: 2}


# --- recipients -----------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path):
    with syncstore.open(str(tmp_path / "s")) as store:
        yield store


@pytest.mark.parametrize(
    "make",
    [lambda: (u for u in [1, 2]), lambda: iter([1, 2]), lambda: {1, 2}, lambda: range(1, 3), lambda: frozenset((2, 1)), lambda: {1: "a", 2: "b"}.keys()],
    ids=["generator", "iterator", "set", "range", "frozenset", "dict keys"],
)
def test_any_iterable_of_ids_is_read_once(store, make):
    d = store.deliver(msg(1), to=make())
    assert dict(d.cursors) == {1: 1, 2: 1}
    batch = store.deliver_many([(msg(2), make())])
    assert dict(batch[0].cursors) == {1: 2, 2: 2}


@pytest.mark.parametrize("to", [{1: "a", 2: "b"}, types.MappingProxyType({1: 1})], ids=["dict", "mappingproxy"])
def test_a_mapping_is_refused(store, to):
    with pytest.raises(InvalidArgument) as info:
        store.deliver(msg(1), to=to)
    assert info.value.key == "to" and "mapping" in str(info.value)
    assert store.head(1) == 0


def test_generator_with_a_bad_id_writes_nothing(store):
    with pytest.raises(InvalidArgument):
        store.deliver(msg(1), to=(u for u in [1, -5]))
    assert store.head(1) == 0
    assert store.deliver(msg(1), to=(u for u in [1])).cursors == {1: 1}


def test_empty_generator_names_the_problem(store):
    with pytest.raises(InvalidArgument) as info:
        store.deliver(msg(1), to=(u for u in []))
    assert "at least one recipient" in str(info.value)


# --- the WAL (or state) on its own volume -----------------------------------------------------------


def test_empty_wal_and_state_mount_points_count_as_an_empty_directory(tmp_path):
    path = tmp_path / "s"
    (path / "wal" / "lost+found").mkdir(parents=True)  # a freshly made file system mounted there
    (path / "state").mkdir()
    with syncstore.open(str(path), create=True) as store:
        assert store.deliver(msg(1), to=[1]).cursors == {1: 1}
    with syncstore.open(str(path)) as store:  # lost+found is not part of the log
        assert store.head(1) == 1
    assert os.path.isdir(path / "wal" / "lost+found")
    with pytest.raises(StoreNotFound):
        other = tmp_path / "o"
        (other / "wal").mkdir(parents=True)
        syncstore.open(str(other), create=False)


def test_wal_directory_may_be_a_symlink_to_another_disk(tmp_path):
    disk = tmp_path / "fast-disk" / "wal"
    disk.mkdir(parents=True)
    path = tmp_path / "s"
    path.mkdir()
    os.symlink(disk, path / "wal")
    with syncstore.open(str(path)) as store:
        store.deliver(msg(1), to=[1])
    assert any(name.startswith("wal-") for name in os.listdir(disk))
    with syncstore.open(str(path)) as store:
        assert store.head(1) == 1


def test_a_wal_directory_with_a_file_is_not_an_empty_store(tmp_path):
    path = tmp_path / "s"
    (path / "wal").mkdir(parents=True)
    (path / "wal" / "something").write_bytes(b"?")
    with pytest.raises(LayoutError):
        syncstore.open(str(path))
