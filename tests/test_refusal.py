"""Issue 7, section 5: an open that refuses changes nothing.

Every check -- the marker, segment headers, CRCs, LSN continuity, record
decoding, the records' cursor continuity against the LMDB heads, the options
against the stored data -- runs before the first byte or directory entry is
changed: no torn tail truncated, no incomplete segment removed, no record
applied to LMDB, no LOCK, state/ or wal/ created, no marker written.  Each case
hashes the whole directory tree (names, modes, bytes) before and after the
refused open.  And since nothing was changed, CorruptionError's "nothing was
dropped silently" is true: repairing the damage recovers everything.
"""

from __future__ import annotations

import os
import shutil
import tarfile

import lmdb
import pytest

import syncstore
from syncstore import CorruptionError, InvalidArgument, LayoutError, Message, StoreNotFound, SyncStoreError, _codec, _open
from syncstore._codec import encode_deliver, encode_frame
from syncstore._layout import MARKER

from _tree import deliver_records, frame_lsns, read_bytes, segments, tree_digest, write_bytes, write_log

SEGMENT = 4096
USER = 9
LEGACY = os.path.join(os.path.dirname(__file__), "data", "legacy-stores-38dff88.tar.gz")


def refused(path: str, error: type[SyncStoreError] = CorruptionError, **options) -> SyncStoreError:
    """open(path) raises ``error`` and the tree under ``path`` is byte-for-byte, mode-for-mode unchanged."""
    before = tree_digest(path)
    with pytest.raises(error) as info:
        syncstore.open(path, segment_bytes=SEGMENT, **options)
    after = tree_digest(path)
    assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after) if before.get(k) != after.get(k)}
    if isinstance(info.value, CorruptionError) and info.value.hint == CorruptionError.default_hint:
        assert "nothing was dropped silently" in str(info.value)
    return info.value


@pytest.fixture
def unapplied(tmp_path):
    """A store whose state is initialised (applied LSN 0) with 30 unapplied records in its log."""
    path = str(tmp_path / "s")
    syncstore.open(path, segment_bytes=SEGMENT).close()
    wal_dir = os.path.join(path, "wal")
    for name in os.listdir(wal_dir):
        os.unlink(os.path.join(wal_dir, name))
    write_log(wal_dir, deliver_records(30, USER))
    return path


def append_frame(store: str, rtype: int, body: bytes, *, lsn_offset: int = 1, torn_tail: bool = True) -> tuple[str, bytes]:
    """Append a CRC-valid frame (then, optionally, a torn tail) after the last frame of the newest segment."""
    last = segments(store)[-1]
    _first, last_lsn, end = frame_lsns(last)
    original = read_bytes(last)
    lsn = last_lsn + lsn_offset
    data = original[:end] + encode_frame(lsn, rtype, body, lsn - 1)
    if torn_tail:
        data += b"\x17torn tail of an unsynced write\x01"
    write_bytes(last, data)
    return last, original


def test_record_that_breaks_cursor_continuity_truncates_nothing(unapplied):
    """A CRC-valid record whose cursor skips one, followed by a torn tail: the tail stays, nothing is applied."""
    record = deliver_records(1, USER, first_seq=99, first_cursor=32)[0]  # cursor 32 after 30: a gap
    last, original = append_frame(unapplied, 1, encode_deliver(record))
    error = refused(unapplied)
    assert "cursor 32" in str(error) and "head is 30" in str(error)
    # The damage removed, everything acknowledged is there.
    write_bytes(last, original)
    with syncstore.open(unapplied, segment_bytes=SEGMENT) as store:
        assert store.head(USER) == 30


def test_no_batch_is_applied_before_a_bad_record(unapplied, monkeypatch):
    """Replay in small batches: the batches before the bad record must not reach LMDB either."""
    monkeypatch.setattr(_open, "_REPLAY_BATCH", 2)
    record = deliver_records(1, USER, first_seq=99, first_cursor=5)[0]  # a cursor already used
    append_frame(unapplied, 1, encode_deliver(record), torn_tail=False)
    refused(unapplied)


@pytest.mark.parametrize("rtype", [0, 3, 255])  # 1 DELIVER, 2 EXPIRE
def test_unknown_record_type_is_refused_without_change(unapplied, rtype):
    append_frame(unapplied, rtype, b"\x00" * 12)
    error = refused(unapplied)
    assert f"record type {rtype}" in str(error)


def test_undecodable_record_is_refused_without_change(unapplied):
    append_frame(unapplied, 1, b"\x01\x02\x03 not a DELIVER body")
    refused(unapplied)


def test_frame_with_a_wrong_lsn_is_refused_without_change(unapplied):
    record = deliver_records(1, USER, first_seq=99, first_cursor=31)[0]
    append_frame(unapplied, 1, encode_deliver(record), lsn_offset=3)
    refused(unapplied)


def test_bad_frame_vouched_for_by_a_later_one_is_refused_without_change(unapplied):
    last = segments(unapplied)[-1]
    data = bytearray(read_bytes(last))
    first, last_lsn, end = frame_lsns(last)
    assert last_lsn > first
    data[_codec.SEGMENT_HEADER_SIZE + 40] ^= 0x10  # inside the segment's first frame; later frames vouch for it
    write_bytes(last, bytes(data) + b"\x17torn")
    refused(unapplied)


def test_garbage_segment_in_a_store_is_refused_without_change(unapplied):
    for path in segments(unapplied):
        os.unlink(path)
    write_bytes(os.path.join(unapplied, "wal", "wal-00000000000000000001.log"), bytes(range(1, 200)) * 30)
    refused(unapplied)


def test_garbage_segment_in_a_bare_directory_creates_no_lock_and_no_state(tmp_path):
    """Not a store (no marker, no state/): refused as such, and no LOCK or state/ appears."""
    path = str(tmp_path / "bare")
    os.makedirs(os.path.join(path, "wal"))
    write_bytes(os.path.join(path, "wal", "wal-00000000000000000001.log"), bytes(range(1, 200)) * 30)
    error = refused(path, LayoutError)
    assert "not a syncstore store" in str(error)
    assert sorted(os.listdir(path)) == ["wal"]


def test_garbage_segment_in_a_store_without_state_or_lock(unapplied):
    """A store whose state/ and LOCK are gone and whose segment is garbage: refused, and neither comes back."""
    shutil.rmtree(os.path.join(unapplied, "state"))
    os.unlink(os.path.join(unapplied, "LOCK"))
    for path in segments(unapplied):
        os.unlink(path)
    write_bytes(os.path.join(unapplied, "wal", "wal-00000000000000000001.log"), b"\x01" * 600)
    refused(unapplied)
    assert sorted(os.listdir(unapplied)) == [MARKER, "wal"]


def test_missing_evidence_is_refused_without_change(unapplied):
    os.unlink(segments(unapplied)[0])
    refused(unapplied)


@pytest.mark.parametrize(
    "damage",
    ["crc", "magic", "version", "truncated", "longer", "reserved", "replica beyond 1023", "empty"],
)
def test_bad_marker_is_refused_without_change(unapplied, damage):
    marker = os.path.join(unapplied, MARKER)
    data = bytearray(read_bytes(marker))
    if damage == "crc":
        data[20] ^= 0x01
    elif damage == "magic":
        data[0] ^= 0x01
    elif damage == "version":
        data[9] = 2
    elif damage == "truncated":
        del data[20:]
    elif damage == "longer":
        data += b"\x00"
    elif damage in ("reserved", "replica beyond 1023"):
        import struct

        from crc32c import crc32c

        if damage == "reserved":
            data[12:16] = b"\x00\x00\x00\x02"  # an unknown flag (bit 0 is "follower")
        else:
            data[10:12] = struct.pack(">H", 1024)
        data[24:28] = struct.pack(">I", crc32c(bytes(data[:24])))
    else:
        data = bytearray()
    write_bytes(marker, bytes(data))
    error = refused(unapplied)
    assert error.path == marker
    if damage == "version":
        assert "version 2" in str(error)


def test_replica_id_mismatch_is_refused_without_change(unapplied):
    error = refused(unapplied, InvalidArgument, replica_id=5)
    assert "replica_id 0" in str(error)


def test_state_of_another_replica_is_refused_without_change(unapplied, tmp_path):
    """The marker and the LMDB state disagree on the replica: the state belongs to another store."""
    other = str(tmp_path / "other")
    syncstore.open(other, replica_id=3).close()
    shutil.rmtree(os.path.join(unapplied, "state"))
    shutil.copytree(os.path.join(other, "state"), os.path.join(unapplied, "state"))
    error = refused(unapplied)
    assert "replica" in str(error)


def test_unsupported_state_format_is_refused_without_change(unapplied):
    env = lmdb.open(os.path.join(unapplied, "state"), max_dbs=8)
    with env.begin(write=True) as txn:
        txn.put(b"format_version", (99).to_bytes(8, "big"), db=env.open_db(b"meta", txn=txn))
    env.close()
    error = refused(unapplied)
    assert "format 99" in str(error)


def test_garbage_lmdb_state_is_refused_without_change(unapplied):
    write_bytes(os.path.join(unapplied, "state", "data.mdb"), b"\x07" * 16384)
    refused(unapplied)


def test_max_map_size_below_the_stored_data_is_refused_without_change(tmp_path):
    path = str(tmp_path / "s")
    with syncstore.open(path, map_size=1 << 20) as store:
        store.deliver_many([(Message(1, 1, i, b"x" * 4000), [1, 2, 3]) for i in range(1, 800)])  # bodies are stored once
    used = os.path.getsize(os.path.join(path, "state", "data.mdb"))
    assert used > 2 << 20
    error = refused(path, InvalidArgument, map_size=1 << 20, max_map_size=2 << 20)
    assert error.key == "max_map_size" and "smaller than" in str(error)


def test_not_a_store_is_refused_without_change(tmp_path):
    path = tmp_path / "photos"
    path.mkdir()
    (path / "holiday.jpg").write_bytes(b"\xff\xd8 not a store")
    (path / "state").mkdir()
    error = refused(str(path), LayoutError)
    assert "holiday.jpg" in str(error)


@pytest.mark.parametrize("entry", ["wal", "state"])
def test_plain_file_where_a_store_keeps_a_directory_is_refused_without_change(unapplied, entry):
    target = os.path.join(unapplied, entry)
    shutil.rmtree(target)
    write_bytes(target, b"a plain file")
    error = refused(unapplied, LayoutError)
    assert error.path == target and "not a directory" in str(error)


def test_create_false_on_an_empty_directory_creates_nothing(tmp_path):
    path = tmp_path / "empty"
    path.mkdir()
    refused(str(path), StoreNotFound, create=False)
    assert os.listdir(path) == []


def _legacy(tmp_path, name: str) -> str:
    with tarfile.open(LEGACY) as tar:
        tar.extractall(tmp_path, filter="data")
    return str(tmp_path / name)


def test_legacy_store_with_a_damaged_log_gains_no_marker(tmp_path):
    """Migration (writing the marker) happens only after the whole store validated."""
    path = _legacy(tmp_path, "legacy-crashed")
    (segment,) = segments(path)
    data = bytearray(read_bytes(segment))
    data[_codec.SEGMENT_HEADER_SIZE + 30] ^= 0x08  # a frame the later frames vouch for
    write_bytes(segment, bytes(data))
    refused(path)
    assert not os.path.exists(os.path.join(path, MARKER))


def test_legacy_store_with_a_discontinuous_record_gains_no_marker(tmp_path):
    path = _legacy(tmp_path, "legacy-crashed")
    record = deliver_records(1, 8, first_seq=999, first_cursor=77)[0]
    append_frame(path, 1, encode_deliver(record))
    refused(path)
    assert not os.path.exists(os.path.join(path, MARKER))


def test_readonly_view_of_a_legacy_store_is_refused_without_change(tmp_path):
    path = _legacy(tmp_path, "legacy-closed")
    error = refused(path, LayoutError, readonly=True)
    assert "without readonly=True" in str(error)


@pytest.mark.parametrize("batch", [1, 7, 29, 30, 31])
def test_replay_in_batches_lands_every_record_in_order(unapplied, monkeypatch, batch):
    """Validation reads the log once, the apply once more, in transactions of _REPLAY_BATCH records: all land, in order."""
    monkeypatch.setattr(_open, "_REPLAY_BATCH", batch)
    with syncstore.open(unapplied, segment_bytes=SEGMENT) as store:
        assert store.head(USER) == 30
        assert [m.client_seq for m in store.sync(USER, 0, 100).messages] == list(range(1, 31))
        store.check()


def test_a_bad_record_after_many_good_ones_changes_nothing(unapplied, monkeypatch):
    monkeypatch.setattr(_open, "_REPLAY_BATCH", 2)  # many apply transactions would follow: none may run
    record = deliver_records(1, USER, first_seq=99, first_cursor=40)[0]
    append_frame(unapplied, 1, encode_deliver(record))
    refused(unapplied)
