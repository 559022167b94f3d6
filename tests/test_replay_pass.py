"""Replay on open reads the log in one checking pass and decodes each record once, in place.

The fast paths of docs/benchmarks.md ("Issue 8", replay) must agree with the
plain ones they replace:

* ``_codec.scan_frames`` stops exactly where a walk with ``decode_frame`` stops
  (CRC, length, LSN), on any bytes;
* ``_codec.decode_frames`` decodes what ``decode_record`` decodes, and names
  the file and the frame's offset when it refuses;
* recovery reads the newest segment only up to its last non-zero 1 MiB block:
  a frame whose trailing zero bytes run into the unread part, and a frame
  there that vouches for a damaged one, are still found (the whole file is
  read and judged whenever the frames do not end cleanly);
* the replay check runs inside recovery, yet recovery's own verdict (a gap)
  still comes first.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import syncstore
from syncstore import CorruptionError, _codec
from syncstore._codec import SEGMENT_HEADER_SIZE, Deliver, Expire, encode_frame
from syncstore.wal import WriteAheadLog, segment_name

from _tree import deliver_records, read_bytes, segments, tree_digest, write_bytes, write_log

MIB = 1 << 20


def _walk(data: bytes, offset: int, first_lsn: int) -> tuple[list[int], int, bool]:
    """What scan_frames must return, by decode_frame at each offset."""
    starts, lsn = [], first_lsn
    while (frame := _codec.decode_frame(data, offset)) is not None:
        if frame.lsn != lsn:
            return starts, offset, True
        starts.append(offset)
        offset, lsn = frame.end, lsn + 1
    return starts, offset, False


frames_and_damage = st.tuples(
    st.lists(st.tuples(st.sampled_from((1, 2, 7)), st.binary(max_size=80)), max_size=8),
    st.integers(0, 2**40),
    st.lists(st.tuples(st.integers(0, 2000), st.integers(1, 255)), max_size=3),
    st.binary(max_size=40),
    st.integers(-1, 2),
)


@settings(max_examples=300, deadline=None)
@given(frames_and_damage)
def test_scan_frames_stops_where_decode_frame_stops(case):
    records, first_lsn, flips, tail, lsn_skew = case
    data = bytearray(b"".join(encode_frame(first_lsn + i, rtype, body, first_lsn) for i, (rtype, body) in enumerate(records)) + tail)
    for position, xor in flips:
        if position < len(data):
            data[position] ^= xor
    expected_first = max(0, first_lsn + lsn_skew)
    assert _codec.scan_frames(bytes(data), 0, expected_first) == _walk(bytes(data), 0, expected_first)


def test_zeros_from_checks_every_byte():
    data = bytes(3 * 65536 + 5)
    assert _codec.zeros_from(data, 0) and _codec.zeros_from(data, len(data)) and _codec.zeros_from(b"", 0)
    for position in (0, 1, 65535, 65536, 2 * 65536 + 17, len(data) - 1):
        damaged = data[:position] + b"\x01" + data[position + 1 :]
        assert not _codec.zeros_from(damaged, 0)
        assert _codec.zeros_from(damaged, position + 1)


def _frames(records: list[_codec.Record], first_lsn: int) -> bytes:
    return b"".join(encode_frame(first_lsn + i, *_codec.encode_record(record), first_lsn) for i, record in enumerate(records))


def test_decode_frames_agrees_with_decode_record_and_stops_at_its_limit():
    records: list[_codec.Record] = list(deliver_records(5, 9))
    records.insert(2, Expire(((1_700_000_000_000, 1, 1), (1_700_000_000_001, 2, 5))))
    records.append(records[0]._replace(pairs=((1, 1), (2, 1), (3, 1))))  # a group message
    records.append(records[0]._replace(pairs=((4, 1),), body=b""))
    data = b"\x00" * 7 + _frames(records, 100)
    decoded, end = _codec.decode_frames(data, 7, len(data), 100, 1000, "seg")
    assert decoded == records and end == len(data)
    assert all(type(a) is type(b) for a, b in zip(decoded, records))
    first, middle = _codec.decode_frames(data, 7, len(data), 100, 3, "seg")
    rest, end = _codec.decode_frames(data, middle, len(data), 103, 1000, "seg")
    assert first + rest == records and end == len(data)


@pytest.mark.parametrize("damage", ["lsn", "deliver lengths", "short deliver", "unknown type", "cut"])
def test_decode_frames_names_the_file_and_the_frame(damage):
    records = deliver_records(3, 9)
    good = _frames(records[:2], 1)
    if damage == "lsn":
        bad = _frames(records[2:], 7)
    elif damage == "deliver lengths":
        bad = encode_frame(3, 1, _codec.encode_deliver(records[2]) + b"\x00", 1)
    elif damage == "short deliver":
        bad = encode_frame(3, 1, b"\x01" * 20, 1)
    elif damage == "unknown type":
        bad = encode_frame(3, 9, b"\x00" * 12, 1)
    else:
        bad = _frames(records[2:], 3)[:-5]
    data = good + bad
    with pytest.raises(CorruptionError) as refused:
        _codec.decode_frames(data, 0, len(data), 1, 1000, "the-segment")
    assert refused.value.path == "the-segment" and refused.value.offset == len(good)


def test_deliver_pairs_at_reads_the_pairs_in_place():
    record = deliver_records(1, 9)[0]._replace(pairs=((1, 5), (2, 6), (3, 7)))
    body = _codec.encode_deliver(record)
    data = b"junk" + body + b"more"
    assert _codec.deliver_pairs_at(data, 4, 4 + len(body)) == (1, 5, 2, 6, 3, 7)
    with pytest.raises(CorruptionError):
        _codec.deliver_pairs_at(data, 4, 5 + len(body))


# --- the newest segment, read up to its zero tail ------------------------------------------


def _segment_with_frame_crossing(tmp_path, zero_tail: int) -> tuple[str, list[tuple[int, bytes]]]:
    """A 4 MiB segment whose last frame's body ends in ``zero_tail`` zero bytes across the 1 MiB block boundary."""
    directory = tmp_path / "w"
    os.makedirs(directory)
    path = os.path.join(directory, segment_name(1))
    filler = [(lsn, bytes((lsn * 7 + k) % 251 + 1 for k in range(60_000))) for lsn in range(1, 18)]
    frames = b"".join(encode_frame(lsn, 1, body, lsn - 1) for lsn, body in filler)
    last_lsn = len(filler) + 1
    head_room = MIB - SEGMENT_HEADER_SIZE - len(frames) - 25 - 100  # the last frame's non-zero bytes end before 1 MiB
    assert head_room > 0
    body = b"\x05" * head_room + b"\x00" * zero_tail
    last = encode_frame(last_lsn, 1, body, last_lsn - 1)
    content = _codec.encode_segment_header(1) + frames + last
    write_bytes(path, content + bytes(4 * MIB - len(content)))
    return str(directory), filler + [(last_lsn, body)]


@pytest.mark.parametrize("zero_tail", [200, 5 * MIB // 2])
def test_a_frame_running_into_the_unread_zeros_is_recovered(tmp_path, zero_tail):
    directory, records = _segment_with_frame_crossing(tmp_path, zero_tail)
    wal = WriteAheadLog.recover(directory, next_lsn=1, segment_bytes=4 * MIB)
    try:
        assert [(f.lsn, f.body) for f in wal.frames(0)] == records
        assert wal.end_lsn == records[-1][0]
    finally:
        wal.close()


def test_a_vouching_frame_in_the_unread_part_still_makes_a_bad_frame_corruption(tmp_path):
    """The bad frame lies before the 1 MiB boundary; the frame vouching for it ends in zeros beyond it."""
    directory, records = _segment_with_frame_crossing(tmp_path, 200)
    path = os.path.join(directory, segment_name(1))
    data = bytearray(read_bytes(path))
    last_lsn = records[-1][0]
    # Damage the second-to-last frame (already vouched for by the last frame's synced LSN).
    bad_offset = SEGMENT_HEADER_SIZE + sum(25 + len(body) for _lsn, body in records[:-2])  # a frame: 25 bytes and its body
    assert _codec.decode_frame(bytes(data), bad_offset).lsn == last_lsn - 1
    data[bad_offset + 40] ^= 0x10
    write_bytes(path, bytes(data))
    with pytest.raises(CorruptionError) as refused:
        WriteAheadLog.recover(directory, next_lsn=1, segment_bytes=4 * MIB)
    assert refused.value.offset == bad_offset and "records as durable" in str(refused.value)


def test_a_torn_tail_found_in_the_read_part_is_still_truncated_whole(tmp_path):
    directory, records = _segment_with_frame_crossing(tmp_path, 200)
    path = os.path.join(directory, segment_name(1))
    data = bytearray(read_bytes(path))
    data[2 * MIB + 3] = 0x42  # junk far in the preallocated part: the end is not clean
    write_bytes(path, bytes(data))
    wal = WriteAheadLog.open(directory, next_lsn=1, segment_bytes=4 * MIB)
    try:
        assert [f.lsn for f in wal.frames(0)] == [lsn for lsn, _body in records]
    finally:
        wal.close()
    kept = read_bytes(path)
    assert kept[2 * MIB + 3] == 0  # truncated at the end of the frames, preallocated again


# --- the check inside recovery ---------------------------------------------------------------


def test_recovery_errors_come_before_the_replay_checks(tmp_path):
    """A record that breaks cursor continuity in the first segment, a missing segment later: the gap is reported."""
    path = str(tmp_path / "s")
    syncstore.open(path, segment_bytes=4096).close()
    wal_dir = os.path.join(path, "wal")
    for name in os.listdir(wal_dir):
        os.unlink(os.path.join(wal_dir, name))
    records = deliver_records(30, 9)
    records[1] = records[1]._replace(pairs=((9, 7),))  # cursor 7 after 1
    write_log(wal_dir, records)
    paths = segments(path)
    assert len(paths) >= 3
    os.unlink(paths[1])
    before = tree_digest(path)
    with pytest.raises(CorruptionError) as refused:
        syncstore.open(path, segment_bytes=4096)
    assert "WAL gap" in str(refused.value)
    assert tree_digest(path) == before


def test_replay_spans_segments_in_full_batches(tmp_path, monkeypatch):
    """Batches of replay reach across segment boundaries: 30 records in 4 KiB segments, batches of 7."""
    from syncstore import _open
    from syncstore.state import State

    path = str(tmp_path / "s")
    syncstore.open(path, segment_bytes=4096).close()
    wal_dir = os.path.join(path, "wal")
    for name in os.listdir(wal_dir):
        os.unlink(os.path.join(wal_dir, name))
    write_log(wal_dir, deliver_records(30, 9))
    assert len(segments(path)) >= 3
    sizes: list[int] = []
    real_apply = State.apply

    def apply(self, records, upto_lsn):
        sizes.append(len(records))
        return real_apply(self, records, upto_lsn)

    monkeypatch.setattr(_open, "_REPLAY_BATCH", 7)
    monkeypatch.setattr(State, "apply", apply)
    with syncstore.open(path, segment_bytes=4096) as store:
        assert store.head(9) == 30
    assert sizes == [7, 7, 7, 7, 2]
