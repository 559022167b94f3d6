"""The write-ahead log: append/read, rotation, retirement, recovery of torn tails, and
refusal to open on corruption -- directly on WriteAheadLog and through a Store."""

from __future__ import annotations

import glob
import os
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import syncstore
from syncstore import CorruptionError, Message, _codec
from syncstore._codec import SEGMENT_HEADER_SIZE, encode_frame, encode_segment_header
from syncstore.wal import WriteAheadLog, segment_name

SMALL = 4096  # the smallest segment size the store accepts


# --- helpers -------------------------------------------------------------------------


def open_wal(directory, next_lsn=1, segment_bytes=SMALL):
    os.makedirs(directory, exist_ok=True)
    return WriteAheadLog.open(str(directory), next_lsn=next_lsn, segment_bytes=segment_bytes)


def body_for(lsn: int, size: int | None = None) -> bytes:
    """A recognisable, LSN-specific body (non-zero bytes, so a frame never looks like preallocated space)."""
    size = 20 + lsn % 37 if size is None else size
    return bytes((lsn * 7 + i) % 251 + 1 for i in range(size))


def append(wal, first_lsn, bodies):
    """Append one group of frames first_lsn.. with the given bodies; return the records.

    As the store does, each frame records that the log was synced up to the
    previous group (first_lsn - 1).
    """
    records = [(first_lsn + i, 1 + (first_lsn + i) % 3, body) for i, body in enumerate(bodies)]
    wal.append(b"".join(encode_frame(*r, first_lsn - 1) for r in records), records[-1][0], first_lsn)
    return records


def read_all(wal, after=0):
    return [(f.lsn, f.rtype, f.body) for f in wal.frames(after)]


def segment_files(directory):
    return sorted(glob.glob(os.path.join(str(directory), "wal-*.log")))


def frame_spans(data: bytes, start: int = SEGMENT_HEADER_SIZE):
    """(offset, end) of each valid frame in a segment's bytes, decoded independently of the WAL."""
    spans = []
    offset = start
    while True:
        frame = _codec.decode_frame(data, offset)
        if frame is None:
            return spans
        spans.append((frame.offset, frame.end))
        offset = frame.end


def write_bytes(path, data):
    with open(path, "wb") as f:
        f.write(data)


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def assert_clean_tail(path, original: bytes, end: int, segment_bytes: int = SMALL):
    """The file holds ``original[:end]`` followed by nothing but zeros: truncated back to the
    last whole frame (and possibly preallocated again to the segment size)."""
    data = read_bytes(path)
    assert len(data) in (end, max(end, segment_bytes)), len(data)
    assert data[:end] == original[:end]
    assert data.count(0, end) == len(data) - end, "garbage left after the last whole frame"


def flip(path, position, xor=0x01):
    data = bytearray(read_bytes(path))
    data[position] ^= xor
    write_bytes(path, bytes(data))


# --- appending and reading back ----------------------------------------------------------


@settings(max_examples=30)
@given(st.lists(st.lists(st.binary(max_size=300), min_size=1, max_size=6), min_size=1, max_size=12))
def test_frames_appended_in_groups_read_back_in_order(tmp_path_factory, groups):
    directory = tmp_path_factory.mktemp("wal")
    wal = open_wal(directory, segment_bytes=8192)
    expected = []
    lsn = 1
    for bodies in groups:
        expected += append(wal, lsn, bodies)
        lsn += len(bodies)
        assert wal.end_lsn == lsn - 1
    wal.sync()
    assert read_all(wal) == expected
    for after in (0, 1, len(expected) // 2, len(expected) - 1, len(expected)):
        assert read_all(wal, after) == [r for r in expected if r[0] > after]
    wal.close()
    again = open_wal(directory, segment_bytes=8192)
    assert read_all(again) == expected
    assert again.end_lsn == len(expected) and again.first_lsn == 1
    again.close()


def test_empty_log_starts_at_next_lsn(tmp_path):
    wal = open_wal(tmp_path / "w", next_lsn=100)
    assert wal.end_lsn == 99 and wal.first_lsn == 100
    assert [os.path.basename(p) for p in wal.segment_paths()] == [segment_name(100)]
    assert read_all(wal) == []
    with pytest.raises(AssertionError):
        append(wal, 1, [b"out of order"])  # LSNs are dense: the next frame must be 100
    records = append(wal, 100, [b"a", b"b"])
    wal.close()
    again = open_wal(tmp_path / "w", next_lsn=100)
    assert read_all(again) == records and again.end_lsn == 101
    again.close()


def test_segment_name_sorts_by_lsn():
    names = [segment_name(n) for n in (1, 9, 10, 99, 100, 2**64 - 1)]
    assert names == sorted(names)
    assert segment_name(42) == "wal-00000000000000000042.log"


def test_append_gap_is_refused(tmp_path):
    wal = open_wal(tmp_path / "w")
    append(wal, 1, [b"x"])
    with pytest.raises(AssertionError):
        append(wal, 3, [b"skips 2"])
    assert read_all(wal) == [(1, 2, b"x")]
    wal.close()


# --- rotation and retirement ----------------------------------------------------------------


def _fill_segments(directory, count=80, group=3):
    wal = open_wal(directory)
    expected = []
    for first in range(1, count + 1, group):
        expected += append(wal, first, [body_for(lsn, 150) for lsn in range(first, min(first + group, count + 1))])
    return wal, expected


def test_rotation_across_small_segments(tmp_path):
    directory = tmp_path / "w"
    wal, expected = _fill_segments(directory)
    paths = wal.segment_paths()
    assert len(paths) >= 4
    assert paths == segment_files(directory)
    previous_last = 0
    for path in paths:
        data = read_bytes(path)
        first = _codec.decode_segment_header(data, path)
        assert os.path.basename(path) == segment_name(first)
        assert first == previous_last + 1  # LSNs continue across segments
        spans = frame_spans(data)
        assert spans, "a sealed segment holds at least one frame"
        assert spans[-1][1] <= SMALL  # a group that fits is never split past the segment size
        lsns = [_codec.decode_frame(data, off).lsn for off, _end in spans]
        assert lsns == list(range(first, first + len(lsns)))
        previous_last = lsns[-1]
    assert previous_last == 80
    assert read_all(wal) == expected
    wal.close()
    again = open_wal(directory)
    assert read_all(again) == expected and again.end_lsn == 80
    more = append(again, 81, [b"after reopen"])
    again.close()
    third = open_wal(directory)
    assert read_all(third) == expected + more
    third.close()


def test_oversized_group_goes_to_a_fresh_segment_whole(tmp_path):
    wal = open_wal(tmp_path / "w")
    small = append(wal, 1, [b"s"])
    big = append(wal, 2, [body_for(n, 1500) for n in range(2, 6)])  # ~6 KB > segment size
    assert len(wal.segment_paths()) == 2
    assert os.path.basename(wal.segment_paths()[1]) == segment_name(2)
    wal.close()
    again = open_wal(tmp_path / "w")
    assert read_all(again) == small + big
    again.close()


def test_retire_removes_only_sealed_segments_fully_covered(tmp_path):
    directory = tmp_path / "w"
    wal, expected = _fill_segments(directory)
    paths = wal.segment_paths()
    firsts = [_codec.decode_segment_header(read_bytes(p)) for p in paths]
    # Up to just before the end of segment 1: nothing goes.
    assert wal.retire(firsts[1] - 2) == []
    assert wal.segment_paths() == paths
    # Exactly the last LSN of segment 1 and a bit of segment 2: only segment 1 goes.
    assert wal.retire(firsts[1] + 1) == [paths[0]]
    assert not os.path.exists(paths[0])
    assert wal.first_lsn == firsts[1]
    assert read_all(wal) == expected[firsts[1] - 1 :]
    assert read_all(wal, firsts[2]) == expected[firsts[2] :]
    # Everything: the current segment is never retired.
    removed = wal.retire(10**9)
    assert removed == paths[1:-1]
    assert wal.segment_paths() == [paths[-1]] == segment_files(directory)
    assert read_all(wal) == expected[firsts[-1] - 1 :]
    more = append(wal, 81, [b"still appendable"])
    wal.close()
    # Recovery: a state that needs older LSNs than the log holds is corruption...
    with pytest.raises(CorruptionError) as info:
        open_wal(directory, next_lsn=1)
    assert info.value.path == paths[-1]
    # ...one that needs what is retained is fine.
    again = open_wal(directory, next_lsn=firsts[-1])
    assert read_all(again) == expected[firsts[-1] - 1 :] + more
    again.close()


def test_log_ending_before_the_applied_lsn_is_corruption(tmp_path):
    wal = open_wal(tmp_path / "w")
    append(wal, 1, [b"a", b"b", b"c"])
    wal.close()
    with pytest.raises(CorruptionError) as info:
        open_wal(tmp_path / "w", next_lsn=6)  # the state has applied LSN 5, the log ends at 3
    assert info.value.path == segment_files(tmp_path / "w")[0]
    ok = open_wal(tmp_path / "w", next_lsn=4)  # applied exactly the whole log
    assert ok.end_lsn == 3
    ok.close()


# --- torn tails ----------------------------------------------------------------------------


def _single_segment_log(directory, count=6):
    wal = open_wal(directory)
    expected = []
    for lsn in range(1, count + 1):
        expected += append(wal, lsn, [body_for(lsn)])
    wal.close()
    (path,) = segment_files(directory)
    data = read_bytes(path)
    spans = frame_spans(data)
    assert len(spans) == count
    return path, data, spans, expected


@pytest.mark.parametrize("zero_fill", [False, True], ids=["truncated", "zero-filled"])
def test_torn_tail_at_every_offset_of_the_last_two_frames(tmp_path, zero_fill):
    directory = tmp_path / "w"
    path, original, spans, expected = _single_segment_log(directory)
    # Valid content ends here; the rest of the file is preallocated space (or nothing).
    content_end = spans[-1][1]
    for cut in range(spans[-2][0], content_end + 1):
        damaged = original[:cut] + (b"\x00" * (len(original) - cut) if zero_fill else b"")
        write_bytes(path, damaged)
        whole = sum(1 for _off, end in spans if end <= cut)
        keep_end = spans[whole - 1][1]

        wal = open_wal(directory)
        assert wal.end_lsn == whole, cut
        assert read_all(wal) == expected[:whole], cut
        wal.close()
        assert_clean_tail(path, original, keep_end)
        after_first = read_bytes(path)

        again = open_wal(directory)  # recovery is idempotent
        assert again.end_lsn == whole and read_all(again) == expected[:whole], cut
        again.close()
        assert read_bytes(path) == after_first


def test_appending_after_torn_tail_recovery_survives_reopen(tmp_path):
    directory = tmp_path / "w"
    path, original, spans, expected = _single_segment_log(directory)
    step = max(1, (spans[-1][1] - spans[-2][0]) // 13)
    for cut in range(spans[-2][0] + 1, spans[-1][1], step):
        write_bytes(path, original[:cut])
        wal = open_wal(directory)
        whole = wal.end_lsn
        # A short new frame at the recovered end: stale torn bytes must not resurface after it.
        new = append(wal, whole + 1, [b"n"])
        wal.close()
        again = open_wal(directory)
        assert read_all(again) == expected[:whole] + new, cut
        again.close()


@settings(max_examples=40)
@given(st.binary(min_size=1, max_size=200))
def test_garbage_tail_after_the_last_frame_is_truncated(tmp_path_factory, garbage):
    directory = tmp_path_factory.mktemp("wal")
    path, original, spans, expected = _single_segment_log(directory, count=3)
    end = spans[-1][1]
    write_bytes(path, original[:end] + garbage)
    wal = open_wal(directory)
    assert read_all(wal) == expected
    wal.close()
    assert_clean_tail(path, original, end)


def test_torn_tail_recovery_work_is_bounded_by_the_data_not_the_preallocated_size(tmp_path, monkeypatch):
    """A crash mid-append leaves a partial frame followed by the segment's preallocated zeros.

    Recovery must not try to decode a frame at every zero byte of the (default 64 MiB)
    preallocated segment: that made ``syncstore.open`` take ~30 s after such a crash.
    Counted in decode attempts, not time.
    """
    directory = tmp_path / "w"
    segment_bytes = 4 << 20
    wal = open_wal(directory, segment_bytes=segment_bytes)
    expected = []
    for lsn in range(1, 7):
        expected += append(wal, lsn, [body_for(lsn)])
    wal.close()
    (path,) = segment_files(directory)
    data = read_bytes(path)
    assert len(data) >= segment_bytes  # preallocated
    spans = frame_spans(data)
    off, end = spans[-1]
    torn = data[: off + (end - off) // 2] + b"\x00" * (len(data) - off - (end - off) // 2)
    write_bytes(path, torn)

    real_decode = _codec.decode_frame
    calls = 0

    def counting_decode(buf, offset):
        nonlocal calls
        calls += 1
        if calls > 20_000:
            raise AssertionError("recovery tried more than 20,000 frame decodes for a 6-frame log")
        return real_decode(buf, offset)

    monkeypatch.setattr(_codec, "decode_frame", counting_decode)
    wal = open_wal(directory, segment_bytes=segment_bytes)
    monkeypatch.setattr(_codec, "decode_frame", real_decode)
    assert read_all(wal) == expected[:5]
    wal.close()


# --- corruption ----------------------------------------------------------------------------


def test_bit_flip_in_any_byte_of_a_frame_followed_by_valid_frames_is_corruption(tmp_path):
    directory = tmp_path / "w"
    path, original, spans, _expected = _single_segment_log(directory, count=5)
    for index in (0, 2, 3):  # first, middle, second-to-last
        offset, end = spans[index]
        for position in range(offset, end):
            for xor in (0x01, 0x80, 0xFF):
                write_bytes(path, original)
                flip(path, position, xor)
                damaged = read_bytes(path)
                with pytest.raises(CorruptionError) as info:
                    open_wal(directory)
                assert info.value.path == path, (index, position)
                assert info.value.offset == offset, (index, position, xor)
                assert read_bytes(path) == damaged, "a refused open must not modify the log"


def test_wrong_lsn_with_valid_crc_is_corruption_even_at_the_tail(tmp_path):
    directory = tmp_path / "w"
    path, original, spans, _expected = _single_segment_log(directory, count=3)
    end = spans[-1][1]
    # A well-formed frame with LSN 5 where LSN 4 belongs.
    write_bytes(path, original[:end] + encode_frame(5, 1, b"skipped"))
    with pytest.raises(CorruptionError) as info:
        open_wal(directory)
    assert info.value.path == path and info.value.offset == end


def _multi_segment_log(directory):
    wal, expected = _fill_segments(directory)
    wal.close()
    paths = segment_files(directory)
    assert len(paths) >= 3
    return paths, expected


@pytest.mark.parametrize("which", ["first", "middle", "last-frame"])
def test_bad_frame_inside_a_sealed_segment_is_corruption(tmp_path, which):
    directory = tmp_path / "w"
    paths, _expected = _multi_segment_log(directory)
    path = paths[0] if which != "middle" else paths[1]
    spans = frame_spans(read_bytes(path))
    offset, end = spans[-1] if which == "last-frame" else spans[len(spans) // 2]
    flip(path, offset + (end - offset) // 2, 0x40)
    with pytest.raises(CorruptionError) as info:
        open_wal(directory)
    assert info.value.path == path
    assert info.value.offset == offset


def test_torn_sealed_segment_is_corruption(tmp_path):
    directory = tmp_path / "w"
    paths, _expected = _multi_segment_log(directory)
    data = read_bytes(paths[0])
    offset, end = frame_spans(data)[-1]
    write_bytes(paths[0], data[: offset + 5])
    with pytest.raises(CorruptionError) as info:
        open_wal(directory)
    assert info.value.path == paths[0] and info.value.offset == offset


def test_sealed_segment_missing_its_last_frames_is_a_gap(tmp_path):
    directory = tmp_path / "w"
    paths, _expected = _multi_segment_log(directory)
    data = read_bytes(paths[0])
    offset, _end = frame_spans(data)[-1]
    write_bytes(paths[0], data[:offset])  # ends cleanly, one frame short
    with pytest.raises(CorruptionError) as info:
        open_wal(directory)
    assert info.value.path == paths[1]


def test_gap_between_segments_is_corruption(tmp_path):
    directory = tmp_path / "w"
    paths, _expected = _multi_segment_log(directory)
    os.unlink(paths[1])
    before = {p: read_bytes(p) for p in (paths[0], *paths[2:])}
    with pytest.raises(CorruptionError) as info:
        open_wal(directory)
    assert info.value.path == paths[2]
    assert {p: read_bytes(p) for p in before} == before


def test_segment_whose_name_disagrees_with_its_header_is_corruption(tmp_path):
    directory = tmp_path / "w"
    paths, _expected = _multi_segment_log(directory)
    first = _codec.decode_segment_header(read_bytes(paths[1]))
    renamed = os.path.join(str(directory), segment_name(first + 1))
    os.rename(paths[1], renamed)
    with pytest.raises(CorruptionError) as info:
        open_wal(directory)
    assert info.value.path == renamed


@pytest.mark.parametrize("which", [0, 1, -1])
@pytest.mark.parametrize("position", [0, 9, 11, 12, 19, 20, 23])
def test_bad_segment_header_is_corruption(tmp_path, which, position):
    directory = tmp_path / "w"
    paths, _expected = _multi_segment_log(directory)
    flip(paths[which], position, 0x10)
    with pytest.raises(CorruptionError) as info:
        open_wal(directory)
    assert info.value.path == paths[which]
    assert info.value.offset is not None


def test_zeroed_header_of_a_last_segment_that_holds_frames_is_corruption_not_deleted(tmp_path):
    """Only an *empty* segment (crash while creating it) may be removed; one with frames is data."""
    directory = tmp_path / "w"
    paths, expected = _multi_segment_log(directory)
    last = paths[-1]
    data = read_bytes(last)
    assert frame_spans(data), "the last segment holds frames"
    write_bytes(last, b"\x00" * SEGMENT_HEADER_SIZE + data[SEGMENT_HEADER_SIZE:])
    with pytest.raises(CorruptionError) as info:
        open_wal(directory)
    assert info.value.path == last
    assert os.path.exists(last), "acknowledged frames were deleted"


@pytest.mark.parametrize("length", [0, 10, 23])
def test_truncated_last_segment_shorter_than_its_header_is_removed(tmp_path, length):
    directory = tmp_path / "w"
    paths, expected = _multi_segment_log(directory)
    # A crash while creating the next segment: only part of its header reached the disk.
    partial = os.path.join(str(directory), segment_name(len(expected) + 1))
    write_bytes(partial, encode_segment_header(len(expected) + 1)[:length])
    wal = open_wal(directory)
    assert not os.path.exists(partial)
    assert wal.end_lsn == len(expected)
    assert read_all(wal) == expected
    more = append(wal, len(expected) + 1, [b"continues"])
    wal.close()
    again = open_wal(directory)
    assert read_all(again) == expected + more
    again.close()


@pytest.mark.parametrize("length", [0, 10])
def test_only_segment_shorter_than_its_header_is_replaced(tmp_path, length):
    directory = tmp_path / "w"
    os.makedirs(directory)
    write_bytes(os.path.join(str(directory), segment_name(1)), encode_segment_header(1)[:length])
    wal = open_wal(directory)
    assert wal.end_lsn == 0
    records = append(wal, 1, [b"first"])
    wal.close()
    again = open_wal(directory)
    assert read_all(again) == records
    again.close()


# --- through a Store ---------------------------------------------------------------------------

STORE_SEGMENT = SMALL  # one segment (the messages are small), so recovery reads little


def _store_with_messages(path, count=6):
    bodies = [b"m%d" % i for i in range(count)]
    with syncstore.open(path, segment_bytes=STORE_SEGMENT) as store:
        for i, body in enumerate(bodies):
            d = store.deliver(Message(sender=3, conv=4, client_seq=i, body=body), to=[10, 11])
            assert d.cursors == {10: i + 1, 11: i + 1}
    (wal_path,) = segment_files(os.path.join(path, "wal"))
    data = read_bytes(wal_path)
    spans = frame_spans(data)
    assert len(spans) == count
    return wal_path, data, spans, bodies


def _state(store, users=(10, 11)):
    return {u: (store.head(u), [(m.cursor, m.body) for m in store.sync(u, 0, 100).messages]) for u in users}


@pytest.mark.parametrize("zero_fill", [False, True], ids=["truncated", "zero-filled"])
def test_store_recovers_torn_tail_at_every_offset(tmp_path, zero_fill):
    path = str(tmp_path / "s")
    wal_path, original, spans, bodies = _store_with_messages(path)
    for cut in range(spans[-2][0], spans[-1][1] + 1):
        write_bytes(wal_path, original[:cut] + (b"\x00" * (len(original) - cut) if zero_fill else b""))
        shutil.rmtree(os.path.join(path, "state"))  # force a full replay from the WAL
        whole = sum(1 for _off, end in spans if end <= cut)
        expected = {u: (whole, [(i + 1, bodies[i]) for i in range(whole)]) for u in (10, 11)}
        with syncstore.open(path, segment_bytes=STORE_SEGMENT) as store:
            assert _state(store) == expected, cut
            counts = store.check()
            assert counts["inbox_entries"] + counts["pending"] * 2 == 2 * whole
        assert_clean_tail(wal_path, original, spans[whole - 1][1], STORE_SEGMENT)
        with syncstore.open(path, segment_bytes=STORE_SEGMENT) as store:  # twice: same state
            assert _state(store) == expected, cut


def test_store_continues_after_torn_tail(tmp_path):
    path = str(tmp_path / "s")
    wal_path, original, spans, bodies = _store_with_messages(path)
    off, end = spans[-1]
    write_bytes(wal_path, original[: off + (end - off) // 2])
    shutil.rmtree(os.path.join(path, "state"))
    with syncstore.open(path, segment_bytes=STORE_SEGMENT) as store:
        assert store.head(10) == 5
        # The torn message was never acknowledged durably: its key is free again.
        d = store.deliver(Message(sender=3, conv=4, client_seq=5, body=b"retry"), to=[10])
        assert not d.duplicate and d.cursors == {10: 6}
    shutil.rmtree(os.path.join(path, "state"))
    with syncstore.open(path, segment_bytes=STORE_SEGMENT) as store:
        assert [m.body for m in store.sync(10, 0, 100).messages] == bodies[:5] + [b"retry"]
        assert store.head(11) == 5
        store.check()


@pytest.mark.parametrize("keep_state", [False, True], ids=["replay", "state-kept"])
def test_store_refuses_to_open_on_bit_flip_mid_log(tmp_path, keep_state):
    path = str(tmp_path / "s")
    wal_path, original, spans, _bodies = _store_with_messages(path)
    for index in (0, 3, 4):
        offset, end = spans[index]
        for position in (offset, offset + 5, offset + 12, (offset + end) // 2, end - 1):
            write_bytes(wal_path, original)
            flip(wal_path, position, 0x04)
            damaged = read_bytes(wal_path)
            if not keep_state:
                shutil.rmtree(os.path.join(path, "state"), ignore_errors=True)
            with pytest.raises(syncstore.CorruptionError) as info:
                syncstore.open(path, segment_bytes=STORE_SEGMENT)
            error = info.value
            assert isinstance(error, syncstore.SyncStoreError)
            assert os.path.samefile(error.path, wal_path), (index, position)
            assert error.offset == offset, (index, position)
            assert os.path.basename(wal_path) in str(error) and str(offset) in str(error)
            assert read_bytes(wal_path) == damaged
    # Repaired, the store opens with everything.
    write_bytes(wal_path, original)
    with syncstore.open(path, segment_bytes=STORE_SEGMENT) as store:
        assert store.head(10) == store.head(11) == 6


def test_store_refuses_a_log_shorter_than_its_applied_state(tmp_path):
    path = str(tmp_path / "s")
    wal_path, original, spans, _bodies = _store_with_messages(path)
    off, end = spans[-1]
    write_bytes(wal_path, original[:off])  # the state has applied the frame the log lost
    with pytest.raises(syncstore.CorruptionError) as info:
        syncstore.open(path, segment_bytes=STORE_SEGMENT)
    assert os.path.samefile(info.value.path, wal_path)


def test_store_refusing_a_short_log_does_not_modify_it(tmp_path):
    """CorruptionError promises that nothing was modified (docs/errors.md): the operator is told
    to restore the named file, so open must not first cut bytes off it."""
    path = str(tmp_path / "s")
    wal_path, original, spans, _bodies = _store_with_messages(path)
    off, end = spans[-1]
    write_bytes(wal_path, original[: off + (end - off) // 2])  # torn inside a frame the state applied
    damaged = read_bytes(wal_path)
    with pytest.raises(syncstore.CorruptionError):
        syncstore.open(path, segment_bytes=STORE_SEGMENT)
    assert read_bytes(wal_path) == damaged


def test_store_wal_records_match_the_deliveries(tmp_path):
    path = str(tmp_path / "s")
    with syncstore.open(path, segment_bytes=STORE_SEGMENT) as store:
        deliveries = [
            store.deliver(Message(sender=9, conv=8, client_seq=i, body=b"w%d" % i, priority=i), to=[1, 2 + i % 2])
            for i in range(5)
        ]
        dup = store.deliver(Message(sender=9, conv=8, client_seq=0, body=b"w0"), to=[1, 2])
    assert dup.duplicate  # a duplicate writes no record
    wal = open_wal(os.path.join(path, "wal"), segment_bytes=STORE_SEGMENT)
    frames = list(wal.frames(0))
    wal.close()
    assert [f.lsn for f in frames] == [1, 2, 3, 4, 5]
    for i, (frame, d) in enumerate(zip(frames, deliveries)):
        assert frame.rtype == _codec.RECORD_DELIVER
        record = _codec.decode_deliver(frame.body)
        assert (record.msg_id, record.sender, record.conv, record.client_seq, record.priority, record.body) == (
            d.msg_id, 9, 8, i, i, b"w%d" % i
        )
        assert dict(record.pairs) == dict(d.cursors)


def test_store_refuses_bad_segment_header(tmp_path):
    path = str(tmp_path / "s")
    wal_path, _original, _spans, _bodies = _store_with_messages(path)
    flip(wal_path, 3, 0x20)
    with pytest.raises(syncstore.CorruptionError) as info:
        syncstore.open(path, segment_bytes=STORE_SEGMENT)
    assert os.path.samefile(info.value.path, wal_path) and info.value.offset == 0


def test_store_rotation_retirement_and_lsn_continuity(tmp_path):
    path = str(tmp_path / "s")
    wal_dir = os.path.join(path, "wal")
    body = b"r" * 300
    with syncstore.open(path, segment_bytes=SMALL) as store:
        for i in range(40):
            assert store.deliver(Message(sender=1, conv=1, client_seq=i, body=body), to=[5]).cursors == {5: i + 1}
    # Reopening with no retention retires every sealed segment the state covers; the current one stays.
    with syncstore.open(path, segment_bytes=SMALL, log_retention_bytes=0, log_retention_ms=0) as store:
        (only,) = segment_files(wal_dir)
        first = _codec.decode_segment_header(read_bytes(only))
        assert 1 < first <= 40
        assert store.head(5) == 40
        for i in range(40, 60):
            store.deliver(Message(sender=1, conv=1, client_seq=i, body=body), to=[5])
    # LSNs continue densely across the reopen and every segment boundary (the
    # applier may have retired some sealed segments meanwhile).
    remaining = segment_files(wal_dir)
    expected_first = _codec.decode_segment_header(read_bytes(remaining[0]))
    assert expected_first >= first
    for seg in remaining:
        data = read_bytes(seg)
        assert _codec.decode_segment_header(data, seg) == expected_first
        lsns = [_codec.decode_frame(data, off).lsn for off, _end in frame_spans(data)]
        assert lsns == list(range(expected_first, expected_first + len(lsns)))
        expected_first += len(lsns)
    assert expected_first == 61
    with syncstore.open(path, segment_bytes=SMALL) as store:
        page = store.sync(5, 0, 100)
        assert [m.cursor for m in page.messages] == list(range(1, 61))
        store.check()


def test_store_removes_partial_new_segment(tmp_path):
    path = str(tmp_path / "s")
    wal_path, _original, spans, _bodies = _store_with_messages(path)
    partial = os.path.join(path, "wal", segment_name(len(spans) + 1))
    write_bytes(partial, encode_segment_header(len(spans) + 1)[:11])
    with syncstore.open(path, segment_bytes=STORE_SEGMENT) as store:
        assert store.head(10) == 6
        assert store.deliver(Message(sender=3, conv=4, client_seq=99, body=b"z"), to=[10]).cursors == {10: 7}
    assert not os.path.exists(partial)


def test_hole_in_the_unsynced_last_group_is_a_torn_tail_not_corruption(tmp_path):
    """A power loss may persist later pages of the last, unsynced write and lose earlier ones.

    No frame after the hole records the damaged frame as durable, so recovery
    truncates at the hole (dropping the unsynced frames after it) and opens.
    """
    directory = tmp_path / "w"
    wal = open_wal(directory)
    append(wal, 1, [body_for(1), body_for(2)])  # synced group
    append(wal, 3, [body_for(lsn, 400) for lsn in range(3, 9)])  # last group, never synced
    wal.close()
    (path,) = segment_files(directory)
    data = read_bytes(path)
    spans = frame_spans(data)
    hole_start, hole_end = spans[3]  # frame 4 lost, frames 5..8 of the same write survived
    write_bytes(path, data[:hole_start] + bytes(hole_end - hole_start) + data[hole_end:])
    reopened = open_wal(directory)
    assert [f.lsn for f in reopened.frames(0)] == [1, 2, 3]
    reopened.close()
    # The same damage in a frame a later frame vouches for is corruption.
    write_bytes(path, data[: spans[1][0]] + bytes(spans[1][1] - spans[1][0]) + data[spans[1][1] :])
    with pytest.raises(CorruptionError) as info:
        open_wal(directory)
    assert info.value.offset == spans[1][0]
