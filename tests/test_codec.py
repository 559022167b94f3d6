"""Byte formats of syncstore._codec: round trips, layout, and damage detection (pure, no I/O)."""

from __future__ import annotations

import mmap
import struct

import crcmod
import crcmod.predefined
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from syncstore import CorruptionError, SyncStoreError, _codec
from syncstore._codec import (
    FRAME_LEAD_SIZE,
    FRAME_PREFIX_SIZE,
    INBOX_ENTRY_SIZE,
    STORED_HEAD_SIZE,
    MAX_PAYLOAD,
    RECORD_DELIVER,
    SEGMENT_HEADER_SIZE,
    SEGMENT_MAGIC,
    Deliver,
    Frame,
    decode_dedup,
    decode_deliver,
    decode_frame,
    decode_segment_header,
    encode_dedup,
    encode_deliver,
    encode_frame,
    encode_segment_header,
)
from syncstore.model import MessageRecord, StoredMessage

U64 = st.integers(min_value=0, max_value=2**64 - 1)
# Values that exercise every byte of a u64, not just small ones.
U64_EDGES = st.one_of(U64, st.sampled_from([0, 1, 255, 256, 2**32 - 1, 2**32, 2**63, 2**64 - 1]))
PAIRS = st.lists(st.tuples(U64_EDGES, U64_EDGES), max_size=12).map(tuple)
BODIES = st.binary(max_size=600)

# An independent CRC-32C implementation to cross-check the one the engine uses.
_crcmod_crc32c = crcmod.predefined.mkPredefinedCrcFun("crc-32c")


@st.composite
def delivers(draw, body=BODIES, pairs=PAIRS):
    return Deliver(
        msg_id=draw(U64_EDGES),
        sender=draw(U64_EDGES),
        conv=draw(U64_EDGES),
        client_seq=draw(U64_EDGES),
        ts_ms=draw(U64_EDGES),
        priority=draw(st.integers(0, 255)),
        body=draw(body),
        pairs=draw(pairs),
    )


def _flip(data: bytes, position: int, xor: int) -> bytes:
    assert 0 < xor < 256
    out = bytearray(data)
    out[position] ^= xor
    return bytes(out)


# --- CRC-32C -------------------------------------------------------------------


def test_crcmod_c_extension_loads():
    import importlib.machinery

    import crcmod._crcfunext  # ImportError here means crcmod fell back to pure Python

    assert crcmod._crcfunext.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def test_crc32c_standard_check_value():
    assert _codec.crc32c_of(b"123456789") == 0xE3069283
    assert _crcmod_crc32c(b"123456789") == 0xE3069283
    assert _codec.crc32c_of(b"") == 0


@given(st.binary(max_size=4096))
def test_crc32c_agrees_with_crcmod(data):
    assert _codec.crc32c_of(data) == _crcmod_crc32c(data)


@given(st.binary(max_size=512), st.binary(max_size=512))
def test_crc32c_continuation_equals_crc_of_concatenation(a, b):
    assert _codec.crc32c_of(b, _codec.crc32c_of(a)) == _crcmod_crc32c(a + b)


# --- u64 helpers ----------------------------------------------------------------


@given(U64_EDGES, U64_EDGES)
def test_pack_u64_round_trips_and_preserves_order(a, b):
    assert len(_codec.pack_u64(a)) == 8
    assert _codec.unpack_u64(_codec.pack_u64(a)) == a
    # Keys sort numerically in LMDB only if the encoding is order-preserving.
    assert (a < b) == (_codec.pack_u64(a) < _codec.pack_u64(b))


# --- frames ------------------------------------------------------------------------


def test_frame_layout_matches_the_documented_format():
    frame = encode_frame(0x0102030405060708, 7, b"xyz")
    payload_len = FRAME_LEAD_SIZE + 3
    assert len(frame) == FRAME_PREFIX_SIZE + payload_len
    assert frame[0:4] == struct.pack(">I", payload_len)
    assert frame[8:16] == bytes([1, 2, 3, 4, 5, 6, 7, 8])
    assert frame[16] == 7
    assert frame[17:25] == bytes(8)  # synced LSN, 0 by default
    assert frame[25:] == b"xyz"
    # The CRC covers the length word followed by the payload (checked with crcmod).
    assert frame[4:8] == struct.pack(">I", _crcmod_crc32c(frame[0:4] + frame[8:]))


@given(U64_EDGES, st.integers(0, 255), BODIES)
def test_frame_round_trip(lsn, rtype, body):
    data = encode_frame(lsn, rtype, body)
    assert len(data) == FRAME_PREFIX_SIZE + FRAME_LEAD_SIZE + len(body)
    frame = decode_frame(data, 0)
    assert frame == Frame(0, len(data), lsn, rtype, body)
    assert type(frame.body) is bytes
    # Also from a memoryview, as recovery may pass one.
    assert decode_frame(memoryview(data), 0) == frame


@given(st.binary(max_size=64), st.lists(st.tuples(U64_EDGES, st.integers(0, 255), st.binary(max_size=80)), min_size=1, max_size=8))
def test_frames_back_to_back_at_offsets(junk, records):
    blob = junk + b"".join(encode_frame(*r) for r in records)
    offset = len(junk)
    for lsn, rtype, body in records:
        frame = decode_frame(blob, offset)
        assert frame is not None
        assert (frame.offset, frame.lsn, frame.rtype, frame.body) == (offset, lsn, rtype, body)
        assert frame.end == offset + FRAME_PREFIX_SIZE + FRAME_LEAD_SIZE + len(body)
        offset = frame.end
    assert offset == len(blob)
    assert decode_frame(blob, offset) is None  # nothing after the last frame


def test_every_single_byte_flip_of_a_frame_is_detected_exhaustively():
    data = encode_frame(12345, RECORD_DELIVER, b"hello, world")
    for position in range(len(data)):
        for xor in range(1, 256):
            assert decode_frame(_flip(data, position, xor), 0) is None, (position, xor)


@given(U64_EDGES, st.integers(0, 255), BODIES, st.data())
def test_single_byte_flip_anywhere_is_detected(lsn, rtype, body, data):
    frame = encode_frame(lsn, rtype, body)
    position = data.draw(st.integers(0, len(frame) - 1), label="position")
    xor = data.draw(st.integers(1, 255), label="xor")
    assert decode_frame(_flip(frame, position, xor), 0) is None
    # Also when the damaged frame is followed by more bytes (a flipped length
    # can then point inside them): still detected.
    trailer = encode_frame(lsn + 1 if lsn < 2**64 - 1 else 0, rtype, body)
    assert decode_frame(_flip(frame, position, xor) + trailer, 0) is None


@given(U64_EDGES, st.integers(0, 255), st.binary(max_size=200))
def test_truncation_at_every_length_returns_none(lsn, rtype, body):
    data = encode_frame(lsn, rtype, body)
    for length in range(len(data)):
        assert decode_frame(data[:length], 0) is None, length
        assert decode_frame(b"\x00" * 5 + data[:length], 5) is None, length


def test_zero_filled_space_is_not_a_frame():
    assert decode_frame(b"\x00" * 64, 0) is None
    assert decode_frame(b"", 0) is None


def _frame_with_length(length: int, payload: bytes) -> bytes:
    """A frame whose length word is ``length`` and whose CRC is valid for that word and ``payload``."""
    word = struct.pack(">I", length)
    return word + struct.pack(">I", _crcmod_crc32c(word + payload)) + payload


def test_too_short_payload_is_rejected_even_with_a_valid_crc():
    for length in range(FRAME_LEAD_SIZE):
        payload = bytes(range(length))
        assert decode_frame(_frame_with_length(length, payload), 0) is None, length
    # The smallest legal payload decodes.
    ok = _frame_with_length(FRAME_LEAD_SIZE, struct.pack(">QBQ", 3, 1, 0))
    assert decode_frame(ok, 0) == Frame(0, len(ok), 3, 1, b"")


def test_length_beyond_max_payload_is_rejected():
    word = struct.pack(">I", MAX_PAYLOAD + 1)
    data = word + struct.pack(">I", _crcmod_crc32c(word)) + b"\x00" * 32
    assert decode_frame(data, 0) is None


def test_max_payload_is_one_gib():
    assert MAX_PAYLOAD == 1 << 30 == 1_073_741_824


@pytest.mark.parametrize(("length", "refused_for_length"), [(2**30, False), (2**30 + 1, True)])
def test_max_payload_limit_is_exact(monkeypatch, length, refused_for_length):
    """A frame claiming MAX_PAYLOAD + 1 bytes is refused by its length alone, before any
    CRC; one claiming exactly MAX_PAYLOAD bytes (all present) gets as far as its CRC.

    The buffer is an anonymous mapping of 1 GiB + 8 bytes, of which only the first page
    is ever touched: the CRC function is replaced by a recorder that reads nothing and
    reports a mismatch, so no payload is copied or checksummed.
    """
    seen: list[int] = []

    def recording_crc(data, value=0):
        seen.append(len(data))
        return 0  # never the stored CRC below: the frame is then refused by its CRC

    monkeypatch.setattr(_codec, "crc32c", recording_crc)
    buffer = mmap.mmap(-1, FRAME_PREFIX_SIZE + length)
    try:
        buffer[0:8] = struct.pack(">II", length, 0xDEADBEEF)
        view = memoryview(buffer)
        try:
            assert decode_frame(view, 0) is None
        finally:
            view.release()
    finally:
        buffer.close()
    if refused_for_length:
        assert seen == [], "a length over MAX_PAYLOAD must be refused before the CRC is computed"
    else:
        assert length in seen, "a frame of exactly MAX_PAYLOAD bytes must reach its CRC check"


@pytest.mark.parametrize("present", [0, 1, FRAME_LEAD_SIZE - 1, FRAME_LEAD_SIZE, FRAME_LEAD_SIZE + 5, 100])
def test_length_overrunning_the_buffer_is_rejected_even_if_the_crc_matches_the_bytes_present(present):
    """A torn last frame whose length word promises more than the buffer holds, and whose
    CRC happens to match the length word and the payload bytes that are there."""
    payload = struct.pack(">QBQ", 7, RECORD_DELIVER, 6) + bytes(range(1, 100))
    payload = payload[:present]
    word = struct.pack(">I", present + 1 + 100)  # one byte (or more) beyond the buffer
    data = word + struct.pack(">I", _crcmod_crc32c(word + payload)) + payload
    assert decode_frame(data, 0) is None
    assert decode_frame(b"\x00" * 3 + data, 3) is None
    assert decode_frame(memoryview(data), 0) is None


# --- DELIVER records ------------------------------------------------------------------


@given(delivers())
def test_deliver_round_trip(record):
    body = encode_deliver(record)
    assert len(body) == 41 + 8 + len(record.body) + 16 * len(record.pairs)
    assert decode_deliver(body) == record


@given(U64_EDGES, U64_EDGES, delivers())
def test_deliver_frame_is_a_frame_of_a_deliver_record(lsn, synced, record):
    expected = encode_frame(lsn, RECORD_DELIVER, encode_deliver(record), synced)
    assert _codec.encode_deliver_frame(lsn, synced, record) == expected
    frame = decode_frame(expected, 0)
    assert frame.lsn == lsn and frame.rtype == RECORD_DELIVER and frame.synced == synced
    assert decode_deliver(frame.body) == record


def test_deliver_record_type_byte_is_1():
    """The type byte is on disk in every existing WAL: its value is part of the format."""
    assert RECORD_DELIVER == 1
    record = Deliver(1, 2, 3, 4, 5, 6, b"body", ((7, 8),))
    frame = _codec.encode_deliver_frame(10, 9, record)
    assert frame[16] == 1
    assert frame[8:25] == struct.pack(">QBQ", 10, 1, 9)


def test_deliver_layout_matches_the_documented_format():
    record = Deliver(1, 2, 3, 4, 5, 6, b"body", ((7, 8), (9, 10)))
    body = encode_deliver(record)
    assert body[:41] == struct.pack(">QQQQQB", 1, 2, 3, 4, 5, 6)
    assert body[41:49] == struct.pack(">II", 4, 2)
    assert body[49:53] == b"body"
    assert body[53:] == struct.pack(">QQQQ", 7, 8, 9, 10)


@given(delivers(), st.integers(1, 40))
def test_deliver_truncated_or_extended_is_corruption(record, cut):
    body = encode_deliver(record)
    with pytest.raises(CorruptionError):
        decode_deliver(body[: max(0, len(body) - cut)])
    with pytest.raises(CorruptionError):
        decode_deliver(body + b"\x00" * cut)


@given(delivers(), st.sampled_from(["blen", "count"]), st.integers(1, 2**32 - 1))
def test_deliver_inconsistent_length_fields_are_corruption(record, field, delta):
    body = bytearray(encode_deliver(record))
    position = 41 if field == "blen" else 45
    (value,) = struct.unpack_from(">I", body, position)
    struct.pack_into(">I", body, position, (value + delta) % 2**32)
    with pytest.raises(CorruptionError):
        decode_deliver(bytes(body))


def test_deliver_shorter_than_fixed_part_is_corruption_naming_where():
    for length in range(49):
        with pytest.raises(CorruptionError) as info:
            decode_deliver(b"\x01" * length, path="/x/wal-1.log", offset=77)
        assert info.value.path == "/x/wal-1.log" and info.value.offset == 77
        assert isinstance(info.value, SyncStoreError)


# --- LMDB values ------------------------------------------------------------------------


FINGERPRINTS = st.binary(min_size=16, max_size=16)


@given(U64_EDGES, FINGERPRINTS, PAIRS)
def test_dedup_round_trip(msg_id, fingerprint, pairs):
    value = encode_dedup(msg_id, fingerprint, pairs)
    assert len(value) == 28 + 16 * len(pairs)  # msg_id, 16-byte fingerprint, count, pairs
    assert value[:8] == struct.pack(">Q", msg_id) and value[8:24] == fingerprint
    assert decode_dedup(value) == (msg_id, fingerprint, pairs)


@given(U64_EDGES, FINGERPRINTS, PAIRS, st.integers(1, 20))
def test_dedup_bad_lengths_are_corruption(msg_id, fingerprint, pairs, cut):
    value = encode_dedup(msg_id, fingerprint, pairs)
    with pytest.raises(CorruptionError):
        decode_dedup(value[: max(0, len(value) - cut)])
    with pytest.raises(CorruptionError):
        decode_dedup(value + b"\x00" * cut)


@given(delivers(), U64_EDGES)
def test_message_and_inbox_entry_round_trip(record, cursor):
    value = _codec.encode_message_value(record)
    assert _codec.unpack_stored_head(value) == (len(record.pairs), record.sender, record.conv, record.client_seq, record.ts_ms, record.priority)
    assert value[STORED_HEAD_SIZE:] == record.body
    entry = _codec.pack_inbox_entry(cursor, record.msg_id)
    assert len(entry) == INBOX_ENTRY_SIZE == 16
    assert _codec.unpack_inbox_entry(entry) == (cursor, record.msg_id)
    key = struct.pack(">Q", record.msg_id)
    assert StoredMessage.from_ref((entry, (key, value))) == StoredMessage.from_record(cursor, record)
    assert MessageRecord.from_value(record.msg_id, value) == MessageRecord.from_record(record)


@given(delivers(), st.integers(0, 2**32 - 1))
def test_set_refs_changes_only_the_count(record, refs):
    value = _codec.encode_message_value(record)
    changed = _codec.set_refs(value, refs)
    assert _codec.unpack_stored_head(changed)[0] == refs
    assert changed[4:] == value[4:]  # an identity function would fail the line above for refs != len(pairs)


@given(st.lists(st.tuples(U64_EDGES, U64_EDGES), min_size=2, max_size=30, unique=True))
def test_inbox_entries_sort_by_cursor(pairs):
    # LMDB sorts a user's duplicates by their bytes: that must be cursor order.
    entries = [_codec.pack_inbox_entry(cursor, msg_id) for cursor, msg_id in pairs]
    assert [_codec.unpack_inbox_entry(e)[0] for e in sorted(entries)] == sorted(cursor for cursor, _ in pairs) or len({c for c, _ in pairs}) < len(pairs)


# --- segment header --------------------------------------------------------------------


@given(U64_EDGES)
def test_segment_header_round_trip(first_lsn):
    header = encode_segment_header(first_lsn)
    assert len(header) == SEGMENT_HEADER_SIZE == 24
    assert header[:8] == SEGMENT_MAGIC
    assert header[8:10] == b"\x00\x01" and header[10:12] == b"\x00\x00"
    assert header[12:20] == struct.pack(">Q", first_lsn)
    assert header[20:24] == struct.pack(">I", _crcmod_crc32c(header[:20]))
    assert decode_segment_header(header) == first_lsn
    # Frames follow the header in a real segment: they do not disturb it.
    assert decode_segment_header(header + encode_frame(first_lsn, 1, b"x")) == first_lsn


def test_every_single_byte_corruption_of_a_segment_header_is_detected():
    header = encode_segment_header(0x0123456789ABCDEF)
    for position in range(SEGMENT_HEADER_SIZE):
        for xor in range(1, 256):
            with pytest.raises(CorruptionError) as info:
                decode_segment_header(_flip(header, position, xor), path="/d/wal-x.log")
            assert info.value.path == "/d/wal-x.log", (position, xor)
            # The magic is checked first, then the CRC (before the fields it covers):
            # every single-byte change is reported at the start of the header.
            assert info.value.offset == 0, (position, xor)


@given(U64_EDGES, st.integers(0, SEGMENT_HEADER_SIZE - 1), st.integers(1, 255))
def test_segment_header_single_byte_corruption_hypothesis(first_lsn, position, xor):
    with pytest.raises(CorruptionError):
        decode_segment_header(_flip(encode_segment_header(first_lsn), position, xor))


def test_truncated_segment_header_is_corruption():
    header = encode_segment_header(5)
    for length in range(SEGMENT_HEADER_SIZE):
        with pytest.raises(CorruptionError) as info:
            decode_segment_header(header[:length], path="p")
        assert info.value.path == "p" and info.value.offset == 0


def test_unsupported_version_with_valid_crc_is_corruption_at_the_version_field():
    body = struct.pack(">8sHHQ", SEGMENT_MAGIC, 2, 0, 9)
    header = body + struct.pack(">I", _crcmod_crc32c(body))
    with pytest.raises(CorruptionError) as info:
        decode_segment_header(header, path="p")
    assert info.value.offset == 8
    assert "version" in str(info.value)


def test_foreign_file_with_valid_crc_is_corruption():
    body = struct.pack(">8sHHQ", b"NOTAWAL\x00", 1, 0, 9)
    header = body + struct.pack(">I", _crcmod_crc32c(body))
    with pytest.raises(CorruptionError):
        decode_segment_header(header)


@settings(max_examples=50)
@given(st.binary(min_size=SEGMENT_HEADER_SIZE, max_size=64))
def test_random_bytes_are_not_a_segment_header(data):
    assume(not data.startswith(SEGMENT_MAGIC))
    with pytest.raises(CorruptionError):
        decode_segment_header(data)


@given(st.lists(delivers(), min_size=1, max_size=5))
def test_the_apply_loop_encodes_as_the_codec_does(records):
    # state._encode_batch writes the formats out inline for speed; it must agree with the encoders here.
    from syncstore.state import _encode_batch

    (messages, inbox, history, dedup, expiry), last_id = _encode_batch(records)
    assert last_id == max(r.msg_id for r in records)
    for record in records:
        assert (struct.pack(">Q", record.msg_id), _codec.encode_message_value(record)) in messages
        fingerprint = _codec.dedup_fingerprint(record.conv, record.body)
        assert (struct.pack(">QQ", record.sender, record.client_seq), encode_dedup(record.msg_id, fingerprint, record.pairs)) in dedup
        for uid, cursor in record.pairs:
            assert (struct.pack(">Q", uid), _codec.pack_inbox_entry(cursor, record.msg_id)) in inbox
            assert (struct.pack(">QQ", uid, record.conv), struct.pack(">Q", cursor)) in history
    assert len(inbox) == len(history) == sum(len(r.pairs) for r in records)
    assert len(messages) == len(expiry) == len(records)
    for items in (messages, inbox, history, dedup, expiry):
        assert [key for key, _ in items] == sorted(key for key, _ in items)


@given(delivers(), st.integers(1, 30))
def test_deliver_pairs_reads_what_decode_deliver_reads_and_checks_the_same_lengths(record, cut):
    body = encode_deliver(record)
    assert _codec.deliver_pairs(body) == decode_deliver(body).pairs == record.pairs
    for bad in (body[: max(0, len(body) - cut)], body + b"\x00" * cut):
        with pytest.raises(CorruptionError):
            _codec.deliver_pairs(bad)
